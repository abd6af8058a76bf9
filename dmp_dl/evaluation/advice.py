"""The report's first section: what the bundle serves, whether it beats every baseline, what to do.

:func:`overview` reads only plain report inputs: the ranking comparison at the headline cut-off,
the propensity metrics, the segment descriptions, the training summary and config, and, when the
run recorded them, the model-selection record (``metrics.json["model"]``: ``selected``,
``candidates``, ``best_baseline``) and the stage statuses (``metrics.json["stages"]``). Every one
of those may be absent (older runs, a report re-created from a bundle); the section then says
less, never fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# ROC-AUC at or below this is "at chance": 0.5 is a random ordering, and a few hundred test users
# put ~0.03 of noise on an AUC
CHANCE_AUC = 0.55
# a propensity baseline this much better in ROC-AUC is called out
AUC_MARGIN = 0.01


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pct(x: float) -> str:
    return f"{100 * x:+.1f} %"


def _ranking_findings(summary: list[Mapping], model: str) -> tuple[bool | None, list[str], list[str]]:
    """(beats every baseline?, warnings, the comparisons as sentences) from ``compare`` results."""
    if not summary:
        return None, [], []
    lines, below = [], []
    for c in summary:
        z = c.get("z")
        noise = "" if z is None else (f", z = {z:+.1f}: a clear difference" if abs(z) > 2 else f", z = {z:+.1f}: within noise")
        rel = c.get("relative_change")
        rel_text = _pct(rel) if _finite(rel) else "n/a"
        lines.append(f"{c['metric']}: {model} {c['model_value']:.4f} vs best baseline {c['best_baseline']} "
                     f"{c['baseline_value']:.4f} ({rel_text}{noise})")
        if not c["model_value"] > c["baseline_value"]:
            below.append(f"{c['best_baseline']} {c['baseline_value']:.4f} vs {c['model_value']:.4f} {c['metric']} "
                         f"({rel_text}{noise})")
    warnings = [f"{model} is below its baseline: " + "; ".join(below) + "."] if below else []
    return not below, warnings, lines


def _propensity_findings(prop: Mapping | None) -> tuple[list[str], list[str]]:
    """(warnings, advice) about the propensity model: at or below chance, below a baseline."""
    if not prop or not prop.get("metrics"):
        return [], []
    ours = prop.get("model")
    metrics = prop["metrics"]
    auc = (metrics.get(ours) or {}).get("roc_auc")
    warnings, advice = [], []
    if _finite(auc) and auc <= CHANCE_AUC:
        warnings.append(f"The propensity model ({ours}) ranks test users at or below chance: ROC-AUC {auc:.3f} "
                        f"(0.5 = a random order, threshold {CHANCE_AUC}). Its scores should not drive targeting.")
        advice.append(f"Propensity: check that the target event has enough positives ({prop.get('n_positive')} of "
                      f"{prop.get('n_test_users')} test users) and that propensity.target_event and "
                      "propensity.horizon_days describe a behaviour the history can predict.")
    baselines = {n: m.get("roc_auc") for n, m in metrics.items() if n != ours and _finite(m.get("roc_auc"))}
    if _finite(auc) and baselines:
        best = max(baselines, key=baselines.get)
        if baselines[best] > auc + AUC_MARGIN:
            warnings.append(f"The propensity model ({ours}) is below its baseline: {best} reaches ROC-AUC "
                            f"{baselines[best]:.3f} against {auc:.3f} on the same test users.")
            if not any(w.startswith("The propensity model") and "chance" in w for w in warnings):
                advice.append(f"Propensity: the bundle serves {ours}'s scores; {best} ranks buyers better on this data. "
                              "Until the deep model catches up, prefer the baseline where the choice is yours "
                              "(e.g. a score computed outside the bundle) and compare lift@10 in the table below.")
    return warnings, advice


def _stage_findings(stages: Mapping | None) -> list[str]:
    """A warning per optional stage that did not run (``metrics.json["stages"]``)."""
    out = []
    for name, s in (stages or {}).items():
        if isinstance(s, Mapping) and s.get("status") not in (None, "ok"):
            reason = f": {s['reason']}" if s.get("reason") else ""
            out.append(f"Stage {name} {s['status']}{reason}.")
    return out


def _serves(model: str, data_quality: Mapping, config: Mapping, prop: Mapping | None, segments: Mapping | None,
            selection: Mapping | None) -> list[str]:
    users, items = data_quality.get("n_users"), data_quality.get("n_items")
    lines = [f"Top-K recommendations and similar items from {model}"
             + (f" over {items:,} items for {users:,} known users" if isinstance(users, int) and isinstance(items, int) else "")
             + "; recommendations for new users from their recent items; lookalike audiences."]
    if selection and selection.get("selected"):
        cands = selection.get("candidates") or {}
        tried = ", ".join(f"{n} ({(c or {}).get('status', '?')})" for n, c in cands.items()) if cands else ""
        lines.append(f"Model selection chose {selection['selected']}" + (f" among {tried}" if tried else "")
                     + (", refitted on all training data" if selection.get("refit") else "") + ".")
    if prop:
        p = config.get("propensity") or {}
        target, horizon = p.get("target_event"), p.get("horizon_days")
        what = f" of {target}" if target else ""
        when = f" within {horizon} days" if horizon else ""
        lines.append(f"Propensity scores (probability{what}{when}) from {prop.get('model')} for every known user.")
    if segments:
        lines.append(f"{segments.get('n_segments')} user segments with their descriptions (GET /segments).")
    return lines


def _training_advice(train: Mapping | None, config: Mapping) -> list[str]:
    trainer = config.get("trainer") or {}
    max_epochs = trainer.get("max_epochs")
    epochs = (train or {}).get("epochs")
    out = []
    if isinstance(epochs, int) and isinstance(max_epochs, int) and max_epochs > 0 and epochs >= max_epochs:
        out.append(f"Training ran all {max_epochs} epochs without early stopping: it may be under-trained; "
                   f"try trainer.max_epochs={2 * max_epochs} (the training curves below show whether validation "
                   "was still improving).")
    out.append("Tune on the validation split, e.g. model.dim and model.module.optimizer.lr "
               "(python train.py -m model.dim=32,64,128), and keep the test split for the final comparison.")
    return out


def overview(*, model: str, summary: list[Mapping], propensity: Mapping | None, segments: Mapping | None,
             data_quality: Mapping, config: Mapping, train: Mapping | None, selection: Mapping | None = None,
             stages: Mapping | None = None) -> dict:
    """The first section's content (JSON-safe): ``serves`` (sentences), ``beats_every_baseline``
    (True / False / None when there is no comparison), ``comparisons``, ``verdict``, ``warnings``
    and ``advice``; ``selection`` and ``stages`` as recorded (or None)."""
    beats, warnings, comparisons = _ranking_findings(summary, model)
    prop_warnings, prop_advice = _propensity_findings(propensity)
    advice: list[str] = []
    best = {c["best_baseline"] for c in summary}
    if beats is None:
        verdict = "No ranking comparison: no test user could be evaluated (see Data quality)."
    elif beats:
        clear = all((c.get("z") or 0) > 2 for c in summary)
        verdict = (f"{model} beats every baseline on " + " and ".join(c["metric"] for c in summary)
                   + (" by more than the noise: deploy it." if clear else
                      ", but not by more than the noise: deploy it if it is cheaper to run than the baseline, and "
                      "watch the comparison on more data."))
    else:
        names = " / ".join(sorted(best))
        verdict = (f"{model} does not beat every baseline: {names} recommends better on the same test users. "
                   "Do not replace a working recommendation with this bundle yet.")
        best_baseline = (selection or {}).get("best_baseline") or {}
        if (selection or {}).get("selected") and (selection or {}).get("selected") != model:
            advice.append(f"Serve {selection['selected']}, the model the selection step chose (its bundle), rather "
                          f"than {model}.")
        advice.append(f"Deploy the stronger option: serve {names} (or keep the recommender you have) until a model "
                      "of this project beats it on this test split"
                      + (f"; the selection record's best baseline is {best_baseline.get('name')}" if best_baseline.get("name") else "")
                      + ".")
        advice += _training_advice(train, config)
    return {
        "serves": _serves(model, data_quality, config, propensity, segments, selection),
        "beats_every_baseline": beats,
        "comparisons": comparisons,
        "verdict": verdict,
        "warnings": warnings + prop_warnings + _stage_findings(stages),
        "advice": advice + prop_advice,
        "selection": dict(selection) if selection else None,
        "stages": dict(stages) if stages else None,
    }
