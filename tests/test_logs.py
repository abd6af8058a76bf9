"""Logs a person can read: a line per epoch, no third-party noise, each error printed once."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from dmp_dl.core.logs import quiet_third_party
from dmp_dl.training.progress import EpochLog

from .conftest import TINY_DATA

REPO = Path(__file__).resolve().parents[1]
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) \| train/loss [\d.]+ \| .*val/\S+ [\d.]+.* \| [\d,]+ examples/s \| elapsed \d+")
TRACEBACK_LIKE = re.compile(r"Traceback|^\s+File \"|Error\(|Exception\b|swigfaiss|Warning|deprecated|site-packages|💡|GPU available|TPU available")


class Tiny(pl.LightningModule):
    """Any LightningModule that logs ``train/loss`` and ``val/*``: a linear regression."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/mse", torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_epoch_log_writes_one_line_per_epoch_for_any_module(caplog):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1)), batch_size=16)
    trainer = pl.Trainer(max_epochs=3, callbacks=[EpochLog()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with caplog.at_level(logging.INFO, logger="dmp_dl.training"):
        trainer.fit(Tiny(), data, data)
    lines = [r.getMessage() for r in caplog.records if r.name == "dmp_dl.training"]
    assert lines[0].startswith("training Tiny on cpu: 4 batches per epoch, at most 3 epochs")
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    for line in epochs:
        fields = line.split(" | ")
        assert fields[1].startswith("train/loss ") and fields[2].startswith("val/mse ")
        assert re.fullmatch(r"[\d,]+ examples/s", fields[3]) and fields[4].startswith("elapsed ")
    assert epochs[0].split(" | ")[-1].startswith("left ~") and "left" not in epochs[-1]
    losses = [float(line.split(" | ")[1].split()[1]) for line in epochs]
    assert losses[-1] < losses[0]  # the epoch mean, which falls as the regression is learnt


def test_noise_filters_drop_only_the_noise(caplog):
    quiet_third_party()
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        rank_zero.info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        rank_zero.info("GPU available: False, used: False")
        rank_zero.info("`Trainer.fit` stopped: `max_epochs=3` reached.")
        logging.getLogger("faiss.loader").info("Could not load library with AVX512 support due to: ModuleNotFoundError(...)")
        logging.getLogger("faiss.loader").error("Could not load the faiss library at all")
    assert [r.getMessage() for r in caplog.records] == ["`Trainer.fit` stopped: `max_epochs=3` reached.",
                                                       "Could not load the faiss library at all"]


def test_a_run_on_a_pipe_is_short_readable_and_logs_every_epoch(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "train.py", *TINY_DATA, "model.vae.max_epochs=3", "trainer.accelerator=cpu",
                           "propensity.trainer.max_epochs=2", f"paths.output_dir={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    stdout = done.stdout.splitlines()
    assert len(stdout) < 100, "\n".join(stdout)
    assert "\r" not in done.stdout  # no progress bar on a pipe
    noisy = [line for line in stdout + done.stderr.splitlines() if TRACEBACK_LIKE.search(line)]
    assert not noisy, noisy
    assert sum("events in," in line for line in stdout) == 1  # the data summary, once
    log = (out / "train.log").read_text().splitlines()
    epochs = [m for m in (EPOCH_LINE.search(line) for line in log) if m]
    assert [(m.group(1), m.group(2)) for m in epochs][:2] == [("1", "3"), ("2", "3")]
    assert 1 <= len(epochs) <= 6  # the choice's fit and the final fit; early stopping may end the first sooner


def test_an_error_is_printed_once_and_recorded_in_train_log(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "train.py", *TINY_DATA, "data.split.method=by_moon_phase",
                           f"paths.output_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    both = (done.stdout + done.stderr).splitlines()
    errors = [line for line in both if "by_moon_phase" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and errors[0] in done.stderr
    assert sum("by_moon_phase" in line for line in (out / "train.log").read_text().splitlines()) == 1


def test_hints_point_to_the_config_key_that_fixes_it(tmp_path, caplog):
    import pandas as pd
    import pytest

    from dmp_dl.core.errors import DataError
    from dmp_dl.data.cleaning import CleaningOptions, clean_events
    from dmp_dl.data.files import read_table

    raw = pd.DataFrame({"user_id": ["a", "b", "c", "d"], "item_id": ["x", "y", "x", "y"], "timestamp": [1e9] * 4,
                        "event_type": ["view", "signup", "signup", "purchase"]})
    with caplog.at_level(logging.WARNING):
        events, report = clean_events(raw, CleaningOptions(event_weights={"view": 1.0, "purchase": 5.0}))
    assert report.dropped == {"unknown_event_type": 2} and len(events) == 2
    hints = [r.getMessage() for r in caplog.records if "unknown_event_type" in r.getMessage()]
    assert len(hints) == 1 and "'signup' (2)" in hints[0] and "data.cleaning.event_weights.signup=1.0" in hints[0]

    path = tmp_path / "events.csv"
    path.write_text("customer,item_id,timestamp\nc1,i1,1700000000\n")
    with pytest.raises(DataError, match=r"lacks required column 'user_id' .*data\.source\.columns=\{user_id: YOUR_COLUMN\}"):
        read_table(path, what="events", key="data.path", required=("user_id", "item_id", "timestamp"))
