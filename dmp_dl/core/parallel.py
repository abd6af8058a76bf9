"""SciPy's sparse x sparse product over row blocks on a thread pool.

``x @ weights`` of two CSR matrices runs on one thread, and SciPy releases the GIL inside it, so a
batch of rows cut into one block per thread uses every core: scoring 335 users of 20 items against
50,000 x 50,000 weights with 671 a row takes 68 ms on one thread and 42 ms on two (the 2-core box;
``bench/cpu_steps.py``'s sparse scoring row).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp

MIN_BLOCK_PRODUCTS = 1 << 20  # multiply-adds below which a block is not worth a thread's hand-off

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    # keyed by process too: a forked child (a data-loader or server worker) inherits the parent's
    # pool without its threads, and work handed to it would wait forever
    key = (os.getpid(), threads)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dmp-product")
        return _pools[key]


def default_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def row_blocks(work_per_row: np.ndarray, parts: int) -> np.ndarray:
    """Bounds ``(parts + 1,)`` of at most ``parts`` contiguous row blocks with about equal total
    ``work_per_row`` ((B,) non-negative); empty blocks are dropped."""
    done = np.concatenate([[0], np.cumsum(work_per_row, dtype=np.float64)])
    targets = done[-1] * np.arange(1, parts) / parts
    inner = np.searchsorted(done, targets, side="left")
    return np.unique(np.concatenate([[0], inner, [len(work_per_row)]]))


def sparse_product_dense(x: sp.csr_matrix, weights: sp.csr_matrix, threads: int | None = None) -> np.ndarray:
    """``(x @ weights)`` as a dense float32 array (B, m) for CSR ``x`` (B, n) and ``weights`` (n, m).

    Row blocks of about equal work (the sum over a row's entries of the lengths of the weight rows
    they name) go to ``threads`` threads (default: the cores this process may use), each writing its
    own rows of the result; a product of fewer than ``threads x MIN_BLOCK_PRODUCTS`` multiply-adds runs
    on the calling thread.
    """
    x, weights = sp.csr_matrix(x), sp.csr_matrix(weights)
    out = np.zeros((x.shape[0], weights.shape[1]), dtype=np.float32)
    if x.nnz == 0:
        return out
    threads = max(1, threads or default_threads())
    done = np.concatenate([[0], np.cumsum(np.diff(weights.indptr)[x.indices], dtype=np.int64)])
    work = done[x.indptr[1:]] - done[x.indptr[:-1]]  # (B,) multiply-adds a row
    parts = int(min(threads, x.shape[0], max(1, work.sum() // MIN_BLOCK_PRODUCTS)))

    def fill(bounds: tuple[int, int]) -> None:
        a, b = bounds
        block = sp.csr_matrix(x[a:b] @ weights, dtype=np.float32)
        block.toarray(out=out[a:b])

    if parts <= 1:
        fill((0, x.shape[0]))
        return out
    bounds = row_blocks(work, parts)
    list(_pool(threads).map(fill, zip(bounds[:-1].tolist(), bounds[1:].tolist())))
    return out
