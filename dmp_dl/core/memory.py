"""How the C library's allocator hands memory back to the operating system during a run."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable, Iterator
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest mmap threshold glibc's own dynamic rule reaches on 64-bit
REUSED_BLOCK_BYTES = 256 * 2**20


@functools.cache
def _libc_function(name: str):
    """glibc's ``name`` (``malloc_trim``, ``mallopt``), or None on another C library."""
    path = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(path), name) if path else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc; a no-op elsewhere).

    glibc keeps freed blocks for reuse, and after large arrays are freed its dynamic mmap threshold
    rises, so the next arrays of a step come from the heap too: a data stage of tens of millions of
    events would otherwise carry several hundred MiB of freed temporaries into the model stage.
    """
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def reuse_freed_blocks(up_to_bytes: int = REUSED_BLOCK_BYTES) -> Iterator[bool]:
    """Inside, glibc serves blocks of up to ``up_to_bytes`` from its heap and keeps them there when
    freed, for the next block to reuse; yields whether that was set (False on another C library).

    glibc gives every block above its mmap threshold (at most 32 MiB) a mapping of its own and unmaps
    it when it is freed, so the next one is paged in afresh. The model stage allocates and frees
    blocks of a batch of users by the catalogue (20-80 MiB at 1,024 users x 20,000 items) at every
    training step and every scoring batch: paging them in was a quarter of an autoencoder step on
    the CPU. Larger arrays (EASE's dense matrix, a log's columns) still get mappings of their own,
    so freeing them still returns their memory at once. On the way out the old rule is back, what
    only reference cycles kept alive is collected (a stage's trainers, modules and closures refer to
    each other, and Python's full collection seldom runs while a stage allocates few Python objects:
    after the model stage of a 5M-event log they held 0.47 GiB of arrays) and the heap's free pages
    are handed back (:func:`release_freed_memory`).
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        yield False
        return
    mallopt(M_MMAP_THRESHOLD, int(up_to_bytes))
    mallopt(M_TRIM_THRESHOLD, int(up_to_bytes))
    try:
        yield True
    finally:
        mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
        mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_THRESHOLD_MAX)
        gc.collect()
        release_freed_memory()


def reusing_freed_blocks(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run inside :func:`reuse_freed_blocks`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with reuse_freed_blocks():
            return fn(*args, **kwargs)

    return wrapper
