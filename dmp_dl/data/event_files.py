"""``data=events``: a DMP event log from CSV or Parquet, with optional user and item tables."""

from __future__ import annotations

from dataclasses import dataclass, field

from dmp_dl.data.files import read_table
from dmp_dl.data.schema import ITEM, REQUIRED_EVENT_COLUMNS, USER, EventLog
from dmp_dl.errors import DataError


@dataclass
class EventFileSource:
    """Reads ``path`` (events) and optionally ``users`` / ``items`` attribute files.

    columns: map of canonical column name -> the file's column name, e.g.
        ``{user_id: customer_id, item_id: sku, timestamp: ts}``.
    sep: CSV separator or ``auto`` (detected from the header line).
    encoding: CSV text encoding.
    """

    path: str | None = None
    users: str | None = None
    items: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    sep: str = "auto"
    encoding: str = "utf-8"

    def load(self) -> EventLog:
        if not self.path:
            raise DataError("data=events needs data.path=FILE (a CSV or Parquet event log)")
        rename = dict(self.columns or {})
        events = read_table(
            self.path, what="events", key="data.path", required=REQUIRED_EVENT_COLUMNS,
            sep=self.sep, encoding=self.encoding, rename=rename,
        )
        malformed = {"events": events.malformed_rows}
        users = items = None
        if self.users:
            t = read_table(self.users, what="user attributes", key="data.users", required=(USER,),
                           sep=self.sep, encoding=self.encoding, rename={USER: rename.get(USER, USER)})
            users, malformed["users"] = t.frame, t.malformed_rows
        if self.items:
            t = read_table(self.items, what="item attributes", key="data.items", required=(ITEM,),
                           sep=self.sep, encoding=self.encoding, rename={ITEM: rename.get(ITEM, ITEM)})
            items, malformed["items"] = t.frame, t.malformed_rows
        return EventLog(events.frame, users, items, source=str(self.path), meta={"malformed_rows": malformed})
