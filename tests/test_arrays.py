"""The sort-based distinct helpers give what numpy's unique gives; the block-wise counts what
numpy's whole-array functions give."""

import numpy as np

from dmp_dl.core.arrays import bincount_blocks, count_per_segment, distinct_pairs, flatnonzero_blocks, unique_sorted


def test_unique_sorted_matches_numpy_unique():
    rng = np.random.default_rng(0)
    for a in (rng.integers(-50, 50, 1000), rng.integers(0, 10**12, 5000), np.zeros(0, np.int64), np.array([7])):
        np.testing.assert_array_equal(unique_sorted(a), np.unique(a))


def test_distinct_pairs_match_a_row_wise_unique_with_negative_codes():
    rng = np.random.default_rng(1)
    rows, codes = rng.integers(0, 30, 2000), rng.integers(-400, 400, 2000)  # days before 1970 are negative
    ref = np.unique(np.stack([rows, codes], axis=1), axis=0)
    got_rows, got_codes = distinct_pairs(rows, codes)
    np.testing.assert_array_equal(np.stack([got_rows, got_codes], axis=1), ref)
    empty = distinct_pairs(np.zeros(0, np.int64), np.zeros(0))
    assert len(empty[0]) == len(empty[1]) == 0


def test_block_wise_counts_match_numpy_at_every_block_size():
    rng = np.random.default_rng(2)
    for n in (0, 1, 7, 100, 1000):
        keep = rng.random(n) < 0.3
        labels = rng.integers(0, 5, n).astype(np.int8)
        # segments of any length, empty ones and a bound at a block's edge included
        bounds = np.concatenate(([0], np.sort(rng.integers(0, n + 1, 12)), [n]))
        expected = [int(keep[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        for block in (1, 3, 16, 1 << 22):
            assert count_per_segment(keep, bounds, block).tolist() == expected
            assert bincount_blocks(labels, 3, block).tolist() == np.bincount(labels, minlength=3).tolist()
            got = flatnonzero_blocks(keep, np.int32, block)
            assert got.dtype == np.int32 and got.tolist() == np.flatnonzero(keep).tolist()
