"""The command-line jobs on a campaign's files: ``measure`` and ``uplift`` (``python -m dmp_dl.audience``).

Both read the assignments and the outcome log the same way (:mod:`dmp_dl.campaign.outcomes`);
``measure`` compares the groups (:mod:`dmp_dl.campaign.measure`), ``uplift`` trains an uplift
model on the campaign (:mod:`dmp_dl.campaign.uplift`) and adds it to the bundle
(:mod:`dmp_dl.campaign.bundle`). Each writes its summary JSON and a Markdown / HTML report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dmp_dl.campaign import report
from dmp_dl.campaign.control import CONTROL, TREATMENT
from dmp_dl.campaign.measure import measure_campaign, p_text, percent
from dmp_dl.campaign.outcomes import (
    GROUP,
    iso_time,
    outcome_cleaning,
    read_assignments,
    read_outcomes,
    resolve_conversion,
    user_outcomes,
)
from dmp_dl.core.io import atomic_write_text
from dmp_dl.core.json_values import json_safe
from dmp_dl.data.pseudonymize import bundle_pseudonymizer
from dmp_dl.data.schema import USER
from dmp_dl.store.bundle import Bundle

log = logging.getLogger(__name__)


@dataclass
class CampaignFiles:
    """Where a campaign's data are and how to read them (the CLI's keys of the same names)."""

    assignments: str | None
    outcomes: str | None
    conversion_event: str | None = "purchase"
    start: str | int | None = None
    window_days: float | None = None
    outcome_columns: Mapping[str, str] = field(default_factory=dict)
    outcome_sep: str = "auto"


def _bundle_reading(artifacts):
    """(training cleaning, pseudonymizer) of the bundle at ``artifacts`` (None: defaults, raw ids)."""
    if artifacts is None:
        return None, None

    b = Bundle.open(artifacts, verify=False)
    cleaning = ((b.manifest.get("config") or {}).get("data") or {}).get("cleaning")
    return cleaning, bundle_pseudonymizer(b.manifest, b.root)


def load_campaign(files: CampaignFiles, artifacts=None, rec=None):
    """(assignments, outcome events, per-user outcomes, conversion event) of ``files``.

    The outcome log is cleaned with the reading rules of ``rec``'s (or ``artifacts``') training
    run, and its raw ids hashed when that bundle holds pseudonyms.
    """
    assignments = read_assignments(files.assignments)
    if rec is not None:
        cleaning_cfg = ((rec.manifest.get("config") or {}).get("data") or {}).get("cleaning")
        pseudonymizer = rec.pseudonymizer
    else:
        cleaning_cfg, pseudonymizer = _bundle_reading(artifacts)
    cleaning = outcome_cleaning(cleaning_cfg)
    events = read_outcomes(files.outcomes, cleaning, files.outcome_columns, files.outcome_sep, pseudonymizer)
    event = resolve_conversion(files.conversion_event, events, cleaning)
    outcomes = user_outcomes(assignments[USER].to_numpy(), events, event, files.start, files.window_days)
    return assignments, events, outcomes, event


def measure_job(files: CampaignFiles, out: Path, metric: str = "conversion", confidence: float = 0.95,
                artifacts=None) -> dict:
    """Measure the campaign of ``files``; writes ``measure_summary.json``, ``measure.md`` and
    ``measure.html`` into ``out``. Returns the summary."""
    assignments, events, outcomes, event = load_campaign(files, artifacts)
    summary = measure_campaign(assignments, outcomes, metric, confidence)
    days = None if outcomes.end is None else (outcomes.end - outcomes.start) / 86400.0
    summary["conversion_event"] = event
    summary["window"] = {"start": outcomes.start, "start_iso": iso_time(outcomes.start), "end": outcomes.end,
                         "end_iso": iso_time(outcomes.end), "days": days}
    summary["outcomes"] = {"file": events.path, "rows_in": events.report.rows_in, "rows_kept": events.report.rows_out,
                           "dropped": dict(events.report.dropped), **outcomes.counts}
    summary["assignments"] = {"file": str(files.assignments), "users": int(len(assignments))}
    out.mkdir(parents=True, exist_ok=True)
    control = (assignments[GROUP] == CONTROL).to_numpy()
    files_written = report.write(report.measure_document(summary, outcomes.first_conversion, control), out, "measure")
    summary["files"] = {"summary": str(out / "measure_summary.json"), **files_written}
    atomic_write_text(out / "measure_summary.json", summary_json(summary))
    users = f"({summary['users']['treatment']} treated, {summary['users']['control']} control users)"
    if summary["reason"]:
        log.info("%s: %s %s", metric, summary["verdict"], users)
    else:
        log.info("%s lift %s, %s %% interval %s, p = %s (%s); %s %s", metric, report.num(summary["lift"]),
                 percent(summary["confidence"]), report.interval(summary["ci_low"], summary["ci_high"]),
                 p_text(summary["p_value"]), summary["p_value_method"], summary["verdict"], users)
    return summary


def summary_json(summary: dict) -> str:
    """``summary`` as standard JSON: a NaN or an infinity is written as null, never as ``NaN`` /
    ``Infinity`` (which JSON does not have)."""
    return json.dumps(json_safe(summary), indent=1, allow_nan=False)


def uplift_job(rec, artifacts: str, files: CampaignFiles, out: Path, options=None, attach: bool = True) -> dict:
    """Train an uplift model on the campaign of ``files`` (users of ``rec``, the bundle at
    ``artifacts``), evaluate it on held-out campaign users, write ``uplift_summary.json``,
    ``qini.csv``, ``uplift.md`` / ``uplift.html`` into ``out`` and, with ``attach``, add the model
    to the bundle. Returns the summary."""
    # torch and Lightning: only this job trains a model
    from dmp_dl.campaign.bundle import attach_uplift
    from dmp_dl.campaign.uplift import train_uplift

    assignments, events, outcomes, event = load_campaign(files, rec=rec)
    treated = (assignments[GROUP] == TREATMENT).to_numpy()
    campaign = {"assignments": str(files.assignments), "outcomes": str(files.outcomes), "conversion_event": event,
                "start_iso": iso_time(outcomes.start), "end_iso": iso_time(outcomes.end),
                "treatment": int(treated.sum()), "control": int((~treated).sum()),
                "conversions": int(outcomes.converted.sum())}
    result = train_uplift(rec, assignments[USER].to_numpy(), treated, outcomes.converted, options, campaign)
    summary = {"task": "uplift", "campaign": campaign, **result.summary}
    out.mkdir(parents=True, exist_ok=True)
    frames = []
    for name, (x, q) in result.curves.items():  # 101 points per curve
        at = np.unique(np.linspace(0, len(x) - 1, 101).round().astype(np.int64))
        frames.append(pd.DataFrame({"ranking": name, "share_targeted": x[at], "extra_conversions": q[at]}))
    atomic_write_text(out / "qini.csv", pd.concat(frames, ignore_index=True).to_csv(index=False))
    files_written = report.write(report.uplift_document(summary, result.curves, result.deciles), out, "uplift")
    summary["uplift_by_decile"] = result.deciles
    if attach:
        attach_uplift(artifacts, result.scorer)
        summary["bundle"] = str(artifacts)
        log.info("uplift model added to the bundle %s (a running server picks it up with POST /reload)", artifacts)
    summary["files"] = {"summary": str(out / "uplift_summary.json"), "qini": str(out / "qini.csv"), **files_written}
    atomic_write_text(out / "uplift_summary.json", summary_json(summary))
    return summary
