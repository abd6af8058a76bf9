"""Lists of user ids given by an operator: a file (``seeds=``, ``users=``, ``forget``'s
``user_ids=``) or a list on the command line (``seed_ids=[...]``).

A file is a text file with one id per line, or (by its suffix) a CSV/TSV/Parquet table with an id
column. Text is UTF-8 with or without a byte-order mark (UTF-16/32 with one), with Unix or Windows
line ends; blank lines and ``#`` comment lines are skipped. Every id goes through
:func:`dmp_dl.data.schema.normalize_ids`, the rule the training data's ids follow, so an id is
found whichever way the file spells it.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.core.io import regular_file_problem
from dmp_dl.data.files import resolve_encoding, sniff_separator
from dmp_dl.data.schema import normalize_ids

CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
log = logging.getLogger(__name__)

FILE_HINT = "give a UTF-8 text file with one user id per line, or a CSV/Parquet file with a user_id column"


def read_id_file(path: str | os.PathLike, key: str, column: str = "user_id", column_key: str | None = None,
                 tables: bool = True) -> list[str]:
    """The ids in ``path``, in the file's order (duplicates kept).

    key: the config key that named the file, for the messages; column: the id column of a table
    (a table of one column is read whatever its name, with a warning when that is not ``column``:
    its first line may have been an id); column_key: the key that sets ``column``; tables: False
    reads every file as text, one id per line, whatever its suffix (no line is taken for a header).
    Raises :class:`DataError` naming the file (and line or row) when it is missing, not a regular
    file, not text, lacks the column, has a row without an id, or holds no id at all.
    """
    path = Path(path)
    problem = regular_file_problem(path)
    if problem:  # a FIFO or device would block the read forever
        raise DataError(f"{key}: {path} {problem}; {FILE_HINT}")
    suffix = path.suffix.lower() if tables else ""
    try:
        if suffix in PARQUET_SUFFIXES:
            ids = _table_ids(_read_parquet(path), path, column, column_key, first_row=1)
        elif suffix in CSV_SUFFIXES:
            text = _text(path, key)
            table = pd.read_csv(io.StringIO(text), sep=sniff_separator(text.split("\n", 1)[0]), dtype=str,
                                keep_default_na=False) if text.strip() else pd.DataFrame()
            ids = _table_ids(table, path, column, column_key, first_row=2)  # row 1: the header
        else:
            lines = normalize_ids(pd.Series(_text(path, key).splitlines(), dtype=object))
            ids = lines[(lines != "") & ~lines.str.startswith("#")].tolist()
    except DataError:
        raise
    except (OSError, ValueError, ImportError) as exc:  # pandas' and pyarrow's parser errors are ValueErrors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{key}: cannot read {path} ({first}); {FILE_HINT}") from None
    if not ids:
        raise DataError(f"{key}: {path} holds no user ids; {FILE_HINT}")
    return ids


def ids_from_config(value: object, key: str) -> list[str]:
    """The ids of a command-line list (``seed_ids=[u000042,7777]``; one value is a list of one).

    Raises :class:`ConfigError` naming ``key`` for an empty list or an element that is not an id
    (null, blank, true/false, a list or mapping)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    example = f"e.g. {key}=[u000042,u000101]"
    if not values:
        raise ConfigError(f"{key} is empty; give at least one user id, {example}")
    for i, v in enumerate(values):
        if v is None or isinstance(v, (bool, list, tuple, Mapping)):
            raise ConfigError(f"{key}[{i}] must be a user id, got {v!r}; quote an id that reads as something "
                              f"else, {example}")
    ids = normalize_ids(pd.Series(values, dtype=object))
    blank = (ids == "").to_numpy().nonzero()[0]
    if len(blank):
        raise ConfigError(f"{key}[{blank[0]}] is blank; remove it or give the id, {example}")
    return ids.tolist()


def _text(path: Path, key: str) -> str:
    """The file's text: UTF-8 without its byte-order mark, or the UTF-16/32 a mark names."""
    data = path.read_bytes()
    encoding = resolve_encoding(data[:4], "utf-8", path)
    try:
        return data.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{key}: {path}, line {line} is not {encoding} text; save the file as UTF-8") from None


def _read_parquet(path: Path) -> pd.DataFrame:
    """The table, with ids stored as binary read as UTF-8 text (not as ``b'...'``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for i, field in enumerate(table.schema):
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(pa.string()))
    return table.to_pandas()


def _table_ids(table: pd.DataFrame, path: Path, column: str, column_key: str | None, first_row: int) -> list[str]:
    """The ids of ``table``'s ``column`` (or its only column); ``first_row``: the file's row number
    of the table's first row, for the messages."""
    if table.shape[1] == 0:
        return []
    if column in table.columns:
        values = table[column]
    elif table.shape[1] == 1:
        values = table.iloc[:, 0]
        log.warning("%s: the only column, %r, is read as the ids (its first line is taken as a header: if that "
                    "line is an id, add a header line %r)", path, values.name, column)
    else:
        fix = f"set {column_key}=NAME" if column_key else f"name the id column {column!r}"
        raise DataError(f"{path}: no {column!r} column (found {list(table.columns)}); rename the id column or {fix}")
    ids = normalize_ids(values)
    blank = (ids == "").to_numpy().nonzero()[0]
    if len(blank):
        raise DataError(f"{path}: row {blank[0] + first_row} has an empty {values.name!r}; remove the row or fill in the id")
    return ids.tolist()
