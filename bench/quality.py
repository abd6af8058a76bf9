"""Quality on MovieLens 100K: our ``mf`` and ``two_tower`` against popularity, EASE and implicit's
ALS and BPR, all in one run, on one split, scored by one evaluator.

Two protocols (both start from ``experiment=ml100k``, so any ML-100k setting of the project applies):

* ``recommenders`` — the Microsoft Recommenders MovieLens benchmark: every rating is a relevant
  interaction; per user a seeded random 25 % of the ratings is test (their
  ``python_stratified_split(ratio=0.75, filter_by="user", seed=42)``: 75 % of *each user's*
  ratings train; the package's ``random_per_user`` split with ``test_frac=0.25``, seed 42, keeps
  floor(0.25 n) of a user's n ratings for test where theirs keeps n - round(0.75 n) — the same
  protocol, not the same rows); k = 10; their metric definitions (``ranking.py``). Published
  numbers (their README, MovieLens 100k): BiVAE nDCG@10 0.475, BPR (cornac) 0.442, SAR 0.382.
* ``positives`` — ratings >= 4 are positives (the rest dropped); per user a seeded random 20 %
  is test; full-ranking Recall@20 / NDCG@20 with training items excluded (the package's own
  definitions).

Tuning: every model is tuned on a validation carve-out of the training part (a further
``--val-frac`` of each user's ratings, drawn from the same per-user permutation, so the test
ratings are exactly the same): our models pick their epoch count by early stopping on
val/recall@20 (the config's callbacks), the anchors their setting from a small grid
(``anchors.py``). Then everything is refitted on the whole training part (75 % / 80 %) with the
chosen setting and scored on the test ratings. Our models' hyperparameters are the project's
config (``conf/model/*.yaml``, ``conf/experiment/ml100k.yaml``) plus any overrides after ``--``.

    python bench/quality.py                      # both protocols, full settings
    python bench/quality.py --quick              # 2 epochs, tiny grids: checks the plumbing
    python bench/quality.py -- model.dim=128     # Hydra overrides for our models
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import output  # noqa: E402
from common import ML100K, markdown_table, write_section  # noqa: E402

OURS = ("mf", "two_tower")
# Microsoft Recommenders README, "Algorithm Comparison" (MovieLens 100k, 75/25 stratified split, k=10).
PUBLISHED = {
    "BiVAE (published)": {"map": 0.146126, "ndcg@10": 0.475077, "precision@10": 0.411771, "recall@10": 0.219145},
    "BPR, cornac (published)": {"map": 0.132478, "ndcg@10": 0.441997, "precision@10": 0.388229, "recall@10": 0.212522},
    "SAR (published)": {"map": 0.110591, "ndcg@10": 0.382461, "precision@10": 0.330753, "recall@10": 0.176385},
}
PROTOCOLS: dict[str, dict[str, Any]] = {
    "recommenders": {
        "title": "(a) Microsoft Recommenders protocol: all ratings relevant, per-user 75/25, k = 10",
        "overrides": ["data.cleaning.min_value=null", "data.split.test_frac=0.25"],
        "ks": [10],
        "metric": "ndcg@10",
        "headline": "ndcg@10",
    },
    "positives": {
        "title": "(b) Ratings >= 4, per-user 80/20, full ranking",
        "overrides": ["data.split.test_frac=0.2"],
        "ks": [10, 20],
        "metric": "recall@20",
        "headline": "ndcg@20",
    },
}


def data_overrides(protocol: str, seed: int, val_frac: float) -> list[str]:
    return ["experiment=ml100k", f"data.path={ML100K}", f"seed={seed}", "data.split.method=random_per_user",
            *PROTOCOLS[protocol]["overrides"], f"data.split.val_frac={val_frac}"]


def run_protocol(protocol: str, args, workdir: Path) -> dict[str, Any]:
    """Tune, refit and score every model under ``protocol``. Returns rows and the split sizes."""
    from hydra.utils import instantiate

    import anchors
    import ours
    from ranking import evaluate, network_scorer, recommenders_metrics, split_of

    spec = PROTOCOLS[protocol]
    ks, metric = spec["ks"], spec["metric"]
    tune_over = data_overrides(protocol, args.seed, args.val_frac)
    final_over = data_overrides(protocol, args.seed, 0.0)
    quick = ["trainer.max_epochs=2"] if args.quick else []
    dm_tune = instantiate(ours.compose_train_cfg(tune_over, workdir / "dm").data, _convert_="all").prepare()
    dm_final = instantiate(ours.compose_train_cfg(final_over, workdir / "dm").data, _convert_="all").prepare()
    if (dm_tune.test_relevant != dm_final.test_relevant).nnz:
        raise RuntimeError("the validation carve-out changed the test ratings; the split no longer draws them first")
    tune, final = split_of(dm_tune, "val"), split_of(dm_final, "test")
    sizes = {
        "events": int(len(dm_final.events)), "users": dm_final.n_users, "items": dm_final.n_items,
        "train_events_final": int(len(dm_final.train_idx)), "train_events_tuning": int(len(dm_tune.train_idx)),
        "val_pairs": int(dm_tune.val_relevant.nnz), "test_users": len(final.test), "test_pairs": int(dm_final.test_relevant.nnz),
        "test_pairs_item_unseen_in_train": int(dm_final.report.split["test_events_item_unseen_in_train"]),
    }
    print(f"[{protocol}] {sizes}", flush=True)

    def score(scorer) -> dict:
        m = evaluate(scorer, final, ks)
        if protocol == "recommenders":
            m["recommenders"] = recommenders_metrics(scorer, final, 10)
        return m

    rows = []
    for model in args.models:
        t0 = time.perf_counter()
        tuned = ours.fit(ours.compose_train_cfg([*tune_over, f"model={model}", *quick, *args.overrides],
                                                workdir / f"{protocol}-{model}-tune"))
        epochs = tuned["best_epoch"]
        refit = ours.fit(ours.compose_train_cfg([*final_over, f"model={model}", *quick, *args.overrides,
                                                 f"trainer.max_epochs={epochs}", f"trainer.min_epochs={epochs}"],
                                                workdir / f"{protocol}-{model}-final"))
        if refit["datamodule"].item_vocab != dm_final.item_vocab or refit["datamodule"].user_vocab != dm_final.user_vocab:
            raise RuntimeError("the pipeline's split differs from the benchmark's: vocabularies do not match")
        m = score(network_scorer(refit["net"], final))
        pipeline_value = refit["ranking"].get(f"ndcg@{ks[-1]}")
        rows.append({"model": model, "kind": "ours", "metrics": m, "fit_seconds": refit["train_seconds"],
                     "setting": f"{epochs} epochs (early stopping on val/recall@20)",
                     "tuning": {"val": {k: v for k, v in tuned["epochs"][epochs - 1].items() if k.startswith("val/")},
                                "epochs_run": len(tuned["epochs"])},
                     "examples_per_second": refit["examples_per_second"],
                     "pipeline_check": {"pipeline": pipeline_value, "bench": m[f"ndcg@{ks[-1]}"]},
                     "wall_seconds": time.perf_counter() - t0})
        print(f"[{protocol}] {model}: {metric}={m[metric]:.4f} ({epochs} epochs)", flush=True)
    grids = anchors.QUICK_GRIDS if args.quick else anchors.GRIDS
    for name in args.anchors:
        t0 = time.perf_counter()
        a = anchors.tune_and_fit(name, tune, final, metric, ks, grids, seed=args.seed)
        m = score(a.scorer)
        rows.append({"model": name, "kind": "anchor", "metrics": m, "fit_seconds": a.fit_seconds,
                     "setting": ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in a.params.items()) or "—",
                     "tuning": {"tried": a.tried}, "wall_seconds": time.perf_counter() - t0})
        print(f"[{protocol}] {name}: {metric}={m[metric]:.4f} ({rows[-1]['setting']})", flush=True)
    return {"title": spec["title"], "sizes": sizes, "rows": rows, "ks": ks, "tuned_by": f"validation {metric}"}


def headline(protocol: str, result: dict) -> dict:
    """Best of ours vs the best anchor of this run (and, for (a), the best published number)."""
    key = PROTOCOLS[protocol]["headline"]

    def value(r):
        return r["metrics"]["recommenders"][key] if protocol == "recommenders" else r["metrics"][key]

    mine = [r for r in result["rows"] if r["kind"] == "ours"]
    anch = [r for r in result["rows"] if r["kind"] == "anchor"]
    out: dict[str, Any] = {"metric": key}
    if mine:
        b = max(mine, key=value)
        out["ours"] = {"model": b["model"], "value": value(b)}
    if anch:
        b = max(anch, key=value)
        out["best_anchor"] = {"model": b["model"], "value": value(b)}
    if protocol == "recommenders":
        name, vals = max(PUBLISHED.items(), key=lambda kv: kv[1][key])
        out["best_published"] = {"model": name, "value": vals[key]}
    return out


def render(protocol: str, result: dict) -> str:
    rows = []
    if protocol == "recommenders":
        for r in result["rows"]:
            m = r["metrics"]["recommenders"]
            rows.append({"model": r["model"], "nDCG@10": m["ndcg@10"], "Precision@10": m["precision@10"],
                         "Recall@10": m["recall@10"], "MAP": m["map"],
                         "± nDCG@10": r["metrics"]["stderr"]["ndcg@10"], "fit s": f"{r['fit_seconds']:.1f}", "setting": r["setting"]})
        for name, m in PUBLISHED.items():
            rows.append({"model": name, "nDCG@10": m["ndcg@10"], "Precision@10": m["precision@10"],
                         "Recall@10": m["recall@10"], "MAP": m["map"], "setting": "Microsoft Recommenders README"})
    else:
        for r in result["rows"]:
            m = r["metrics"]
            rows.append({"model": r["model"], "Recall@20": m["recall@20"], "NDCG@20": m["ndcg@20"],
                         "± NDCG@20": m["stderr"]["ndcg@20"], "Recall@10": m["recall@10"], "NDCG@10": m["ndcg@10"],
                         "coverage@20": m["coverage@20"], "fit s": f"{r['fit_seconds']:.1f}", "setting": r["setting"]})
    s = result["sizes"]
    lines = [f"### {result['title']}", "",
             f"{s['events']:,} ratings, {s['users']} users, {s['items']} items; final training part "
             f"{s['train_events_final']:,} ratings; test: {s['test_users']} users, {s['test_pairs']:,} held-out pairs "
             f"({s['test_pairs_item_unseen_in_train']} of an item never seen in training: counted as relevant, "
             f"rankable but unlearnable). "
             f"Tuning: training part minus a validation carve-out ({s['train_events_tuning']:,} ratings, "
             f"{s['val_pairs']:,} validation pairs); settings chosen by {result['tuned_by']}, then refitted on the "
             f"whole training part. `fit s`: the final fit (ours: training loop only).", "",
             markdown_table(rows), ""]
    h = result["headline"]
    if "ours" in h and "best_anchor" in h:
        lines.append(f"Best of ours ({h['ours']['model']}) / best anchor of this run ({h['best_anchor']['model']}), "
                     f"{h['metric']}: **{h['ours']['value'] / h['best_anchor']['value']:.3f}**"
                     + (f"; / best published ({h['best_published']['model']}): "
                        f"**{h['ours']['value'] / h['best_published']['value']:.3f}**" if "best_published" in h else ""))
    return "\n".join(lines)


DEFINITIONS = (
    "Protocol (a) metrics follow Microsoft Recommenders' `python_evaluation`: Precision@10 = hits / 10, "
    "Recall@10 = hits / |R|, nDCG@10 with binary gains and an ideal list of min(10, |R|) hits, "
    "MAP = (1/|R|) Σ Precision@i over the ranks i ≤ 10 holding a relevant item; computed from the package's "
    "per-user metrics (`bench/ranking.py`). Protocol (b) uses the package's definitions "
    "(Recall@K = hits / min(K, |R|)). Everywhere: full ranking over the catalogue, the user's training items "
    "excluded, ties to the lower item index, `±` = standard error over users. Ours are trained with "
    "`dmp_dl.pipeline.run` (what `train.py` runs) on the project config (`two_tower` also reads the MovieLens "
    "user attributes and genres, as it does by default); the anchors see the interactions only: `popularity` and "
    "`ease` are the package's baselines, `als` / `bpr` are `implicit` 0.7 on CPU."
)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    ap.add_argument("--models", nargs="*", default=list(OURS), choices=list(OURS))
    ap.add_argument("--anchors", nargs="*", default=["popularity", "ease", "als", "bpr"],
                    choices=["popularity", "ease", "als", "bpr"])
    ap.add_argument("--val-frac", type=float, default=0.1, help="validation carve-out per user for tuning")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--quick", action="store_true", help="2 epochs and tiny grids: a plumbing check, not numbers")
    ap.add_argument("--scratch", action="store_true", help="write into bench/out/ (git-ignored), not bench/RESULTS.md")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for our models (after --)")
    args = ap.parse_args(argv)
    if not (ML100K / "u.data").exists():
        msg = f"quality: skipped: MovieLens 100K not found at {ML100K} (set DMP_ML100K to its folder)"
        print(msg)
        return {"skipped": msg}
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    output.use(args.quick or args.scratch)
    results, body = {}, [DEFINITIONS, ""]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmp-bench-quality-") as tmp:
        for protocol in args.protocols:
            res = run_protocol(protocol, args, Path(tmp))
            res["headline"] = headline(protocol, res)
            results[protocol] = res
            body += [render(protocol, res), ""]
    data = {"protocols": results, "quick": args.quick, "overrides": args.overrides, "seconds": time.perf_counter() - t0,
            "headline": {p: r["headline"] for p, r in results.items()}}
    if args.quick:
        body.insert(0, "**Quick run (`--quick`: 2 epochs, tiny grids) — checks the plumbing; not comparable numbers.**\n")
    body.append(f"Section wall time: {data['seconds']:.0f} s.")
    write_section("quality", "Quality: MovieLens 100K", "\n".join(body), data)
    return data


if __name__ == "__main__":
    main()
