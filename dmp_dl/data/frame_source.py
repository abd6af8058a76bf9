"""An event log from pandas DataFrames already in memory (``dmp_dl.fit(events, items, users)``).

The frames go through the same cleaning as a file's rows (:func:`dmp_dl.data.cleaning.clean_log`):
ids become text (``123``, ``"123"`` and ``123.0`` are one id), times are parsed, bad rows are dropped
and counted by reason. What is checked here is what a file reader checks: each table is a
DataFrame with unique column names and its required columns.
"""

from __future__ import annotations

import pandas as pd

from dmp_dl.core.errors import DataError
from dmp_dl.data.schema import ITEM, REQUIRED_EVENT_COLUMNS, USER, EventLog

SOURCE = "events DataFrame"


def checked_frame(frame: object, what: str, required: tuple[str, ...]) -> pd.DataFrame:
    """``frame`` as a DataFrame of its own (a shallow copy with a fresh row index), after checking
    that it is one, that its column names are distinct and that it has the ``required`` columns;
    :class:`DataError` naming ``what`` and the column otherwise."""
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{what} must be a pandas DataFrame, got {type(frame).__name__}")
    columns = [str(c) for c in frame.columns]
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise DataError(f"{what}: duplicated column name(s) {duplicated}; rename or remove them")
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{what} lacks required column {missing[0]!r} (found columns: {columns}); rename yours, "
                        f"e.g. df.rename(columns={{'YOUR_COLUMN': {missing[0]!r}}})")
    out = frame.reset_index(drop=True)
    out.columns = columns
    return out


class DataFrameSource:
    """``events`` (``user_id``, ``item_id`` and optionally ``timestamp``, ``event_type``, ``value``,
    ``event_id``), optional ``users`` (``user_id`` plus attribute columns) and ``items``
    (``item_id`` plus attribute columns, e.g. ``category``, multi-valued with ``|``), checked when
    given (before any setting is read or a model trained).

    A plain class, not a dataclass: Hydra's ``instantiate`` would turn a dataclass argument into config.
    """

    def __init__(self, events: pd.DataFrame, users: pd.DataFrame | None = None, items: pd.DataFrame | None = None):
        self.events = checked_frame(events, "events", REQUIRED_EVENT_COLUMNS)
        self.users = None if users is None else checked_frame(users, "users", (USER,))
        self.items = None if items is None else checked_frame(items, "items", (ITEM,))

    def load(self) -> EventLog:
        return EventLog(self.events, self.users, self.items, source=SOURCE, meta={"malformed_rows": {}})
