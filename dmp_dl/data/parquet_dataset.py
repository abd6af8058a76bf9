"""A Parquet event log read as one dataset (``pyarrow.dataset``): a file, the files of a folder and
its hive partitions (``date=2026-11-30/part-0.parquet``, ``year=2026/month=11/...``), or a glob.

* Projection: only the columns cleaning uses are read — the user, item, time, type, value and
  ``event_id`` columns, under the names ``data.source.columns`` maps them to. Partition values
  become columns (a partition may be the time, ``date=``, or the event type); one that is also a
  column of a file is refused, naming it.
* Predicate push-down: with a time window (``data.cleaning.min_timestamp``, and ``max_timestamp``
  when set), a typed time column (integer, float, timestamp or date) or a time partition is
  filtered while reading: whole partitions, files and row groups (by their statistics) outside the
  window are skipped. The rows left unread are counted as ``timestamp_out_of_range``, as cleaning
  would count them (a row that also lacks its user id is counted there, not as ``missing_user_id``);
  a text time column is read in full. When no row read has a time (every time lay outside the
  window, e.g. a placeholder 0 in every row) the log is read again in full, so that cleaning sees a
  constant time as "no times" as it does from a CSV.
* Files whose schemas differ: a column read with another type in some files is cast when that
  changes no value (integer widths; integers with floats, for ids only when the Parquet statistics
  show every integer fits a float exactly; integers with text as text, which cleaning parses as
  it parses CSV, and so floats with text outside id columns; timestamps and dates of any unit or
  zone), else refused naming both files.
* Threads: the scan reads files and columns with pyarrow's thread pool; the table becomes the
  pandas frame cleaning reads in one conversion (``self_destruct``: arrow memory is released
  column by column).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from dmp_dl.core.errors import DataError
from dmp_dl.core.free_memory import describe_available, host_available_bytes
from dmp_dl.core.memory import release_freed_memory
from dmp_dl.data.cleaning import parse_timestamps
from dmp_dl.data.event_paths import EventFiles, partition_values
from dmp_dl.data.files import decode_binary_ids
from dmp_dl.data.memory_check import PREPARE_BYTES_PER_EVENT, PREPARE_FIXED_BYTES, warn_when_tight
from dmp_dl.data.schema import EVENT_ID, ITEM, TIME, TYPE, USER, VALUE

log = logging.getLogger(__name__)

READ_COLUMNS = (USER, ITEM, TIME, TYPE, VALUE, EVENT_ID)  # what cleaning reads (canonical names)
CODED_COLUMNS = (USER, ITEM, TYPE)  # text columns read as codes into their distinct values (repeated per event)
CODED_ROWS = 1 << 22  # rows dictionary-encoded at a time: each block's dictionary holds its distinct ids once
ID_COLUMNS = (USER, ITEM, EVENT_ID)
EXACT_FLOAT_INT = 2**53
UNITS_PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class TimeWindow:
    """The event times cleaning keeps, in epoch seconds: ``lo <= t <= hi`` (``hi`` None: no upper
    bound is pushed down). ``unit``: of numeric time columns (``s`` or ``ms``)."""

    lo: float
    hi: float | None
    unit: str = "s"


@dataclass
class ParquetEvents:
    """Events read from a Parquet dataset.

    frame: the read rows, canonical column names.
    parts: (file, rows read, 0 malformed rows, rows left unread as out of the time window) per file.
    unread_columns: the files' other columns (and partitions), which cleaning does not use.
    """

    frame: pd.DataFrame
    parts: list[tuple[str, int, int, int]]
    unread_columns: list[str]


def _footer(path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except Exception as exc:  # pyarrow raises many types for corrupt files
        raise DataError(f"{path}: cannot read as Parquet ({type(exc).__name__}: {exc}); replace or remove the file "
                        "(is it complete?)") from None


def _footers(files: Sequence[Path]) -> list[pq.FileMetaData]:
    """The Parquet footer of each file (read in threads: one small read per file)."""
    if len(files) < 8:
        return [_footer(f) for f in files]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(_footer, files))


def _family(kind: pa.DataType) -> str:
    if pa.types.is_dictionary(kind):
        return _family(kind.value_type)
    for name, test in (("int", pa.types.is_integer), ("float", pa.types.is_floating), ("bool", pa.types.is_boolean),
                       ("text", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
                       ("time", lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t))):
        if test(kind):
            return name
    return str(kind)


def _int_fits_float(meta: pq.FileMetaData, column: str) -> bool:
    """Whether the statistics of every row group show the integer ``column`` within ±2**53."""
    index = meta.schema.to_arrow_schema().get_field_index(column)
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(index).statistics
        if stats is None or not stats.has_min_max:
            return False
        if abs(int(stats.min)) >= EXACT_FLOAT_INT or abs(int(stats.max)) >= EXACT_FLOAT_INT:
            return False
    return True


def _common_type(column: str, canonical: str, typed: list[tuple[Path, pa.DataType, pq.FileMetaData]]) -> pa.DataType:
    """The type ``column`` is read as when the files give it the types ``typed``; DataError naming
    two files when no type holds every value unchanged."""
    known = [(f, t, m) for f, t, m in typed if not pa.types.is_null(t)]
    if not known:
        return pa.null()
    kinds = {t for _, t, _ in known}
    if len(kinds) == 1:
        return known[0][1]
    families = {_family(t) for t in kinds}
    plain = {t.value_type if pa.types.is_dictionary(t) else t for t in kinds}
    is_id = canonical in ID_COLUMNS

    def refuse(reason: str) -> DataError:
        (fa, ta, _), (fb, tb, _) = known[0], next(x for x in known if _family(x[1]) != _family(known[0][1])
                                               or x[1] != known[0][1])
        return DataError(f"column {column!r} is {ta} in {fa} and {tb} in {fb}: {reason}; write it with one type in "
                         "every file (or move the odd file out of the folder)")

    if families == {"text"} or len(plain) == 1:
        return pa.large_string() if pa.large_string() in plain else next(iter(plain))
    if families == {"int"}:
        if pa.uint64() in plain:
            raise refuse("unsigned 64-bit integers do not all fit a signed 64-bit column")
        return pa.int64()
    if families == {"int", "float"}:
        if is_id and not all(_int_fits_float(m, column) for _, t, m in known if _family(t) == "int"):
            raise refuse("an id beyond 2**53 would change as a float")
        return pa.float64()
    if families <= {"int", "text"} or (families <= {"int", "float", "text"} and not is_id):
        return pa.large_string() if pa.large_string() in plain else pa.string()  # read as text, as from a CSV
    if families == {"time"}:
        stamps = [t for t in plain if pa.types.is_timestamp(t)]
        unit = max((t.unit for t in stamps), key=lambda u: UNITS_PER_SECOND[u], default="s")
        zones = {t.tz for t in stamps}
        return pa.timestamp(unit, tz=zones.pop() if len(zones) == 1 and len(stamps) == len(plain) else "UTC")
    if is_id and families <= {"int", "float", "text"}:
        raise refuse("float ids written as text would not match the same ids written as numbers")
    raise refuse(f"{' and '.join(sorted(families))} values cannot be read as one column without changing them")


def _partition_filter(name: str, fragments: list[ds.Fragment], window: TimeWindow) -> ds.Expression | None:
    """Keep the partitions of ``name`` whose value, parsed as cleaning parses times, lies in the
    window or does not parse (cleaning counts those); None when every partition is kept."""
    values = {ds.get_partition_keys(f.partition_expression).get(name) for f in fragments}
    values.discard(None)
    if not values:
        return None
    ordered = sorted(values, key=str)
    seconds = parse_timestamps(pd.Series(ordered, dtype=object), window.unit)
    with np.errstate(invalid="ignore"):
        outside = (seconds < window.lo) | ((seconds > window.hi) if window.hi is not None else False)
    if not outside.any():
        return None
    kept = [v for v, out in zip(ordered, outside) if not out]
    return ds.field(name).isin(kept) | ds.field(name).is_null()


def _bound(kind: pa.DataType, seconds: float, unit: str, below: bool) -> pa.Scalar | int | float | None:
    """``seconds`` in the units of a column of type ``kind``, widened by one unit outwards (``below``:
    a lower bound), so that the filter keeps every row cleaning keeps; None: not expressible."""
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        value = seconds * UNITS_PER_SECOND[unit]
        value = math.floor(value) - 1 if below else math.ceil(value) + 1
        return value if pa.types.is_floating(kind) or abs(value) <= INT64_MAX else None
    if pa.types.is_timestamp(kind):
        value = seconds * UNITS_PER_SECOND[kind.unit]
        value = math.floor(value) - 1 if below else math.ceil(value) + 1
        return pa.scalar(value, kind) if abs(value) <= INT64_MAX else None
    if pa.types.is_date32(kind):
        days = math.floor(seconds / 86400) - 1 if below else math.ceil(seconds / 86400) + 1
        return pa.scalar(days, pa.date32()) if abs(days) < 2**31 else None
    if pa.types.is_date64(kind):
        ms = math.floor(seconds * 1000) - 1 if below else math.ceil(seconds * 1000) + 1
        return pa.scalar(ms, pa.date64()) if abs(ms) <= INT64_MAX else None
    return None


def _column_filter(name: str, kind: pa.DataType, window: TimeWindow) -> ds.Expression | None:
    """Keep rows whose typed time ``name`` is in the window, null or NaN (cleaning counts those as
    ``bad_timestamp``); None for a text column (parsed only by cleaning)."""
    field = ds.field(name)
    outside = None
    for seconds, below in ((window.lo, True), (window.hi, False)):
        if seconds is None or not math.isfinite(seconds):
            continue
        bound = _bound(kind, seconds, window.unit, below)
        if bound is None:
            continue
        test = field < bound if below else field > bound
        outside = test if outside is None else outside | test
    return None if outside is None else field.is_null() | ~outside


def _file_columns(files: Sequence[Path], footers: Sequence[pq.FileMetaData]) -> list[pa.Schema]:
    schemas = []
    for f, meta in zip(files, footers):
        schema = meta.schema.to_arrow_schema()
        names = schema.names
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise DataError(f"{f}: duplicated column name(s) {dup}; rename or remove them")
        schemas.append(schema)
    return schemas


def read_parquet_events(found: EventFiles, *, key: str, rename: dict[str, str] | None = None,
                        required: Sequence[str] = (USER, ITEM), window: TimeWindow | None = None,
                        columns_key: str = "data.source.columns") -> ParquetEvents:
    """The events of Parquet files ``found`` (from :func:`dmp_dl.data.event_paths.list_event_files`,
    or one file), read as one dataset: see the module docstring.

    rename: canonical column name -> the files' name for it (``data.source.columns``).
    required: canonical columns every file (or a partition) must have.
    window: rows outside it are not read (counted in ``parts``).

    Raises
    ------
    DataError naming the file and the column: a corrupt file, a missing column, a partition folder
    that is also a column, a column whose types differ across files beyond a lossless cast.
    """
    rename = dict(rename or {})
    files = list(found.files)
    footers = _footers(files)
    schemas = _file_columns(files, footers)
    where = str(found.base) if found.base is not None else str(files[0])
    partition_names: list[str] = []  # partition values are read as text, as from a CSV log's folders
    if found.base is not None:
        for f in files:
            partition_names += [k for k in partition_values(f, found.base) if k not in partition_names]
    partitioning = ds.HivePartitioning(pa.schema([(k, pa.string()) for k in partition_names])) if partition_names else None
    for f, schema in zip(files, schemas):
        clash = [k for k in partition_names if k in schema.names]
        if clash:
            raise DataError(f"{f}: {clash[0]!r} is both a column of the file and a partition folder above it "
                            f"({clash[0]}=...); rename the folder or the column")
    seen: list[str] = []
    for schema in schemas:
        seen += [c for c in schema.names if c not in seen]
    seen += [c for c in partition_names if c not in seen]
    unknown = [col for canon, col in rename.items() if col != canon and col not in seen]
    if unknown:
        raise DataError(f"{where}: column mapping names {unknown} but the files have columns {seen}; fix {columns_key} "
                        "(canonical name -> your column name)")
    for canon in required:
        col = rename.get(canon, canon)
        if col in partition_names:
            continue
        lacking = next((f for f, schema in zip(files, schemas) if col not in schema.names), None)
        if lacking is not None:
            names = schemas[files.index(lacking)].names
            raise DataError(f"{lacking}: events file lacks required column {col!r} (found columns: {names}); if the "
                            f"file names it differently, map it with '{columns_key}={{{canon}: YOUR_COLUMN}}'")
    wanted = {canon: rename.get(canon, canon) for canon in READ_COLUMNS if rename.get(canon, canon) in seen}
    fields = []
    for canon, col in wanted.items():
        if col in partition_names:
            fields.append(pa.field(col, pa.string()))
            continue
        typed = [(f, schema.field(col).type, meta) for f, schema, meta in zip(files, schemas, footers) if col in schema.names]
        fields.append(pa.field(col, _common_type(col, canon, typed)))
    read_schema = pa.schema(fields)
    try:
        dataset = ds.dataset([str(f) for f in files], schema=read_schema, format="parquet", partitioning=partitioning,
                             partition_base_dir=str(found.base) if partitioning is not None else None)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{where}: cannot read as a Parquet dataset ({type(exc).__name__}: {exc})") from None
    time_filter = None
    if window is not None and TIME in wanted:
        col = wanted[TIME]
        time_filter = (_partition_filter(col, list(dataset.get_fragments()), window) if col in partition_names
                       else _column_filter(col, read_schema.field(col).type, window))
    totals = [meta.num_rows for meta in footers]
    check_fits_in_memory(dataset, sum(totals), time_filter, where)
    coded = [wanted[c] for c in CODED_COLUMNS if c in wanted]
    table, read = _scan(dataset, files, list(wanted.values()), time_filter, where, coded)
    if time_filter is not None and sum(read) < sum(totals) and not _has_a_time(table, wanted[TIME], window.unit):
        table, read = _scan(dataset, files, list(wanted.values()), None, where, coded)  # see the module docstring
    parts = [(str(f), int(r), 0, int(total - r)) for f, r, total in zip(files, read, totals)]
    # (a pandas index stored by one file does not describe the rows read)
    holder = [table.replace_schema_metadata(None)]
    del table
    frame = _to_frame(holder)
    _release_read_buffers()
    decode_binary_ids(frame, read_schema, Path(where), rename)
    frame.columns = list(wanted)  # canonical names, in the order of ``wanted``
    return ParquetEvents(frame, parts, [c for c in seen if c not in wanted.values()])


def check_fits_in_memory(dataset: ds.Dataset, rows: int, time_filter: ds.Expression | None, where: str) -> None:
    """Refuse, in one line before anything is read, a log whose preparation cannot fit in the memory
    this process may take (:func:`~dmp_dl.core.free_memory.host_available_bytes`): ``rows`` (the files' row count) times :data:`PREPARE_BYTES_PER_EVENT`; with a
    time window, the rows inside it (counted from partitions and row-group statistics) when the
    files' count does not fit. A log that fits only without the fixed part is read after a warning
    (:func:`~dmp_dl.data.memory_check.warn_when_tight`)."""
    free = host_available_bytes()
    if rows * PREPARE_BYTES_PER_EVENT + PREPARE_FIXED_BYTES <= free:
        return
    if time_filter is not None:
        try:
            rows = dataset.count_rows(filter=time_filter)
        except (pa.ArrowException, OSError):
            return  # the scan names the file that cannot be read
    need = rows * PREPARE_BYTES_PER_EVENT
    advice = ("read a time window (data.cleaning.min_timestamp / max_timestamp), point data.path at fewer "
              "partitions, or run where more memory is free")
    if need <= free:
        warn_when_tight(need, free, where, f"{rows:,} events", advice)
        return
    raise DataError(f"{where}: {rows:,} events to prepare need about {need / 2**30:.1f} GiB of memory "
                    f"({PREPARE_BYTES_PER_EVENT} bytes an event) and {describe_available(free)}; {advice}")


def _release_read_buffers() -> None:
    """Freed memory of the read back to the OS: the Parquet decoder's (pyarrow's default pool,
    which keeps freed pages for reuse: about 370 MiB after a 20M-event dataset) and the C heap's."""
    pa.default_memory_pool().release_unused()
    release_freed_memory()


def _to_frame(holder: list[pa.Table]) -> pd.DataFrame:
    """The table in ``holder`` (its only reference, taken out of it) as a DataFrame, converted
    one column at a time, each column's Arrow buffers released once converted: the peak is the
    frame plus one column, not the frame plus the table."""
    table = holder.pop()
    columns = {}
    for name in table.column_names:
        one = pa.table({name: table.column(name)})
        table = table.drop_columns([name])
        columns[name] = one.to_pandas(self_destruct=True, memory_pool=pa.system_memory_pool())[name]
        del one
    return pd.DataFrame(columns, copy=False)


def _has_a_time(table: pa.Table, column: str, unit: str) -> bool:
    """Whether some row read has a time (cleaning's parse), i.e. the window left rows with one."""
    return bool(np.isfinite(parse_timestamps(table.column(column).to_pandas(), unit)).any())


def _scan(dataset: ds.Dataset, files: list[Path], columns: list[str], time_filter: ds.Expression | None,
          where: str, coded: Sequence[str] = ()) -> tuple[pa.Table, list[int]]:
    """(the rows of ``columns`` that pass ``time_filter``, in file order; rows read per file).

    The text columns among ``coded`` are dictionary-encoded while reading, :data:`CODED_ROWS` rows
    at a time (pandas then holds them as categoricals): an id repeated by every event of its user
    is held as a 4-byte code, its text once per block instead of once per event."""
    index = {str(f): i for i, f in enumerate(files)}
    read = [0] * len(files)
    blocks: list[pa.Table] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    try:
        # The system allocator returns the buffers of files read ahead in parallel to the OS once
        # converted; pyarrow's default pool keeps them (about 50 MiB more peak memory at 1M events).
        scanner = dataset.scanner(columns=columns, filter=time_filter, use_threads=True, batch_readahead=4, fragment_readahead=2,
                                  memory_pool=pa.system_memory_pool())
        schema = scanner.projected_schema
        text = [c for c in coded if pa.types.is_string(schema.field(c).type) or pa.types.is_large_string(schema.field(c).type)]
        for tagged in scanner.scan_batches():  # in file order, read ahead in threads
            read[index[tagged.fragment.path]] += tagged.record_batch.num_rows
            pending.append(tagged.record_batch)
            pending_rows += tagged.record_batch.num_rows
            if text and pending_rows >= CODED_ROWS:
                blocks.append(_dictionary_encoded(pa.Table.from_batches(pending, schema=schema), text))
                pending.clear()
                pending_rows = 0
                _release_read_buffers()  # the block's text, not kept while the next is read
        if not text:
            return pa.Table.from_batches(pending, schema=schema), read
        if pending or not blocks:
            blocks.append(_dictionary_encoded(pa.Table.from_batches(pending, schema=schema), text))
        # each block keeps its own dictionaries: pandas unifies them column by column (_to_frame), so the
        # unified codes of all columns and the blocks' are never held at once
        table = pa.concat_tables(blocks, memory_pool=pa.system_memory_pool())
        blocks.clear()
        return table, read
    except (pa.ArrowException, OSError) as exc:
        pending.clear()
        blocks.clear()
        raise _culprit(dataset, columns, exc, where) from None


def _dictionary_encoded(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """``table`` with each of ``columns`` (text) dictionary-encoded as one array."""
    for name in columns:
        i = table.schema.get_field_index(name)
        encoded = pc.dictionary_encode(table.column(i).combine_chunks(memory_pool=pa.system_memory_pool()),
                                       memory_pool=pa.system_memory_pool())
        table = table.set_column(i, name, encoded)
    return table


def _culprit(dataset: ds.Dataset, columns: list[str], exc: Exception, where: str) -> DataError:
    """The error of the first file that fails on its own (a damaged page, a value that does not
    cast), naming it; else ``exc`` for the dataset ``where``."""
    for fragment in dataset.get_fragments():
        try:
            fragment.to_table(schema=dataset.schema, columns=columns)
        except (pa.ArrowException, OSError) as own:
            return DataError(f"{fragment.path}: cannot read as Parquet ({type(own).__name__}: {own}); replace or "
                             "remove the file (is it complete?)")
    return DataError(f"{where}: cannot read as a Parquet dataset ({type(exc).__name__}: {exc})")
