"""Streaming, atomic CSV / Parquet files: :class:`TableWriter`.

An export of a million users is written chunk by chunk (pyarrow tables), never held in memory as
one frame, into a temporary file beside the target that is fsynced and renamed over it only when
every chunk is in (:func:`dmp_dl.core.io.atomic_writer`): a reader (a nightly upload job) sees the
previous file or the complete new one, never a half-written file, and a failed, killed (SIGTERM) or
interrupted (Ctrl-C) export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pyarrow as pa

from dmp_dl.core.errors import ConfigError
from dmp_dl.core.io import atomic_writer

FORMATS = ("csv", "parquet")


class TableWriter:
    """Write pyarrow tables of one ``schema`` to ``path`` as CSV (with a header) or Parquet.

    Use as a context manager: the file appears at ``path`` when the block ends without an
    exception; on an exception (SIGTERM and Ctrl-C included) the temporary file is removed and
    ``path`` is left as it was. ``mode``: the file's permission bits; None: those of the file it
    replaces, or the umask's for a new one. ``rows`` counts the rows written.
    """

    def __init__(self, path: str | os.PathLike, fmt: str, schema: pa.Schema, mode: int | None = None):
        if fmt not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.path, self.fmt, self.schema, self.mode = Path(path), fmt, schema, mode
        self.rows = 0
        self._file: contextlib.ExitStack | None = None
        self._writer = None

    def __enter__(self) -> "TableWriter":
        with contextlib.ExitStack() as file:
            fh = file.enter_context(atomic_writer(self.path, self.mode))
            if self.fmt == "csv":
                from pyarrow import csv

                self._writer = csv.CSVWriter(fh, self.schema)
            else:
                import pyarrow.parquet as pq

                self._writer = pq.ParquetWriter(fh, self.schema)
            self._file = file.pop_all()  # kept open past this block: closed in __exit__
        return self

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (columns as in the schema)."""
        self._writer.write_table(table.select(self.schema.names).cast(self.schema))
        self.rows += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._writer.close()  # Parquet: the footer
            except BaseException as error:
                self._file.__exit__(type(error), error, error.__traceback__)
                raise
            self._file.__exit__(None, None, None)  # fsync and rename
            return
        with contextlib.suppress(Exception):  # already failing: the temporary file goes either way
            self._writer.close()
        self._file.__exit__(exc_type, exc, tb)
