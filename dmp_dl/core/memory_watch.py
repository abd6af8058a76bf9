"""A line in the log before the system stops a run for want of memory.

When a process outgrows its memory (the host's, or its container's limit) the kernel kills it with
SIGKILL: no handler runs and nothing is printed, so the run's log just ends. :class:`MemoryWatch`
reads the memory this process can still take (:func:`~dmp_dl.core.free_memory.host_available_bytes`)
every :data:`INTERVAL_SECONDS` in a background thread and logs one warning when it falls below
:func:`warn_below` (the stage, what the process holds, what is left, what to do), so that a log
which ends there says why. It warns again only after memory has come back, at most
:data:`MAX_WARNINGS` times a run. A sudden allocation larger than what is left can still come
between two looks; the checks made before a stage allocates (the data stage's estimate, EASE's
guard) are for those.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from dmp_dl.core.free_memory import host_available_bytes

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 0.5
MIN_WARN_BYTES = 256 * 2**20  # warn below this much left, or below WARN_SHARE of what the process can reach
MAX_WARN_BYTES = 2**30
WARN_SHARE = 0.10
MAX_WARNINGS = 3
RUN_ADVICE = ("run where more memory is free (or with a larger container limit), or read less of the log "
              "(data.cleaning.min_timestamp / max_timestamp)")
SERVER_ADVICE = "give it more memory (a larger container limit), or serve a bundle of fewer users or items"


def process_rss_bytes() -> int:
    """This process's resident memory (``/proc/self/statm``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def warn_below(held: int, free: int) -> int:
    """The memory left (bytes) under which a run is close to being stopped: :data:`WARN_SHARE` of what
    the process can reach (``held`` + ``free``), at least :data:`MIN_WARN_BYTES` and at most :data:`MAX_WARN_BYTES`."""
    return int(min(max(WARN_SHARE * (held + free), MIN_WARN_BYTES), MAX_WARN_BYTES))


class MemoryWatch:
    """Watches the memory left to this process while a run's stages go on (module docstring).

    ``available`` and ``held`` (bytes; default: the host's and containers' free memory, this process's
    RSS) can be replaced for tests; :meth:`check` is one look. A ``with`` block runs the watch in a
    daemon thread for the block's duration; :attr:`stage` names what is running in the warning,
    ``subject`` what the system would stop (a run, a server) and ``advice`` what to do.
    """

    def __init__(self, available: Callable[[], int] | None = None, held: Callable[[], int] | None = None,
                 interval: float = INTERVAL_SECONDS, stage: str | None = None, subject: str = "run",
                 advice: str = RUN_ADVICE):
        self.available = available or host_available_bytes
        self.held = held or process_rss_bytes
        self.interval = interval
        self.stage = stage
        self.subject, self.advice = subject, advice
        self.warnings = 0
        self.peaks: dict[str | None, int] = {}  # stage -> the largest RSS a look saw during it (bytes)
        self._armed = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """One look: log the warning when memory is short and the watch is armed. Returns whether it warned."""
        free, held = self.available(), self.held()
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), held)
        limit = warn_below(held, free)
        if free >= 2 * limit:
            self._armed = True  # memory came back: a later shortage is news again
        if free >= limit or not self._armed or self.warnings >= MAX_WARNINGS:
            return False
        self._armed = False
        self.warnings += 1
        during = f" during the {self.stage} stage" if self.stage else ""
        log.warning("memory is nearly exhausted%s: %.0f MiB is left to this process, which holds %.1f GiB; if the "
                    "system stops the %s here, %s", during, free / 2**20, held / 2**30, self.subject, self.advice)
        return True

    def enter_stage(self, stage: str) -> None:
        """From now on the looks are ``stage``'s (its peak starts from what the process holds now)."""
        self.stage = stage
        self.peaks[stage] = max(self.peaks.get(stage, 0), self.held())

    def peak_gib(self, stage: str) -> float | None:
        """The largest RSS seen during ``stage`` (GiB, 3 decimals), or None when none was seen."""
        peak = self.peaks.get(stage)
        return None if peak is None else round(max(peak, self.held() if stage == self.stage else 0) / 2**30, 3)

    def _watch(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # a watch that cannot read memory must not end the run
                log.debug("memory watch stopped", exc_info=True)
                return
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "MemoryWatch":
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="dmp_dl-memory-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
