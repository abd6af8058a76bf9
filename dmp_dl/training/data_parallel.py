"""Data-parallel training of the user-level autoencoder (the default model under ``trainer=ddp``).

Lightning runs ``train.py`` once per process (rank 0 starts the others when its first fit begins;
each writes its log to ``train_ddp_process_<rank>.log``). Every process loads the same data; in
each epoch each one trains on its own share of the users (:func:`rank_share`), the gradients are
averaged over the processes after every step, and a step of all processes together covers as many
users as one step of a one-process run (:func:`per_process_batch`), so the same settings train the
same way. Each process scores its own share of the validation sample (:func:`validation_share`);
the metric is the mean over all of them, the same number in every process, so early stopping and
the best epoch kept in memory agree everywhere.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from dmp_dl.core.errors import ConfigError
from dmp_dl.data.datamodule import per_process_step
from dmp_dl.models.autoencoder_module import UserBatches, users_with_rows
from dmp_dl.training.fit import RAY_STRATEGY, instantiate_trainer

log = logging.getLogger(__name__)

DATA_PARALLEL_STRATEGY = "ddp"  # the one Lightning strategy that re-runs the script per process (trainer=ddp)


@dataclass(frozen=True)
class Processes:
    """The processes of a fit: ``count`` of them (the world size), this one ``rank`` (0: the main one),
    started by ``launcher``: ``lightning`` (``trainer=ddp`` re-runs the script per process) or ``ray``
    (Ray Train workers: :mod:`dmp_dl.training.ray_fit`)."""

    count: int = 1
    rank: int = 0
    launcher: str = "lightning"

    @property
    def main(self) -> bool:
        return self.rank == 0


ONE_PROCESS = Processes()


def on_ray(cfg: DictConfig) -> bool:
    """Whether ``cfg.trainer`` asks for Ray Train (``trainer=ray``)."""
    return (cfg.get("trainer") or {}).get("strategy") == RAY_STRATEGY


def processes_of(cfg: DictConfig) -> Processes:
    """The processes ``cfg.trainer`` asks for: more than one with ``trainer.strategy=ddp`` and
    ``trainer.devices`` (times ``num_nodes``) above 1, else one (the strategy ``auto`` keeps the
    model stage on one device, as before data-parallel training existed for it). A Trainer is
    built to ask Lightning (it resolves ``devices=auto`` and reads the rank the launcher set for
    this process); a setting it refuses is one ``trainer: ...`` line. Other ``ddp_*`` strategies
    (spawn, fork) run the fit in processes that cannot hand the best epoch kept in memory back:
    refused with one line."""
    strategy = (cfg.get("trainer") or {}).get("strategy", "auto")
    if not isinstance(strategy, str) or not strategy.startswith("ddp"):
        return ONE_PROCESS
    if strategy != DATA_PARALLEL_STRATEGY:
        raise ConfigError(f"trainer.strategy={strategy}: the default model (model={cfg.model.get('name')}) trains "
                          f"data-parallel with trainer.strategy={DATA_PARALLEL_STRATEGY} only (trainer=ddp)")
    probe = instantiate_trainer(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    if probe.world_size == 1:
        log.info("trainer.strategy=ddp with one device (trainer.devices=%s): the autoencoder trains in this process "
                 "alone", cfg.trainer.get("devices"))
    return Processes(int(probe.world_size), int(probe.global_rank))


def per_process_batch(batch: int, processes: Processes) -> int:
    """Users per step in each process: ``batch`` (a one-process run's step) shared out, rounded up."""
    return per_process_step(batch, processes.count)


def check_processes(n_users: int, batch: int, processes: Processes) -> str | None:
    """Refuse more processes than users to train on (:class:`ConfigError`, one line); return a
    warning line when the users fill less than one step of every process (one step an epoch,
    in each process a part of it), else None. ``batch``: users per step in each process."""
    if processes.count > n_users:
        raise ConfigError(f"trainer.devices: {processes.count} processes but the autoencoder trains on {n_users} users; "
                          f"every process needs users of its own: use trainer.devices={max(n_users, 1)} or fewer")
    if n_users < processes.count * batch:
        return (f"autoencoder: {n_users} training users fill less than one step of {processes.count} processes x "
                f"{batch} users: every epoch is one step, more processes only split it smaller")
    return None


def rank_share(n: int, processes: Processes, epoch: int, seed: int) -> np.ndarray:
    """Positions (into ``n`` users) that process ``processes.rank`` trains on in ``epoch``, in order.

    Every process draws the same permutation of ``range(n)`` from (``seed``, ``epoch``), extended
    with its first entries to a multiple of the process count (at most count - 1 users twice an
    epoch), and takes every count-th entry from its rank: the shares are disjoint apart from those,
    all the same length, and step k of all processes together is the k-th run of the permutation.
    Returns ``ceil(n / count)`` positions.
    """
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(int(n))
    total = -(-int(n) // processes.count) * processes.count
    if total > n:
        order = np.concatenate([order, order[: total - n]])
    return order[processes.rank :: processes.count]


class RankShareSampler(Sampler[int]):
    """This process's :func:`rank_share` of ``n`` users, a new one each epoch (Lightning calls
    :meth:`set_epoch` before every epoch)."""

    def __init__(self, n: int, processes: Processes, seed: int):
        self.n, self.processes, self.seed, self.epoch = int(n), processes, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.n // self.processes.count)

    def __iter__(self):
        return iter(rank_share(self.n, self.processes, self.epoch, self.seed).tolist())


def sharded_user_loader(rows: sp.csr_matrix, batch: int, processes: Processes, seed: int) -> DataLoader:
    """The users with a row in ``rows`` (CSR), this process's share of them each epoch
    (:class:`RankShareSampler`), ``batch`` at a time: ``{"user": (B,)}`` batches."""
    users = users_with_rows(rows)
    return DataLoader(UserBatches(users), batch_size=int(batch), sampler=RankShareSampler(len(users), processes, seed),
                      collate_fn=lambda b: b)


def validation_share(dataset, processes: Processes):
    """This process's share of the validation users ``dataset`` (an ``EvalUsers``): every count-th
    user from its rank. The shares are disjoint and cover the sample, so the mean of a metric over
    the processes is its mean over the sample; a sample smaller than the process count is scored
    whole by every process (the mean is the same)."""
    if processes.count == 1 or len(dataset) < processes.count:
        return dataset
    return type(dataset)(dataset.users[processes.rank :: processes.count], dataset.history, dataset.seen,
                         dataset.relevant)


def _no_buffer_sync() -> dict:
    """DDP's argument that turns off the broadcast of buffers before every step: the autoencoder's
    buffers are the item frequencies, the same in every process by construction."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}  # torch before forward_sync_buffers


def data_parallel_placement(processes: Processes, distributed_sampler: bool = False) -> dict:
    """The Trainer arguments of a data-parallel fit: Lightning's DDP (``trainer=ddp``) or, in a Ray
    Train worker, Ray's subclass of it with Ray's view of the ranks (the process group is Ray's).
    The autoencoder's loaders shard the users themselves; ``distributed_sampler``: Lightning shards
    a DataModule's loaders (``model=two_tower|mf|sasrec`` on Ray)."""
    if processes.launcher == "ray":
        from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

        return {"strategy": RayDDPStrategy(**_no_buffer_sync()), "plugins": [RayLightningEnvironment()],
                "devices": "auto", "use_distributed_sampler": distributed_sampler}
    from pytorch_lightning.strategies import DDPStrategy

    return {"strategy": DDPStrategy(**_no_buffer_sync()), "use_distributed_sampler": distributed_sampler}


class ProcessSeed(pl.Callback):
    """Seeds each process's random draws of a data-parallel fit (the items dropped from a user's
    row, the variational noise) with ``seed + rank`` once training starts: Lightning re-seeds every
    process alike when it connects them, and the same draws for every share would be one draw
    repeated. The weights are the same everywhere (DDP copies the main process's at the start)."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(self.seed + trainer.global_rank)


def leave_process_group() -> None:
    """End the processes' connection after the last data-parallel fit: the rest of the job runs in
    the main process alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
