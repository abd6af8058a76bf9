"""The event journal: every accepted real-time event, durable before it is acknowledged.

A journal is a folder::

    journal.json            format, version, the journal's id, whether user ids are pseudonyms
                            (and the key's fingerprint, never the key)
    events-000001.csv       append-only CSV segments with a header line; a new one is started
    events-000002.csv       when the current one passes ``segment_bytes``
    .lock                   held (flock) by the one process that writes the journal

Each row is one event, in the order it was accepted: ``journal_id``, ``journal_seq`` (1, 2, 3, ...
over the whole journal), ``event_id`` (the client's, or a hash of the event's content),
``user_id`` (the keyed pseudonym, as ``hmac-sha256:<fingerprint>:<pseudonym>``, when the bundle's
ids are pseudonymised), ``item_id``, ``timestamp`` (ISO-8601 UTC, so that a training run's
``timestamp_unit`` does not matter), ``event_type`` and ``value``. The trainer reads the folder
directly (``data.extra_paths=[DIR]``, or ``data=events data.path=DIR``); ``event_id`` makes a
repeated delivery count once, and ``journal_seq`` tells a bundle which rows it was trained on.

Appending writes whole lines with one ``write`` and returns the bytes written; :meth:`Journal.sync`
fsyncs up to them (a group commit: threads that wait together share one fsync). A crash can
leave a torn last line (never acknowledged): opening the journal cuts it off, and readers ignore
any line without its newline, so a training run may read a journal that is being written.

A failed write (a full disk) or a new segment that cannot be created (no inodes left) costs the
batch being written, never the journal: the next append tries again (a segment that cannot be
started leaves the batch in the current one, past ``segment_bytes``); :attr:`Journal.error` says
what failed last, until an append succeeds. A corrupt row in the middle of a segment (a wrong
number of fields, bytes that are not UTF-8) is skipped and counted by :func:`read_journal`.
"""

from __future__ import annotations

import csv
import datetime as dt
import fcntl
import io
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.core.io import atomic_write_text, fsync_path

log = logging.getLogger(__name__)

FORMAT = "dmp_dl.journal"
FORMAT_VERSION = 1
META_FILE = "journal.json"
LOCK_FILE = ".lock"
JOURNAL_ID, JOURNAL_SEQ = "journal_id", "journal_seq"
COLUMNS = (JOURNAL_ID, JOURNAL_SEQ, "event_id", "user_id", "item_id", "timestamp", "event_type", "value")
SEGMENT_RE = re.compile(r"^events-(\d{6,})\.csv$")
HEADER = (",".join(COLUMNS) + "\n").encode()


def is_journal(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a journal folder."""
    return (Path(path) / META_FILE).is_file()


def segment_paths(directory: Path) -> list[Path]:
    """The journal's segment files, oldest first."""
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := SEGMENT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _complete_part(data: bytes) -> bytes:
    """``data`` up to and including its last newline (a line without one was cut short)."""
    end = data.rfind(b"\n")
    return data[: end + 1] if end >= 0 else b""


def read_meta(directory: str | os.PathLike) -> dict:
    """The journal's ``journal.json``; :class:`DataError` naming the file when it is unreadable."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable journal description ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("id"), str):
        raise DataError(f"{path}: not a dmp_dl journal (format must be {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: journal format version {meta.get('format_version')!r}, this dmp_dl reads {FORMAT_VERSION}")
    return meta


def _empty_rows() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in COLUMNS})


def _parse_lines(data: bytes) -> tuple[pd.DataFrame, int]:
    """Rows of a segment's complete lines (header included) parsed one by one: the slow path for a
    segment with bytes that are not UTF-8. Returns (rows, lines that are not journal rows)."""
    rows, malformed = [], 0
    for line in data.split(b"\n")[1:-1]:
        try:
            fields = next(csv.reader([line.decode("utf-8")]))
        except (UnicodeDecodeError, csv.Error, StopIteration):
            fields = None
        if fields is None or len(fields) != len(COLUMNS):
            malformed += 1
            continue
        rows.append(fields)
    if not rows:
        return _empty_rows(), malformed
    return pd.DataFrame(rows, columns=list(COLUMNS), dtype=object), malformed


def _parse_segment(path: Path, data: bytes) -> tuple[pd.DataFrame, int]:
    """Rows of one segment's complete lines as strings, and how many lines were not journal rows
    (the wrong number of fields, or not UTF-8)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    data = _complete_part(data)
    if not data.startswith(HEADER):
        if not data:
            return _empty_rows(), 0
        raise DataError(f"{path}: not a journal segment (its header is not {HEADER.decode().strip()!r})")
    malformed = 0

    def skip(row) -> str:
        nonlocal malformed
        malformed += 1
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=list(COLUMNS), skip_rows=1, use_threads=True),
            parse_options=pacsv.ParseOptions(delimiter=",", invalid_row_handler=skip),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid:  # e.g. a row whose bytes are not UTF-8: read line by line, counting such rows
        return _parse_lines(data)
    return table.to_pandas().astype(object), malformed


def read_journal(directory: str | os.PathLike) -> tuple[pd.DataFrame, dict, list[tuple[str, int, int]]]:
    """Every complete row of the journal at ``directory``, oldest first.

    Returns (rows as strings with the :data:`COLUMNS`, the journal's ``journal.json``, and
    (segment path, rows, malformed rows) per segment). A line being written (no newline yet) is
    left out; a row with the wrong number of fields is skipped and counted.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    frames, parts = [], []
    for path in segment_paths(directory):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read this journal segment ({exc})") from None
        frame, malformed = _parse_segment(path, data)
        frames.append(frame)
        parts.append((str(path), len(frame), malformed))
    rows = pd.concat(frames, ignore_index=True) if frames else _empty_rows()
    return rows, meta, parts


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def iso_seconds(epoch: np.ndarray) -> list[str]:
    """Epoch seconds (int) -> ISO-8601 UTC strings (``2026-01-05T10:00:00Z``)."""
    seconds = np.asarray(epoch, dtype=np.int64).astype("datetime64[s]")
    return [f"{s}Z" for s in np.datetime_as_string(seconds, unit="s").tolist()]


class Journal:
    """The writer of one journal folder (one process at a time; thread-safe within it).

    directory: the folder (created with ``journal.json`` when absent).
    id_space: ``{"pseudonymized": bool, "key_fingerprint": str | None}`` of the bundle whose events it
        holds; a journal written in another id space (raw ids vs pseudonyms, another key) is refused.
    segment_bytes: start a new segment file once the current one is this large.
    """

    def __init__(self, directory: str | os.PathLike, id_space: dict | None = None, segment_bytes: int = 64 << 20):
        if int(segment_bytes) < 4096:
            raise ConfigError(f"realtime.segment_bytes must be >= 4096, got {segment_bytes}")
        self.directory = Path(directory).absolute()
        self.segment_bytes = int(segment_bytes)
        self._lock = threading.Lock()  # appends, rotation, rewrites
        self._sync_lock = threading.Lock()
        self._fd: int | None = None  # None while open: the segment is opened again by the next append
        self._closed = False
        self._cut_at: int | None = None  # a failed batch's bytes start here in the segment: cut them off on reopening
        self._written = 0  # bytes appended since open (all segments), for group commit
        self._synced = 0
        self.error: str | None = None  # what the last failed append or rewrite could not do (None: writable)
        self._open(dict(id_space or {"pseudonymized": False, "key_fingerprint": None}))

    # -- opening ------------------------------------------------------------------------------
    def _open(self, id_space: dict) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fh = open(self.directory / LOCK_FILE, "a+")
        except OSError as exc:
            raise ConfigError(f"journal={self.directory}: cannot create or open the journal folder ({exc.strerror or exc})") from None
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_fh.close()
            raise ConfigError(f"journal={self.directory} is in use by another process (one server writes a journal); "
                              "give this one its own journal=DIR") from None
        try:
            self._open_locked(id_space)
        except BaseException:
            self.close()
            raise

    def _open_locked(self, id_space: dict) -> None:
        if not (self.directory / META_FILE).exists():
            if segment_paths(self.directory):
                raise ConfigError(f"{self.directory}: holds journal segments but no {META_FILE}; restore it or use another journal=DIR")
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "id": secrets.token_hex(8),
                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "pseudonymized": bool(id_space.get("pseudonymized")),
                    "key_fingerprint": id_space.get("key_fingerprint") if id_space.get("pseudonymized") else None}
            atomic_write_text(self.directory / META_FILE, json.dumps(meta, indent=1))
            fsync_path(self.directory)
        self.meta = read_meta(self.directory)
        mine = (bool(id_space.get("pseudonymized")), id_space.get("key_fingerprint") if id_space.get("pseudonymized") else None)
        theirs = (bool(self.meta.get("pseudonymized")), self.meta.get("key_fingerprint"))
        if mine != theirs:
            def say(space):
                return f"pseudonyms (key fingerprint {space[1]})" if space[0] else "raw user ids"
            raise ConfigError(f"journal={self.directory} holds {say(theirs)} but this bundle's user ids are {say(mine)}; "
                              "give this bundle its own journal=DIR")
        self.id = str(self.meta["id"])
        self._recover()

    def _recover(self) -> None:
        """Cut a torn last line off every segment (a crash mid-write), then find the next sequence
        number and the segment to append to."""
        self.last_seq = 0
        segments = segment_paths(self.directory)
        for path in segments:
            data = path.read_bytes()
            complete = _complete_part(data)
            if len(complete) != len(data):
                log.warning("journal %s: cut %d bytes of a line that was being written when the server stopped "
                            "(never acknowledged)", path, len(data) - len(complete))
                with open(path, "r+b") as fh:
                    fh.truncate(len(complete))
                    fh.flush()
                    os.fsync(fh.fileno())
        self.last_seq = max(int(self.meta.get("seq_floor", 0)), self._last_written_seq(segments))
        if segments:
            self._segment = segments[-1]
        else:
            self._segment = self.directory / "events-000001.csv"
        self._open_segment()

    @staticmethod
    def _last_written_seq(segments: list[Path]) -> int:
        """The sequence number of the last row on disk (0 when there is none)."""
        for path in reversed(segments):
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - (1 << 16)))
                tail = fh.read()
            lines = [line for line in tail.split(b"\n") if line and not HEADER.startswith(line)]
            if lines:
                try:
                    return int(lines[-1].split(b",")[1].strip(b'"'))
                except (IndexError, ValueError):
                    raise DataError(f"{path}: the last row is not a journal row; restore the file or move it away") from None
        return 0

    def _open_segment(self) -> None:
        self._fd, self._size = self._open_file(self._segment, self._cut_at)
        self._cut_at = None

    def _open_file(self, path: Path, cut_at: int | None = None) -> tuple[int, int]:
        """Open segment ``path`` for appending: (fd, its size). A new (or empty) one gets its
        header; a header or last line cut short by a failed write is cut off first, and so is
        everything from ``cut_at`` on (a batch that failed half-written: never acknowledged). On
        failure nothing stays open."""
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if cut_at is not None and size > cut_at:
                log.warning("journal %s: cut %d bytes of a batch that failed half-written (never acknowledged)",
                            path, size - cut_at)
                os.ftruncate(fd, cut_at)
                size = cut_at
            if size:
                tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
                keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
                if keep < len(HEADER):  # not even a whole header: start the file again
                    keep = 0
                if keep != size:
                    log.warning("journal %s: cut %d bytes of a line a failed write left", path, size - keep)
                    os.ftruncate(fd, keep)
                    size = keep
            if size == 0:
                _write_all(fd, HEADER)
                os.fsync(fd)
                fsync_path(self.directory)
                size = len(HEADER)
        except BaseException:
            os.close(fd)
            if created:
                path.unlink(missing_ok=True)
            raise
        return fd, size

    # -- writing ------------------------------------------------------------------------------
    def append(self, rows: Sequence[Sequence[str]]) -> tuple[int, int]:
        """Append ``rows`` (event_id, user_id, item_id, timestamp, event_type, value as strings), in
        order, with consecutive sequence numbers. Returns (first seq, a token for :meth:`sync`).
        The caller serialises appends that must keep an order (the real-time service does)."""
        if not rows:
            return self.last_seq + 1, self._written
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        with self._lock:
            if self._closed:
                raise ConfigError(f"journal {self.directory} is closed")
            try:
                if self._fd is None:  # an earlier failure left no segment open: try again
                    self._open_segment()
            except OSError as exc:
                self.error = f"cannot open a journal segment ({exc.strerror or exc})"
                raise
            first = self.last_seq + 1
            for i, row in enumerate(rows):
                writer.writerow((self.id, str(first + i), *row))
            data = buf.getvalue().encode("utf-8")
            if self._size > len(HEADER) and self._size + len(data) > self.segment_bytes:
                self._rotate()
            try:
                _write_all(self._fd, data)
            except OSError as exc:
                self.error = f"cannot append to the journal ({exc.strerror or exc})"
                try:  # no part of the batch may stay: it was not acknowledged
                    os.ftruncate(self._fd, self._size)
                except OSError:  # opening the segment again cuts it off
                    self._cut_at = self._size
                    self._drop_fd()
                raise
            self.error = None
            self._size += len(data)
            self._written += len(data)
            self.last_seq = first + len(rows) - 1
            return first, self._written

    def _drop_fd(self) -> None:
        """Forget the open segment (after a failure); the next append opens it again."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _rotate(self) -> None:
        """Start the next segment. If it cannot be started (no inodes, a full disk), the batch goes
        to the current one and the next append tries again: a segment past ``segment_bytes`` is
        still a journal, a refused batch would be lost."""
        number = int(SEGMENT_RE.match(self._segment.name).group(1)) + 1
        segment = self.directory / f"events-{number:06d}.csv"
        try:
            os.fsync(self._fd)
            fd, size = self._open_file(segment)
        except OSError as exc:
            log.warning("journal %s: cannot start %s (%s); appending to %s meanwhile", self.directory, segment.name,
                        exc.strerror or exc, self._segment.name)
            return
        old, self._fd, self._segment, self._size = self._fd, fd, segment, size
        os.close(old)

    def sync(self, token: int) -> None:
        """Return once every byte appended before ``token`` was written is on disk (one fsync for
        every writer waiting at the same time)."""
        with self._sync_lock:
            if self._synced >= token:
                return
            with self._lock:  # held so that no rotation closes the file meanwhile (a closed one was fsynced)
                target = self._written
                if self._fd is not None:
                    try:
                        os.fsync(self._fd)
                    except OSError as exc:
                        self.error = f"cannot flush the journal to disk ({exc.strerror or exc})"
                        raise
            self._synced = max(self._synced, target)

    # -- reading and rewriting ----------------------------------------------------------------
    def rows(self) -> pd.DataFrame:
        """Every complete row (strings), oldest first."""
        with self._lock:
            return read_journal(self.directory)[0]

    def forget(self, user_ids: Iterable[str]) -> int:
        """Remove every row of ``user_ids`` (as journaled: pseudonyms in their tagged form when the
        journal holds pseudonyms). Each segment that has such rows is rewritten atomically
        (temporary file, fsync, rename). Returns the rows removed."""
        wanted = set(map(str, user_ids))
        if not wanted:
            return 0
        removed = 0
        with self._lock:
            try:
                removed = self._forget_locked(wanted)
            except OSError as exc:
                self.error = f"cannot rewrite the journal ({exc.strerror or exc})"
                raise
        return removed

    def _forget_locked(self, wanted: set[str]) -> int:
        if self._cut_at is not None:  # a failed batch's bytes are still in the segment: cut them off first
            self._open_segment()
        removed = 0
        for path in segment_paths(self.directory):
            data = _complete_part(path.read_bytes())
            frame, _ = _parse_segment(path, data)
            hit = frame["user_id"].isin(wanted).to_numpy()
            if not hit.any():
                continue
            if int(self.meta.get("seq_floor", 0)) < self.last_seq:
                # before any row goes: the numbering goes on after the removed rows, even the last ones
                self.meta["seq_floor"] = int(self.last_seq)
                atomic_write_text(self.directory / META_FILE, json.dumps(self.meta, indent=1))
            lines = data.split(b"\n")[1:-1]  # the header and the empty string after the last newline
            if len(lines) != len(frame):  # a malformed row: fall back to re-writing the parsed rows
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerows(frame.loc[~hit, list(COLUMNS)].itertuples(index=False))
                body = buf.getvalue().encode("utf-8")
            else:
                body = b"".join(line + b"\n" for line, h in zip(lines, hit) if not h)
            active = path == self._segment
            if active and self._fd is not None:
                os.fsync(self._fd)
                self._drop_fd()
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(HEADER + body)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_path(self.directory)
            removed += int(hit.sum())
            if active:
                self._open_segment()
        return removed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                finally:
                    os.close(self._fd)
                    self._fd = None
            fh = getattr(self, "_lock_fh", None)
            if fh is not None and not fh.closed:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
