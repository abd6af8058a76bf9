"""The evaluation protocol in words and counts, from the run's config and data-quality report.

The report states how its numbers were computed (full ranking, exclusions, split, definitions,
who was evaluated) next to the numbers, so nobody has to guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from dmp_dl.metrics.ranking import DEFINITIONS

BASELINE_DESCRIPTIONS = {
    "popularity": "every user gets the catalogue ranked by number of training events (a non-personalised floor)",
    "ease": "EASE (Steck 2019), closed-form linear item-item model fitted on the training user-item matrix, L2 = {ease_l2}",
}


def epoch_to_iso(epoch: Any) -> str | None:
    """Epoch seconds as ISO-8601 UTC, or None if not a time."""
    try:
        return datetime.fromtimestamp(float(epoch), tz=timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError):
        return None


def _pct(x: Any) -> str:
    return f"{100 * float(x):g} %"


def split_description(split_cfg: Mapping, split_stats: Mapping) -> str:
    """One sentence on how events were divided into train / validation / test."""
    method = split_stats.get("method") or split_cfg.get("method", "unknown")
    val, test = split_cfg.get("val_frac", "?"), split_cfg.get("test_frac", "?")
    if method == "global_temporal":
        text = (f"global_temporal: one cut in time; the last {_pct(test)} of events (by time) are the test period "
                f"and the {_pct(val)} before them the validation period, so no training event is later than a "
                "held-out one")
        cut = epoch_to_iso(split_stats.get("train_time_max"))
        return text + (f"; the last training event is at {cut}" if cut else "")
    if method == "leave_last_n":
        n = split_cfg.get("n", 1)
        return (f"leave_last_n: per user, the last {n} event(s) are test and the {n} before them validation; "
                "users with too few events keep them in training")
    if method == "random_per_user":
        return (f"random_per_user: per user, a seeded random {_pct(test)} of events are test and {_pct(val)} "
                f"validation (rounded down; seed {split_cfg.get('seed', '?')})")
    return str(method)


def cutoffs(ranking: Mapping[str, Mapping]) -> list[int]:
    """The K values present in the ranking metrics (``recall@K`` keys), ascending."""
    found = (re.fullmatch(r"recall@(\d+)", key) for metrics in ranking.values() for key in metrics)
    return sorted({int(m.group(1)) for m in found if m})


def describe_protocol(config: Mapping, data_quality: Mapping, ranking: Mapping[str, Mapping], model_name: str) -> dict:
    """The protocol section of ``report.json``.

    Parameters
    ----------
    config: the run's resolved config (``data.split``, ``evaluation``, ``callbacks`` are read if present).
    data_quality: ``data_quality.json`` (``n_items`` and the ``split`` statistics).
    ranking: model -> metrics, for the per-model counts of evaluated users.
    model_name: the trained model's name (the other entries of ``ranking`` are baselines).

    Returns a dict: ``statements`` (topic -> sentence, in reading order), ``definitions``
    (metric -> definition), ``counts`` (numbers the statements quote) and ``baselines``.
    """
    split_stats = dict(data_quality.get("split") or {})
    split_cfg = dict((config.get("data") or {}).get("split") or {})
    ev = dict(config.get("evaluation") or {})
    n_items = data_quality.get("n_items", "all")
    counts = {
        "catalogue_items": data_quality.get("n_items"),
        "test_users": split_stats.get("test_users"),
        "test_pairs": split_stats.get("test_pairs"),
        "test_events": (split_stats.get("events") or {}).get("test"),
        "test_pairs_already_seen": split_stats.get("test_pairs_already_seen"),
        "test_events_user_unseen_in_train": split_stats.get("test_events_user_unseen_in_train"),
        "test_events_item_unseen_in_train": split_stats.get("test_events_item_unseen_in_train"),
        "evaluated_users": {name: m.get("n_users") for name, m in ranking.items()},
        "users_without_relevant_items": {name: m.get("n_users_no_relevant") for name, m in ranking.items()},
    }
    monitor = ((config.get("callbacks") or {}).get("model_checkpoint") or {}).get("monitor")
    statements = {
        "ranking": f"Each user's scores over all {n_items} catalogue items are sorted (full ranking, "
        "no sampled negatives).",
        "exclusion": "Items the user interacted with in the training or validation period are excluded (score set "
        "to -inf before ranking) and never recommended; validation excludes training items only.",
        "ties": "Equal scores rank the lower item index first, so every number is deterministic.",
        "inputs": f"{model_name} and the baselines are fitted on training interactions only (the network, EASE's "
        "item-item matrix, popularity counts); each test user is scored from everything they did before the test "
        "period (training and validation events), as a server that takes events in real time scores them.",
        "split": split_description(split_cfg, split_stats),
        "relevant_set": "A user's relevant set is the distinct items of their test events, minus items they already "
        f"had in training or validation ({counts['test_pairs_already_seen']} such user-item pairs removed); "
        f"items never seen in training stay relevant ({counts['test_events_item_unseen_in_train']} test events).",
        "evaluated_users": f"{counts['test_users']} users with at least one relevant item and at least one training "
        f"event ({counts['test_pairs']} user-item pairs). Test events of users without training events "
        f"({counts['test_events_user_unseen_in_train']}) are not evaluated: that is cold start, not ranking.",
        "empty_relevant_set": "Users whose relevant set is empty have no defined metric value: they are not "
        "evaluated and do not count as zeros (reported as users_without_relevant_items); every average is over "
        "the evaluated users only.",
        "averaging": "Each metric is the mean over evaluated users (every user weighs the same); ± values are "
        "standard errors of that mean.",
        "cutoffs": f"K = {', '.join(str(k) for k in cutoffs(ranking)) or 'none'}; MRR is not truncated at any K.",
    }
    if monitor:
        statements["model_selection"] = (f"The checkpoint and early stopping use {monitor} on the validation split; "
                                         "the test split is used for this report only.")
    baselines = {}
    for name in ranking:
        if name != model_name and name in BASELINE_DESCRIPTIONS:
            baselines[name] = BASELINE_DESCRIPTIONS[name].format(ease_l2=ev.get("ease_l2", "?"))
    for name in ev.get("baselines", []):
        if name not in ranking:
            baselines[name] = (f"configured but not run (e.g. the catalogue has more than evaluation.ease_max_items = "
                               f"{ev.get('ease_max_items', '?')} items)" if name == "ease" else "configured but not run")
    return {"statements": statements, "definitions": dict(DEFINITIONS), "counts": counts, "baselines": baselines}
