"""The vectorised data stage gives what straightforward per-event Python gives, on random logs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmp_dl.data.datamodule import InteractionDataModule, last_items
from dmp_dl.data.grouping import group_bounds, sorted_order, stable_order
from dmp_dl.data.pairs import SplitPairs
from dmp_dl.data.split import TEST, TRAIN, VAL, SplitOptions, assign_split, heldout_users, resolve_split, split_events

SETTINGS = settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@st.composite
def split_logs(draw, max_events: int = 60):
    """(user, item, labels): a small log with many repeated pairs, split labels at random."""
    n = draw(st.integers(0, max_events))
    n_users, n_items = draw(st.integers(1, 8)), draw(st.integers(1, 6))
    ints = st.lists(st.integers(0, 10**6), min_size=n, max_size=n)
    user = np.array(draw(ints), dtype=np.int64) % n_users
    item = np.array(draw(ints), dtype=np.int64) % n_items
    labels = (np.array(draw(ints), dtype=np.int64) % 3).astype(np.int8)
    return user, item, labels


def reference_pairs(user, item, labels):
    """Per part, the set of (user, item) pairs; the users with a training event."""
    parts = {code: {(int(u), int(i)) for u, i, s in zip(user, item, labels) if s == code} for code in (TRAIN, VAL, TEST)}
    warm = {int(u) for u, s in zip(user, labels) if s == TRAIN}
    return parts, warm


def reference_relevant(parts, warm):
    """The held-out pairs each evaluation ranks: warm users' pairs new in that part."""
    val = {p for p in parts[VAL] if p[0] in warm and p not in parts[TRAIN]}
    test = {p for p in parts[TEST] if p[0] in warm and p not in parts[TRAIN] and p not in parts[VAL]}
    return val, test


def pairs_of(m) -> set[tuple[int, int]]:
    coo = m.tocoo()
    return set(zip(coo.row.tolist(), coo.col.tolist()))


def assert_binary_canonical(m):
    assert m.dtype == np.float32 and (m.data == 1.0).all()
    assert m.has_sorted_indices and m.has_canonical_format
    coo = m.tocoo()
    assert len(set(zip(coo.row.tolist(), coo.col.tolist()))) == m.nnz  # no repeated entry


@SETTINGS
@given(split_logs())
def test_heldout_users_counts_users_with_a_new_held_out_pair(log):
    user, item, labels = log
    val, test = reference_relevant(*reference_pairs(user, item, labels))
    assert heldout_users(user, item, labels) == (len({u for u, _ in val}), len({u for u, _ in test}))


@SETTINGS
@given(split_logs())
def test_split_pairs_match_sets_of_pairs(log):
    user, item, labels = log
    n_users, n_items = 9, 7
    parts, warm = reference_pairs(user, item, labels)
    val, test = reference_relevant(parts, warm)
    pairs = SplitPairs.build(user, item, labels, n_users, n_items)
    for m in (pairs.train, pairs.all(), pairs.seen(0b011), pairs.relevant(VAL), pairs.relevant(TEST)):
        assert m.shape == (n_users, n_items)
        assert_binary_canonical(m)
    assert pairs_of(pairs.train) == parts[TRAIN]
    assert pairs_of(pairs.all()) == parts[TRAIN] | parts[VAL] | parts[TEST]
    assert pairs_of(pairs.seen(0b011)) == parts[TRAIN] | parts[VAL]
    assert pairs_of(pairs.relevant(VAL)) == val
    assert pairs_of(pairs.relevant(TEST)) == test
    assert pairs.already_seen(VAL) == len(parts[VAL] & parts[TRAIN])
    assert pairs.already_seen(TEST) == len({p for p in parts[TEST] & (parts[TRAIN] | parts[VAL]) if p[0] in warm})
    assert set(np.flatnonzero(pairs.warm).tolist()) == warm
    assert pairs.user_counts() == (len({u for u, _ in val}), len({u for u, _ in test}))


@SETTINGS
@given(st.lists(st.integers(-5, 5), max_size=50), st.sampled_from([1, 10**17, 2**62]))
def test_stable_order_is_a_stable_argsort(keys, scale):
    keys = np.array(keys, dtype=np.int64) * scale  # large keys take the overflow-safe path
    order = stable_order(keys)
    assert order.dtype == np.int64
    again, in_order = sorted_order(keys)
    assert again.tolist() == order.tolist() and in_order.tolist() == keys[order].tolist()
    assert order.tolist() == sorted(range(len(keys)), key=lambda k: (keys[k], k))
    if scale == 1:  # keys that fit int32: the narrow results, built a few rows at a time, are the same
        narrow, narrow_keys = sorted_order(keys, dtype=np.int32, block=3)
        assert narrow.dtype == narrow_keys.dtype == np.int32
        assert narrow.tolist() == order.tolist() and narrow_keys.tolist() == keys[order].tolist()
    starts, ends = group_bounds(keys[order])
    assert [keys[order][a:b].tolist() for a, b in zip(starts, ends)] == [
        [k] * keys.tolist().count(k) for k in sorted(set(keys.tolist()))]


@SETTINGS
@given(split_logs(), st.integers(0, 4))
def test_last_items_are_each_users_latest_items(log, length):
    user, item, _ = log
    out = last_items(user, item, n_users=9, length=length, pad=-1)
    for u in range(9):
        latest = [int(i) for uu, i in zip(user, item) if uu == u][::-1][:length]
        assert out[u].tolist() == latest + [-1] * (length - len(latest))


@SETTINGS
@given(split_logs(), st.sampled_from(["leave_last_n", "random_per_user"]), st.integers(1, 2),
       st.sampled_from([0.0, 0.2, 0.5]), st.sampled_from([0.0, 0.3]))
def test_per_user_splits_follow_each_users_event_order(log, method, n, val_frac, test_frac):
    user, _, _ = log
    opts = SplitOptions(method, val_frac=val_frac, test_frac=test_frac, n=n, seed=3)
    labels = assign_split(user, np.arange(len(user)), opts)
    draws = np.random.default_rng(3).random(len(user))
    for u in set(user.tolist()):
        rows = [k for k in range(len(user)) if user[k] == u]
        count = len(rows)
        if method == "leave_last_n":  # the last n events test, the n before them validation
            expected = [TEST if count > n and k >= count - n else
                        VAL if count > 2 * n and count - 2 * n <= k < count - n else TRAIN for k in range(count)]
        else:  # a seeded shuffle of the user's events: the first ones test, then validation
            rows = sorted(rows, key=lambda k: (draws[k], k))
            n_test = int(np.floor(count * test_frac))
            n_val = min(int(np.floor(count * val_frac)), max(count - n_test - 1, 0))
            expected = [TEST if k < n_test else VAL if k < n_test + n_val else TRAIN for k in range(count)]
        assert labels[rows].tolist() == expected


@SETTINGS
@given(split_logs(), st.integers(0, 3))
def test_auto_split_hands_its_pairs_on(log, min_users):
    user, item, _ = log
    ts = np.sort(np.array(np.random.default_rng(len(user)).integers(0, 5, len(user))))
    opts = SplitOptions("auto", auto_min_users=min_users, auto_min_user_share=0.0)
    split = resolve_split(user, item, ts, True, opts, 9, 7)
    assert (split.labels.tolist(), split.method, split.reason) == tuple(
        x.tolist() if isinstance(x, np.ndarray) else x for x in split_events(user, item, ts, True, opts))
    if split.pairs is not None:  # handed on only for the labels returned
        assert split.method == "global_temporal"
        fresh = SplitPairs.build(user, item, split.labels, 9, 7)
        assert pairs_of(split.pairs.all()) == pairs_of(fresh.all())
        assert (split.pairs.parts != fresh.parts).nnz == 0


@pytest.mark.parametrize("method", ["global_temporal", "leave_last_n", "random_per_user"])
def test_datamodule_evaluation_sets_match_sets_of_pairs(method):
    from dmp_dl.data.synthetic import SyntheticSource

    dm = InteractionDataModule(SyntheticSource(n_users=200, n_items=80, n_events=3000, seed=4),
                               split={"method": method}, history_len=3).prepare()
    ev = dm.events
    user, item, labels = ev["user_idx"].to_numpy(), ev["item_idx"].to_numpy(), ev["split"].to_numpy()
    parts, warm = reference_pairs(user, item, labels)
    val, test = reference_relevant(parts, warm)
    assert pairs_of(dm.train_seen) == parts[TRAIN] and dm.val_seen is dm.train_seen
    assert pairs_of(dm.all_seen) == parts[TRAIN] | parts[VAL] | parts[TEST]
    assert pairs_of(dm.test_seen) == parts[TRAIN] | parts[VAL]
    assert pairs_of(dm.val_relevant) == val and pairs_of(dm.test_relevant) == test
    assert dm.val_users.tolist() == sorted({u for u, _ in val}) and dm.test_users.tolist() == sorted({u for u, _ in test})
    assert set(dm.step_seconds) == {"load", "clean", "vocabularies", "split", "evaluation_sets", "features"}
    assert all(v["wall"] >= 0 and v["cpu"] >= 0 for v in dm.step_seconds.values())
    stats = dm.report.split
    assert stats["val_pairs_already_seen"] == len(parts[VAL] & parts[TRAIN])
    assert stats["test_pairs_already_seen"] == len({p for p in parts[TEST] & (parts[TRAIN] | parts[VAL]) if p[0] in warm})
    assert stats["val_users"] == len(dm.val_users) and stats["test_pairs"] == len(test)
    assert dm.item_counts.tolist() == np.bincount(item[labels == TRAIN], minlength=dm.n_items).tolist()
    train = labels == TRAIN  # histories: each user's latest training items, and latest items of all
    assert dm.train_history.tolist() == last_items(user[train], item[train], dm.n_users, 3, dm.n_items).tolist()
    assert dm.full_history.tolist() == last_items(user, item, dm.n_users, 3, dm.n_items).tolist()
    before_test = labels != TEST  # a test user's input when ranked: what they did before the test period
    assert dm.test_input_history.tolist() == last_items(user[before_test], item[before_test], dm.n_users, 3,
                                                        dm.n_items).tolist()
    if method == "global_temporal":
        assert stats["train_time_max"] == int(ev["timestamp"].to_numpy()[train].max())
    # vocabularies: sorted ids, and every event's indices name its own ids
    assert list(dm.user_vocab.ids) == sorted(set(ev["user_id"])) and list(dm.item_vocab.ids) == sorted(set(ev["item_id"]))
    assert (dm.user_vocab.ids[user] == ev["user_id"].to_numpy()).all()
    assert (dm.item_vocab.ids[item] == ev["item_id"].to_numpy()).all()


def test_interaction_rows_are_built_once_and_shared_read_only():
    from dmp_dl.data.datamodule import weighted_rows
    from dmp_dl.data.synthetic import SyntheticSource

    dm = InteractionDataModule(SyntheticSource(n_users=150, n_items=60, n_events=2000, seed=2), history_len=2).prepare()
    ev = dm.events
    train = ev["split"].to_numpy() == TRAIN
    for which, mask in (("train", train), ("all", np.ones(len(ev), dtype=bool))):
        expected = weighted_rows(dm.n_users, dm.n_items, ev["user_idx"].to_numpy()[mask], ev["item_idx"].to_numpy()[mask],
                                 ev["weight"].to_numpy()[mask])
        first = dm.interaction_rows(which)
        assert (first != expected).nnz == 0 and first.dtype == np.float32
        assert dm.interaction_rows(which) is first  # built once, no copy per caller ...
        with pytest.raises(ValueError, match="read-only"):
            first.data[:] = -1.0  # ... so a caller writing into it in place is stopped
        scaled = first.copy()
        scaled.data *= 2.0  # a copy is the caller's own
        assert (dm.interaction_rows(which) != expected).nnz == 0
    view = dm.everything_as_training()
    assert (view.interaction_rows("all") != dm.interaction_rows("all")).nnz == 0
