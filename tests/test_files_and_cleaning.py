"""Loaders and the data-quality report: every dropped row is counted by reason."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dmp_dl.core.errors import DataError
from dmp_dl.data.cleaning import CleaningOptions, clean_events, clean_log, parse_timestamps
from dmp_dl.data.event_files import EventFileSource

WEIGHTS = {"view": 1.0, "click": 2.0, "purchase": 5.0}


def write(path, text: str, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def load_clean(path, **opts):
    raw = EventFileSource(path=str(path)).load()
    return clean_log(raw, CleaningOptions(**{"event_weights": WEIGHTS, **opts}))


def test_dirty_csv_counts_add_up(tmp_path):
    path = write(
        tmp_path / "dirty.csv",
        "user_id,item_id,timestamp,event_type,value\n"
        "1,a,1700000000,view,\n"  # ok (value missing -> filled)
        "1,a,1700000000,view,\n"  # exact duplicate
        "2,b,not-a-time,click,1\n"  # bad timestamp
        ",c,1700000100,view,1\n"  # missing user id
        "3,,1700000100,view,1\n"  # missing item id
        "3,d,1700000200,purchase,NaN\n"  # NaN value
        "3,d,1700000300,purchase,inf\n"  # inf value
        "4,e,1700000400,teleport,1\n"  # unknown event type
        "5,f,100,view,1\n"  # 1970: out of range
        "6,g,1700000500,click,2,extra\n"  # malformed (6 fields)
        "7,h,2023-11-14T22:13:20Z,purchase,9.5\n"  # ok (ISO)
        "8,i,1700000600,VIEW,\n",  # ok (type case-insensitive)
    )
    clean, report = load_clean(path)
    ev = report.events
    assert ev.rows_in == 12
    assert ev.rows_out == 3 == len(clean.events)
    assert ev.dropped == {
        "duplicate": 1, "bad_timestamp": 1, "missing_user_id": 1, "missing_item_id": 1,
        "bad_value": 2, "unknown_event_type": 1, "timestamp_out_of_range": 1, "malformed_row": 1,
    }
    assert ev.rows_in - ev.rows_out == sum(ev.dropped.values())
    assert ev.filled == {"value": 2}
    assert report.events_per_type == {"purchase": 1, "view": 2}
    assert set(clean.events["user_id"]) == {"1", "7", "8"}
    # the quality report is data and JSON
    report.write_json(tmp_path / "q.json")
    assert '"bad_value": 2' in (tmp_path / "q.json").read_text()


@pytest.mark.parametrize("form", ["csv", "parquet"])
def test_a_consumed_raw_log_cleans_alike_and_gives_its_columns_up(tmp_path, form):
    """The data module hands the raw log to cleaning (``consume``): each column read is dropped from
    it, so the raw and the clean log are not both held whole; the result is the same."""
    frame = pd.DataFrame({"user_id": ["u1", "u2", "u1", None, "u3", "u2"], "item_id": ["a", "b", "b", "c", "a", "a"],
                          "timestamp": [1700000000 + 60 * k for k in range(6)],
                          "event_type": ["view", "click", "view", "view", "purchase", "view"],
                          "value": [0.0, 1.0, None, 0.0, 9.5, 0.0], "campaign": ["x"] * 6})
    path = tmp_path / f"events.{form}"
    frame.to_csv(path, index=False) if form == "csv" else frame.to_parquet(path)
    kept = EventFileSource(path=str(path)).load()
    handed = EventFileSource(path=str(path)).load()
    plain, plain_report = clean_log(kept, CleaningOptions(), index_ids=True)
    consumed, consumed_report = clean_log(handed, CleaningOptions(), index_ids=True, consume=True)
    pd.testing.assert_frame_equal(consumed.events, plain.events)
    assert consumed_report.to_dict() == plain_report.to_dict()
    assert {"user_id", "item_id", "timestamp", "event_type", "value"}.isdisjoint(handed.events.columns)
    assert len(kept.events.columns) >= 5  # without consume the caller's frame is left whole


def test_ids_are_strings_everywhere(tmp_path):
    # 123 (int column), "123" (string) and 123.0 (float column with gaps) are the same user.
    a = pd.DataFrame({"user_id": [123, 124], "item_id": ["x", "y"], "timestamp": [1.7e9, 1.7e9]})
    b = pd.DataFrame({"user_id": ["123", " 124 "], "item_id": ["x", "y"], "timestamp": [1.7e9, 1.7e9]})
    c = pd.DataFrame({"user_id": [123.0, np.nan], "item_id": ["x", "y"], "timestamp": [1.7e9, 1.7e9]})
    ids = [set(clean_events(df, CleaningOptions())[0]["user_id"]) for df in (a, b, c)]
    assert ids[0] == ids[1] == {"123", "124"}
    assert ids[2] == {"123"}


def test_csv_and_parquet_round_trip_identically(tmp_path):
    df = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u2", "u3"],
            "item_id": ["10", "11", "10", "12"],
            "timestamp": [1700000000, 1700000100, 1700000200, 1700000300],
            "event_type": ["view", "click", "purchase", "view"],
            "value": [0.0, 0.0, 19.99, 0.0],
        }
    )
    df.to_csv(tmp_path / "ev.csv", index=False)
    df.to_csv(tmp_path / "ev.tsv", index=False, sep="\t")
    df.to_parquet(tmp_path / "ev.parquet", index=False)
    frames = [load_clean(tmp_path / name)[0].events for name in ("ev.csv", "ev.tsv", "ev.parquet")]
    for other in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], other)
    assert frames[0]["value"].tolist() == [0.0, 0.0, 19.99, 0.0]


def test_user_and_item_tables(tmp_path):
    write(tmp_path / "ev.csv", "user_id,item_id,timestamp\nu1,i1,1700000000\nu2,i2,1700000001\n")
    write(tmp_path / "users.csv", "user_id,age,tier\nu1,34,gold\nu2,,silver\nu2,41,bronze\n,50,gold\n")
    write(tmp_path / "items.csv", "item_id,genre\ni1,Action|Comedy\ni2,Drama\n")
    raw = EventFileSource(path=str(tmp_path / "ev.csv"), users=str(tmp_path / "users.csv"), items=str(tmp_path / "items.csv")).load()
    clean, report = clean_log(raw, CleaningOptions())
    assert report.users_table.dropped == {"duplicate_id": 1, "missing_id": 1}
    assert report.attributes["users"] == {"age": "numeric", "tier": "categorical"}
    assert clean.users.set_index("user_id").loc["u2", "age"] == 41.0  # last row wins
    assert clean.items.set_index("item_id").loc["i1", "genre"] == "Action|Comedy"


def test_column_mapping(tmp_path):
    write(tmp_path / "ev.csv", "customer,sku,ts\nc1,s1,2024-01-01T00:00:00Z\n")
    raw = EventFileSource(path=str(tmp_path / "ev.csv"), columns={"user_id": "customer", "item_id": "sku", "timestamp": "ts"}).load()
    clean, _ = clean_log(raw, CleaningOptions())
    assert clean.events.loc[0, "user_id"] == "c1"
    assert clean.events.loc[0, "timestamp"] == 1704067200


@pytest.mark.parametrize(
    "content, expected",
    [
        ("user_id,timestamp\nu1,1\n", "lacks required column 'item_id'"),
        ("user_id;item_id;timestamp\nu1;i1;1700000000\n", None),  # auto-detected separator works
        ("", "empty"),
        ("user_id,user_id,item_id,timestamp\n1,1,a,1700000000\n", "duplicated column"),
    ],
)
def test_bad_files_give_one_clear_message(tmp_path, content, expected):
    path = write(tmp_path / "ev.csv", content)
    if expected is None:
        clean, _ = load_clean(path)
        assert len(clean.events) == 1
        return
    with pytest.raises(DataError) as err:
        load_clean(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_wrong_separator_names_the_column_and_hints(tmp_path):
    path = write(tmp_path / "ev.csv", "user_id item_id timestamp\nu1 i1 1700000000\n")
    with pytest.raises(DataError, match=r"lacks required column 'user_id'.*data\.source\.sep"):
        load_clean(path)


def test_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match="not found"):
        EventFileSource(path=str(tmp_path / "nope.csv")).load()
    path = tmp_path / "latin.csv"
    path.write_bytes("user_id,item_id,timestamp\nJos\xe9,i1,1700000000\n".encode("latin-1"))
    with pytest.raises(DataError, match="encoding"):
        EventFileSource(path=str(path)).load()
    raw = EventFileSource(path=str(path), encoding="latin-1").load()
    assert clean_log(raw, CleaningOptions())[0].events.loc[0, "user_id"] == "José"


def test_no_events_left_is_an_error_with_counts(tmp_path):
    path = write(tmp_path / "ev.csv", "user_id,item_id,timestamp\nu1,i1,garbage\n")
    with pytest.raises(DataError, match="no events left.*bad_timestamp"):
        load_clean(path)


def test_timestamps_epoch_iso_and_mixed():
    col = pd.Series(["1700000000", "2023-11-14T22:13:20Z", "2023-11-14 23:13:20+01:00", "2023-11-14", "soon", ""])
    out = parse_timestamps(col)
    assert out[:3].tolist() == [1700000000.0] * 3
    assert out[3] == 1699920000.0
    assert np.isnan(out[4:]).all()
    assert parse_timestamps(pd.Series([1700000000000]), unit="ms")[0] == 1700000000.0


def test_positive_rule_and_kcore_are_counted():
    df = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "b", "b", "c"],
            "item_id": ["1", "2", "3", "1", "2", "1"],
            "timestamp": [1.7e9 + i for i in range(6)],
            "value": [5, 4, 2, 5, 5, 5],
        }
    )
    clean, rep = clean_events(df, CleaningOptions(min_value=4, kcore_users=2, kcore_items=2))
    assert rep.dropped == {"below_min_value": 1, "kcore": 1}
    assert sorted(zip(clean.user_id, clean.item_id)) == [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")]


def test_erased_users_are_dropped_and_counted():
    df = pd.DataFrame({"user_id": ["a", "b"], "item_id": ["1", "2"], "timestamp": [1.7e9, 1.7e9]})
    clean, rep = clean_events(df, CleaningOptions(), exclude_users={"b"})
    assert rep.dropped == {"erased_user": 1}
    assert clean.user_id.tolist() == ["a"]
