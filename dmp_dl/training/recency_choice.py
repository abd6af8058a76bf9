"""The recency half-life of the automatic model choice (``data.recency_half_life_days``).

How much an event counts in a user's row decays with its age (:mod:`dmp_dl.data.recency`). With
``auto`` the choice is made on the validation users among no decay and a few shares of the log's
time span (:func:`dmp_dl.data.recency.half_life_grid`), before the autoencoder trains, so that it
trains once, on the chosen rows:

* with EASE fitted (its item-item weights do not depend on the rows: a half-life only changes
  what a user's score reads, ``x_u B``), by EASE's validation metric on each half-life's rows
  (no decay: the 0/1 rows EASE reads without one) — one scoring pass, no fit;
* without EASE (``model.candidates=[vae]``, or EASE skipped for memory), by the autoencoder
  trained on undecayed rows, encoding each half-life's rows (:func:`by_autoencoder`, after its fit).

The record goes to ``metrics.json["model"]["recency"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from dmp_dl.data.recency import AUTO, describe
from dmp_dl.evaluation.ranking import evaluate_scorers

log = logging.getLogger(__name__)

REFERENCE = "each user's latest event"


def label(half_life_days: float | None) -> str:
    """The key of a half-life in the record: ``none`` or its days."""
    return "none" if half_life_days is None else f"{half_life_days:.4g}"


def fixed(dm, reason: str | None = None) -> tuple[float | None, dict]:
    """The half-life when there is nothing to choose: the data module's (a number, or none), and
    the record saying why (``reason`` overrides)."""
    options = dm.recency_candidates()
    h = options[0] if len(options) == 1 else None
    if reason is None:
        if dm.recency_setting is None:
            reason = "data.recency_half_life_days=null"
        elif not dm.has_timestamps:
            reason = "the log has no event times"
        elif dm.recency_setting == AUTO:
            reason = "the training events span no time"
        else:
            reason = f"data.recency_half_life_days={dm.recency_setting:g}"
    return h, {"setting": dm.recency_setting, "half_life_days": h, "chosen_by": reason, "reference": REFERENCE}


def by_ease(cfg, dm, shallow, dataset, metric: str, ks: list[int], device: torch.device) -> tuple[float | None, dict]:
    """The half-life among ``dm.recency_candidates()`` whose rows give EASE (``shallow``, the
    served item-item weights) the best validation ``metric`` on ``dataset`` (an ``EvalUsers``); no
    decay wins ties. Returns (days or None, record)."""
    options = dm.recency_candidates()
    decayed = iter(dm.rows_of_users(dataset.users, [h for h in options if h is not None]))
    rows = {label(h): (next(decayed) if h is not None else dm.train_seen) for h in options}

    def batch_scores(batch: dict) -> Iterator[tuple[str, torch.Tensor]]:
        users = batch["user"].cpu().numpy()  # one half-life's (B, n_items) scores at a time
        return ((name, shallow(x[users], weighted=name != "none").to(device)) for name, x in rows.items())

    results = evaluate_scorers(batch_scores, dataset, dm.n_items, ks, device=device, mrr=False)
    return _pick(dm, options, {name: float(r[metric]) for name, r in results.items()}, f"EASE on validation {metric}")


def by_autoencoder(net, dm, dataset, metric: str, ks: list[int], device: torch.device) -> tuple[float | None, dict]:
    """The half-life whose rows, encoded by ``net`` (the autoencoder trained without decay), give
    the best validation ``metric``; no decay wins ties. Leaves ``net`` attached to the undecayed
    training rows. Returns (days or None, record)."""
    from dmp_dl.models.embeddings import item_vectors, user_vectors

    options = dm.recency_candidates()
    items = torch.as_tensor(item_vectors(net, dm.n_items, device=device), device=device)
    users = np.asarray(dataset.users, dtype=np.int64)  # only they are scored: only their rows are built and encoded
    position = torch.full((dm.n_users,), -1, dtype=torch.int64, device=device)
    position[torch.as_tensor(users, device=device)] = torch.arange(len(users), device=device)
    history = dm.train_history[users]
    vectors = {}
    for h, rows in zip(options, dm.rows_of_users(users, options)):
        net.attach_rows(rows)
        vectors[label(h)] = torch.as_tensor(user_vectors(net, users, history, device=device), device=device)
    net.attach_rows(dm.interaction_rows("train", None))

    def batch_scores(batch: dict) -> Iterator[tuple[str, torch.Tensor]]:
        rows = position[batch["user"].to(device)]
        return ((name, v[rows] @ items.T) for name, v in vectors.items())

    results = evaluate_scorers(batch_scores, dataset, dm.n_items, ks, device=device, mrr=False)
    return _pick(dm, options, {name: float(r[metric]) for name, r in results.items()},
                 f"the autoencoder (trained without decay) on validation {metric}")


def _pick(dm, options: list[float | None], scores: dict[str, float], by: str) -> tuple[float | None, dict]:
    best = max(options, key=lambda h: (scores[label(h)], h is None))
    log.info("recency: %s (validation, %s: %s)", describe(best), by.split(" on ")[0],
             ", ".join(f"{label(h)}={scores[label(h)]:.4f}" for h in options))
    return best, {"setting": dm.recency_setting, "half_life_days": best, "chosen_by": by, "reference": REFERENCE,
                  "validation": {label(h): scores[label(h)] for h in options}}
