"""The emphasised denoising item-item model (EDLAE, ``model.ease.dropout``): p = 0 is EASE bit for
bit, p > 0 is the closed form of the formula in every solving path, the choice records the chosen p,
the report's EASE baseline stays plain EASE, and large catalogues factorise no more matrices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from omegaconf import OmegaConf
from scipy.linalg import lapack

from dmp_dl.core.errors import ConfigError
from dmp_dl.models import ease as ease_lib
from dmp_dl.pipeline.run import run
from dmp_dl.store.manifest import ScoringEntry
from dmp_dl.training.selection import ease_dropouts

from .test_user_level_models import planted_cfg, planted_log  # noqa: F401  (fixture)


def _binary(n_users: int, n_items: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.random((n_users, n_items)) < 0.25).astype(np.float32))


def _edlae_reference(x: sp.csr_matrix, l2: float, p: float) -> np.ndarray:
    """The closed form in float64 numpy: L = l2 I + p/(1-p) diagMat(diag(G)), P = (G + L)^-1,
    B = I - P diagMat(1 / diag(P))."""
    g = (x.T @ x).toarray().astype(np.float64)
    penalty = l2 * np.eye(len(g)) + p / (1.0 - p) * np.diag(np.diag(g))
    inverse = np.linalg.inv(g + penalty)
    return np.eye(len(g)) - inverse / np.diag(inverse)[None, :]


def _ease_as_before(x: sp.csr_matrix, l2: float) -> torch.Tensor:
    """EASE's primal float32 fit as the package computed it before EDLAE: Gram matrix, l2 on the
    diagonal, LAPACK's Cholesky and inverse (what the CPU runs), B = -P / diag(P) with a zero diagonal."""
    gram = np.asfortranarray((x.T @ x).toarray(), dtype=np.float32)
    gram[np.diag_indices(len(gram))] += np.float32(l2)
    factor, info = lapack.spotrf(gram, lower=1, clean=1)
    assert info == 0
    lower, info = lapack.spotri(factor, lower=1)
    assert info == 0
    inverse = torch.from_numpy(np.ascontiguousarray(np.tril(lower) + np.tril(lower, -1).T))
    b = inverse.div_(-inverse.diagonal())
    b.diagonal().zero_()
    return b


def test_dropout_zero_is_ease_bit_for_bit():
    x = _binary(80, 30, seed=3)
    for l2 in (2.0, 9.0):
        before = _ease_as_before(x, l2)
        assert torch.equal(ease_lib.ease_weights(x, l2, dropout=0.0), before)
        solver = ease_lib.EASESolver(x)
        assert torch.equal(solver.dense(l2, 0.0), before)
        served = solver.served(l2, 30, 0.0).weights.toarray()
        np.testing.assert_array_equal(served, sp.csr_matrix(before.numpy()).toarray())
    # the dual form (a catalogue twice as wide as its users) too: p = 0 takes EASE's own path
    wide = _binary(15, 40, seed=4)
    assert torch.equal(ease_lib.ease_weights(wide, 5.0, dropout=0.0), ease_lib.ease_weights(wide, 5.0))


@pytest.mark.parametrize("shape", [(70, 25), (40, 60), (18, 50)], ids=["primal", "primal-wider", "dual"])
@pytest.mark.parametrize("p", [0.25, 0.6])
def test_edlae_is_the_closed_form_with_a_zero_diagonal(shape, p):
    x = _binary(*shape, seed=5)
    reference = _edlae_reference(x, 4.0, p)
    assert np.abs(reference - _edlae_reference(x, 4.0, 0.0)).max() > 1e-3  # the dropout changes the weights
    b = ease_lib.ease_weights(x, 4.0, dropout=p).numpy()
    np.testing.assert_allclose(b, reference, atol=2e-5)
    assert np.all(np.diag(b) == 0.0)
    solver = ease_lib.EASESolver(x)
    assert solver.dual == (shape[1] >= 2 * shape[0])
    users = np.arange(shape[0])
    np.testing.assert_allclose(solver.scores(users, 4.0, p).numpy(), x.toarray() @ reference, atol=5e-5)
    served = solver.served(4.0, shape[1], p, chunk=7).weights.toarray()  # chunks that split the rows unevenly
    np.testing.assert_allclose(served, reference, atol=2e-5)
    assert np.all(np.diag(served) == 0.0)


def test_a_dropout_outside_0_1_is_one_clear_error():
    x = _binary(20, 10, seed=6)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"model\.ease\.dropout must be a number in \[0, 1\)"):
            ease_lib.ease_weights(x, 3.0, dropout=bad)


def test_the_default_is_plain_ease(tmp_path):
    from .conftest import compose_cfg

    cfg = compose_cfg([], tmp_path)
    assert cfg.model.name == "auto" and cfg.model.ease.dropout == 0
    assert ease_dropouts(cfg, 100, l2_searched=True) == [0.0]


def _ease_cfg(**ease) -> OmegaConf:
    base = {"l2": None, "l2_scales": [2, 4, 8, 16, 32], "short_grid_above_items": 8000, "dropout": "auto",
            "dropout_grid": [0.1, 0.25, 0.5]}
    return OmegaConf.create({"model": {"ease": {**base, **ease}}})


def test_the_dropout_is_searched_only_where_the_l2_grid_is_cheap():
    cfg = _ease_cfg()
    assert ease_dropouts(cfg, 5000, l2_searched=True) == [0.0, 0.1, 0.25, 0.5]
    assert ease_dropouts(_ease_cfg(dropout_grid=[0.5, 0.0, 0.5]), 5000, l2_searched=True) == [0.0, 0.5]
    assert ease_dropouts(cfg, 9000, l2_searched=True) == [0.0]  # the short grid: EASE's one factorisation
    assert ease_dropouts(cfg, 5000, l2_searched=False) == [0.0]  # l2 given: nothing searched
    assert ease_dropouts(_ease_cfg(dropout=0.3), 9000, l2_searched=True) == [0.3]  # a number: that p
    assert ease_dropouts(_ease_cfg(dropout_grid=None), 5000, l2_searched=True) == [0.0]


def _count_inverses(monkeypatch) -> list:
    calls = []
    inverse = ease_lib.regularised_inverse
    monkeypatch.setattr(ease_lib, "regularised_inverse",
                        lambda gram, l2, *a: calls.append("edlae" if torch.is_tensor(l2) else l2) or inverse(gram, l2, *a))
    return calls


def test_the_choice_records_the_dropout_and_the_baseline_stays_plain_ease(planted_log, tmp_path, monkeypatch):  # noqa: F811
    calls = _count_inverses(monkeypatch)
    result = run(planted_cfg(planted_log, tmp_path / "run", "model=auto", "model.refit=false",
                             "model.ease.dropout=auto", "model.ease.dropout_grid=[0.5]"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    details = metrics["model"]["candidates"]["ease"]["details"]
    assert details["dropout"] in (0.0, 0.5)
    plain_l2 = details["plain_ease"]["l2"]
    assert details["plain_ease"]["val"]["ndcg@20"] == max(details["l2_grid"].values())  # plain EASE's own l2 search
    tried = [float(v) for v in details["dropout_grid"]["0.5"]]
    grid = sorted(float(v) for v in details["l2_grid"])
    below = [v for v in grid if v <= plain_l2 * (1 + 1e-6)][-2:]
    assert sorted(tried) == pytest.approx(below)  # p > 0 at plain EASE's l2 and the grid's value below it
    chosen_grid = details["dropout_grid"]["0.5"] if details["dropout"] == 0.5 else details["l2_grid"]
    assert chosen_grid[f"{details['l2']:g}"] == max([*details["l2_grid"].values(), *details["dropout_grid"]["0.5"].values()])
    # one factorisation per grid point, plus at most one for each served form (plain EASE and the winner)
    assert len(calls) <= len(details["l2_grid"]) + len(tried) + 2
    assert calls.count("edlae") >= len(tried)
    entry = ScoringEntry.model_validate(json.loads((result["bundle_dir"] / "manifest.json").read_text())["scoring"])
    assert entry.ease_l2 == pytest.approx(plain_l2)  # what `python -m dmp_dl.evaluate` fits as its EASE baseline
    if entry.shallow is not None:
        assert entry.shallow.dropout == details["dropout"] and entry.shallow.l2 == pytest.approx(details["l2"])


def test_a_dropout_given_is_served_and_the_report_still_compares_with_plain_ease(planted_log, tmp_path, monkeypatch):  # noqa: F811
    calls = _count_inverses(monkeypatch)
    run(planted_cfg(planted_log, tmp_path / "run", "model=auto", "model.candidates=[ease]", "model.refit=false",
                    "model.ease.l2=12.0", "model.ease.dropout=0.5"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    details = metrics["model"]["candidates"]["ease"]["details"]
    assert (details["l2"], details["dropout"]) == (12.0, 0.5)
    assert sorted(calls, key=str) == [12.0, "edlae"]  # plain EASE (the baseline), then the candidate
    assert metrics["model"]["selected"] == "ease"
    assert metrics["ranking"]["auto"] == metrics["model"]["candidates"]["ease"]["test"]  # the served EDLAE
    assert metrics["ranking"]["ease"] != metrics["ranking"]["auto"]  # the baseline: plain EASE, fitted beside it


def test_large_catalogues_factorise_as_often_as_before(planted_log, tmp_path, monkeypatch):  # noqa: F811
    calls = _count_inverses(monkeypatch)
    run(planted_cfg(planted_log, tmp_path / "run", "model=auto", "model.refit=false", "model.ease.dropout=auto",
                    "model.ease.short_grid_above_items=10"))  # the planted catalogue counts as large
    details = json.loads((tmp_path / "run" / "metrics.json").read_text())["model"]["candidates"]["ease"]["details"]
    assert calls == [details["l2"]] and details["dropout"] == 0.0 and details["dropout_grid"] == {}
