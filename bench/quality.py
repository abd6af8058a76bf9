"""Quality of the default model (``model=auto``) against popularity, EASE, implicit's ALS and BPR and
a deep peer (cornac's VAECF), all on one split per log, scored by one evaluator, fit times side by side.

Logs (``--logs``):

* ``ml100k-recommenders`` — MovieLens 100K, the Microsoft Recommenders benchmark protocol: every
  rating relevant, per user a seeded random 25 % is test, k = 10 (their definitions, ``ranking.py``).
  Published (their README): BiVAE nDCG@10 0.475, BPR (cornac) 0.442, SAR 0.382.
* ``ml100k-positives`` — ratings >= 4 are positives (the rest dropped); per user a random 20 % test.
* ``ml1m-positives`` — the same on MovieLens 1M users 1-2999 (``../shared/data``; partial file).
* ``skewed-wide`` / ``skewed-small`` — generated logs with realistic skew (``skewed.py``): 1,900 users x
  17,600 items (a play-count log's shape) and 610 users x 9,700 items (a small movie-rating log's).

Protocol everywhere but (a): full ranking over the catalogue, the user's training items excluded,
Recall@20 / NDCG@20 with the package's definitions. Tuning: every model is tuned on a validation
carve-out of the training part (a further ``--val-frac`` of each user's items, drawn from the same
per-user permutation, so the test items are exactly the same). ``auto`` makes its own choice on that
carve-out (candidates, epochs, l2, blend weight: ``dmp_dl.training.selection``), exactly as
``train.py`` does; then it and every anchor are refitted on the whole training part and scored on
the test items. Ours use the project config (``conf/model/*.yaml``) plus any overrides after ``--``.

``fit s``: the model's whole fitting time: for ``auto`` the candidate fits, the choice and the refit
(everything ``train.py`` spends on the model); for an anchor its final fit (tuning excluded) — so the
anchors' column is a lower bound on what a user of that library spends. EASE's is one fit of
``dmp_dl.models.ease.ease_weights`` (the cheaper of the primal and dual forms, float32) at the chosen
l2; its scores come from the float64 textbook form (``EASEScorer``), fitted apart.

    python bench/quality.py                                  # every log
    python bench/quality.py --logs ml100k-positives --quick  # plumbing check
    python bench/quality.py -- model.vae.net.hidden=300      # Hydra overrides for ours
    python bench/quality.py --logs skewed-wide --merge       # one log again; the others kept from results/quality.json
    python bench/quality.py --logs skewed-wide --anchors popularity ease --merge   # and its other anchors' rows too
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
from common import ML100K, ROOT, command, machine, machine_line, markdown_table, write_section  # noqa: E402

ML1M = ROOT.parent / "shared" / "data" / "ml-1m-users-1-2999"
CHOICE_MODELS = ("auto", "vae", "ease")
LEGACY_MODELS = ("mf", "two_tower")
# Microsoft Recommenders README, "Algorithm Comparison" (MovieLens 100k, 75/25 stratified split, k=10).
PUBLISHED = {
    "BiVAE (published)": {"map": 0.146126, "ndcg@10": 0.475077, "precision@10": 0.411771, "recall@10": 0.219145},
    "BPR, cornac (published)": {"map": 0.132478, "ndcg@10": 0.441997, "precision@10": 0.388229, "recall@10": 0.212522},
    "SAR (published)": {"map": 0.110591, "ndcg@10": 0.382461, "precision@10": 0.330753, "recall@10": 0.176385},
}
POSITIVES = {"ks": [10, 20], "metric": "ndcg@20", "test_frac": 0.2}
LOGS: dict[str, dict[str, Any]] = {
    "ml100k-recommenders": {"title": "(a) MovieLens 100K, Microsoft Recommenders protocol: all ratings relevant, per-user 75/25, k = 10",
                            "data": ["data=movielens", f"data.path={ML100K}", "data.cleaning.min_value=null"],
                            "ks": [10], "metric": "ndcg@10", "test_frac": 0.25, "recommenders": True, "needs": ML100K / "u.data"},
    "ml100k-positives": {"title": "(b) MovieLens 100K, ratings >= 4, per-user 80/20, full ranking",
                         "data": ["data=movielens", f"data.path={ML100K}", "data.cleaning.min_value=4"],
                         "needs": ML100K / "u.data", **POSITIVES},
    "ml1m-positives": {"title": "(c) MovieLens 1M users 1-2999 (partial file), ratings >= 4, per-user 80/20, full ranking",
                       "data": ["data=movielens", f"data.path={ML1M}", "data.cleaning.min_value=4"],
                       "needs": ML1M / "ratings.dat", **POSITIVES},
    "skewed-wide": {"title": "(d) Generated, 1,900 users x 17,600 items (play-count shape), per-user 80/20, full ranking",
                    "shape": "wide", **POSITIVES},
    "skewed-small": {"title": "(e) Generated, 610 users x 9,700 items (small movie-rating shape), per-user 80/20, full ranking",
                     "shape": "small", **POSITIVES},
}


def data_overrides(spec: dict, path: str | None, seed: int, val_frac: float) -> list[str]:
    source = spec.get("data") or ["data=events", f"data.path={path}"]
    return [*source, f"seed={seed}", "data.split.method=random_per_user", f"data.split.test_frac={spec['test_frac']}",
            f"data.split.val_frac={val_frac}"]


def fit_choice(model: str, spec: dict, tune_over: list[str], dm_tune, dm_final, args, workdir: Path) -> dict:
    """``auto`` / ``vae`` / ``ease``: choose on the carve-out, refit on the whole training part."""
    import numpy as np
    import ours

    from dmp_dl.models.embeddings import item_vectors, user_vectors
    from dmp_dl.models.scoring import BlendScorer
    from dmp_dl.training.selection import choose_model, refit

    cfg = ours.compose_train_cfg([*tune_over, f"model={model}", f"model.selection_metric={spec['metric']}",
                                  "model.refit=false", *(["model.vae.max_epochs=2"] if args.quick else []),
                                  *args.overrides], workdir / f"{model}-tune")
    t0 = time.perf_counter()
    choice = choose_model(cfg, dm_tune)
    dm_final.use_half_life(dm_tune.half_life_days)  # the recency half-life chosen on the carve-out
    refit(cfg, dm_final, choice, dm_final.interaction_rows("train"), dm_final.train_seen)
    seconds = time.perf_counter() - t0
    net = choice.net.attach_rows(dm_final.interaction_rows("train"))
    users = user_vectors(net, np.arange(dm_final.n_users), dm_final.train_history)
    items = item_vectors(net, dm_final.n_items)
    record = choice.record
    vals = {n: c.get("val", {}).get(spec["metric"]) for n, c in record["candidates"].items()}
    setting = f"chose {record['selected']} ({record['served_score']}); " + ", ".join(
        f"val {n} {v:.4f}" for n, v in vals.items() if v is not None)
    rows = dm_final.interaction_rows("train") if choice.served.reads_rows else dm_final.train_seen
    return {"scorer": BlendScorer(choice.served, users, items, rows), "fit_seconds": seconds,
            "setting": setting, "tuning": {"record": record}}


def fit_legacy(model: str, tune_over: list[str], final_over: list[str], final, args, workdir: Path) -> dict:
    """``mf`` / ``two_tower``: epochs by early stopping on the carve-out, then a refit."""
    import ours
    from ranking import network_scorer

    quick = ["trainer.max_epochs=2"] if args.quick else []
    tuned = ours.fit(ours.compose_train_cfg([*tune_over, f"model={model}", *quick, *args.overrides],
                                            workdir / f"{model}-tune"))
    epochs = tuned["best_epoch"]
    fitted = ours.fit(ours.compose_train_cfg([*final_over, f"model={model}", *quick, *args.overrides,
                                              f"trainer.max_epochs={epochs}", f"trainer.min_epochs={epochs}"],
                                             workdir / f"{model}-final"))
    return {"scorer": network_scorer(fitted["net"], final), "fit_seconds": fitted["train_seconds"],
            "setting": f"{epochs} epochs (early stopping on val/recall@20)", "tuning": {"epochs_run": len(tuned["epochs"])}}


def run_log(name: str, args, workdir: Path) -> dict[str, Any]:
    """Tune, refit and score every model on log ``name``. Returns rows and the split sizes."""
    import anchors
    import ours
    import skewed
    from hydra.utils import instantiate
    from ranking import evaluate, recommenders_metrics, split_of

    spec = LOGS[name]
    ks, metric = spec["ks"], spec["metric"]
    path = str(skewed.write(spec["shape"], workdir.parent / f"skewed-{spec['shape']}.csv")) if "shape" in spec else None
    tune_over = data_overrides(spec, path, args.seed, args.val_frac)
    final_over = data_overrides(spec, path, args.seed, 0.0)
    dm_tune = instantiate(ours.compose_train_cfg(tune_over, workdir / "dm").data, _convert_="all").prepare()
    dm_final = instantiate(ours.compose_train_cfg(final_over, workdir / "dm").data, _convert_="all").prepare()
    if (dm_tune.test_relevant != dm_final.test_relevant).nnz:
        raise RuntimeError("the validation carve-out changed the test items; the split no longer draws them first")
    if dm_tune.item_vocab != dm_final.item_vocab or dm_tune.user_vocab != dm_final.user_vocab:
        raise RuntimeError("the carve-out changed the vocabularies")
    tune, final = split_of(dm_tune, "val"), split_of(dm_final, "test")
    sizes = {
        "events": int(len(dm_final.events)), "users": dm_final.n_users, "items": dm_final.n_items,
        "train_events_final": int(len(dm_final.train_idx)), "train_events_tuning": int(len(dm_tune.train_idx)),
        "val_pairs": int(dm_tune.val_relevant.nnz), "test_users": len(final.test), "test_pairs": int(dm_final.test_relevant.nnz),
        "test_pairs_item_unseen_in_train": int(dm_final.report.split["test_events_item_unseen_in_train"]),
    }
    print(f"[{name}] {sizes}", flush=True)

    def score(scorer) -> dict:
        m = evaluate(scorer, final, ks)
        if spec.get("recommenders"):
            m["recommenders"] = recommenders_metrics(scorer, final, 10)
        return m

    rows = []
    for model in args.models:
        t0 = time.perf_counter()
        if model in CHOICE_MODELS:
            fitted = fit_choice(model, spec, tune_over, dm_tune, dm_final, args, workdir)
        else:
            fitted = fit_legacy(model, tune_over, final_over, final, args, workdir)
        m = score(fitted["scorer"])
        rows.append({"model": model, "kind": "ours", "metrics": m, "fit_seconds": fitted["fit_seconds"],
                     "setting": fitted["setting"], "tuning": fitted["tuning"], "wall_seconds": time.perf_counter() - t0})
        print(f"[{name}] {model}: {metric}={m[metric]:.4f} fit {fitted['fit_seconds']:.1f}s ({fitted['setting']})", flush=True)
    grids = anchors.QUICK_GRIDS if args.quick else anchors.GRIDS
    for anchor in args.anchors:
        t0 = time.perf_counter()
        a = anchors.tune_and_fit(anchor, tune, final, metric, ks, grids, seed=args.seed)
        m = score(a.scorer)
        rows.append({"model": anchor, "kind": "anchor", "metrics": m, "fit_seconds": a.fit_seconds,
                     "setting": ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in a.params.items()) or "—",
                     "tuning": {"tried": a.tried}, "wall_seconds": time.perf_counter() - t0})
        print(f"[{name}] {anchor}: {metric}={m[metric]:.4f} fit {a.fit_seconds:.1f}s ({rows[-1]['setting']})", flush=True)
    return {"title": spec["title"], "sizes": sizes, "rows": rows, "ks": ks, "metric": metric,
            "recommenders": bool(spec.get("recommenders"))}


def keep_unmeasured_rows(result: dict, previous: dict | None) -> dict:
    """``result`` (a log measured now) with the rows of ``previous`` (the same log in
    results/quality.json) for the models and anchors this run did not measure, each marked with
    the command that measured it, when the two runs saw the same data and split (equal ``sizes``);
    otherwise ``result`` as it is, and a line says what was dropped."""
    if not previous:
        return result
    measured = {r["model"] for r in result["rows"]}
    kept = [r for r in previous.get("rows", []) if r["model"] not in measured]
    if not kept:
        return result
    if previous.get("sizes") != result["sizes"]:
        print(f"quality: {result['title']}: the rows of {', '.join(r['model'] for r in kept)} are dropped "
              "(measured on other data or another split)", flush=True)
        return result
    command_then = (previous.get("run") or {}).get("command", "an earlier run")
    rows = result["rows"] + [{**r, "measured_by": r.get("measured_by", command_then)} for r in kept]
    return {**result, "rows": rows}


def _value(result: dict, row: dict) -> float:
    key = result["metric"]
    return row["metrics"]["recommenders"][key] if result["recommenders"] else row["metrics"][key]


def headline(result: dict) -> dict:
    """Ours (the first model listed) against the best of EASE / ALS / the deep peer, and the time ratio."""
    rows = {r["model"]: r for r in result["rows"]}
    mine = next((r for r in result["rows"] if r["kind"] == "ours"), None)
    strong = [r for r in result["rows"] if r["model"] in ("ease", "als", "vaecf")]
    out: dict[str, Any] = {"metric": result["metric"]}
    if mine is not None and strong:
        best = max(strong, key=lambda r: _value(result, r))
        out.update(ours={"model": mine["model"], "value": _value(result, mine), "fit_seconds": mine["fit_seconds"]},
                   best_anchor={"model": best["model"], "value": _value(result, best)},
                   ratio=_value(result, mine) / _value(result, best))
        if "ease" in rows:
            out["ease"] = {"value": _value(result, rows["ease"]), "fit_seconds": rows["ease"]["fit_seconds"],
                           "ratio": _value(result, mine) / _value(result, rows["ease"]),
                           "time_ratio": mine["fit_seconds"] / max(rows["ease"]["fit_seconds"], 1e-9)}
    if result["recommenders"]:
        pub, vals = max(PUBLISHED.items(), key=lambda kv: kv[1][result["metric"]])
        out["best_published"] = {"model": pub, "value": vals[result["metric"]]}
    return out


def render(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        m = r["metrics"]
        if result["recommenders"]:
            rm = m["recommenders"]
            rows.append({"model": r["model"], "nDCG@10": rm["ndcg@10"], "Precision@10": rm["precision@10"],
                         "Recall@10": rm["recall@10"], "MAP": rm["map"], "± nDCG@10": m["stderr"]["ndcg@10"],
                         "fit s": f"{r['fit_seconds']:.1f}", "setting": r["setting"]})
        else:
            rows.append({"model": r["model"], "NDCG@20": m["ndcg@20"], "Recall@20": m["recall@20"],
                         "± NDCG@20": m["stderr"]["ndcg@20"], "NDCG@10": m["ndcg@10"], "coverage@20": m["coverage@20"],
                         "fit s": f"{r['fit_seconds']:.1f}", "setting": r["setting"]})
    if result["recommenders"]:
        for name, m in PUBLISHED.items():
            rows.append({"model": name, "nDCG@10": m["ndcg@10"], "Precision@10": m["precision@10"],
                         "Recall@10": m["recall@10"], "MAP": m["map"], "setting": "Microsoft Recommenders README"})
    s = result["sizes"]
    run = result.get("run")  # each log's own command and machine line (logs may come from separate --merge runs)
    lines = [f"### {result['title']}", "", *([f"`{run['command']}`  ", run["machine_line"], ""] if run else []),
             f"{s['events']:,} events, {s['users']:,} users, {s['items']:,} items; final training part "
             f"{s['train_events_final']:,} events; test: {s['test_users']:,} users, {s['test_pairs']:,} held-out pairs "
             f"({s['test_pairs_item_unseen_in_train']} of an item never seen in training). Tuning carve-out: "
             f"{s['train_events_tuning']:,} training events, {s['val_pairs']:,} validation pairs; chosen by validation "
             f"{result['metric']}.", "", markdown_table(rows), ""]
    earlier = {}
    for r in result["rows"]:
        if "measured_by" in r:
            earlier.setdefault(r["measured_by"], []).append(r["model"])
    lines += [f"Rows {', '.join(models)} kept from an earlier run on the same split: `{cmd}`." for cmd, models in earlier.items()]
    lines += [""] if earlier else []
    h = result["headline"]
    if "ratio" in h:
        line = (f"{h['ours']['model']} / best of EASE, ALS, VAECF ({h['best_anchor']['model']}), {h['metric']}: "
                f"**{h['ratio']:.3f}**")
        if "ease" in h:
            line += (f"; / EASE: **{h['ease']['ratio']:.3f}**; fit time {h['ours']['fit_seconds']:.1f} s vs EASE's "
                     f"{h['ease']['fit_seconds']:.1f} s (**{h['ease']['time_ratio']:.2f}x**)")
        if "best_published" in h:
            line += f"; / best published ({h['best_published']['model']}): **{h['ours']['value'] / h['best_published']['value']:.3f}**"
        lines.append(line)
    return "\n".join(lines)


DEFINITIONS = (
    "Everywhere: full ranking over the catalogue, the user's training items excluded, ties to the lower item index, "
    "`±` = standard error over users; log (a) follows Microsoft Recommenders' `python_evaluation` definitions "
    "(Recall@10 = hits / |R|, MAP = (1/|R|) Σ Precision@i), the others the package's (Recall@K = hits / min(K, |R|), "
    "NDCG@K with binary gains). `auto` is the default `python train.py` model (`dmp_dl.training.selection`); the anchors "
    "see the same binary user-item matrix: `popularity` and `ease` (float64 Cholesky, the package's "
    "`EASEScorer`) are the package's baselines, `als` / `bpr` are `implicit` 0.7, `vaecf` is cornac's Mult-VAE, all on CPU."
)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logs", nargs="+", default=list(LOGS), choices=list(LOGS))
    ap.add_argument("--models", nargs="*", default=["auto"], choices=[*CHOICE_MODELS, *LEGACY_MODELS])
    ap.add_argument("--anchors", nargs="*", default=["popularity", "ease", "als", "bpr", "vaecf"],
                    choices=["popularity", "ease", "als", "bpr", "vaecf"])
    ap.add_argument("--val-frac", type=float, default=0.1, help="validation carve-out per user for tuning")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--quick", action="store_true", help="2 epochs and tiny grids: a plumbing check, not numbers")
    ap.add_argument("--scratch", action="store_true", help="write into bench/out/ (git-ignored), not bench/RESULTS.md")
    ap.add_argument("--merge", action="store_true",
                    help="keep the logs of results/quality.json that this run does not measure (each keeps its command), "
                         "and a measured log's rows of models and anchors left out this time (same split only)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for our models (after --)")
    output.add_arguments(ap)
    args = ap.parse_args(argv)
    needs = {**({"implicit": "the als / bpr anchors"} if {"als", "bpr"} & set(args.anchors) else {}),
             **({"cornac": "the vaecf anchor"} if "vaecf" in args.anchors else {})}
    output.require(needs, "bench/quality.py", "or leave those anchors out, e.g. --anchors popularity ease")
    output.use(args, quick=args.quick)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    results, body, skipped = {}, [DEFINITIONS, ""], []
    previous: dict[str, Any] = {}
    if args.merge and (output.common.RESULTS_DIR / "quality.json").exists():
        import json

        previous = json.loads((output.common.RESULTS_DIR / "quality.json").read_text()).get("logs", {})
    run_info = {"command": command(), "machine_line": machine_line(machine())}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmp-bench-quality-") as tmp:
        for name in args.logs:
            needs = LOGS[name].get("needs")
            if needs is not None and not Path(needs).exists():
                skipped.append(f"{name}: {needs} not found")
                print(f"quality: {name} skipped: {needs} not found", flush=True)
                continue
            workdir = Path(tmp) / name
            workdir.mkdir()
            res = keep_unmeasured_rows(run_log(name, args, workdir), previous.get(name))
            res["headline"] = headline(res)
            res["run"] = run_info
            results[name] = res
    results = {n: results.get(n) or previous[n] for n in LOGS if n in results or n in previous}
    body += [x for res in results.values() for x in (render(res), "")]
    data = {"logs": results, "quick": args.quick, "overrides": args.overrides, "skipped": skipped,
            "seconds": time.perf_counter() - t0, "headline": {n: r["headline"] for n, r in results.items()}}
    if args.quick:
        body.insert(0, "**Quick run (`--quick`: 2 epochs, tiny grids) — checks the plumbing; not comparable numbers.**\n")
    if skipped:
        body.append("Skipped: " + "; ".join(skipped) + ".")
    body.append(f"Section wall time: {data['seconds']:.0f} s.")
    write_section("quality", "Quality: the default model against EASE, ALS and a deep peer", "\n".join(body), data)
    return data


if __name__ == "__main__":
    main()
