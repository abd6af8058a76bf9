"""Activation export throughput: top-K recommendations for every user of a large bundle.

Builds a :class:`~dmp_dl.serving.recommender.Recommender` in memory over synthetic vectors (unit vectors
around shared centres; seen items per user drawn from a log-normal, median ``--seen``, so a few
users have seen hundreds of items and the search over-fetches for them) with the index a bundle
of that catalogue gets by default (``index=auto``: exact ``Flat`` below 50,000 items), then runs
the export job of ``python -m dmp_dl.export task=recommendations`` (``dmp_dl.export.jobs``) for all
users into CSV and Parquet, and checks the file has users x K rows.

    python bench/export.py                                   # 1M users x top-50, 20k items (minutes)
    python bench/export.py --users 100000 --scratch          # smaller, RESULTS.md untouched
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import output  # noqa: E402
from common import ROOT, Timer, markdown_table, write_section  # noqa: E402


def synthetic_recommender(n_users: int, n_items: int, dim: int, median_seen: int, seed: int = 0):
    """A Recommender over synthetic vectors and seen items (no network, no propensity)."""
    import faiss
    import scipy.sparse as sp

    from dmp_dl.data.vocab import IdVocab
    from dmp_dl.serving.recommender import Recommender

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(50, int(np.sqrt(n_items))), dim)).astype(np.float32)

    def draw(n: int) -> np.ndarray:
        x = np.empty((n, dim), np.float32)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            x[s : s + m] = centres[rng.integers(0, len(centres), m)] + 1.5 * rng.standard_normal((m, dim), np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    items, users = draw(n_items), draw(n_users)
    counts = np.clip(rng.lognormal(np.log(median_seen), 1.0, n_users).astype(np.int64), 1, n_items // 2)
    rows = np.repeat(np.arange(n_users), counts)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8  # Zipf-like: popular items are seen more
    cols = rng.choice(n_items, size=len(rows), p=popularity / popularity.sum())
    seen = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    seen.sum_duplicates()
    item_index = faiss.IndexFlatIP(dim)
    item_index.add(items)
    user_index = faiss.IndexFlatIP(dim)
    user_index.add(users)
    rec = Recommender(user_vocab=IdVocab([f"u{i:07d}" for i in range(n_users)], "user"),
                      item_vocab=IdVocab([f"i{i:06d}" for i in range(n_items)], "item"),
                      user_vectors=users, item_vectors=items, seen=seen, item_index=item_index, user_index=user_index)
    return rec, np.diff(seen.indptr)


def _cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process so far: what the export costs whatever
    else the machine is running."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--seen", type=int, default=20, help="median seen items per user")
    ap.add_argument("--formats", nargs="+", default=["parquet", "csv"])
    ap.add_argument("--chunk", type=int, default=8192, help="users per batch (chunk_users)")
    ap.add_argument("--scratch", action="store_true", help="print only; leave RESULTS.md alone")
    output.add_arguments(ap)
    args = ap.parse_args()
    output.use(args)

    from dmp_dl.export import jobs

    with Timer() as build:
        rec, seen = synthetic_recommender(args.users, args.items, args.dim, args.seen)
    print(f"synthetic bundle: {args.users} users, {args.items} items, dim {args.dim}, seen items per user "
          f"median {int(np.median(seen))} max {seen.max()}; built in {build.seconds:.1f} s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        for fmt in args.formats:
            path = Path(tmp) / f"recommendations.{fmt}"
            export = jobs.recommendations(rec, np.arange(rec.n_users), args.k, chunk=args.chunk)
            t0, cpu0 = time.perf_counter(), _cpu_seconds()
            summary = jobs.write_export(export, path, fmt, progress=False)
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
            assert summary["rows"] == args.users * args.k, summary  # every user k unseen items
            rows.append({"format": fmt, "users": args.users, "k": args.k, "rows": summary["rows"],
                         "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "users_per_s": round(args.users / seconds),
                         "rows_per_s": round(summary["rows"] / seconds), "file_mb": round(path.stat().st_size / 2**20),
                         "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
            print(rows[-1], flush=True)
            path.unlink()
    body = (f"`python -m dmp_dl.export task=recommendations k={args.k}` on a synthetic bundle: {args.users:,} users, "
            f"{args.items:,} items, dim {args.dim}, exact `Flat` item index (what `index=auto` builds below 50,000 "
            f"items), seen items per user log-normal with median {int(np.median(seen))} and max {seen.max()} (excluded "
            f"exactly: the search over-fetches by the batch's largest seen count), {args.chunk} users per batch; "
            "wall time of the whole export (search, exclusion, id mapping, writing and the atomic rename), one run "
            "each, on the shared 2-core machine (the load average above counts other people's jobs, so wall time "
            "varies with them; `cpu_seconds`, user + system time of all threads, does not: on 2 idle cores the wall "
            "time approaches half of it). Peak RSS includes the bundle held in memory.\n\n" + markdown_table(rows))
    if args.scratch:
        print(body)
    else:
        write_section("export", "Activation export: top-K for every user (bench/export.py)", body,
                      {"rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
