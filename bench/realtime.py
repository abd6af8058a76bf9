"""Real-time events: ingest throughput, update latency, recommend-after-update latency, memory per
journaled event; in process (``LiveRecommender.ingest``) and over HTTP (``POST /events`` of a
``serve.py`` subprocess).

Trains a default synthetic bundle (the default model, with short training: ``trainer.max_epochs=1``,
``model.vae.max_epochs=3``; speed does not depend on quality) or uses ``--artifacts DIR``, then, each on a fresh copy of the bundle and journal:

* batched: ``--batches`` batches of ``--batch-size`` events (users drawn with a Zipf-like skew from
  the known users plus 10 % new ones, items by popularity), events/s;
* single: ``--single`` one-event ingests, p50/p99 ms, and the same with the journal on ``/dev/shm``
  (no disk: the update's own cost) and the bare fsync of the journal's disk (what durability costs);
* recommend-after-update: ``recommend(user)`` right after that user's event, p50/p99 ms (and for a
  user without real-time events, for comparison);
* HTTP: the single and batched runs against ``serve.py`` (one keep-alive client), plus
  ``GET /recommend`` right after each event;
* memory: RSS growth while ingesting ``--memory-events`` events, per 1M events; and the time and
  RSS of replaying that journal on a fresh start;
* ``--quality``: whether updating users from their events helps the default model as served
  (:func:`served_stream_quality`); ``--quality-two-tower``: which update of a two-tower user vector
  helps most (:func:`stream_quality`).

Targets (on 2 cores): >= 5,000 events/s batched; single-event update p99 <= 10 ms in process,
<= 20 ms over HTTP; recommend right after the user's event p99 <= 5 ms in process.

    python bench/realtime.py                    # writes the `realtime` section of bench/RESULTS.md
    python bench/realtime.py --quick            # tiny sizes into bench/out/ (a plumbing check)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import output  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q)) if len(values) else float("nan")


def train_bundle(out: Path, overrides: list[str]) -> Path:
    from dmp_dl.pipeline.run import run

    cfg = common.compose_train_cfg(["trainer.max_epochs=1", "++model.vae.max_epochs=3", "logger=none", "evaluation.report=null",
                                    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                                    f"privacy.erasure_list={out / 'erased.txt'}", *overrides], out)
    return run(cfg)["bundle_dir"]


class EventStream:
    """Events with realistic skew: known users by a Zipf-like law, 10 % new users, items by popularity."""

    def __init__(self, artifacts: Path, seed: int = 0):

        self.rng = np.random.default_rng(seed)
        self.users = np.asarray(json.loads((artifacts / "users.json").read_text())["ids"], dtype=object)
        self.items = np.asarray(json.loads((artifacts / "items.json").read_text())["ids"], dtype=object)
        pop = np.load(artifacts / "item_popularity.npy").astype(np.float64) + 1
        self.item_p = pop / pop.sum()
        ranks = np.arange(1, len(self.users) + 1, dtype=np.float64)
        self.user_p = ranks ** -0.8 / (ranks ** -0.8).sum()
        manifest = json.loads((artifacts / "manifest.json").read_text())
        weights = ((manifest.get("config") or {}).get("data") or {}).get("cleaning", {}).get("event_weights") or {"view": 1}
        self.types = list(weights)
        self.t = int(time.time()) - 86400
        self.n = 0

    def batch(self, n: int) -> list[dict]:
        new = self.rng.random(n) < 0.1
        known = self.users[self.rng.choice(len(self.users), n, p=self.user_p)]
        fresh = np.array([f"rt-{x}" for x in self.rng.integers(0, max(1, len(self.users) // 3), n)], dtype=object)
        users = np.where(new, fresh, known)
        items = self.items[self.rng.choice(len(self.items), n, p=self.item_p)]
        types = self.rng.choice(self.types, n)
        out = []
        for u, i, ty in zip(users.tolist(), items.tolist(), types.tolist()):
            self.n += 1
            out.append({"user_id": u, "item_id": i, "event_type": ty, "timestamp": self.t + self.n // 50,
                        "event_id": f"b{self.n}"})
        return out


def describe_bundle(artifacts: Path, trained: bool) -> str:
    """Which data and model the bundle holds, and how it scores (its manifest's scoring entry)."""

    manifest = json.loads((artifacts / "manifest.json").read_text())
    network = (manifest.get("network") or {}).get("class", "no network")
    scoring = manifest.get("scoring") or {}
    served = f"{scoring.get('model', '?')}: {scoring.get('score', 'embedding dot product')}" if scoring else "embedding dot product"
    counts = manifest.get("counts") or {}
    where = "synthetic, default config, short training" if trained else str(artifacts)
    return (f"{where}; {counts.get('users', '?'):,} users, {counts.get('items', '?'):,} items; {network}, "
            f"served score {served}")


def fresh_copy(artifacts: Path, root: Path, name: str) -> Path:
    target = root / name / "artifacts"
    shutil.copytree(artifacts, target)
    return target


def fsync_latency(directory: Path, n: int = 200) -> dict:
    path = directory / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    times = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, b"x" * 120 + b"\n")
            os.fsync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    return {"p50_ms": pct(times, 50), "p99_ms": pct(times, 99)}


def in_process(artifacts: Path, root: Path, args) -> dict:
    import torch

    from dmp_dl.realtime import LiveRecommender

    torch.set_num_threads(1)  # what serve.py does (torch_threads: 1)
    out: dict = {}
    stream = EventStream(artifacts, seed=1)
    with LiveRecommender.load(fresh_copy(artifacts, root, "batched")) as live:
        live.ingest(stream.batch(args.batch_size))  # warm-up
        t0 = time.perf_counter()
        accepted = 0
        for _ in range(args.batches):
            accepted += live.ingest(stream.batch(args.batch_size))["accepted"]
        seconds = time.perf_counter() - t0
        out["batched"] = {"batch_size": args.batch_size, "batches": args.batches, "accepted": accepted,
                          "events_per_second": accepted / seconds}
    for where, journal in (("disk", None), ("tmpfs", Path(tempfile.mkdtemp(dir="/dev/shm")) / "journal")):
        bundle = fresh_copy(artifacts, root, f"single-{where}")
        with LiveRecommender.load(bundle, journal=journal) as live:
            singles, after, plain = [], [], []
            events = stream.batch(args.single + 20)
            for k, ev in enumerate(events):
                t = time.perf_counter()
                live.ingest([ev])
                dt = time.perf_counter() - t
                t = time.perf_counter()
                live.recommend(ev["user_id"], 10)
                da = time.perf_counter() - t
                if k >= 20:  # warm-up
                    singles.append(dt)
                    after.append(da)
            quiet = [u for u in stream.users[-200:] if live.live_user(u) is None][:100]
            for u in quiet:
                t = time.perf_counter()
                live.recommend(u, 10)
                plain.append(time.perf_counter() - t)
        if journal is not None:
            shutil.rmtree(journal.parent, ignore_errors=True)
        out[f"single_{where}"] = {"n": len(singles), "p50_ms": pct(singles, 50), "p99_ms": pct(singles, 99),
                                   "recommend_after_p50_ms": pct(after, 50), "recommend_after_p99_ms": pct(after, 99),
                                   "recommend_untouched_p50_ms": pct(plain, 50), "recommend_untouched_p99_ms": pct(plain, 99)}
    out["fsync"] = fsync_latency(root)
    return out


def memory(artifacts: Path, root: Path, args) -> dict:
    import gc

    import torch

    from dmp_dl.realtime import LiveRecommender

    torch.set_num_threads(1)
    stream = EventStream(artifacts, seed=2)
    bundle = fresh_copy(artifacts, root, "memory")
    gc.collect()
    before = rss_mib()
    with LiveRecommender.load(bundle) as live:
        gc.collect()
        loaded = rss_mib()
        t0 = time.perf_counter()
        while stream.n < args.memory_events:
            live.ingest(stream.batch(min(5000, args.memory_events - stream.n)))
        seconds = time.perf_counter() - t0
        gc.collect()
        after = rss_mib()
        live_users, new_users = live.n_live_users, live.n_new_users
    journal_bytes = sum(p.stat().st_size for p in (bundle.parent / "artifacts.journal").glob("events-*.csv"))
    t0 = time.perf_counter()
    with LiveRecommender.load(bundle) as again:
        replay_seconds = time.perf_counter() - t0
        replayed = again.info()["realtime"]["events_replayed"]
        gc.collect()
        replay_rss = rss_mib()
    events = stream.n
    return {"events": events, "ingest_seconds": seconds, "rss_mib_before_load": before, "rss_mib_loaded": loaded,
            "rss_mib_after": after, "growth_mib_per_million": (after - loaded) / events * 1e6,
            "live_users": live_users, "new_users": new_users, "journal_bytes_per_event": journal_bytes / events,
            "replay_seconds": replay_seconds, "replayed": replayed, "replay_events_per_second": replayed / replay_seconds,
            "rss_mib_after_replay": replay_rss}


def over_http(artifacts: Path, root: Path, args) -> dict:
    import secrets

    import httpx
    from load import Server

    bundle = fresh_copy(artifacts, root, "http")
    token = secrets.token_hex(8)
    stream = EventStream(artifacts, seed=3)
    out: dict = {}
    with Server(bundle, token, "log_level=warning") as server, httpx.Client(base_url=server.base, timeout=60,
                                                                              headers={"Authorization": f"Bearer {token}"}) as client:
        singles, after = [], []
        for k, ev in enumerate(stream.batch(args.single + 20)):
            t = time.perf_counter()
            r = client.post("/events", json={"events": [ev]})
            dt = time.perf_counter() - t
            assert r.status_code == 200, r.text
            t = time.perf_counter()
            r = client.get("/recommend", params={"user_id": ev["user_id"], "k": 10})
            da = time.perf_counter() - t
            assert r.status_code == 200, r.text
            if k >= 20:
                singles.append(dt)
                after.append(da)
        out["single"] = {"n": len(singles), "p50_ms": pct(singles, 50), "p99_ms": pct(singles, 99),
                         "recommend_after_p50_ms": pct(after, 50), "recommend_after_p99_ms": pct(after, 99)}
        accepted = 0
        t0 = time.perf_counter()
        for _ in range(args.batches):
            r = client.post("/events", json={"events": stream.batch(args.http_batch_size)})
            assert r.status_code == 200, r.text
            accepted += r.json()["accepted"]
        seconds = time.perf_counter() - t0
        out["batched"] = {"batch_size": args.http_batch_size, "batches": args.batches, "accepted": accepted,
                          "events_per_second": accepted / seconds}
    return out


def stream_quality(name: str, overrides: list[str], root: Path) -> dict:
    """Does updating users from their events help? Train with a per-user ``leave_last_n`` split
    (n = 5): each user's validation events play the events that arrive after training, the test
    events what they do next. Test recall/NDCG@20 (full ranking, train and validation items
    excluded) of the user vectors before the events (frozen) and after them, by the real-time path
    (the cold-start encoder on the whole updated history) and by two alternatives. Written for a
    model with a per-user embedding and a recent-items encoder (``model=two_tower``)."""
    import torch

    from dmp_dl.data.datamodule import last_items
    from dmp_dl.data.split import TEST, TRAIN
    from dmp_dl.evaluation.baselines import EmbeddingScorer
    from dmp_dl.evaluation.ranking import evaluate_scorer
    from dmp_dl.models.embeddings import item_vectors, user_vectors
    from dmp_dl.pipeline.run import run

    out = root / ("quality-" + "".join(c if c.isalnum() else "-" for c in name))
    cfg = common.compose_train_cfg(["logger=none", "evaluation.report=null", "propensity.enabled=false",
                                    "audience.enabled=false", "export=false", "trainer.enable_progress_bar=false",
                                    "data.split.method=leave_last_n", "data.split.n=5",
                                    f"privacy.erasure_list={out / 'erased.txt'}", *overrides], out)
    result = run(cfg)
    dm, net = result["datamodule"], result["module"].net.cpu().eval()
    ev = dm.events
    u, i, s = ev["user_idx"].to_numpy(), ev["item_idx"].to_numpy(), ev["split"].to_numpy()
    before = last_items(u[s == TRAIN], i[s == TRAIN], dm.n_users, dm.history_len, dm.n_items)
    after = last_items(u[s != TEST], i[s != TEST], dm.n_users, dm.history_len, dm.n_items)
    users = np.arange(dm.n_users)
    attr = getattr(net, "user_attr", None)
    reads = attr is not None and attr.active

    def cold(history):
        with torch.no_grad():
            args = (attr.tokens[torch.as_tensor(users)], attr.numeric[torch.as_tensor(users)]) if reads else ()
            return net.cold_user_vectors(torch.as_tensor(history), *args).numpy()

    cpu = torch.device("cpu")
    with torch.no_grad():
        trained, trained_after = user_vectors(net, users, before, device=cpu), user_vectors(net, users, after, device=cpu)
        items = item_vectors(net, dm.n_items, device=cpu)
    residual = trained + cold(after) - cold(before)
    if getattr(net, "normalized", False):
        residual /= np.linalg.norm(residual, axis=1, keepdims=True).clip(1e-12)
    rows = {}
    for label, vectors in (("frozen: the trained vector, no update", trained),
                           ("real-time path: cold-start encoder on the whole updated history", cold(after)),
                           ("alternative: trained + cold(after) - cold(before)", residual),
                           ("alternative: the network's user_vectors(user, updated history)", trained_after)):
        m = evaluate_scorer(EmbeddingScorer(vectors, items, "cpu"), dm.eval_dataset("test"), dm.n_items, (20,), device="cpu")
        rows[label] = {"recall@20": float(m["recall@20"]), "ndcg@20": float(m["ndcg@20"])}
    return {"data": name, "test_users": len(dm.test_users), "users_with_new_events": int((before != after).any(axis=1).sum()),
            "rows": rows}


def served_stream_quality(log_name: str, root: Path, quick: bool = False, k: int = 20, n: int = 5) -> dict | None:
    """Does updating users from their events help the model as served (the default model: whatever
    ``model=auto`` serves)? Each user with at least 3n events keeps all but their last 2n for training;
    the default model is trained on those alone (its own split, refit on every training event), so the
    bundle has never seen the rest. The first n of each user's held-back events are then streamed
    through ``LiveRecommender.ingest`` in time order, as they would arrive, and the catalogue is ranked
    for the users with a new item among their last n: the frozen bundle (the streamed items left out of
    its lists) against the live one. Recall / NDCG@k of those new items, binary gains."""
    import replay

    from dmp_dl.realtime import LiveRecommender
    from dmp_dl.serving.recommender import Recommender

    loaded = replay.load_log(log_name, quick)
    if loaded is None:
        return None
    events, items, users, overrides, what = loaded
    position = events.groupby("user_id", sort=False).cumcount(ascending=False).to_numpy()  # 0: the user's latest
    counts = events.groupby("user_id", sort=False)["item_id"].transform("size").to_numpy()
    held = counts >= 3 * n
    streamed, tested = held & (position >= n) & (position < 2 * n), held & (position < n)
    out = root / f"served-quality-{log_name}"
    bundle, metrics, seconds = replay.train(events[~(streamed | tested)], items, users, overrides, out, quick)
    frozen = Recommender.load(bundle)
    stream = events[streamed]
    batch = [{"user_id": str(r.user_id), "item_id": str(r.item_id), "timestamp": int(r.timestamp),
              **({"event_type": str(r.event_type)} if "event_type" in stream else {})} for r in stream.itertuples()]
    test = events[tested]
    u_row = frozen.user_rows(test["user_id"].astype(str).tolist(), strict=False)
    i_row = frozen.item_vocab.index_of(test["item_id"].astype(str).tolist())
    s_row = frozen.user_rows(stream["user_id"].astype(str).tolist(), strict=False)
    s_item = frozen.item_vocab.index_of(stream["item_id"].astype(str).tolist())
    shape = (frozen.n_users, frozen.n_items)
    ok = (s_row >= 0) & (s_item >= 0)
    streamed_items = sp.csr_matrix((np.ones(ok.sum()), (s_row[ok], s_item[ok])), shape=shape)
    seen = sp.csr_matrix((np.ones(len(frozen._seen_items)), frozen._seen_items, frozen._seen_indptr), shape=shape)
    ok = (u_row >= 0) & (i_row >= 0)
    relevant = sp.csr_matrix((np.ones(ok.sum()), (u_row[ok], i_row[ok])), shape=shape)
    relevant = (relevant - relevant.multiply((seen + streamed_items) > 0)).tocsr()
    relevant.eliminate_zeros()
    rows = np.flatnonzero(np.diff(relevant.indptr) > 0)
    discount = 1.0 / np.log2(np.arange(2, k + 2))

    def scores(lists) -> dict:
        recall, ndcg = [], []
        for row, top in zip(rows, lists):
            rel = set(relevant.indices[relevant.indptr[row]:relevant.indptr[row + 1]].tolist())
            gains = np.array([i in rel for i in list(top)[:k]], dtype=float)
            recall.append(gains.sum() / min(k, len(rel)))
            ndcg.append((gains * discount[:len(gains)]).sum() / discount[:min(k, len(rel))].sum())
        return {f"recall@{k}": float(np.mean(recall)), f"ndcg@{k}": float(np.mean(ndcg))}

    extra = [set(streamed_items.indices[streamed_items.indptr[r]:streamed_items.indptr[r + 1]].tolist()) for r in rows]
    got = frozen.recommend_rows(rows, k + max(map(len, extra)), exclude_seen=True)[0]
    frozen_lists = [[int(i) for i in g if i >= 0 and i not in e][:k] for g, e in zip(got, extra)]
    with LiveRecommender.load(bundle, journal=out / "journal") as live:
        for start in range(0, len(batch), 1000):
            live.ingest(batch[start:start + 1000])
        answered = live.recommend_batch(frozen.user_vocab.ids[rows].tolist(), k)
    live_lists = [frozen.item_vocab.index_of([i for i, _ in a]).tolist() for a in answered]
    served = (metrics.get("model") or {}).get("served_score", "embedding dot product")
    return {"data": f"{log_name} ({what})", "selected": (metrics.get("model") or {}).get("selected"), "served": served,
            "events_streamed": len(batch), "test_users": int(len(rows)), "train_seconds": seconds,
            "rows": {"frozen: the bundle as trained": scores(frozen_lists),
                     "live: the streamed events through ingest": scores(live_lists)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, help="a bundle to use (default: train a synthetic one)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--http-batch-size", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--single", type=int, default=300)
    parser.add_argument("--memory-events", type=int, default=300_000)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--quality", action="store_true",
                        help="also: do real-time updates help the default model as served? (synthetic and ML-100k: "
                             "each user's last 10 events held back, 5 streamed, 5 ranked; a few minutes each)")
    parser.add_argument("--quality-two-tower", action="store_true",
                        help="also: which update of a two-tower user vector helps most? (ML-100k and synthetic, "
                             "leave-last-5; ~10 min each)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes into bench/out/")
    parser.add_argument("--scratch", action="store_true", help="write into bench/out/, not bench/RESULTS.md")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the synthetic training run")
    output.add_arguments(parser)
    args = parser.parse_args()
    output.require({"httpx": "the HTTP clients"}, "bench/realtime.py")
    output.use(args, quick=args.quick)
    if args.quick:
        args.batches, args.single, args.memory_events = 3, 30, 5000
        args.overrides = ["data.source.n_users=400", "data.source.n_items=150", "data.source.n_events=12000", *args.overrides]
    at_start = common.machine()  # the load average when the run starts
    root = Path(tempfile.mkdtemp(prefix="dmp-realtime-bench-"))
    try:
        artifacts = args.artifacts or train_bundle(root / "train", args.overrides)
        data = {"machine": at_start, "bundle": describe_bundle(artifacts, args.artifacts is None),
                "in_process": in_process(artifacts, root, args)}
        if not args.no_http:
            data["http"] = over_http(artifacts, root, args)
        data["memory"] = memory(artifacts, root, args)
        if args.quality:
            data["served_quality"] = [q for q in (served_stream_quality(name, root, args.quick)
                                                  for name in ("synthetic", "ml100k")) if q is not None]
        if args.quality_two_tower:
            data["quality"] = [stream_quality("synthetic (model=two_tower, 5 epochs)", ["model=two_tower", "trainer.max_epochs=5"], root)]
            if (common.ML100K / "u.data").exists():
                data["quality"].append(stream_quality("ML-100k (experiment=ml100k, model=two_tower)", [
                    "data=movielens", f"data.path={common.ML100K}", "experiment=ml100k", "model=two_tower"], root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    common.write_section("realtime", "Real-time events (bench/realtime.py)", render(data), data)


def render(data: dict) -> str:
    p, m = data["in_process"], data["memory"]
    rows = [
        {"what": "ingest, batched (events/s)", "in process": p["batched"]["events_per_second"],
         "HTTP": data.get("http", {}).get("batched", {}).get("events_per_second"), "target": ">= 5,000"},
        {"what": "one-event update p50 / p99 (ms)", "in process": f"{p['single_disk']['p50_ms']:.1f} / {p['single_disk']['p99_ms']:.1f}",
         "HTTP": (f"{data['http']['single']['p50_ms']:.1f} / {data['http']['single']['p99_ms']:.1f}" if "http" in data else None),
         "target": "p99 <= 10 in process, <= 20 HTTP"},
        {"what": "  of which: the same with the journal on tmpfs (no disk)",
         "in process": f"{p['single_tmpfs']['p50_ms']:.1f} / {p['single_tmpfs']['p99_ms']:.1f}"},
        {"what": "  of which: fsync of one line on this disk", "in process": f"{p['fsync']['p50_ms']:.1f} / {p['fsync']['p99_ms']:.1f}"},
        {"what": "recommend right after the user's event p50 / p99 (ms)",
         "in process": f"{p['single_disk']['recommend_after_p50_ms']:.1f} / {p['single_disk']['recommend_after_p99_ms']:.1f}",
         "HTTP": (f"{data['http']['single']['recommend_after_p50_ms']:.1f} / {data['http']['single']['recommend_after_p99_ms']:.1f}"
                  if "http" in data else None)},
        {"what": "recommend for a user without real-time events p50 / p99 (ms)",
         "in process": f"{p['single_disk']['recommend_untouched_p50_ms']:.1f} / {p['single_disk']['recommend_untouched_p99_ms']:.1f}"},
        {"what": "memory growth per 1M journaled events (MiB)", "in process": m["growth_mib_per_million"]},
        {"what": "replay on start (events/s)", "in process": m["replay_events_per_second"]},
    ]
    body = ("The machine was shared with other people's jobs while this ran (load average "
            f"{data['machine']['load_average']:.1f} at the start on 2 cores): every time below is wall-clock under "
            "that load.\n\n")
    body += common.markdown_table(rows, ["what", "in process", "HTTP", "target"], floatfmt=",.0f")
    body += (f"\n\nMemory: {m['events']:,} events over {m['live_users']:,} users ({m['new_users']:,} new) grew the "
             f"process from {m['rss_mib_loaded']:.0f} to {m['rss_mib_after']:.0f} MiB; the journal takes "
             f"{m['journal_bytes_per_event']:.0f} bytes per event on disk; a restart replayed {m['replayed']:,} events "
             f"in {m['replay_seconds']:.1f} s ({m['rss_mib_after_replay']:.0f} MiB after). Bundle: {data['bundle']}.")
    for q in data.get("served_quality", []):
        body += (f"\n\n**Do the updates help the served model?** {q['data']}: the default model trained without each "
                 f"user's last 10 events (served: {q['selected']}, {q['served']}); {q['events_streamed']:,} of them (the "
                 "first 5 of each user's 10) streamed through `LiveRecommender.ingest` in time order, then the "
                 f"{q['test_users']:,} users with a new item among their last 5 ranked:\n\n")
        body += common.markdown_table([{"recommendations": k, **v} for k, v in q["rows"].items()], floatfmt=".4f")
    for q in data.get("quality", []):
        body += (f"\n\n**Do the updates help?** {q['data']}: {q['users_with_new_events']:,} users get their 5 validation "
                 f"events as real-time events, then their 5 test events are ranked ({q['test_users']:,} test users):\n\n")
        body += common.markdown_table([{"user vector": k, **v} for k, v in q["rows"].items()], floatfmt=".4f")
    return body


if __name__ == "__main__":
    main()
