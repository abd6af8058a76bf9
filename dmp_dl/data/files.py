"""Reading event and attribute tables from CSV or Parquet files.

CSV is read with pyarrow with every column as a string, so that ids keep their exact spelling
and nothing is coerced silently; the cleaning step parses and counts. Rows with the wrong number
of fields are skipped and counted (``malformed_row``), never dropped silently.

A compressed CSV (gzip, bz2, zstd) is recognised by its first bytes, whatever its name says
(``events.CSV.GZ``, or gzip data named ``.csv``); a UTF-16 or UTF-32 file by its byte-order mark
(or ``data.source.encoding=utf-16``). Only regular files are read: a named pipe or a device is
refused instead of blocking forever.
"""

from __future__ import annotations

import codecs
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.core.io import regular_file_problem
from dmp_dl.data.event_paths import kind_by_name
from dmp_dl.data.schema import ITEM, USER

SEPARATORS = (",", "\t", ";", "|")
# first bytes -> pyarrow codec name
MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\x28\xb5\x2f\xfd", "zstd"))
UNREAD_ARCHIVES = ((b"\xfd7zXZ\x00", "an xz"), (b"PK\x03\x04", "a zip"), (b"7z\xbc\xaf\x27\x1c", "a 7z"))
# byte-order marks of the encodings that are not ASCII-compatible (UTF-32 first: its LE mark starts like UTF-16's)
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"))
ENCODING_KEY = "data.source.encoding"


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
    kind = kind_by_name(path)
    if kind is not None:
        return kind
    hint = ""
    if path.name in ("ratings.dat", "u.data", "movies.dat", "users.dat", "u.item", "u.user"):
        hint = f" (a MovieLens file: read its folder with data=movielens data.path={path.parent})"
    raise DataError(
        f"{path}: unknown file type; use a .csv/.tsv (optionally .gz, .bz2 or .zst) or .parquet file{hint}"
    )


def _check_exists(path: Path, what: str, key: str) -> None:
    if not path.exists():
        raise DataError(f"{what} file not found: {path} (set {key} to an existing file)")
    if path.is_dir():
        raise DataError(f"{what} path is a directory, expected a file: {path} (set {key})")
    problem = regular_file_problem(path)
    if problem:
        raise DataError(f"{what} file {path} {problem} (set {key})")
    if not os.access(path, os.R_OK):
        raise DataError(f"{what} file is not readable: {path} (check its permissions)")


def compression_of(path: Path) -> str | None:
    """The pyarrow codec of ``path`` from its first bytes (``gzip``, ``bz2``, ``zstd``), or None."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    archive = next((kind for magic, kind in UNREAD_ARCHIVES if head.startswith(magic)), None)
    if archive:
        raise DataError(f"{path}: is {archive} archive, which is not read; extract the CSV (or compress it with "
                        "gzip, bz2 or zstd)")
    return next((codec for magic, codec in MAGIC if head.startswith(magic)), None)


def _head(path: Path, compression: str | None, size: int = 1 << 16) -> bytes:
    """The first ``size`` bytes of the file's (decompressed) text."""
    try:
        with pa.input_stream(str(path), compression=compression) as fh:
            return fh.read(size)
    except (OSError, EOFError, pa.ArrowException) as exc:  # a truncated or damaged archive
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc}); is the file complete?") from None


def resolve_encoding(head: bytes, encoding: str, path: Path) -> str:
    """``encoding``, or the UTF-16/32 codec a byte-order mark names when the default UTF-8 was given."""
    try:
        name = codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise DataError(f"{path}: unknown text encoding {encoding!r}; set {ENCODING_KEY} to one Python knows "
                        "(utf-8, latin-1, utf-16, ...)") from None
    if name == "utf-8":
        return next((codec for bom, codec in BOMS if head.startswith(bom)), encoding)
    return encoding


def _first_line(head: bytes, encoding: str, path: Path) -> str:
    """The header line of ``head`` (the file's first bytes) decoded with ``encoding``."""
    try:
        text = codecs.getincrementaldecoder(encoding)(errors="replace").decode(head, final=len(head) < (1 << 16))
    except UnicodeError:  # e.g. utf-16 without a byte-order mark
        text = "\ufffd"
    line = text.split("\n", 1)[0].lstrip("\ufeff").rstrip("\r")
    if "\ufffd" in line:
        raise DataError(
            f"{path}: the header line is not valid {encoding}; "
            f"set {ENCODING_KEY} (e.g. {ENCODING_KEY}=latin-1) to the file's encoding"
        )
    return line


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
    columns_key: str = "data.source.columns",
    sep_key: str = "data.source.sep",
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
    columns_key, sep_key: the settings that give ``rename`` and ``sep``, named in messages.

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
        decode_binary_ids(frame, pq.read_schema(path), path, rename or {})
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
                f"{list(frame.columns)}; fix {columns_key} (canonical name -> your column name)"
            )
        frame = frame.rename(columns=inverse)
    dup = frame.columns[frame.columns.duplicated()].tolist()
    if dup:
        raise DataError(f"{path}: duplicated column name(s) {dup} in the header; rename or remove them")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        hint = ""
        if kind == "csv" and any("\x00" in str(c) for c in frame.columns):
            hint = (f"; the header holds NUL bytes: a UTF-16/32 file without a byte-order mark? set {ENCODING_KEY} "
                    f"(e.g. {ENCODING_KEY}=utf-16-le)")
        elif kind == "csv" and len(frame.columns) == 1:
            hint = f"; the header parsed as a single column {frame.columns[0]!r}: is {sep_key} right?"
        raise DataError(
            f"{path}: {what} file lacks required column {missing[0]!r} "
            f"(found columns: {list(frame.columns)}){hint}; if the file names it differently, map it with "
            f"'{columns_key}={{{missing[0]}: YOUR_COLUMN}}'"
        )
    table.frame = frame
    return table


def decode_binary_ids(frame: pd.DataFrame, schema: pa.Schema, path: Path, rename: dict[str, str]) -> None:
    """Id columns stored as Parquet ``binary`` become text (UTF-8), not ``"b'u0'"``; bytes that are
    not UTF-8 are refused naming the column and row."""
    for canonical in (USER, ITEM):
        column = rename.get(canonical, canonical)
        if column not in frame.columns or schema.get_field_index(column) < 0:
            continue
        kind = schema.field(column).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)):
            continue
        values = frame[column].tolist()
        for row, value in enumerate(values):
            if isinstance(value, (bytes, bytearray)):
                try:
                    values[row] = bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}: column {column!r} is binary and row {row + 1} is not UTF-8 text "
                                    f"({bytes(value)[:20]!r}); write the ids as strings or integers") from None
        frame[column] = pd.Series(values, index=frame.index, dtype=object)


def _read_csv(path: Path, *, sep: str, encoding: str) -> Table:
    compression = compression_of(path)
    head = _head(path, compression)
    encoding = resolve_encoding(head, encoding, path)
    header = _first_line(head, encoding, path)
    if not header.strip():
        raise DataError(f"{path}: the file is empty (no header line); expected a CSV header with column names")
    if sep == "auto":
        sep = sniff_separator(header)
    elif not isinstance(sep, str) or len(sep) != 1 or sep in "\r\n\"":
        raise ConfigError(f"data.source.sep must be one character other than a quote or a line break (or auto), got {sep!r}")
    names = [c.strip().strip("\"").strip() for c in header.split(sep)]
    seen: set[str] = set()
    dup = [c for c in names if c in seen or seen.add(c)]  # type: ignore[func-returns-value]
    if dup:
        raise DataError(f"{path}: duplicated column name(s) {sorted(set(dup))} in the header; rename or remove them")
    if len(head) < (1 << 16) and b"\n" not in head.rstrip(b"\r\n\0"):  # the header is all there is
        return Table(pd.DataFrame({n: pd.Series([], dtype=object) for n in names}), str(path), 0)
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
        with pa.input_stream(str(path), compression=compression) as source:
            arrow = pacsv.read_csv(
                source,
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
                f"{path}: contains bytes that are not valid {encoding}; set {ENCODING_KEY} to the file's "
                f"encoding (e.g. {ENCODING_KEY}=latin-1) or re-export it as UTF-8"
            ) from None
        raise DataError(f"{path}: cannot parse as CSV with separator {sep!r}: {msg}") from None
    except UnicodeError as exc:  # raised by the Python codec pyarrow transcodes non-UTF-8 files with
        raise DataError(f"{path}: cannot be read as {encoding} ({exc}); set {ENCODING_KEY} to the file's encoding") from None
    except (OSError, EOFError, LookupError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    finally:
        sys.unraisablehook = previous_hook
    frame = arrow.to_pandas(types_mapper=None)  # text columns stay arrow-backed (pandas' str), as from Parquet
    frame.columns = names
    return Table(frame, str(path), malformed)
