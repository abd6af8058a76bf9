"""Streaming, atomic CSV / Parquet files: :class:`TableWriter`.

An export of a million users is written chunk by chunk (pyarrow tables), never held in memory as
one frame, into a temporary file beside the target that is fsynced and renamed over it only when
every chunk is in: a reader (a nightly upload job) sees the previous file or the complete new one,
never a half-written file, and a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa

from dmp_dl.errors import ConfigError

FORMATS = ("csv", "parquet")


class TableWriter:
    """Write pyarrow tables of one ``schema`` to ``path`` as CSV (with a header) or Parquet.

    Use as a context manager: the file appears at ``path`` when the block ends without an
    exception; on an exception the temporary file is removed and ``path`` is left as it was.
    ``rows`` counts the rows written.
    """

    def __init__(self, path: str | os.PathLike, fmt: str, schema: pa.Schema):
        if fmt not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.path, self.fmt, self.schema = Path(path), fmt, schema
        self.rows = 0
        self._fh = self._writer = self._tmp = None

    def __enter__(self) -> "TableWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._fh = os.fdopen(fd, "wb")
        if self.fmt == "csv":
            from pyarrow import csv

            self._writer = csv.CSVWriter(self._fh, self.schema)
        else:
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(self._fh, self.schema)
        return self

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (columns as in the schema)."""
        self._writer.write_table(table.select(self.schema.names).cast(self.schema))
        self.rows += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._writer.close()
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
                os.replace(self._tmp, self.path)
                return
        except BaseException:
            self._discard()
            raise
        self._discard()

    def _discard(self) -> None:
        for close in (self._writer.close, self._fh.close):
            try:
                close()
            except Exception:  # already failing: the temporary file is removed below either way
                pass
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
