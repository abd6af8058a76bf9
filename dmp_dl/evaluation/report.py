"""The offline evaluation report: ``report.json``, ``report.md`` and a self-contained ``report.html``.

:func:`write_report` is a function of plain inputs (the config dict, the data-quality dict, the
ranking metrics, and optionally propensity and segment inputs), so ``train.py`` calls it at the end
of a run and a later command can call it with metrics recomputed from an artifact bundle. A
section whose inputs are absent is replaced by a sentence saying so.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dmp_dl.core.io import atomic_write_text
from dmp_dl.core.json_values import json_safe
from dmp_dl.evaluation import diagnostics
from dmp_dl.evaluation.advice import overview
from dmp_dl.evaluation.protocol import cutoffs, describe_protocol
from dmp_dl.evaluation.render import Figure, Report, to_html, to_markdown
from dmp_dl.metrics.classification import NEAR_CHANCE_ROC_AUC

log = logging.getLogger(__name__)

PROPENSITY_MODEL = "mlp"


@dataclass
class PropensityInputs:
    """What the propensity section needs.

    metrics: model name -> test metrics (``roc_auc``, ``pr_auc``, ``log_loss``, ``brier``, ``ece``,
        ``lift@10``, ...); the deep model is ``mlp``, the others baselines.
    labels: (n_test,) 0/1 outcomes of the test users.
    predictions: model name -> (n_test,) predicted probabilities, aligned with ``labels``.
    served: the model the bundle serves (default: ``mlp`` when present, else the first).
    """

    metrics: dict[str, dict]
    labels: np.ndarray
    predictions: dict[str, np.ndarray]
    served: str | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels).astype(np.int64).reshape(-1)
        self.predictions = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in self.predictions.items()}
        if not np.isin(self.labels, (0, 1)).all():
            raise ValueError("propensity labels must be 0/1")
        for name, p in self.predictions.items():
            if p.shape != self.labels.shape:
                raise ValueError(f"propensity predictions[{name!r}] has {p.shape[0]} values for {self.labels.shape[0]} labels")

    @classmethod
    def coerce(cls, obj: Any) -> "PropensityInputs | None":
        """``obj`` itself, ``None``, or any object with ``metrics``, ``test_labels`` and
        ``test_predictions`` (the propensity step's result)."""
        if obj is None or isinstance(obj, cls):
            return obj
        return cls(metrics=dict(obj.metrics), labels=obj.test_labels, predictions=dict(obj.test_predictions),
                   served=getattr(obj, "served", None))


@dataclass
class SegmentInputs:
    """What the segment section needs: ``assignments`` (n_users,) int segment per user and the
    ``user_vectors`` (n_users, d) they were built from; optionally the segment ``descriptions``
    (:func:`~dmp_dl.audience.segments.describe_segments`: top categories with lift, mean
    propensity, attribute skew) for the segment table."""

    assignments: np.ndarray
    user_vectors: np.ndarray
    descriptions: list[dict] | None = None

    def __post_init__(self) -> None:
        self.assignments = np.asarray(self.assignments).astype(np.int64).reshape(-1)
        self.user_vectors = np.asarray(self.user_vectors, dtype=np.float32)
        if self.user_vectors.ndim != 2 or len(self.user_vectors) != len(self.assignments):
            raise ValueError(f"segment user_vectors must be (n_users, d) with n_users = {len(self.assignments)}, "
                             f"got {self.user_vectors.shape}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def headline_cutoff(ks: list[int]) -> int | None:
    """K the summary quotes: 20 when evaluated, else the middle cut-off."""
    if not ks:
        return None
    return 20 if 20 in ks else ks[len(ks) // 2]


def compare(ranking: Mapping[str, Mapping], model_name: str, metric: str) -> dict | None:
    """The model against the best baseline on ``metric``, with an approximate z score.

    The z score uses unpaired standard errors, which overstate the noise of a comparison on the
    same users, so |z| > 2 is a conservative sign of a real difference.
    """
    if model_name not in ranking:
        return None
    baselines = {n: m[metric] for n, m in ranking.items() if n != model_name and _finite(m.get(metric))}
    ours = ranking[model_name].get(metric)
    if not baselines or not _finite(ours):
        return None
    best = max(baselines, key=baselines.get)
    theirs = baselines[best]
    se = [ranking[n].get("stderr", {}).get(metric) for n in (model_name, best)]
    z = None
    if all(_finite(s) for s in se) and (se[0] or se[1]):
        z = (ours - theirs) / math.sqrt(se[0] ** 2 + se[1] ** 2)
    if z is not None and z > 2:
        verdict = f"{model_name} beats the best baseline ({best})"
    elif z is not None and z < -2:
        verdict = f"the {best} baseline beats {model_name}"
    else:
        verdict = f"no clear difference between {model_name} and the best baseline ({best})"
    return {
        "metric": metric, "model": model_name, "model_value": ours, "best_baseline": best, "baseline_value": theirs,
        "relative_change": (ours - theirs) / theirs if theirs else None, "z": z, "verdict": verdict,
    }


def _propensity_section(inputs: PropensityInputs, calibration_bins: int) -> tuple[dict, list[Figure]]:
    from dmp_dl.evaluation import plots  # matplotlib

    y = inputs.labels
    ours = inputs.served if inputs.served in inputs.predictions else (
        PROPENSITY_MODEL if PROPENSITY_MODEL in inputs.predictions else next(iter(inputs.predictions), None))
    data: dict[str, Any] = {
        "model": ours,
        "n_test_users": int(len(y)),
        "n_positive": int(y.sum()),
        "base_rate": float(y.mean()) if len(y) else None,
        "metrics": inputs.metrics,
        "gains": {name: diagnostics.gains_table(y, p) for name, p in inputs.predictions.items()},
    }
    roc = {n: m.get("roc_auc") for n, m in inputs.metrics.items() if n != ours and _finite(m.get("roc_auc"))}
    if ours in inputs.metrics and _finite(inputs.metrics[ours].get("roc_auc")) and roc:
        best = max(roc, key=roc.get)
        data["comparison"] = {"model": ours, "roc_auc": inputs.metrics[ours].get("roc_auc"),
                              "best_baseline": best, "baseline_roc_auc": roc[best]}
    served_auc = inputs.metrics.get(ours, {}).get("roc_auc")
    if _finite(served_auc) and served_auc < NEAR_CHANCE_ROC_AUC:
        data["warning"] = (f"the served propensity model ({ours}), the best of those trained, ranks the test users "
                           f"barely better than chance (ROC-AUC {served_auc:.3f} < {NEAR_CHANCE_ROC_AUC}): "
                           "use its scores with care")
    figures: list[Figure] = []
    if len(np.unique(y)) < 2:
        data["note"] = "the test users are all of one class: ROC, PR, calibration and gains curves are undefined"
        return data, figures
    if inputs.predictions:
        figures.append(Figure("ROC and precision-recall curves",
                              "Test users; the dotted lines are a random scorer.",
                              plots.roc_pr_curves(y, inputs.predictions, ours)))
        figures.append(Figure("Calibration, cumulative gains and lift",
                              "Calibration: observed positive rate per quantile bin of the predicted probability "
                              "(on the diagonal = calibrated). Gains and lift: users contacted in descending score order.",
                              plots.calibration_and_gains(y, inputs.predictions, ours, calibration_bins)))
    return data, figures


def segment_label(description: dict) -> str:
    """A short human label: the segment's own ``label`` (over-represented categories, unique across
    segments; :func:`dmp_dl.audience.segments.label_segments`), else, for descriptions written
    without one, its first two categories and the most over-represented attribute value."""
    if description.get("label"):
        return str(description["label"])
    parts = [c["category"] for c in description.get("top_categories", [])[:2]]
    over = description.get("attributes", {}).get("over_represented", [])
    if over:
        parts.append(over[0]["value"])
    return ", ".join(parts) or f"segment {description['segment']}"


def _segment_table(descriptions: list[dict]) -> list[dict]:
    """One row per segment: label, size, share, top categories with lift, mean propensity and the
    most over-represented attribute values with lift."""
    rows = []
    for d in descriptions:
        attrs = d.get("attributes") or {}
        rows.append({
            "segment": d.get("segment"), "label": segment_label(d), "size": d.get("size"), "share": d.get("share"),
            "top_categories": [{"category": c.get("category"), "share": c.get("share"), "lift": c.get("lift")}
                               for c in d.get("top_categories") or []],
            "mean_propensity": d.get("mean_propensity"),
            "over_represented": [{"value": a.get("value"), "share": a.get("share"), "lift": a.get("lift")}
                                 for a in attrs.get("over_represented") or []],
            "numeric": attrs.get("numeric") or {},
        })
    return rows


def read_training_curves(path: str | os.PathLike) -> dict | None:
    """Per-epoch training curves from a Lightning CSVLogger ``metrics.csv``: ``epoch`` (list) and,
    per metric (``train/loss``, every ``val/*``), the epoch's value (None where not logged).
    ``train/loss`` is the epoch mean (``train/loss_epoch``). None when the file has no epoch rows."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError):
        return None
    if "epoch" not in frame.columns or frame.empty:
        return None
    columns = {"train/loss": "train/loss_epoch" if "train/loss_epoch" in frame.columns else None}
    columns.update({c: c for c in frame.columns if c.startswith("val/")})
    columns = {name: col for name, col in columns.items() if col is not None}
    per_epoch = frame.groupby("epoch")[list(columns.values())].last() if columns else None
    if per_epoch is None or per_epoch.dropna(how="all").empty:
        return None
    per_epoch = per_epoch.dropna(how="all")
    curves = {"epoch": [int(e) + 1 for e in per_epoch.index], "source": str(path)}
    for name, col in columns.items():
        curves[name] = [float(v) if np.isfinite(v) else None for v in per_epoch[col].to_numpy(dtype=float)]
    return curves


def latest_metrics_csv(run_dir: str | os.PathLike) -> Path | None:
    """``logs/version_N/metrics.csv`` of the highest N under ``run_dir`` (the run's own training log)."""
    found = []
    for path in Path(run_dir).glob("logs/version_*/metrics.csv"):
        suffix = path.parent.name.removeprefix("version_")
        if suffix.isdigit():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def _segment_section(inputs: SegmentInputs, sample: int) -> tuple[dict, list[Figure]]:
    from dmp_dl.evaluation import plots  # matplotlib

    sizes = diagnostics.segment_sizes(inputs.assignments)
    rows, coords, explained = diagnostics.pca_2d(inputs.user_vectors, sample)
    data = {
        "n_users": int(len(inputs.assignments)),
        "n_segments": len(sizes),
        "sizes": {str(k): v for k, v in sizes.items()},
        "table": _segment_table(inputs.descriptions) if inputs.descriptions else None,
        "map": {"method": "PCA (numpy SVD) of the user vectors", "users_drawn": int(len(rows)),
                "explained_variance": explained.tolist()},
    }
    fig = Figure("Segment sizes and user map",
                 f"User vectors projected on their first two principal components; {len(rows)} users drawn at random.",
                 plots.segment_map(sizes, coords, inputs.assignments[rows], explained))
    return data, [fig]


def build_report(
    *,
    config: Mapping,
    data_quality: Mapping,
    ranking: Mapping[str, Mapping],
    model_name: str | None = None,
    train: Mapping | None = None,
    propensity: PropensityInputs | Any | None = None,
    segments: SegmentInputs | None = None,
    protocol_notes: Mapping[str, str] | None = None,
    calibration_bins: int = 10,
    segment_sample: int = 5000,
    curves: Mapping | None = None,
    selection: Mapping | None = None,
    stages: Mapping | None = None,
) -> Report:
    """Assemble the report's numbers and figures.

    Parameters
    ----------
    config: the resolved run config as a dict (shown in full; ``data.split`` and ``evaluation`` are read).
    data_quality: the content of ``data_quality.json``.
    ranking: model or baseline name -> test ranking metrics (as from ``evaluate_scorer``); empty when
        no user could be evaluated.
    model_name: the trained model's entry in ``ranking`` (default: the first).
    train: training summary (epochs, fit seconds, validation metrics), optional.
    propensity: :class:`PropensityInputs` or the propensity step's result object, optional.
    segments: :class:`SegmentInputs`, optional.
    protocol_notes: statements that replace or extend the protocol's (e.g. how a bundle was evaluated).
    calibration_bins: quantile bins of the calibration curve.
    segment_sample: at most this many users are drawn for the 2-D segment map.
    curves: per-epoch training curves (:func:`read_training_curves`), optional.
    selection: the model-selection record (``metrics.json["model"]``: ``selected``, ``candidates``,
        ``best_baseline``), optional; stages: stage name -> ``{"status", "reason", "seconds", "peak_rss_gib"}``
        (``metrics.json["stages"]``), optional: the overview's warnings and the "Run stages" table.
    """
    from dmp_dl.evaluation import plots  # matplotlib

    ranking = {name: dict(m) for name, m in ranking.items()}
    model_name = model_name or next(iter(ranking), None) or "model"
    ks = cutoffs(ranking)
    k = headline_cutoff(ks)
    protocol = describe_protocol(config, data_quality, ranking, model_name)
    protocol["statements"].update(protocol_notes or {})
    summary = [c for c in (compare(ranking, model_name, f"{m}@{k}") for m in ("recall", "ndcg")) if c] if k else []
    absent: dict[str, str] = {}
    figures: dict[str, list[Figure]] = {}
    if ranking and ks:
        n_items = int(data_quality.get("n_items") or 0)
        figures["ranking"] = [
            Figure("Recall@K and NDCG@K", "Higher is better. The trained model is the solid line, baselines dashed.",
                   plots.ranking_curves(ranking, ks, model_name)),
            Figure("Popularity bias and coverage",
                   "Left: mean training popularity of the recommended items relative to the mean catalogue item "
                   "(lower = more novel). Right: share of the catalogue appearing in anyone's top K.",
                   plots.popularity_bias(ranking, ks, n_items, model_name)),
        ]
    else:
        absent["ranking"] = "no test user had a held-out item the model could be evaluated on, so there are no ranking metrics"
    prop_inputs = PropensityInputs.coerce(propensity)
    prop_data = None
    if prop_inputs is None:
        absent["propensity"] = "no propensity model was trained in this run"
    else:
        prop_data, figures["propensity"] = _propensity_section(prop_inputs, calibration_bins)
    seg_data = None
    if segments is None:
        absent["segments"] = "no user segments were built in this run"
    else:
        seg_data, figures["segments"] = _segment_section(segments, segment_sample)
    if curves and len(curves.get("epoch") or []) >= 1:
        figures["train"] = [Figure("Training curves",
                                   "Per epoch: the mean training loss (left) and the validation metrics (right), "
                                   f"from {Path(str(curves.get('source', 'metrics.csv'))).name}.",
                                   plots.training_curves(curves))]
    first = overview(model=model_name, summary=summary, propensity=prop_data, segments=seg_data,
                     data_quality=data_quality, config=config, train=train, selection=selection, stages=stages)
    source = data_quality.get("source", "data")
    data = {
        "overview": first,
        "title": f"Offline evaluation: {model_name} on {source}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_name,
        "cutoffs": ks,
        "headline_cutoff": k,
        "summary": summary,
        "protocol": protocol,
        "ranking": ranking,
        "train": dict(train) if train else None,
        "train_curves": dict(curves) if curves else None,
        "propensity": prop_data,
        "segments": seg_data,
        "stages": {str(n): dict(s) for n, s in (stages.items() if isinstance(stages, Mapping) else ()) if isinstance(s, Mapping)},
        "sections_absent": absent,
        "data_quality": dict(data_quality),
        "config": dict(config),
        "figures": {section: [f.title for f in figs] for section, figs in figures.items()},
    }
    return Report(data=json_safe(data), figures=figures)


def _recorded_metrics(run_dir: Path) -> dict:
    """``metrics.json`` of the run in ``run_dir`` (empty when absent or unreadable)."""
    try:
        data = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_report(output_dir: str | os.PathLike, *, absent: Mapping[str, str] | None = None,
                 **inputs: Any) -> dict[str, Path]:
    """Build the report (:func:`build_report` takes ``inputs``) and write ``report.json``,
    ``report.md`` and ``report.html`` atomically into ``output_dir``. Returns format -> path.

    ``absent``: section -> sentence replacing the default reason a section is missing (e.g. for a
    report re-created from a bundle)."""
    out = Path(output_dir)
    if "curves" not in inputs:  # the run's own training log, when the report is written into the run directory
        csv = latest_metrics_csv(out)
        inputs["curves"] = read_training_curves(csv) if csv is not None else None
    recorded = _recorded_metrics(out)
    for key, name in (("selection", "model"), ("stages", "stages")):
        if inputs.get(key) is None and isinstance(recorded.get(name), Mapping):
            inputs[key] = recorded[name]
    report = build_report(**inputs)
    reasons = report.data["sections_absent"]
    reasons.update({k: v for k, v in (absent or {}).items() if k in reasons})
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    atomic_write_text(paths["json"], json.dumps(report.data, indent=2, allow_nan=False))
    atomic_write_text(paths["md"], to_markdown(report))
    atomic_write_text(paths["html"], to_html(report))
    log.info("report written to %s", paths["html"])
    return paths
