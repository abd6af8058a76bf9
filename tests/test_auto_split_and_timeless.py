"""data.split.method=auto and logs without event times."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dmp_dl.core.errors import ConfigError
from dmp_dl.data.datamodule import InteractionDataModule
from dmp_dl.data.event_files import EventFileSource
from dmp_dl.data.split import SplitOptions, heldout_users, split_events
from dmp_dl.data.synthetic import SyntheticSource

DAY = 86400


def _module(source, **split) -> InteractionDataModule:
    return InteractionDataModule(source, split=split, history_len=5).prepare()


def _long_lived_log(n_users: int = 400, seed: int = 0) -> pd.DataFrame:
    """Users who each rate a burst of items at some moment of three years, as on a public ratings
    site: a cut in time finds few users on both sides of it."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(0, 3 * 365, n_users) * DAY
    counts = rng.integers(8, 40, n_users)
    user = np.repeat(np.arange(n_users), counts)
    t = pd.Timestamp("2021-01-01", tz="UTC").timestamp() + start[user] + rng.exponential(3 * DAY, len(user))
    item = rng.zipf(1.3, len(user)) % 300
    return pd.DataFrame({"user_id": user, "item_id": item, "timestamp": t.astype(np.int64)})


def test_auto_keeps_the_global_cut_when_it_leaves_enough_users():
    dm = _module(SyntheticSource(n_users=400, n_items=150, n_events=12000, seed=1))
    split = dm.report.split
    assert split["method"] == "global_temporal" and split["method_requested"] == "auto"
    assert split["val_users"] >= 100 and split["test_users"] >= 100  # the documented thresholds
    assert "one cut in time leaves" in split["method_reason"]
    assert dm.history_sampling == "recent"


def test_auto_falls_back_to_leave_last_n_on_a_long_lived_log(tmp_path):
    path = tmp_path / "ratings.csv"
    _long_lived_log().to_csv(path, index=False)
    dm = _module(EventFileSource(path=str(path)))
    split = dm.report.split
    assert split["method"] == "leave_last_n"
    assert "would leave" in split["method_reason"] and "auto_min_users=100" in split["method_reason"]
    # the global cut would have left few users to rank; leave_last_n gives most users a test item
    assert split["test_users"] > 0.5 * dm.n_users
    # an explicit method is kept as given
    explicit = _module(EventFileSource(path=str(path)), method="global_temporal")
    assert explicit.report.split["method"] == "global_temporal" and explicit.report.split["method_reason"] is None
    assert explicit.report.split["test_users"] < 0.1 * dm.n_users


def test_heldout_users_are_the_users_the_datamodule_evaluates(tmp_path):
    path = tmp_path / "ratings.csv"
    _long_lived_log(n_users=200, seed=2).to_csv(path, index=False)
    for method in ("global_temporal", "leave_last_n", "random_per_user"):
        dm = _module(EventFileSource(path=str(path)), method=method)
        ev = dm.events
        counts = heldout_users(ev["user_idx"].to_numpy(), ev["item_idx"].to_numpy(), ev["split"].to_numpy())
        assert counts == (len(dm.val_users), len(dm.test_users)), method


def test_split_events_thresholds_are_settings():
    rng = np.random.default_rng(0)
    user = rng.integers(0, 300, 6000)
    item = rng.integers(0, 100, 6000)
    ts = np.sort(rng.integers(0, 10**7, 6000))
    _, method, _ = split_events(user, item, ts, True, SplitOptions("auto"))
    assert method == "global_temporal"
    _, method, reason = split_events(user, item, ts, True, SplitOptions("auto", auto_min_users=10**6))
    assert method == "leave_last_n" and "at least 1000000 each" in reason
    _, method, reason = split_events(user, item, ts, False, SplitOptions("auto"))
    assert (method, reason) == ("random_per_user", "auto: the log has no event times")
    with pytest.raises(ConfigError, match="data.split.auto_min_user_share"):
        SplitOptions("auto", auto_min_user_share=2)


@pytest.mark.parametrize("times", ["absent", "constant_zero", "constant_date"])
def test_a_log_without_usable_times_trains_with_a_random_per_user_split(tmp_path, times):
    rng = np.random.default_rng(0)
    n = 4000
    log = pd.DataFrame({"user_id": rng.integers(0, 200, n), "item_id": rng.integers(0, 80, n),
                        "value": rng.integers(1, 50, n)})  # e.g. play counts
    if times == "constant_zero":
        log["timestamp"] = 0
    elif times == "constant_date":
        log["timestamp"] = "2024-05-01"
    path = tmp_path / "plays.csv"
    log.to_csv(path, index=False)
    dm = _module(EventFileSource(path=str(path)))
    report = json.loads(json.dumps(dm.report.to_dict()))
    assert report["has_timestamps"] is False
    assert report["timestamps_note"] == {"absent": "the log has no timestamp column",
                                         "constant_zero": "every event has the same timestamp (1970-01-01T00:00:00+00:00)",
                                         "constant_date": "every event has the same timestamp (2024-05-01T00:00:00+00:00)"}[times]
    assert report["events"]["dropped"].get("timestamp_out_of_range", 0) == 0  # a placeholder time drops nothing
    assert report["split"]["method"] == "random_per_user" and report["split"]["train_time_max"] is None
    assert dm.history_sampling == "random"  # follows the resolved split
    assert len(dm.val_users) > 100 and len(dm.test_users) > 100
    with pytest.raises(ConfigError, match="data.split.method=leave_last_n needs event times"):
        _module(EventFileSource(path=str(path)), method="leave_last_n")


def test_unparseable_times_are_still_counted_drops(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i1,1700000000\nu1,i2,1700000100\nu2,i1,yesterday\nu2,i2,1700000200\n")
    dm_report = _module(EventFileSource(path=str(path)), method="random_per_user").report
    assert dm_report.events.dropped == {"bad_timestamp": 1} and dm_report.has_timestamps
