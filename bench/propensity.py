"""Propensity benchmark: the network vs logistic regression vs gradient-boosted trees.

For each task the embedding model is trained once by the real pipeline (``python train.py`` with
the propensity step off), then the propensity step runs once per split seed on exactly the same
features for all three models. Reported: mean and standard deviation over seeds of the test
metrics, and the seconds of one propensity step.

Tasks:
* ``synthetic``: the default synthetic data; target ``purchase`` in the next 30 days.
* ``ml100k``: MovieLens 100K; "rates a movie in the next 30 days" (``rating`` is the only event
  type, so the default target falls back to any event).

    python bench/propensity.py                                  # both tasks, 5 seeds
    python bench/propensity.py --tasks synthetic --seeds 2 -- propensity.features.embedding=off

Arguments after ``--`` are Hydra overrides applied to every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ML100K, compose_train_cfg  # noqa: E402

from dmp_dl.pipeline.run import run  # noqa: E402
from dmp_dl.propensity import train_propensity  # noqa: E402

COLUMNS = ("roc_auc", "pr_auc", "log_loss", "brier", "ece", "ece_uncalibrated", "lift@10")
TASKS = {
    "synthetic": [],
    "ml100k": ["data=movielens", f"data.path={ML100K}"],
}


def bench_task(name: str, seeds: list[int], overrides: list[str], workdir: Path) -> dict:
    base = [*TASKS[name], "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "logger=none", "export=false", *overrides]
    cfg = compose_train_cfg([*base, "propensity.enabled=false"], workdir / name)
    t0 = time.perf_counter()
    pipeline = run(cfg)
    embed_seconds = time.perf_counter() - t0
    dm, net = pipeline["datamodule"], pipeline["module"].net
    runs = []
    for seed in seeds:
        cfg_s = compose_train_cfg([*base, f"seed={seed}"], workdir / name)
        t = time.perf_counter()
        result = train_propensity(cfg_s, dm, net)
        runs.append({"seconds": time.perf_counter() - t, "metrics": result.metrics, "task": result.task.summary(),
                     "split": result.split, "training": result.summary()["training"]})
    models = list(runs[0]["metrics"])
    table = {}
    for model in models:
        table[model] = {}
        for col in COLUMNS:
            vals = np.array([r["metrics"][model][col] for r in runs], dtype=np.float64)
            table[model][col] = {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals)), "values": vals.tolist()}
    deep, gbm = np.array([r["metrics"]["mlp"]["roc_auc"] for r in runs]), np.array([r["metrics"]["gbm"]["roc_auc"] for r in runs])
    return {
        "task": runs[0]["task"], "split": runs[0]["split"], "embedding_pipeline_seconds": embed_seconds,
        "propensity_seconds": {"mean": float(np.mean([r["seconds"] for r in runs])), "values": [r["seconds"] for r in runs]},
        "table": table,
        "mlp_minus_gbm_auc": {"mean": float(np.mean(deep - gbm)), "std": float(np.std(deep - gbm)),
                              "wins": int((deep >= gbm).sum()), "of": len(runs)},
        "runs": runs,
    }


def markdown(name: str, res: dict) -> str:
    t = res["task"]
    lines = [
        f"**{name}** — target `{t['target_resolved']}` (asked: `{t['target_event']}`), horizon {t['horizon_days']:g} days, "
        f"cutoff {t['cutoff_iso']}, {t['eligible_users']} eligible users, positive rate {t['positive_rate']:.3f}; "
        f"split {res['split']}; mean ± sd over {len(res['runs'])} split seeds",
        "",
        "| model | ROC-AUC | PR-AUC | log-loss | Brier | ECE | ECE before calibration | lift@10% |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, cols in res["table"].items():
        cells = " | ".join(f"{cols[c]['mean']:.3f} ± {cols[c]['std']:.3f}" if c != "lift@10" else
                           f"{cols[c]['mean']:.2f} ± {cols[c]['std']:.2f}" for c in COLUMNS)
        lines.append(f"| {model} | {cells} |")
    d = res["mlp_minus_gbm_auc"]
    lines += ["", f"MLP − GBM ROC-AUC: {d['mean']:+.3f} ± {d['std']:.3f} (MLP ≥ GBM in {d['wins']} of {d['of']} seeds); "
              f"one propensity step: {res['propensity_seconds']['mean']:.1f} s; embedding pipeline: "
              f"{res['embedding_pipeline_seconds']:.0f} s"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", type=int, default=5, help="number of split seeds (0 .. N-1)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dmp_bench_propensity"))
    ap.add_argument("--json", type=Path, default=None, help="also write the full results here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {}
    for name in args.tasks:
        if name == "ml100k" and not (ML100K / "u.data").exists():
            print(f"skipping ml100k: {ML100K}/u.data not found (set DMP_ML100K)")
            continue
        results[name] = bench_task(name, list(range(args.seeds)), args.overrides, args.workdir)
        print(markdown(name, results[name]), "\n", flush=True)
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print("command: python bench/propensity.py " + " ".join(sys.argv[1:]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
