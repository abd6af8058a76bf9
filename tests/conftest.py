"""Shared fixtures: the real Hydra config, shrunk to a tiny synthetic problem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from dmp_dl import Recommender
from dmp_dl.core.open_settings import register as register_open_settings
from dmp_dl.pipeline.run import run

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
register_open_settings()  # the configs of conf/ list these, as every command registers them on import (dmp_dl/core/cli.py)
ML100K = Path(os.environ.get("DMP_ML100K", Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"))



@pytest.fixture(autouse=True, scope="session")
def nothing_erased_into_the_working_folder():
    """A run's default erasure list and audit log live in ``privacy_data/`` under the folder it starts
    in, and every later run started there applies that list: a test that erases into it would drop
    users from the tests after it. Tests give their own files; this fails the session if one did not."""
    folders = {Path.cwd() / "privacy_data", Path(CONF_DIR).parent / "privacy_data"}
    before = {f for f in folders if f.exists()}
    yield
    created = sorted(str(f) for f in folders - before if f.exists())
    assert not created, f"a test wrote the default erasure list or audit log into {created}: give it privacy.erasure_list= and privacy.audit_log= under tmp_path"


# A small but learnable synthetic problem: trains in seconds on 2 CPU cores.
TINY_DATA = [
    "data.source.n_users=400",
    "data.source.n_items=150",
    "data.source.n_events=12000",
    "data.source.n_categories=8",
    "data.source.n_segments=4",
    "data.batch_size=512",
]
QUIET_TRAINER = [
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "++model.vae.max_epochs=4",  # the default model's autoencoder: a few epochs on tiny data (ignored by two_tower/mf)
]
# The default model without its sequence candidate, so the autoencoder (blended with EASE) is served:
# the bundle, API and real-time tests read what it adds (user attributes, re-encoded rows). On the
# tiny log the sequence model wins or loses by the draw of its dropout masks; its bundles have their
# own tests (test_sasrec.py, test_sequence_candidate.py). Ignored by two_tower/mf.
AUTOENCODER_SERVED = ["++model.candidates=[vae,ease]"]


def compose_cfg(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """The project's real config with ``overrides``, writing under ``output_dir``."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: tiny synthetic train config with extra overrides."""

    def make(*overrides: str) -> DictConfig:
        return compose_cfg([*TINY_DATA, *QUIET_TRAINER, *overrides], tmp_path / "run")

    return make


@pytest.fixture
def ml100k_path():
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {ML100K}")
    return ML100K


_TRAINED: dict[tuple, dict] = {}


def without_propensity(cfg):
    """Switch the propensity step off where the config has one (bundles here test the rest)."""
    if "propensity" in cfg and "enabled" in (cfg.propensity or {}):
        with open_dict(cfg):
            cfg.propensity.enabled = False
    return cfg


def trained_run(tmp_path_factory, *overrides: str) -> dict:
    """One tiny trained run per set of overrides, shared by every test module of the session.

    Returns pipeline.run's result (``bundle_dir``, ``datamodule``, ``module``, ...).
    """
    if overrides not in _TRAINED:
        out = tmp_path_factory.mktemp("trained") / "run"
        # its own erasure list and audit log: servers of this bundle (the API fuzzer's /erase) write there
        privacy = [f"privacy.erasure_list={out.parent / 'erased_users.txt'}", f"privacy.audit_log={out.parent / 'audit.jsonl'}"]
        cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, *AUTOENCODER_SERVED, "trainer.max_epochs=3", "logger=none", *privacy,
                           *overrides], out)
        _TRAINED[overrides] = run(without_propensity(cfg))
    return _TRAINED[overrides]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The tiny trained run every bundle, API and server test reads (see :func:`trained_run`)."""
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="session")
def rec(trained) -> Recommender:
    """The trained run's bundle, loaded once for the session (tests must not change it)."""
    return Recommender.load(trained["bundle_dir"])
