"""The EASE l2 search grows past the grid's edge: when the best validation l2 is the grid's largest
(smallest) value, further values x4 (/4) are tried while each scores better, up to a cap; an
interior best tries nothing more; metrics.json records every l2 tried and why the search stopped."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from omegaconf import OmegaConf

from dmp_dl.core.errors import ConfigError
from dmp_dl.models import ease as ease_lib
from dmp_dl.pipeline.run import run
from dmp_dl.training import selection
from dmp_dl.training.selection import extend_l2_grid, fit_ease

from .test_user_level_models import planted_cfg, planted_log  # noqa: F401  (fixture)


def _peaked_at(target: float):
    """A validation score that peaks at l2 = ``target`` (log-symmetric), and the l2s it was asked for."""
    asked = []

    def score(l2: float) -> float:
        asked.append(l2)
        return 1.0 - abs(math.log(l2 / target))

    return score, asked


def test_a_best_beyond_the_top_of_the_grid_is_found():
    score, asked = _peaked_at(128.0)
    grid = {v: score(v) for v in (2.0, 4.0, 8.0, 16.0, 32.0)}
    asked.clear()
    scores, facts = extend_l2_grid(score, grid, factor=4.0, most=4)
    assert asked == [128.0, 512.0]  # 512 scores below 128: stop
    assert facts["best"] == 128.0 and max(scores, key=scores.get) == 128.0
    assert facts["extended"] == "up" and facts["added"] == [128.0, 512.0] and facts["stopped"] == "no_gain"
    assert sorted(scores) == [2.0, 4.0, 8.0, 16.0, 32.0, 128.0, 512.0]


def test_a_best_below_the_bottom_of_the_grid_is_found():
    score, asked = _peaked_at(0.1)
    grid = {v: score(v) for v in (2.0, 4.0, 8.0)}
    asked.clear()
    _, facts = extend_l2_grid(score, grid, factor=4.0, most=4)
    assert asked == pytest.approx([0.5, 0.125, 0.03125])
    assert facts["best"] == pytest.approx(0.125) and facts["extended"] == "down" and facts["stopped"] == "no_gain"


def test_an_interior_best_tries_nothing_more():
    score, asked = _peaked_at(9.0)
    grid = {v: score(v) for v in (2.0, 4.0, 8.0, 16.0, 32.0)}
    asked.clear()
    scores, facts = extend_l2_grid(score, grid, factor=4.0, most=4)
    assert asked == [] and scores == grid
    assert facts == {"best": 8.0, "grid": [2.0, 4.0, 8.0, 16.0, 32.0], "extended": None, "added": [],
                     "stopped": "interior"}


def test_the_search_stops_at_its_cap_and_can_be_turned_off():
    score, asked = _peaked_at(1e9)
    grid = {v: score(v) for v in (2.0, 4.0)}
    asked.clear()
    _, facts = extend_l2_grid(score, grid, factor=2.0, most=3)
    assert asked == [8.0, 16.0, 32.0] and facts["best"] == 32.0 and facts["stopped"] == "cap"
    asked.clear()
    scores, facts = extend_l2_grid(score, grid, factor=2.0, most=0)
    assert asked == [] and scores == grid and facts["best"] == 4.0 and facts["stopped"] == "off"


def test_a_tie_is_no_gain_and_keeps_the_grid_value():
    _, facts = extend_l2_grid(lambda v: 0.5, {1.0: 0.2, 2.0: 0.5}, factor=4.0, most=4)
    assert facts["added"] == [8.0] and facts["best"] == 2.0 and facts["stopped"] == "no_gain"
    _, facts = extend_l2_grid(lambda v: 0.0, {1.0: float("nan"), 2.0: float("nan")}, factor=4.0, most=4)
    assert facts["added"] == [] and facts["stopped"] == "no_score"


def _fit_cfg(scales: list[float], **ease) -> OmegaConf:
    node = {"l2": None, "l2_scales": scales, "short_grid_above_items": 8000, "dropout": 0, "max_bundle_mb": 256,
            "l2_extend_factor": 4, "l2_extend_max": 4, **ease}
    return OmegaConf.create({"seed": 0, "trainer": {"accelerator": "cpu"},
                             "model": {"selection_metric": "ndcg@20", "ease": node}})


def _scored_by_l2(monkeypatch, target: float) -> list[float]:
    """Validation that scores each l2 the solver was asked for by its distance to ``target``: the
    search, not the data, decides which l2 wins. Returns the l2s validated, in order."""
    validated = []
    solver_scores = ease_lib.EASESolver.scores

    def scores(self, users, l2, dropout=0.0):
        validated.append(l2)
        return solver_scores(self, users, l2, dropout)

    def evaluate(fn, dataset, n_items, ks, **kwargs):
        fn({"user": torch.arange(3)})
        return {"ease": {"ndcg@20": 1.0 - abs(math.log(validated[-1] / target))}}

    monkeypatch.setattr(ease_lib.EASESolver, "scores", scores)
    monkeypatch.setattr(selection, "evaluate_scorers", evaluate)
    return validated


@pytest.mark.parametrize("n_users", [200, 20])  # the primal form (a Cholesky each) and the dual (one eigendecomposition)
def test_the_candidate_is_fitted_at_an_l2_found_past_the_grid(monkeypatch, n_users):
    rng = np.random.default_rng(1)
    x = sp.csr_matrix((rng.random((n_users, 60)) < 0.2).astype(np.float32))
    mean = x.sum() / 60  # l2_grid's unit: the mean item frequency
    validated = _scored_by_l2(monkeypatch, target=128 * mean)
    shallow, facts, _ = fit_ease(_fit_cfg([2, 4, 8, 16, 32]), SimpleNamespace(n_items=60), x, val_users=[0])
    assert facts["l2"] == pytest.approx(128 * mean) and facts["l2_search"]["stopped"] == "no_gain"
    assert validated == pytest.approx([s * mean for s in (2, 4, 8, 16, 32, 128, 512)])
    assert sorted(float(v) for v in facts["l2_grid"]) == pytest.approx(validated, rel=1e-5)
    expected = ease_lib.ease_weights(x, facts["l2"]).numpy()  # the served weights are EASE's at that l2
    served = shallow(sp.identity(60, format="csr", dtype=np.float32)).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-3, atol=1e-4)


def test_an_interior_best_validates_the_grid_alone(monkeypatch):
    rng = np.random.default_rng(2)
    x = sp.csr_matrix((rng.random((150, 40)) < 0.2).astype(np.float32))
    mean = x.sum() / 40
    validated = _scored_by_l2(monkeypatch, target=9 * mean)
    _, facts, _ = fit_ease(_fit_cfg([2, 4, 8, 16, 32]), SimpleNamespace(n_items=40), x, val_users=[0])
    assert validated == pytest.approx([s * mean for s in (2, 4, 8, 16, 32)])
    assert facts["l2"] == pytest.approx(8 * mean) and facts["l2_search"]["stopped"] == "interior"


def test_metrics_record_every_l2_tried_and_why_the_search_stopped(planted_log, tmp_path):  # noqa: F811
    # a grid far below what the planted log needs: its top value wins, so the search goes up
    run(planted_cfg(planted_log, tmp_path / "run", "model=auto", "model.refit=false", "model.ease.l2_scales=[0.5,1]"))
    details = json.loads((tmp_path / "run" / "metrics.json").read_text())["model"]["candidates"]["ease"]["details"]
    search = details["l2_search"]
    assert search["extended"] == "up" and search["stopped"] in ("no_gain", "cap") and search["added"]
    assert search["added"][0] == pytest.approx(4 * search["grid"][-1])
    tried = sorted([*search["grid"], *search["added"]])
    assert sorted(float(v) for v in details["l2_grid"]) == pytest.approx(tried, rel=1e-5)  # every l2 tried, scored
    assert details["l2"] == search["best"] > search["grid"][-1]
    assert details["l2_grid"][f"{details['l2']:g}"] == max(details["l2_grid"].values())


@pytest.mark.parametrize(("override", "message"), [
    ("model.ease.l2_extend_factor=1", "model.ease.l2_extend_factor must be a finite number > 1"),
    ("model.ease.l2_extend_max=-1", "model.ease.l2_extend_max must be an integer in 0..64"),
])
def test_bad_search_settings_are_refused(tmp_path, override, message):
    from dmp_dl.pipeline.checks import check_train_config

    from .conftest import compose_cfg

    with pytest.raises(ConfigError, match=message):
        check_train_config(compose_cfg([override], tmp_path))
