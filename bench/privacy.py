"""The quality cost of differentially private training.

Trains with the real pipeline once per setting and reports the test ranking metrics (full ranking
over the catalogue, the report's protocol) with the privacy spent and the time:

``--model two_tower`` (MovieLens 100K, ``experiment=ml100k``: ratings >= 4, per-user 80/10/10 split):

* ``standard``: the usual training (in-batch softmax with logQ correction), no DP;
* ``DP σ=0``: the DP-SGD code path without noise (ε = ∞): Poisson user batches, one clipped
  gradient per user, a loss against uniformly drawn negatives. It separates what the decoupled
  loss and clipping cost from what the noise costs;
* ``DP ε=X``: user-level DP-SGD with the noise multiplier calibrated so that the planned epochs
  spend at most ε (δ = min(1e-5, 1 / (10 · users))).

Every setting trains for the same ``--epochs`` (the default, 6, is below the default 10 epochs of
``python train.py`` to keep the bench within a few minutes on 2 cores) and keeps the best epoch on
validation recall@20, as ``train.py`` does. ``popularity`` is the floor any model should beat.

``--model auto`` (the default model; ``--data ml100k synthetic``: MovieLens 100K as above and the
default synthetic log of ``python train.py``):

* ``default (no DP)``: the automatic choice (autoencoder, EASE or their blend, on validation);
* ``DP σ=0`` and ``DP ε=X``: the autoencoder alone with user-level DP-SGD
  (:mod:`dmp_dl.privacy.dp_autoencoder`) for ``--epochs`` epochs (``trainer.max_epochs``), the noise
  calibrated for them; no epoch or model chosen on validation, no refit.

``ease`` and ``popularity`` are the references of the same test split (neither is private).

    python bench/privacy.py --model two_tower                  # standard, σ=0, ε = 8 and 2
    python bench/privacy.py --model two_tower --epsilons inf 8 4 2 1 --epochs 10 -- privacy.dp.batch_users=512
    python bench/privacy.py --model auto --data ml100k synthetic --epsilons inf 10 4 1 --epochs 10

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

QUIET = ["propensity.enabled=false", "export=false", "logger=none", "evaluation.report=null",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
         "trainer.devices=1", "callbacks.mid_epoch_checkpoint=null"]
BASE = ["experiment=ml100k", "model=two_tower", f"data.path={ML100K}", "evaluation.baselines=[popularity]", *QUIET]
DATA = {"ml100k": ["experiment=ml100k", f"data.path={ML100K}"], "synthetic": []}
# DP-SGD takes one step per Poisson batch of users (~4 an epoch here, against ~45 batches of events
# without DP), so it gets a larger learning rate; a user's id embedding would get signal only when
# the user is sampled and noise at every step, so the DP runs leave it out.
DP_OVERRIDES = ["model.module.optimizer.lr=0.03", "model.net.use_user_id=false"]


def settings(epsilons: list[float], standard: str = "standard (no DP)") -> list[tuple[str, list[str]]]:
    """(row name, overrides) of each run."""
    rows = [(standard, [])]
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


def bench_auto(data: str, epsilons: list[float], epochs: int, overrides: list[str], dp_overrides: list[str],
               workdir: Path, dp_only: bool = False) -> dict:
    """The default model on ``data`` (a key of DATA): the automatic choice without DP (unless
    ``dp_only``), then the autoencoder under DP-SGD at each ε."""
    results, references = [], {}
    for i, (name, extra) in enumerate(settings(epsilons, "default model (no DP)")[int(dp_only):]):
        extra = [*extra, *dp_overrides] if extra else extra
        cfg = compose_train_cfg([*DATA[data], *QUIET, f"trainer.max_epochs={epochs}", *extra, *overrides],
                                workdir / f"{data}{i}")
        t0 = time.perf_counter()
        out = run(cfg)
        seconds = time.perf_counter() - t0
        metrics = out["metrics"]
        ranking = metrics["ranking"]
        model = ranking[cfg.model.get("name", "auto")]
        references.update({k: ranking[k] for k in ("popularity", "ease") if k in ranking})
        dp = metrics["train"]["privacy"]["dp"]
        row = {
            "setting": name,
            "served": metrics["model"]["selected"],
            "epsilon": (dp["epsilon"] if dp["epsilon"] is not None else math.inf) if dp else None,
            "delta": dp["delta"] if dp else None,
            "noise_multiplier": dp["noise_multiplier"] if dp else None,
            "steps": metrics["train"].get("steps"),
            "epochs": metrics["train"].get("epochs"),
            "recall@20": model["recall@20"], "ndcg@20": model["ndcg@20"],
            "seconds": seconds,
        }
        results.append(row)
        print({k: v for k, v in row.items()}, flush=True)
    return {"data": data, "rows": results, "references": references, "epochs": epochs, "overrides": overrides,
            "dp_overrides": dp_overrides}


def markdown_auto(runs: list[dict]) -> str:
    parts = []
    for res in runs:
        base = res["rows"][0]["ndcg@20"] if res["rows"][0]["epsilon"] is None else None
        rows = []
        for r in res["rows"]:
            eps = r["epsilon"]
            rows.append({
                "setting": r["setting"], "served": r["served"],
                "ε": "—" if eps is None else ("∞" if math.isinf(eps) else f"{eps:.2f}"),
                "δ": "—" if r["delta"] is None else f"{r['delta']:.1e}",
                "σ": "—" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}",
                "epochs": r["epochs"], "steps": r["steps"],
                "ndcg@20": f"{r['ndcg@20']:.4f}", "recall@20": f"{r['recall@20']:.4f}",
                "ndcg@20 vs no DP": f"{r['ndcg@20'] / base - 1:+.0%}" if base else "",
                "s": f"{r['seconds']:.0f}",
            })
        for name, ref in res["references"].items():
            rows.append({"setting": f"{name} (reference, not private)", "ndcg@20": f"{ref['ndcg@20']:.4f}",
                         "recall@20": f"{ref['recall@20']:.4f}",
                         "ndcg@20 vs no DP": f"{ref['ndcg@20'] / base - 1:+.0%}" if base else ""})
        label = "MovieLens 100K (`experiment=ml100k`)" if res["data"] == "ml100k" else "the default synthetic log"
        parts.append(f"**{label}**, `trainer.max_epochs={res['epochs']}`\n\n" + markdown_table(rows))
    res = runs[0]
    every = " ".join(f"`{o}`" for o in res["overrides"]) or "none"
    dp_only = " ".join(f"`{o}`" for o in res["dp_overrides"]) or "none"
    head = ("The default model (`model=auto`). Without DP: the automatic choice on validation (the autoencoder, "
            "EASE or their blend; epochs by early stopping), refitted on every event. Under DP: the autoencoder "
            "alone with user-level DP-SGD (one user's whole row = one example, Poisson sampling, per-user "
            "clipping, `privacy.dp.*` defaults unless overridden) for the planned epochs, no refit. Test split, "
            f"full ranking; `s`: wall seconds of the whole run. Overrides of every run: {every}; of the DP runs "
            f"only: {dp_only}.\n\n")
    return head + "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["two_tower", "auto"], default="two_tower")
    ap.add_argument("--data", nargs="+", choices=sorted(DATA), default=["ml100k"], help="data sets of --model auto")
    ap.add_argument("--epsilons", nargs="+", type=float, default=[math.inf, 8.0, 2.0],
                    help="target ε of the DP runs; inf: DP-SGD without noise")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--dp-overrides", nargs="*", default=None,
                    help=f"Hydra overrides of the DP runs only (two_tower default: {' '.join(DP_OVERRIDES)}; auto: none)")
    ap.add_argument("--dp-only", action="store_true", help="--model auto: the DP runs only, no run without DP")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    output.add_arguments(ap)
    args = ap.parse_args()
    output.require({"opacus": "the DP-SGD accountant"}, "bench/privacy.py")
    output.use(args)
    if (args.model == "two_tower" or "ml100k" in args.data) and not (ML100K / "u.data").exists():
        sys.exit(f"MovieLens 100K not found at {ML100K} (set DMP_ML100K)")
    logging.basicConfig(level=logging.WARNING)
    for name in ("pytorch_lightning", "lightning", "dmp_dl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.model == "auto":
        dp_overrides = args.dp_overrides if args.dp_overrides is not None else []
        for data in args.data:  # a section per data set, written as soon as it is done
            with tempfile.TemporaryDirectory(prefix="dmp_bench_privacy_") as tmp:
                runs = [bench_auto(data, args.epsilons, args.epochs, args.overrides, dp_overrides, Path(tmp), args.dp_only)]
            if args.no_write:
                print(markdown_auto(runs))
            else:
                write_section(f"privacy_auto_{data}", f"Differentially private training of the default model ({data})",
                              markdown_auto(runs), {"runs": runs})
        return
    dp_overrides = args.dp_overrides if args.dp_overrides is not None else list(DP_OVERRIDES)
    with tempfile.TemporaryDirectory(prefix="dmp_bench_privacy_") as tmp:
        res = bench(args.epsilons, args.epochs, args.overrides, dp_overrides, Path(tmp))
    if args.no_write:
        print(markdown(res))
    else:
        write_section("privacy", "Differentially private training (ML-100k)", markdown(res), res)


if __name__ == "__main__":
    main()
