"""Data-parallel training on CPU: two processes over gloo, through the real train.py; the pieces of the
default model's data-parallel fit on their own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from dmp_dl.core.errors import ConfigError
from dmp_dl.data.datamodule import EvalUsers
from dmp_dl.models.autoencoder import SPARSE_ABOVE_ITEMS, sparse_gradients_for
from dmp_dl.pipeline.run import run
from dmp_dl.training.data_parallel import (
    ONE_PROCESS,
    Processes,
    RankShareSampler,
    check_processes,
    per_process_batch,
    processes_of,
    rank_share,
    sharded_user_loader,
    validation_share,
)

from .conftest import TINY_DATA, compose_cfg

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


# the default model (model=auto) as a user runs it on the tiny log; the stages after the model that
# read only its vectors are off to keep the test short
DEFAULT_MODEL = [sys.executable, "train.py", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                 "propensity.enabled=false", "audience.enabled=false", "evaluation.report=null", "logger=none", *TINY_DATA]
# The 1- and 2-process runs draw different dropout masks and user orders, as two seeds of one process
# do: on this log (data.source.seed=42), seed=1, 2, 3, 42 of one process gave test NDCG@20 0.418, 0.440,
# 0.427, 0.434 (standard deviation 0.009; each number's standard error over the ~190 test users: 0.02).
# Both runs are deterministic; on this log blend and autoencoder are 0.003 apart on validation, and one
# of those four seeds picked the autoencoder alone, so a changed choice here is worth a look.
NDCG_TOLERANCE = 0.03


def _start(out: Path, *overrides: str) -> subprocess.Popen:
    """train.py writing to ``out``; its console output goes to ``out``.console (a pipe nobody reads
    while another run is awaited would stall it)."""
    out.mkdir(parents=True)
    with open(out.with_suffix(".console"), "w") as console:
        return subprocess.Popen([*DEFAULT_MODEL, f"paths.output_dir={out}", *overrides], cwd=ROOT, stdout=console,
                                stderr=subprocess.STDOUT)


def _metrics(proc: subprocess.Popen, out: Path) -> dict:
    assert proc.wait(timeout=600) == 0, out.with_suffix(".console").read_text()[-3000:]
    return json.loads((out / "metrics.json").read_text())


def _train(out: Path, *overrides: str) -> dict:
    return _metrics(_start(out, *overrides), out)


@pytest.mark.slow
def test_the_default_model_trains_data_parallel_and_chooses_as_one_process(tmp_path):
    out = tmp_path / "ddp"
    single = _start(tmp_path / "one", "trainer.devices=1")  # at the same time: the test takes one run's time, not two
    two = _train(out, "trainer=ddp", "trainer.devices=2")
    one = _metrics(single, tmp_path / "one")
    vae = two["model"]["candidates"]["vae"]["details"]
    assert vae["processes"] == 2 and vae["batch_users"] == one["model"]["candidates"]["vae"]["details"]["batch_users"]
    assert vae["sparse_gradients"] is False
    assert two["model"]["selected"] == one["model"]["selected"]
    assert abs(two["ranking"]["auto"]["ndcg@20"] - one["ranking"]["auto"]["ndcg@20"]) <= NDCG_TOLERANCE
    # the refit on every event ran data-parallel too, for the epochs the held-out fit chose
    assert two["train"]["refit"]["done"] and two["train"]["refit"]["processes"] == 2
    assert two["model"]["refit_facts"]["vae_epochs_run"] == vae["epochs"]
    assert (out / "artifacts" / "manifest.json").exists()
    main_log, rank_log = (out / "train.log").read_text(), (out / "train_ddp_process_1.log").read_text()
    assert "data-parallel over 2 processes" in main_log and main_log.count("bundle written") == 1
    # process 1 trained its share, then left the rest of the job to process 0
    assert "part of the data-parallel fits is done" in rank_log and "bundle written" not in rank_log


@pytest.mark.slow
def test_sparse_gradients_turn_dense_under_data_parallel_training(tmp_path):
    out = tmp_path / "ddp"
    metrics = _train(out, "trainer=ddp", "trainer.devices=2", "model.vae.net.sparse_gradients=true", "trainer.max_epochs=2",
                     "model.refit=false", "model.candidates=[vae]")
    assert metrics["model"]["candidates"]["vae"]["details"]["sparse_gradients"] is False
    assert metrics["train"]["refit"] == {"done": False, "reason": "model.refit=false", "processes": 2}
    assert "dense gradients for the encoder's item rows (sparse_gradients=true" in (out / "train.log").read_text()


# -- the pieces of the default model's data-parallel fit (dmp_dl.training.data_parallel) ----------------
@pytest.mark.parametrize("n, count", [(10, 2), (11, 2), (7, 3), (5, 5), (1000, 8)])
def test_each_process_trains_on_its_own_share_of_the_users(n, count):
    shares = [rank_share(n, Processes(count, rank), epoch=3, seed=42) for rank in range(count)]
    assert len({len(s) for s in shares}) == 1  # the same steps in every process, or DDP waits forever
    assert len(shares[0]) == -(-n // count)
    together = np.concatenate(shares)
    assert set(together.tolist()) == set(range(n))  # every user trained in every epoch
    assert len(together) - n == (-n) % count  # apart from the padding to equal shares, no user twice
    # step k of all processes together is the k-th run of one permutation, as one process would step
    steps = np.stack(shares, axis=1).reshape(-1)[:n]
    assert sorted(steps.tolist()) == list(range(n))


def test_the_shares_are_drawn_anew_each_epoch_and_alike_in_every_process():
    first = rank_share(100, Processes(2, 0), epoch=0, seed=1)
    assert np.array_equal(first, rank_share(100, Processes(2, 0), epoch=0, seed=1))  # every process draws the same
    assert not np.array_equal(first, rank_share(100, Processes(2, 0), epoch=1, seed=1))
    sampler = RankShareSampler(100, Processes(2, 1), seed=1)
    sampler.set_epoch(1)  # Lightning calls it before each epoch
    assert list(sampler) == rank_share(100, Processes(2, 1), epoch=1, seed=1).tolist() and len(sampler) == 50


def test_a_step_of_every_process_together_is_a_step_of_one_process():
    assert per_process_batch(64, Processes(2, 0)) == 32
    assert per_process_batch(64, Processes(3, 0)) == 22  # rounded up: never fewer users a step than one process
    assert per_process_batch(64, ONE_PROCESS) == 64
    rows = sp.csr_matrix(np.eye(9, 4, dtype=np.float32))  # users 0..3 have a row, 4..8 none
    loader = sharded_user_loader(rows, 1, Processes(2, 1), seed=0)
    users = sorted(int(b["user"][0]) for b in loader)
    assert len(users) == 2 and set(users) <= {0, 1, 2, 3}


def test_more_processes_than_users_is_one_line_and_fewer_users_than_a_step_a_warning():
    with pytest.raises(ConfigError, match=r"trainer.devices: 8 processes but the autoencoder trains on 5 users.*trainer.devices=5"):
        check_processes(5, 32, Processes(8, 0))
    assert "every epoch is one step" in check_processes(50, 32, Processes(2, 0))
    assert check_processes(400, 32, Processes(2, 0)) is None


def test_each_process_scores_its_share_of_the_validation_users():
    dataset = EvalUsers(np.arange(7), np.zeros((7, 1), dtype=np.int64), sp.csr_matrix((7, 3)), sp.csr_matrix((7, 3)))
    shares = [validation_share(dataset, Processes(2, r)).users.tolist() for r in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(7)) and not set(shares[0]) & set(shares[1])
    assert validation_share(dataset, Processes(8, 3)).users.tolist() == list(range(7))  # fewer users than processes: all
    assert validation_share(dataset, ONE_PROCESS) is dataset


@pytest.mark.parametrize("setting, n_items, processes, sparse", [
    (None, 20_000, 1, True), (None, 20_000, 2, False), (True, 100, 1, True), (True, 100, 2, False),
    (None, 100, 2, False), (False, 20_000, 1, False),
])
def test_data_parallel_training_uses_dense_gradients(setting, n_items, processes, sparse):
    got, why = sparse_gradients_for(setting, n_items, processes)
    assert got is sparse
    # said once in the log exactly when the sparse form was wanted and DDP rules it out
    wanted = n_items > SPARSE_ABOVE_ITEMS if setting is None else setting
    assert (why is not None) == (wanted and processes > 1)
    if why:
        assert "dense gradients" in why and f"{processes} processes" in why


def test_trainer_ddp_asks_for_the_processes_and_other_strategies_keep_one(tmp_path):
    ddp = compose_cfg(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], tmp_path)
    assert processes_of(ddp) == Processes(2, 0)  # the launching process is rank 0
    assert processes_of(compose_cfg(["trainer.accelerator=cpu", "trainer.devices=2"], tmp_path)) == ONE_PROCESS
    spawn = compose_cfg(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn"], tmp_path)
    with pytest.raises(ConfigError, match="trainer.strategy=ddp_spawn"):
        processes_of(spawn)


def test_more_processes_than_users_stops_before_training(tiny_cfg):
    cfg = tiny_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=500", "propensity.enabled=false")
    with pytest.raises(ConfigError, match="500 processes but the autoencoder trains on"):
        run(cfg)
