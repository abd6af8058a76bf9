"""``data=events``: a DMP event log from CSV or Parquet, with optional user and item tables.

An event path may be a file, a folder of CSV or Parquet files (with its subfolders, hive
partitions such as ``date=2026-11-30/`` among them), a glob pattern (``logs/**/part-*.parquet``,
see :mod:`dmp_dl.data.event_paths`), or a real-time journal folder (:mod:`dmp_dl.data.journal`).
Parquet is read as one dataset, only the columns and rows cleaning keeps
(:mod:`dmp_dl.data.parquet_dataset`). ``data.extra_paths`` adds more of them after the main log
(:func:`add_extra_events`), e.g. the historical log plus the journal of events that arrived since.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dmp_dl.core.errors import DataError
from dmp_dl.data.cleaning import CleaningOptions, parse_timestamps
from dmp_dl.data.event_paths import EventFiles, file_kind, is_glob, list_event_files, partition_values
from dmp_dl.data.files import read_table
from dmp_dl.data.journal import JOURNAL_ID, JOURNAL_SEQ, is_journal, read_journal
from dmp_dl.data.memory_check import check_csv_events_fit
from dmp_dl.data.parquet_dataset import TimeWindow, read_parquet_events
from dmp_dl.data.schema import ITEM, REQUIRED_EVENT_COLUMNS, TIME, USER, EventLog, normalize_ids

log = logging.getLogger(__name__)


@dataclass
class EventTable:
    """Raw events read from one path (a file, a folder of files, a glob or a journal).

    parts: (file, rows, malformed rows[, rows left unread as outside the time window]) of each file
    read, in order; journals: journal id -> ``{"path", "max_seq", "pseudonymized", "key_fingerprint"}``
    of each journal folder read.
    """

    frame: pd.DataFrame
    parts: list[tuple]
    journals: dict[str, dict]
    unread_columns: list[str] = field(default_factory=list)  # columns of the files not read (Parquet)

    @property
    def malformed_rows(self) -> int:
        return sum(part[2] for part in self.parts)

    @property
    def unread_rows(self) -> int:
        """Rows not read because their time lies outside the window (``timestamp_out_of_range``)."""
        return sum(part[3] for part in self.parts if len(part) > 3)


def read_events(path: str | Path, *, key: str, sep: str = "auto", encoding: str = "utf-8",
                rename: dict[str, str] | None = None, window: TimeWindow | None = None) -> EventTable:
    """Events from a file, a folder of event files (with its subfolders: hive partitions), a glob
    pattern, or a real-time journal folder.

    Parquet is read as one dataset (:mod:`dmp_dl.data.parquet_dataset`): only the columns cleaning
    uses, and with ``window`` not the rows outside it (counted in ``parts``). CSV files are read
    one by one in path order, every column, with their partition values as columns.
    """
    if not is_glob(path):
        path = Path(path)
        if path.is_dir() and is_journal(path):
            return _read_journal(path)
        if not path.is_dir():
            if path.is_file() and file_kind(path) == "parquet":  # is_file first: never open a pipe
                found = EventFiles("parquet", [path])
            else:  # read_table names what is wrong with the file
                check_csv_events_fit([path], path)
                table = read_table(path, what="events", key=key, required=REQUIRED_EVENT_COLUMNS, sep=sep,
                                   encoding=encoding, rename=rename)
                return EventTable(table.frame, [(table.path, len(table.frame), table.malformed_rows)], {})
        else:
            found = list_event_files(path, key)
    else:
        found = list_event_files(path, key)
    if found.kind == "parquet":
        got = read_parquet_events(found, key=key, rename=rename, required=REQUIRED_EVENT_COLUMNS, window=window)
        return EventTable(got.frame, list(got.parts), {}, got.unread_columns)
    check_csv_events_fit(found.files, path)
    tables = []
    for f in found.files:
        table = read_table(f, what="events", key=key, required=REQUIRED_EVENT_COLUMNS, sep=sep, encoding=encoding,
                           rename=rename)
        for name, value in partition_values(f, found.base).items():
            if name in table.frame.columns:
                raise DataError(f"{f}: {name!r} is both a column of the file and a partition folder above it "
                                f"({name}=...); rename the folder or the column")
            table.frame[name] = pd.Series(np.full(len(table.frame), value, dtype=object), index=table.frame.index)
        tables.append(table)
    frame = pd.concat([t.frame for t in tables], ignore_index=True) if len(tables) > 1 else tables[0].frame
    return EventTable(frame, [(t.path, len(t.frame), t.malformed_rows) for t in tables], {})


def _read_journal(path: Path) -> EventTable:
    rows, meta, parts = read_journal(path)
    seq = pd.to_numeric(rows[JOURNAL_SEQ], errors="coerce")
    journals = {}
    for jid, top in seq.groupby(rows[JOURNAL_ID]).max().items():
        journals[str(jid)] = {"path": str(path), "max_seq": int(top) if np.isfinite(top) else 0,
                              "pseudonymized": bool(meta.get("pseudonymized")),
                              "key_fingerprint": meta.get("key_fingerprint")}
    if not len(rows):
        journals[str(meta["id"])] = {"path": str(path), "max_seq": 0, "pseudonymized": bool(meta.get("pseudonymized")),
                                     "key_fingerprint": meta.get("key_fingerprint")}
    return EventTable(rows, parts, journals)


def _like(times: pd.Series, target: pd.Series, unit: str) -> pd.Series:
    """``times`` (any form) in the form of ``target``'s column where that is cheap: numbers in
    ``unit`` or datetimes, so that concatenating them keeps a fast-to-parse column."""
    if pd.api.types.is_datetime64_any_dtype(target.dtype):
        seconds = parse_timestamps(times)
        out = pd.to_datetime(seconds, unit="s", utc=True, errors="coerce")
        return pd.Series(out if getattr(target.dtype, "tz", None) is not None else out.tz_localize(None), index=times.index)
    if pd.api.types.is_numeric_dtype(target.dtype) and not pd.api.types.is_bool_dtype(target.dtype):
        if pd.api.types.is_numeric_dtype(times.dtype) and not pd.api.types.is_bool_dtype(times.dtype):
            return times
        return pd.Series(parse_timestamps(times) * (1000.0 if unit == "ms" else 1.0), index=times.index)
    return times


def add_extra_events(raw: EventLog, paths: Sequence[str], timestamp_unit: str = "s") -> EventLog:
    """``raw`` with the events of ``paths`` (files, folders or journals, ``data.extra_paths``)
    appended after its own, for one cleaning pass: duplicates across them are dropped and counted
    (an ``event_id`` seen before, or an exact repeat), and the quality report counts rows in and out
    per file. Journal timestamps (ISO-8601) are put in the main log's form first."""
    events = raw.events.copy()
    frames = [events]
    meta = dict(raw.meta)
    malformed = dict(meta.get("malformed_rows", {}))
    unread = sum(meta.get("unread_rows", {}).values())
    sources = list(meta.get("sources") or [(raw.source, len(events), malformed.get("events", 0), unread)])
    journals = dict(meta.get("journals", {}))
    events[USER], events[ITEM] = normalize_ids(events[USER]), normalize_ids(events[ITEM])
    for i, path in enumerate(paths):
        table = read_events(path, key=f"data.extra_paths[{i}]")
        frame = table.frame
        frame[USER], frame[ITEM] = normalize_ids(frame[USER]), normalize_ids(frame[ITEM])
        if TIME in events.columns and TIME in frame.columns:
            frame[TIME] = _like(frame[TIME], events[TIME], timestamp_unit)
        elif TIME in frame.columns:  # the main log has no times: neither has the combined log
            log.warning("%s has timestamps but data.path has none: they are ignored (a log without event times)", path)
            frame = frame.drop(columns=[TIME])
        frames.append(frame)
        sources.extend(table.parts)
        malformed["events"] = malformed.get("events", 0) + table.malformed_rows
        journals.update(table.journals)
    meta.update({"malformed_rows": malformed, "sources": sources, "journals": journals})
    combined = pd.concat(frames, ignore_index=True)
    return EventLog(combined, raw.users, raw.items, raw.source, meta)


@dataclass
class EventFileSource:
    """Reads ``path`` (events: a file, a folder of event files with its partition subfolders, a glob
    pattern or a journal folder) and optionally ``users`` / ``items`` attribute files.

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

    def load(self, cleaning: CleaningOptions | None = None) -> EventLog:
        """The raw log. ``cleaning``: the options it will be cleaned with; a Parquet log is then read
        without the rows their time range drops (counted under ``meta["unread_rows"]``)."""
        if not self.path:
            raise DataError("data=events needs data.path=FILE (a CSV or Parquet event log, a folder or a glob)")
        rename = dict(self.columns or {})
        window = None
        if cleaning is not None:
            lo, hi = cleaning.time_bounds()
            window = TimeWindow(lo, hi if cleaning.max_timestamp is not None else None, cleaning.timestamp_unit)
        events = read_events(self.path, key="data.path", sep=self.sep, encoding=self.encoding, rename=rename,
                             window=window)
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
        meta = {"malformed_rows": malformed, "journals": events.journals}
        if events.unread_rows:
            meta["unread_rows"] = {"timestamp_out_of_range": events.unread_rows}
        if events.unread_columns:
            meta["unread_columns"] = events.unread_columns
        if len(events.parts) > 1 or events.journals:
            meta["sources"] = events.parts
        return EventLog(events.frame, users, items, source=str(self.path), meta=meta)
