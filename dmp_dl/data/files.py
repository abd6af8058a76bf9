"""Reading event and attribute tables from CSV or Parquet files.

CSV is read with pyarrow with every column as a string, so that ids keep their exact spelling
and nothing is coerced silently; the cleaning step parses and counts. Rows with the wrong number
of fields are skipped and counted (``malformed_row``), never dropped silently.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dmp_dl.errors import ConfigError, DataError

CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".csv.bz2")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
SEPARATORS = (",", "\t", ";", "|")


@dataclass
class Table:
    """A raw table as read from disk.

    ``frame`` holds the readable rows (CSV: all columns as strings); ``malformed_rows`` counts
    rows skipped because their field count did not match the header.
    """

    frame: pd.DataFrame
    path: str
    malformed_rows: int = 0


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    raise DataError(
        f"{path}: unknown file type; use a .csv/.tsv (optionally .gz) or .parquet file"
    )


def _check_exists(path: Path, what: str, key: str) -> None:
    if not path.exists():
        raise DataError(f"{what} file not found: {path} (set {key} to an existing file)")
    if path.is_dir():
        raise DataError(f"{what} path is a directory, expected a file: {path} (set {key})")
    if not os.access(path, os.R_OK):
        raise DataError(f"{what} file is not readable: {path} (check its permissions)")


def _first_line(path: Path, encoding: str) -> str:
    opener = open
    if path.name.lower().endswith(".gz"):
        import gzip

        opener = gzip.open  # type: ignore[assignment]
    elif path.name.lower().endswith(".bz2"):
        import bz2

        opener = bz2.open  # type: ignore[assignment]
    try:
        with opener(path, "rb") as fh:
            raw = fh.readline()
    except (OSError, EOFError) as exc:  # e.g. a .gz file that is not gzip, or a truncated one
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc}); is the file complete and of its suffix's type?") from None
    try:
        return raw.decode(encoding).lstrip("\ufeff").rstrip("\r\n")
    except (UnicodeError, LookupError) as exc:
        raise DataError(
            f"{path}: the header line is not valid {encoding} ({exc}); "
            "set data.encoding (e.g. data.encoding=latin-1) to the file's encoding"
        ) from None


def sniff_separator(header: str) -> str:
    """The most frequent of ``, \\t ; |`` in the header line (``,`` if none occurs)."""
    counts = {sep: header.count(sep) for sep in SEPARATORS}
    best = max(counts, key=lambda s: counts[s])
    return best if counts[best] > 0 else ","


def read_table(
    path: str | os.PathLike,
    *,
    what: str,
    key: str,
    required: tuple[str, ...],
    sep: str = "auto",
    encoding: str = "utf-8",
    rename: dict[str, str] | None = None,
) -> Table:
    """Read a CSV or Parquet table and check it has the ``required`` columns.

    Parameters
    ----------
    path: the file.
    what: what the file holds, for messages ("events", "user attributes", ...).
    key: the config key that sets this path, for messages (e.g. ``data.path``).
    required: columns that must exist (after ``rename``).
    sep: CSV field separator, or ``"auto"`` to detect it from the header line.
    encoding: CSV text encoding.
    rename: map of canonical column name -> column name in the file.

    Raises
    ------
    DataError naming the file (and column) for a missing, unreadable, empty or malformed file.
    """
    path = Path(path)
    _check_exists(path, what, key)
    kind = _kind_of(path)
    if kind == "parquet":
        try:
            names = pq.read_schema(path).names
        except Exception as exc:  # pyarrow raises many types for corrupt files
            raise DataError(f"{path}: cannot read as Parquet ({type(exc).__name__}: {exc})") from None
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise DataError(f"{path}: duplicated column name(s) {dup}; rename or remove them")
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types for corrupt files
            raise DataError(f"{path}: cannot read as Parquet ({type(exc).__name__}: {exc})") from None
        table = Table(frame, str(path))
    else:
        table = _read_csv(path, sep=sep, encoding=encoding)
    frame = table.frame
    if rename:
        inverse = {file_col: canon for canon, file_col in rename.items() if file_col != canon}
        missing_src = [c for c in inverse if c not in frame.columns]
        if missing_src:
            raise DataError(
                f"{path}: column mapping names {missing_src} but the file has columns "
                f"{list(frame.columns)}; fix data.source.columns (canonical name -> your column name)"
            )
        frame = frame.rename(columns=inverse)
    dup = frame.columns[frame.columns.duplicated()].tolist()
    if dup:
        raise DataError(f"{path}: duplicated column name(s) {dup} in the header; rename or remove them")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        hint = ""
        if kind == "csv" and len(frame.columns) == 1:
            hint = f"; the header parsed as a single column {frame.columns[0]!r}: is data.sep right?"
        raise DataError(
            f"{path}: {what} file lacks required column {missing[0]!r} "
            f"(found columns: {list(frame.columns)}){hint}; if the file names it differently, map it with "
            f"data.source.columns={{{missing[0]}: YOUR_COLUMN}}"
        )
    table.frame = frame
    return table


def _read_csv(path: Path, *, sep: str, encoding: str) -> Table:
    header = _first_line(path, encoding)
    if not header.strip():
        raise DataError(f"{path}: the file is empty (no header line); expected a CSV header with column names")
    if sep == "auto":
        sep = sniff_separator(header)
    elif not isinstance(sep, str) or len(sep) != 1 or sep in "\r\n\"":
        raise ConfigError(f"data.sep must be one character other than a quote or a line break (or auto), got {sep!r}")
    names = [c.strip().strip("\"").strip() for c in header.split(sep)]
    seen: set[str] = set()
    dup = [c for c in names if c in seen or seen.add(c)]  # type: ignore[func-returns-value]
    if dup:
        raise DataError(f"{path}: duplicated column name(s) {sorted(set(dup))} in the header; rename or remove them")
    malformed = 0
    undecodable: list[BaseException] = []

    def skip_row(row: pacsv.InvalidRow) -> str:
        nonlocal malformed
        malformed += 1
        return "skip"

    def note_undecodable(unraisable) -> None:
        # pyarrow decodes a malformed row's text before calling skip_row; when that text is not
        # valid in the encoding the error cannot propagate, so it is caught here and reported below.
        if unraisable.object is skip_row and isinstance(unraisable.exc_value, UnicodeError):
            undecodable.append(unraisable.exc_value)
        else:
            previous_hook(unraisable)

    previous_hook, sys.unraisablehook = sys.unraisablehook, note_undecodable
    try:
        arrow = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(
                encoding=encoding, column_names=names, skip_rows=1, use_threads=True
            ),
            parse_options=pacsv.ParseOptions(delimiter=sep, invalid_row_handler=skip_row),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        msg = str(exc)
        if "UTF8" in msg or "utf8" in msg.lower() or undecodable:
            raise DataError(
                f"{path}: contains bytes that are not valid {encoding}; "
                "set data.encoding to the file's encoding (e.g. data.encoding=latin-1) or re-export it as UTF-8"
            ) from None
        raise DataError(f"{path}: cannot parse as CSV with separator {sep!r}: {msg}") from None
    except UnicodeError as exc:  # raised by the Python codec pyarrow transcodes non-UTF-8 files with
        raise DataError(f"{path}: cannot be read as {encoding} ({exc}); set data.encoding to the file's encoding") from None
    except (OSError, EOFError, LookupError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    finally:
        sys.unraisablehook = previous_hook
    frame = arrow.to_pandas(types_mapper=None)
    frame.columns = names
    frame = frame.astype(object)
    return Table(frame, str(path), malformed)
