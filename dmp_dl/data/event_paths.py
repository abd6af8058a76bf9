"""Which files an event path names: a file, a folder (read with its subfolders) or a glob pattern.

A folder or a glob may hold CSV files or Parquet files, not both. Names that start with ``.`` or
``_`` (``_SUCCESS``, ``.part-0.crc``, ``_temporary/``: the bookkeeping of Spark and Hadoop
writers) are skipped; a file without a known suffix is read as Parquet when it starts with the
Parquet magic bytes (Flink's ``part-...`` files), and any other file is left out with a warning.
Folders named ``key=value`` between the base folder and a file are hive partitions: ``key``
becomes a column of that file's rows.

Only the standard library is imported: the checks every command runs first use this module.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from dmp_dl.core.errors import DataError

log = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".tsv", ".txt")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
PARQUET_MAGIC = b"PAR1"
GLOB_CHARS = frozenset("*?[")
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # the folder name Spark and Hive give a null partition value


@dataclass
class EventFiles:
    """The files of one event path, in path order.

    kind: ``csv`` or ``parquet`` (every file is of that kind).
    base: the folder hive partitions are read below (None for a single file).
    """

    kind: str
    files: list[Path]
    base: Path | None = None
    skipped: list[Path] = field(default_factory=list)


def is_glob(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a glob pattern (``*``, ``?`` or ``[``) rather than a file that exists."""
    return any(c in GLOB_CHARS for c in str(path)) and not Path(path).exists()


def kind_by_name(path: Path) -> str | None:
    """``csv`` (compressed or not), ``parquet`` or None from the file's name alone."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return "csv" if name.endswith(CSV_SUFFIXES) else None


def file_kind(path: Path) -> str | None:
    """``csv``, ``parquet`` or None (not an event file) from the name, else the first bytes."""
    kind = kind_by_name(path)
    if kind is not None:
        return kind
    try:
        with open(path, "rb") as fh:
            return "parquet" if fh.read(4) == PARQUET_MAGIC else None
    except OSError:
        return None


def _hidden(part: str) -> bool:
    return part.startswith((".", "_"))


def glob_base(pattern: str) -> Path:
    """The folder of ``pattern`` above its first glob character (``logs/**/x.parquet`` -> ``logs``)."""
    parts = Path(pattern).parts
    head = [p for p in parts[: next(i for i, p in enumerate(parts) if any(c in GLOB_CHARS for c in p))]]
    return Path(*head) if head else Path(".")


def list_event_files(path: str | os.PathLike, key: str) -> EventFiles:
    """The files of a folder (with its subfolders) or a glob pattern (``**`` spans folders).

    Raises
    ------
    DataError naming ``key`` and the path: a pattern that matches no file, a folder without event
    files, a folder or pattern that mixes CSV and Parquet files.
    """
    text = str(path)
    if is_glob(text):
        base = glob_base(text)
        found = [Path(p) for p in glob.glob(text, recursive=True)]
        candidates = sorted(p for p in found if p.is_file() and not any(_hidden(s) for s in p.relative_to(base).parts)
                            ) if found else []
        if not candidates:
            raise DataError(f"{key}={text} matches no file; check the pattern (** spans folders, e.g. "
                            f"{base / '**' / '*.parquet'}) or set {key} to a file or folder")
    else:
        base = Path(path)
        candidates = sorted(p for p in base.rglob("*") if p.is_file()
                            and not any(_hidden(s) for s in p.relative_to(base).parts))
    kinds: dict[str, list[Path]] = {}
    skipped: list[Path] = []
    for p in candidates:
        kind = file_kind(p)
        (kinds.setdefault(kind, []) if kind else skipped).append(p)
    if "csv" in kinds and "parquet" in kinds:
        raise DataError(f"{key}={text} mixes CSV and Parquet files ({kinds['csv'][0]} and {kinds['parquet'][0]}); "
                        "keep one format in a folder (convert one, or point at one with a pattern such as "
                        f"{base / '**' / '*.parquet'})")
    if not kinds:
        what = "matches" if is_glob(text) else "is a directory with"
        raise DataError(f"{text} {what} no .csv or .parquet event files (set {key} to a file, a folder of event files, "
                        "a glob pattern such as logs/*.parquet or a journal folder)")
    if skipped:
        log.warning("%s: %d file(s) that are neither CSV nor Parquet are not read, e.g. %s", text, len(skipped), skipped[0])
    kind = next(iter(kinds))
    return EventFiles(kind, kinds[kind], base, skipped)


def partition_values(file: Path, base: Path) -> dict[str, str | None]:
    """The hive partition values of ``file`` below ``base``: ``{key: value}`` of each ``key=value``
    folder on the way (values URL-decoded as Hive writes them; its null folder as None)."""
    out: dict[str, str | None] = {}
    for part in file.relative_to(base).parts[:-1]:
        if "=" in part:
            name, value = part.split("=", 1)
            value = unquote(value)
            out[unquote(name)] = None if value == HIVE_NULL else value
    return out
