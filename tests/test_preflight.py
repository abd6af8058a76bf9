"""Settings and paths are checked before any work, and training never exports NaN.

Each command refuses a bad value with one :class:`ConfigError` line naming the key and the allowed
range before a file is read or a model trained (train.py also checks the index options against the
data's size right after loading, before training); output folders are checked writable up front;
a diverging run stops with one line and exports nothing; NaN vectors are never exported or served.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import scipy.sparse as sp
from hydra import compose, initialize_config_dir

import dmp_dl.pipeline.run as pipeline
from dmp_dl.core.errors import BundleError, ConfigError, DataError, NonFiniteError
from dmp_dl.data.vocab import IdVocab
from dmp_dl.pipeline.checks import check_serve_config, token_from
from dmp_dl.pipeline.run import run
from dmp_dl.serving.recommender import Recommender
from dmp_dl.training.export import export_bundle

from .conftest import CONF_DIR, QUIET_TRAINER, compose_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_data_read(monkeypatch):
    """Fail the test if the pipeline starts loading data."""

    def refuse(cfg, source=None):
        raise AssertionError("the data were read before the settings were checked")

    monkeypatch.setattr(pipeline, "load_data", refuse)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if training starts."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("training started before the settings were checked")

    monkeypatch.setattr(pl.Trainer, "fit", refuse)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# -- train.py: settings, before the data ---------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["model.dim=-1"], "model.dim must be an integer in 1..65536, got -1"),
    (["model.dim=0"], "model.dim must be an integer in 1..65536, got 0"),
    (["model=two_tower", "data.history_len=0"], "data.history_len must be an integer >= 1 for model=two_tower"),
    (["model=two_tower", "model.net.history_len=0"], "model.net.history_len must be an integer >= 1 for model=two_tower"),
    (["propensity.cutoff=garbage"], "propensity.cutoff must be epoch seconds or an ISO-8601 time"),
    (["data.batch_size=99999999999999999999999"], "data.batch_size must be an integer in 1..2147483647"),
    (["seed=99999999999999999999"], "seed must be an integer in 0..4294967295"),
    (["seed=-1"], "seed must be an integer in 0..4294967295"),
    (["model=two_tower", "model.module.optimizer.lr=nan"], "model.module.optimizer.lr must be a finite number, got nan"),
    (["model=two_tower", "model.module.optimizer.lr=0"], "model.module.optimizer.lr must be a finite number > 0"),
    (["model=two_tower", "model.module.temperature=-1"], "model.module.temperature must be a finite number > 0"),
    (["model=two_tower", "model.net.dropout=1.5"], "model.net.dropout must be a number in [0, 1)"),
    (["model.vae.module.optimizer.lr=nan"], "model.vae.module.optimizer.lr must be a finite number, got nan"),
    (["model.vae.net.dropout=1.5"], "model.vae.net.dropout must be a number in [0, 1)"),
    (["model.vae.net.hidden=0"], "model.vae.net.hidden must be an integer in 1..1048576"),
    (["model.ease.max_memory_gb=-1"], "model.ease.max_memory_gb must be auto or a finite number > 0"),
    (["model.ease.max_memory_gb=lots"], "model.ease.max_memory_gb must be auto or a finite number > 0"),
    (["model.ease.dropout=1"], "model.ease.dropout must be auto or a number in [0, 1), got 1"),
    (["model.ease.dropout=-0.2"], "model.ease.dropout must be auto or a number in [0, 1), got -0.2"),
    (["model.ease.dropout_grid=[0.2,1.5]"], "model.ease.dropout_grid must be a non-empty list, each a number in [0, 1)"),
    (["model=ease", "model.ease.dropout=auto"], "model.ease.dropout must be 0 for model=ease (plain EASE"),
    (["model.val_users=0"], "model.val_users must be an integer >= 1 or null"),
    (["model.selection_metric=auc"], "model.selection_metric must be ndcg@K or recall@K with K >= 1"),
    (["model.candidates=[vae,als]"], "model.candidates must be a non-empty list, each one of vae | ease"),
    (["data.batch_size=0"], "data.batch_size must be an integer in 1..2147483647"),
    (["data.batch_size=1.5"], "data.batch_size must be an integer in 1..2147483647"),
    (["data.split.val_frac=0.6", "data.split.test_frac=0.5"], "data.split.val_frac + data.split.test_frac must be below 1"),
    (["trainer.max_epochs=0"], "trainer.max_epochs must be an integer >= 1 or -1"),
    (["model=two_tower", "index.factory=PQ7"], "index.factory='PQ7' is not a faiss index_factory string for the 64-wide vectors"),
    (["index.factory=PQ7"], "index.factory='PQ7' is not a faiss index_factory string for the 201-wide vectors"),
    (["index.factory=NoSuchIndex"], "index.factory='NoSuchIndex' is not a faiss index_factory string"),
    (["index=hnsw", "index.search_params='nprobe=8'"], "index.search_params='nprobe=8' does not apply"),
    (["index.nlist=0"], "index.nlist must be an integer >= 1 or null"),
    (["propensity.horizon_days=0"], "propensity.horizon_days must be a finite number > 0"),
    (["propensity.split.val_frac=0.7", "propensity.split.test_frac=0.5"], "propensity.split.val_frac + propensity.split.test_frac"),
    (["audience.segments.k_min=1"], "audience.segments.k_min must be an integer >= 2"),
    (["audience.segments.k_min=9", "audience.segments.k_max=3"], "audience.segments.k_min must be <= audience.segments.k_max"),
    (["evaluation.ks=[0,10]"], "evaluation.ks must be a non-empty list, each an integer >= 1"),
    (["privacy.id_length=3"], "privacy.id_length must be an integer in 16..64"),
    (["data.cleaning.max_abs_value=-5"], "data.cleaning.max_abs_value must be a finite number > 0"),
    (["propensity.pos_weight=-2"], "propensity.pos_weight must be auto, none or a finite number > 0"),
    (["callbacks.mid_epoch_checkpoint.train_time_interval.minutes=0"], "train_time_interval.minutes must be a finite number > 0"),
    (["data.extra_paths=[5]"], "data.extra_paths[0] must be a path, got 5"),
    (["data.extra_paths=5"], "data.extra_paths must be a list of event files or folders, got 5"),
])
def test_bad_train_settings_are_one_line_before_the_data(tiny_cfg, no_data_read, overrides, message):
    cfg = tiny_cfg(*overrides)
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert message in one_line(info.value)


def test_a_model_without_history_accepts_history_len_0(tiny_cfg, no_data_read):
    with pytest.raises(AssertionError, match="the data were read"):  # the checks passed: loading started
        run(tiny_cfg("model=mf", "data.history_len=0"))


@pytest.mark.parametrize("overrides, message", [
    (["index=ivf", "index.nlist=5000"], r"index.factory='IVF5000,Flat' needs at least 5000 vectors to train, but the data "
                                         r"have 1\d\d items; set index.nlist to at most 3 or null"),
    (["index.factory=PQ3", "index.search_params=''", "model.candidates=[vae,ease]"],
     r"index.factory='PQ3' needs at least 256 vectors to train, but the data have 1\d\d items"),
    (["index.factory=PQ3", "index.search_params=''"],  # 201-wide vectors fit, the sequence candidate's 64 do not
     r"index.factory='PQ3' is not a faiss index_factory string for the 64-wide vectors \(model.sequence.dim, the "
     r"sasrec candidate's vectors: pick a factory that fits both widths"),
])
def test_index_options_are_checked_against_the_data_before_training(tiny_cfg, no_training, overrides, message):
    cfg = tiny_cfg("logger=none", *overrides)
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert re.search(message, one_line(info.value)), str(info.value)
    assert not (Path(cfg.paths.output_dir) / "artifacts").exists()


def test_a_trainer_setting_lightning_refuses_is_one_line_before_training(tiny_cfg, no_training):
    with pytest.raises(ConfigError) as info:
        run(tiny_cfg("logger=none", "trainer.precision=banana"))
    assert one_line(info.value).startswith("trainer: ") and "banana" in str(info.value)


# -- output folders ------------------------------------------------------------------------------
def test_output_dir_that_is_a_file(tiny_cfg, tmp_path, no_data_read):
    target = tmp_path / "hostname"
    target.write_text("not a folder")
    cfg = tiny_cfg()
    cfg.paths.output_dir = str(target / "run")
    with pytest.raises(ConfigError, match=r"paths\.output_dir: .*hostname is not a folder"):
        run(cfg)
    cfg.paths.output_dir = str(target)
    with pytest.raises(ConfigError, match=r"paths\.output_dir: .*hostname exists and is not a folder"):
        run(cfg)


class _Failing:
    """A stand-in for a module whose function ``name`` raises ``error`` (everything else is the module's)."""

    def __init__(self, module, name: str, error: OSError):
        self._module, self._name, self._error = module, name, error

    def __getattr__(self, attr):
        if attr == self._name:
            def fail(*args, **kwargs):
                raise self._error
            return fail
        return getattr(self._module, attr)


def test_read_only_output_dir(tiny_cfg, tmp_path, monkeypatch, no_data_read):
    import dmp_dl.pipeline.checks as checks

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: make the write fail as it would
            monkeypatch.setattr(checks, "tempfile", _Failing(tempfile, "mkstemp", PermissionError(errno.EACCES, "denied")))
        cfg = tiny_cfg()
        cfg.paths.output_dir = str(locked / "run")
        with pytest.raises(ConfigError) as info:
            run(cfg)
        assert f"paths.output_dir: cannot write in {locked} (permission denied)" in one_line(info.value)
    finally:
        locked.chmod(0o755)


def test_full_output_dir(tiny_cfg, monkeypatch, no_data_read):
    import dmp_dl.pipeline.checks as checks

    monkeypatch.setattr(checks, "os", _Failing(os, "write", OSError(errno.ENOSPC, "No space left on device")))
    cfg = tiny_cfg()
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert "paths.output_dir: cannot write in" in one_line(info.value) and "(the file system is full)" in str(info.value)


# -- files that are not files --------------------------------------------------------------------
def _fifo(tmp_path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes on this platform")
    path = tmp_path / "events.csv"
    os.mkfifo(path)
    return path


def refused_without_hanging(call, fifo: Path, seconds: float = 20):
    """Run ``call`` in a thread; if it blocks on ``fifo``, unblock it (open the write end) and fail."""
    import threading

    outcome: dict = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(5)
        pytest.fail(f"reading {fifo} blocked (a named pipe must be refused, not read)")
    return outcome


def test_a_fifo_as_events_file_is_refused(tmp_path):
    from dmp_dl.data.event_files import EventFileSource

    fifo = _fifo(tmp_path)
    outcome = refused_without_hanging(lambda: EventFileSource(path=str(fifo)).load(), fifo)
    assert isinstance(outcome.get("error"), DataError), outcome
    assert "named pipe" in one_line(outcome["error"]) and "data.path" in str(outcome["error"])


def test_a_fifo_as_data_path_is_refused_by_train(tmp_path, no_data_read):
    fifo = _fifo(tmp_path)
    cfg = compose_cfg([*QUIET_TRAINER, "data=events", f"data.path={fifo}"], tmp_path / "run")
    outcome = refused_without_hanging(lambda: run(cfg), fifo)
    assert isinstance(outcome.get("error"), DataError), outcome
    assert f"data.path: {fifo} is a named pipe (FIFO)" in one_line(outcome["error"])


def test_a_device_as_events_file_is_refused(tmp_path):
    from dmp_dl.data.event_files import EventFileSource

    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    link = tmp_path / "events.csv"
    link.symlink_to("/dev/zero")  # endless: read, it would fill the memory
    with pytest.raises(DataError, match=r"events\.csv is a device, not a regular file"):
        EventFileSource(path=str(link)).load()


def test_a_fifo_as_user_ids_is_refused(tmp_path):
    from dmp_dl.commands.privacy import read_user_ids

    fifo = _fifo(tmp_path)
    outcome = refused_without_hanging(lambda: read_user_ids(fifo), fifo)
    assert isinstance(outcome.get("error"), DataError), outcome
    assert "user_ids" in one_line(outcome["error"]) and "named pipe" in str(outcome["error"])


def test_a_fifo_in_a_movielens_folder_is_refused(tmp_path):
    from dmp_dl.data.movielens import MovieLensSource

    root = tmp_path / "ml"
    root.mkdir()
    fifo = root / "u.data"
    os.mkfifo(fifo) if hasattr(os, "mkfifo") else pytest.skip("no named pipes")
    outcome = refused_without_hanging(lambda: MovieLensSource(str(root)).load(), fifo)
    assert isinstance(outcome.get("error"), DataError) and "named pipe" in str(outcome["error"]), outcome


# -- non-finite numbers --------------------------------------------------------------------------
def test_a_diverging_run_stops_with_one_line_and_exports_nothing(tiny_cfg):
    # 1/1e-40 overflows float32: every logit is infinite and the loss NaN from the first step
    cfg = tiny_cfg("logger=none", "model=two_tower", "trainer.max_epochs=1", "model.module.temperature=1e-40")
    with pytest.raises(NonFiniteError) as info:
        run(cfg)
    assert "training diverged: the loss is nan at epoch 0, step" in one_line(info.value)
    assert "nothing was exported" in str(info.value)
    assert not (Path(cfg.paths.output_dir) / "artifacts").exists()


def _bundle_parts(n_users: int = 6, n_items: int = 5, dim: int = 4):
    rng = np.random.default_rng(0)
    users = rng.normal(size=(n_users, dim)).astype(np.float32)
    items = rng.normal(size=(n_items, dim)).astype(np.float32)
    seen = sp.csr_matrix((np.ones(n_users), (np.arange(n_users), np.arange(n_users) % n_items)), shape=(n_users, n_items))
    return dict(user_vocab=IdVocab([f"u{i}" for i in range(n_users)], "user"),
                item_vocab=IdVocab([f"i{i}" for i in range(n_items)], "item"),
                user_vectors=users, item_vectors=items, seen=seen, item_popularity=np.ones(n_items))


def test_nan_vectors_are_never_exported(tmp_path):
    parts = _bundle_parts()
    parts["item_vectors"][2, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"item vectors: 1 of 5 rows are NaN or infinite .*nothing was exported"):
        export_bundle(tmp_path / "bundle", **parts)
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle.tmp-*"))


def test_nan_vectors_are_refused_on_load(tmp_path, monkeypatch):
    import dmp_dl.models.parts as parts_module

    parts = _bundle_parts()
    parts["user_vectors"][:, 0] = np.inf
    monkeypatch.setattr(parts_module, "check_finite_vectors", lambda vectors, what: None)  # an older exporter
    export_bundle(tmp_path / "bundle", **parts)
    with pytest.raises(BundleError, match=r"user_vectors\.npy: 6 of 6 vectors are NaN or infinite"):
        Recommender.load(tmp_path / "bundle")


# -- serve.py ------------------------------------------------------------------------------------
def serve_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("serve", overrides=["artifacts=/nonexistent", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["port=99999"], "port must be an integer in 1..65535, got 99999"),
    (["port=0"], "port must be an integer in 1..65535, got 0"),
    (["max_k=0"], "max_k must be an integer in 1..1000000"),
    (["max_ids=-3"], "max_ids must be an integer in 1..10000000"),
    (["max_body_bytes=abc"], "max_body_bytes must be an integer"),
    (["faiss_threads=0"], "faiss_threads must be an integer in 1..4096 or null"),
    (["log_level=loud"], "log_level must be one of critical"),
    (["host=''"], "host must be an address"),
    (["token=1e5"], "token=100000.0 was read as a float; quote it"),
    (["token=true"], "token=True was read as a bool"),
    (["torch_threads=0"], "torch_threads must be an integer in 1..4096 or null"),
    (["realtime.enabled=maybe"], "realtime.enabled must be one of True | False"),
    (["realtime.segment_bytes=100"], "realtime.segment_bytes must be an integer in 4096..1099511627776, got 100"),
    (["realtime.lookalike_refresh_seconds=-1"], "realtime.lookalike_refresh_seconds must be a finite number >= 0"),
    (["+realtime.segments=3"], "realtime.segments is not a setting (known: enabled, lookalike_refresh_seconds, segment_bytes)"),
    (["journal=/proc/journal"], "journal: cannot write in /proc"),
])
def test_bad_serve_settings(overrides, message):
    with pytest.raises(ConfigError) as info:
        check_serve_config(serve_cfg(*overrides))
    assert message in one_line(info.value)


def test_a_missing_extra_event_path_is_one_line_before_the_data(tiny_cfg, no_data_read, tmp_path):
    with pytest.raises(DataError) as info:
        run(tiny_cfg(f"data.extra_paths=[{tmp_path / 'journal-nowhere'}]"))
    assert f"data.extra_paths[0]: {tmp_path / 'journal-nowhere'} not found" in one_line(info.value)


def test_a_numeric_token_is_taken_as_its_digits():
    assert check_serve_config(serve_cfg("token=12345")) == "12345"
    assert token_from(None) is None and token_from("") is None and token_from("s3cret") == "s3cret"
    with pytest.raises(ConfigError, match="printable ASCII"):
        token_from("sécret")


# -- the audience command ------------------------------------------------------------------------
def audience_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("audience_cli", overrides=list(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["task=target", "budget=10", "seed=abc"], "seed must be an integer in 0..4294967295, got 'abc'"),
    (["task=target", "budget=10", "time_limit=-1"], "time_limit must be a number in (0, 604800]"),
    (["task=target", "budget=nan"], "budget must be a finite number"),
    (["task=lookalike", "seed_ids=[x]", "size=-5"], "size must be an integer >= 1"),
    (["task=segments", "k=0"], "k must be an integer >= 1 or null"),
    (["task=segments", "num_threads=0"], "num_threads must be an integer in 1..4096 or null"),
    (["task=target", "budget=10", "control_frac=1.5"], "control_frac must be a number in [0, 1)"),
    (["task=measure", "confidence=2"], "confidence must be a number in [0.5, 0.999]"),
    (["task=measure", "confidence=0.9999999999"], "confidence must be a number in [0.5, 0.999], got 0.9999999999"),
    (["task=measure", "assignments=t.csv", "outcomes=o.csv", "window_days=1e308"], "window_days must be a number in (0, 36525]"),
    (["task=measure", "assignments=t.csv", "outcomes=o.csv", "start=1e300"], "start must be epoch seconds or an ISO-8601 time"),
    (["task=measure", "outcomes=o.csv"], "assignments is required"),
    (["task=uplift", "assignments=t.csv", "outcomes=o.csv", "uplift.val_frac=0.6", "uplift.test_frac=0.5"],
     "uplift.val_frac + uplift.test_frac must be below 1, got 0.6 + 0.5"),
    (["task=uplift", "assignments=t.csv", "outcomes=o.csv", "uplift.patience=0"], "uplift.patience must be an integer in 1..100000"),
    (["task=target", "budget=10", "value=1e308"], "value must be a number in [0, 1e+12]"),
    (["task=target", "budget=10", "caps={0: -1}"], "caps gives segment 0 -1; each value must be an integer in 0..2147483647"),
    (["task=uplift", "uplift.lr=0"], "uplift.lr must be a number in (0, 1]"),
    (["task=uplift", "uplift.hidden=[64,0]"], "uplift.hidden must be a non-empty list, each an integer in 1..65536"),
])
def test_bad_audience_settings_before_the_bundle_is_read(tmp_path, overrides, message):
    from dmp_dl.commands.audience import run_task

    cfg = audience_cfg("artifacts=/nonexistent/bundle", f"output_dir={tmp_path / 'out'}", *overrides)
    with pytest.raises(ConfigError) as info:
        run_task(cfg)
    assert message in one_line(info.value)


def test_audience_output_dir_that_is_a_file(tmp_path):
    from dmp_dl.commands.audience import run_task

    target = tmp_path / "hostname"
    target.write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir: .*hostname exists and is not a folder"):
        run_task(audience_cfg("task=segments", "artifacts=/nonexistent/bundle", f"output_dir={target}"))


def test_a_lookalike_larger_than_the_users_is_capped(trained, rec, tmp_path):
    from dmp_dl.commands.audience import run_task

    seed = str(rec.user_vocab.ids[0])
    summary = run_task(audience_cfg("task=lookalike", f"artifacts={trained['bundle_dir']}", f"output_dir={tmp_path}",
                                    f"seed_ids=[{seed}]", "size=2000000000"))
    assert summary["users"] == rec.n_users - 1  # everyone but the seed, without allocating 2e9 rows
    top, scores = rec.lookalike_rows(np.array([0]), 2_000_000_000)
    assert len(top) == rec.n_users - 1 and np.isfinite(scores).all()


# -- the commands end to end: one line, exit status 2, nothing written ---------------------------
def _command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def test_train_command_refuses_a_bad_setting_before_creating_its_folder(tmp_path):
    out = tmp_path / "run"
    done = _command([str(ROOT / "train.py"), "model.dim=-1", f"paths.output_dir={out}"], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: model.dim must be an integer in 1..65536, got -1"]
    assert not out.exists()


def test_audience_command_refuses_a_file_as_output_dir(tmp_path, trained):
    target = tmp_path / "hostname"
    target.write_text("x")
    done = _command(["-m", "dmp_dl.audience", "task=segments", f"artifacts={trained['bundle_dir']}",
                     f"output_dir={target}"], ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"error: output_dir: {target} exists and is not a folder" in done.stderr


def test_serve_command_refuses_a_port_out_of_range(trained, tmp_path):
    done = _command([str(ROOT / "serve.py"), f"artifacts={trained['bundle_dir']}", "port=99999"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "port must be an integer in 1..65535, got 99999" in done.stderr


def test_the_checks_cover_every_command():
    from dmp_dl.pipeline.checks import CHECKS

    assert set(CHECKS) == {"train", "serve", "evaluate", "audience", "export", "privacy"}
    for name in ("train", "evaluate", "audience_cli", "export"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(name, return_hydra_config=True)
        assert cfg.hydra.callbacks.preflight._target_ == "dmp_dl.pipeline.preflight.PreflightCallback"


def test_a_diverging_autoencoder_stops_with_one_line_and_exports_nothing(tiny_cfg):
    # a learning rate of 1e30: the first updates blow the weights up, the loss becomes non-finite
    cfg = tiny_cfg("logger=none", "model.vae.module.optimizer.lr=1e30", "model.time_budget_s=null")
    with pytest.raises(NonFiniteError) as info:
        run(cfg)
    assert "training diverged: the loss is" in one_line(info.value)
    assert not (Path(cfg.paths.output_dir) / "artifacts").exists()
