"""The default run end to end at a platform's size: ``python train.py`` (``model=auto``) on generated
logs, its stages' seconds, peak memory and test quality, against one EASE fit on the same data timed
in the same process.

Each size runs in its own child process (``--child``), which

1. runs the default pipeline (``dmp_dl.pipeline.run.run``: data, the model choice with its refit,
   evaluation, propensity, audience, export, report — everything ``python train.py`` does) on the
   built-in synthetic generator with ``--users`` users, ``--items`` items and ``--events`` events
   (one size per position of the three lists), writing into a temporary folder;
2. then times one EASE fit (:func:`dmp_dl.models.ease.ease_weights`, the l2 the run chose) on the
   run's training matrix on the same device — the reference "one EASE fit";
3. reports the stages' seconds (``metrics.json["stages"]``), the model stage's parts (EASE and
   autoencoder fits, refit), test NDCG@20 / recall@20 of the served model and the baselines, the
   peak RSS (``VmHWM``) and, on CUDA, the peak device memory.

On a CUDA machine ``--gpu-util`` samples ``nvidia-smi`` every second during the run and reports the
mean and the share of samples above 0 % during the model stage. Slope: least-squares fit of
log(cost) on log(events) over the sizes given; 1 is linear growth.

    python bench/scale_run.py                                   # 30k users x 20k items x 0.3M, 100k x 20k x 3M
    python bench/scale_run.py --users 3000 --items 1000 --events 100000 --scratch   # the default synthetic run
    python bench/scale_run.py --users 137000 --items 20000 --events 10000000 --gpu-util   # ML-20M-sized, on a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import output  # noqa: E402
from common import compose_train_cfg, markdown_table, write_section  # noqa: E402
from scale import peak_rss_mib, slope  # noqa: E402


class GpuSampler:
    """``nvidia-smi`` utilisation and memory once a second in a background thread (CUDA machines)."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []  # (time.perf_counter(), util %, memory MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                     "-lms", "1000"], stdout=subprocess.PIPE, text=True)
        except OSError:
            return
        while not self._stop.is_set():
            line = proc.stdout.readline()
            if not line:
                break
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, mem))
        proc.terminate()

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self, start: float | None = None, end: float | None = None) -> dict[str, Any]:
        rows = [s for s in self.samples if (start is None or s[0] >= start) and (end is None or s[0] <= end)]
        if not rows:
            return {"samples": 0}
        utils = [r[1] for r in rows]
        return {"samples": len(rows), "mean_util_pct": sum(utils) / len(utils),
                "busy_share": sum(u > 0 for u in utils) / len(utils), "peak_memory_mib": max(r[2] for r in rows)}


def child(users: int, items: int, events: int, args) -> dict[str, Any]:
    import torch

    from dmp_dl.models import ease as ease_lib
    from dmp_dl.pipeline.run import run

    workdir = Path(args.workdir) / f"run-{events}"
    overrides = [f"data.source.n_users={users}", f"data.source.n_items={items}", f"data.source.n_events={events}",
                 *(["trainer=gpu"] if torch.cuda.is_available() and not args.cpu else ["trainer.accelerator=cpu"]),
                 *args.overrides]
    cfg = compose_train_cfg(overrides, workdir)
    sampler = GpuSampler() if args.gpu_util else None
    t0, c0 = time.perf_counter(), time.process_time()
    if sampler is not None:
        sampler.__enter__()
    try:
        state = run(cfg)
    finally:
        if sampler is not None:
            sampler.__exit__(None, None, None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    metrics = state["metrics"]
    dm = state["datamodule"]
    record = metrics.get("model") or {}
    candidates = record.get("candidates") or {}
    ease = (candidates.get("ease") or {}).get("details") or {}
    out: dict[str, Any] = {
        "users": dm.n_users, "items": dm.n_items, "events": int(len(dm.events)), "wall_s": wall, "cpu_s": cpu,
        "device": record.get("device"), "selected": record.get("selected"),
        "stages": {name: s.get("seconds") for name, s in (metrics.get("stages") or {}).items()},
        "ease_fit_s": ease.get("fit_seconds"), "ease_status": (candidates.get("ease") or {}).get("status"),
        "vae_fit_s": (candidates.get("vae") or {}).get("fit_seconds"),
        "vae_epochs": ((candidates.get("vae") or {}).get("details") or {}).get("epochs_run"),
        "vae_precision": ((candidates.get("vae") or {}).get("details") or {}).get("precision"),
        "refit_s": (record.get("refit_facts") or {}).get("seconds"),
        "test": {name: {k: m.get(k) for k in ("ndcg@20", "recall@20")} for name, m in (metrics.get("ranking") or {}).items()},
        "peak_rss_mib": peak_rss_mib(),
        "propensity": {k: v for k, v in (((metrics.get("propensity") or {}).get("training")) or {}).items()
                       if k in ("epochs", "train_examples", "batch_size") or k.endswith("_seconds")},
    }
    if sampler is not None:
        out["gpu"] = sampler.summary()
    device = ease_lib.model_device("cpu" if args.cpu else "auto")
    l2 = ease.get("l2") or ease_lib.l2_grid(dm.train_seen, [8.0])[0]
    if ease_lib.check_memory(dm.n_users, dm.n_items, "auto", device, keep_gram=False) is None:
        t1, c1 = time.perf_counter(), time.process_time()
        b = ease_lib.ease_weights(dm.train_seen, float(l2), device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out["one_ease_fit_s"], out["one_ease_fit_cpu_s"] = time.perf_counter() - t1, time.process_time() - c1
        del b
        out["wall_over_ease"] = wall / out["one_ease_fit_s"]
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_child(users: int, items: int, events: int, args, workdir: Path) -> dict[str, Any]:
    out = workdir / f"run-{events}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(users), str(items), str(events),
           "--child-out", str(out), "--workdir", str(workdir)]
    cmd += (["--cpu"] if args.cpu else []) + (["--gpu-util"] if args.gpu_util else [])
    cmd += ["--", *args.overrides] if args.overrides else []
    proc = subprocess.run(cmd, capture_output=not args.verbose, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = ((proc.stderr or proc.stdout or "") if not args.verbose else "").strip().splitlines()[-3:]
        print(f"[scale_run] {events:,} events: failed (exit {proc.returncode}): {' | '.join(tail)}", flush=True)
        return {"events": events, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    res = json.loads(out.read_text())
    print(f"[scale_run] {json.dumps(res, default=str)}", flush=True)
    return res


def _seconds(x) -> str:
    """Seconds to 3 significant places at most (0.12, 4.7, 53)."""
    x = float("nan") if x is None else float(x)
    return f"{x:.0f}" if not x < 100 else f"{x:.3g}"


def summarise(results: list[dict]) -> tuple[str, dict]:
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"events": f"{r['events']:,}", "wall s": r["error"]})
            continue
        test = r["test"]
        model = next((n for n in test if n not in ("popularity", "ease")), None)
        rows.append({
            "users x items x events": f"{r['users']:,} x {r['items']:,} x {r['events']:,}", "device": r["device"],
            "wall s": _seconds(r["wall_s"]), "data s": _seconds(r["stages"].get("data") or 0),
            "model s": _seconds(r["stages"].get("model") or 0), "one EASE fit s": _seconds(r.get("one_ease_fit_s")),
            "wall / EASE": f"{r.get('wall_over_ease', float('nan')):.1f}", "chosen": r["selected"],
            "NDCG@20 auto / EASE / pop": " / ".join(f"{(test.get(n) or {}).get('ndcg@20') or float('nan'):.4f}"
                                                     for n in (model, "ease", "popularity")),
            "peak RSS GiB": f"{r['peak_rss_mib'] / 1024:.1f}",
            **({"GPU util % (busy)": f"{r['gpu']['mean_util_pct']:.0f} ({r['gpu']['busy_share']:.0%})"} if r.get("gpu", {}).get("samples") else {}),
        })
    ok = [r for r in results if "error" not in r]
    slopes = {"wall_s": slope([r["events"] for r in ok], [r["wall_s"] for r in ok]),
              "peak_rss": slope([r["events"] for r in ok], [r["peak_rss_mib"] for r in ok])}
    body = "\n".join([markdown_table(rows), "",
                      "Slope of log cost on log events: " + ", ".join(f"{k} {'—' if v is None else f'{v:.2f}'}"
                                                                     for k, v in slopes.items())])
    return body, slopes


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, nargs="+", default=[30_000, 100_000])
    ap.add_argument("--items", type=int, nargs="+", default=[20_000, 20_000])
    ap.add_argument("--events", type=int, nargs="+", default=[300_000, 3_000_000])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    ap.add_argument("--gpu-util", action="store_true", help="sample nvidia-smi every second")
    ap.add_argument("--verbose", action="store_true", help="let the children print their logs")
    ap.add_argument("--scratch", action="store_true", help="write into bench/out/ (git-ignored), not bench/RESULTS.md")
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the run (after --)")
    output.add_arguments(ap)
    args = ap.parse_args(argv)
    output.use(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.child:
        args.child_out.write_text(json.dumps(child(*args.child, args), default=str))
        return None
    if not len(args.users) == len(args.items) == len(args.events):
        ap.error("--users, --items and --events need the same number of values (one run per position)")
    with tempfile.TemporaryDirectory(prefix="dmp-bench-scale-run-") as tmp:
        results = [run_child(u, i, e, args, Path(tmp)) for u, i, e in zip(args.users, args.items, args.events)]
    body, slopes = summarise(results)
    data = {"runs": results, "slopes": slopes, "cpu_threads": os.cpu_count()}
    write_section("scale_run", "The default run at scale", body, data)
    return data


if __name__ == "__main__":
    main()
