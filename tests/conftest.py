"""Shared fixtures: the real Hydra config, shrunk to a tiny synthetic problem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ML100K = Path(os.environ.get("DMP_ML100K", Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"))

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
]


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
