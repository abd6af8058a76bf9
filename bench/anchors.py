"""The anchors our models are compared with, each tuned on a validation split and refitted.

* ``popularity``: ``dmp_dl.evaluation.baselines.PopularityScorer`` (nothing to tune);
* ``ease``: ``dmp_dl.evaluation.baselines.EASEScorer`` (the textbook float64 inverse, whose fit time
  is the reference), L2 from a grid (tuned with the package's exact EASE solver, which solves the
  wide-catalogue case once for every L2);
* ``als`` / ``bpr``: the ``implicit`` library's AlternatingLeastSquares and
  BayesianPersonalizedRanking (bench-only dependency, CPU), a small grid each; the number of
  iterations is tuned for free by snapshotting the factors during one long fit;
* ``vaecf``: cornac's VAECF (Mult-VAE, Liang et al. 2018; bench-only dependency), the deep peer
  from an established library, a small grid of KL weight and epochs.

Tuning fits on the tuning split's training part and scores its validation users; the chosen
setting is then fitted once on the final training part (training + validation) and returned as a
scorer for the package's evaluator (``ranking.evaluate``). All fits of one run use the same
binary user-item matrix the package's EASE reads (``train_seen``).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from ranking import evaluate
from threadpoolctl import threadpool_limits

from dmp_dl.evaluation.baselines import EASEScorer, EmbeddingScorer, PopularityScorer
from dmp_dl.evaluation.heldout import HeldOutSplit

log = logging.getLogger(__name__)

NAMES = ("popularity", "ease", "als", "bpr", "vaecf")

# Light grids: each a few seconds on ML-100k with 2 cores. Iterations are snapshots of one fit.
GRIDS: dict[str, dict[str, list]] = {
    "ease": {"l2": [10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0]},
    "vaecf": {"k": [200], "hidden": [600], "beta": [0.2, 1.0], "n_epochs": [50, 150], "batch_size": [100],
              "learning_rate": [0.001]},
    "als": {"factors": [64], "regularization": [0.01, 0.1, 1.0], "alpha": [1.0, 5.0, 20.0], "iterations": [5, 10, 15, 30]},
    "bpr": {"factors": [64], "learning_rate": [0.01, 0.05, 0.1], "regularization": [0.001, 0.01],
            "iterations": [25, 50, 100, 200]},
}
QUICK_GRIDS: dict[str, dict[str, list]] = {
    "ease": {"l2": [200.0, 500.0]},
    "vaecf": {"k": [50], "hidden": [100], "beta": [1.0], "n_epochs": [5], "batch_size": [100], "learning_rate": [0.001]},
    "als": {"factors": [64], "regularization": [0.1], "alpha": [1.0, 5.0], "iterations": [5, 15]},
    "bpr": {"factors": [64], "learning_rate": [0.05], "regularization": [0.01], "iterations": [25, 50]},
}


@dataclass
class ImplicitFit:
    """Factors of one implicit fit and the snapshots taken during it.

    snapshots: iteration (1-based) -> (cumulative fit seconds, user factors (n_users, f),
        item factors (n_items, f)); BPR's factors carry its item bias as the last column
        (users have a 1 there), so the dot product is its score.
    """

    seconds: float
    snapshots: dict[int, tuple[float, np.ndarray, np.ndarray]] = field(default_factory=dict)

    def scorer(self, iteration: int | None = None) -> EmbeddingScorer:
        it = iteration or max(self.snapshots)
        _, users, items = self.snapshots[it]
        return EmbeddingScorer(users, items)


def fit_implicit(kind: str, user_items: sp.csr_matrix, params: dict[str, Any], snapshot_at: list[int],
                 seed: int = 0) -> ImplicitFit:
    """Fit implicit's ``als`` or ``bpr`` on ``user_items`` (n_users, n_items) for max(snapshot_at)
    iterations on every core, copying the factors after each iteration in ``snapshot_at``.
    Seconds exclude the copies."""
    from implicit.als import AlternatingLeastSquares
    from implicit.bpr import BayesianPersonalizedRanking

    iterations = max(snapshot_at)
    if kind == "als":
        model = AlternatingLeastSquares(factors=params["factors"], regularization=params["regularization"],
                                        alpha=params["alpha"], iterations=iterations, random_state=seed)
    elif kind == "bpr":
        model = BayesianPersonalizedRanking(factors=params["factors"], learning_rate=params["learning_rate"],
                                            regularization=params["regularization"], iterations=iterations,
                                            random_state=seed)
    else:
        raise ValueError(f"unknown implicit model {kind!r}")
    fit = ImplicitFit(0.0)
    wanted = set(snapshot_at)
    clock = {"spent": 0.0, "since": 0.0}

    def callback(iteration, *_):
        now = time.perf_counter()
        clock["spent"] += now - clock["since"]
        if iteration + 1 in wanted:
            fit.snapshots[iteration + 1] = (clock["spent"], np.array(model.user_factors, np.float32),
                                            np.array(model.item_factors, np.float32))
        clock["since"] = time.perf_counter()

    x = sp.csr_matrix(user_items, dtype=np.float32)
    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, single-threaded BLAS
        clock["since"] = time.perf_counter()
        model.fit(x, show_progress=False, callback=callback)
    fit.seconds = clock["spent"]
    return fit


class VAECFScorer:
    """Batch scores of a fitted cornac VAECF over the package's item indices (items cornac never
    saw in training score -inf)."""

    def __init__(self, model, user_map: np.ndarray, item_map: np.ndarray):
        self.model, self.user_map, self.item_map = model, user_map, item_map
        self.known = np.flatnonzero(item_map >= 0)

    def __call__(self, batch):
        import torch

        users = self.user_map[batch["user"].cpu().numpy()]
        rows = self.model.r_mat[np.maximum(users, 0)].toarray()
        rows[users < 0] = 0.0
        with torch.no_grad():
            z, _ = self.model.vae.encode(torch.tensor(rows, dtype=torch.float32))
            decoded = self.model.vae.decode(z).numpy()
        out = np.full((len(users), len(self.item_map)), -np.inf, np.float32)
        out[:, self.known] = decoded[:, self.item_map[self.known]]
        return torch.from_numpy(out)


def fit_vaecf(user_items: sp.csr_matrix, params: dict[str, Any], seed: int = 0) -> tuple[VAECFScorer, float]:
    """cornac's VAECF on the binary ``user_items`` (n_users, n_items). Returns (scorer, fit seconds)."""
    import cornac

    coo = sp.coo_matrix(user_items)
    triplets = list(zip(coo.row.astype(str).tolist(), coo.col.astype(str).tolist(), np.ones(coo.nnz).tolist()))
    data = cornac.data.Dataset.from_uir(triplets, seed=seed)
    model = cornac.models.VAECF(k=params["k"], autoencoder_structure=[params["hidden"]], act_fn="tanh",
                                likelihood="mult", n_epochs=params["n_epochs"], batch_size=params["batch_size"],
                                learning_rate=params["learning_rate"], beta=params["beta"], seed=seed, verbose=False)
    t0 = time.perf_counter()
    model.fit(data)
    seconds = time.perf_counter() - t0
    n_users, n_items = user_items.shape
    user_map = np.array([data.uid_map.get(str(u), -1) for u in range(n_users)], dtype=np.int64)
    item_map = np.array([data.iid_map.get(str(i), -1) for i in range(n_items)], dtype=np.int64)
    return VAECFScorer(model, user_map, item_map), seconds


def _grid(grid: dict[str, list], skip: tuple[str, ...] = ("iterations",)) -> list[dict]:
    keys = [k for k in grid if k not in skip]
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


@dataclass
class Anchor:
    """A tuned, refitted anchor: ``scorer`` for the final split, the chosen ``params``, the tuning
    validation score of every setting tried (``tried``), and the final fit's seconds."""

    name: str
    scorer: Any
    params: dict
    fit_seconds: float
    tried: list[dict] = field(default_factory=list)


def tune_and_fit(name: str, tune: HeldOutSplit, final: HeldOutSplit, metric: str, ks: list[int],
                 grids: dict[str, dict[str, list]] = GRIDS, seed: int = 0) -> Anchor:
    """Pick ``name``'s setting by ``metric`` (e.g. ``ndcg@10``) on ``tune``'s validation users, then
    fit it on ``final``'s training data."""
    if name == "popularity":
        t0 = time.perf_counter()
        scorer = PopularityScorer(final.item_counts)
        return Anchor(name, scorer, {}, time.perf_counter() - t0)
    tried = []
    if name == "ease":
        from dmp_dl.models.ease import EASESolver, ease_weights

        solver = EASESolver(tune.train_seen)  # the same model, solved once for every l2 where it can be
        for params in _grid(grids["ease"]):
            score = evaluate(lambda batch, l2=params["l2"]: solver.scores(batch["user"].cpu().numpy(), l2), tune, ks)[metric]
            tried.append({**params, metric: score})
        best = max(tried, key=lambda r: r[metric])
        # timed: one fit of the package's exact EASE in its cheaper form (primal in place or dual,
        # float32), what a user pays for EASE; scored: the float64 textbook form, fitted apart
        t0 = time.perf_counter()
        ease_weights(final.train_seen, best["l2"])
        seconds = time.perf_counter() - t0
        scorer = EASEScorer(final.train_seen, best["l2"])
        params = {"l2": best["l2"]}
    elif name in ("als", "bpr"):
        iterations = sorted(grids[name]["iterations"])
        for params in _grid(grids[name]):
            fit = fit_implicit(name, tune.train_seen, params, iterations, seed)
            for it in iterations:
                tried.append({**params, "iterations": it, metric: evaluate(fit.scorer(it), tune, ks)[metric]})
        best = max(tried, key=lambda r: r[metric])
        params = {k: v for k, v in best.items() if k != metric}
        fit = fit_implicit(name, final.train_seen, params, [params["iterations"]], seed)
        scorer, seconds = fit.scorer(), fit.seconds
    elif name == "vaecf":
        for params in _grid(grids["vaecf"], skip=()):
            scorer, _ = fit_vaecf(tune.train_seen, params, seed)
            tried.append({**params, metric: evaluate(scorer, tune, ks)[metric]})
        best = max(tried, key=lambda r: r[metric])
        params = {k: v for k, v in best.items() if k != metric}
        scorer, seconds = fit_vaecf(final.train_seen, params, seed)
    else:
        raise ValueError(f"unknown anchor {name!r} (one of {NAMES})")
    log.info("%s: chose %s by validation %s", name, params, metric)
    return Anchor(name, scorer, params, seconds, tried)
