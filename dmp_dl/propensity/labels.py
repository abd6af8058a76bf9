"""The propensity task: which users are scored as of a cutoff T, and their 0/1 labels.

Event-window labels: a user is eligible when they have at least one event at or before T, and is
positive when they perform the target event in ``(T, T + horizon]``. Everything the model reads
about a user is computed from events at or before T (see :mod:`dmp_dl.propensity.features`), so
events after T decide labels and nothing else.

CRM labels: a 0/1 column of the user attribute table (``propensity.label_column``); eligible are
the users with events and a non-missing label, and features use all events.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dmp_dl.core.errors import ConfigError, DataError, InsufficientDataError
from dmp_dl.data.cleaning import parse_timestamps
from dmp_dl.data.schema import USER
from dmp_dl.data.vocab import IdVocab

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
ANY_EVENT = "any"
TRUE_WORDS = frozenset({"1", "1.0", "true", "yes", "y", "t"})
FALSE_WORDS = frozenset({"0", "0.0", "false", "no", "n", "f"})


@dataclass
class PropensityTask:
    """The labelled users of one cutoff.

    users: (n,) int64 eligible user indices (rows of the user vocabulary), ascending.
    labels: (n,) int8, 1 when the user converted.
    cutoff: T in epoch seconds; features use events with ``timestamp <= cutoff``.
    horizon_days: the label window length (None for CRM labels).
    target_event: the event type asked for; target_resolved: the one counted (``"any"``: every event).
    label_source: ``"events"`` or ``"crm:<column>"``.
    """

    users: np.ndarray
    labels: np.ndarray
    cutoff: int
    horizon_days: float | None
    target_event: str | None
    target_resolved: str | None
    label_source: str

    def summary(self) -> dict:
        """JSON-safe description (no arrays)."""
        return {
            "label_source": self.label_source,
            "target_event": self.target_event,
            "target_resolved": self.target_resolved,
            "horizon_days": self.horizon_days,
            "cutoff": int(self.cutoff),
            "cutoff_iso": pd.Timestamp(int(self.cutoff), unit="s", tz="UTC").isoformat(),
            "eligible_users": int(len(self.users)),
            "positives": int(self.labels.sum()),
            "positive_rate": float(self.labels.mean()) if len(self.labels) else float("nan"),
        }


def resolve_target(requested: str | None, event_types: Collection[str]) -> str:
    """The event type whose occurrence is the label.

    ``requested`` (case-insensitive) when the data has it; ``None``/``"any"`` means every event.
    Data without that type (e.g. MovieLens, whose only type is ``rating``, or a log without an
    ``event_type`` column) falls back to any event, and the fallback is logged.
    """
    present = sorted({str(t) for t in event_types})
    if requested is None or str(requested).strip().lower() in ("", ANY_EVENT):
        return ANY_EVENT
    target = str(requested).strip().lower()
    if target in present:
        return target
    log.warning(
        "propensity.target_event=%r does not occur in the data (event types: %s): predicting any event instead",
        target, ", ".join(present) or "none",
    )
    return ANY_EVENT


def resolve_cutoff(timestamps: np.ndarray, horizon_days: float, cutoff: str | int | float | None = None,
                   quantile: float | None = 0.8) -> int:
    """The cutoff T (epoch seconds) for event-window labels.

    ``cutoff`` (epoch seconds or ISO-8601) is used as given; it must leave ``horizon_days`` of data
    after it, or the labels would be cut short. Otherwise T is the ``quantile`` of the event
    timestamps, moved back to ``last event - horizon`` when later than that (so every label window
    is fully observed).

    timestamps: (n,) epoch seconds of all events.

    Raises :class:`InsufficientDataError` when the data span no more than the horizon (the
    training job then skips the propensity stage) and :class:`ConfigError` for a bad setting.
    """
    if not np.isfinite(horizon_days) or horizon_days <= 0:
        raise ConfigError(f"propensity.horizon_days must be > 0, got {horizon_days}")
    t_min, t_max = int(np.min(timestamps)), int(np.max(timestamps))
    horizon = float(horizon_days) * SECONDS_PER_DAY
    latest = t_max - horizon
    iso = lambda t: pd.Timestamp(int(t), unit="s", tz="UTC").isoformat()  # noqa: E731
    if latest <= t_min:
        raise InsufficientDataError(
            f"propensity.horizon_days={horizon_days:g} is not shorter than the data's time range "
            f"({iso(t_min)} .. {iso(t_max)}, {(t_max - t_min) / SECONDS_PER_DAY:.1f} days): no cutoff leaves a full "
            "label window; shorten propensity.horizon_days"
        )
    if cutoff is not None and str(cutoff).strip() != "":
        t = parse_timestamps(pd.Series([cutoff]))[0]
        if not np.isfinite(t):
            raise ConfigError(f"propensity.cutoff={cutoff!r} is neither epoch seconds nor an ISO-8601 time")
        if t < t_min or t > latest:
            raise ConfigError(
                f"propensity.cutoff={cutoff!r} ({iso(t)}) must lie in {iso(t_min)} .. {iso(latest)} so that "
                f"the {horizon_days}-day label window after it is inside the data"
            )
        return int(t)
    if quantile is None or not 0.0 < float(quantile) <= 1.0:
        raise ConfigError(f"propensity.cutoff_quantile must be in (0, 1] when propensity.cutoff is null, got {quantile}")
    t = int(np.quantile(timestamps, float(quantile), method="lower"))
    if t > latest:
        log.info("propensity cutoff: quantile %.2f (%s) moved back to %s so the %.0f-day window is observed",
                 quantile, iso(t), iso(latest), horizon_days)
        t = int(latest)
    return t


def window_labels(user: np.ndarray, timestamp: np.ndarray, event_type: np.ndarray, n_users: int,
                  cutoff: int, horizon_days: float, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Eligible users and labels for the window ``(cutoff, cutoff + horizon]``.

    user: (n,) int64 user index per event; timestamp: (n,) epoch seconds; event_type: (n,) str, or
    the events' type column (a categorical column is compared through its categories, not as
    Python strings event by event).
    Returns (users (m,) int64 ascending, labels (m,) int8).
    """
    before = timestamp <= cutoff
    seen = np.zeros(n_users, dtype=bool)
    seen[user[before]] = True
    in_window = (timestamp > cutoff) & (timestamp <= cutoff + float(horizon_days) * SECONDS_PER_DAY)
    if target != ANY_EVENT:
        in_window &= ((event_type == target).to_numpy(dtype=bool) if isinstance(event_type, pd.Series)
                      else np.asarray(event_type, dtype=object) == target)
    converted = np.zeros(n_users, dtype=bool)
    converted[user[in_window]] = True
    users = np.flatnonzero(seen).astype(np.int64)
    return users, converted[users].astype(np.int8)


def crm_labels(users_table: pd.DataFrame | None, column: str, user_vocab: IdVocab) -> tuple[np.ndarray, np.ndarray]:
    """Users with a non-missing 0/1 value in ``column`` of the (cleaned) user table, and the value.

    Accepts numbers 0/1 and the words true/false, yes/no, t/f, y/n. Returns (users (m,) int64
    ascending, labels (m,) int8).
    """
    if users_table is None or column not in users_table.columns:
        have = [c for c in (users_table.columns if users_table is not None else []) if c != USER]
        raise DataError(
            f"propensity.label_column={column!r}: the user table has no such column "
            f"(columns: {', '.join(have) or 'no user table given; set data.users'})"
        )
    rows = user_vocab.index_of(users_table[USER].tolist())
    values = users_table[column]
    text = values.astype(object).where(values.notna(), "").map(str).str.strip().str.lower()
    missing = (text == "") | (text == "nan") | (text == "none")
    positive, negative = text.isin(TRUE_WORDS), text.isin(FALSE_WORDS)
    bad = ~(missing | positive | negative)
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"propensity.label_column={column!r}: user {users_table[USER].iloc[first]!r} has value "
            f"{values.iloc[first]!r}; labels must be 0/1 or true/false (leave the cell empty when unknown)"
        )
    keep = (rows >= 0) & ~missing.to_numpy()
    order = np.argsort(rows[keep], kind="stable")
    return rows[keep][order].astype(np.int64), positive.to_numpy()[keep][order].astype(np.int8)
