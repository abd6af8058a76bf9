"""Rendering a :class:`Report` (built by :mod:`dmp_dl.evaluation.report`) as Markdown and as self-contained HTML.

The report's content is laid out once as a list of blocks (headings, paragraphs, tables, figures,
preformatted text); each format only decides how a block looks. Figures are embedded in the HTML
as PNG data URIs, so the file opens anywhere without its directory.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from dmp_dl.evaluation.protocol import epoch_to_iso

PROPENSITY_COLUMNS = ("roc_auc", "pr_auc", "log_loss", "brier", "ece", "lift@10")
QUALITY_METRICS = ("recall", "ndcg", "hit_rate", "map", "precision")
SECTIONS = {
    "overview": "What this bundle serves, and what to do",
    "summary": "Summary",
    "ranking": "Ranking metrics",
    "protocol": "Protocol",
    "propensity": "Propensity diagnostics",
    "segments": "Segment diagnostics",
    "train": "Training",
    "data_quality": "Data quality",
    "config": "Configuration",
}
STAGES_TITLE = "Run stages"  # after the summary, in reports of a training run (which records its stages)
TITLES = {**SECTIONS, "stages": STAGES_TITLE}


@dataclass
class Figure:
    title: str
    caption: str
    png: bytes


@dataclass
class Report:
    """``data``: the content of ``report.json``; ``figures``: section -> its figures."""

    data: dict
    figures: dict[str, list[Figure]] = field(default_factory=dict)


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells to emphasise
    text: bool = False  # cells are prose (left-aligned), not numbers


@dataclass
class Block:
    kind: str  # h3 | p | note | warn | verdict | list (of str or (label, text)) | table | tables (side by side) | figures | pre
    content: Any


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def _pct(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}\u00a0%"  # a no-break space: "39.2 %" never wraps


def _bold_best(rows: list[list[Any]], columns: list[int]) -> set[tuple[int, int]]:
    """Cells holding the column maximum (for the given numeric columns)."""
    out = set()
    for c in columns:
        vals = [r[c] for r in rows if isinstance(r[c], (int, float))]
        if len(vals) > 1:
            best = max(vals)
            out |= {(i, c) for i, r in enumerate(rows) if r[c] == best}
    return out


def _ranking_blocks(d: Mapping) -> list[Block]:
    ranking, ks, k, model = d["ranking"], d["cutoffs"], d["headline_cutoff"], d["model"]
    names = list(ranking)
    blocks = [Block("p", f"Test split, full ranking over the catalogue, seen items excluded (see Protocol). "
                         f"Main table at K = {k}; ± is one standard error. Best value per column in bold.")]
    cols = [f"{m}@{k}" for m in QUALITY_METRICS] + ["mrr"]
    raw = [[ranking[n].get(c) for c in cols] for n in names]
    rows = []
    for n, vals in zip(names, raw):
        se = ranking[n].get("stderr") or {}
        cells = [f"{_num(v)} ± {_num(se.get(c))}" if c.startswith(("recall", "ndcg")) and se.get(c) is not None else _num(v)
                 for c, v in zip(cols, vals)]
        label = f"{n} (model)" if n == model else n
        rows.append([label, *cells, _num(ranking[n].get("n_users")), _num(ranking[n].get("eval_seconds"), 2)])
    bold = {(r, c + 1) for r, c in _bold_best(raw, list(range(len(cols))))}
    blocks.append(Block("table", Table(["model", *cols, "users", "eval s"], rows, bold)))
    blocks.append(Block("figures", "ranking"))
    blocks.append(Block("h3", "Every cut-off"))
    tables = []
    for metric in QUALITY_METRICS:
        raw = [[ranking[n].get(f"{metric}@{kk}") for kk in ks] for n in names]
        bold = {(r, c + 1) for r, c in _bold_best(raw, list(range(len(ks))))}
        rows = [[n, *(_num(v) for v in vals)] for n, vals in zip(names, raw)]
        tables.append(Table([metric, *(f"@{kk}" for kk in ks)], rows, bold))
    blocks.append(Block("tables", tables))
    blocks.append(Block("h3", "Popularity bias and coverage"))
    cov = [[n, *(_pct(ranking[n].get(f"coverage@{kk}")) for kk in ks)] for n in names]
    pop = [[n, *(_pct(ranking[n].get(f"avg_popularity@{kk}"), 3) for kk in ks)] for n in names]
    blocks.append(Block("tables", [Table(["catalogue coverage", *(f"@{kk}" for kk in ks)], cov),
                                   Table(["avg popularity (share of training events)", *(f"@{kk}" for kk in ks)], pop)]))
    return blocks


def _summary_blocks(d: Mapping) -> list[Block]:
    items = []
    for c in d["summary"]:
        rel = f"{100 * c['relative_change']:+.1f} %" if c.get("relative_change") is not None else "n/a"
        z = f", z = {c['z']:+.1f}" if c.get("z") is not None else ""
        items.append(f"{c['metric']}: {c['model']} {_num(c['model_value'])} vs {c['best_baseline']} "
                     f"{_num(c['baseline_value'])} ({rel}{z}) — {c['verdict']}.")
    prop = d.get("propensity") or {}
    if prop.get("comparison"):
        c = prop["comparison"]
        items.append(f"propensity ROC-AUC: {c['model']} {_num(c['roc_auc'])} vs best baseline {c['best_baseline']} "
                     f"{_num(c['baseline_roc_auc'])}.")
    counts = d["protocol"]["counts"]
    items.append(f"{_num(counts.get('test_users'))} test users evaluated, {_num(counts.get('catalogue_items'))} items "
                 "ranked for each.")
    blocks = [Block("list", items)] if items else []
    blocks.append(Block("note", "z compares the model with the best baseline using unpaired standard errors "
                                "(conservative on the same users); |z| > 2 is treated as a clear difference."))
    return blocks


def _stage_blocks(d: Mapping) -> list[Block]:
    rows = [[name, s.get("status", "?"), s.get("reason") or "", _num(s.get("seconds"), 1), _num(s.get("peak_rss_gib"), 2)]
            for name, s in d["stages"].items()]
    split = (d.get("data_quality") or {}).get("split") or {}
    blocks = [Block("table", Table(["stage", "status", "reason", "seconds", "peak memory GiB"], rows, text=True))]
    if split.get("method_reason"):
        blocks.append(Block("p", f"Split: {split.get('method')} ({split['method_reason']})."))
    return blocks


def _protocol_blocks(d: Mapping) -> list[Block]:
    p = d["protocol"]
    blocks = [Block("list", [(topic.replace("_", " ").capitalize(), text) for topic, text in p["statements"].items()])]
    blocks.append(Block("h3", "Metric definitions"))
    blocks.append(Block("p", "For one user with relevant (held-out) set R and recommendation list r_1, r_2, …:"))
    blocks.append(Block("table", Table(["metric", "definition"], [[m, t] for m, t in p["definitions"].items()], text=True)))
    if p["baselines"]:
        blocks.append(Block("h3", "Baselines"))
        blocks.append(Block("list", list(p["baselines"].items())))
    return blocks


def _propensity_blocks(d: Mapping) -> list[Block]:
    p = d["propensity"]
    blocks = [Block("p", f"{_num(p['n_test_users'])} test users, {_num(p['n_positive'])} positive "
                         f"(base rate {_pct(p['base_rate'], 2)}). The bundle serves {p['model']}, the best on the validation "
                         "users; the others are shown for comparison.")]
    if p.get("warning"):
        blocks.append(Block("note", f"Warning: {p['warning']}."))
    names = list(p["metrics"])
    cols = [c for c in PROPENSITY_COLUMNS if any(c in p["metrics"][n] for n in names)]
    raw = [[p["metrics"][n].get(c) for c in cols] for n in names]
    higher_better = [i for i, c in enumerate(cols) if c in ("roc_auc", "pr_auc", "lift@10")]
    bold = {(r, c + 1) for r, c in _bold_best(raw, higher_better)}
    lower = [i for i, c in enumerate(cols) if c in ("log_loss", "brier", "ece")]
    bold |= {(r, c + 1) for r, c in _bold_best([[-v if isinstance(v, (int, float)) else v for v in row] for row in raw], lower)}
    blocks.append(Block("table", Table(["model", *cols], [[n, *(_num(v) for v in row)] for n, row in zip(names, raw)], bold)))
    blocks.append(Block("note", "Higher is better for roc_auc, pr_auc and lift@10; lower for log_loss, brier and ece. "
                                "Best value per column in bold."))
    if p.get("note"):
        blocks.append(Block("note", p["note"]))
    gains = p.get("gains") or {}
    if gains:
        fractions = [g["top_fraction"] for g in next(iter(gains.values()))]
        rows = [[n, *(f"{_pct(g['gain'])} (×{_num(g['lift'], 2)})" for g in table)] for n, table in gains.items()]
        blocks.append(Block("h3", "Cumulative gains"))
        blocks.append(Block("table", Table(["share of positives reached (lift) when contacting the top",
                                            *(f"{100 * f:g} %" for f in fractions)], rows)))
    blocks.append(Block("figures", "propensity"))
    return blocks


def _lifts(entries: list[Mapping], name: str) -> str:
    """``cat_3 (×2.1), cat_7 (×1.6)``."""
    return ", ".join(f"{e.get(name)} (×{e['lift']:.1f})" if isinstance(e.get("lift"), (int, float)) else str(e.get(name))
                     for e in entries) or "–"


def _segment_blocks(d: Mapping) -> list[Block]:
    s = d["segments"]
    total = max(s["n_users"], 1)
    ev = s["map"]["explained_variance"]
    blocks = [Block("p", f"{_num(s['n_users'])} users in {s['n_segments']} segments. The map shows {s['map']['method']}; "
                         f"the two components explain {_pct(ev[0])} and {_pct(ev[1])} of the variance.")]
    if s.get("table"):
        rows = [[str(r["segment"]), r["label"], _num(r["size"]), _pct(r["share"]), _lifts(r["top_categories"], "category"),
                 _pct(r["mean_propensity"]) if r.get("mean_propensity") is not None else "–",
                 _lifts(r["over_represented"], "value")] for r in s["table"]]
        blocks.append(Block("table", Table(["segment", "label", "users", "share", "top categories (lift)",
                                            "mean propensity", "over-represented attributes (lift)"], rows, text=True)))
        blocks.append(Block("note", "Lift: the share of the segment's interest (or users) in a category (or with an "
                                    "attribute value) divided by the share over all users; ×2 = twice as common. "
                                    "Mean propensity: the segment's mean predicted probability of the target event."))
    else:
        rows = [[seg, _num(n), _pct(n / total)] for seg, n in s["sizes"].items()]
        blocks.append(Block("table", Table(["segment", "users", "share"], rows)))
    blocks.append(Block("figures", "segments"))
    return blocks


def _overview_blocks(d: Mapping) -> list[Block]:
    o = d.get("overview") or {}
    blocks = [Block("h3", "What it serves"), Block("list", list(o.get("serves") or []))]
    beats = o.get("beats_every_baseline")
    blocks.append(Block("h3", "Does it beat every baseline?"))
    blocks.append(Block("verdict" if beats else "warn", o.get("verdict", "")))
    if o.get("warnings"):
        blocks.append(Block("h3", "Warnings"))
        blocks += [Block("warn", w) for w in o["warnings"]]
    if o.get("advice"):
        blocks.append(Block("h3", "What to do"))
        blocks.append(Block("list", list(o["advice"])))
    selection = o.get("selection") or {}
    candidates = selection.get("candidates") or {}
    if candidates:
        metrics = sorted({m for c in candidates.values() for m in ((c or {}).get("val") or {})})[:4]
        rows = []
        for name, c in candidates.items():
            c = c or {}
            mark = " (selected)" if name == selection.get("selected") else ""
            rows.append([f"{name}{mark}", str(c.get("status", "–")),
                         *(_num((c.get("val") or {}).get(m)) for m in metrics),
                         *(_num((c.get("test") or {}).get(m)) for m in metrics),
                         _num(c.get("fit_seconds"), 1), str(c.get("reason") or "")])
        best = selection.get("best_baseline") or {}
        if best.get("name"):
            rows.append([f"{best['name']} (best baseline)", "baseline", *(_num((best.get("val") or {}).get(m)) for m in metrics),
                         *(_num((best.get("test") or {}).get(m)) for m in metrics), "–", ""])
        blocks.append(Block("h3", "Model selection"))
        if selection.get("why"):
            blocks.append(Block("note", f"Served: {selection['why']}."))
        blocks.append(Block("table", Table(["candidate", "status", *(f"val {m}" for m in metrics),
                                            *(f"test {m}" for m in metrics), "fit s", "reason"], rows)))
        blocks.append(Block("note", "Chosen on the validation split; the test columns are for the record only."))
    return blocks


def _train_blocks(d: Mapping) -> list[Block]:
    blocks: list[Block] = []
    if d.get("train"):
        blocks.append(Block("table", _key_value_table(d["train"], ("training", "value"))))
    else:
        blocks.append(Block("note", "Not available: no training summary was given."))
    if d.get("train_curves"):
        blocks.append(Block("figures", "train"))
    else:
        blocks.append(Block("note", "No training curves: the run directory has no logs/version_N/metrics.csv "
                                    "(logger=csv writes it)."))
    return blocks


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, Mapping):
        out = []
        for k, v in d.items():
            named = not prefix or str(k).startswith(f"{prefix}/")  # "val" -> "val/recall@10" is named already
            out += _flatten(v, str(k) if named else f"{prefix}.{k}")
        return out
    if isinstance(d, list):
        return [(prefix, ", ".join(map(str, d)) or "–")]
    return [(prefix, d)]


def _key_value_table(d: Mapping, header: tuple[str, str] = ("", "")) -> Table:
    return Table(list(header), [[k, _num(v)] for k, v in _flatten(d)])


def _data_quality_blocks(q: Mapping) -> list[Block]:
    ev = q.get("events") or {}
    blocks = [Block("p", f"Source {q.get('source', '?')}: {_num(ev.get('rows_in'))} events in, {_num(ev.get('rows_out'))} "
                         f"kept; {_num(q.get('n_users'))} users, {_num(q.get('n_items'))} items; events from "
                         f"{(q.get('time_range') or {}).get('min', '?')} to {(q.get('time_range') or {}).get('max', '?')}.")]
    dropped = ev.get("dropped") or {}
    tables = [Table(["dropped events by reason", "rows"], [[k, _num(v)] for k, v in dropped.items()] or [["none", "0"]])]
    split = dict(q.get("split") or {})
    if "train_time_max" in split:
        split["train_time_max"] = epoch_to_iso(split["train_time_max"]) or split["train_time_max"]
    parts = {"events per type": q.get("events_per_type"), "users table": q.get("users_table"),
             "items table": q.get("items_table"), "split": split}
    tables += [_key_value_table(t, (title, "value")) for title, t in parts.items() if t]
    blocks.append(Block("tables", tables))
    return blocks


def layout(report: Report) -> tuple[str, list[tuple[str, list[Block]]]]:
    """The title and the ordered (section key, blocks) of the report."""
    d = report.data
    absent = d["sections_absent"]
    sections: list[tuple[str, list[Block]]] = []
    builders = {
        "overview": lambda: _overview_blocks(d),
        "summary": lambda: _summary_blocks(d),
        "stages": lambda: _stage_blocks(d),
        "ranking": lambda: _ranking_blocks(d),
        "protocol": lambda: _protocol_blocks(d),
        "propensity": lambda: _propensity_blocks(d),
        "segments": lambda: _segment_blocks(d),
        "train": lambda: _train_blocks(d),
        "data_quality": lambda: _data_quality_blocks(d["data_quality"]),
        "config": lambda: [Block("pre", OmegaConf.to_yaml(OmegaConf.create(d["config"])))],
    }
    for key in SECTIONS:
        if key in absent:
            sections.append((key, [Block("note", f"Not available: {absent[key]}.")]))
        else:
            sections.append((key, builders[key]()))
        if key == "summary" and d.get("stages"):
            sections.append(("stages", builders["stages"]()))
    return d["title"], sections


# -- Markdown --------------------------------------------------------------------------------
def _md_cell(text: str, bold: bool) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return f"**{text}**" if bold and text not in ("", "–") else text


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h, False) for h in t.header) + " |",
             "|" + "|".join(" --- " for _ in t.header) + "|"]
    for r, row in enumerate(t.rows):
        lines.append("| " + " | ".join(_md_cell(c, (r, i) in t.bold) for i, c in enumerate(row)) + " |")
    return "\n".join(lines)


def to_markdown(report: Report) -> str:
    """The report as GitHub-flavoured Markdown (tables; the plots are in report.html)."""
    title, sections = layout(report)
    out = [f"# {title}", "", f"Created {report.data['created']}. Plots: report.html; every number: report.json.", ""]
    for key, blocks in sections:
        out += [f"## {TITLES[key]}", ""]
        for b in blocks:
            if b.kind == "h3":
                out += [f"### {b.content}", ""]
            elif b.kind == "p":
                out += [b.content, ""]
            elif b.kind == "note":
                out += [f"_{b.content}_", ""]
            elif b.kind == "warn":
                out += [f"> **Warning.** {b.content}", ""]
            elif b.kind == "verdict":
                out += [f"**{b.content}**", ""]
            elif b.kind == "list":
                out += [f"- **{item[0]}.** {item[1]}" if isinstance(item, tuple) else f"- {item}" for item in b.content] + [""]
            elif b.kind == "table":
                out += [_md_table(b.content), ""]
            elif b.kind == "tables":
                for t in b.content:
                    out += [_md_table(t), ""]
            elif b.kind == "pre":
                out += ["```yaml", b.content.rstrip(), "```", ""]
            elif b.kind == "figures":
                titles = [f.title for f in report.figures.get(b.content, [])]
                if titles:
                    out += [f"_Plots in report.html: {'; '.join(titles)}._", ""]
    return "\n".join(out)


# -- HTML ------------------------------------------------------------------------------------
CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;color:#1d2433;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 32px 64px;background:#fff}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:36px 0 10px;padding-bottom:4px;border-bottom:2px solid #e3e6eb}
h3{font-size:16px;margin:22px 0 8px}p,li{line-height:1.5}.meta{color:#667;font-size:13px}
nav{font-size:13px;margin:10px 0 0}nav a{margin-right:14px;color:#2a5db0;text-decoration:none}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}th,td{padding:5px 10px;border-bottom:1px solid #e6e8ec;text-align:right}
th{background:#f1f3f6;font-weight:600}td:first-child,th:first-child{text-align:left}tr:hover td{background:#fafbfc}
td.best{font-weight:700;color:#0b5d1e}table.text td,table.text th{text-align:left}
.row{display:flex;flex-wrap:wrap;gap:0 28px;align-items:flex-start}.note{color:#667;font-style:italic}
figure{margin:14px 0 22px}figure img{max-width:100%;height:auto;border:1px solid #eceef2}figcaption{color:#556;font-size:13px;margin-top:4px}
pre{background:#f6f8fa;padding:12px;border-radius:4px;font-size:12px;overflow:auto;max-height:480px}
details summary{cursor:pointer;color:#2a5db0}
.warn{background:#fff4e5;border-left:4px solid #e8590c;padding:8px 12px;margin:8px 0}
.verdict{background:#ebfbee;border-left:4px solid #2b8a3e;padding:8px 12px;margin:8px 0;font-weight:600}
"""


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in t.header)
    body = []
    for r, row in enumerate(t.rows):
        cells = "".join(
            ('<td class="best">' if (r, i) in t.bold else "<td>") + f"{html.escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    cls = ' class="text"' if t.text else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_item(item: str | tuple[str, str]) -> str:
    """A list item: plain text, or (label, text) with the label in bold."""
    if isinstance(item, tuple):
        return f"<b>{html.escape(item[0])}.</b> {html.escape(item[1])}"
    return html.escape(item)


def to_html(report: Report) -> str:
    """The report as one self-contained HTML page (plots embedded as PNG data URIs)."""
    title, sections = layout(report)
    nav = "".join(f'<a href="#{k}">{html.escape(TITLES[k])}</a>' for k, _ in sections)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<div class="meta">Created {html.escape(report.data["created"])}; every number is also in report.json.</div>',
             f"<nav>{nav}</nav>"]
    for key, blocks in sections:
        parts.append(f'<h2 id="{key}">{html.escape(TITLES[key])}</h2>')
        for b in blocks:
            if b.kind == "h3":
                parts.append(f"<h3>{html.escape(b.content)}</h3>")
            elif b.kind == "p":
                parts.append(f"<p>{html.escape(b.content)}</p>")
            elif b.kind == "note":
                parts.append(f'<p class="note">{html.escape(b.content)}</p>')
            elif b.kind == "warn":
                parts.append(f'<p class="warn">{html.escape(b.content)}</p>')
            elif b.kind == "verdict":
                parts.append(f'<p class="verdict">{html.escape(b.content)}</p>')
            elif b.kind == "list":
                parts.append("<ul>" + "".join(f"<li>{_html_item(i)}</li>" for i in b.content) + "</ul>")
            elif b.kind == "table":
                parts.append(_html_table(b.content))
            elif b.kind == "tables":
                parts.append('<div class="row">' + "".join(_html_table(t) for t in b.content) + "</div>")
            elif b.kind == "pre":
                parts.append("<details><summary>Resolved configuration (YAML)</summary>"
                             f"<pre>{html.escape(b.content)}</pre></details>")
            elif b.kind == "figures":
                for f in report.figures.get(b.content, []):
                    uri = "data:image/png;base64," + base64.b64encode(f.png).decode("ascii")
                    parts.append(f'<figure><img alt="{html.escape(f.title)}" src="{uri}">'
                                 f"<figcaption><b>{html.escape(f.title)}.</b> {html.escape(f.caption)}</figcaption></figure>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><main>\n{body}\n</main></body></html>\n")
