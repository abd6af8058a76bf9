"""The quality cost of differentially private training on MovieLens 100K.

Trains the embedding model with the real pipeline (``experiment=ml100k``: ratings >= 4, per-user
80/10/10 split) once per setting and reports the test ranking metrics (full ranking over the
catalogue, the report's protocol) with the privacy spent:

* ``standard``: the usual training (in-batch softmax with logQ correction), no DP;
* ``DP σ=0``: the DP-SGD code path without noise (ε = ∞): Poisson user batches, one clipped
  gradient per user, a loss against uniformly drawn negatives. It separates what the decoupled
  loss and clipping cost from what the noise costs;
* ``DP ε=X``: user-level DP-SGD with the noise multiplier calibrated so that the planned epochs
  spend at most ε (δ = min(1e-5, 1 / (10 · users))).

Every setting trains for the same ``--epochs`` (the default, 6, is below the default 10 epochs of
``python train.py`` to keep the bench within a few minutes on 2 cores) and keeps the best epoch on
validation recall@20, as ``train.py`` does. ``popularity`` is the floor any model should beat.

    python bench/privacy.py                                   # standard, σ=0, ε = 8 and 2
    python bench/privacy.py --epsilons inf 8 4 2 1 --epochs 10 -- privacy.dp.batch_users=512

Arguments after ``--`` are Hydra overrides applied to every run.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import output  # noqa: E402
from common import ML100K, compose_train_cfg, markdown_table, write_section  # noqa: E402

from dmp_dl.pipeline.run import run  # noqa: E402

BASE = ["experiment=ml100k", "model=two_tower", f"data.path={ML100K}", "propensity.enabled=false", "export=false", "logger=none",
        "evaluation.report=null", "evaluation.baselines=[popularity]", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.accelerator=cpu", "trainer.devices=1",
        "callbacks.mid_epoch_checkpoint=null"]
# DP-SGD takes one step per Poisson batch of users (~4 an epoch here, against ~45 batches of events
# without DP), so it gets a larger learning rate; a user's id embedding would get signal only when
# the user is sampled and noise at every step, so the DP runs leave it out.
DP_OVERRIDES = ["model.module.optimizer.lr=0.03", "model.net.use_user_id=false"]


def settings(epsilons: list[float]) -> list[tuple[str, list[str]]]:
    """(row name, overrides) of each run."""
    rows = [("standard (no DP)", [])]
    for eps in epsilons:
        if math.isinf(eps):
            rows.append(("DP-SGD, σ=0 (ε=∞)", ["privacy.dp.enabled=true", "privacy.dp.noise_multiplier=0"]))
        else:
            rows.append((f"DP-SGD, ε={eps:g}", ["privacy.dp.enabled=true", f"privacy.dp.target_epsilon={eps:g}"]))
    return rows


def bench(epsilons: list[float], epochs: int, overrides: list[str], dp_overrides: list[str], workdir: Path) -> dict:
    results = []
    popularity = None
    for i, (name, extra) in enumerate(settings(epsilons)):
        extra = [*extra, *dp_overrides] if extra else extra
        cfg = compose_train_cfg([*BASE, f"trainer.max_epochs={epochs}", *extra, *overrides], workdir / f"run{i}")
        t0 = time.perf_counter()
        out = run(cfg)
        seconds = time.perf_counter() - t0
        ranking = out["metrics"]["ranking"]
        model = ranking[cfg.model.get("name", "model")]
        popularity = ranking.get("popularity", popularity)
        dp = out["metrics"]["train"]["privacy"]["dp"]
        row = {
            "setting": name,
            "epsilon": (dp["epsilon"] if dp["epsilon"] is not None else math.inf) if dp else None,
            "delta": dp["delta"] if dp else None,
            "noise_multiplier": dp["noise_multiplier"] if dp else None,
            "steps": int(out["trainer"].global_step),
            "recall@20": model["recall@20"], "ndcg@20": model["ndcg@20"], "recall@10": model["recall@10"],
            "seconds": seconds,
        }
        results.append(row)
        print({k: v for k, v in row.items()}, flush=True)
    return {"rows": results, "popularity": popularity, "epochs": epochs, "overrides": overrides,
            "dp_overrides": dp_overrides}


def markdown(res: dict) -> str:
    base = res["rows"][0]["recall@20"]
    rows = []
    for r in res["rows"]:
        eps = r["epsilon"]
        rows.append({
            "setting": r["setting"],
            "ε": "—" if eps is None else ("∞" if math.isinf(eps) else f"{eps:.2f}"),
            "δ": "—" if r["delta"] is None else f"{r['delta']:.1e}",
            "σ": "—" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}",
            "steps": r["steps"],
            "recall@20": f"{r['recall@20']:.4f}",
            "ndcg@20": f"{r['ndcg@20']:.4f}",
            "recall@20 vs standard": f"{r['recall@20'] / base - 1:+.0%}" if base else "",
            "s": f"{r['seconds']:.0f}",
        })
    pop = res["popularity"]
    if pop:
        rows.append({"setting": "popularity (reference)", "recall@20": f"{pop['recall@20']:.4f}",
                     "ndcg@20": f"{pop['ndcg@20']:.4f}",
                     "recall@20 vs standard": f"{pop['recall@20'] / base - 1:+.0%}" if base else ""})
    every = " ".join(f"`{o}`" for o in res["overrides"]) or "none"
    dp_only = " ".join(f"`{o}`" for o in res["dp_overrides"]) or "none"
    return (f"MovieLens 100K (`experiment=ml100k`), two-tower, {res['epochs']} epochs each (best epoch on "
            f"validation recall@20); test split, full ranking. DP: user-level, Poisson sampling, per-user "
            f"clipping, `privacy.dp.*` defaults unless overridden. Overrides of every run: {every}; of the DP "
            f"runs only: {dp_only}.\n\n"
            + markdown_table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", nargs="+", type=float, default=[math.inf, 8.0, 2.0],
                    help="target ε of the DP runs; inf: DP-SGD without noise")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--dp-overrides", nargs="*", default=list(DP_OVERRIDES),
                    help="Hydra overrides of the DP runs only (default: %(default)s)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    output.add_arguments(ap)
    args = ap.parse_args()
    output.require({"opacus": "the DP-SGD accountant"}, "bench/privacy.py")
    output.use(args)
    if not (ML100K / "u.data").exists():
        sys.exit(f"MovieLens 100K not found at {ML100K} (set DMP_ML100K)")
    logging.basicConfig(level=logging.WARNING)
    for name in ("pytorch_lightning", "lightning", "dmp_dl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="dmp_bench_privacy_") as tmp:
        res = bench(args.epsilons, args.epochs, args.overrides, args.dp_overrides, Path(tmp))
    if args.no_write:
        print(markdown(res))
    else:
        write_section("privacy", "Differentially private training (ML-100k)", markdown(res), res)


if __name__ == "__main__":
    main()
