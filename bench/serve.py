"""Serving benchmark: Recommender latency/throughput and HTTP latency under load, per index type.

For each catalogue size and index (``flat``, ``ivf``, ``hnsw``, with the settings of
``conf/index/<name>.yaml``) this writes a real bundle of synthetic vectors with ``export_bundle``
(unit vectors around shared cluster centres, ``--noise`` sets how tight; ~20 seen items per user),
loads it with ``Recommender.load`` and measures:

* ANN recall@10 against exact search and build time (from the bundle manifest);
* raw FAISS single-query top-10 latency, and in-process ``recommend(user, k=10)`` latency
  (id lookup + search + seen-item exclusion + id mapping), p50/p99 over ``--queries`` users,
  with ``--faiss-threads`` OpenMP threads (1, like serve.py);
* batch throughput: ``recommend_batch`` over ``--batch`` users with all cores, users/s;
* HTTP: ``serve.py`` in a subprocess, ``--concurrency`` keep-alive clients (threads spread over
  cpu_count/2 client processes) issuing ``--http-requests`` ``GET /recommend`` calls in total:
  p50/p99 latency and requests/s; and first one client alone (``http1_*``: latency without
  queueing). The clients run on the same machine and take CPU from the server.

    python bench/serve.py --items 10000 100000            # small scale
    python bench/serve.py --items 10000 100000 1000000    # the full table (minutes)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dmp_dl.data.vocab import IdVocab  # noqa: E402
from dmp_dl.index.ann import IndexOptions  # noqa: E402
from dmp_dl.serving.recommender import Recommender  # noqa: E402
from dmp_dl.training.export import export_bundle  # noqa: E402


def index_options(name: str, eval_queries: int) -> IndexOptions:
    """The project's ``conf/index/<name>.yaml`` as IndexOptions."""
    cfg = OmegaConf.load(REPO / "conf" / "index" / f"{name}.yaml")
    cfg.seed = 0
    fields = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if not k.startswith("_")}
    return IndexOptions(**{**fields, "eval_queries": eval_queries})


def synthetic(n_users: int, n_items: int, dim: int, noise: float, seed: int = 0):
    """User and item unit vectors around sqrt(n_items) shared centres (Gaussian noise of std
    ``noise`` per coordinate around unit-variance centres), and ~20 seen items per user."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(50, int(np.sqrt(n_items))), dim)).astype(np.float32)

    def draw(n):
        x = np.empty((n, dim), np.float32)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            x[s : s + m] = centres[rng.integers(0, len(centres), m)] + noise * rng.standard_normal((m, dim), np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    items, users = draw(n_items), draw(n_users)
    per_user = 20
    rows = np.repeat(np.arange(n_users), per_user)
    cols = rng.integers(0, n_items, n_users * per_user)
    seen = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    seen.data[:] = 1
    return users, items, seen


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def in_process(rec: Recommender, n_queries: int, batch: int, faiss_threads: int, seed: int = 1) -> dict:
    """Single-user latencies with ``faiss_threads`` OpenMP threads (as serve.py runs), then batch
    throughput with all cores (as a nightly job runs)."""
    import faiss

    faiss.omp_set_num_threads(faiss_threads)
    rng = np.random.default_rng(seed)
    users = rec.user_vocab.ids[rng.integers(0, rec.n_users, n_queries)].tolist()
    for u in users[:50]:  # warm-up
        rec.recommend(u, k=10)
    raw, api = [], []
    for u in users:
        v = rec.user_vectors[rec.user_vocab.get(u)][None]
        t = time.perf_counter()
        rec.item_index.search(v, 10)
        raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        rec.recommend(u, k=10)
        api.append(time.perf_counter() - t)
    batch_users = rec.user_vocab.ids[rng.integers(0, rec.n_users, batch)].tolist()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    rec.recommend_batch(batch_users, k=10)
    batch_seconds = time.perf_counter() - t
    (raw50, raw99), (api50, api99) = percentiles(raw), percentiles(api)
    return {"faiss_p50_ms": raw50, "faiss_p99_ms": raw99, "recommend_p50_ms": api50, "recommend_p99_ms": api99,
            "batch_users_per_s": batch / batch_seconds}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_process(base: str, user_groups: list[list[str]]) -> tuple[list[float], float, float, int]:
    """One load-generating process: a thread per group, each a keep-alive client issuing its
    group's requests back to back. Returns latencies, start and end (epoch s), error count."""
    import httpx

    latencies: list[float] = []
    errors = [0]

    def client(users):
        with httpx.Client(base_url=base, timeout=60) as c:
            c.get("/health")  # connect before the clock starts
            barrier.wait()
            for u in users:
                t = time.perf_counter()
                r = c.get("/recommend", params={"user_id": u, "k": 10})
                latencies.append(time.perf_counter() - t)
                errors[0] += r.status_code != 200

    barrier = threading.Barrier(len(user_groups) + 1)
    threads = [threading.Thread(target=client, args=(g,)) for g in user_groups]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.time()
    for t in threads:
        t.join()
    return latencies, start, time.time(), errors[0]


def _load(base: str, users: list[str], concurrency: int, processes: int) -> tuple[list[float], float, int]:
    """``concurrency`` clients spread over ``processes`` processes (one Python client process
    cannot generate enough load), sharing ``users`` evenly. Returns latencies, wall seconds, errors."""
    groups = [users[i::concurrency] for i in range(concurrency)]
    per_process = [groups[p::processes] for p in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_client_process, [base] * processes, per_process))
    latencies = [x for r in results for x in r[0]]
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    return latencies, wall, sum(r[3] for r in results)


def over_http(bundle: Path, rec: Recommender, n_requests: int, concurrency: int, faiss_threads: int, seed: int = 2) -> dict:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), f"artifacts={bundle}", f"port={port}",
                             "log_level=warning", f"faiss_threads={faiss_threads}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "DMP_SERVE_TOKEN": ""})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve.py exited: {proc.stderr.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
            if time.monotonic() > deadline:
                raise RuntimeError("serve.py did not come up in 300 s")
        rng = np.random.default_rng(seed)
        users = rec.user_vocab.ids[rng.integers(0, rec.n_users, n_requests)].tolist()
        single, _, single_errors = _load(base, users[:300], 1, 1)  # one client: latency without queueing
        latencies, wall, errors = _load(base, users, concurrency, max(1, min(concurrency, (os.cpu_count() or 2) // 2)))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    p50, p99 = percentiles(latencies)
    return {"http1_p50_ms": percentiles(single)[0], "http1_p99_ms": percentiles(single)[1],
            "http_p50_ms": p50, "http_p99_ms": p99, "http_requests_per_s": len(latencies) / wall,
            "http_requests": len(latencies), "http_errors": errors + single_errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--noise", type=float, default=1.5, help="spread around the cluster centres (higher: harder for ANN)")
    ap.add_argument("--indexes", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw", "auto"])
    ap.add_argument("--queries", type=int, default=2000, help="single-user recommend calls timed")
    ap.add_argument("--batch", type=int, default=10_000, help="users in the batch-throughput call")
    ap.add_argument("--eval-queries", type=int, default=1000, help="queries for recall@10 vs exact")
    ap.add_argument("--http-requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--faiss-threads", type=int, default=1, help="OpenMP threads per single query (serve.py's default)")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    args = ap.parse_args()

    rows = []
    for n_items in args.items:
        users, items, seen = synthetic(args.users, n_items, args.dim, args.noise)
        user_vocab = IdVocab([f"u{i:08d}" for i in range(args.users)], "user")
        item_vocab = IdVocab([f"i{i:08d}" for i in range(n_items)], "item")
        for name in args.indexes:
            with tempfile.TemporaryDirectory(prefix="dmp-bench-") as tmp:
                bundle = Path(tmp) / "artifacts"
                t0 = time.perf_counter()
                export_bundle(bundle, user_vocab=user_vocab, item_vocab=item_vocab, user_vectors=users,
                              item_vectors=items, seen=seen, item_popularity=np.ones(n_items, np.int64),
                              index_options=index_options(name, args.eval_queries))
                export_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                rec = Recommender.load(bundle)
                load_s = time.perf_counter() - t0
                info = rec.manifest["indexes"]["items"]
                row = {"items": n_items, "users": args.users, "dim": args.dim, "noise": args.noise, "index": name,
                       "factory": info["factory"], "search_params": info["search_params"],
                       "recall@10": info["recall@10"], "index_build_s": info["build_seconds"],
                       "export_s": export_s, "load_s": load_s, **in_process(rec, args.queries, args.batch, args.faiss_threads)}
                if not args.no_http:
                    row.update(over_http(bundle, rec, args.http_requests, args.concurrency, args.faiss_threads))
                rows.append(row)
                print(json.dumps(row), flush=True)
                del rec
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"argv": sys.argv[1:], "cpus": os.cpu_count(), "rows": rows}, indent=1))
    cols = ["items", "factory", "search_params", "recall@10", "faiss_p50_ms", "faiss_p99_ms", "recommend_p50_ms",
            "recommend_p99_ms", "batch_users_per_s", "http1_p50_ms", "http1_p99_ms", "http_p50_ms", "http_p99_ms",
            "http_requests_per_s", "index_build_s"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
