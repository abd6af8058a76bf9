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
from headline import write_headline  # noqa: E402

SECTIONS = ("quality", "train", "serve", "scale")
# bench/serve.py at the small scale of bench/RESULTS.md ("Small scale (10k and 100k items)").
SERVE_ARGS = ["--items", "10000", "100000", "--users", "20000", "--queries", "1000", "--batch", "5000",
              "--http-requests", "1000", "--concurrency", "50"]
SERVE_QUICK_ARGS = ["--items", "5000", "--users", "2000", "--queries", "100", "--batch", "500", "--eval-queries", "200",
                    "--http-requests", "100", "--concurrency", "4"]
# Modules of this entry point (not runnable sections); any other bench/<name>.py is one.
HELPERS = {"run", "common", "headline", "output", "ours", "anchors", "ranking", "quality", "train_speed", "scale", "serve"}


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
