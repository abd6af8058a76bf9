"""One entry point for the benchmarks: quality, training speed, serving and scale, side by side.

    python bench/run.py all                 # quality, train, serve, scale (on 2 CPU cores: under ~10 min each)
    python bench/run.py quality train       # some sections
    python bench/run.py all --quick         # tiny sizes: checks that everything runs
    python bench/run.py quality --results /tmp/quality.md   # the results into a file of yours
    python bench/run.py all --write-results # rewrite the tracked bench/RESULTS.md and bench/results/
    python bench/run.py privacy             # also any other bench/<name>.py present (audience, privacy, load, ...), run with its defaults

Each section prints its command, machine and versions and its table, and writes a dated section to
the results file and its numbers to ``results/<section>.json`` beside it; afterwards the
"Headline" block at the top of that file is rewritten from those JSON files (ours vs the best
anchor for quality, vs implicit for training time, ANN vs exact for serving, growth slopes). The
results file is the git-ignored ``bench/out/RESULTS.md`` unless ``--results FILE`` or
``--write-results`` (the tracked ``bench/RESULTS.md``) names another. Before any section runs, the
packages of every section asked for are checked: a missing one is one ``error:`` line naming it and
the pip extra to install (exit status 2).

Sections on their own, with all their options: ``bench/quality.py``, ``bench/train_speed.py``,
``bench/serve.py`` (the serving issue's script; ``serve`` here runs it at its small scale),
``bench/scale.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import output  # noqa: E402
from common import markdown_table, write_section  # noqa: E402

SECTIONS = ("quality", "train", "serve", "scale")
# bench/serve.py at the small scale of bench/RESULTS.md ("Small scale (10k and 100k items)").
SERVE_ARGS = ["--items", "10000", "100000", "--users", "20000", "--queries", "1000", "--batch", "5000",
              "--http-requests", "1000", "--concurrency", "50"]
SERVE_QUICK_ARGS = ["--items", "5000", "--users", "2000", "--queries", "100", "--batch", "500", "--eval-queries", "200",
                    "--http-requests", "100", "--concurrency", "4"]
# Modules of this entry point (not runnable sections); any other bench/<name>.py is one.
HELPERS = {"run", "common", "output", "ours", "anchors", "ranking", "quality", "train_speed", "scale", "serve"}
HEADLINE_START, HEADLINE_END = "<!-- headline -->", "<!-- /headline -->"


def serve_section(quick: bool) -> dict:
    """Run ``bench/serve.py`` unchanged and write its latency/recall table as the ``serving`` section."""
    with tempfile.TemporaryDirectory(prefix="dmp-bench-serve-") as tmp:
        out = Path(tmp) / "serve.json"
        cmd = [sys.executable, str(BENCH / "serve.py"), *(SERVE_QUICK_ARGS if quick else SERVE_ARGS), "--out", str(out)]
        print("$ " + " ".join(["python", "bench/serve.py", *cmd[2:-2]]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        rows = json.loads(out.read_text())["rows"]
    table = [{"items": f"{r['items']:,}", "index": f"`{r['factory']}` {r['search_params']}".strip(),
              "recall@10": r["recall@10"], "FAISS p50 / p99 ms": f"{r['faiss_p50_ms']:.2f} / {r['faiss_p99_ms']:.2f}",
              "recommend p50 / p99 ms": f"{r['recommend_p50_ms']:.2f} / {r['recommend_p99_ms']:.2f}",
              "batch users/s": f"{r['batch_users_per_s']:,.0f}",
              "HTTP 1 client p50 / p99 ms": f"{r['http1_p50_ms']:.1f} / {r['http1_p99_ms']:.1f}" if "http1_p50_ms" in r else "",
              "HTTP p50 / p99 ms": f"{r['http_p50_ms']:.0f} / {r['http_p99_ms']:.0f}" if "http_p50_ms" in r else "",
              "HTTP req/s": f"{r['http_requests_per_s']:,.0f}" if "http_requests_per_s" in r else "",
              "build s": f"{r['index_build_s']:.1f}"} for r in rows]
    head = serving_headline(rows)
    body = [f"`bench/serve.py` ({'quick sizes' if quick else 'its small scale'}): a real bundle of synthetic 64-d vectors "
            "per catalogue size and index, loaded with `Recommender.load`; single queries with one FAISS thread, "
            "p50 / p99 over random users; HTTP against `serve.py` (clients on the same machine). Definitions: the "
            "Serving part of this file.", "", markdown_table(table), ""]
    for h in head.get("ann", []):
        body.append(f"{h['items']:,} items, `{h['factory']}` vs exact `Flat`: recall@10 {h['recall@10']:.3f}; "
                    f"recommend p50 latency exact / ANN **{h['speedup_p50']:.2f}×** (above 1: the ANN index is faster); "
                    f"batch users/s ANN / exact **{h['batch_ratio']:.2f}×**.")
    data = {"rows": rows, "headline": head, "quick": quick, "seconds": time.perf_counter() - t0,
            "serve_args": SERVE_QUICK_ARGS if quick else SERVE_ARGS}
    if quick:
        body.insert(0, "**Quick run (`--quick`: tiny sizes) — checks the plumbing; not comparable numbers.**\n")
    write_section("serving", "Serving: latency and recall", "\n".join(body), data)
    return data


def serving_headline(rows: list[dict]) -> dict:
    """Each ANN index against exact (Flat) at the largest catalogue measured with both."""
    sizes = sorted({r["items"] for r in rows if r["index"] == "flat"} & {r["items"] for r in rows if r["index"] != "flat"})
    if not sizes:
        return {}
    n = sizes[-1]
    flat = next(r for r in rows if r["items"] == n and r["index"] == "flat")
    ann = [{"items": n, "index": r["index"], "factory": r["factory"], "recall@10": r["recall@10"],
            "speedup_p50": flat["recommend_p50_ms"] / r["recommend_p50_ms"],
            "batch_ratio": r["batch_users_per_s"] / flat["batch_users_per_s"]}
           for r in rows if r["items"] == n and r["index"] != "flat"]
    return {"ann": ann}


# The optional packages each section imports (package -> what for); see output.require.
SECTION_NEEDS = {
    "quality": {"implicit": "the als / bpr anchors", "cornac": "the vaecf anchor"},
    "train": {"implicit": "the ALS / BPR anchors"},
    "serve": {"httpx": "the HTTP clients"},
    "load": {"httpx": "the HTTP clients"},
    "realtime": {"httpx": "the HTTP clients"},
    "reliability": {"httpx": "the HTTP clients"},
    "api_contract": {"schemathesis": "the generated requests", "hypothesis": "their search"},
    "privacy": {"opacus": "the DP-SGD accountant"},
}


def needs_of(names: list[str]) -> dict[str, str]:
    """The packages (package -> what for, with the sections) of the sections ``names``."""
    needs: dict[str, list[str]] = {}
    for name in names:
        for package, why in SECTION_NEEDS.get(name, {}).items():
            needs.setdefault(package, []).append(f"{name}: {why}")
    return {package: "; ".join(whys) for package, whys in needs.items()}


def run_section(name: str, quick: bool, scratch: bool = False, results: list[str] | None = None) -> None:
    q = (["--quick"] if quick else []) + (["--scratch"] if scratch else []) + list(results or [])
    if name == "quality":
        import quality

        quality.main(q)
    elif name == "train":
        import train_speed

        train_speed.main(q)
    elif name == "serve":
        serve_section(quick)
    elif name == "scale":
        import scale

        scale.main(q)
    elif quick or scratch:
        print(f"{name}: not run with --quick / --scratch (bench/{name}.py runs with its own defaults)")
    else:  # another bench script, with its own defaults and its own section of the results file
        subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *(results or [])], check=True)


def _load(name: str) -> dict | None:
    path = common.RESULTS_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def headline_lines() -> list[str]:
    """The headline ratios from ``results/{quality,train,serving,scale}.json`` (whatever exists)."""
    lines = []
    q = _load("quality")
    if q and "headline" in q:
        for name, h in q["headline"].items():
            if "ours" not in h:
                continue
            s = f"- **Quality**, {name}, {h['metric']}: ours ({h['ours']['model']}) {h['ours']['value']:.4f}"
            if "best_anchor" in h:
                s += (f" vs the best of EASE / ALS / VAECF ({h['best_anchor']['model']}) {h['best_anchor']['value']:.4f}: "
                      f"**{h['ours']['value'] / h['best_anchor']['value']:.3f}×**")
            if "ease" in h:
                s += (f"; fit {h['ours']['fit_seconds']:.1f} s vs EASE's {h['ease']['fit_seconds']:.1f} s "
                      f"(**{h['ease']['time_ratio']:.2f}×**)")
            if "best_published" in h:
                s += (f"; vs best published ({h['best_published']['model']}) {h['best_published']['value']:.3f}: "
                      f"**{h['ours']['value'] / h['best_published']['value']:.2f}×**")
            lines.append(s + f" ({q['machine']['date']}{', quick' if q.get('quick') else ''}).")
    t = _load("train")
    if t and "headline" in t:
        h = t["headline"]
        parts = []
        if "ratio" in h.get("time_to_quality", {}):
            x = h["time_to_quality"]
            parts.append(f"time to the common val/recall@20 bar, ours ({x['ours']}) {x['ours_s']:.1f} s vs implicit "
                         f"({x['implicit']}) {x['implicit_s']:.1f} s: **{x['ratio']:.1f}×**")
        elif "note" in h.get("time_to_quality", {}):
            parts.append(f"time to quality: {h['time_to_quality']['note']}")
        if "fit_time" in h:
            x = h["fit_time"]
            parts.append(f"full fit, ours ({x['ours']}) {x['ours_s']:.1f} s vs implicit ({x['implicit']}) "
                         f"{x['implicit_s']:.1f} s: **{x['ratio']:.1f}×**")
        gpu = t.get("gpu", {})
        if "rows" in gpu:
            for model in sorted({r["model"] for r in gpu["rows"]}):
                by = {r["precision"]: r["examples_per_second"] for r in gpu["rows"] if r["model"] == model}
                if len(by) == 2:
                    parts.append(f"{model} on {gpu['device']}: {by['bf16-mixed']:,.0f} examples/s in bf16, "
                                 f"**{by['bf16-mixed'] / by['32-true']:.2f}×** fp32")
        elif "skipped" in gpu:
            parts.append("GPU part not run (no CUDA device)")
        if parts:
            lines.append("- **Training** (CPU, synthetic): " + "; ".join(parts)
                         + f" ({t['machine']['date']}{', quick' if t.get('quick') else ''}).")
    s = _load("serving")
    if s and s.get("headline", {}).get("ann"):
        parts = [f"`{h['factory']}` recall@10 {h['recall@10']:.3f}, p50 latency exact / ANN **{h['speedup_p50']:.2f}×**"
                 for h in s["headline"]["ann"]]
        lines.append(f"- **Serving**, ANN vs exact at {s['headline']['ann'][0]['items']:,} items: " + "; ".join(parts)
                     + f" ({s['machine']['date']}{', quick' if s.get('quick') else ''}).")
    c = _load("scale")
    if c and c.get("slopes"):
        sl = {k: v for k, v in c["slopes"].items() if v is not None}
        shown = ", ".join(f"{k} {v:.2f}" for k, v in sl.items())
        lines.append(f"- **Scale**, log-log slope of cost vs size (1 = linear): {shown}"
                     f" ({c['machine']['date']}{', quick' if c.get('quick') else ''}).")
    d = _load("data_large")  # bench/scale.py --data-stage --large
    runs = [r for r in (d or {}).get("runs", []) if "error" not in r]
    if runs:
        top = max(runs, key=lambda r: r["events"])
        slope = (d.get("slopes") or {}).get("wall")
        lines.append(f"- **Data stage at scale** (hive Parquet, `prepare()`): {top['events']:,} events "
                     f"({top['users']:,} users x {top['items']:,} items) in {top['total']['wall']:.0f} s, peak RSS "
                     f"**{top['peak_rss_mib']:,.0f} MiB**" + (f", time slope {slope:.2f}" if slope is not None else "")
                     + f" ({d['machine']['date']}).")
    return lines


def write_headline() -> None:
    """(Re)write the Headline block right under the title of RESULTS.md."""
    lines = headline_lines() or ["- _(no section results yet: run `python bench/run.py all`)_"]
    block = (f"{HEADLINE_START}\n## Headline\n\nRatios from the latest run of each section below (details and "
             f"commands there).\n\n" + "\n".join(lines) + f"\n{HEADLINE_END}")
    path = common.RESULTS_MD
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"{re.escape(HEADLINE_START)}.*?{re.escape(HEADLINE_END)}", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        first, _, rest = text.partition("\n")
        text = f"{first}\n\n{block}\n\n{rest.lstrip()}" if first.startswith("# ") else f"{block}\n\n{text}"
    path.write_text(text)
    print("\n## Headline\n" + "\n".join(lines) + f"\n(written to the top of {path})")


def main(argv: list[str] | None = None) -> int:
    extra = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in HELPERS)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="+", choices=[*SECTIONS, "all", *extra])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, results into bench/out/ (a plumbing check)")
    ap.add_argument("--scratch", action="store_true", help="write into bench/out/ (git-ignored; the default)")
    output.add_arguments(ap)
    args = ap.parse_args(argv)
    names = list(dict.fromkeys(n for s in args.sections for n in (SECTIONS if s == "all" else (s,))))
    output.require(needs_of(names), f"bench/run.py {' '.join(args.sections)}")
    output.use(args, quick=args.quick)
    results = output.forward(args)
    print(f"$ {common.command()}\n{common.machine_line(common.machine())}", flush=True)
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        try:
            run_section(name, args.quick, args.scratch, results)
        except Exception:  # one broken section must not lose the others' results
            traceback.print_exc()
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s{' (FAILED)' if name in failed else ''} ===", flush=True)
    write_headline()
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
