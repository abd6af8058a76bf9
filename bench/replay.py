"""Replay: do real-time updates recommend a user's next item better than the bundle as trained?

For each log: train the default model (``model=auto``) on the events before a cut in time (the
last ``--holdout`` share of events, in time order, is held out), then replay the held-out events in
time order through the real-time path (``LiveRecommender.ingest``) and, before each event, rank the
catalogue for its user. HR@20 and NDCG@20 of the item the user touches next, for:

* **frozen**: the bundle as trained (vectors and items as of the cut);
* **live**: the same bundle, updated by every replayed event before this one;
* **item-kNN, last 5**: the cosine of the training co-occurrences (items x items, 0/1 user rows),
  summed over the user's last 5 items (training and replayed);
* **popular, last day**: the items with the most events in the 24 hours before.

Evaluated events: the user and the item are known to the bundle and the item is new to the user
(not among their items so far; every method leaves those out). Events are replayed in batches in
which no user appears twice and at most an hour passes; a user's state depends on their own events
only, so (a)-(c) rank each event exactly as one at a time would; (d) counts the 24 hours before each
batch's first event. ``--max-events`` caps the replayed events (the first ones after the cut).

Targets: live >= 1.2x frozen NDCG@20 and >= 1.0x item-kNN's.

    python bench/replay.py                                   # ML-100k, ML-1M (users 1-2999), synthetic
    python bench/replay.py --logs ml100k --max-events 3000   # one log, fewer events
    python bench/replay.py --results /tmp/replay.md          # into a file of yours

MovieLens is read from ``$DMP_ML100K`` / ``$DMP_ML1M`` (default ``../shared/data/ml-100k`` and
``../shared/data/ml-1m-users-1-2999``); a log that is not there is skipped with one line. Needs no
optional package. Writes the ``replay`` section into the results file (``bench/out/`` unless
``--results FILE``; ``--write-results``: the tracked ``bench/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import output  # noqa: E402

K = 20
RECENT = 5
BATCH_SECONDS = 3600
DAY = 86400
ML1M = Path(os.environ.get("DMP_ML1M", common.ROOT.parent / "shared" / "data" / "ml-1m-users-1-2999"))
SYNTHETIC_WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0}
LOGS = ("ml100k", "ml1m", "synthetic")
METHODS = ("frozen", "live", "item-kNN, last 5", "popular, last day")


def load_log(name: str, quick: bool):
    """(events DataFrame with numeric timestamps, items, users, training overrides, description)."""
    from dmp_dl.data.movielens import MovieLensSource
    from dmp_dl.data.synthetic import SyntheticSource

    if name == "synthetic":
        size = {"n_users": 400, "n_items": 150, "n_events": 12000} if quick else {}
        log = SyntheticSource(**size).load()
        what = (f"dmp_dl's generator, {'tiny' if quick else 'default size'}: sessions that stick to a category, "
                "event types view/click/add_to_cart/purchase")
        overrides = {"data.cleaning.event_weights": SYNTHETIC_WEIGHTS}
    else:
        path = common.ML100K if name == "ml100k" else ML1M
        if not path.exists():
            return None
        log = MovieLensSource(path=str(path)).load()
        what = f"{'MovieLens 100K' if name == 'ml100k' else 'MovieLens 1M, users 1-2999'}, every rating an event"
        overrides = {"data.cleaning.event_weights": {"rating": 1.0}}
    events = log.events.copy()
    events["timestamp"] = pd.to_numeric(events["timestamp"]).astype(np.int64)
    events = events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    return events, log.items, log.users, overrides, what


def train(events: pd.DataFrame, items, users, overrides: dict, out: Path, quick: bool):
    import dmp_dl

    settings = {"propensity.enabled": False, "audience.enabled": False, "evaluation.report": None, "logger": "none",
                "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
                "privacy.erasure_list": str(out / "erased.txt"), "privacy.audit_log": str(out / "audit.jsonl"), **overrides}
    if quick:
        settings["model.vae.max_epochs"] = 2
    t0 = time.perf_counter()
    rec = dmp_dl.fit(events, items=items, users=users, output_dir=out / "run", **settings)
    return out / "run" / "artifacts", rec.metrics, time.perf_counter() - t0


def batches(users: np.ndarray, times: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive events in which no user repeats and at most
    ``BATCH_SECONDS`` pass (events in time order)."""
    out, start, members = [], 0, set()
    for j, (u, t) in enumerate(zip(users.tolist(), times.tolist())):
        if u in members or t - times[start] > BATCH_SECONDS:
            out.append((start, j))
            start, members = j, set()
        members.add(u)
    if len(users):
        out.append((start, len(users)))
    return out


def cosine_of_cooccurrence(x: sp.csr_matrix) -> sp.csr_matrix:
    """(n_items, n_items) cosine of the items' 0/1 user columns, without the diagonal."""
    x = sp.csr_matrix(x, dtype=np.float32)
    x.data[:] = 1.0
    co = (x.T @ x).tocsr()
    norm = np.sqrt(np.maximum(co.diagonal(), 1e-12)).astype(np.float32)
    co = sp.diags(1.0 / norm) @ co @ sp.diags(1.0 / norm)
    co.setdiag(0.0)
    co.eliminate_zeros()
    return co.tocsr()


def top_k(scores: np.ndarray, exclude: sp.csr_matrix, k: int) -> np.ndarray:
    """(B, k) best columns of ``scores`` (B, n) after setting ``exclude``'s entries to -inf."""
    scores = scores.astype(np.float32, copy=True)
    coo = exclude.tocoo()
    scores[coo.row, coo.col] = -np.inf
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def replay(name: str, args, root: Path) -> dict | None:
    from dmp_dl.realtime import LiveRecommender
    from dmp_dl.serving.recommender import Recommender

    loaded = load_log(name, args.quick)
    if loaded is None:
        print(f"{name}: data not found, skipped", flush=True)
        return None
    events, items, users, overrides, what = loaded
    cut = int(round(len(events) * (1 - args.holdout)))
    cut_time = int(events["timestamp"].iloc[cut])
    while cut < len(events) and int(events["timestamp"].iloc[cut - 1]) == cut_time:
        cut += 1  # events of one second stay on one side
    before, after = events.iloc[:cut], events.iloc[cut:].reset_index(drop=True)
    after = after.iloc[: args.max_events] if args.max_events else after
    out = root / name
    print(f"{name}: training on {len(before):,} events, replaying {len(after):,}", flush=True)
    bundle, metrics, train_seconds = train(before, items, users, overrides, out, args.quick)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as serve.py serves (torch_threads: 1)
    frozen = Recommender.load(bundle)
    n_items = frozen.n_items
    # the journal in memory where there is /dev/shm: the replay measures ranking, not the disk's fsync
    journal = Path(tempfile.mkdtemp(prefix="dmp-replay-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    live = LiveRecommender.load(bundle, journal=journal / "journal")

    # the replayed events in the bundle's rows (-1: unknown to it)
    u_ids = after["user_id"].astype(str).to_numpy(dtype=object)
    u_row = frozen.user_rows(list(u_ids), strict=False)
    i_row = frozen.item_vocab.index_of(after["item_id"].astype(str).tolist())
    times = after["timestamp"].to_numpy(np.int64)
    # new to the user: not among the bundle's items of the user, nor earlier in the replay
    seen = sp.csr_matrix((np.ones(len(frozen._seen_items)), frozen._seen_items, frozen._seen_indptr),
                         shape=(frozen.n_users, n_items))
    known = (u_row >= 0) & (i_row >= 0)
    key = np.where(known, u_row * n_items + i_row, -1 - np.arange(len(after)))
    first = np.unique(key, return_index=True)[1]
    repeat = np.ones(len(after), dtype=bool)
    repeat[first] = False
    in_bundle = np.zeros(len(after), dtype=bool)
    in_bundle[known] = np.asarray(seen[u_row[known], i_row[known]]).ravel() > 0
    evaluated = known & ~repeat & ~in_bundle

    # item-kNN and the last-day popularity read the training events and those replayed so far
    train_u = frozen.user_rows(list(before["user_id"].astype(str)), strict=False)
    train_i = frozen.item_vocab.index_of(before["item_id"].astype(str).tolist())
    ok = (train_u >= 0) & (train_i >= 0)
    from dmp_dl.data.datamodule import last_items

    recent = last_items(train_u[ok], train_i[ok], frozen.n_users, RECENT, pad=n_items)  # most recent first
    cosine = cosine_of_cooccurrence(sp.csr_matrix((np.ones(ok.sum()), (train_u[ok], train_i[ok])), shape=seen.shape))
    stream_t = np.r_[before["timestamp"].to_numpy(np.int64)[ok], times[i_row >= 0]]
    stream_i = np.r_[train_i[ok], i_row[i_row >= 0]]  # every event in time order (the replay after training)
    replayed: dict[int, list[int]] = {}

    ranks = {m: np.full(len(after), -1, dtype=np.int64) for m in METHODS}
    event_type = after["event_type"].astype(str).to_numpy(dtype=object) if "event_type" in after else None
    t0 = time.perf_counter()
    for lo, hi in batches(u_ids, times):
        idx = np.arange(lo, hi)
        ev = idx[evaluated[lo:hi]]
        if len(ev):
            rows, targets = u_row[ev], i_row[ev]
            extra = [replayed.get(int(r), []) for r in rows]
            so_far = sp.csr_matrix(seen[rows])
            if any(extra):
                more = sp.csr_matrix((np.ones(sum(map(len, extra))), (np.repeat(np.arange(len(rows)), list(map(len, extra))),
                                      np.concatenate([np.asarray(e, dtype=np.int64) for e in extra]))), shape=so_far.shape)
                so_far = (so_far + more).tocsr()
            width = K + max(map(len, extra))
            got = frozen.recommend_rows(rows, width, exclude_seen=True)[0]
            drop = [set(e) for e in extra]
            lists = {"frozen": np.array([([i for i in g if i >= 0 and i not in d] + [-1] * K)[:K] for g, d in zip(got, drop)])}
            answered = live.recommend_batch(list(u_ids[ev]), K)
            lists["live"] = np.array([np.r_[frozen.item_vocab.index_of([i for i, _ in a]), np.full(K - len(a), -1)]
                                      for a in answered], dtype=np.int64)
            last = recent[rows]
            pairs = last < n_items
            basket = sp.csr_matrix((np.ones(pairs.sum(), np.float32), (np.nonzero(pairs)[0], last[pairs])),
                                   shape=(len(rows), n_items))
            lists["item-kNN, last 5"] = top_k((basket @ cosine).toarray(), so_far, K)
            window = np.searchsorted(stream_t, [times[lo] - DAY, times[lo]])
            popular = np.bincount(stream_i[window[0]:window[1]], minlength=n_items).astype(np.float32)
            lists["popular, last day"] = top_k(np.broadcast_to(popular, (len(rows), n_items)), so_far, K)
            for m, top in lists.items():
                hit = top == targets[:, None]
                ranks[m][ev] = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
        batch = [{"user_id": u_ids[j], "item_id": str(after["item_id"].iat[j]), "timestamp": int(times[j]),
                  "event_id": f"replay-{j}", **({"event_type": event_type[j]} if event_type is not None else {})}
                 for j in idx]
        live.ingest(batch)
        for j in idx[(u_row[idx] >= 0) & (i_row[idx] >= 0)]:  # the replayed items of known users, for the baselines
            r = int(u_row[j])
            replayed.setdefault(r, []).append(int(i_row[j]))
            recent[r] = np.r_[i_row[j], recent[r][:-1]]
    replay_seconds = time.perf_counter() - t0
    live.close()
    shutil.rmtree(journal, ignore_errors=True)
    torch.set_num_threads(threads)
    n = int(evaluated.sum())
    scores = {}
    for m in METHODS:
        r = ranks[m][evaluated]
        scores[m] = {"hr@20": float((r >= 0).mean()) if n else float("nan"),
                     "ndcg@20": float(np.where(r >= 0, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0).mean()) if n else float("nan")}
    return {"log": name, "what": what, "train_events": int(len(before)), "replayed": int(len(after)),
            "evaluated": n, "new_users_events": int((u_row < 0).sum()), "unknown_items_events": int((i_row < 0).sum()),
            "cut": pd.Timestamp(cut_time, unit="s", tz="UTC").isoformat(), "train_seconds": train_seconds,
            "replay_seconds": replay_seconds, "recency": (metrics.get("model") or {}).get("recency"),
            "served": (metrics.get("model") or {}).get("served_score"),
            "selected": (metrics.get("model") or {}).get("selected"), "why": (metrics.get("model") or {}).get("why"),
            "scores": scores}


def verdict(ratio: float, target: float) -> str:
    """Whether ``ratio`` meets ``target``, and by how much it misses it when it does not."""
    return "met" if ratio >= target else f"missed by {(target - ratio) / target:.0%}"


def render(runs: list[dict], args) -> str:
    rows = []
    for r in runs:
        s = r["scores"]
        for m in METHODS:
            rows.append({"log": r["log"], "method": m, "HR@20": s[m]["hr@20"], "NDCG@20": s[m]["ndcg@20"]})
    body = ("Train the default model on the events before the cut (the last "
            f"{args.holdout:.0%} of events in time order held out), replay the held-out ones in time order through "
            "`LiveRecommender.ingest` and rank the catalogue for each event's user before it: HR@20 / NDCG@20 of the "
            "next item (known user and item, an item new to the user; every method leaves out the user's items so "
            "far). Targets: live >= 1.2x frozen NDCG@20 and >= 1.0x item-kNN's.\n\n")
    body += common.markdown_table(rows, ["log", "method", "HR@20", "NDCG@20"])
    start, end = args.load_at_start, os.getloadavg()
    body += (f"\n\nLoad average (1 / 5 / 15 min) at the start {start[0]:.1f} / {start[1]:.1f} / {start[2]:.1f} and at the "
             f"end {end[0]:.1f} / {end[1]:.1f} / {end[2]:.1f}, on 2 cores shared with other jobs: the seconds below are "
             f"wall-clock under that load. Data: {common.ML100K}, {ML1M}.\n\n")
    for r in runs:
        s = r["scores"]
        live, frozen, knn = s["live"]["ndcg@20"], s["frozen"]["ndcg@20"], s["item-kNN, last 5"]["ndcg@20"]
        rec = r["recency"] or {}
        half = rec.get("half_life_days")
        body += (f"- **{r['log']}** ({r['what']}): {r['train_events']:,} training events, cut at {r['cut']}; "
                 f"{r['replayed']:,} replayed, {r['evaluated']:,} evaluated ({r['new_users_events']:,} by users new "
                 f"since the cut, {r['unknown_items_events']:,} on items new since it). Recency: "
                 f"{'no decay' if half is None else f'half-life {half:.3g} days'} ({rec.get('chosen_by')}); served: "
                 f"{r.get('selected') or 'the choice'}, {r['served']}"
                 f"{' (' + r['why'] + ')' if r.get('why') else ''}. Live / frozen NDCG@20 **{live / frozen:.2f}x** (target 1.2: {verdict(live / frozen, 1.2)}), "
                 f"live / item-kNN **{live / knn:.2f}x** (target 1.0: {verdict(live / knn, 1.0)}). Training "
                 f"{r['train_seconds']:.0f} s, replay {r['replay_seconds']:.0f} s.\n")
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", nargs="+", choices=LOGS, default=list(LOGS))
    parser.add_argument("--holdout", type=float, default=0.1, help="share of events (the last in time) held out")
    parser.add_argument("--max-events", type=int, default=10_000, help="replay at most this many held-out events (0: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes into bench/out/ (a plumbing check)")
    output.add_arguments(parser)
    args = parser.parse_args()
    if not 0 < args.holdout < 1:
        output.fail(f"--holdout must be in (0, 1), got {args.holdout}")
    if args.max_events < 0:
        output.fail(f"--max-events must be >= 0, got {args.max_events}")
    output.use(args, quick=args.quick)
    if args.quick:
        args.logs, args.max_events = ["synthetic"], min(args.max_events or 500, 500)
    at_start = common.machine()
    args.load_at_start = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="dmp-replay-bench-"))
    try:
        runs = [r for r in (replay(name, args, root) for name in args.logs) if r is not None]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not runs:
        output.fail("no log to replay: " + ", ".join(args.logs) + " not found")
    common.write_section("replay", "Real-time replay (bench/replay.py)", render(runs, args),
                         {"machine": at_start, "runs": runs})


if __name__ == "__main__":
    main()
