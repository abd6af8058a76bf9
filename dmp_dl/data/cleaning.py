"""Cleaning raw event logs into canonical events, with a data-quality report.

Every row that is dropped is counted under exactly one reason (the first check it fails, in the
order of :data:`DROP_REASONS`), so ``rows_in - rows_out == sum(dropped.values())`` always holds.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dmp_dl.core.arrays import BLOCK, flatnonzero_blocks, index_dtype
from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.core.io import atomic_write_text
from dmp_dl.data.distinct import TEXT_DTYPE, Coded, per_distinct
from dmp_dl.data.grouping import duplicated_rows, stable_order
from dmp_dl.data.schema import (
    EVENT_ID,
    ITEM,
    MAX_ABS_VALUE,
    TIME,
    TYPE,
    USER,
    VALUE,
    WEIGHT,
    EventLog,
    canonical_id,
    coded_ids,
    normalize_ids,
)

log = logging.getLogger(__name__)

DROP_REASONS = (
    "malformed_row",  # wrong number of fields (CSV)
    "missing_user_id",
    "missing_item_id",
    "bad_timestamp",  # missing or unparseable
    "timestamp_out_of_range",
    "unknown_event_type",  # not a key of event_weights
    "bad_value",  # value present but not a finite number, or beyond max_abs_value
    "erased_user",  # on the erasure list
    "below_min_value",  # positive rule: value < min_value
    "not_positive_event",  # positive rule: event type not in positive_event_types
    "duplicate",  # exact duplicate of an earlier event, or an earlier event's event_id again
    "kcore",  # k-core filter
)
# the columns clean_log(index_ids=True) adds: each event's user and item index
INDEX_COLUMNS = {USER: "user_idx", ITEM: "item_idx"}
MISSING_TOKENS = frozenset({"", "nan", "none", "null", "na", "n/a", "<na>"})
ISO_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"  # how an ISO-8601 time starts: never a number
PLAIN_INTEGER = r"^-?[0-9]{1,18}$"  # an integer within int64: arrow reads it exactly as pd.to_numeric does


@dataclass
class CleaningOptions:
    """How raw events become clean events (``data.cleaning`` in the config).

    event_weights: event type -> loss weight. Types not listed are dropped (``unknown_event_type``);
        ``None`` accepts every type with weight 1.
    default_event_type: the type given to every event when the log has no ``event_type`` column.
    min_timestamp / max_timestamp: sane range (epoch seconds or ISO-8601); ``max_timestamp=None``
        means one day after now.
    timestamp_unit: unit of numeric timestamps, ``s`` or ``ms``.
    value_fill: value given to events whose ``value`` is missing (empty cell, null).
    max_abs_value: a ``value`` (or numeric attribute) beyond ± this is an error in the data: the
        event is dropped as ``bad_value`` (the attribute cell counted and left empty).
    min_value: positive rule, keep events with ``value >= min_value`` (e.g. ratings >= 4).
    positive_event_types: positive rule, keep only these event types.
    kcore_users / kcore_items: iteratively drop users / items with fewer events.
    dedupe: drop exact duplicate events among those without an ``event_id``. When the log has that
        column (e.g. the real-time journal), an event with an id is a duplicate only when an earlier
        event has the same id, whatever the contents and this setting: two ids are two events.
    """

    event_weights: dict[str, float] | None = None
    default_event_type: str = "interaction"
    min_timestamp: str | int | float = "1990-01-01"
    max_timestamp: str | int | float | None = None
    timestamp_unit: str = "s"
    value_fill: float = 0.0
    max_abs_value: float = MAX_ABS_VALUE
    min_value: float | None = None
    positive_event_types: list[str] | None = None
    kcore_users: int = 0
    kcore_items: int = 0
    dedupe: bool = True

    def __post_init__(self) -> None:
        if self.event_weights is not None:
            if not isinstance(self.event_weights, Mapping):
                raise ConfigError(f"data.cleaning.event_weights must map event type -> weight, got {self.event_weights!r}")
            weights = {str(k).strip().lower(): _number(v, f"event_weights.{k}") for k, v in self.event_weights.items()}
            bad = {k: v for k, v in weights.items() if v < 0}
            if bad:
                raise ConfigError(f"data.cleaning.event_weights must be finite and >= 0, got {bad}")
            self.event_weights = weights
        for bound in (self.min_timestamp, self.max_timestamp):  # refused before any data is read
            if bound is not None:
                _to_epoch_seconds(bound)
        if self.timestamp_unit not in ("s", "ms"):
            raise ConfigError(f"data.cleaning.timestamp_unit must be 's' or 'ms', got {self.timestamp_unit!r}")
        self.value_fill = _number(self.value_fill, "value_fill")
        self.max_abs_value = _number(self.max_abs_value, "max_abs_value")
        if self.max_abs_value <= 0:
            raise ConfigError(f"data.cleaning.max_abs_value must be > 0, got {self.max_abs_value}")
        if self.min_value is not None:
            self.min_value = _number(self.min_value, "min_value")
        for key in ("kcore_users", "kcore_items"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ConfigError(f"data.cleaning.{key} must be an integer >= 0, got {value!r}")
        if self.positive_event_types is not None:
            types = self.positive_event_types
            types = [types] if isinstance(types, str) else types  # one type given as a plain string
            self.positive_event_types = [str(t).strip().lower() for t in types]

    def time_bounds(self) -> tuple[float, float]:
        """(lowest, highest) event time kept, epoch seconds: ``min_timestamp`` and ``max_timestamp``
        (None: one day after now)."""
        lo = _to_epoch_seconds(self.min_timestamp)
        hi = _to_epoch_seconds(self.max_timestamp) if self.max_timestamp is not None else time.time() + 86400.0
        return lo, hi


@dataclass
class TableReport:
    """Row accounting for one table: ``rows_in - rows_out == sum(dropped.values())``."""

    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    filled: dict[str, int] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)
    bad_values: dict[str, int] = field(default_factory=dict)  # attribute cells emptied: not finite or beyond max_abs_value
    unmatched_ids: int = 0  # attribute rows whose id is no id of the cleaned events (their attributes are unused)
    # rows in/out of each input file when a table was read from several (e.g. a log plus a journal)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)

    def drop(self, reason: str, n: int) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(n)

    def check(self, what: str) -> None:
        lost = self.rows_in - self.rows_out - sum(self.dropped.values())
        if lost != 0:  # a bug, not a user error: every drop must be counted
            raise AssertionError(f"{what}: {lost} rows unaccounted for in {self}")


@dataclass
class QualityReport:
    """What cleaning (and later splitting) did to the data; written as ``data_quality.json``."""

    source: str
    events: TableReport
    users_table: TableReport | None = None
    items_table: TableReport | None = None
    n_users: int = 0
    n_items: int = 0
    events_per_type: dict[str, int] = field(default_factory=dict)
    has_timestamps: bool = True
    timestamps_note: str | None = None  # why the log counts as having no event times
    time_range: dict[str, str | None] = field(default_factory=dict)
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str))

    def summary(self) -> str:
        e = self.events
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(e.dropped.items())) or "none"
        return (
            f"{self.source}: {e.rows_in} events in, {e.rows_out} kept "
            f"({self.n_users} users, {self.n_items} items); dropped: {dropped}"
        )


def _number(value: object, key: str) -> float:
    """``value`` as a float, or :class:`ConfigError` naming ``data.cleaning.<key>``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"data.cleaning.{key} must be a number, got {value!r}") from None
    if not np.isfinite(number):
        raise ConfigError(f"data.cleaning.{key} must be a finite number, got {value!r}")
    return number


def _to_epoch_seconds(value: str | int | float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot parse timestamp bound {value!r} (data.cleaning.min/max_timestamp): {exc}") from None
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return stamp.timestamp()


def parse_timestamps(col: pd.Series, unit: str = "s") -> np.ndarray:
    """Epoch seconds (float64) from epoch numbers, ISO-8601 strings or datetimes; NaN if unparseable.

    A column may mix numeric epochs and ISO-8601 strings. Naive datetimes are taken as UTC.
    """
    scale = 1000.0 if unit == "ms" else 1.0
    if pd.api.types.is_datetime64_any_dtype(col.dtype):
        return _epoch_seconds(pd.to_datetime(col, utc=True))
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        return col.to_numpy(dtype=np.float64, na_value=np.nan) / scale
    integers = _plain_integers(col)
    if integers is not None:  # epoch numbers as text (a CSV): parsed by arrow, no per-value Python
        return integers / scale
    text = per_distinct(col, _stripped_text, merge=False)  # times repeat: each distinct one is parsed once
    names = pd.Series(text.values)  # stored as pandas stores strings, as _stripped_text returns them
    out = np.full(len(names), np.nan)
    maybe_number = ~names.str.match(ISO_DATE).to_numpy(dtype=bool)  # "2021-03-04...": never a number
    out[maybe_number] = pd.to_numeric(names[maybe_number], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan) / scale
    rest = np.isnan(out) & (names.str.lower().isin(MISSING_TOKENS) == False).to_numpy()  # noqa: E712
    if rest.any():
        out[rest] = _epoch_seconds(pd.to_datetime(names[rest], format="ISO8601", utc=True, errors="coerce"))
    return out[text.codes]


def _plain_integers(col: pd.Series) -> np.ndarray | None:
    """(n,) float64 of an arrow-backed text column whose every cell is a plain decimal integer
    (``-?[0-9]+``, no spaces), else None."""
    if not (isinstance(col.dtype, pd.StringDtype) and col.dtype.storage == "pyarrow") or len(col) == 0:
        return None
    arrow = pa.array(col.array)
    if arrow.null_count or not pc.all(pc.match_substring_regex(arrow, PLAIN_INTEGER)).as_py():
        return None
    return pc.cast(arrow, pa.int64()).to_numpy().astype(np.float64)


def _stripped_text(col: pd.Series) -> pd.Series:
    """Each value as a stripped string; missing values (None, NaN) as ``""``."""
    return col.astype(object).where(col.notna(), "").map(str).str.strip()


def _epoch_seconds(stamps: pd.Series) -> np.ndarray:
    """Epoch seconds (float64, NaN for NaT) of UTC datetimes, computed in their own unit: with a
    nanosecond Timestamp(0) the subtraction overflows for dates past 2262 (9999-12-31, date32 columns)."""
    naive = stamps.dt.tz_localize(None)
    unit = naive.dt.unit
    return (naive.to_numpy(dtype=f"datetime64[{unit}]") - np.datetime64(0, unit)) / np.timedelta64(1, "s")


def _parse_values(col: pd.Series, max_abs: float = MAX_ABS_VALUE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values float64, missing mask, bad mask). Missing: empty/null. Bad: present but not finite,
    or beyond ``max_abs`` in magnitude."""
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        vals = col.to_numpy(dtype=np.float64, na_value=np.nan)
        missing = np.isnan(vals)
    else:
        text = per_distinct(col, _stripped_text)
        names = pd.Series(text.values)
        missing = (names == "").to_numpy()[text.codes]
        vals = pd.to_numeric(names, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)[text.codes]
    with np.errstate(invalid="ignore"):
        bad = ~missing & ~(np.abs(vals) <= max_abs)  # NaN and inf compare False
    return vals, missing, bad


def _missing_id(ids: pd.Series | np.ndarray) -> np.ndarray:
    """(n,) bool: which of the normalised ids ``ids`` stand for no id (empty, ``nan``, ``null`` ...)."""
    return pd.Series(ids, dtype=object).str.lower().isin(MISSING_TOKENS).to_numpy()


def clean_events(
    raw: pd.DataFrame,
    opts: CleaningOptions,
    *,
    malformed_rows: int = 0,
    exclude_users: Collection[str] = (),
    sources: Sequence[tuple[str, int, int]] = (),
    carry: Sequence[str] = (),
    constant_time_is_no_time: bool = True,
) -> tuple[pd.DataFrame, TableReport]:
    """Canonical events from a raw event table.

    Parameters
    ----------
    raw: columns ``user_id``, ``item_id`` and optionally ``timestamp``, ``event_type``, ``value``;
        any dtypes (strings from CSV, native from Parquet or generators). Other columns are ignored
        and listed in the report. Without a ``timestamp`` column every event gets time 0; when
        every parseable timestamp has the same value, that value is kept and the range check is
        not applied (a constant carries no time, and is often a placeholder such as 0): see
        :func:`describe_times`.
    opts: the cleaning options.
    malformed_rows: rows the reader skipped (counted as ``malformed_row``).
    exclude_users: user ids to drop (``erased_user``), e.g. the erasure list.
    sources: when ``raw`` is several files one after the other: (name, rows in ``raw``, malformed
        rows) of each, in order; the report then counts rows in and out per file (``sources``).
    carry: columns of ``raw`` passed through unchanged to the kept events (e.g. a request's row
        numbers), never compared for duplicates.
    constant_time_is_no_time: read one timestamp shared by every event as "no times" (a whole
        log); False for a batch of events that may well share one moment (the range check applies).

    Returns
    -------
    events: DataFrame with ``user_id`` (str), ``item_id`` (str), ``timestamp`` (int64 s),
        ``event_type`` (str), ``value`` (float64), ``weight`` (float32), sorted by timestamp.
    report: the row accounting.
    """
    cleaned = _clean_events(raw, opts, malformed_rows=malformed_rows, exclude_users=exclude_users, sources=sources,
                            carry=carry, constant_time_is_no_time=constant_time_is_no_time)
    return cleaned.events, cleaned.report


@dataclass
class _CleanEvents:
    """:func:`clean_events`' result with what the quality report counts, taken from the codes."""

    events: pd.DataFrame
    report: TableReport
    n_users: int
    n_items: int
    events_per_type: dict[str, int]


def _clean_events(raw: pd.DataFrame, opts: CleaningOptions, *, malformed_rows: int, exclude_users: Collection[str],
                  sources: Sequence[tuple], carry: Sequence[str],
                  constant_time_is_no_time: bool, index_ids: bool = False,
                  unread_rows: Mapping[str, int] | None = None, release_raw: bool = False) -> _CleanEvents:
    """:func:`clean_events`; ``index_ids``: see :func:`clean_log`; ``unread_rows``: rows the reader
    left out by the reason cleaning would drop them for (reason -> rows), counted in and dropped;
    ``release_raw``: drop each column of ``raw`` once it is read (the caller hands ``raw`` over)."""
    unread = {reason: int(n) for reason, n in (unread_rows or {}).items() if n}
    rep = TableReport(rows_in=len(raw) + malformed_rows + sum(unread.values()))
    rep.drop("malformed_row", malformed_rows)
    for reason, n in unread.items():
        rep.drop(reason, n)
    rep.ignored_columns = [c for c in raw.columns if c not in (USER, ITEM, TIME, TYPE, VALUE, EVENT_ID, *carry)]
    n = len(raw)
    keep = np.ones(n, dtype=bool)

    def done_with(*columns: str) -> None:
        if release_raw:  # its memory back before the next column's arrays are made
            raw.drop(columns=[c for c in columns if c in raw.columns], inplace=True)

    def drop(mask: np.ndarray, reason: str) -> None:
        hit = keep & mask
        rep.drop(reason, int(np.count_nonzero(hit)))
        keep[hit] = False

    # Text columns as codes into their distinct values: every check below on a text column runs
    # once per distinct value and reaches the rows through the codes.
    users, items = coded_ids(raw[USER]), coded_ids(raw[ITEM])
    done_with(USER, ITEM)
    drop(_missing_id(users.values)[users.codes], "missing_user_id")
    drop(_missing_id(items.values)[items.codes], "missing_item_id")

    if TIME in raw.columns:
        ts = parse_timestamps(raw[TIME], opts.timestamp_unit)
        done_with(TIME)
        drop(~np.isfinite(ts), "bad_timestamp")
        lo, hi = opts.time_bounds()
        with np.errstate(invalid="ignore"):
            outside = (ts < lo) | (ts > hi)
        kept_ts = ts[keep]
        if not constant_time_is_no_time or (len(kept_ts) and kept_ts.min() != kept_ts.max()):
            drop(outside, "timestamp_out_of_range")
        else:  # one value for every event: no time at all, kept (as 0 when it is no sane time)
            ts = np.where(outside, 0.0, ts)
    else:
        ts = np.zeros(n, dtype=np.float64)

    has_type = TYPE in raw.columns
    if has_type:
        default_type = opts.default_event_type
        types = per_distinct(raw[TYPE], lambda col: _stripped_text(col).str.lower().replace("", default_type))
        done_with(TYPE)
    else:
        types = Coded(np.zeros(n, dtype=np.int64), np.array([opts.default_event_type], dtype=object))
    type_names = pd.Series(types.values, dtype=object)
    unknown_types: dict[str, int] = {}
    if opts.event_weights is not None and has_type:
        unknown = ~type_names.isin(list(opts.event_weights)).to_numpy()[types.codes]
        counts = pd.Series(types.codes[unknown & keep]).value_counts()
        unknown_types = {str(types.values[code]): int(c) for code, c in counts.items()}
        drop(unknown, "unknown_event_type")

    if VALUE in raw.columns:
        values, missing, bad = _parse_values(raw[VALUE], opts.max_abs_value)
        done_with(VALUE)
        drop(bad, "bad_value")
        values = np.where(missing, opts.value_fill, values)
    else:
        missing = np.zeros(n, dtype=bool)
        values = np.full(n, opts.value_fill, dtype=np.float64)

    if exclude_users:
        drop(pd.Series(users.values, dtype=object).isin(set(exclude_users)).to_numpy()[users.codes], "erased_user")
    if opts.min_value is not None:
        drop(values < float(opts.min_value), "below_min_value")
    if opts.positive_event_types is not None:
        drop(~type_names.isin(opts.positive_event_types).to_numpy()[types.codes], "not_positive_event")

    rows = flatnonzero_blocks(keep, index_dtype(n))  # raw row of each event still kept
    keep = None  # freed: no drop() past this point
    times = np.floor(ts[rows]).astype(np.int64)
    values = values[rows].astype(np.float64)
    filled = missing[rows]
    del ts, missing
    # from here on every array is of the kept events, the ids' codes too (those of every raw row are freed)
    users, items, types = (_kept_codes(coded, rows) for coded in (users, items, types))

    def take(selected: np.ndarray) -> None:
        nonlocal rows, times, values, filled, users, items, types
        # one column at a time: each old array is freed before the next one is gathered
        rows = rows[selected]
        times = times[selected]
        values = values[selected]
        filled = filled[selected]
        users = Coded(users.codes[selected], users.values)
        items = Coded(items.codes[selected], items.values)
        types = Coded(types.codes[selected], types.values)

    dup = np.zeros(len(rows), dtype=bool)
    keyed = np.zeros(len(rows), dtype=bool)
    if EVENT_ID in raw.columns and len(rows):  # one event delivered twice (a retried real-time batch)
        keys = coded_ids(raw[EVENT_ID])
        key_codes = keys.codes[rows]
        keyed = ~_missing_id(keys.values)[key_codes]
        dup = keyed & pd.Series(np.where(keyed, key_codes, -1)).duplicated(keep="first").to_numpy()
    if opts.dedupe and len(rows) and not keyed.all():
        # contents are compared among the events without an event_id only: two ids are two events
        # codes compare as the normalised strings do
        contents = {USER: users.codes, ITEM: items.codes, TIME: times, TYPE: types.codes, VALUE: values}
        if keyed.any():
            plain = np.flatnonzero(~keyed)
            dup[plain] = duplicated_rows({k: v[plain] for k, v in contents.items()})
        else:  # no event ids: every event compared, without copies of the columns
            dup = duplicated_rows(contents)
        del contents
    if dup.any():
        rep.drop("duplicate", int(np.count_nonzero(dup)))
        take(~dup)
    del dup, keyed
    if opts.kcore_users > 0 or opts.kcore_items > 0:
        take(_kcore(users.codes, items.codes, opts.kcore_users, opts.kcore_items, rep))
    if sources:
        rep.sources = _per_source(sources, rows, n)
    n_filled = int(np.count_nonzero(filled))
    if n_filled:
        rep.filled[VALUE] = n_filled
    take(stable_order(times))  # by time, events of one time in log order
    if opts.event_weights is not None:
        type_weights = np.array([opts.event_weights.get(t, 1.0) for t in types.values], dtype=np.float32)
    else:
        type_weights = np.ones(len(types.values), dtype=np.float32)
    if index_ids:  # ids as categories of the vocabularies: codes per event, each id's text stored once
        user_idx, user_col = _sorted_categorical(users)
        item_idx, item_col = _sorted_categorical(items)
        type_col = _sorted_categorical(types)[1]
    else:
        user_col, item_col, type_col = users.text_column(), items.text_column(), types.text_column()
    events = pd.DataFrame(
        {
            USER: user_col,
            ITEM: item_col,
            TIME: times,
            TYPE: type_col,
            VALUE: values,
            **{c: raw[c].to_numpy()[rows] for c in carry},
            WEIGHT: type_weights[types.codes],
            **({INDEX_COLUMNS[USER]: user_idx, INDEX_COLUMNS[ITEM]: item_idx} if index_ids else {}),
        },
        copy=False,  # the columns are this function's own arrays
    )
    del rows, times, values
    rep.rows_out = len(events)
    rep.check("events")
    _warn_unknown_types(unknown_types)
    per_type = np.bincount(types.codes, minlength=len(types.values))
    return _CleanEvents(events, rep, _n_distinct(users.codes, len(users.values)),
                        _n_distinct(items.codes, len(items.values)),
                        {str(types.values[c]): int(per_type[c]) for c in sorted(np.flatnonzero(per_type),
                                                                                 key=lambda c: types.values[c])})


def _n_distinct(codes: np.ndarray, n_codes: int) -> int:
    return int(np.count_nonzero(np.bincount(codes, minlength=n_codes)))


def _kept_codes(ids: Coded, rows: np.ndarray) -> Coded:
    """``ids`` of ``rows`` only, its codes in the smallest integer type that holds them."""
    return Coded(ids.codes[rows].astype(_code_dtype(len(ids.values)), copy=False), ids.values)


def _sorted_categorical(ids: Coded) -> tuple[np.ndarray, pd.Categorical]:
    """A column of ids as (index, column): index (n,) int32 (int64 from 2**31 ids), each row's id
    among the distinct ids in the column in string order (the index :class:`~dmp_dl.data.vocab.IdVocab` gives it);
    column, a categorical of those ids with that index as its codes (each id's text held once)."""
    codes = ids.codes
    used = np.flatnonzero(np.bincount(codes, minlength=len(ids.values)))
    order = used[np.argsort(ids.values[used], kind="stable")]
    rank = np.zeros(len(ids.values), dtype=index_dtype(len(used)))
    rank[order] = np.arange(len(used))
    index = rank[codes]
    categories = pd.Index(ids.values[order], dtype=TEXT_DTYPE)
    # codes valid by construction; with as many ids as int32 codes take, the column and the index share one array
    codes = index.astype(_code_dtype(len(order)), copy=False)
    return index, pd.Categorical.from_codes(codes, dtype=pd.CategoricalDtype(categories), validate=False)


def _code_dtype(n_categories: int) -> type:
    """The integer type pandas keeps a categorical's codes in for ``n_categories`` (the smallest)."""
    return np.int8 if n_categories < 127 else np.int16 if n_categories < 32767 else np.int32


def _warn_unknown_types(unknown_types: Mapping[str, int]) -> None:
    if unknown_types:
        listed = ", ".join(f"{t!r} ({c})" for t, c in list(unknown_types.items())[:5])
        log.warning("%d events of type(s) %s%s were dropped as unknown_event_type: they are not keys of "
                    "data.cleaning.event_weights; to keep them, give each a weight, e.g. data.cleaning.event_weights.%s=1.0",
                    sum(unknown_types.values()), listed, " ..." if len(unknown_types) > 5 else "",
                    next(iter(unknown_types)))


def plain_id(value: object) -> str:
    """:func:`~dmp_dl.data.schema.normalize_ids` of one value: :func:`~dmp_dl.data.schema.canonical_id`."""
    return canonical_id(value)


def clean_few_events(users: Sequence, items: Sequence, times: Sequence, types: Sequence, values: Sequence,
                     event_ids: Sequence, opts: CleaningOptions,
                     exclude_users: Collection[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, int]] | None:
    """:func:`clean_events` of a few events given as plain Python values, without pandas (whose fixed
    cost per call dominates a one-event batch), for callers that would pass them as object columns
    with ``constant_time_is_no_time=False`` (:mod:`dmp_dl.realtime.intake`).

    Each argument is a list of one field of every event (None: absent). Returns None, to be cleaned
    by :func:`clean_events` instead, when a time or value is text (ISO dates, numbers as text) or a
    k-core rule is set. Else: the kept events' columns (``user_id``, ``item_id``, ``timestamp``
    int64, ``event_type``, ``value``, ``weight`` float32, ``_row``: each one's position in the
    input), ordered by time as :func:`clean_events` orders them, and the drops per reason. The
    same rules in the same order; tests check that both give the same result.
    """
    if opts.kcore_users > 0 or opts.kcore_items > 0:
        return None
    numeric = (int, float)
    for column in (times, values):
        for v in column:
            if v is not None and (isinstance(v, bool) or not isinstance(v, numeric)):
                return None
    dropped: dict[str, int] = {}
    unknown_types: dict[str, int] = {}
    scale = 1000.0 if opts.timestamp_unit == "ms" else 1.0
    lo, hi = opts.time_bounds()
    weights = opts.event_weights
    positive = set(opts.positive_event_types) if opts.positive_event_types is not None else None
    excluded = set(exclude_users) if exclude_users else ()
    max_abs = opts.max_abs_value
    kept: list[tuple] = []
    for row, (u, i, t, ty, v) in enumerate(zip(users, items, times, types, values)):
        user, item = plain_id(u), plain_id(i)
        reason = None
        if user.lower() in MISSING_TOKENS:
            reason = "missing_user_id"
        elif item.lower() in MISSING_TOKENS:
            reason = "missing_item_id"
        ts = float("nan") if t is None else float(t) / scale
        if reason is None and not math.isfinite(ts):
            reason = "bad_timestamp"
        elif reason is None and (ts < lo or ts > hi):
            reason = "timestamp_out_of_range"
        kind = "" if ty is None or (isinstance(ty, float) and ty != ty) else str(ty).strip().lower()
        kind = kind or opts.default_event_type
        if reason is None and weights is not None and kind not in weights:
            reason = "unknown_event_type"
            unknown_types[kind] = unknown_types.get(kind, 0) + 1
        missing = v is None or (isinstance(v, float) and v != v)
        value = opts.value_fill if missing else float(v)
        if reason is None and not missing and not abs(value) <= max_abs:
            reason = "bad_value"
        if reason is None and excluded and user in excluded:
            reason = "erased_user"
        if reason is None and opts.min_value is not None and value < float(opts.min_value):
            reason = "below_min_value"
        if reason is None and positive is not None and kind not in positive:
            reason = "not_positive_event"
        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        kept.append((user, item, math.floor(ts), kind, value, row))
    canonical, keys = set(), set()
    out = []
    for event in kept:
        row = event[5]
        key = plain_id(event_ids[row])
        if key.lower() not in MISSING_TOKENS:  # one event delivered twice (a retried real-time batch)
            duplicate = key in keys
            keys.add(key)
        else:  # contents are compared among the events without an event_id only
            duplicate = opts.dedupe and event[:5] in canonical
            canonical.add(event[:5])
        if duplicate:
            dropped["duplicate"] = dropped.get("duplicate", 0) + 1
        else:
            out.append(event)
    out.sort(key=lambda e: e[2])  # stable: events of one time keep their order
    kinds = [e[3] for e in out]
    columns = {
        USER: np.array([e[0] for e in out], dtype=object),
        ITEM: np.array([e[1] for e in out], dtype=object),
        TIME: np.array([e[2] for e in out], dtype=np.int64),
        TYPE: np.array(kinds, dtype=object),
        VALUE: np.array([e[4] for e in out], dtype=np.float64),
        WEIGHT: np.array([weights.get(k, 1.0) for k in kinds] if weights is not None else np.ones(len(out)), dtype=np.float32),
        "_row": np.array([e[5] for e in out], dtype=np.int64),
    }
    _warn_unknown_types(unknown_types)
    return columns, dropped


def _per_source(sources: Sequence[tuple], kept_rows: np.ndarray, n_raw: int) -> dict[str, dict[str, int]]:
    """Rows in and out of each file of a table read from several files one after the other: each
    source is (name, rows in the table, malformed rows[, rows left unread])."""
    counts = np.array([int(source[1]) for source in sources], dtype=np.int64)
    if counts.sum() != n_raw:
        raise AssertionError(f"sources cover {counts.sum()} rows of a table of {n_raw}")
    ends = np.cumsum(counts)
    out_per = np.zeros(len(counts), dtype=np.int64)
    for lo in range(0, len(kept_rows), BLOCK):  # the file of each kept row, a block of rows at a time
        out_per += np.bincount(np.searchsorted(ends, kept_rows[lo:lo + BLOCK], side="right"), minlength=len(counts))
    out: dict[str, dict[str, int]] = {}
    for (name, n, malformed, *unread), kept in zip(sources, out_per.tolist()):
        entry = out.setdefault(str(name), {"rows_in": 0, "rows_out": 0})
        entry["rows_in"] += int(n) + int(malformed) + sum(int(u) for u in unread)
        entry["rows_out"] += int(kept)
    return out


def _kcore(users: np.ndarray, items: np.ndarray, k_users: int, k_items: int, rep: TableReport) -> np.ndarray:
    """(n,) bool: the events left when users with fewer than ``k_users`` events and items with
    fewer than ``k_items`` are dropped in turn until none is (users, items: (n,) codes)."""
    keep = np.arange(len(users))
    while True:
        before = len(keep)
        if k_users > 0:
            counts = np.bincount(users[keep])
            keep = keep[counts[users[keep]] >= k_users]
        if k_items > 0:
            counts = np.bincount(items[keep])
            keep = keep[counts[items[keep]] >= k_items]
        rep.drop("kcore", before - len(keep))
        if len(keep) == before:
            out = np.zeros(len(users), dtype=bool)
            out[keep] = True
            return out


def clean_attributes(
    raw: pd.DataFrame, id_col: str, *, malformed_rows: int = 0, exclude_ids: Collection[str] = (),
    max_abs_value: float = MAX_ABS_VALUE,
) -> tuple[pd.DataFrame, TableReport, dict[str, str]]:
    """Clean a user or item attribute table.

    Ids are normalised; rows with a missing id (``missing_id``) or an id listed in ``exclude_ids``
    (``erased_user``) are dropped; for a repeated id the last row wins (``duplicate_id``). A column
    whose non-empty values all parse as numbers becomes float64 (empty -> NaN; a value that is not
    finite or beyond ± ``max_abs_value`` -> NaN, counted in ``bad_values``); any other column stays
    categorical (str, empty -> None).

    Returns
    -------
    (table with ``id_col`` first, row accounting, {column: "numeric" | "categorical"})
    """
    rep = TableReport(rows_in=len(raw) + malformed_rows)
    rep.drop("malformed_row", malformed_rows)
    frame = raw.copy()
    frame[id_col] = normalize_ids(frame[id_col])
    missing = _missing_id(frame[id_col])
    rep.drop("missing_id", int(missing.sum()))
    frame = frame.loc[~missing]
    if exclude_ids:
        erased = frame[id_col].isin(set(exclude_ids)).to_numpy()
        rep.drop("erased_user", int(erased.sum()))
        frame = frame.loc[~erased]
    dup = frame.duplicated(subset=[id_col], keep="last").to_numpy()
    rep.drop("duplicate_id", int(dup.sum()))
    frame = frame.loc[~dup].reset_index(drop=True)
    kinds: dict[str, str] = {}
    for col in frame.columns:
        if col == id_col:
            continue
        series = frame[col]
        if pd.api.types.is_bool_dtype(series.dtype):
            codes, flags = pd.factorize(series, use_na_sentinel=False)
            words = pd.Series(flags, dtype=series.dtype).astype(object).map(lambda v: None if pd.isna(v) else str(v).lower())
            frame[col] = words.take(codes).set_axis(frame.index)
            kinds[col] = "categorical"
            continue
        if pd.api.types.is_numeric_dtype(series.dtype):
            frame[col] = _bounded(series.to_numpy(dtype=np.float64, na_value=np.nan), series.notna().to_numpy(),
                                  max_abs_value, rep, col)
            kinds[col] = "numeric"
            continue
        text = per_distinct(series, _stripped_text)  # one row per id, but few distinct values
        names = pd.Series(text.values)
        empty = names.str.lower().isin(MISSING_TOKENS).to_numpy()
        numbers = pd.to_numeric(names.where(~empty), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        if (~empty).any() and not np.isnan(numbers[~empty]).any():
            frame[col] = _bounded(numbers[text.codes], ~empty[text.codes], max_abs_value, rep, col)
            kinds[col] = "numeric"
        else:
            cells = text.values.copy()
            cells[empty] = np.nan
            frame[col] = pd.Series(cells[text.codes], index=frame.index, dtype=object)
            kinds[col] = "categorical"
    rep.rows_out = len(frame)
    rep.check(f"{id_col} table")
    return frame, rep, kinds


def describe_times(has_time_column: bool, events: pd.DataFrame) -> str | None:
    """Why a log counts as having no event times (None when it has them): no ``timestamp`` column
    in the raw log, or fewer than two distinct times among the clean ``events``."""
    if not has_time_column:
        return "the log has no timestamp column"
    times = events[TIME].to_numpy()
    if len(times) == 0 or times.min() == times.max():
        when = pd.Timestamp(int(times[0]), unit="s", tz="UTC").isoformat() if len(times) else "none"
        return f"every event has the same timestamp ({when})"
    return None


def _bounded(vals: np.ndarray, present: np.ndarray, max_abs: float, rep: TableReport, col: str) -> np.ndarray:
    """``vals`` with non-finite and out-of-range entries as NaN; the present ones emptied are counted."""
    with np.errstate(invalid="ignore"):
        ok = np.abs(vals) <= max_abs
    n_bad = int((present & ~ok).sum())
    if n_bad:
        rep.bad_values[str(col)] = n_bad
    return np.where(ok, vals, np.nan)


def clean_log(
    raw: EventLog, opts: CleaningOptions, *, exclude_users: Collection[str] = (), index_ids: bool = False,
    consume: bool = False,
) -> tuple[EventLog, QualityReport]:
    """Clean all tables of a raw :class:`EventLog` and describe the result.

    index_ids: also give each clean event the index of its user and of its item among the distinct
        ids of the clean events in string order (columns ``user_idx``, ``item_idx``, int32): the
        indices of the vocabularies of those ids (:meth:`dmp_dl.data.vocab.IdVocab.from_indexed`),
        found while the ids are still integer codes.
    consume: the caller hands ``raw.events`` over: each of its columns is dropped once read, so
        that the raw log and the clean one are not both held whole (a large log's peak memory).

    Raises
    ------
    DataError if no event survives cleaning (the message carries the per-reason counts).
    """
    malformed: Mapping[str, int] = raw.meta.get("malformed_rows", {})
    has_time_column = TIME in raw.events.columns
    cleaned = _clean_events(raw.events, opts, malformed_rows=malformed.get("events", 0), exclude_users=exclude_users,
                            sources=raw.meta.get("sources", ()), carry=(), constant_time_is_no_time=True,
                            index_ids=index_ids, unread_rows=raw.meta.get("unread_rows"), release_raw=consume)
    events, ev_rep = cleaned.events, cleaned.report
    ev_rep.ignored_columns += [c for c in raw.meta.get("unread_columns", ()) if c not in ev_rep.ignored_columns]
    report = QualityReport(source=raw.source, events=ev_rep)
    if ev_rep.rows_out == 0:
        raise DataError(
            f"{raw.source}: no events left after cleaning ({ev_rep.rows_in} rows in; dropped: {ev_rep.dropped}). "
            "Check the file's columns, timestamps and data.cleaning settings (event_weights, min_timestamp, ...)."
        )
    users = items = None
    if raw.users is not None:
        users, report.users_table, report.attributes["users"] = clean_attributes(
            raw.users, USER, malformed_rows=malformed.get("users", 0), exclude_ids=exclude_users,
            max_abs_value=opts.max_abs_value,
        )
    if raw.items is not None:
        items, report.items_table, report.attributes["items"] = clean_attributes(
            raw.items, ITEM, malformed_rows=malformed.get("items", 0), max_abs_value=opts.max_abs_value
        )
    report.n_users, report.n_items = cleaned.n_users, cleaned.n_items
    report.events_per_type = cleaned.events_per_type
    report.timestamps_note = describe_times(has_time_column, events)
    report.has_timestamps = report.timestamps_note is None
    if report.has_timestamps:
        t0, t1 = int(events[TIME].min()), int(events[TIME].max())
        report.time_range = {
            "min": pd.Timestamp(t0, unit="s", tz="UTC").isoformat(),
            "max": pd.Timestamp(t1, unit="s", tz="UTC").isoformat(),
        }
    else:
        report.time_range = {"min": None, "max": None}
        log.warning("%s: no event times (%s): events keep their file order, the split is per user at random, "
                    "interest profiles are not time-decayed and time-window propensity labels cannot be made",
                    raw.source, report.timestamps_note)
    log.debug(report.summary())  # the caller logs the summary once (pipeline, evaluate)
    return EventLog(events, users, items, raw.source, dict(raw.meta)), report
