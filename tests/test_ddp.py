"""Data-parallel training on CPU: two processes over gloo, through the real train.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TINY_DATA

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "train.py", "model=two_tower", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "propensity.enabled=false",
        f"paths.output_dir={out}", *TINY_DATA,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["epochs"] == 2
    # each process saw half of the data per epoch: the logged validation metric exists and is sane
    assert 0.0 < metrics["train"]["val"]["val/recall@20"] <= 1.0
    assert (out / "train_ddp_process_1.log").exists()
    assert (out / "checkpoints" / "last.ckpt").exists()
