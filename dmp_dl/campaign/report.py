"""The campaign reports: ``measure.md`` / ``measure.html`` and ``uplift.md`` / ``uplift.html``.

A report is a title and a list of sections, each a list of blocks (a paragraph, a warning, a table,
a figure); Markdown shows the tables (and names the plots), HTML shows everything in one
self-contained file (plots as PNG data URIs). Plots use matplotlib's Agg backend.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import norm  # noqa: E402

from dmp_dl.campaign.measure import p_text, percent  # noqa: E402
from dmp_dl.core.io import atomic_write_text  # noqa: E402

CSS = ("body{font-family:-apple-system,'Segoe UI',Roboto,'DejaVu Sans',Arial,sans-serif;margin:0;color:#1d2433;background:#f6f7f9}"
       "main{max-width:1100px;margin:0 auto;padding:24px 32px 64px;background:#fff}h1{font-size:26px}"
       "h2{font-size:20px;margin:32px 0 10px;border-bottom:2px solid #e3e6eb}p,li{line-height:1.5}"
       ".warn{background:#fff4e0;border-left:4px solid #e69500;padding:8px 12px}"
       "table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}th,td{padding:5px 10px;border-bottom:1px solid #e6e8ec;text-align:right}"
       "th{background:#f1f3f6}td:first-child,th:first-child{text-align:left}"
       "figure{margin:14px 0 22px}figure img{max-width:100%;border:1px solid #eceef2}figcaption{color:#556;font-size:13px}")
STYLE = {"axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False, "font.size": 10,
         "legend.fontsize": 9, "legend.frameon": False}
COLOURS = {"treatment": "#1f77b4", "control": "#ff7f0e"}


@dataclass
class Block:
    kind: str  # p | warn | table | figure
    content: object  # str | (header, rows) | (title, caption, png)


@dataclass
class Document:
    title: str
    intro: str
    sections: list[tuple[str, list[Block]]] = field(default_factory=list)


def num(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if isinstance(x, (bool, str)):
        return str(x)
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def to_markdown(doc: Document, html_name: str) -> str:
    out = [f"# {doc.title}", "", doc.intro, "", f"Plots: {html_name}.", ""]
    for heading, blocks in doc.sections:
        out += [f"## {heading}", ""]
        for b in blocks:
            if b.kind == "p":
                out += [str(b.content), ""]
            elif b.kind == "warn":
                out += [f"> **Warning.** {b.content}", ""]
            elif b.kind == "table":
                header, rows = b.content
                out += ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
                out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows] + [""]
            elif b.kind == "figure":
                out += [f"_Plot in {html_name}: {b.content[0]}._", ""]
    return "\n".join(out)


def to_html(doc: Document) -> str:
    parts = [f"<h1>{html.escape(doc.title)}</h1>", f"<p>{html.escape(doc.intro)}</p>"]
    for heading, blocks in doc.sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for b in blocks:
            if b.kind == "p":
                parts.append(f"<p>{html.escape(str(b.content))}</p>")
            elif b.kind == "warn":
                parts.append(f'<p class="warn"><b>Warning.</b> {html.escape(str(b.content))}</p>')
            elif b.kind == "table":
                header, rows = b.content
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
                body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif b.kind == "figure":
                title, caption, data = b.content
                uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
                parts.append(f'<figure><img alt="{html.escape(title)}" src="{uri}"><figcaption><b>{html.escape(title)}.</b> '
                             f"{html.escape(caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(doc.title)}</title>'
            f"<style>{CSS}</style></head><body><main>\n" + "\n".join(parts) + "\n</main></body></html>\n")


def write(doc: Document, out: Path, stem: str) -> dict[str, str]:
    """Write ``<stem>.md`` and ``<stem>.html`` into ``out``; returns their paths."""
    md, page = out / f"{stem}.md", out / f"{stem}.html"
    atomic_write_text(md, to_markdown(doc, page.name))
    atomic_write_text(page, to_html(doc))
    return {"report_md": str(md), "report_html": str(page)}


# -- measure ---------------------------------------------------------------------------------------
def interval(low, high) -> str:
    return f"[{num(low)}, {num(high)}]"


def _inference(row: dict, metric: str) -> list[str]:
    """The interval and p-value cells of ``metric`` in ``row``, or "not enough data"."""
    if row.get(f"{metric}_reason"):
        return ["not enough data", "–"]
    return [interval(row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]), p_text(row[f"{metric}_p_value"])]


def _breakdown_table(rows: list[dict], key: str, metric: str, confidence: float) -> tuple[list[str], list[list[str]]]:
    m = metric
    rate = "rate" if m == "conversion" else "mean"
    header = [key, "treated", "control", f"{m} (treated)", f"{m} (control)", "lift", f"{percent(confidence)} % interval", "p-value"]
    body = [[str(r[key]), num(r["treatment"]), num(r["control"]), num(r[f"{m}_{rate}_treatment"]), num(r[f"{m}_{rate}_control"]),
             num(r[f"{m}_lift"]), *_inference(r, m)] for r in rows]
    return header, body


def _lift_figure(summary: dict, metric: str) -> bytes:
    panels = [k for k in ("by_segment", "by_decile") if summary.get(k)]
    z = float(norm.ppf(0.5 + summary["confidence"] / 2))
    level = f"{percent(summary['confidence'])} % interval"
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, max(len(panels), 1) + 1, figsize=(4.2 * (len(panels) + 1), 3.6), squeeze=False)
        ax = axes[0, 0]
        o = summary["overall"]
        rate = "rate" if metric == "conversion" else "mean"
        for i, group in enumerate(("treatment", "control")):
            value, n = o[f"{metric}_{rate}_{group}"] or 0.0, max(o[group], 1)
            half = z * np.sqrt(value * (1 - value) / n) if metric == "conversion" else None
            ax.bar(i, value, color=COLOURS[group], width=0.6, yerr=half, capsize=4)
        ax.set_xticks([0, 1], ["treatment", "control"])
        ax.set_title(f"{metric} per user" + (f" (±{z:.3g} SE)" if metric == "conversion" else ""))
        for ax, key in zip(axes[0, 1:], panels):
            rows = summary[key]
            x = np.arange(len(rows))
            lift = np.array([r[f"{metric}_lift"] if r[f"{metric}_lift"] is not None else np.nan for r in rows], float)
            lo = np.array([r[f"{metric}_ci_low"] if r[f"{metric}_ci_low"] is not None else np.nan for r in rows], float)
            hi = np.array([r[f"{metric}_ci_high"] if r[f"{metric}_ci_high"] is not None else np.nan for r in rows], float)
            ax.errorbar(x, lift, yerr=[lift - lo, hi - lift], fmt="o", capsize=3, color="#333")
            ax.axhline(0, color="#999", linewidth=1)
            if summary.get("lift") is not None:
                ax.axhline(summary["lift"], color=COLOURS["treatment"], linestyle="--", linewidth=1, label="overall lift")
                ax.legend(loc="best")
            ax.set_xticks(x, [str(r[key.removeprefix("by_")]) for r in rows])
            ax.set_xlabel(key.removeprefix("by_") + (" (1 = highest propensity)" if key == "by_decile" else ""))
            ax.set_title(f"lift per {key.removeprefix('by_')} ({level})")
        return png(fig)


def _cumulative_figure(first_days: np.ndarray, control: np.ndarray, end_days: float | None) -> bytes:
    finite = first_days[np.isfinite(first_days)]
    horizon = end_days if end_days is not None else (float(finite.max()) if len(finite) else 1.0)
    grid = np.linspace(0, max(horizon, 1e-9), 100)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for group, mask in (("treatment", ~control), ("control", control)):
            days = np.sort(first_days[mask][np.isfinite(first_days[mask])])
            share = np.searchsorted(days, grid, side="right") / max(int(mask.sum()), 1)
            ax.plot(grid, share, color=COLOURS[group], label=group, linewidth=2)
        ax.set_xlabel("days after the start")
        ax.set_ylabel("share of the group converted")
        ax.legend(loc="upper left")
        return png(fig)


def _headline_text(summary: dict) -> str:
    m, level = summary["metric"], percent(summary["confidence"])
    if summary["reason"]:
        return f"Headline ({m}): not enough data. {summary['reason'][0].upper()}{summary['reason'][1:]}."
    return (f"Headline ({m}): lift {num(summary['lift'])} (relative {num(summary['relative_lift'], 3)}), "
            f"{level} % interval {interval(summary['ci_low'], summary['ci_high'])} ({summary['interval_method']}), "
            f"p-value {p_text(summary['p_value'])} ({summary['p_value_method']}); {summary['verdict']} at "
            f"{level} % confidence.")


def measure_document(summary: dict, first_days: np.ndarray, control: np.ndarray) -> Document:
    m = summary["metric"]
    w = summary["window"]
    level = f"{percent(summary['confidence'])} % interval"
    intro = (f"Treatment (contacted) against the held-out control group, {m} in the window {w['start_iso']} .. "
             f"{w['end_iso'] or 'the end of the outcome log'}; conversion event: {summary['conversion_event']}. "
             "Every number is in measure_summary.json.")
    blocks = [Block("warn", text) for text in summary.get("warnings", [])]
    o = summary["overall"]
    rows = [["users", num(o["treatment"]), num(o["control"]), "", "", ""],
            ["conversion rate", num(o["conversion_rate_treatment"]), num(o["conversion_rate_control"]), num(o["conversion_lift"]),
             *_inference(o, "conversion")],
            ["revenue per user", num(o["revenue_mean_treatment"]), num(o["revenue_mean_control"]), num(o["revenue_lift"]),
             *_inference(o, "revenue")]]
    inc_c, inc_r = summary["incremental_conversions"], summary["incremental_revenue"]
    mde = summary["minimum_detectable_effect"]
    blocks += [
        Block("p", _headline_text(summary)),
        Block("table", (["", "treatment", "control", "lift", level, "p-value"], rows)),
        Block("p", f"Incremental conversions: {num(inc_c['estimate'])} {interval(inc_c['ci_low'], inc_c['ci_high'])}; "
                   f"incremental revenue: {num(inc_r['estimate'])} {interval(inc_r['ci_low'], inc_r['ci_high'])} "
                   f"(lift x treated users). Smallest lift these groups detect at 80 % power: {num(mde['lift'])}."),
        Block("figure", ("Lift", f"{m} per user by group, and the lift with its {level} per segment and per "
                                 "propensity decile (the control group is drawn within each of these strata)",
                         _lift_figure(summary, m))),
        Block("figure", ("Conversions over time", "share of each group that has converted, by days after the start",
                         _cumulative_figure(first_days, control, w.get("days")))),
    ]
    doc = Document("Campaign measurement", intro, [("Result", blocks)])
    for key in ("by_segment", "by_decile"):
        if summary.get(key):
            table = _breakdown_table(summary[key], key.removeprefix("by_"), m, summary["confidence"])
            doc.sections.append((f"Per {key.removeprefix('by_')}", [Block("table", table)]))
    counts = summary["outcomes"]
    doc.sections.append(("Outcome file", [Block("table", (["", "count"], [[k, num(v)] for k, v in counts.items() if not isinstance(v, dict)]
                                                            + [[f"dropped: {k}", num(v)] for k, v in counts.get("dropped", {}).items()]))]))
    return doc


# -- uplift ----------------------------------------------------------------------------------------
def _qini_figure(curves: dict) -> bytes:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, (x, q) in curves.items():
            style = {"linewidth": 2.6} if name == "uplift_model" else {"linewidth": 1.4, "linestyle": "--"}
            ax.plot(x, q, label=name, **style)
        any_q = next(iter(curves.values()))[1]
        ax.plot([0, 1], [0, any_q[-1]], color="#999", linewidth=1, label="random order (expected)")
        ax.set_xlabel("share of held-out users targeted (best first)")
        ax.set_ylabel("extra conversions (Qini)")
        ax.legend(loc="best")
        return png(fig)


def _decile_figure(deciles: list[dict]) -> bytes:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        d = [r["decile"] for r in deciles]
        obs = [r["observed_uplift"] if r["observed_uplift"] is not None else np.nan for r in deciles]
        pred = [r["mean_score"] if r["mean_score"] is not None else np.nan for r in deciles]
        ax.bar(d, obs, color="#1f77b4", label="observed (treated − control rate)")
        ax.plot(d, pred, "o-", color="#d62728", label="predicted uplift (mean)")
        ax.axhline(0, color="#999", linewidth=1)
        ax.set_xticks(d)
        ax.set_xlabel("decile of predicted uplift (1 = highest)")
        ax.legend(loc="best")
        return png(fig)


def uplift_document(summary: dict, curves: dict, deciles: list[dict]) -> Document:
    test = summary["test"]
    top = f"incremental_conversions@{int(test['top_share'] * 100)}%"
    rows = [[name, num(m["qini"]), num(m[top])] for name, m in test["qini"].items()]
    cal = test["calibration"]
    blocks = [
        Block("p", f"Held-out campaign users: {summary['users']['test']} (of {summary['users']['treatment']} treated and "
                   f"{summary['users']['control']} control users in all). Observed lift among them: {num(test['observed_lift'])}."),
        Block("table", (["ranking", "Qini coefficient", f"extra conversions in the top {int(test['top_share'] * 100)} %"], rows)),
        Block("figure", ("Qini curves", "extra conversions found against the share of held-out users targeted, per ranking",
                         _qini_figure(curves))),
        Block("figure", ("Uplift by decile", "observed and predicted uplift per decile of the model's predicted uplift",
                         _decile_figure(deciles))),
        Block("table", (["arm", "users", "predicted rate", "observed rate"],
                        [[arm, num(c["users"]), num(c["predicted_rate"]), num(c["observed_rate"])] for arm, c in cal.items()])),
    ]
    return Document("Uplift model", "Trained on one measured campaign; evaluated on campaign users it never saw. "
                    "Every number is in uplift_summary.json.", [("Held-out evaluation", blocks)])
