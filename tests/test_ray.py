"""``trainer=ray``: the model stage's network fits as Ray Train jobs. Fast: the settings, the checks
and the checkpoint state. Slow: a local cluster of two Ray nodes (two ``ray start`` processes on
127.0.0.1) runs ``train.py`` on the ML-1M subset with the choice and test metrics of one process, a
run whose worker is killed mid-fit still writes its bundle, and ``model=two_tower`` trains on two
workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from dmp_dl.core.errors import ConfigError
from dmp_dl.pipeline.checks import check_train_config
from dmp_dl.training.fit import KeepBest, instantiate_trainer

from .conftest import ML100K, TINY_DATA, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
ML1M = ML100K.parent / "ml-1m-users-1-2999"
ray = pytest.importorskip("ray", reason="trainer=ray needs Ray Train: pip install -e '.[ray]'")


def test_trainer_ray_builds_a_plain_lightning_trainer_in_this_process():
    cfg = compose_cfg(["trainer=ray"], Path("unused"))
    assert cfg.trainer.strategy == "ray" and cfg.trainer.num_workers == 2
    trainer = instantiate_trainer(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.world_size == 1  # Ray's settings are Ray Train's: the driver's own Trainer is one process


def test_the_networks_trained_in_this_process_under_trainer_ray_get_a_lightning_trainer(tiny_cfg):
    """Under trainer=ray the sequence candidate trains in the driver; its refit is a plain Lightning fit."""
    from hydra.utils import instantiate

    from dmp_dl.training.fit import refit_embedding_model

    cfg = tiny_cfg("trainer=ray", "model=two_tower", "logger=none")
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare()
    module, facts = refit_embedding_model(cfg, dm, 1)
    assert facts["epochs"] == 1 and module.trainer.world_size == 1 and module.trainer.current_epoch == 1


@pytest.mark.parametrize("override, key", [("trainer.num_workers=0", "trainer.num_workers"),
                                           ("trainer.num_workers=two", "trainer.num_workers"),
                                           ("trainer.use_gpu=maybe", "trainer.use_gpu"),
                                           ("trainer.max_failures=-1", "trainer.max_failures")])
def test_a_bad_ray_setting_is_one_line_naming_the_key(override, key):
    from dmp_dl.training.ray_fit import RaySettings

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RaySettings.of(compose_cfg(["trainer=ray", override], Path("unused")))


def test_use_gpu_true_on_a_cluster_without_gpus_is_one_line():
    from dmp_dl.training.ray_fit import RaySettings

    settings = RaySettings.of(compose_cfg(["trainer=ray", "trainer.use_gpu=true"], Path("unused")))
    with pytest.raises(ConfigError, match="trainer.use_gpu=true: the Ray cluster has 0 GPUs for 2 workers"):
        settings.gpus({"CPU": 8.0})
    assert RaySettings.of(compose_cfg(["trainer=ray"], Path("unused"))).gpus({"CPU": 8.0, "GPU": 2.0}) is True  # auto


def test_dp_on_ray_is_refused_before_reading_data(tmp_path):
    with pytest.raises(ConfigError, match="drop trainer=ray"):
        check_train_config(compose_cfg(["trainer=ray", "privacy.dp.enabled=true"], tmp_path))


@pytest.mark.parametrize("model", ["auto", "two_tower", "mf", "sasrec"])
def test_every_model_with_a_network_passes_the_checks_on_ray(model, tmp_path):
    check_train_config(compose_cfg(["trainer=ray", f"model={model}"], tmp_path))


def test_the_best_epoch_is_part_of_a_checkpoint():
    """A worker group restarted from a checkpoint resumes the search for the best epoch."""
    keep = KeepBest("val/ndcg@20")
    keep.best, keep.best_epoch, keep.state = 0.25, 3, {"w": torch.ones(2)}
    again = KeepBest("val/ndcg@20")
    again.load_state_dict(keep.state_dict())
    assert (again.best, again.best_epoch) == (0.25, 3) and torch.equal(again.state["w"], torch.ones(2))


def test_an_unreachable_cluster_is_one_line(monkeypatch):
    from dmp_dl.training import ray_fit

    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def refuse(*args, **kwargs):
        raise ConnectionError("no cluster at 127.0.0.1:1")

    monkeypatch.setattr(ray, "init", refuse)
    settings = ray_fit.RaySettings.of(compose_cfg(["trainer=ray", "trainer.address=127.0.0.1:1"], Path("unused")))
    with pytest.raises(ConfigError, match=r"trainer\.address=127\.0\.0\.1:1: cannot join a Ray cluster"):
        ray_fit.connect(settings)


def test_a_cluster_over_several_machines_needs_a_shared_storage_path(tmp_path):
    from dmp_dl.training.ray_fit import RaySettings, checkpoint_storage

    cfg = compose_cfg(["trainer=ray"], tmp_path)
    settings = RaySettings.of(cfg)
    one_machine = [{"NodeManagerAddress": "10.0.0.5", "Alive": True}, {"NodeManagerAddress": "10.0.0.5", "Alive": True},
                   {"NodeManagerAddress": "10.0.0.9", "Alive": False}]
    assert checkpoint_storage(settings, cfg, one_machine) == str((tmp_path / "ray").resolve())
    two_machines = [{"NodeManagerAddress": "10.0.0.5", "Alive": True}, {"NodeManagerAddress": "10.0.0.6", "Alive": True}]
    with pytest.raises(ConfigError, match=r"trainer\.storage_path: the Ray cluster spans 2 machines"):
        checkpoint_storage(settings, cfg, two_machines)
    shared = RaySettings.of(compose_cfg(["trainer=ray", "trainer.storage_path=/mnt/shared/ray"], tmp_path))
    assert checkpoint_storage(shared, cfg, two_machines) == "/mnt/shared/ray"


# -- a local cluster of two nodes ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head and one more node, one CPU each, on 127.0.0.1 in their own temporary folder (a short
    path: Ray's sockets live there); token authentication off, as on a private network. Yields
    (address, environment for train.py)."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray_bin is None:
        pytest.skip("the ray command is not installed")
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    head = [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp}",
            f"--dashboard-port={_free_port()}", "--disable-usage-stats"]
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=180)
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([ray_bin, "start", f"--address={address}", "--num-cpus=1", "--disable-usage-stats"], env=env,
                       check=True, capture_output=True, timeout=180)
        yield address, env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=180)
        shutil.rmtree(temp, ignore_errors=True)


MODEL_STAGE = ["trainer.enable_progress_bar=false", "propensity.enabled=false", "audience.enabled=false",
               "evaluation.report=null", "logger=none"]


def _train(out: Path, env: dict, *overrides: str) -> subprocess.Popen:
    out.mkdir(parents=True)
    with open(out.with_suffix(".console"), "w") as console:
        return subprocess.Popen([sys.executable, "train.py", *MODEL_STAGE, f"paths.output_dir={out}", *overrides],
                                cwd=ROOT, env=env, stdout=console, stderr=subprocess.STDOUT)


def _metrics(proc: subprocess.Popen, out: Path) -> dict:
    assert proc.wait(timeout=900) == 0, out.with_suffix(".console").read_text()[-4000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_two_ray_nodes_make_the_choice_of_one_process(cluster, tmp_path):
    if not ML1M.exists():
        pytest.skip(f"{ML1M} is not here")
    address, env = cluster
    data = ["data=movielens", f"data.path={ML1M}"]
    one = _metrics(_train(tmp_path / "one", env, *data), tmp_path / "one")
    on_ray = _metrics(_train(tmp_path / "ray", env, *data, "trainer=ray", "trainer.num_workers=2",
                             f"trainer.address={address}"), tmp_path / "ray")
    assert on_ray["model"]["selected"] == one["model"]["selected"]
    details = on_ray["model"]["candidates"]["vae"]["details"]
    assert details["ray"]["workers"] == 2 and details["processes"] == 2 and not details["ray"]["resumed_from"]
    ndcg_one, ndcg_ray = one["ranking"]["auto"]["ndcg@20"], on_ray["ranking"]["auto"]["ndcg@20"]
    assert abs(ndcg_ray - ndcg_one) <= 0.02 * ndcg_one, (ndcg_one, ndcg_ray)
    assert (tmp_path / "ray" / "artifacts" / "manifest.json").exists()


def _ray_workers() -> list[int]:
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "ray::RayTrainWorker" in line]


@pytest.mark.slow
def test_a_worker_killed_mid_fit_is_restarted_and_the_run_writes_its_bundle(cluster, tmp_path):
    address, env = cluster
    out = tmp_path / "killed"
    proc = _train(out, env, *TINY_DATA, "trainer=ray", f"trainer.address={address}", "trainer.checkpoint_every_s=0")
    deadline = time.monotonic() + 300
    console = out.with_suffix(".console")
    # the third epoch's line: the first two epochs' checkpoints are reported (one that is still being
    # written when the worker dies is not Ray's yet: the fit would start again from scratch)
    while "(RayTrainWorker" not in console.read_text() or "epoch 3/" not in console.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, console.read_text()[-3000:]
        time.sleep(0.2)
    workers = _ray_workers()
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    metrics = _metrics(proc, out)
    resumed = metrics["model"]["candidates"]["vae"]["details"]["ray"]["resumed_from"]
    assert resumed and "checkpoint" in resumed
    assert (out / "artifacts" / "manifest.json").exists()
    assert "resumed from" in console.read_text()


@pytest.mark.slow
def test_eases_gram_matrix_is_the_sum_of_the_ray_workers_parts(cluster, monkeypatch):
    import numpy as np
    import scipy.sparse as sp

    from dmp_dl.models.ease import gram_matrix
    from dmp_dl.training.ray_fit import gram_on_ray

    address, env = cluster
    monkeypatch.setenv("RAY_AUTH_MODE", env["RAY_AUTH_MODE"])
    x = sp.random(503, 70, density=0.1, format="csr", random_state=np.random.default_rng(0))
    x.data[:] = 1.0
    try:
        parts = gram_on_ray(compose_cfg(["trainer=ray", f"trainer.address={address}"], Path("unused")))
        assert torch.equal(parts(x, torch.device("cpu")), gram_matrix(x))  # 0/1 products: exact in float32
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_two_tower_trains_on_two_ray_workers_and_writes_its_bundle(cluster, tmp_path):
    address, env = cluster
    out = tmp_path / "two_tower"
    metrics = _metrics(_train(out, env, *TINY_DATA, "model=two_tower", "trainer.max_epochs=2", "trainer=ray",
                              "trainer.num_workers=2", f"trainer.address={address}"), out)
    train = metrics["train"]
    assert train["ray"]["workers"] == 2 and train["processes"] == 2 and train["epochs"] == 2
    assert train["refit"] == {"done": False, "reason": "data-parallel training (2 processes)"}
    # each worker trained on half of every epoch's batches: the validation metric over both is sane
    assert 0.0 < train["val"]["val/recall@20"] <= 1.0
    assert train["best_checkpoint"] and Path(train["best_checkpoint"]).exists()
    assert 0.0 < metrics["ranking"]["two_tower"]["ndcg@20"] <= 1.0  # the held-out fit, scored on the test users
    assert (out / "artifacts" / "manifest.json").exists()
