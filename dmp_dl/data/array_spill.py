"""Arrays and CSR matrices held on disk, read through memory maps, while a step that needs the memory
more runs (EASE's dense fit on the CPU).

:func:`arrays_on_disk` writes each named NumPy array, and each CSR matrix's ``data``, ``indices`` and
``indptr``, as a ``.npy`` file in a fresh temporary folder (:class:`~dmp_dl.core.scratch.ScratchFolder`:
one a killed run left is removed by the next) and puts a read-only memory map of the file
in its place: on the owner's attribute for an array, inside the matrix object itself for a CSR matrix
(so every holder of that matrix reads the map). The pages of a map belong to its file: a step that
does not read them never loads them, and under memory pressure the kernel drops them instead of
killing the process. When the block ends each is read back into memory and the folder is removed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from dmp_dl.core.memory import release_freed_memory
from dmp_dl.core.scratch import ScratchFolder

log = logging.getLogger(__name__)
CSR_PARTS = ("data", "indices", "indptr")


def _mapped(folder: Path, name: str, values: np.ndarray) -> np.ndarray:
    path = folder / f"{name}.npy"
    np.save(path, np.ascontiguousarray(values), allow_pickle=False)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _nbytes(value: np.ndarray | sp.csr_matrix) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else sum(getattr(value, p).nbytes for p in CSR_PARTS)


@contextlib.contextmanager
def arrays_on_disk(owner: object, names: Iterable[str], directory: str | Path | None = None,
                   keep: Collection[object] = (), read_back: bool = True, min_bytes: int = 0,
                   during: str = "during this step") -> Iterator[int]:
    """While the block runs, ``owner``'s attributes ``names`` that hold a NumPy array or a CSR matrix
    (not those that are one of ``keep``, compared by identity) are memory maps of files in a
    temporary folder under ``directory`` (default ``TMPDIR``); yields the bytes written. Attributes
    naming the same object share one file. When the block ends, each map still in place is replaced
    by its values read back into memory (an attribute given a new value inside the block keeps it);
    with ``read_back=False`` the maps stay (a map outlives its file's removal: the pages are freed
    with the last reference), for arrays no later step is expected to read. Nothing is written when
    the arrays take less than ``min_bytes``, and a disk that refuses leaves everything in memory
    (one warning); both yield 0. ``during`` ends the log line."""
    kept = {id(k) for k in keep}
    wanted = [(n, getattr(owner, n, None)) for n in names]
    wanted = [(n, v) for n, v in wanted if id(v) not in kept
              and ((isinstance(v, np.ndarray) and v.size > 0) or (sp.isspmatrix_csr(v) and v.nnz > 0))]
    if not wanted or sum(_nbytes(v) for v in {id(v): v for _, v in wanted}.values()) < min_bytes:
        yield 0
        return
    try:
        scratch = ScratchFolder("arrays", directory)
    except OSError as e:
        log.warning("the prepared arrays stay in memory during this step (a folder in %s: %s)",
                    directory or "the temporary folder", e)
        yield 0
        return
    folder = scratch.path
    arrays: dict[str, np.ndarray] = {}  # attribute -> the map of its array
    matrices: dict[int, tuple[sp.csr_matrix, dict[str, np.ndarray]]] = {}  # id -> (matrix, part -> map)
    by_id: dict[int, np.ndarray] = {}  # one map per array, however many attributes name it
    written = 0
    try:
        for name, value in wanted:
            if isinstance(value, np.ndarray):
                if id(value) not in by_id:
                    by_id[id(value)] = _mapped(folder, name, value)
                    written += value.nbytes
                arrays[name] = by_id[id(value)]
            elif id(value) not in matrices:
                maps = {part: _mapped(folder, f"{name}.{part}", getattr(value, part)) for part in CSR_PARTS}
                matrices[id(value)] = (value, maps)
                written += sum(m.nbytes for m in maps.values())
    except OSError as e:
        scratch.remove()
        log.warning("the prepared arrays stay in memory during this step (writing them to %s failed: %s)", folder, e)
        yield 0
        return
    except BaseException:  # e.g. SIGTERM raised as Terminated (dmp_dl.core.io.signals_raise)
        scratch.remove()
        raise
    for name, mapped in arrays.items():
        setattr(owner, name, mapped)
    for matrix, maps in matrices.values():
        for part, mapped in maps.items():
            setattr(matrix, part, mapped)
    del wanted, by_id, value  # the last references to the arrays now on disk (the loop's variable too)
    release_freed_memory()
    log.info("%.0f MiB of prepared arrays are on disk (%s) %s", written / 2**20, folder, during)
    try:
        yield written
    finally:
        try:
            if read_back:
                _read_back(owner, arrays, matrices)
        finally:
            scratch.remove()


def _read_back(owner: object, arrays: dict[str, np.ndarray], matrices: dict) -> None:
    """Each map :func:`arrays_on_disk` put in place and still there replaced by its values in memory."""
    restored: dict[int, np.ndarray] = {}  # attributes that shared an array share its copy
    for name, mapped in arrays.items():
        if getattr(owner, name, None) is mapped:
            if id(mapped) not in restored:
                restored[id(mapped)] = np.array(mapped)
            setattr(owner, name, restored[id(mapped)])
    for matrix, maps in matrices.values():
        for part, mapped in maps.items():
            if getattr(matrix, part) is mapped:
                setattr(matrix, part, np.array(mapped))
