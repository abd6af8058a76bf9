"""Training speed: examples/s and time-to-quality of our ``mf`` and ``two_tower`` against the fit time
of implicit's ALS and BPR, on the same synthetic data and split; on a CUDA GPU also throughput at
>= 20M events in fp32 and bf16.

CPU part (always, on CPU even where CUDA is present): the project's synthetic generator (``data=synthetic``) at ``--users/--items/
--events``, its default split (global temporal 80/10/10). Ours are trained by the pipeline
(``ours.fit``: ``dmp_dl.pipeline.run.run``) for at most ``--epochs`` epochs with the config's early
stopping; the training loop is timed per epoch (validation excluded) and val/recall@20 read after
each. implicit fits the same training user-item pairs (binary, deduplicated: implicit's input)
with all cores; its factors are snapshotted during the fit and scored on the same validation
users by the package's evaluator (scoring time excluded).

* examples/s: ours = training events x epochs / training seconds; implicit = non-zero user-item
  pairs x iterations / fit seconds (one pass over the pairs per iteration; the units differ — an
  ALS iteration solves a least-squares problem per user and per item — so compare fit times).
* time-to-quality: training seconds until val/recall@20 first reaches ``--target`` x the best
  val/recall@20 an implicit model reached in this run (the anchor's quality: a common bar), and
  until it reaches ``--target`` x the model's own best (how fast it converges). "not reached" is
  reported as such. implicit runs with fixed settings (``IMPLICIT``; ``bench/quality.py`` tunes it
  on MovieLens).

GPU part (only when ``torch.cuda.is_available()``; skipped with a message otherwise): one synthetic
set of ``--gpu-events`` (default 20M) prepared once; each model trained for ``--gpu-steps``
batches of ``data.batch_size`` (the config's, or ``--gpu-batch-size``) in ``32-true`` and
``bf16-mixed`` precision; training examples/s from the timed loop.

    python bench/train_speed.py                 # CPU part at the default size (< 10 min on 2 cores)
    python bench/train_speed.py --quick         # tiny: checks the plumbing
    python bench/train_speed.py -- model.dim=32 # Hydra overrides for our models
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
from common import markdown_table, write_section  # noqa: E402

OURS = ("mf", "two_tower")
# implicit settings (not tuned here; bench/quality.py tunes on MovieLens). Snapshots: where val/recall@20 is read.
IMPLICIT = {
    "als": {"params": {"factors": 64, "regularization": 0.1, "alpha": 5.0}, "snapshots": list(range(1, 16))},
    "bpr": {"params": {"factors": 64, "learning_rate": 0.05, "regularization": 0.01}, "snapshots": list(range(10, 101, 10))},
}


def synthetic_overrides(users: int, items: int, events: int) -> list[str]:
    return ["data=synthetic", f"data.source.n_users={users}", f"data.source.n_items={items}", f"data.source.n_events={events}"]


def first_reaching(curve: list[tuple[float, float]], bar: float) -> float | None:
    """Seconds of the first (seconds, value) point with value >= bar, else None."""
    return next((s for s, v in curve if v >= bar), None)


def cpu_part(args, workdir: Path) -> dict[str, Any]:
    import ours
    from anchors import fit_implicit
    from ranking import evaluate, split_of

    data = synthetic_overrides(args.users, args.items, args.events)
    rows: list[dict[str, Any]] = []
    dm = None
    for model in args.models:
        res = ours.fit(ours.compose_train_cfg([*data, f"model={model}", f"trainer.max_epochs={args.epochs}",
                                               "trainer.accelerator=cpu", "trainer.devices=1", *args.overrides],
                                              workdir / f"train-{model}"))
        dm = res["datamodule"]
        curve = [(e["cumulative_train_seconds"], e.get("val/recall@20", float("nan"))) for e in res["epochs"]]
        rows.append({"model": model, "kind": "ours", "curve": curve, "train_seconds": res["train_seconds"],
                     "passes": len(res["epochs"]), "examples": int(len(dm.train_idx)),
                     "examples_per_second": res["examples_per_second"], "unit": "events"})
        print(f"[train] {model}: {res['examples_per_second']:.0f} events/s, {len(res['epochs'])} epochs, "
              f"{res['train_seconds']:.1f} s, best val/recall@20 {max(v for _, v in curve):.4f}", flush=True)
    if dm is None:
        from hydra.utils import instantiate

        dm = instantiate(ours.compose_train_cfg(data, workdir / "dm").data, _convert_="all").prepare()
    val = split_of(dm, "val")
    for name in args.implicit:
        spec = IMPLICIT[name]
        snaps = [s for s in spec["snapshots"] if not args.quick or s <= spec["snapshots"][2]]
        fit = fit_implicit(name, dm.train_seen, spec["params"], snaps, seed=args.seed)
        curve = [(fit.snapshots[i][0], evaluate(fit.scorer(i), val, [20])["recall@20"]) for i in sorted(fit.snapshots)]
        nnz = int(dm.train_seen.nnz)
        rows.append({"model": f"{name} (implicit)", "kind": "implicit", "curve": curve, "train_seconds": fit.seconds,
                     "passes": max(snaps), "examples": nnz, "examples_per_second": nnz * max(snaps) / fit.seconds,
                     "unit": "pairs", "params": spec["params"]})
        print(f"[train] {name}: {fit.seconds:.1f} s for {max(snaps)} iterations, best val/recall@20 "
              f"{max(v for _, v in curve):.4f}", flush=True)
    anchors = [r for r in rows if r["kind"] == "implicit"] or rows
    bar = args.target * max(max(v for _, v in r["curve"]) for r in anchors)
    for r in rows:
        own = max(v for _, v in r["curve"])
        r["best_val_recall@20"] = own
        r["seconds_to_common_bar"] = first_reaching(r["curve"], bar)
        r["seconds_to_own_bar"] = first_reaching(r["curve"], args.target * own)
    sizes = {"users": dm.n_users, "items": dm.n_items, "train_events": int(len(dm.train_idx)),
             "train_pairs": int(dm.train_seen.nnz), "val_users": len(val.test)}
    return {"rows": rows, "sizes": sizes, "common_bar": bar, "target": args.target}


def gpu_part(args, workdir: Path) -> dict[str, Any]:
    """Throughput of each model in fp32 and bf16 on one large synthetic set (CUDA only)."""
    import ours
    import torch
    from hydra.utils import instantiate
    if not torch.cuda.is_available() and not args.gpu_part_on_cpu:
        return {"skipped": "no CUDA device: the GPU part (>= 20M events, fp32 vs bf16) was not run"}
    accel = "gpu" if torch.cuda.is_available() else "cpu"
    data = synthetic_overrides(args.gpu_users, args.gpu_items, args.gpu_events)
    if args.gpu_batch_size:
        data.append(f"data.batch_size={args.gpu_batch_size}")
    t0 = time.perf_counter()
    base = ours.compose_train_cfg([*data, "seed=0"], workdir / "gpu-dm")
    dm = instantiate(base.data, _convert_="all").prepare()
    prepare_s = time.perf_counter() - t0
    rows = []
    for model in args.models:
        for precision in ("32-true", "bf16-mixed"):
            cfg = ours.compose_train_cfg([*data, f"model={model}", f"trainer.accelerator={accel}", "trainer.devices=1",
                                          f"trainer.precision={precision}", "callbacks=none", *args.overrides],
                                         workdir / f"gpu-{model}-{precision}")
            r = ours.train_steps(cfg, dm, args.gpu_steps)
            rows.append({"model": model, "precision": precision, **r})
            print(f"[train/gpu] {model} {precision}: {r['examples_per_second']:,.0f} examples/s", flush=True)
    return {"rows": rows, "events": int(len(dm.events)), "train_events": int(len(dm.train_idx)),
            "users": dm.n_users, "items": dm.n_items, "prepare_seconds": prepare_s, "device": accel}


def fmt_s(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.1f}"


def headline(cpu: dict) -> dict:
    """Best of ours vs the fastest implicit model: time to the common quality bar and fit time."""
    ours = [r for r in cpu["rows"] if r["kind"] == "ours"]
    imp = [r for r in cpu["rows"] if r["kind"] == "implicit"]
    out: dict[str, Any] = {}
    reach_ours = [r for r in ours if r["seconds_to_common_bar"] is not None]
    reach_imp = [r for r in imp if r["seconds_to_common_bar"] is not None]
    if reach_ours and reach_imp:
        a = min(reach_ours, key=lambda r: r["seconds_to_common_bar"])
        b = min(reach_imp, key=lambda r: r["seconds_to_common_bar"])
        out["time_to_quality"] = {"ours": a["model"], "ours_s": a["seconds_to_common_bar"], "implicit": b["model"],
                                  "implicit_s": b["seconds_to_common_bar"], "ratio": a["seconds_to_common_bar"] / b["seconds_to_common_bar"]}
    elif imp:
        out["time_to_quality"] = {"note": "none of ours reached the common bar" if not reach_ours else "no implicit model reached the common bar"}
    if ours and imp:
        a, b = min(ours, key=lambda r: r["train_seconds"]), min(imp, key=lambda r: r["train_seconds"])
        out["fit_time"] = {"ours": a["model"], "ours_s": a["train_seconds"], "implicit": b["model"],
                           "implicit_s": b["train_seconds"], "ratio": a["train_seconds"] / b["train_seconds"]}
    return out


def render(cpu: dict, gpu: dict, args) -> str:
    s = cpu["sizes"]
    rows = [{"model": r["model"], "examples/s": f"{r['examples_per_second']:,.0f} {r['unit']}/s",
             "passes": r["passes"], "fit s": f"{r['train_seconds']:.1f}",
             "best val R@20": r["best_val_recall@20"],
             f"s to {args.target:g}× best implicit": fmt_s(r["seconds_to_common_bar"]),
             f"s to {args.target:g}× own best": fmt_s(r["seconds_to_own_bar"])} for r in cpu["rows"]]
    lines = [f"### CPU: synthetic, {s['users']:,} users, {s['items']:,} items, {s['train_events']:,} training events "
             f"({s['train_pairs']:,} distinct user-item pairs), {s['val_users']:,} validation users", "",
             markdown_table(rows), "",
             f"Common bar: val/recall@20 ≥ {cpu['common_bar']:.4f} ({args.target:g} × the best an implicit model reached). "
             "`passes`: epochs (ours) or iterations (implicit); `fit s`: training loop only (ours: validation "
             "excluded; implicit: snapshot scoring excluded). implicit ALS: "
             + ", ".join(f"{k}={v}" for k, v in IMPLICIT["als"]["params"].items()) + "; BPR: "
             + ", ".join(f"{k}={v}" for k, v in IMPLICIT["bpr"]["params"].items()) + ".", ""]
    h = cpu["headline"]
    if "time_to_quality" in h and "ratio" in h["time_to_quality"]:
        t = h["time_to_quality"]
        lines.append(f"Time to the common bar, fastest of ours ({t['ours']}, {t['ours_s']:.1f} s) / fastest implicit "
                     f"({t['implicit']}, {t['implicit_s']:.1f} s): **{t['ratio']:.2f}**.")
    elif "time_to_quality" in h:
        lines.append(f"Time to the common bar: {h['time_to_quality']['note']}.")
    lines.append("")
    lines.append("### GPU")
    lines.append("")
    if "skipped" in gpu:
        lines.append(gpu["skipped"] + ".")
    else:
        lines += [f"Synthetic, {gpu['events']:,} events ({gpu['train_events']:,} training), {gpu['users']:,} users, "
                  f"{gpu['items']:,} items, prepared in {gpu['prepare_seconds']:.0f} s; device: {gpu['device']}.", "",
                  markdown_table([{**r, "seconds": f"{r['seconds']:.1f}", "examples_per_second": f"{r['examples_per_second']:,.0f}"}
                                  for r in gpu["rows"]])]
        for model in args.models:
            by = {r["precision"]: r["examples_per_second"] for r in gpu["rows"] if r["model"] == model}
            if len(by) == 2:
                lines.append(f"\n{model}: bf16 / fp32 throughput **{by['bf16-mixed'] / by['32-true']:.2f}**.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(OURS), choices=list(OURS))
    ap.add_argument("--implicit", nargs="*", default=list(IMPLICIT), choices=list(IMPLICIT))
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--items", type=int, default=2_000)
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--epochs", type=int, default=5, help="at most this many epochs for ours (early stopping may stop sooner)")
    ap.add_argument("--target", type=float, default=0.9, help="time-to-quality bar as a fraction of the best val/recall@20")
    ap.add_argument("--gpu-events", type=int, default=20_000_000)
    ap.add_argument("--gpu-users", type=int, default=500_000)
    ap.add_argument("--gpu-items", type=int, default=50_000)
    ap.add_argument("--gpu-steps", type=int, default=2000, help="batches timed per model and precision")
    ap.add_argument("--gpu-batch-size", type=int, default=None, help="training batch size on the GPU (default: data.batch_size)")
    ap.add_argument("--gpu-part-on-cpu", action="store_true", help=argparse.SUPPRESS)  # plumbing check without CUDA
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a plumbing check, not numbers")
    ap.add_argument("--scratch", action="store_true", help="write into bench/out/ (git-ignored), not bench/RESULTS.md")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for our models (after --)")
    output.add_arguments(ap)
    args = ap.parse_args(argv)
    output.require({"implicit": "the ALS / BPR anchors"} if args.implicit else {}, "bench/train_speed.py", "or leave them out with --implicit (no names)")
    output.use(args, quick=args.quick)
    if args.quick:
        args.users, args.items, args.events, args.epochs = 1000, 300, 20_000, 2
        args.gpu_events, args.gpu_users, args.gpu_items, args.gpu_steps = 50_000, 2000, 500, 20
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmp-bench-train-") as tmp:
        cpu = cpu_part(args, Path(tmp))
        cpu["headline"] = headline(cpu)
        gpu = gpu_part(args, Path(tmp))
    if "skipped" in gpu:
        print(f"[train] {gpu['skipped']}")
    data = {"cpu": cpu, "gpu": gpu, "quick": args.quick, "overrides": args.overrides,
            "seconds": time.perf_counter() - t0, "headline": cpu["headline"]}
    body = render(cpu, gpu, args)
    if args.quick:
        body = "**Quick run (`--quick`: tiny data) — checks the plumbing; not comparable numbers.**\n\n" + body
    body += f"\n\nSection wall time: {data['seconds']:.0f} s."
    write_section("train", "Training speed", body, data)
    return data


if __name__ == "__main__":
    main()
