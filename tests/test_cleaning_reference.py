"""Cleaning done once per distinct value gives what row-by-row cleaning gives, on random messy logs."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmp_dl.data.grouping as grouping
from dmp_dl.data.cleaning import MISSING_TOKENS, CleaningOptions, _stripped_text, clean_events, parse_timestamps
from dmp_dl.data.distinct import TEXT_DTYPE, Coded, per_distinct, per_distinct_cells
from dmp_dl.data.features import FeatureTable
from dmp_dl.data.grouping import duplicated_rows
from dmp_dl.data.schema import _normalize_ids, normalize_ids
from dmp_dl.data.vocab import IdVocab

SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
T0 = 1_600_000_000
MIN_TIME = 631_152_000  # data.cleaning.min_timestamp's default, 1990-01-01
# ids that normalise alike (" u1", "u1 "), stand for no id ("nan", "NULL") or compare equal as
# Python objects while printing differently (1, 1.0, True; 0.0, -0.0)
TEXT_IDS = ["u1", " u1", "u1 ", "U1", "u2", "", " ", "nan", "NULL", "n/a", "1", "1.0", "é|x"]
ODD_IDS = [None, float("nan"), 1, 1.0, True, 0.0, -0.0, 2.5, 10**20]
TIMES = [str(T0), f" {T0 + 60} ", f"{T0}.5", "2021-03-04T05:06:07Z", "2021-03-04 05:06:08", "garbage", "", None,
         "100", T0 + 120, float(T0 + 180)]
TYPES = ["view", " VIEW ", "click", "Purchase", "", None, "bogus"]
VALUES = ["1", " 2.5", "", "abc", "1e13", None, 3, 0.0, -0.0, "-0"]


def column(draw, pool, n):
    return pd.Series([draw(st.sampled_from(pool)) for _ in range(n)], dtype=object)


def id_column(draw, n):
    kind = draw(st.sampled_from(["text", "odd", "float", "int", "str"]))
    if kind == "float":
        return pd.Series(draw(st.lists(st.sampled_from([1.0, 2.0, -0.0, 0.0, 2.5, np.nan, 1e20]), min_size=n, max_size=n)),
                         dtype=np.float64)
    if kind == "int":
        return pd.Series(draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n)), dtype=np.int64)
    if kind == "str":  # as pandas stores strings (arrow-backed)
        return pd.Series(draw(st.lists(st.sampled_from(TEXT_IDS), min_size=n, max_size=n)), dtype=TEXT_DTYPE)
    return column(draw, TEXT_IDS + (ODD_IDS if kind == "odd" else []), n)


@st.composite
def raw_logs(draw):
    n = draw(st.integers(0, 40))
    raw = pd.DataFrame({"user_id": id_column(draw, n), "item_id": id_column(draw, n)})
    if draw(st.booleans()):
        raw["timestamp"] = (column(draw, TIMES, n) if draw(st.booleans()) else
                            pd.Series([T0 + 60 * draw(st.integers(0, 3)) for _ in range(n)], dtype=np.int64))
    if draw(st.booleans()):
        raw["event_type"] = column(draw, TYPES, n)
    if draw(st.booleans()):
        raw["value"] = column(draw, VALUES, n)
    if draw(st.booleans()):
        raw["event_id"] = column(draw, ["e1", "e2", " e1", "", None, 7], n)
    return raw


@st.composite
def cleaning_options(draw):
    return CleaningOptions(
        event_weights=draw(st.sampled_from([None, {"view": 1.0, "click": 2.0, "purchase": 5.0}])),
        default_event_type=draw(st.sampled_from(["interaction", "view"])),
        max_timestamp=T0 + 10**8, max_abs_value=draw(st.sampled_from([1e12, 2.0])),
        min_value=draw(st.sampled_from([None, 1.0])),
        positive_event_types=draw(st.sampled_from([None, ["view", "purchase"]])),
        kcore_users=draw(st.integers(0, 2)), kcore_items=draw(st.integers(0, 2)), dedupe=draw(st.booleans()))


def reference_ids(col: pd.Series) -> list[str]:
    """normalize_ids, row by row, as documented."""
    out = []
    for v in col.tolist():
        if isinstance(v, str):
            out.append(v.strip())
        elif v is None or v is pd.NA:
            out.append("")
        elif isinstance(v, (bool, np.bool_)):
            out.append(str(bool(v)))
        elif isinstance(v, (int, np.integer)):
            out.append(str(int(v)))
        elif isinstance(v, (float, np.floating)):  # a float column, or a number among text ids
            out.append("" if not math.isfinite(v) else str(int(v)) if v == int(v) and abs(v) < 2**53 else str(float(v)))
        else:
            out.append(str(v).strip())
    return out


def reference_time(v) -> float:
    """parse_timestamps of one cell (a number, an epoch or ISO-8601 text), row by row."""
    if v is None:
        return math.nan
    if isinstance(v, (int, float)):
        return float(v)
    text = str(v).strip()
    number = pd.to_numeric(pd.Series([text], dtype=object), errors="coerce").iloc[0]
    if not pd.isna(number) or text.lower() in MISSING_TOKENS:
        return float(number)
    stamp = pd.to_datetime(pd.Series([text]), format="ISO8601", utc=True, errors="coerce").iloc[0]
    return math.nan if pd.isna(stamp) else stamp.timestamp()


def reference_clean(raw: pd.DataFrame, opts: CleaningOptions, exclude: set[str]):
    """The documented cleaning rules, one row at a time: (kept rows as tuples, drops per reason, filled)."""
    n = len(raw)
    users, items = reference_ids(raw["user_id"]), reference_ids(raw["item_id"])
    times = [reference_time(v) for v in raw["timestamp"].tolist()] if "timestamp" in raw else [0.0] * n
    if "event_type" in raw:
        types = [("" if v is None else str(v)).strip().lower() or opts.default_event_type for v in raw["event_type"].tolist()]
    else:
        types = [opts.default_event_type] * n
    raw_values = raw["value"].tolist() if "value" in raw else [None] * n
    texts = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip() for v in raw_values]
    values = [opts.value_fill if t == "" else float(pd.to_numeric(pd.Series([t], dtype=object), errors="coerce").iloc[0])
              for t in texts]
    dropped: Counter = Counter()
    reason: list[str | None] = [None] * n
    for r in range(n):
        if users[r].lower() in MISSING_TOKENS:
            reason[r] = "missing_user_id"
        elif items[r].lower() in MISSING_TOKENS:
            reason[r] = "missing_item_id"
        elif not math.isfinite(times[r]):
            reason[r] = "bad_timestamp"
    distinct_times = {times[r] for r in range(n) if reason[r] is None}
    for r in range(n):
        outside = math.isfinite(times[r]) and (times[r] < MIN_TIME or times[r] > T0 + 10**8)
        if reason[r] is None and outside and len(distinct_times) > 1:
            reason[r] = "timestamp_out_of_range"
        elif outside and len(distinct_times) <= 1:
            times[r] = 0.0
        if reason[r] is None and opts.event_weights is not None and "event_type" in raw and types[r] not in opts.event_weights:
            reason[r] = "unknown_event_type"
        if reason[r] is None and texts[r] != "" and not abs(values[r]) <= opts.max_abs_value:
            reason[r] = "bad_value"
        if reason[r] is None and users[r] in exclude:
            reason[r] = "erased_user"
        if reason[r] is None and opts.min_value is not None and values[r] < opts.min_value:
            reason[r] = "below_min_value"
        if reason[r] is None and opts.positive_event_types is not None and types[r] not in opts.positive_event_types:
            reason[r] = "not_positive_event"
    keys = reference_ids(raw["event_id"]) if "event_id" in raw else [""] * n
    seen_events, seen_keys, kept = set(), set(), []
    for r in range(n):
        if reason[r] is not None:
            dropped[reason[r]] += 1
            continue
        event = (users[r], items[r], math.floor(times[r]), types[r], values[r])
        keyed = keys[r].lower() not in MISSING_TOKENS
        if keyed:  # an event with an id repeats only an earlier id
            duplicate = keys[r] in seen_keys
            seen_keys.add(keys[r])
        else:
            duplicate = opts.dedupe and event in seen_events
            seen_events.add(event)
        if duplicate:
            dropped["duplicate"] += 1
        else:
            kept.append((r, event))
    while opts.kcore_users or opts.kcore_items:
        before = len(kept)
        for pos, k in ((0, opts.kcore_users), (1, opts.kcore_items)):
            if k:
                counts = Counter(e[pos] for _, e in kept)
                kept = [(r, e) for r, e in kept if counts[e[pos]] >= k]
        dropped["kcore"] += before - len(kept)
        if len(kept) == before:
            break
    kept.sort(key=lambda re: re[1][2])  # stable: one time keeps log order
    weights = opts.event_weights or {}
    rows = [(*e, float(np.float32(weights.get(e[3], 1.0)))) for _, e in kept]
    filled = sum(1 for r, _ in kept if texts[r] == "" and "value" in raw)
    return rows, {k: v for k, v in dropped.items() if v}, filled


@SETTINGS
@given(raw_logs(), cleaning_options(), st.sampled_from([set(), {"u2", "1"}]))
def test_clean_events_follows_the_rules_row_by_row(raw, opts, exclude):
    events, report = clean_events(raw, opts, exclude_users=exclude)
    rows, dropped, filled = reference_clean(raw, opts, exclude)
    assert list(events.columns) == ["user_id", "item_id", "timestamp", "event_type", "value", "weight"]
    got = list(zip(events["user_id"], events["item_id"], events["timestamp"].tolist(), events["event_type"],
                   events["value"].tolist(), events["weight"].tolist()))
    assert got == rows
    assert report.dropped == dropped and report.rows_out == len(rows)
    assert report.filled.get("value", 0) == filled
    for name in ("user_id", "item_id", "event_type"):  # text stored as pandas stores Python strings
        assert events[name].dtype == pd.Series(np.array(events[name].tolist(), dtype=object)).dtype


@SETTINGS
@given(raw_logs(), cleaning_options())
def test_text_read_as_categoricals_cleans_as_plain_text(raw, opts):
    """A Parquet log's text columns arrive dictionary-encoded (pandas categoricals, a missing cell
    as code -1): cleaning gives the same events and counts as from the same text stored plainly."""
    text = [c for c in raw.columns if pd.api.types.infer_dtype(raw[c], skipna=True) in ("string", "empty")]
    coded = raw.astype({c: "category" for c in text})
    events, report = clean_events(raw, opts)
    coded_events, coded_report = clean_events(coded, opts)
    pd.testing.assert_frame_equal(coded_events, events)
    assert (coded_report.dropped, coded_report.rows_out, coded_report.filled) == (report.dropped, report.rows_out,
                                                                               report.filled)


@SETTINGS
@given(raw_logs())
def test_ids_normalise_per_distinct_value_as_per_row(raw):
    for name in ("user_id", "item_id"):
        col = raw[name]
        got = normalize_ids(col)
        assert got.dtype == object and got.index.equals(col.index)
        assert [type(v) for v in got] == [str] * len(col)
        assert got.tolist() == reference_ids(col)
        assert got.tolist() == list(_normalize_ids(col))  # the transform applied to the whole column


@SETTINGS
@given(raw_logs())
def test_per_distinct_equals_the_transform_of_the_whole_column(raw):
    transforms = [_normalize_ids, _stripped_text, lambda s: _stripped_text(s).str.lower().replace("", "x")]
    for name in raw.columns:
        for transform in transforms:
            coded = per_distinct(raw[name], transform)
            whole = np.asarray(transform(raw[name]), dtype=object)
            assert [(type(v), v) for v in coded.take()] == [(type(v), v) for v in whole]
            assert len(set(coded.values.tolist())) == len(coded.values)  # codes compare as the text does


@SETTINGS
@given(raw_logs())
def test_timestamps_parse_per_distinct_value_as_per_row(raw):
    if "timestamp" in raw:
        got = parse_timestamps(raw["timestamp"])
        expected = np.array([reference_time(v) for v in raw["timestamp"].tolist()], dtype=np.float64)
        assert np.array_equal(got, expected, equal_nan=True)


@SETTINGS
@given(st.lists(st.sampled_from(["1600000000", "0016", "-5", "7", "+5", " 7", "99999999999999999999", "1e3", "",
                                 "2021-03-04T05:06:07Z", "2021-03-04", "x"]), max_size=30), st.sampled_from(["s", "ms"]))
def test_text_times_as_read_from_csv_parse_as_per_row(cells, unit):
    col = pd.Series(cells, dtype=TEXT_DTYPE)  # a CSV column (arrow-backed), plain integers read by arrow
    scale = 1000.0 if unit == "ms" else 1.0
    # epoch numbers are in ``unit``, ISO-8601 dates are not
    expected = [reference_time(v) if re.match(r"\d{4}-\d{2}-\d{2}", v) else reference_time(v) / scale for v in cells]
    assert np.array_equal(parse_timestamps(col, unit), np.array(expected, dtype=np.float64), equal_nan=True)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.sampled_from([0.0, -0.0, 1.5, np.nan])), max_size=60),
       st.booleans())
def test_duplicated_rows_is_dataframe_duplicated(rows, collide):
    frame = pd.DataFrame(rows, columns=["a", "b", "c"]).astype({"a": np.int64, "b": np.int64, "c": np.float64})
    columns = {k: frame[k].to_numpy() for k in frame.columns}
    expected = frame.duplicated(keep="first").to_numpy()
    if collide:  # every row hashing alike: the exact comparison alone decides
        original = grouping._mix
        grouping._mix = lambda cols: np.zeros(len(cols[0]), dtype=np.uint64)
        try:
            assert duplicated_rows(columns).tolist() == expected.tolist()
        finally:
            grouping._mix = original
    else:
        assert duplicated_rows(columns).tolist() == expected.tolist()


def test_text_columns_are_built_like_pandas_builds_them():
    coded = Coded(np.array([2, 0, 2, 1]), np.array(["b", "a", "c é"], dtype=object))
    for rows in (np.array([0, 1, 3]), np.array([0, 2]), np.zeros(0, dtype=np.int64)):
        built = pd.Series(coded.text_column(rows))
        expected = pd.Series(coded.values[coded.codes[rows]])
        pd.testing.assert_series_equal(built, expected)
    assert pd.Series(coded.text_column()).tolist() == ["c é", "b", "c é", "a"]
    # text arrow cannot hold (a lone surrogate) is handed to pandas as Python strings, as before
    odd = Coded(np.array([0, 1]), np.array(["x", "c\udcff"], dtype=object))
    assert odd.text_column().tolist() == ["x", "c\udcff"]


@st.composite
def attribute_tables(draw):
    n = draw(st.integers(1, 25))
    cells = ["a", "b|c", " c | a ", "", "|", None, "d", 1, True]
    return pd.DataFrame({"user_id": [f"u{k}" for k in range(n)],
                         "tags": [draw(st.sampled_from(cells)) for _ in range(n)],
                         "tier": pd.Series([draw(st.sampled_from(["gold", "silver", None])) for _ in range(n)], dtype=TEXT_DTYPE)})


@SETTINGS
@given(attribute_tables(), st.integers(0, 3))
def test_feature_tokens_match_per_row_splitting(table, unknown):
    vocab = IdVocab([f"u{k}" for k in range(unknown, len(table) + 2)], "user")  # some rows unknown, some ids without a row
    built = FeatureTable.build(table, "user_id", vocab, {"tags": "categorical", "tier": "categorical"})
    per_row: dict[int, set[str]] = {}
    for _, rec in table.iterrows():
        row = vocab.index_of([rec["user_id"]])[0]
        if row < 0:
            continue
        for col in ("tags", "tier"):
            if not pd.isna(rec[col]):
                per_row.setdefault(row, set()).update(f"{col}={p.strip()}" for p in str(rec[col]).split("|") if p.strip())
    vocabulary = sorted(set().union(*per_row.values())) if per_row else []
    assert built.token_vocab == vocabulary
    width = max([1, *map(len, per_row.values())])
    expected = np.zeros((len(vocab) + 1, width), dtype=np.int64)
    for row, tokens in per_row.items():
        ids = sorted(vocabulary.index(t) + 1 for t in tokens)
        expected[row, :len(ids)] = ids
    assert built.tokens.tolist() == expected.tolist()
    cells = per_distinct_cells(table["tags"])
    assert [None if pd.isna(v) else v for v in table["tags"]] == list(cells.take())


@SETTINGS
@given(raw_logs(), cleaning_options())
def test_indexed_ids_are_the_vocabulary_indices(raw, opts):
    from dmp_dl.core.errors import DataError
    from dmp_dl.data.cleaning import clean_log
    from dmp_dl.data.schema import EventLog

    try:
        plain, _ = clean_log(EventLog(raw.copy()), opts)
        indexed, _ = clean_log(EventLog(raw.copy()), opts, index_ids=True)
    except DataError:  # nothing left to index
        return
    ev = indexed.events
    text = {c: plain.events[c].dtype for c in ("user_id", "item_id", "event_type")}
    pd.testing.assert_frame_equal(ev.drop(columns=["user_idx", "item_idx"]).astype(text), plain.events)
    for column, index in (("user_id", "user_idx"), ("item_id", "item_idx")):
        expected = IdVocab.from_values(ev[column])
        assert ev[index].dtype == np.int32  # half the memory of int64 per event
        # held as a categorical of the vocabulary: its codes are the indices
        assert list(ev[column].cat.categories) == list(expected.ids)
        assert ev[column].cat.codes.tolist() == ev[index].tolist()
        assert ev[index].tolist() == expected.index_of(ev[column]).tolist()
        assert IdVocab.from_indexed(ev[column], ev[index].to_numpy()) == expected


def test_from_indexed_refuses_indices_that_are_not_a_vocabulary():
    ids = pd.Series(["b", "a", "b", "c"], dtype=TEXT_DTYPE)
    assert list(IdVocab.from_indexed(ids, np.array([1, 0, 1, 2])).ids) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="string order"):
        IdVocab.from_indexed(ids, np.array([0, 1, 0, 2]))
    with pytest.raises(ValueError, match="skip"):
        IdVocab.from_indexed(ids, np.array([1, 0, 1, 3]))
