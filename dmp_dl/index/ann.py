"""FAISS indexes over user / item vectors: building, search parameters, quality and speed.

Every index is made by ``faiss.index_factory`` from a factory string with the inner-product
metric (the models score a (user, item) pair by the dot product of their vectors), and its search
parameters (``nprobe=32``, ``efSearch=128`` ...) are set through ``faiss.ParameterSpace``. The
``auto`` choice uses exact search (``Flat``) below ``exact_below`` vectors and the approximate
factory above.

Defaults, chosen so that top-10 well under 2 ms at recall@10 >= 0.95 is reachable at 1M items
(``bench/serve.py``; numbers in ``bench/RESULTS.md``):

* ``HNSW32`` with ``efSearch=256``: 32 links per node is the usual choice for 32-128 dimensional
  embeddings. efSearch (the candidate list per query) trades recall for time roughly linearly:
  on the bench's deliberately hard synthetic vectors at 100k items, 128 gave recall@10 0.94,
  256 gave 0.977 at ~0.6 ms per single-threaded query, 512 gave 0.994 at ~1.4 ms. No training.
* ``IVF{nlist},Flat`` with nlist ~ 4*sqrt(n) (4000 at 1M) and ``nprobe=64``: scans ~1.6% of the
  catalogue per query. Smallest and quickest to build; recall depends more on how clustered the
  vectors are (0.93 at 100k on the same vectors; nprobe=128 gave 0.965).
"""

from __future__ import annotations

import logging
import math
import mmap
import time
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from dmp_dl.core.errors import ConfigError

log = logging.getLogger(__name__)

METRIC = "inner_product"
EXACT_FACTORY = "Flat"
BLOCK_ROWS = 1 << 17  # vectors a step when an index is filled or searched exactly: 100 MiB at dim 200


@dataclass
class IndexOptions:
    """How to index a set of vectors (config group ``index``).

    factory: ``auto`` or a ``faiss.index_factory`` string, e.g. ``Flat``, ``HNSW32``,
        ``IVF{nlist},Flat`` (``{nlist}`` is filled in from ``nlist``).
    search_params: ``faiss.ParameterSpace`` string for the approximate index, e.g.
        ``efSearch=256`` or ``nprobe=64`` (ignored for exact search).
    exact_below: ``auto`` uses exact search for fewer vectors than this.
    approximate: the factory ``auto`` uses at or above ``exact_below``.
    nlist: IVF lists; null: about 4*sqrt(n), at most n/39 (FAISS wants >= 39 training points per list).
    train_size: at most this many vectors (a seeded sample) train an index that needs training.
    eval_queries: queries sampled to measure recall@10 against exact search and queries/s.
    seed: sampling seed.
    """

    factory: str = "auto"
    search_params: str = "efSearch=256"
    exact_below: int = 50_000
    approximate: str = "HNSW32"
    nlist: int | None = None
    train_size: int = 200_000
    eval_queries: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.exact_below < 0:
            raise ConfigError(f"index.exact_below must be >= 0, got {self.exact_below}")
        if self.eval_queries < 1:
            raise ConfigError(f"index.eval_queries must be >= 1, got {self.eval_queries}")
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError(f"index.nlist must be >= 1 or null, got {self.nlist}")

    def resolve(self, n: int) -> tuple[str, str]:
        """(factory string, search-parameter string) for ``n`` vectors."""
        factory = self.factory
        if factory == "auto":
            factory = EXACT_FACTORY if n < self.exact_below else self.approximate
        if "{nlist}" in factory:
            factory = factory.replace("{nlist}", str(self.nlist or default_nlist(n)))
        params = "" if is_exact(factory) else (self.search_params or "")
        return factory, params


def default_nlist(n: int) -> int:
    """IVF list count for ``n`` vectors: ~4*sqrt(n), and at least 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(max(n, 1))), n // 39))


def is_exact(factory: str) -> bool:
    return factory.strip() in ("Flat", "IDMap,Flat")


def set_search_params(index: faiss.Index, params: str) -> None:
    """Apply a ``ParameterSpace`` string such as ``efSearch=128`` or ``nprobe=16,efSearch=64``."""
    if not params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as exc:
        msg = str(exc).splitlines()[-1].split(":")[-1].strip()
        raise ConfigError(f"index.search_params={params!r} does not apply to this index ({msg})") from None


def vector_blocks(vectors: np.ndarray, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, (<= rows, dim) float32 C-contiguous block) over ``vectors`` (n, dim), in order
    (``rows``: default :data:`BLOCK_ROWS`).

    A memory-mapped array (a bundle's vector file) is read a block at a time and its pages are
    handed back after each block: read whole, the file's pages stay mapped into the process beside
    the index's own copy of the vectors (1.6 GiB each for 2M users at dim 201).
    """
    rows = int(rows or BLOCK_ROWS)
    for start in range(0, len(vectors), rows):
        yield start, np.ascontiguousarray(vectors[start:start + rows], dtype=np.float32)
        release_mapped_pages(vectors)


def release_mapped_pages(vectors: np.ndarray) -> None:
    """Unmap the resident pages of a memory-mapped, read-only ``vectors`` from this process (they
    stay in the page cache and are read again on the next access); a no-op for other arrays."""
    mapping = getattr(vectors, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED") and not vectors.flags.writeable:
        mapping.madvise(mmap.MADV_DONTNEED)


def build_index(vectors: np.ndarray, factory: str, search_params: str = "", train_size: int = 200_000,
                seed: int = 0) -> faiss.Index:
    """An inner-product index over ``vectors`` (n, dim) float32; row i gets id i. The vectors are
    added :func:`a block at a time <vector_blocks>`."""
    n, dim = vectors.shape
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        msg = str(exc).splitlines()[-1].split(":")[-1].strip()
        raise ConfigError(f"index.factory={factory!r} is not a valid faiss index_factory string ({msg})") from None
    if not index.is_trained:
        if n == 0:
            raise ConfigError(f"index {factory!r} needs training vectors but there are none")
        rows = np.arange(n)
        if n > train_size:
            rows = np.sort(np.random.default_rng(seed).choice(n, train_size, replace=False))
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
        release_mapped_pages(vectors)
    for _, block in vector_blocks(vectors):
        index.add(block)
    set_search_params(index, search_params)
    return index


def exact_top_k(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` ids (B, k) of ``queries`` (B, dim) by inner product with ``database`` (n, dim),
    best first, ties to the lower id; -1 where n < k. The database is read :func:`a block at a time
    <vector_blocks>` and never copied whole."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.full((len(queries), k), -1, np.int64)
    for start, block in vector_blocks(database):
        scores, ids = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        ids = np.where(ids >= 0, ids + start, -1)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
    return best_ids


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / |exact| for (B, k) id arrays (-1 entries never match)."""
    if len(exact) == 0:
        return float("nan")
    k = exact.shape[1]
    hits = (found[:, :, None] == exact[:, None, :]) & (exact[:, None, :] >= 0)
    return float(hits.any(axis=1).sum() / (len(exact) * k))


def measure_index(index: faiss.Index, database: np.ndarray, queries: np.ndarray, k: int = 10,
                  latency_queries: int = 200) -> dict:
    """Recall@k of ``index`` against exact search on ``queries`` (B, dim), and its speed.

    Returns ``recall@k``, ``qps_batch`` (all queries in one call), and single-query latency
    ``latency_ms_p50`` / ``latency_ms_p99`` over the first ``latency_queries`` queries.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, index.ntotal)
    if k == 0 or len(queries) == 0:
        return {"k": k, "queries": 0}
    exact = exact_top_k(database, queries, k)
    t0 = time.perf_counter()
    found = index.search(queries, k)[1]
    batch_seconds = time.perf_counter() - t0
    single = []
    for q in queries[:latency_queries]:
        t = time.perf_counter()
        index.search(q[None], k)
        single.append(time.perf_counter() - t)
    single_ms = np.asarray(single) * 1e3
    return {
        "k": int(k),
        "queries": int(len(queries)),
        f"recall@{k}": recall_at_k(found, exact),
        "qps_batch": float(len(queries) / batch_seconds) if batch_seconds > 0 else None,
        "latency_ms_p50": float(np.percentile(single_ms, 50)),
        "latency_ms_p99": float(np.percentile(single_ms, 99)),
    }


def build_and_measure(vectors: np.ndarray, queries: np.ndarray, options: IndexOptions, name: str) -> tuple[faiss.Index, dict]:
    """Build the index ``options`` choose for ``vectors`` and measure it on a sample of ``queries``.

    Returns the index and a JSON-safe description (factory, search params, size, build time,
    recall@10 against exact search, speed) for the bundle manifest.
    """
    n = len(vectors)
    factory, params = options.resolve(n)
    t0 = time.perf_counter()
    index = build_index(vectors, factory, params, options.train_size, options.seed)
    build_seconds = time.perf_counter() - t0
    if len(queries) > options.eval_queries:
        rows = np.random.default_rng(options.seed).choice(len(queries), options.eval_queries, replace=False)
        queries = queries[np.sort(rows)]
    quality = measure_index(index, vectors, queries)
    info = {"factory": factory, "search_params": params, "metric": METRIC, "ntotal": int(index.ntotal),
            "exact": is_exact(factory), "build_seconds": build_seconds, **quality}
    log.info("%s index %s (%s): %d vectors, recall@10=%s, %.0f queries/s", name, factory, params or "-", n,
             quality.get("recall@10"), quality.get("qps_batch") or 0)
    return index, info


def search_excluding(index: faiss.Index, database: np.ndarray, queries: np.ndarray, k: int,
                     exclude_indptr: np.ndarray | None = None, exclude_ids: np.ndarray | None = None,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of ``index`` for each query, skipping each query's excluded ids.

    Exclusion is exact even with an approximate index: the search over-fetches ``k`` plus the
    largest exclusion count in the batch, drops the excluded ids, and any query left with fewer
    than ``k`` results while more candidates exist (possible with ANN) is answered by exact
    search over ``database``.

    Parameters
    ----------
    index: built over ``database`` (n, dim), row i = id i.
    queries: (B, dim) float32.
    exclude_indptr, exclude_ids: CSR-style ragged rows: query b excludes
        ``exclude_ids[exclude_indptr[b]:exclude_indptr[b + 1]]`` (distinct ids in 0..n-1).

    Returns
    -------
    ids (B, k) int64 padded with -1 and scores (B, k) float32 padded with -inf, best first.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, b = index.ntotal, len(queries)
    if exclude_indptr is None:
        exclude_indptr, exclude_ids = np.zeros(b + 1, np.int64), np.zeros(0, np.int64)
    n_excluded = np.diff(exclude_indptr)
    out_ids = np.full((b, k), -1, np.int64)
    out_scores = np.full((b, k), -np.inf, np.float32)
    fetch = int(min(n, k + (n_excluded.max() if b else 0)))
    if fetch == 0:
        return out_ids, out_scores
    scores, ids = index.search(queries, fetch)
    valid = ids >= 0
    if len(exclude_ids):
        # (row, id) pairs encoded as row * n + id: one sorted lookup for the whole batch
        blocked = np.repeat(np.arange(b, dtype=np.int64), n_excluded) * n + exclude_ids
        if (blocked[1:] < blocked[:-1]).any():
            blocked = np.sort(blocked)
        candidates = np.arange(b, dtype=np.int64)[:, None] * n + ids
        at = np.searchsorted(blocked, candidates).clip(max=len(blocked) - 1)
        valid &= blocked[at] != candidates
    rank = np.cumsum(valid, axis=1)  # 1-based position among the kept results
    rows, cols = np.nonzero(valid & (rank <= k))
    out_ids[rows, rank[rows, cols] - 1] = ids[rows, cols]
    out_scores[rows, rank[rows, cols] - 1] = scores[rows, cols]
    found = np.bincount(rows, minlength=b)
    short = np.flatnonzero(found < np.minimum(k, n - n_excluded))
    if len(short):
        out_ids[short], out_scores[short] = _exact_excluding(database, queries[short], k, exclude_indptr, exclude_ids, short)
    return out_ids, out_scores


def _exact_excluding(database: np.ndarray, queries: np.ndarray, k: int, indptr: np.ndarray,
                     excluded: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by brute force for the queries of batch ``rows`` with their exclusions."""
    scores = queries @ database.T  # (R, n)
    for r, row in enumerate(rows):  # only for the rare queries ANN left short
        scores[r, excluded[indptr[row] : indptr[row + 1]]] = -np.inf
    k_eff = min(k, scores.shape[1])
    top = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)
    ids = np.take_along_axis(top, order, axis=1).astype(np.int64)
    vals = np.take_along_axis(top_scores, order, axis=1).astype(np.float32)
    ids[~np.isfinite(vals)] = -1
    out_ids = np.full((len(rows), k), -1, np.int64)
    out_scores = np.full((len(rows), k), -np.inf, np.float32)
    out_ids[:, :k_eff], out_scores[:, :k_eff] = ids, vals
    return out_ids, out_scores
