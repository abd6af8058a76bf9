"""Scale: how cost grows with the data — training epoch time vs events, FAISS index build and query
time vs catalogue size, peak memory — with the log-log slope of each curve.

Every size runs in its own child process (``--child``), so its peak RSS (``VmHWM``) is its own.

* **events**: the project's synthetic generator at ``--events`` (default 1M, 4M, 16M) with
  ``events / --events-per-user`` users and ``events / --events-per-item`` items (so the embedding
  tables grow with the data, as they do in practice); ``prepare`` = generate + clean + vocabularies
  + split (the DataModule's ``prepare()``); then each model trains ``--steps`` batches of the
  config's ``data.batch_size`` with the package's trainer (no validation); seconds per step are
  timed after 5 warm-up batches and the epoch time is steps-per-epoch x seconds per step
  (measured in full when ``--steps 0``). The per-step cost grows with the embedding tables.
* **catalogue**: ``--items`` (default 10k, 100k, 1M) 64-d unit item vectors around shared
  centres (``bench/serve.py``'s generator, ``--noise``), each index of ``--indexes`` built by the
  package (``dmp_dl.index.ann.build_index`` with ``conf/index/<name>.yaml``, every core): build
  seconds; then ``dmp_dl.index.ann.measure_index`` with one FAISS thread (as ``serve.py`` runs):
  recall@10 against exact search, single-query p50 latency and queries/s of one batch call over
  ``--queries`` user vectors; and the serialized index size.

* **data stage** (``--data-stage``, its own section): ``InteractionDataModule.prepare()`` of the
  default config on the generator at ``--data-events`` (default 0.3M, 1M, 3M) with
  ``events / --data-events-per-user`` users and ``events / --data-events-per-item`` items (3M:
  100,000 x 20,000): wall and CPU seconds (every thread of the process) of each step (``load`` =
  generate, ``clean``, ``vocabularies``, ``split``, ``evaluation_sets``, ``features``) and peak RSS,
  the best of ``--repeats`` runs by CPU seconds (a shared machine slows some runs). With
  ``--baseline COMMIT`` the same is measured on that commit's ``dmp_dl`` (``git archive``), its
  steps timed from outside (its ``vocabularies`` is what remains of ``prepare()``).

* **data stage from files** (``--data-stage --files``, its own section): the same ``prepare()`` of
  ``data=events`` on the generator's log (``--files-days`` days) written as one CSV file, one
  Parquet file and a hive-partitioned Parquet dataset (``date=YYYY-MM-DD/part-0.parquet``, one folder
  per day); then the CSV and the dataset again with ``data.cleaning.min_timestamp`` at the last
  ``--files-window-days`` days (the dataset skips the older days while reading). Wall and CPU seconds
  of ``load`` (reading the files), of the rest of ``prepare()``, and peak RSS, the best of
  ``--repeats`` runs by CPU seconds.

* **data stage at scale** (``--data-stage --large``, its own section): the generator's log at
  ``--large-events`` (default 5M, 20M, 50M; users = events / 25, items = events / 1000, 90 days)
  written once as a hive-partitioned Parquet dataset (``--large-dir`` keeps it between runs), then
  ``prepare()`` of ``data=events`` on it in a fresh process per run: seconds of each step, peak
  RSS of the whole stage and of each step (sampled every 20 ms), and what the prepared data module
  still holds, the best of ``--repeats`` runs per size by CPU seconds; with the log-log slope of
  each from the smallest size to the largest.

* **Ray** (``--ray``, its own section): ``train.py``'s default model (propensity, audience and the
  report off) on the generator at ``--ray-users`` x ``--ray-items`` x ``--ray-events``, three ways:
  in one process (no Ray), under ``trainer=ray`` with one worker (``--ray-cpus`` CPUs) and with two
  (half of them each), each Ray run starting its own local cluster. The autoencoder's throughput
  (users trained a second in the held-out fit, from the facts the workers return),
  the Ray jobs' seconds (start-up, checkpoints and the fit), the run's wall time, the choice and
  test NDCG@20. The point is the same answer; Ray adds start-up and checkpoints.

Slope: least-squares fit of log(cost) on log(size); 1 is linear growth.

    python bench/scale.py                         # default sizes (CPU: minutes)
    python bench/scale.py --quick                 # tiny sizes: checks the plumbing
    python bench/scale.py --events 1000000 4000000 16000000 64000000 --items 10000 100000 1000000 10000000
    python bench/scale.py --data-stage --baseline 746f240   # the data stage, now and at a commit
    python bench/scale.py --data-stage --files --data-events 1000000   # CSV vs Parquet vs hive Parquet
    python bench/scale.py --data-stage --large --large-dir /data/dmp-large   # 5M, 20M, 50M events from hive Parquet
    python bench/scale.py --ray                  # the default model with no Ray, 1 and 2 Ray workers
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import output  # noqa: E402
from common import ROOT, compose_train_cfg, markdown_table, peak_rss_mib, write_section  # noqa: E402


def child_events(n_events: int, args) -> dict[str, Any]:
    import ours
    from hydra.utils import instantiate

    users = max(1, n_events // args.events_per_user)
    items = max(100, n_events // args.events_per_item)
    data = ["data=synthetic", f"data.source.n_users={users}", f"data.source.n_items={items}",
            f"data.source.n_events={n_events}", "callbacks=none"]
    t0 = time.perf_counter()
    dm = instantiate(ours.compose_train_cfg(data, Path(args.workdir) / "dm").data, _convert_="all").prepare()
    prepare_s = time.perf_counter() - t0
    import torch

    out: dict[str, Any] = {"events": n_events, "device": "cuda" if torch.cuda.is_available() and not args.cpu else "cpu",
                           "users": dm.n_users, "items": dm.n_items,
                           "train_events": int(len(dm.train_idx)), "prepare_s": prepare_s,
                           "rss_after_prepare_mib": peak_rss_mib(), "models": {}}
    for model in args.models:
        device = ["trainer.accelerator=cpu", "trainer.devices=1"] if args.cpu else []
        cfg = ours.compose_train_cfg([*data, f"model={model}", *device, *args.overrides], Path(args.workdir) / model)
        r = ours.train_steps(cfg, dm, args.steps or None)
        r["epoch_s"] = r["seconds"] if r["steps"] == r["steps_per_epoch"] else r["seconds_per_step"] * r["steps_per_epoch"]
        r["extrapolated"] = r["steps"] < r["steps_per_epoch"]
        out["models"][model] = r
    out["peak_rss_mib"] = peak_rss_mib()
    return out


DATA_STEPS = ("load", "clean", "vocabularies", "split", "evaluation_sets", "features")


def child_data(n_events: int, args) -> dict[str, Any]:
    """One ``prepare()`` of the synthetic config at ``n_events``; with ``--tree``, of the ``dmp_dl``
    in that folder (steps timed by wrapping its functions when it records none itself)."""
    import functools

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    tree = Path(args.tree).resolve() if args.tree else ROOT
    sys.path.insert(0, str(tree))
    from hydra.utils import instantiate

    import dmp_dl.data.datamodule as dmm

    if not str(Path(dmm.__file__).resolve()).startswith(str(tree)):
        raise RuntimeError(f"dmp_dl imported from {dmm.__file__}, not {tree}")
    try:  # the dict settings that take new keys, registered as the tree's commands register them
        from dmp_dl.core.open_settings import register
    except ImportError:  # a tree from before they existed
        pass
    else:
        register()
    users = max(1, n_events // args.data_events_per_user)
    items = max(100, n_events // args.data_events_per_item)
    with initialize_config_dir(config_dir=str(tree / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=synthetic", f"data.source.n_users={users}",
                                          f"data.source.n_items={items}", f"data.source.n_events={n_events}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(args.workdir) / "data")
    dm = instantiate(cfg.data, _convert_="all")
    outside: dict[str, dict[str, float]] = {}

    def timed(step, fn):
        @functools.wraps(fn)
        def run(*a, **k):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                got = outside.setdefault(step, {"wall": 0.0, "cpu": 0.0})
                got["wall"] += time.perf_counter() - wall
                got["cpu"] += time.process_time() - cpu
        return run

    records = hasattr(dm, "step_seconds")
    if not records:  # an older dmp_dl: time its steps from outside
        dm.source.load = timed("load", dm.source.load)
        dmm.clean_log = timed("clean", dmm.clean_log)
        dmm.split_events = timed("split", dmm.split_events)
        dmm.InteractionDataModule._index_splits = timed("evaluation_sets", dmm.InteractionDataModule._index_splits)
        dmm.FeatureTable.build = classmethod(timed("features", dmm.FeatureTable.build.__func__))
    load_average = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    dm.prepare()
    total = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    steps = dict(dm.step_seconds) if records else outside
    if not records:
        steps["vocabularies"] = {k: total[k] - sum(v[k] for v in outside.values()) for k in ("wall", "cpu")}
    return {"events": n_events, "users": dm.n_users, "items": dm.n_items, "tree": str(tree),
            "steps": {k: steps.get(k, {"wall": 0.0, "cpu": 0.0}) for k in DATA_STEPS}, "total": total,
            "split_method": dm.split_method, "load_average_at_start": load_average, "peak_rss_mib": peak_rss_mib(),
            "primitives": numpy_primitives(n_events, dm.n_users)}


FILE_FORMS = ("csv", "parquet", "hive", "csv, window", "hive, window")


def write_event_files(n_events: int, args, folder: Path) -> dict[str, Any]:
    """The generator's log at ``n_events`` as ``events.csv``, ``events.parquet`` and ``events/``
    (hive: one ``date=`` folder per day); their paths and sizes, and the window's first day."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dmp_dl.data.synthetic import SyntheticSource

    source = SyntheticSource(n_users=max(1, n_events // args.data_events_per_user),
                             n_items=max(100, n_events // args.data_events_per_item), n_events=n_events,
                             days=args.files_days)
    events = source.load().events
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "events.csv", "parquet": folder / "events.parquet", "hive": folder / "events"}
    events.to_csv(paths["csv"], index=False)
    table = pa.Table.from_pandas(events, preserve_index=False)
    pq.write_table(table, paths["parquet"])
    days = pd.to_datetime(events["timestamp"], unit="s", utc=True).dt.strftime("%Y-%m-%d")
    for day, rows in events.groupby(days, sort=True):
        (paths["hive"] / f"date={day}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), paths["hive"] / f"date={day}" / "part-0.parquet")
    since = (pd.Timestamp(source.end, tz="UTC") - pd.Timedelta(days=args.files_window_days)).strftime("%Y-%m-%d")
    sizes = {k: (sum(f.stat().st_size for f in p.rglob("*.parquet")) if p.is_dir() else p.stat().st_size) / 2**20
             for k, p in paths.items()}
    return {"paths": {k: str(p) for k, p in paths.items()}, "mib": sizes, "since": since,
            "partitions": len(list(paths["hive"].glob("date=*")))}


def child_files(n_events: int, args) -> dict[str, Any]:
    """One ``prepare()`` of ``data=events`` on ``--files-path`` (with ``--files-since``: the window)."""
    from hydra.utils import instantiate

    overrides = ["data=events", f"data.path={args.files_path}"]
    if args.files_since:
        overrides.append(f"data.cleaning.min_timestamp={args.files_since}")
    dm = instantiate(compose_train_cfg(overrides, Path(args.workdir) / "files").data, _convert_="all")
    load_average = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    dm.prepare()
    total = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    rep = dm.report.events
    unread = sum(dm.raw_meta.get("unread_rows", {}).values())  # rows the window left unread (Parquet)
    return {"events": n_events, "form": args.files_form, "rows_in": rep.rows_in, "rows_read": rep.rows_in - unread,
            "rows_out": rep.rows_out,
            "dropped": rep.dropped, "users": dm.n_users, "items": dm.n_items, "steps": dict(dm.step_seconds),
            "total": total, "load_average_at_start": load_average, "peak_rss_mib": peak_rss_mib()}


def data_files(args) -> dict:
    """The ``--data-stage --files`` section: ``prepare()`` from CSV, Parquet and hive Parquet."""
    t0 = time.perf_counter()
    runs: list[dict] = []
    written: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="dmp-bench-files-") as tmp:
        for n in args.data_events:
            files = written[n] = write_event_files(n, args, Path(tmp) / f"log-{n}")
            print(f"[scale] files {n:,}: {json.dumps(files)}", flush=True)
            for form in FILE_FORMS:
                kind, _, window = form.partition(", ")
                child_args = argparse.Namespace(**{**vars(args), "files_form": form, "files_path": files["paths"][kind],
                                                   "files_since": files["since"] if window else None})
                tries = [run_child("files", n, child_args, Path(tmp)) for _ in range(max(1, args.repeats))]
                ok = [r for r in tries if "error" not in r]
                best = min(ok, key=lambda r: r["total"]["cpu"]) if ok else {**tries[0], "form": form}
                runs.append({**best, "cpu_runs": [r["total"]["cpu"] for r in ok], "mib": files["mib"][kind]})
    rows = []
    for r in runs:
        if "error" in r:
            rows.append({"events": f"{r['size']:,}", "input": r["form"], "total s (CPU / wall)": r["error"]})
            continue
        load = r["steps"]["load"]
        rest = {k: r["total"][k] - load[k] for k in ("cpu", "wall")}
        rows.append({"events": f"{r['events']:,}", "input": r["form"], "on disk MiB": f"{r['mib']:,.1f}",
                     "rows read": f"{r['rows_read']:,}",
                     "kept": f"{r['rows_out']:,}", "load s (CPU / wall)": f"{load['cpu']:.2f} / {load['wall']:.2f}",
                     "rest of prepare s": f"{rest['cpu']:.2f} / {rest['wall']:.2f}",
                     "total s (CPU / wall)": f"**{r['total']['cpu']:.2f}** / {r['total']['wall']:.2f}",
                     "peak RSS MiB": f"{r['peak_rss_mib']:,.0f}", "load at start": f"{r['load_average_at_start']:.1f}"})
    first = next(iter(written.values()), {})
    body = [f"`InteractionDataModule.prepare()` of `train.py data=events` (its default cleaning) on the generator's log "
            f"(users = events / {args.data_events_per_user}, items = events / {args.data_events_per_item}, "
            f"{args.files_days} days) written as one CSV file, one Parquet file (pyarrow, snappy) and a hive-partitioned "
            f"Parquet dataset ({first.get('partitions', '?')} `date=` folders, one file each); `window`: "
            f"`data.cleaning.min_timestamp={first.get('since', '?')}` (the last {args.files_window_days} days). One process "
            f"per run, the best of {args.repeats} runs by CPU seconds. `load` reads the files (CPU seconds count every "
            "thread); `rest of prepare` is cleaning, vocabularies, split, evaluation sets and features. `rows read`: rows "
            "loaded into memory (the dataset with a window leaves the older days unread; CSV reads every row and cleaning "
            "drops them).", "", markdown_table(rows)]
    data = {"runs": runs, "files": written, "seconds": time.perf_counter() - t0, "cpu_threads": os.cpu_count()}
    body.append(f"\nSection wall time: {data['seconds']:.0f} s.")
    write_section("data_files", "Data stage from files", "\n".join(body), data)
    return data


def write_large_dataset(n_events: int, folder: Path) -> dict[str, Any]:
    """The generator's log at ``n_events`` (users = events / 25, items = events / 1000, 90 days) as a
    hive-partitioned Parquet dataset under ``folder/events`` (one ``date=`` folder per day), written
    once (a ``done.json`` beside it marks a complete dataset); its path, size and shape."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dmp_dl.data.synthetic import SyntheticSource

    done = folder / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    n_users, n_items = max(1, n_events // 25), max(100, n_events // 1000)
    events = SyntheticSource(n_users=n_users, n_items=n_items, n_events=n_events, days=90).load().events
    table = pa.Table.from_pandas(events, preserve_index=False)
    day = events["timestamp"].to_numpy() // 86400
    del events
    order = np.argsort(day, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(day[order]) != 0, True])
    root = folder / "events"
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        name = time.strftime("%Y-%m-%d", time.gmtime(int(day[order[lo]]) * 86400))
        (root / f"date={name}").mkdir(parents=True, exist_ok=True)
        pq.write_table(table.take(pa.array(order[lo:hi])), root / f"date={name}" / "part-0.parquet")
    info = {"path": str(root), "events": n_events, "users": n_users, "items": n_items, "partitions": len(bounds) - 1,
            "mib": sum(f.stat().st_size for f in root.rglob("*.parquet")) / 2**20}
    done.write_text(json.dumps(info))
    return info


def child_large(n_events: int, args) -> dict[str, Any]:
    """One ``prepare()`` of ``data=events`` on ``--files-path``, with the peak RSS of each step."""
    import threading

    from hydra.utils import instantiate

    import dmp_dl.data.datamodule as dmm

    current, peaks = ["start"], {}

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def sample() -> None:
        while True:
            peaks[current[0]] = max(peaks.get(current[0], 0.0), rss_mib())
            time.sleep(0.02)

    step = dmm.StepClock.step

    def tagged(self, name):  # the step's name for the sampler, then the package's own clock
        current[0] = name
        return step(self, name)

    dmm.StepClock.step = tagged
    dm = instantiate(compose_train_cfg(["data=events", f"data.path={args.files_path}"], Path(args.workdir) / "large").data,
                     _convert_="all")
    threading.Thread(target=sample, daemon=True).start()
    before = rss_mib()
    load_average = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    dm.prepare()
    total = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    current[0] = "after"
    time.sleep(0.1)
    return {"events": n_events, "rows_out": dm.report.events.rows_out, "users": dm.n_users, "items": dm.n_items,
            "steps": dict(dm.step_seconds), "total": total, "step_peak_rss_mib": peaks, "rss_before_mib": before,
            "held_mib": rss_mib() - before, "load_average_at_start": load_average, "peak_rss_mib": peak_rss_mib()}


def data_large(args) -> dict:
    """The ``--data-stage --large`` section: ``prepare()`` of hive Parquet datasets at scale."""
    t0 = time.perf_counter()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dmp-bench-large-") as tmp:
        base = Path(args.large_dir) if args.large_dir else Path(tmp)
        for n in args.large_events:
            g0 = time.perf_counter()
            info = write_large_dataset(n, base / f"hive-{n}")
            print(f"[scale] large {n:,}: dataset {info} ({time.perf_counter() - g0:.0f} s)", flush=True)
            child_args = argparse.Namespace(**{**vars(args), "files_path": info["path"], "files_form": None,
                                               "files_since": None})
            tries = [run_child("large", n, child_args, Path(tmp)) for _ in range(max(1, args.repeats))]
            done = [t for t in tries if "error" not in t]
            res = min(done, key=lambda t: t["total"]["cpu"]) if done else tries[0]
            runs.append({**res, "dataset": info, "tries": len(tries),
                         "peak_rss_mib_all": [t["peak_rss_mib"] for t in done],
                         "wall_all": [round(t["total"]["wall"], 2) for t in done]})
    ok = [r for r in runs if "error" not in r]
    rows = []
    for r in runs:
        if "error" in r:
            rows.append({"events": f"{r['size']:,}", "total s (CPU / wall)": r["error"]})
            continue
        steps = r["steps"]
        peaks = r["step_peak_rss_mib"]
        rows.append({"events": f"{r['events']:,}", "users x items": f"{r['users']:,} x {r['items']:,}",
                     "on disk MiB": f"{r['dataset']['mib']:,.0f}",
                     **{f"{k} s": f"{v['wall']:.1f}" for k, v in steps.items()},
                     "total s (CPU / wall)": f"**{r['total']['cpu']:.1f}** / {r['total']['wall']:.1f}",
                     "peak RSS MiB": f"**{r['peak_rss_mib']:,.0f}**",
                     "peak step": max((k for k in peaks if k in steps), key=lambda k: peaks[k], default="-"),
                     "held after MiB": f"{r['held_mib']:,.0f}", "load at start": f"{r['load_average_at_start']:.1f}"})
    slopes = {}
    if len(ok) > 1:
        sizes = [r["events"] for r in ok]
        slopes = {"wall": slope(sizes, [r["total"]["wall"] for r in ok]), "cpu": slope(sizes, [r["total"]["cpu"] for r in ok]),
                  "peak_rss": slope(sizes, [r["peak_rss_mib"] for r in ok]),
                  "peak_rss_above_start": slope(sizes, [r["peak_rss_mib"] - r["rss_before_mib"] for r in ok]),
                  **{f"wall.{k}": slope(sizes, [r["steps"][k]["wall"] for r in ok]) for k in ok[0]["steps"]}}
    body = ["`InteractionDataModule.prepare()` of `train.py data=events` (its default cleaning) on the generator's log "
            "(users = events / 25, items = events / 1000, 90 days) as a hive-partitioned Parquet dataset (one `date=` "
            "folder per day), one process per run, the best of `--repeats` runs per size by CPU seconds (every run's "
            "peak RSS and wall seconds in the JSON). Step seconds are wall seconds; `peak step`: the step during "
            "which RSS peaked (sampled every 20 ms); `held after`: RSS after `prepare()` above the process before it "
            "(the data the model stage starts from, plus what the allocator keeps).", "", markdown_table(rows)]
    if slopes:
        body += ["", "Growth (slope of log cost on log events; 1 = linear): " + ", ".join(
            f"{k} {v:.2f}" for k, v in slopes.items() if v is not None) + "."]
    data = {"runs": runs, "slopes": slopes, "seconds": time.perf_counter() - t0, "cpu_threads": os.cpu_count()}
    body.append(f"\nSection wall time: {data['seconds']:.0f} s.")
    write_section("data_large", "Data stage at scale (hive Parquet)", "\n".join(body), data)
    return data


def numpy_primitives(n: int, n_users: int, repeats: int = 5) -> dict[str, float]:
    """CPU seconds of plain linear numpy work on arrays of the log's size (best of ``repeats``): how
    this machine's cost per element grows with the size (caches) for work that is linear."""
    rng = np.random.default_rng(0)
    values, users = rng.random(n), rng.integers(0, max(n_users, 1), n)
    per_user = rng.random(max(n_users, 1))
    work = {"copy": lambda: values.copy(), "gather": lambda: per_user[users],
            "bincount": lambda: np.bincount(users, minlength=n_users), "sort": lambda: np.sort(users)}
    out = {}
    for name, run in work.items():
        best = float("inf")
        for _ in range(repeats):
            cpu = time.process_time()
            run()
            best = min(best, time.process_time() - cpu)
        out[name] = best
    return out


def child_catalogue(n_items: int, args) -> dict[str, Any]:
    import importlib.util

    import faiss
    from omegaconf import OmegaConf

    from dmp_dl.index.ann import IndexOptions, build_index, measure_index

    spec = importlib.util.spec_from_file_location("bench_serve", BENCH / "serve.py")  # not the root serve.py
    bench_serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_serve)
    queries, items, _ = bench_serve.synthetic(args.queries, n_items, args.dim, args.noise)
    out: dict[str, Any] = {"items": n_items, "dim": args.dim, "indexes": {}}
    for name in args.indexes:
        cfg = OmegaConf.load(ROOT / "conf" / "index" / f"{name}.yaml")
        cfg.seed = 0
        fields = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if not k.startswith("_")}
        opts = IndexOptions(**{**fields, "eval_queries": args.queries})
        factory, params = opts.resolve(n_items)
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # build with every core
        t0 = time.perf_counter()
        index = build_index(items, factory, params, opts.train_size, opts.seed)
        info = {"factory": factory, "search_params": params, "build_seconds": time.perf_counter() - t0}
        faiss.omp_set_num_threads(1)  # query as serve.py does: one thread per query
        info.update(measure_index(index, items, queries))
        info["index_mib"] = faiss.serialize_index(index).nbytes / 2**20
        out["indexes"][name] = info
        del index
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def run_child(kind: str, size: int, args, workdir: Path) -> dict[str, Any]:
    """One size in a fresh process; its JSON, or an ``error`` row (e.g. out of memory)."""
    out = workdir / f"{kind}-{size}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(size), "--child-out", str(out),
           "--workdir", str(workdir), *child_flags(args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"[scale] {kind} {size:,}: failed (exit {proc.returncode}): {' | '.join(tail)}", flush=True)
        return {"size": size, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    print(f"[scale] {kind} {size:,}: {json.dumps(res, default=str)[:400]}", flush=True)
    return res


def child_flags(args) -> list[str]:
    flags = ["--data-events-per-user", str(args.data_events_per_user), "--data-events-per-item",
             str(args.data_events_per_item)] + (["--tree", str(args.tree)] if args.tree else [])
    for name in ("files_form", "files_path", "files_since"):
        if getattr(args, name, None):
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    flags += ["--models", *args.models, "--indexes", *args.indexes, "--steps", str(args.steps),
             "--events-per-user", str(args.events_per_user), "--events-per-item", str(args.events_per_item),
             "--queries", str(args.queries), "--dim", str(args.dim), "--noise", str(args.noise)]
    return flags + (["--cpu"] if args.cpu else []) + (["--", *args.overrides] if args.overrides else [])


def slope(sizes: list[float], costs: list[float]) -> float | None:
    """Least-squares slope of log(cost) on log(size) (None with fewer than two usable points)."""
    pts = [(s, c) for s, c in zip(sizes, costs) if c is not None and c > 0 and s > 0]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def summarise(events: list[dict], catalogue: list[dict], args) -> tuple[str, dict]:
    ok_e = [r for r in events if "error" not in r]
    rows, slopes = [], {}
    for r in events:
        if "error" in r:
            rows.append({"events": f"{r['size']:,}", "model": "—", "epoch s": r["error"]})
            continue
        for model, m in r["models"].items():
            rows.append({"events": f"{r['events']:,}", "users": f"{r['users']:,}", "items": f"{r['items']:,}",
                         "prepare s": f"{r['prepare_s']:.1f}", "model": model,
                         "s / step": f"{m['seconds_per_step']:.4f}",
                         "epoch s": f"{m['epoch_s']:.1f}" + (" (extrap.)" if m["extrapolated"] else ""),
                         "examples/s": f"{m['examples_per_second']:,.0f}", "peak RSS MiB": f"{r['peak_rss_mib']:,.0f}"})
    sizes = [r["events"] for r in ok_e]
    slopes["prepare_s"] = slope(sizes, [r["prepare_s"] for r in ok_e])
    slopes["peak_rss_events"] = slope(sizes, [r["peak_rss_mib"] for r in ok_e])
    for model in args.models:
        have = [r for r in ok_e if model in r["models"]]
        slopes[f"epoch_s.{model}"] = slope([r["events"] for r in have], [r["models"][model]["epoch_s"] for r in have])
    crows = []
    ok_c = [r for r in catalogue if "error" not in r]
    for r in catalogue:
        if "error" in r:
            crows.append({"items": f"{r['size']:,}", "index": "—", "build s": r["error"]})
            continue
        for name, i in r["indexes"].items():
            crows.append({"items": f"{r['items']:,}", "index": f"`{i['factory']}` {i['search_params']}".strip(),
                          "build s": f"{i['build_seconds']:.2f}", "recall@10": i.get("recall@10"),
                          "p50 ms": f"{i['latency_ms_p50']:.3f}", "batch q/s": f"{i['qps_batch']:,.0f}",
                          "index MiB": f"{i['index_mib']:,.1f}", "peak RSS MiB": f"{r['peak_rss_mib']:,.0f}"})
    csizes = [r["items"] for r in ok_c]
    for name in args.indexes:
        have = [r for r in ok_c if name in r["indexes"]]
        slopes[f"build_s.{name}"] = slope([r["items"] for r in have], [r["indexes"][name]["build_seconds"] for r in have])
        slopes[f"query_p50.{name}"] = slope([r["items"] for r in have], [r["indexes"][name]["latency_ms_p50"] for r in have])
    slopes["peak_rss_catalogue"] = slope(csizes, [r["peak_rss_mib"] for r in ok_c])
    srows = [{"cost": k, "log-log slope": "—" if v is None else f"{v:.2f}"} for k, v in slopes.items()]
    steps = "whole epochs" if not args.steps else (f"{args.steps} batches per size and model, s / step after 5 "
                                                    "warm-up batches, epoch time extrapolated")
    body = "\n".join([
        f"### Epoch time vs events (synthetic, users = events / {args.events_per_user}, items = events / "
        f"{args.events_per_item}; {steps}; trained on {', '.join(sorted({r['device'] for r in ok_e})) or '—'})", "",
        markdown_table(rows, ["events", "users", "items", "prepare s", "model", "s / step", "epoch s", "examples/s",
                             "peak RSS MiB"]), "",
        f"### FAISS index vs catalogue size ({args.dim}-d, {args.queries} queries, noise {args.noise}; "
        "built with every core, queried with one thread: `p50 ms` one query, `batch q/s` all queries in one call)", "",
        markdown_table(crows, ["items", "index", "build s", "recall@10", "p50 ms", "batch q/s", "index MiB", "peak RSS MiB"]), "",
        "### Growth (slope of log cost on log size; 1 = linear)", "", markdown_table(srows)])
    return body, slopes


def data_stage(args) -> dict:
    """The ``--data-stage`` section: ``prepare()`` per size, now and (``--baseline``) at a commit."""
    import io
    import tarfile

    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="dmp-bench-data-") as tmp:
        trees: list[tuple[str, Path | None]] = [("now", None)]
        if args.baseline:
            base = Path(tmp) / "baseline"
            base.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "dmp_dl", "conf"],
                                     capture_output=True, check=True).stdout
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(base, filter="data")
            trees.insert(0, (args.baseline, base))
        for label, tree in trees:
            child_args = argparse.Namespace(**{**vars(args), "tree": tree})
            for n in args.data_events:
                tries = [run_child("data", n, child_args, Path(tmp)) for _ in range(max(1, args.repeats))]
                ok = [r for r in tries if "error" not in r]
                best = min(ok, key=lambda r: r["total"]["cpu"]) if ok else tries[0]
                runs.setdefault(label, []).append({**best, "code": label, "cpu_runs": [r["total"]["cpu"] for r in ok]})
    rows, slopes = [], {}
    for label, got in runs.items():
        ok = [r for r in got if "error" not in r]
        for r in got:
            if "error" in r:
                rows.append({"code": label, "events": f"{r['size']:,}", "total s": r["error"]})
                continue
            rows.append({"code": f"`{label}`", "events": f"{r['events']:,}", "users x items": f"{r['users']:,} x {r['items']:,}",
                         **{step: f"{v['cpu']:.2f} / {v['wall']:.2f}" for step, v in r["steps"].items()},
                         "total s (CPU / wall)": f"**{r['total']['cpu']:.2f}** / {r['total']['wall']:.2f}",
                         "peak RSS MiB": f"{r['peak_rss_mib']:,.0f}", "load at start": f"{r['load_average_at_start']:.1f}"})
        sizes = [r["events"] for r in ok]
        slopes[label] = {"cpu": slope(sizes, [r["total"]["cpu"] for r in ok]),
                         "wall": slope(sizes, [r["total"]["wall"] for r in ok]),
                         **{f"cpu.{step}": slope(sizes, [r["steps"][step]["cpu"] for r in ok]) for step in DATA_STEPS}}
    srows = [{"code": f"`{label}`", **{k: "—" if v is None else f"{v:.2f}" for k, v in sl.items()}} for label, sl in slopes.items()]
    now = [r for r in runs.get("now", []) if "error" not in r and "primitives" in r]
    if len(now) > 1:  # linear numpy work on arrays of the same sizes, for scale
        slopes["numpy"] = {name: slope([r["events"] for r in now], [r["primitives"][name] for r in now])
                           for name in now[0]["primitives"]}
        srows.append({"code": "numpy, linear work (reference)", "cpu": ", ".join(
            f"{name} {v:.2f}" for name, v in slopes["numpy"].items() if v is not None)})
    body = [f"`InteractionDataModule.prepare()` of `train.py`'s default config on the generator (users = events / "
            f"{args.data_events_per_user}, items = events / {args.data_events_per_item}), one process per run, the best of "
            f"{args.repeats} runs by CPU seconds. Each step: CPU seconds (every thread) / wall seconds; `load` is the "
            "generator. On a shared machine wall time follows the load; CPU seconds less so.", "",
            markdown_table(rows), "", "Growth (slope of log seconds on log events; 1 = linear). The reference row times "
            "plain numpy work that is linear (a copy of n floats, a gather of n values from a per-user table, a bincount "
            "of n user indices; and a sort of them, n log n) at the same sizes: what this machine's caches make of linear growth.",
            "", markdown_table(srows)]
    if args.baseline and args.baseline in runs:
        before = {r["events"]: r for r in runs[args.baseline] if "error" not in r}
        ratio = [{"events": f"{r['events']:,}", f"`{args.baseline}` CPU s": f"{before[r['events']]['total']['cpu']:.2f}",
                  "now CPU s": f"{r['total']['cpu']:.2f}",
                  "CPU speed-up": f"**{before[r['events']]['total']['cpu'] / r['total']['cpu']:.1f}x**",
                  "wall speed-up": f"{before[r['events']]['total']['wall'] / r['total']['wall']:.1f}x",
                  "peak RSS MiB before / now": f"{before[r['events']]['peak_rss_mib']:,.0f} / {r['peak_rss_mib']:,.0f}"}
                 for r in runs["now"] if "error" not in r and r["events"] in before]
        body += ["", f"Against `{args.baseline}` (its steps timed from outside; its `vocabularies` is the rest of "
                 "`prepare()`):", "", markdown_table(ratio)]
    data = {"runs": runs, "slopes": slopes, "seconds": time.perf_counter() - t0, "cpu_threads": os.cpu_count(),
            "baseline": args.baseline}
    body.append(f"\nSection wall time: {data['seconds']:.0f} s.")
    write_section("data_stage", "Data stage", "\n".join(body), data)
    return data


RAY_RUNS = {  # label -> train.py overrides
    "one process, no Ray": [],
    "trainer=ray, 1 worker": ["trainer=ray", "trainer.num_workers=1", "trainer.cpus_per_worker={cpus}"],
    "trainer=ray, 2 workers": ["trainer=ray", "trainer.num_workers=2", "trainer.cpus_per_worker={half}"],
}


def ray_run(label: str, overrides: list[str], args, workdir: Path) -> dict[str, Any]:
    """One ``train.py`` run of the ``--ray`` section in a child process; its facts from ``metrics.json``."""
    out = workdir / label.replace(" ", "_").replace(",", "").replace("=", "-")
    cpus = max(int(args.ray_cpus), 1)
    settings = [o.format(cpus=cpus, half=max(cpus / 2, 0.5)) for o in overrides]
    cmd = [sys.executable, str(ROOT / "train.py"), f"data.source.n_users={args.ray_users}",
           f"data.source.n_items={args.ray_items}", f"data.source.n_events={args.ray_events}", "propensity.enabled=false",
           "audience.enabled=false", "evaluation.report=null", "logger=none", "trainer.enable_progress_bar=false",
           f"paths.output_dir={out}", *settings, *args.overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each Ray run starts its own local cluster
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{label}: train.py failed\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    model = metrics["model"]
    vae = model["candidates"]["vae"]["details"]
    refit = model.get("refit_facts") or {}
    users = vae["steps"] * vae["batch_users"]
    jobs = [vae.get("ray", {}).get("job_seconds"), (refit.get("vae_ray") or {}).get("job_seconds")]
    return {"run": label, "settings": " ".join(settings) or "(default trainer)",
            "users/s (held-out fit)": users / vae["fit_seconds"], "held-out fit s": vae["fit_seconds"],
            "epochs": vae["epochs_run"], "refit s": refit.get("vae_seconds"), "Ray jobs s": sum(j for j in jobs if j) or None,
            "wall s": wall, "chosen": model["selected"], "test NDCG@20": metrics["ranking"]["auto"]["ndcg@20"]}


def ray_section(args) -> dict:
    """The ``--ray`` section: the default model without Ray and with 1 and 2 Ray Train workers."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="dmp-bench-ray-") as tmp:
        for label, overrides in RAY_RUNS.items():
            rows.append(ray_run(label, overrides, args, Path(tmp)))
            print(rows[-1], flush=True)
    base = rows[0]
    for row in rows:
        row["users/s vs one process"] = row["users/s (held-out fit)"] / base["users/s (held-out fit)"]
        row["NDCG vs one process"] = row["test NDCG@20"] / base["test NDCG@20"]
    columns = ["run", "settings", "held-out fit s", "epochs", "users/s (held-out fit)", "users/s vs one process",
               "refit s", "Ray jobs s", "wall s", "chosen", "test NDCG@20", "NDCG vs one process"]
    body = [f"`train.py`'s default model on the generator at {args.ray_users:,} users x {args.ray_items:,} items x "
            f"{args.ray_events:,} events (propensity, audience and the report off), one run each, one after the other. "
            "`held-out fit s`: the autoencoder's Lightning fit with early stopping (in the Ray runs: worker 0's, "
            "from the facts it returns); `users/s`: users trained a second in it (steps x users a step, all workers "
            "together); `Ray jobs s`: both Ray Train jobs (held-out fit and refit) from submission to the weights back "
            "in the driver, with the workers' start and the checkpoints; `wall s`: the whole run, with a local Ray "
            "cluster's start in the Ray runs.", "", markdown_table(rows, columns, floatfmt=".4g")]
    data = {"rows": rows, "users": args.ray_users, "items": args.ray_items, "events": args.ray_events,
            "cpus": args.ray_cpus}
    write_section("ray", "Ray Train (trainer=ray)", "\n".join(body), data)
    return data


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, nargs="*", default=[1_000_000, 4_000_000, 16_000_000])
    ap.add_argument("--items", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--models", nargs="+", default=["mf", "two_tower"], choices=["mf", "two_tower"])
    ap.add_argument("--indexes", nargs="+", default=["flat", "hnsw"], choices=["flat", "hnsw", "ivf"])
    ap.add_argument("--steps", type=int, default=30, help="batches run per size and model, the first 5 untimed (0: a whole epoch)")
    ap.add_argument("--events-per-user", type=int, default=30)
    ap.add_argument("--events-per-item", type=int, default=200)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--noise", type=float, default=1.5)
    ap.add_argument("--cpu", action="store_true", help="train on CPU even when CUDA is present")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a plumbing check, not numbers")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", action="store_true", help="write into bench/out/ (git-ignored), not bench/RESULTS.md")
    ap.add_argument("--data-stage", action="store_true", help="measure the data stage instead (its own section)")
    ap.add_argument("--data-events", type=int, nargs="+", default=[300_000, 1_000_000, 3_000_000])
    ap.add_argument("--data-events-per-user", type=int, default=30)
    ap.add_argument("--data-events-per-item", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2, help="data stage: runs per size, the best by CPU seconds kept")
    ap.add_argument("--baseline", help="data stage: also measure this commit's dmp_dl (git archive)")
    ap.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--files", action="store_true",
                    help="data stage: from a CSV file, a Parquet file and a hive-partitioned Parquet dataset (its own section)")
    ap.add_argument("--large", action="store_true", help="--data-stage: hive Parquet datasets at scale (its own section)")
    ap.add_argument("--large-events", type=int, nargs="+", default=[5_000_000, 20_000_000, 50_000_000])
    ap.add_argument("--large-dir", help="--large: keep the generated datasets here (reused when present)")
    ap.add_argument("--files-days", type=int, default=30, help="--files: days of the log (one partition folder each)")
    ap.add_argument("--files-window-days", type=int, default=7, help="--files: the window of the windowed runs, in days")
    ap.add_argument("--files-form", help=argparse.SUPPRESS)
    ap.add_argument("--files-path", help=argparse.SUPPRESS)
    ap.add_argument("--files-since", help=argparse.SUPPRESS)
    ap.add_argument("--ray", action="store_true", help="the default model with no Ray, 1 and 2 Ray workers (its own section)")
    ap.add_argument("--ray-users", type=int, default=20_000)
    ap.add_argument("--ray-items", type=int, default=4_000)
    ap.add_argument("--ray-events", type=int, default=600_000)
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2, help="--ray: CPUs for the Ray workers in all")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for our models (after --)")
    output.add_arguments(ap)
    args = ap.parse_args(argv)
    output.use(args, quick=args.quick)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.child:
        kind, size = args.child[0], int(args.child[1])
        child = {"events": child_events, "data": child_data, "catalogue": child_catalogue, "files": child_files,
                 "large": child_large}[kind]
        res = child(size, args)
        args.child_out.write_text(json.dumps(res, default=str))
        return None
    if args.quick:
        args.events, args.items, args.steps, args.queries = [30_000, 120_000], [2_000, 20_000], 20, 200
        args.data_events, args.repeats, args.large_events = [30_000, 100_000], 1, [30_000, 100_000]
    if args.ray:
        if args.quick:
            args.ray_users, args.ray_items, args.ray_events = 600, 200, 12_000
        return ray_section(args)
    if args.data_stage:
        if args.large:
            return data_large(args)
        return data_files(args) if args.files else data_stage(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmp-bench-scale-") as tmp:
        events = [run_child("events", n, args, Path(tmp)) for n in args.events]
        catalogue = [run_child("catalogue", n, args, Path(tmp)) for n in args.items]
    body, slopes = summarise(events, catalogue, args)
    data = {"events": events, "catalogue": catalogue, "slopes": slopes, "quick": args.quick,
            "seconds": time.perf_counter() - t0, "cpu_threads": os.cpu_count()}
    if args.quick:
        body = "**Quick run (`--quick`: tiny sizes) — checks the plumbing; not comparable numbers.**\n\n" + body
    body += f"\n\nSection wall time: {data['seconds']:.0f} s."
    write_section("scale", "Scale", body, data)
    return data


if __name__ == "__main__":
    main()
