"""The test split as ranking evaluation sees it, and the model and its baselines evaluated on it.

:class:`HeldOutSplit` holds what full-ranking evaluation needs in one index space: the training
side (histories, user-item pairs, item popularity) and the test users with their excluded and
relevant items. ``train.py`` builds it from its DataModule (:meth:`HeldOutSplit.from_datamodule`);
``python -m dmp_dl.evaluate`` builds it in a bundle's index space
(:func:`map_to_vocabularies`), leaving out users and items the bundle does not know.
:func:`evaluate_model_and_baselines` then scores the trained network and the configured baselines
on it with the same protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from dmp_dl.core.errors import ConfigError
from dmp_dl.data.datamodule import EvalUsers, last_items, pair_matrix
from dmp_dl.data.split import TEST, TRAIN
from dmp_dl.data.vocab import IdVocab
from dmp_dl.evaluation.baselines import EASEScorer, EmbeddingScorer, PopularityScorer
from dmp_dl.evaluation.ranking import evaluate_scorer
from dmp_dl.models.embeddings import inference_device, item_vectors, user_vectors
from dmp_dl.models.scoring import BlendScorer

log = logging.getLogger(__name__)

DEFAULT_KS = (5, 10, 20, 50)
DEFAULT_BASELINES = ("popularity", "ease")


@dataclass
class HeldOutSplit:
    """The test split and the training data it is ranked against, in one index space.

    n_users, n_items: sizes of the index space (the model's vocabularies).
    train_history: (n_users, L) integer (int32 below 2**31 items), each user's most recent training items, most recent first,
        padded with ``n_items``.
    train_seen: (n_users, n_items) binary CSR of the training user-item pairs (what EASE is fitted on).
    item_counts: (n_items,) int64 training events per item (popularity baseline, novelty).
    test: the users to evaluate (``EvalUsers``: their excluded and relevant items, as CSR rows).
    train_rows: (n_users, n_items) CSR of training interaction strengths (None: ``train_seen``).
    input_history, input_seen, input_rows: the same of every event before the test period
        (training and validation): what a test user is scored from, as a server that takes events
        in real time scores them (None: the training ones).
    """

    n_users: int
    n_items: int
    train_history: np.ndarray
    train_seen: sp.csr_matrix
    item_counts: np.ndarray
    test: EvalUsers
    train_rows: sp.csr_matrix | None = None
    input_history: np.ndarray | None = None
    input_seen: sp.csr_matrix | None = None
    input_rows: sp.csr_matrix | None = None

    @classmethod
    def from_datamodule(cls, dm) -> "HeldOutSplit":
        """The test split of a prepared ``InteractionDataModule``, in its own index space."""
        return cls(dm.n_users, dm.n_items, dm.train_history, dm.train_seen, dm.item_counts, dm.eval_dataset("test"),
                   dm.interaction_rows("train"), dm.test_input_history, dm.test_seen, dm.interaction_rows("before_test"))

    def inputs(self) -> tuple[np.ndarray, sp.csr_matrix, sp.csr_matrix]:
        """(history, 0/1 pairs, rows) a test user is scored from."""
        history = self.input_history if self.input_history is not None else self.train_history
        seen = self.input_seen if self.input_seen is not None else self.train_seen
        rows = self.input_rows if self.input_rows is not None else (self.train_rows if self.train_rows is not None else seen)
        return history, seen, rows


def _selection(index_map: np.ndarray, n_out: int) -> sp.csr_matrix:
    """(len(index_map), n_out) 0/1 matrix taking row i to column ``index_map[i]`` (none when -1)."""
    rows = np.flatnonzero(index_map >= 0)
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, index_map[rows])), shape=(len(index_map), n_out))


def map_to_vocabularies(dm, user_vocab: IdVocab, item_vocab: IdVocab, history_len: int) -> tuple[HeldOutSplit, dict]:
    """The test split of ``dm`` in the index space of ``user_vocab`` / ``item_vocab`` (a bundle's).

    The split itself is ``dm``'s (made on all its events); then every user and item the
    vocabularies do not know is left out: their events build no history, pair or popularity, their
    held-out items are not relevant (they cannot be recommended), and users left without a relevant
    item are not evaluated. With the vocabularies of ``dm`` itself this gives the same arrays as
    :meth:`HeldOutSplit.from_datamodule`.

    history_len: items per user history (the network's ``history_len``).

    Returns (split, counts): ``counts`` says what was left out (``users_unknown``,
    ``items_unknown``, ``train_events_unknown``, ``test_events_unknown``, ``test_pairs_unknown_item``,
    ``test_users_dropped``) and whether the vocabularies are ``dm``'s own (``same_vocabularies``).
    """
    n_users, n_items = len(user_vocab), len(item_vocab)
    user_map = user_vocab.index_of(dm.user_vocab.ids)  # (dm.n_users,) -1 = unknown to the vocabulary
    item_map = item_vocab.index_of(dm.item_vocab.ids)  # (dm.n_items,)
    ev = dm.events
    u = user_map[ev["user_idx"].to_numpy()]
    i = item_map[ev["item_idx"].to_numpy()]
    s = ev["split"].to_numpy()
    known = (u >= 0) & (i >= 0)
    train = (s == TRAIN) & known
    users_sel, items_sel = _selection(user_map, n_users), _selection(item_map, n_items)

    def project(m: sp.csr_matrix) -> sp.csr_matrix:
        out = (users_sel.T @ m @ items_sel).tocsr()
        out.eliminate_zeros()
        return out

    relevant, seen = project(dm.test_relevant), project(dm.test_seen)
    test_users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    history = last_items(u[train], i[train], n_users, history_len, pad=n_items)
    before = (s != TEST) & known
    input_history = last_items(u[before], i[before], n_users, history_len, pad=n_items)
    split = HeldOutSplit(
        n_users, n_items, history, pair_matrix(n_users, n_items, u[train], i[train]),
        np.bincount(i[train], minlength=n_items).astype(np.int64), EvalUsers(test_users, input_history, seen, relevant),
        project(dm.interaction_rows("train")), input_history, pair_matrix(n_users, n_items, u[before], i[before]),
        project(dm.interaction_rows("before_test")),
    )
    counts = {
        "same_vocabularies": bool(dm.user_vocab == user_vocab and dm.item_vocab == item_vocab),
        "users_unknown": int((user_map < 0).sum()),
        "items_unknown": int((item_map < 0).sum()),
        "train_events_unknown": int(((s == TRAIN) & ~known).sum()),
        "test_events_unknown": int(((s == TEST) & ~known).sum()),
        "test_pairs_unknown_item": int(dm.test_relevant[:, np.flatnonzero(item_map < 0)].nnz),
        "test_users_dropped": int(len(dm.test_users) - len(test_users)),
        "test_users": int(len(test_users)),
        "test_pairs": int(relevant.nnz),
    }
    return split, counts


def evaluate_model_and_baselines(net: torch.nn.Module, model_name: str, split: HeldOutSplit,
                                 evaluation: Mapping[str, Any] | None = None, served=None) -> dict[str, dict]:
    """Test metrics of the trained ``net`` and of the configured baselines on ``split``, same protocol.

    Weights are fitted on the training period only (the network, EASE, popularity); each test user
    is scored from every event before the test period (training and validation), as a server that
    takes events in real time scores them: no test event is read.
    served: the bundle's :class:`~dmp_dl.models.scoring.ServedScore` when its score is not the plain
    dot product (the item-item term then reads each user's training items).

    evaluation: ``ks`` (cut-offs), ``baselines`` (``popularity`` and/or ``ease``), ``ease_l2``,
        ``ease_max_items`` (EASE is skipped above this catalogue size); missing keys take the
        defaults of ``conf/evaluation/default.yaml``.

    Returns model or baseline name -> :func:`evaluate_scorer`'s metrics plus ``eval_seconds``;
    empty when no test user has a relevant item.
    """
    ev = evaluation or {}

    def setting(key: str, default: Any) -> Any:
        value = ev.get(key)
        return default if value is None else value

    ks = list(setting("ks", DEFAULT_KS))
    if len(split.test) == 0:
        log.warning("no test users with held-out items: ranking evaluation skipped")
        return {}
    popularity = torch.as_tensor(split.item_counts / max(split.item_counts.sum(), 1), dtype=torch.float32)
    device = inference_device()
    net.to(device).eval()
    history, seen, rows = split.inputs()
    if hasattr(net, "attach_rows"):  # user-level models encode a user from their row
        net.attach_rows(rows)
    users = user_vectors(net, np.arange(split.n_users), history, device=device)
    items = item_vectors(net, split.n_items, device=device)
    if served is not None and served.uses_shallow:
        scorers: dict[str, Any] = {model_name: BlendScorer(served, users, items, rows if served.reads_rows else seen)}
    else:
        scorers = {model_name: EmbeddingScorer(users, items)}
    for name in setting("baselines", DEFAULT_BASELINES):
        if name == "popularity":
            scorers[name] = PopularityScorer(split.item_counts)
        elif name == "ease":
            if split.n_items > int(setting("ease_max_items", 20000)):
                log.warning("EASE skipped: %d items > evaluation.ease_max_items", split.n_items)
                continue
            scorers[name] = EASEScorer(split.train_seen, float(setting("ease_l2", 500.0)), precise=False, rows=seen)
        else:
            raise ConfigError(f"unknown baseline {name!r} in evaluation.baselines (popularity | ease)")
    results = {}
    for name, scorer in scorers.items():
        t0 = time.perf_counter()
        results[name] = evaluate_scorer(scorer, split.test, split.n_items, ks, popularity)
        results[name]["eval_seconds"] = time.perf_counter() - t0
    return results
