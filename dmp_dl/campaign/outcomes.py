"""A campaign's files: the assignments (who was treated, who held out) and the outcome log.

* Assignments: the ``target.csv`` (or ``.parquet``) of ``task=target ... control_frac=F``, or any
  table with ``user_id`` and ``group`` (``treatment`` / ``control``) and optionally ``segment``
  and ``decile`` (the breakdowns of the measurement).
* Outcomes: an event log from the campaign's start on, read with the training reader and cleaning
  (:func:`~dmp_dl.data.files.read_table`, :func:`~dmp_dl.data.cleaning.clean_events`): columns
  ``user_id``, ``timestamp`` and optionally ``event_type``, ``value`` (revenue) and ``item_id``
  (not needed). The cleaning rules that decide what a valid row is (accepted event types,
  timestamp unit and range, value fill, duplicates) are the training run's when its bundle is
  given; the rules that decide what a training interaction is (``min_value``,
  ``positive_event_types``, k-core) do not apply to outcomes. Every dropped row is counted.

Every problem is one :class:`~dmp_dl.core.errors.DataError` naming the file, the row or the column.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dmp_dl.campaign.control import CONTROL, N_DECILES, TREATMENT
from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.core.rules import MAX_SEGMENT, Num
from dmp_dl.data.cleaning import CleaningOptions, TableReport, clean_events, parse_timestamps
from dmp_dl.data.files import read_table
from dmp_dl.data.pseudonymize import pseudonymize_ids
from dmp_dl.data.schema import ITEM, TIME, TYPE, USER, VALUE, normalize_ids

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
GROUP = "group"
ANY_EVENT = "any"
NO_ITEM = "-"
# data.cleaning keys that say what a valid row is; the rest (positive rules, k-core) shape training data only
READING_RULES = ("event_weights", "default_event_type", "min_timestamp", "max_timestamp", "timestamp_unit",
                 "value_fill", "dedupe")

# A campaign starts between these (epoch seconds: 1970-01-01 and 2200-01-01) and is measured over at
# most a century: beyond them the window's end is not a date.
CAMPAIGN_START_RANGE = (0.0, 7_258_118_400.0)
MAX_WINDOW_DAYS = 36_525.0


@dataclass(frozen=True)
class Time:
    """A moment as epoch seconds or an ISO-8601 text, between ``lo`` and ``hi`` (epoch seconds)."""

    lo: float
    hi: float
    null: bool = False

    def seconds(self, value: Any) -> float | None:
        """``value`` in epoch seconds (None: not a time)."""
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return None
        if isinstance(value, (int, float)):
            t = float(value)
        else:
            t = float(parse_timestamps(pd.Series([value], dtype=object))[0])
        return t if math.isfinite(t) else None

    def problem(self, value: Any) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None if self.null else f"must be {self.describe()}"
        t = self.seconds(value)
        if t is None or not self.lo <= t <= self.hi:
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        day = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).date().isoformat()  # noqa: E731
        return (f"epoch seconds or an ISO-8601 time from {day(self.lo)} to {day(self.hi)}"
                + (" or null" if self.null else ""))


CAMPAIGN_START = Time(*CAMPAIGN_START_RANGE, null=True)
WINDOW_DAYS = Num(0, MAX_WINDOW_DAYS, lo_open=True, null=True)


# the breakdown columns of an assignments file: the bundle's segment ids, the target's propensity deciles
BREAKDOWNS = {"segment": (0, MAX_SEGMENT), "decile": (1, N_DECILES)}


def _int_column(frame: pd.DataFrame, column: str, path: str) -> np.ndarray | None:
    """``column`` of ``frame`` as (n,) int64, every value a whole number in its ``BREAKDOWNS`` range."""
    if column not in frame.columns:
        return None
    lo, hi = BREAKDOWNS[column]
    values = pd.to_numeric(frame[column].astype(object).where(frame[column].notna(), ""), errors="coerce")
    bad = ~((values >= lo) & (values <= hi) & (values == np.floor(values)))  # NaN compares False
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: row {row + 2} has {column}={frame[column].iloc[row]!r}; {column} must be a whole "
                        f"number in {lo}..{hi} (or drop the column)")
    return values.to_numpy(dtype=np.int64)


def read_assignments(path: str) -> pd.DataFrame:
    """The campaign's users: ``user_id`` (str), ``group`` (treatment / control), ``segment`` and
    ``decile`` (int64, when the file has them), in file order.

    Raises :class:`DataError` for a missing file or column, an empty or repeated id, a group that
    is neither treatment nor control, or a file without a control (or treatment) group.
    """
    if path is None:
        raise ConfigError("assignments is required: the target.csv of task=target ... control_frac=0.1")
    table = read_table(path, what="assignments", key="assignments", required=(USER, GROUP))
    frame = table.frame
    ids = normalize_ids(frame[USER])
    empty = ids.str.lower().isin(("", "nan", "none", "null"))
    if empty.any():
        raise DataError(f"{path}: row {int(np.flatnonzero(empty.to_numpy())[0]) + 2} has an empty user_id; "
                        "remove the row or fill in the id")
    dup = ids.duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())[:2] + 2
        raise DataError(f"{path}: user {ids[dup].iloc[0]!r} appears more than once (rows {rows[0]} and {rows[1]}); "
                        "each user is in one group")
    group = frame[GROUP].astype(object).where(frame[GROUP].notna(), "").map(str).str.strip().str.lower()
    bad = ~group.isin((TREATMENT, CONTROL))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: row {row + 2} has group={frame[GROUP].iloc[row]!r}; a group is 'treatment' or 'control'")
    out = pd.DataFrame({USER: ids.to_numpy(dtype=object), GROUP: group.to_numpy(dtype=object)})
    for column in ("segment", "decile"):
        values = _int_column(frame, column, str(path))
        if values is not None:
            out[column] = values
    n_c = int((out[GROUP] == CONTROL).sum())
    if n_c == 0:
        raise DataError(f"{path}: no user is in the control group, so there is nothing to compare with; target "
                        "with a holdout (task=target ... control_frac=0.1) and send only to the treatment group")
    if n_c == len(out):
        raise DataError(f"{path}: every user is in the control group; nobody was treated")
    return out


def outcome_cleaning(training_cleaning: Mapping | None = None) -> CleaningOptions:
    """Cleaning for outcome logs: the training run's reading rules (``data.cleaning`` of the
    bundle's config, when given), without its positive-interaction rules and k-core."""
    given = {k: v for k, v in dict(training_cleaning or {}).items() if k in READING_RULES}
    return CleaningOptions(**given)


@dataclass
class OutcomeEvents:
    """Clean outcome events (the columns of :func:`~dmp_dl.data.cleaning.clean_events`) and the
    row accounting (``report.dropped`` by reason)."""

    events: pd.DataFrame
    report: TableReport
    path: str


def read_outcomes(path: str, cleaning: CleaningOptions | None = None, columns: Mapping[str, str] | None = None,
                  sep: str = "auto", pseudonymizer=None) -> OutcomeEvents:
    """Read and clean the outcome log at ``path`` (see the module docstring).

    columns: canonical name -> the file's column name, e.g. ``{user_id: customer_id}``.
    pseudonymizer: when the campaign's ids are keyed pseudonyms, the raw ids of the log are hashed
    the same way.
    """
    if path is None:
        raise ConfigError("outcomes is required: the event log after the campaign's start (user_id, timestamp, "
                          "event_type, value)")
    table = read_table(path, what="outcome events", key="outcomes", required=(USER, TIME), sep=sep,
                       rename=dict(columns or {}), columns_key="outcome_columns", sep_key="outcome_sep")
    raw = table.frame
    if ITEM not in raw.columns:  # an outcome needs no item
        raw = raw.assign(**{ITEM: NO_ITEM})
    if pseudonymizer is not None:
        raw = raw.assign(**{USER: pseudonymize_ids(raw[USER], pseudonymizer)})
    events, report = clean_events(raw, cleaning or CleaningOptions(), malformed_rows=table.malformed_rows)
    if report.rows_out == 0:
        raise DataError(f"{path}: no events left after cleaning ({report.rows_in} rows in; dropped: {report.dropped}); "
                        "check the file's user_id and timestamp columns and its event types")
    return OutcomeEvents(events, report, str(path))


def resolve_conversion(requested: str | None, outcomes: OutcomeEvents, cleaning: CleaningOptions) -> str:
    """The event type counted as a conversion: ``requested`` when the log has it; ``any`` for every
    event; a log without an ``event_type`` column (a purchase ledger) counts every row."""
    types = sorted(set(outcomes.events[TYPE].unique().tolist()))
    want = ANY_EVENT if requested is None else str(requested).strip().lower()
    if want in ("", ANY_EVENT):
        return ANY_EVENT
    if want in types:
        return want
    if types == [cleaning.default_event_type]:
        log.info("%s has no event types: every row counts as a conversion", outcomes.path)
        return ANY_EVENT
    raise DataError(f"{outcomes.path}: no {want!r} events (event types: {', '.join(types)}); set conversion_event "
                    f"to the type that is a conversion, or conversion_event=any to count every event")


def iso_time(t: int | None) -> str | None:
    """Epoch seconds as an ISO-8601 UTC time (None: None); any year up to 9999."""
    return None if t is None else dt.datetime.fromtimestamp(int(t), dt.timezone.utc).isoformat()


@dataclass
class UserOutcomes:
    """Per assigned user (aligned with the assignments): ``converted`` (n,) bool (a conversion
    event in the window), ``revenue`` (n,) float64 (the value of their conversion events),
    ``first_conversion`` (n,) float64 days after the start (NaN: none), and the window and counts."""

    converted: np.ndarray
    revenue: np.ndarray
    first_conversion: np.ndarray
    start: int
    end: int | None
    counts: dict


def user_outcomes(user_ids: np.ndarray, outcomes: OutcomeEvents, conversion_event: str, start=None,
                  window_days: float | None = None) -> UserOutcomes:
    """Each assigned user's outcome from the conversion events in [start, start + window_days].

    start: epoch seconds or ISO-8601 (None: the log's first event); window_days: None for every
    event from the start on.
    """
    for key, value, rule in (("start", start, CAMPAIGN_START), ("window_days", window_days, WINDOW_DAYS)):
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{key} {problem}, got {value!r}")
    events = outcomes.events
    ts = events[TIME].to_numpy(dtype=np.int64)
    t0 = int(ts.min()) if start is None or str(start).strip() == "" else int(CAMPAIGN_START.seconds(start))
    end = None if window_days is None else int(t0 + float(window_days) * SECONDS_PER_DAY)
    before, after = ts < t0, (ts > end) if end is not None else np.zeros(len(ts), bool)
    in_window = ~before & ~after
    is_conversion = in_window & (True if conversion_event == ANY_EVENT else (events[TYPE].to_numpy() == conversion_event))
    slot = pd.Index(user_ids).get_indexer(events[USER].to_numpy())
    assigned = slot >= 0
    n = len(user_ids)
    hit = is_conversion & assigned
    revenue = np.bincount(slot[hit], weights=events[VALUE].to_numpy(np.float64)[hit], minlength=n)
    first = np.full(n, np.inf)
    np.minimum.at(first, slot[hit], (ts[hit] - t0) / SECONDS_PER_DAY)
    converted = np.isfinite(first)
    outcome_users = pd.unique(events[USER].to_numpy()[in_window])
    known = int(np.isin(outcome_users, user_ids).sum())
    if len(outcome_users) and known == 0:
        raise DataError(f"{outcomes.path}: none of the {len(outcome_users)} users with events in the window is in the "
                        f"assignments (first: {outcome_users[0]!r}); the two files must use the same user ids")
    counts = {"events_before_start": int(before.sum()), "events_after_window": int(after.sum()),
              "events_in_window": int(in_window.sum()), "conversion_events": int(hit.sum()),
              "events_of_unassigned_users": int((in_window & ~assigned).sum()),
              "unassigned_users_with_events": int(len(outcome_users) - known)}
    return UserOutcomes(converted, revenue, np.where(converted, first, np.nan), t0, end, counts)
