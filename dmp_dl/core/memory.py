"""Returning freed memory to the operating system between the stages of a run."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None on another C library."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc; a no-op elsewhere).

    glibc keeps freed blocks for reuse, and after large arrays are freed its dynamic mmap threshold
    rises, so the next arrays of a step come from the heap too: a data stage of tens of millions of
    events would otherwise carry several hundred MiB of freed temporaries into the model stage.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
