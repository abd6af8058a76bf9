"""Bundles written by an earlier version of the package still load, answer the same and erase the same.

``tests/data/stored_bundles`` holds two tiny bundles (the default model with every optional part,
and the two-tower network) and what they answered when they were written
(``generate.py`` there says how they were made).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dmp_dl import Recommender
from dmp_dl.privacy.erasure import erase_rows
from dmp_dl.store.bundle import Bundle

STORED = Path(__file__).resolve().parent / "data" / "stored_bundles"
_spec = importlib.util.spec_from_file_location("stored_bundles_generate", STORED / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)
RECORDED = json.loads((STORED / "answers.json").read_text())


def _same(new, old, where: str = "") -> None:
    """Equal structure and ids; floats equal to float32 precision."""
    if isinstance(old, dict):
        assert isinstance(new, dict) and set(new) == set(old), f"{where}: keys {sorted(new)} != {sorted(old)}"
        for k in old:
            _same(new[k], old[k], f"{where}.{k}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), f"{where}: {new} != {old}"
        for i, (a, b) in enumerate(zip(new, old)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(old, float) and not isinstance(new, bool):
        assert np.isclose(new, old, rtol=1e-5, atol=1e-6), f"{where}: {new} != {old}"
    else:
        assert new == old, f"{where}: {new!r} != {old!r}"


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_stored_bundle_loads_and_answers_as_recorded(name):
    rec = Recommender.load(STORED / name)
    answers = generate.ask(rec)
    assert set(answers) == set(RECORDED[name]["answers"])  # the same parts answered
    _same(answers, RECORDED[name]["answers"], name)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_stored_bundle_erases_the_same_rows(name, tmp_path):
    """Erasing the same users writes byte-identical files and the same manifest as the writing version did."""
    erased = generate.erased_manifest(STORED / name, tmp_path)
    assert erased["files"] == RECORDED[name]["erased"]["files"]
    assert erased == RECORDED[name]["erased"]
    rec = Recommender.load(tmp_path / f"erased-{name}")
    assert rec.n_users == RECORDED[name]["answers"]["info"]["users"] - len(generate.ERASED_ROWS)


def test_stored_bundle_erasure_keeps_the_other_users_answers(tmp_path):
    copy = Path(shutil.copytree(STORED / "two_tower", tmp_path / "b"))
    before = Recommender.load(copy)
    gone = before.user_vocab.ids[generate.ERASED_ROWS].tolist()
    kept = before.user_vocab.ids[[0, 1, 2]].tolist()
    erase_rows(Bundle.open(copy), np.asarray(generate.ERASED_ROWS))
    after = Recommender.load(copy)
    assert not set(gone) & set(after.user_vocab.ids.tolist())
    for user in kept:
        assert after.recommend(user, k=5) == before.recommend(user, k=5)
    np.testing.assert_allclose(after.propensity(kept), before.propensity(kept))


def _targets(node, where=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_" and isinstance(v, str):
                yield where, v
            else:
                yield from _targets(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{where}[{i}]")


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_stored_config_targets_resolve(name):
    """Every class a stored bundle's training config names (some by module paths that have moved
    since, e.g. dmp_dl.index.IndexOptions) resolves, so evaluate can rebuild the run's objects."""
    from hydra.utils import get_object, instantiate
    from omegaconf import OmegaConf

    from dmp_dl.commands.evaluate import training_config
    from dmp_dl.index.ann import IndexOptions

    bundle = Bundle.open(STORED / name)
    stored = dict(bundle.manifest["config"])
    assert stored["index"]["_target_"] == "dmp_dl.index.IndexOptions"  # written before the module moved
    config = OmegaConf.to_container(training_config(bundle))
    targets = list(_targets(config))
    assert targets and len(targets) == len(list(_targets(stored)))
    for where, target in targets:
        assert get_object(target) is not None, f"{where}: {target}"
    assert isinstance(instantiate(training_config(bundle).index, _convert_="all"), IndexOptions)
