"""Whether a log's preparation fits in the memory this process may take (free on the host, under its
container's limit and ``data.memory_limit_gb``), estimated before it is read,
so that a log too large stops with one line instead of the kernel killing the process part-way."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from dmp_dl.core.errors import DataError
from dmp_dl.core.free_memory import bounded_by_budget, describe_available, host_available_bytes
from dmp_dl.data.event_paths import COMPRESSION_SUFFIXES, kind_by_name

# the data stage's memory for each event it prepares: its peak grew by 78 bytes an event from 20M
# to 50M events of the generator's hive dataset (bench/RESULTS.md, "Data stage at scale"); the
# estimate leaves out the fixed part, so a log is refused only when it cannot fit
PREPARE_BYTES_PER_EVENT = 78
# what a preparation of any size takes besides: its peaks at 5M, 20M and 50M events lie on a line of
# about 80 bytes an event that starts about 0.4 GiB above the process's memory before it; a log whose
# estimate fits but not with this is warned about (the system may stop the run part-way)
PREPARE_FIXED_BYTES = 400 * 2**20
CSV_SAMPLE_BYTES = 1 << 16  # the head of a CSV whose line breaks estimate its rows

log = logging.getLogger(__name__)


def warn_when_tight(need: int, free: int, where: str | Path, what: str, advice: str) -> None:
    """Warn when ``need`` bytes (a floor: :data:`PREPARE_BYTES_PER_EVENT`) fit in ``free`` but
    ``need`` plus :data:`PREPARE_FIXED_BYTES` do not: the preparation may pass its peak there, and
    the line is then what explains a run the system stops part-way. Not when ``free`` is the
    user's own ``data.memory_limit_gb`` (a plan, not what the machine has)."""
    likely = need + PREPARE_FIXED_BYTES
    if likely <= free or bounded_by_budget(free):
        return
    log.warning("%s: %s need %.1f-%.1f GiB of memory to prepare and %s: the system may stop the run part-way; %s",
                where, what, need / 2**30, likely / 2**30, describe_available(free), advice)


def csv_rows_estimate(path: Path) -> int:
    """Rows of the plain-text CSV ``path`` (header left out), from its size and the line breaks in
    its first :data:`CSV_SAMPLE_BYTES` bytes (exact when the file is no longer than that)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(CSV_SAMPLE_BYTES)
    breaks = head.count(b"\n")
    if len(head) >= size:  # the whole file: its rows are its line breaks (the last line may lack one)
        return max(breaks + (0 if head.endswith(b"\n") else 1) - 1, 0)
    return int(size * breaks / max(len(head), 1))


def check_csv_events_fit(files: Sequence[Path], where: str | Path) -> None:
    """Refuse, in one line before any is read, CSV event files whose preparation cannot fit in the
    memory this process may take (:func:`~dmp_dl.core.free_memory.host_available_bytes`): their rows times :data:`PREPARE_BYTES_PER_EVENT` plus their text,
    which is held as read (Arrow strings) while the events are prepared (the generator's log written
    as CSV, 53 bytes a row: the data stage's peak grew by 134 bytes an event from 1M to 5M events,
    bench/RESULTS.md). Compressed files are left out (their size says little of their text's), and
    so is a file that cannot be read (the read names what is wrong with it). Files that fit only
    without the fixed part are read after a warning (:func:`warn_when_tight`)."""
    try:
        plain = [Path(f) for f in files if kind_by_name(Path(f)) == "csv" and Path(f).is_file()
                 and not Path(f).name.lower().endswith(COMPRESSION_SUFFIXES)]
        text = sum(f.stat().st_size for f in plain)
        free = host_available_bytes()
        if text * (PREPARE_BYTES_PER_EVENT // 2 + 1) + PREPARE_FIXED_BYTES <= free:  # fits even at two bytes a row
            return
        rows = sum(csv_rows_estimate(f) for f in plain)
    except OSError:
        return
    need = rows * PREPARE_BYTES_PER_EVENT + text
    what = f"about {rows:,} events in {text / 2**30:.1f} GiB of CSV"
    advice = ("write the log as Parquet (a folder of partitions) and read a time window (data.cleaning.min_timestamp "
              "/ max_timestamp), point data.path at fewer files, or run where more memory is free")
    if need <= free:
        warn_when_tight(need, free, where, what, advice)
        return
    raise DataError(f"{where}: {what} need about {need / 2**30:.1f} GiB of memory to prepare and "
                    f"{describe_available(free)}; {advice}")
