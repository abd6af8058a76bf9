"""Crash safety: a training run killed with SIGKILL resumes from its last checkpoint, and an export
that dies half-way leaves the previous bundle whole; damaged files are refused naming the file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import dmp_dl.store.bundle as bundle_module
from dmp_dl import Recommender
from dmp_dl.core.errors import BundleError, ConfigError
from dmp_dl.data.vocab import IdVocab
from dmp_dl.index.ann import IndexOptions
from dmp_dl.store.bundle import MANIFEST, BundleWriter
from dmp_dl.training.export import export_bundle
from dmp_dl.training.fit import AtomicCheckpointIO, checkpoint_position, resolve_ckpt_path

from .conftest import TINY_DATA

ROOT = Path(__file__).resolve().parents[1]

# -- training: SIGKILL mid-epoch, then ckpt_path=last -----------------------------------------

TRAIN = [
    "model=two_tower",  # resuming from last.ckpt is the two-tower and MF training loop's
    *[o for o in TINY_DATA if not o.startswith("data.batch_size")], "data.batch_size=256",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
    "trainer.devices=1", "trainer.log_every_n_steps=1", "callbacks.early_stopping.patience=100",
    "propensity.enabled=false", "audience.enabled=false", "evaluation.report=null", "export=false",
    # refresh last.ckpt every 6 steps (an epoch has ~38), not every 10 minutes
    "callbacks.mid_epoch_checkpoint.train_time_interval=null", "callbacks.mid_epoch_checkpoint.every_n_train_steps=6",
]


def train_cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", *TRAIN, f"paths.output_dir={out}", *overrides]


def kill_after_first_checkpoint(out: Path, *overrides: str, timeout: float = 300) -> dict:
    """Start train.py, SIGKILL it as soon as ``last.ckpt`` exists; returns that checkpoint's position."""
    last = out / "checkpoints" / "last.ckpt"
    log = open(out.parent / f"{out.name}-killed.log", "w")
    proc = subprocess.Popen(train_cmd(out, *overrides), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not last.exists():
            assert proc.poll() is None, f"train.py ended before its first checkpoint: {Path(log.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within the timeout"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    return checkpoint_position(last)


def run_to_end(out: Path, *overrides: str) -> dict:
    proc = subprocess.run(train_cmd(out, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def logged_steps(out: Path, version: int) -> pd.Series:
    """The global steps of the training curve a run (version N of the CSV logger) logged."""
    frame = pd.read_csv(out / "logs" / f"version_{version}" / "metrics.csv")
    return frame.loc[frame["train/loss_step"].notna(), "step"]


def assert_resumed(out: Path, killed: dict, epochs: int) -> None:
    """The second run started at the killed run's checkpoint and trained exactly the remaining steps."""
    assert killed["epochs_completed"] == 0 and killed["batches_into_epoch"] > 0, f"not killed mid-epoch: {killed}"
    log = (out / "train.log").read_text()
    assert (f"resuming from {out / 'checkpoints' / 'last.ckpt'}: 0 epochs completed, global step {killed['global_step']}, "
            f"{killed['batches_into_epoch']} batches into the next epoch") in log
    before, after = logged_steps(out, 0), logged_steps(out, 1)
    assert before.min() == 0  # the first run started from scratch ...
    assert after.min() == killed["global_step"]  # ... the second where the checkpoint was, not at 0
    end = checkpoint_position(out / "checkpoints" / "last.ckpt")
    per_epoch = checkpoint_position(next((out / "checkpoints").glob("epoch_*.ckpt")))
    steps_per_epoch = per_epoch["global_step"] // per_epoch["epochs_completed"]
    assert end["epochs_completed"] == epochs and end["batches_into_epoch"] == 0
    # the unfinished epoch was completed, not restarted: the same number of steps as an uninterrupted run
    assert end["global_step"] == epochs * steps_per_epoch
    assert after.max() == end["global_step"] - 1


def test_sigkilled_training_resumes_mid_epoch(tmp_path):
    out = tmp_path / "run"
    killed = kill_after_first_checkpoint(out, "trainer.max_epochs=1")
    metrics = run_to_end(out, "trainer.max_epochs=1", "ckpt_path=last")
    assert_resumed(out, killed, epochs=1)
    assert metrics["train"]["epochs"] == 1
    ranking = metrics["ranking"]
    assert ranking["two_tower"]["recall@20"] > 1.3 * ranking["popularity"]["recall@20"], ranking


@pytest.mark.slow
def test_resumed_training_reaches_the_quality_of_an_uninterrupted_run(tmp_path):
    epochs = "trainer.max_epochs=6"
    reference = run_to_end(tmp_path / "straight", epochs)["ranking"]
    out = tmp_path / "run"
    killed = kill_after_first_checkpoint(out, epochs)
    resumed = run_to_end(out, epochs, "ckpt_path=last")["ranking"]
    if os.environ.get("DMP_RESUME_REPORT"):  # bench/reliability.py records these figures
        Path(os.environ["DMP_RESUME_REPORT"]).write_text(json.dumps(
            {"killed_at": killed, "end": checkpoint_position(out / "checkpoints" / "last.ckpt"),
             "uninterrupted": reference, "resumed": resumed}, indent=1))
    assert_resumed(out, killed, epochs=6)
    ours, theirs = resumed["two_tower"], reference["two_tower"]
    for metric in ("recall@20", "ndcg@20"):
        assert abs(ours[metric] - theirs[metric]) <= 0.05, (metric, ours[metric], theirs[metric])
    assert ours["recall@20"] > 1.5 * resumed["popularity"]["recall@20"]


def test_resume_without_a_checkpoint_starts_fresh_and_a_broken_one_is_refused(tmp_path):
    out = tmp_path / "run"
    assert resolve_ckpt_path("last", out) is None  # a nightly job can always pass ckpt_path=last
    last = out / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(ConfigError, match=rf"{last}.*truncated or corrupt"):
        resolve_ckpt_path("last", out)
    with pytest.raises(ConfigError, match="checkpoint not found: /nowhere.ckpt"):
        resolve_ckpt_path("/nowhere.ckpt", out)


class NotATensor:
    """Stands for any object a checkpoint could smuggle in (pickle would run its code)."""


def test_resume_never_unpickles_objects(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 1, "payload": NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError, match="NotATensor"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(ConfigError, match=rf"{path} is not a training checkpoint"):
        resolve_ckpt_path(str(path), tmp_path)


def test_a_checkpoint_write_that_fails_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    before = path.read_bytes()

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "blob": "x" * 100_000}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file left behind"


# -- export: a failure half-way leaves the previous bundle ------------------------------------


def export_small(target: Path, seed: int, n_items: int = 60) -> Path:
    """A small real bundle (exact indexes, no network) whose item count tells versions apart."""
    rng = np.random.default_rng(seed)
    n_users, dim = 40, 8
    users = rng.standard_normal((n_users, dim)).astype(np.float32)
    items = rng.standard_normal((n_items, dim)).astype(np.float32)
    seen = sp.random(n_users, n_items, density=0.1, format="csr", random_state=seed)
    seen.data[:] = 1
    return export_bundle(
        target, user_vocab=IdVocab([f"u{i:03d}" for i in range(n_users)], "user"),
        item_vocab=IdVocab([f"i{i:03d}" for i in range(n_items)], "item"), user_vectors=users, item_vectors=items,
        seen=seen, item_popularity=np.asarray(seen.sum(0)).ravel(),
        index_options=IndexOptions(factory="Flat", eval_queries=10))


def assert_intact(target: Path, manifest_before: str, n_items: int) -> None:
    assert (target / MANIFEST).read_text() == manifest_before
    rec = Recommender.load(target)  # every checksum verified
    assert rec.n_items == n_items and len(rec.recommend("u001", k=5)) == 5
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name], "no temporary folders left behind"


@pytest.fixture
def published(tmp_path) -> tuple[Path, str]:
    target = export_small(tmp_path / "artifacts", seed=1)
    return target, (target / MANIFEST).read_text()


def test_export_failing_half_way_keeps_the_previous_bundle(published, monkeypatch):
    target, manifest = published
    real_save_index, calls = BundleWriter.save_index, []

    def save_index_then_fail(self, name, index):
        calls.append(name)
        if len(calls) == 2:  # the user index: vectors, vocabularies and the item index are written
            raise OSError(28, "No space left on device")
        return real_save_index(self, name, index)

    monkeypatch.setattr(BundleWriter, "save_index", save_index_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_small(target, seed=2, n_items=70)
    assert_intact(target, manifest, n_items=60)


def test_export_failing_while_publishing_keeps_the_previous_bundle(published, monkeypatch):
    """Where the atomic exchange is not available the old bundle is moved aside first; if moving the
    new one into place then fails, the old one is put back."""
    target, manifest = published
    monkeypatch.setattr(bundle_module, "_exchange", lambda a, b: False)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # new bundle -> target
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(bundle_module.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        export_small(target, seed=2, n_items=70)
    monkeypatch.undo()
    assert_intact(target, manifest, n_items=60)
    export_small(target, seed=2, n_items=70)  # and the next export goes through
    assert Recommender.load(target).n_items == 70


def test_export_killed_half_way_keeps_the_previous_bundle(published):
    """SIGKILL in the middle of writing the files: no exception handler runs, nothing is cleaned up."""
    target, manifest = published
    script = (
        "import os, signal\n"
        "from dmp_dl.store.bundle import BundleWriter\n"
        "from tests.test_crash_safety import export_small\n"
        "real = BundleWriter.save_index\n"
        "def die(self, name, index):\n"
        "    real(self, name, index)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "BundleWriter.save_index = die\n"
        f"export_small({str(target)!r}, seed=2, n_items=70)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p for p in target.parent.iterdir() if p != target]
    assert [p.name.startswith(".artifacts.tmp-") for p in leftovers] == [True], leftovers  # the unfinished one
    for p in leftovers:
        shutil.rmtree(p)
    assert_intact(target, manifest, n_items=60)


@pytest.mark.parametrize("damage", ["truncate", "flip", "append"])
def test_a_truncated_or_altered_file_is_refused_naming_it(published, tmp_path, damage):
    target, _ = published
    names = sorted(json.loads((target / MANIFEST).read_text())["files"])
    assert {"item_vectors.npy", "users.json", "item_index.faiss"} <= set(names)
    for name in names:
        copy = Path(shutil.copytree(target, tmp_path / f"copy-{damage}-{name.replace('/', '_')}"))
        path = copy / name
        data = path.read_bytes()
        if damage == "truncate":
            data = data[: len(data) // 2]
        elif damage == "flip":
            data = data[:-1] + bytes([data[-1] ^ 0x01])
        else:
            data = data + b"\n"
        path.write_bytes(data)
        with pytest.raises(BundleError) as info:
            Recommender.load(copy)
        assert str(path) in str(info.value) and "checksum mismatch" in str(info.value), str(info.value)


def test_a_truncated_manifest_is_refused_naming_it(published, tmp_path):
    target, _ = published
    copy = Path(shutil.copytree(target, tmp_path / "copy"))
    text = (copy / MANIFEST).read_text()
    (copy / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match=rf"{copy / MANIFEST}: unreadable"):
        Recommender.load(copy)
