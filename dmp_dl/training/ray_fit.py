"""The model stage's network fits as Ray Train jobs (``trainer=ray``).

This process (``train.py``, Ray's *driver*) prepares the data, fits EASE, chooses, evaluates and
writes the bundle exactly as in a one-process run; EASE's Gram matrix is the sum of Ray tasks'
parts over ranges of users (:func:`gram_on_ray`), inverted once here. Each fit of the default
model's autoencoder (the held-out fit with early stopping, then the refit on every event) runs as
one Ray Train job of ``trainer.num_workers`` workers, data-parallel with the same rules as
``trainer=ddp`` (:mod:`dmp_dl.training.data_parallel`): in every epoch each worker trains on its
own share of the users, gradients are averaged after every step (DDP over Ray's process group:
gloo on CPUs, NCCL on GPUs), a step of all workers together covers as many users as one step of a
one-process run, and each worker scores its share of the validation sample, so early stopping
agrees everywhere. What an autoencoder worker gets: the run's configuration (composed once, here),
the training rows (CSR) and the validation sample through Ray's object store (one copy per
machine), and the few facts of the data a fit reads (:class:`FitData`) — not the DataModule.

``model=two_tower|mf|sasrec`` (the Lightning fitter) runs its held-out fit as one such job
(:func:`fit_embedding_model_on_ray`): each worker gets the prepared DataModule through the object
store and Lightning's distributed sampler shares every epoch's batches out, as under
``trainer=ddp``; its final fit on every event follows the ``trainer=ddp`` rule (none with more than
one worker, in this process with one).

At the end of an epoch, at most every ``trainer.checkpoint_every_s`` seconds, worker 0 reports a
Lightning checkpoint (weights, optimiser, epoch, early stopping, the best epoch's weights) to
``trainer.storage_path``; when a worker dies, Ray restarts the group (up to
``trainer.max_failures`` times) and the fit resumes from the last checkpoint reported. Worker 0's
last report holds the best weights and the fit's facts; this process loads them (tensors only)
into its own copy of the network.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from omegaconf import DictConfig, OmegaConf

from dmp_dl.core.errors import ConfigError, DmpError
from dmp_dl.training.data_parallel import Processes, data_parallel_placement
from dmp_dl.training.fit import RAY_STRATEGY, new_autoencoder

log = logging.getLogger(__name__)

LIGHTNING_CHECKPOINT = "checkpoint.ckpt"  # the name ray.train.lightning.RayTrainReportCallback writes
NET_FILE, FACTS_FILE = "net.pt", "facts.json"  # worker 0's last report: the best weights, the fit's facts
INSTALL = 'pip install "ray[train]"'


@dataclass(frozen=True)
class RaySettings:
    """``trainer=ray``'s settings (``conf/trainer/ray.yaml``)."""

    num_workers: int
    use_gpu: bool | None  # None: auto, a GPU a worker when the cluster has enough
    address: str  # auto | host:port | ray://host:port
    max_failures: int
    storage_path: str | None
    cpus_per_worker: float
    checkpoint_every_s: float

    @classmethod
    def of(cls, cfg: DictConfig) -> "RaySettings":
        """Read and check ``cfg.trainer``; a bad value is one ``trainer.<key>`` line."""
        node = cfg.trainer

        def number(key: str, default, kind, low):
            value = node.get(key, default)
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"trainer.{key}={node.get(key)!r}: expected a number >= {low}") from None
            if value < low:
                raise ConfigError(f"trainer.{key}={node.get(key)!r}: expected a number >= {low}")
            return value

        use_gpu = node.get("use_gpu", "auto")
        if use_gpu not in ("auto", True, False):
            raise ConfigError(f"trainer.use_gpu={use_gpu!r}: expected auto, true or false")
        address = str(node.get("address", "auto") or "auto")
        storage = node.get("storage_path")
        return cls(number("num_workers", 2, int, 1), None if use_gpu == "auto" else bool(use_gpu), address,
                   number("max_failures", 2, int, 0), None if storage in (None, "") else str(storage),
                   number("cpus_per_worker", 1, float, 0.01), number("checkpoint_every_s", 60, float, 0))

    def gpus(self, cluster: dict) -> bool:
        """Whether each worker gets a GPU: as set, or (auto) when the cluster has one for every worker."""
        if self.use_gpu is None:
            return float(cluster.get("GPU", 0)) >= self.num_workers
        if self.use_gpu and float(cluster.get("GPU", 0)) < self.num_workers:
            raise ConfigError(f"trainer.use_gpu=true: the Ray cluster has {int(cluster.get('GPU', 0))} GPUs for "
                              f"{self.num_workers} workers (trainer.num_workers); use fewer workers or use_gpu=false")
        return bool(self.use_gpu)


@dataclass
class FitData:
    """What an autoencoder fit reads of the prepared data (``InteractionDataModule``'s attributes of
    the same names), sent to the workers instead of the whole DataModule."""

    n_users: int
    n_items: int
    user_features: Any
    val_users: np.ndarray
    eval_batch_size: int
    train_seen: sp.csr_matrix | None = None  # a warm refit: the items without a training event
    user_vocab: Any = None  # init_from: the previous network's rows are matched by id
    item_vocab: Any = None

    @classmethod
    def of(cls, dm, continued: bool, previous: bool) -> "FitData":
        return cls(int(dm.n_users), int(dm.n_items), dm.user_features, np.asarray(dm.val_users), int(dm.eval_batch_size),
                   dm.train_seen if continued else None, dm.user_vocab if previous else None,
                   dm.item_vocab if previous else None)


def ray_module():
    """``ray`` with its Train library, or one line saying how to install it."""
    try:
        import ray
        import ray.train.lightning  # noqa: F401
        import ray.train.torch  # noqa: F401
    except ImportError:
        raise ConfigError(f"trainer=ray needs Ray Train: {INSTALL} (or pip install -e '.[ray]')") from None
    return ray


def connect(settings: RaySettings):
    """Join the Ray cluster ``settings.address`` names (auto: ``RAY_ADDRESS`` or one started on
    this machine with ``ray start``, else a local one for this run alone); a cluster that cannot
    be reached is one ``trainer.address`` line. The workers import this package from the cluster's
    Python when it is installed there, else from a copy Ray uploads. Returns ``ray``."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    package = Path(__file__).resolve().parents[1]  # this package's folder, uploaded where it is not installed
    env = {"py_modules": [str(package)]} if not _installed_for_workers() else {}
    kwargs = {"runtime_env": env, "configure_logging": False, "log_to_driver": True}
    try:
        if settings.address == "auto":
            try:
                ray.init(address="auto", **kwargs)
                log.info("Ray: joined the cluster running on this machine (%s)", os.environ.get("RAY_ADDRESS", "auto"))
            except ConnectionError:
                ray.init(**kwargs)
                log.info("Ray: no cluster running here: started a local one for this run (%s CPUs)",
                         int(ray.cluster_resources().get("CPU", 0)))
        else:
            ray.init(address=settings.address, **kwargs)
            log.info("Ray: joined the cluster at %s", settings.address)
    except Exception as exc:  # Ray raises ConnectionError, its AuthenticationError, ValueError, RuntimeError...
        if "auth" in type(exc).__name__.lower():
            raise ConfigError(f"trainer.address={settings.address}: the Ray cluster there refused this process's token: "
                              "set RAY_AUTH_MODE=token and give this machine the cluster's token (~/.ray/auth_token or "
                              "RAY_AUTH_TOKEN), as for `ray start --address`") from None
        raise ConfigError(f"trainer.address={settings.address}: cannot join a Ray cluster there ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]}); start one with `ray start --head` or use "
                          "trainer.address=auto") from None
    return ray


def _installed_for_workers() -> bool:
    """Whether ``dmp_dl`` is installed (not only on this process's path), so that workers started
    on this machine import it: then nothing is uploaded."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("dmp_dl")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


_FIT_NUMBERS = itertools.count(1)  # this process's Ray jobs, numbered in their names


def fit_autoencoder_on_ray(fit: Callable, cfg: DictConfig, dm, rows: sp.csr_matrix, *, validate: bool, max_epochs: int,
                           time_budget_s: float | None = None, previous=None, val_users=None,
                           continue_from: torch.nn.Module | None = None) -> tuple[torch.nn.Module, dict]:
    """``fit`` (:func:`dmp_dl.training.selection.fit_autoencoder`: the same arguments and result)
    as a Ray Train job of ``trainer.num_workers`` workers, each calling ``fit`` for its share;
    ``val_users``: the validation sample (required when ``validate`` and there are validation
    users). A fit that fails more than ``trainer.max_failures`` times is one error line. The facts
    gain ``ray`` (workers, GPUs, the checkpoint a restarted group resumed from)."""
    settings = RaySettings.of(cfg)
    validate = validate and len(dm.val_users) > 0
    job = {"fit": fit, "data": FitData.of(dm, continue_from is not None, previous is not None),
           "rows": sp.csr_matrix(rows), "validate": validate, "max_epochs": int(max_epochs),
           "time_budget_s": time_budget_s, "previous": previous, "val_users": val_users if validate else None,
           "continue_from": None if continue_from is None else continue_from.cpu()}
    state, facts = _run_job(_worker, job, cfg, settings, "autoencoder", f"at most {max_epochs} epochs")
    net, _ = new_autoencoder(cfg, dm, settings.num_workers)  # the workers' shape: their weights load into it
    net.load_state_dict(state)
    net.attach_rows(rows)
    net.eval()
    return net, facts


def fit_embedding_model_on_ray(cfg: DictConfig, dm, privacy) -> tuple[pl.LightningModule, dict]:
    """:func:`dmp_dl.training.fit.fit_embedding_model` of ``model=two_tower|mf|sasrec`` (the Lightning
    fitter) as a Ray Train job of ``trainer.num_workers`` workers: each gets the prepared DataModule
    through the object store and trains on its share of every epoch's batches (Lightning's
    distributed sampler under Ray's DDP), with checkpoints and early stopping as in one process; the
    checkpoint files are written by worker 0 where ``paths.output_dir`` is on its machine. Returns
    (this process's module with the best weights, the training summary with ``ray`` facts)."""
    from dmp_dl.training.fit import build_module
    from dmp_dl.training.warm_start import load_previous

    settings = RaySettings.of(cfg)
    previous = load_previous(cfg.init_from) if cfg.get("init_from") and cfg.get("ckpt_path") in (None, "", "null") else None
    # the workers train without privacy hooks: DP is refused under trainer=ray before any data are
    # read, and pseudonymisation is done (the DataModule holds pseudonyms): the copy sent leaves the
    # privacy settings (and any key they read) in this process
    shipped = copy.copy(dm)
    shipped.privacy = None
    job = {"data": shipped, "previous": previous}
    epochs = cfg.trainer.get("max_epochs")
    state, summary = _run_job(_lightning_worker, job, cfg, settings, str(cfg.model.get("name", "model")),
                              f"at most {epochs} epochs" if epochs not in (None, -1) else "epochs as configured")
    module = build_module(cfg, dm)
    module.load_state_dict(state)
    module.eval()
    summary["privacy"] = privacy.summary(0)
    return module, summary


def _run_job(worker: Callable[[dict], None], job: dict, cfg: DictConfig, settings: RaySettings, what: str,
             length: str) -> tuple[dict, dict]:
    """Run ``worker`` as a Ray Train job of ``settings.num_workers`` workers on ``job`` (plus the
    run's config, resolved here, and the checkpoint period) and return worker 0's final report:
    (the weights, the facts with ``ray``: workers, GPUs, the job, its seconds, the checkpoint a
    restarted group resumed from). ``what`` names the fit in its log lines and errors."""
    ray = connect(settings)
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = settings.gpus(ray.cluster_resources())
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["trainer"]["accelerator"] = "gpu" if use_gpu else "cpu"
    job = {**job, "cfg": plain, "checkpoint_every_s": settings.checkpoint_every_s}
    name = f"{what}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_FIT_NUMBERS)}"
    storage = checkpoint_storage(settings, cfg, ray.nodes())
    resources = {"CPU": settings.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        worker, train_loop_config={"job": ray.put(job)},
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=settings.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             # Ray Train's INFO lines (a report and a checkpoint every epoch) say nothing to a user
                             logging_config=LoggingConfig(log_level="WARNING")))
    log.info("%s: a Ray Train job of %d workers (%s), %s; checkpoints in %s", what, settings.num_workers,
             "a GPU each" if use_gpu else f"{settings.cpus_per_worker:g} CPU each", length, Path(storage, name))
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray's TrainingFailedError wraps the workers' own errors
        cause = _worker_error(exc)
        if isinstance(cause, DmpError):
            raise cause from None
        raise DmpError(f"the {what}'s Ray Train job {name} failed after {settings.max_failures} restarts "
                       f"(trainer.max_failures): {type(cause).__name__}: {' '.join(str(cause).split())[:300]}") from None
    if result.checkpoint is None:
        raise DmpError(f"the {what}'s Ray Train job {name} ended without the final weights")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder, NET_FILE), map_location="cpu", weights_only=True)
        facts = json.loads(Path(folder, FACTS_FILE).read_text())
    facts["ray"] = {**facts.get("ray", {}), "workers": settings.num_workers, "gpu_per_worker": use_gpu,
                    "job": name, "job_seconds": time.perf_counter() - t0}
    if facts["ray"].get("resumed_from"):
        log.warning("%s: a Ray worker failed during the fit; the workers were restarted and resumed from %s",
                    what, facts["ray"]["resumed_from"])
    return state, facts


def checkpoint_storage(settings: RaySettings, cfg: DictConfig, nodes: list[dict]) -> str:
    """Where the workers write checkpoints and the final weights: ``trainer.storage_path``, else
    ``<run folder>/ray`` when every live node of the cluster (``ray.nodes()``) is this machine;
    a cluster over several machines without a storage path is one ``trainer.storage_path`` line
    (worker 0 may run on another machine, and this process must read what it writes)."""
    if settings.storage_path is not None:
        return settings.storage_path
    hosts = sorted({str(node.get("NodeManagerAddress")) for node in nodes if node.get("Alive", True)})
    if len(hosts) > 1:
        raise ConfigError(f"trainer.storage_path: the Ray cluster spans {len(hosts)} machines ({', '.join(hosts)}) and "
                          "its workers write checkpoints and the final weights where this process reads them: give a "
                          "folder every machine reaches (an NFS mount, s3://bucket/path)")
    return str(Path(cfg.paths.output_dir, "ray").resolve())


def gram_on_ray(cfg: DictConfig) -> Callable[[sp.csr_matrix, torch.device], torch.Tensor]:
    """EASE's Gram matrix X'X (float32, on ``device``) as the sum of ``trainer.num_workers`` Ray
    tasks' parts, each X_u'X_u over its own range of users (the rows reach them through the object
    store); summed here as they arrive, to be inverted once (:class:`~dmp_dl.models.ease.EASESolver`)."""
    settings = RaySettings.of(cfg)

    def gram(x: sp.csr_matrix, device: torch.device) -> torch.Tensor:
        ray = connect(settings)
        rows = ray.put(sp.csr_matrix(x))
        bounds = np.linspace(0, x.shape[0], settings.num_workers + 1).astype(np.int64)
        task = ray.remote(num_cpus=settings.cpus_per_worker)(_gram_part)
        pending = [task.remote(rows, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        total = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=device)
        t0 = time.perf_counter()
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            with warnings.catch_warnings():  # the object store's read-only array is only read
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                total.add_(torch.from_numpy(ray.get(done[0])).to(device))
        log.info("EASE: the Gram matrix from %d Ray tasks (%.1f s)", len(bounds) - 1, time.perf_counter() - t0)
        return total

    return gram


def _gram_part(rows: sp.csr_matrix, lo: int, hi: int) -> np.ndarray:
    """X_u'X_u of users ``lo:hi`` of ``rows`` (one Ray task): (n_items, n_items) float32."""
    from dmp_dl.models.ease import gram_matrix

    return gram_matrix(rows[lo:hi]).numpy()


def _worker_error(exc: BaseException) -> BaseException:
    """The first worker's own exception inside Ray's wrappers (else ``exc``)."""
    seen = exc
    for _ in range(6):
        inner = getattr(seen, "worker_failures", None)
        if isinstance(inner, dict) and inner:
            seen = next(iter(inner.values()))
            continue
        cause = getattr(seen, "cause", None) or seen.__cause__
        if cause is None or cause is seen:
            break
        seen = cause
    return seen


class CheckpointReport(pl.Callback):
    """Report a Lightning checkpoint of the fit to Ray Train at the end of an epoch when
    ``every_s`` seconds have passed since the last one (worker 0 writes it; every worker reports,
    as Ray Train wants). A worker group restarted after a failure resumes from the last one."""

    def __init__(self, every_s: float):
        self.every_s, self.last = float(every_s), time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        import ray.train
        from ray.train import Checkpoint

        due = torch.tensor([float(time.monotonic() - self.last >= self.every_s)])
        due = trainer.strategy.broadcast(due, src=0)  # every worker reports, or none
        if not bool(due.item()):
            return
        with tempfile.TemporaryDirectory() as folder:
            trainer.save_checkpoint(Path(folder, LIGHTNING_CHECKPOINT), weights_only=False)  # worker 0 writes
            checkpoint = Checkpoint.from_directory(folder) if trainer.global_rank == 0 else None
            ray.train.report({"epoch": int(trainer.current_epoch)}, checkpoint=checkpoint)
        self.last = time.monotonic()


def _worker_job(config: dict) -> tuple[dict, Processes, DictConfig]:
    """A Ray Train worker's start: its log lines to the driver's console, the job, this worker's
    place among the processes and the run's config."""
    import ray
    import ray.train

    from dmp_dl.core.logs import DropMessages, quiet_third_party

    logging.getLogger("dmp_dl").setLevel(logging.INFO)  # a worker's lines reach the driver's console through Ray
    for handler in logging.getLogger().handlers:  # Ray Train's line per report, logged outside its level setting
        handler.addFilter(DropMessages((r"Reporting training result",)))
    quiet_third_party()
    # the arrays the object store hands out are read-only views; the fit never writes to them
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    job = ray.get(config["job"])
    context = ray.train.get_context()
    return job, Processes(context.get_world_size(), context.get_world_rank(), RAY_STRATEGY), OmegaConf.create(job["cfg"])


@contextlib.contextmanager
def _last_report(processes: Processes):
    """The folder of the last checkpoint Ray reported for this job (None: a first start). When it
    holds the final weights (the job had ended before a restart), they are reported again and the
    context yields ``"done"``."""
    import ray.train

    last = ray.train.get_checkpoint()
    with last.as_directory() if last is not None else contextlib.nullcontext(None) as folder:
        if folder is not None and Path(folder, NET_FILE).exists():  # the fit had ended: report it again
            state = torch.load(Path(folder, NET_FILE), map_location="cpu", weights_only=True)
            facts = json.loads(Path(folder, FACTS_FILE).read_text())
            _report_final(processes, state, facts)
            yield "done"
            return
        yield str(Path(folder, LIGHTNING_CHECKPOINT)) if folder is not None else None


def _worker(config: dict) -> None:
    """One Ray Train worker's part of an autoencoder fit: resume from the last reported checkpoint
    if any, run the job's ``fit`` on this worker's share, then worker 0 reports the best weights
    and the facts."""
    job, processes, cfg = _worker_job(config)
    with _last_report(processes) as resume:
        if resume == "done":
            return
        net, facts = job["fit"](cfg, job["data"], job["rows"], validate=job["validate"], max_epochs=job["max_epochs"],
                                time_budget_s=job["time_budget_s"], previous=job["previous"], val_users=job["val_users"],
                                processes=processes, continue_from=job["continue_from"], ckpt_path=resume,
                                callbacks=[CheckpointReport(job["checkpoint_every_s"])])
    facts["ray"] = {"resumed_from": resume}
    _report_final(processes, net.state_dict(), facts)


def _lightning_worker(config: dict) -> None:
    """One Ray Train worker's part of a Lightning fitter's fit (:func:`fit_embedding_model_on_ray`):
    the DataModule's batches shared out by Lightning's distributed sampler, checkpoints reported
    as for the autoencoder; worker 0 reports the best weights and the training summary."""
    from dmp_dl.training.fit import fit_embedding_model

    job, processes, cfg = _worker_job(config)
    # the validation metrics are torchmetrics objects, synchronised over the workers when computed;
    # the training loss of the epoch line is worker 0's own
    warnings.filterwarnings("ignore", message=r".*self.log\('(val|train)/.*sync_dist=True.*")
    with _last_report(processes) as resume:
        if resume == "done":
            return
        module, summary = fit_embedding_model(cfg, job["data"], None, previous=job["previous"],
                                              placement=data_parallel_placement(processes, distributed_sampler=True),
                                              extra_callbacks=[CheckpointReport(job["checkpoint_every_s"])],
                                              resume_from=resume)
    summary["ray"] = {"resumed_from": resume}
    _report_final(processes, module.state_dict(), summary)


def _report_final(processes: Processes, state: dict, facts: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if processes.main:
            torch.save(state, Path(folder, NET_FILE))
            Path(folder, FACTS_FILE).write_text(json.dumps(facts, default=_plain))
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report({"final": 1}, checkpoint=checkpoint)


def _plain(value: Any):
    """JSON for the numpy scalars and tensors a fit's facts may hold."""
    if isinstance(value, np.generic):
        return value.item()
    if torch.is_tensor(value):
        return value.tolist()
    return str(value)
