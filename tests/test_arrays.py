"""The sort-based distinct helpers give what numpy's unique gives."""

import numpy as np

from dmp_dl.core.arrays import distinct_pairs, unique_sorted


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
