"""The Headline block at the top of RESULTS.md: one line per section that has a headline ratio
(quality, training speed, serving, scale, the data stage at scale), read from ``results/*.json``
beside the results file. :func:`common.write_section` rewrites it after every section it writes,
so a section run on its own (``bench/scale.py --data-stage --large --write-results``) leaves no stale
headline behind."""

from __future__ import annotations

import json
import re

import common

HEADLINE_START, HEADLINE_END = "<!-- headline -->", "<!-- /headline -->"
SOURCES = ("quality", "train", "serving", "scale", "data_large")  # the sections a headline line is read from


def _load(name: str) -> dict | None:
    path = common.RESULTS_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def headline_lines() -> list[str]:
    """The headline ratios from ``results/<section>.json`` of :data:`SOURCES` (whatever exists)."""
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


def write_headline(quiet: bool = False) -> None:
    """(Re)write the Headline block right under the title of RESULTS.md; ``quiet``: without printing it."""
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
    if not quiet:
        print("\n## Headline\n" + "\n".join(lines) + f"\n(written to the top of {path})")
