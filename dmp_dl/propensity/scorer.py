"""``PropensityScorer``: calibrated conversion probabilities for known and new users."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from dmp_dl.core.errors import DataError, UnknownIdError
from dmp_dl.data.cleaning import parse_timestamps
from dmp_dl.data.vocab import IdVocab
from dmp_dl.propensity.baselines import design_matrix
from dmp_dl.propensity.calibration import Calibrator
from dmp_dl.propensity.features import Snapshot, UserFeatures
from dmp_dl.propensity.module import snapshot_tensors
from dmp_dl.propensity.net import PropensityNet
from dmp_dl.propensity.tabular import TabularModel


class PropensityScorer:
    """Probability that a user performs the target event in the ``horizon_days`` after ``as_of``.

    Parameters
    ----------
    net: the trained :class:`PropensityNet` (kept on CPU, eval mode); with ``tabular`` it only
        provides the embedding network's user vectors (its frozen encoder).
    calibrator: maps the served model's logits to probabilities.
    features: how attributes and events become the network's inputs.
    known_scores: (n_users,) float64, the probability of every user of the embedding model's user
        vocabulary (index i = user i) as of ``data_end``, from all their events.
    data_end: epoch seconds of the data's last event (the moment known users are scored at).
    item_vocab: the embedding network's item vocabulary (for new users' histories), or None.
    info: JSON-safe facts (task, metrics summary) for manifests and health checks.
    tabular: a classic model (logistic regression, trees) to serve instead of the network, on the
        same features as in training (:func:`~dmp_dl.propensity.baselines.design_matrix`).
    served: the served model's name (``mlp``, ``logistic_regression``, ``gbm``).
    """

    def __init__(self, net: PropensityNet, calibrator: Calibrator, features: UserFeatures, known_scores: np.ndarray,
                 data_end: int, item_vocab: IdVocab | None = None, info: Mapping | None = None,
                 tabular: TabularModel | None = None, served: str = "mlp"):
        self.net = net.cpu().eval()
        self.calibrator = calibrator
        self.features = features
        self.known_scores = np.asarray(known_scores, dtype=np.float64)
        self.data_end = int(data_end)
        self.item_vocab = item_vocab
        self.info = dict(info or {})
        self.tabular = tabular
        self.served = served

    @property
    def n_users(self) -> int:
        return len(self.known_scores)

    def score_known(self, user_idx: np.ndarray) -> np.ndarray:
        """Probabilities (float64, same shape as ``user_idx``) of known users by vocabulary index.

        Raises :class:`UnknownIdError` for an index outside ``0 .. n_users - 1``.
        """
        idx = np.asarray(user_idx)
        if idx.size == 0:
            return np.zeros(idx.shape, dtype=np.float64)
        if not np.issubdtype(idx.dtype, np.integer):
            raise UnknownIdError("user index", idx.reshape(-1)[:5].tolist())
        bad = (idx < 0) | (idx >= self.n_users)
        if bad.any():
            raise UnknownIdError("user index", idx[bad].reshape(-1)[:5].tolist())
        return self.known_scores[idx]

    def score_new(self, attributes: Sequence[Mapping | None], events: Sequence[Sequence[Mapping]],
                  as_of: float | str | None = None) -> np.ndarray:
        """Probabilities (n,) float64 of users the model has never seen.

        attributes: one dict of user-table columns per user (None when unknown; unknown columns
            and categories are ignored, missing numeric values count as the training mean).
        events: one list per user of event dicts with ``item_id``, ``timestamp`` (epoch seconds or
            ISO-8601) and optionally ``event_type`` (default: the training data's default type)
            and ``value``.
        as_of: the moment to score at (epoch seconds or ISO-8601); default the end of the training
            data, the moment known users are scored at. Later events count as happening at it.
        """
        moment = self.data_end if as_of is None else parse_timestamps(pd.Series([as_of], dtype=object))[0]
        if not np.isfinite(moment):
            raise DataError(f"score_new: as_of={as_of!r} is neither epoch seconds nor an ISO-8601 time")
        return self.score_snapshot(self.features.new(attributes, events, float(moment), self.item_vocab))

    @torch.no_grad()
    def logits(self, snap: Snapshot, batch_size: int = 8192) -> np.ndarray:
        """The served model's raw logits (N,) float64 for ``snap``'s users."""
        if self.net.training:  # walking the modules costs more than a one-user forward pass
            self.net.eval()
        inputs = snapshot_tensors(snap)
        out = []
        for s in range(0, len(snap), batch_size):
            batch = {k: v[s : s + batch_size] for k, v in inputs.items()}
            if self.tabular is None:
                out.append(self.net(**batch).double().numpy())
                continue
            vectors = None
            if self.net.encoder is not None:
                vectors = self.net.user_vectors(batch["history"], batch["enc_tokens"], batch["enc_numeric"]).numpy()
            rows = snap.take(np.arange(s, min(s + batch_size, len(snap))))
            out.append(self.tabular.logits(design_matrix(rows, self.features.attributes.n_tokens, vectors)))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)

    def score_snapshot(self, snap: Snapshot) -> np.ndarray:
        """Calibrated probabilities (N,) float64 for ``snap``'s users."""
        return self.calibrator(self.logits(snap))
