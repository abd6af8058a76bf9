"""Differentially private training of the embedding model: user-level DP-SGD (the accounting and the
clipping shared by every model; the two-tower and MF losses here, the default model's autoencoder
in :mod:`dmp_dl.privacy.dp_autoencoder`).

The unit of privacy is a **user** (all of their events), not an event: a user's history feeds the
user tower of every one of their examples, so removing one event changes several examples, and
what a DMP must protect is the person. Each step therefore

1. samples users by Poisson sampling with rate ``q = batch_users / n_users`` (the sampling the
   accountant assumes; the batch size varies), taking up to ``max_events_per_user`` of each
   sampled user's training events (a random window);
2. computes one gradient **per user** of that user's mean loss (``torch.func.vmap`` over
   ``grad``), clips it to L2 norm ``max_grad_norm`` (C), sums, adds Gaussian noise of standard
   deviation ``noise_multiplier * C`` to every coordinate, and divides by the expected batch
   size ``q * n_users``;
3. lets the configured optimiser (LazyAdam: every row of a noised gradient is non-zero, so it is plain Adam here) step on that noisy gradient (post-processing).

Why not the in-batch softmax, and why not Opacus' per-sample gradients: the default loss scores
each positive against the *other examples'* positives, with a logQ correction from item counts.
A user's data then enters every other example's loss and the clipped per-example gradients are no
longer a sum of independent contributions, so clipping them does not bound one user's influence
(and the item counts are themselves a private statistic). Under DP the loss is decoupled: each
user's events are scored against ``num_negatives`` items drawn uniformly at random and shared by
the batch (independent of anyone's data), or against the whole catalogue when it is that small
(the exact softmax); ``loss=bpr`` uses per-event uniform negatives. Opacus computes per-sample
gradients with module hooks that assume every module sees one row per sample; here the item tower
runs on the shared negatives and the user tower on the users' events, and its embedding layers
materialise dense per-sample tables anyway. ``torch.func`` handles both directly, so the clipping
and noise are implemented here (a few lines) and only the privacy accountant comes from Opacus
(the optional ``dp`` extra: ``pip install 'dmp_dl[dp]'``): the Rényi-DP accountant of the
Poisson-subsampled Gaussian mechanism.

What (ε, δ) covers: every parameter of the trained network (item and user towers, both embedding
tables) with respect to adding or removing one user's events. Not covered: the exported user
vectors and propensity scores, which are computed from each user's own data by design (a user's
vector *is* their profile; other users' vectors reveal about them only what the network does);
the vocabularies, item popularity, attribute encodings, and the choice of the best epoch on
validation users and the logged training loss, which read the data outside the mechanism; and the
propensity model, which trains without DP. Per-user id embeddings receive signal only when their
user is sampled and noise at every step: ``model.net.use_user_id=false`` is usually better under DP.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dmp_dl.core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DPOptions:
    """``privacy.dp`` in the config.

    enabled: train the embedding model with user-level DP-SGD.
    target_epsilon: the noise multiplier is calibrated so that the planned training
        (``trainer.max_epochs`` epochs) spends at most this ε; ignored when ``noise_multiplier`` is set.
    noise_multiplier: σ, the noise standard deviation in units of ``max_grad_norm`` (explicit).
    delta: δ; null: the smaller of 1e-5 and 1 / (10 × users).
    max_grad_norm: C, the L2 bound of one user's gradient.
    batch_users: expected users per step (sampling rate q = batch_users / users).
    max_events_per_user: events of a sampled user used in one step (a random window of them;
        two-tower / MF: the autoencoder reads the user's whole row).
    num_negatives: uniform negatives shared by a step's users (softmax); the whole catalogue when it
        has at most this many items. With ``loss=bpr``: negatives per event (model.module.num_negatives).
        Two-tower / MF only: the autoencoder's are ``model.vae.module.*``.
    chunk_users: users per vectorised per-user-gradient pass (bounds memory: chunk × parameters).
    """

    enabled: bool = False
    target_epsilon: float | None = 8.0
    noise_multiplier: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    batch_users: int = 256
    max_events_per_user: int = 32
    num_negatives: int = 256
    chunk_users: int = 64

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if self.noise_multiplier is None and (self.target_epsilon is None or not self.target_epsilon > 0):
            raise ConfigError("privacy.dp: set target_epsilon > 0 or an explicit noise_multiplier")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ConfigError(f"privacy.dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"privacy.dp.delta must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"privacy.dp.max_grad_norm must be > 0, got {self.max_grad_norm}")
        for name in ("batch_users", "max_events_per_user", "num_negatives", "chunk_users"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"privacy.dp.{name} must be >= 1, got {getattr(self, name)}")


# -- accounting ---------------------------------------------------------------------------------
def _opacus_utils():
    try:
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError:
        raise ConfigError("privacy.dp.enabled=true needs the privacy accountant of Opacus: "
                          "pip install 'dmp_dl[dp]' (or pip install opacus)") from None
    return RDPAccountant, get_noise_multiplier


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε after ``steps`` Poisson-subsampled Gaussian steps (Rényi-DP accountant); inf without noise."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    RDPAccountant, _ = _opacus_utils()
    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=float(delta)))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 0.01 in ε) whose ``steps`` steps spend at most ``target_epsilon``."""
    _, get_noise_multiplier = _opacus_utils()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=float(delta),
                                          sample_rate=float(sample_rate), steps=max(int(steps), 1), accountant="rdp"))


def sample_rate(options: DPOptions, n_users: int) -> float:
    """Poisson sampling rate q: ``batch_users`` expected users per step out of ``n_users``."""
    return min(1.0, options.batch_users / max(int(n_users), 1))


def steps_per_epoch(q: float) -> int:
    """Steps in which each user is sampled once on average."""
    return max(1, math.ceil(1.0 / q))


DEFAULT_DP_EPOCHS = 10  # planned epochs when trainer.max_epochs is not set (the default model leaves it unset)


def planned_epochs(trainer) -> int:
    """The epochs a DP run is planned for: ``trainer.max_epochs`` when set (-1, until early
    stopping, plans nothing and is refused), else :data:`DEFAULT_DP_EPOCHS`. Without early stopping every one runs."""
    epochs = int(trainer.get("max_epochs") or DEFAULT_DP_EPOCHS)
    if epochs < 1:
        raise ConfigError(f"privacy.dp needs a planned number of epochs (no early stopping under DP): "
                          f"trainer.max_epochs={epochs} plans none; set a number, e.g. trainer.max_epochs=10")
    return epochs


def planned_steps(trainer, q: float) -> int:
    """The steps a run is configured for (``trainer.max_steps`` when set, else :func:`planned_epochs`
    epochs of 1 / q steps): the noise is calibrated so that they spend at most the target ε."""
    max_steps = int(trainer.get("max_steps", -1) or -1)
    return max_steps if max_steps > 0 else steps_per_epoch(q) * planned_epochs(trainer)


# -- batches ------------------------------------------------------------------------------------
class PoissonUserBatches(Dataset):
    """DP-SGD batches over users: item ``i`` is a fresh Poisson sample (``len`` = steps per epoch).

    examples: the :class:`~dmp_dl.data.datamodule.TrainExamples` (events grouped by user, in time
    order). A batch: ``user`` (B,) int64; ``item`` (B, E) int64; ``weight`` (B, E) float32 with 0
    on padding slots; ``history`` (B, E, L) int64 (L may be 0), E = ``max_events_per_user``.
    """

    def __init__(self, examples, sample_rate: float, max_events: int, steps: int):
        self.examples = examples
        user = examples.user.numpy()
        first = np.r_[0, np.flatnonzero(user[1:] != user[:-1]) + 1] if len(user) else np.zeros(0, np.int64)
        self.users = torch.from_numpy(user[first].astype(np.int64))
        self.starts = torch.from_numpy(first.astype(np.int64))
        self.counts = torch.from_numpy(np.diff(np.r_[first, len(user)]).astype(np.int64))
        self.sample_rate, self.max_events, self.steps = float(sample_rate), int(max_events), int(steps)
        self._slots = torch.arange(self.max_events)

    @property
    def n_users(self) -> int:
        return len(self.users)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        chosen = torch.nonzero(torch.rand(self.n_users) < self.sample_rate).squeeze(1)
        b, e = len(chosen), self.max_events
        start, count = self.starts[chosen][:, None], self.counts[chosen][:, None]
        offset = (torch.rand(b, 1) * count).long()
        pos = start + (offset + self._slots) % count  # a random cyclic window of the user's events
        valid = self._slots < count
        ex = self.examples.__getitems__(pos.reshape(-1))
        history = ex.get("history")
        return {
            "user": self.users[chosen],
            "item": ex["item"].reshape(b, e),
            "weight": ex["weight"].reshape(b, e) * valid,
            "history": history.reshape(b, e, self.examples.history_len) if history is not None
            else torch.zeros((b, e, 0), dtype=torch.int64),
        }


def _keep(batch):
    return batch


# -- the per-user loss --------------------------------------------------------------------------
class _UserLoss(nn.Module):
    """One user's mean loss over their events, with a loss that involves no other user's data.

    forward(user () , item (E,), weight (E,), history (E, L), negatives (M,) shared | (E, K) per event).
    """

    def __init__(self, net: nn.Module, loss: str, temperature: float, l2: float):
        super().__init__()
        self.net, self.loss, self.temperature, self.l2 = net, loss, float(temperature), float(l2)

    def forward(self, user, item, weight, history, negatives):
        e = item.shape[0]
        u = self.net.user_vectors(user.expand(e), history)
        pos = self.net.item_vectors(item)
        if self.loss == "softmax":
            neg = self.net.item_vectors(negatives)
            logits = torch.cat([(u * pos).sum(-1, keepdim=True), u @ neg.T], dim=1) / self.temperature
            hit = torch.cat([torch.zeros_like(item, dtype=torch.bool)[:, None], item[:, None] == negatives[None, :]], 1)
            logits = logits.masked_fill(hit, float("-inf"))  # the positive drawn as a negative
            per_event = torch.logsumexp(logits.float(), 1) - logits[:, 0].float()
        else:
            neg = self.net.item_vectors(negatives.reshape(-1)).reshape(e, negatives.shape[-1], -1)
            s_pos = (u * pos).sum(-1, keepdim=True)
            per_event = -F.logsigmoid(s_pos - torch.einsum("ed,ekd->ek", u, neg)).mean(1)
            if self.l2 > 0:
                per_event = per_event + self.l2 * (u.pow(2).sum(-1) + pos.pow(2).sum(-1) + neg.pow(2).sum(-1).mean(1))
        return (per_event * weight).sum() / weight.sum().clamp(min=1e-12)


# -- per-user clipping ---------------------------------------------------------------------------
def clip_factors(grads: dict[str, torch.Tensor], max_norm: float) -> torch.Tensor:
    """Per-user gradients (parameter name -> (B, *shape)) -> (B,) factors ``min(1, C / ||g_u||)``,
    the norm taken over every parameter together, so that ``factor_u * g_u`` has norm <= C."""
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
                                                  for g in grads.values()], 1), dim=1)
    return (float(max_norm) / (norms + 1e-6)).clamp(max=1.0)


def clipped_gradient_sum(per_user, params: dict[str, torch.Tensor], inputs: tuple, in_dims: tuple, n: int,
                         chunk: int, max_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sum over ``n`` users of their gradients, each clipped to L2 norm ``max_norm``.

    per_user: ``(params, *inputs) -> (grads (B, *shape) per parameter, losses (B,))`` (a
    ``vmap(grad_and_value(...))``); inputs: tensors batched on axis 0 (``in_dims`` 0) or shared
    (``in_dims`` None), taken ``chunk`` users at a time (memory: chunk x parameters).
    Returns (parameter name -> clipped sum, every user's loss (n,)).
    """
    summed = {name: torch.zeros_like(p) for name, p in params.items()}
    losses = []
    for start in range(0, n, chunk):
        part = [x if d is None else x[start:start + chunk] for x, d in zip(inputs, in_dims)]
        grads, loss = per_user(params, *part)
        factor = clip_factors(grads, max_norm)
        for name, g in grads.items():
            summed[name] += torch.tensordot(factor.to(g.dtype), g, dims=1)
        losses.append(loss.detach())
    device = next(iter(params.values())).device
    return summed, torch.cat(losses) if losses else torch.zeros(0, device=device)


# -- the optimiser step -------------------------------------------------------------------------
class DPSGD:
    """Clipped, noised per-user gradients for a :class:`~dmp_dl.models.retrieval.RetrievalModule`
    (which calls :meth:`training_step` when built with ``dp=``), and the privacy spent.

    options: :class:`DPOptions`; n_users: users with training events (the sampling population);
    planned_steps: optimiser steps the run is configured for (calibrates σ from ``target_epsilon``).
    """

    def __init__(self, options: DPOptions, n_users: int, planned_steps: int):
        if n_users < 1:
            raise ConfigError("privacy.dp: no users with training events")
        self.options = options
        self.n_users = int(n_users)
        self.sample_rate = sample_rate(options, self.n_users)
        self.planned_steps = int(planned_steps)
        self.delta = float(options.delta) if options.delta is not None else min(1e-5, 0.1 / self.n_users)
        if options.noise_multiplier is not None:
            self.noise_multiplier = float(options.noise_multiplier)
        else:
            self.noise_multiplier = calibrate_noise(options.target_epsilon, self.delta, self.sample_rate, self.planned_steps)
        _opacus_utils()  # fail before training, not after, when the accountant is missing
        log.info("DP-SGD: user-level, q=%.4f, sigma=%.3f, C=%g, delta=%.2g, %d planned steps (epsilon <= %s)",
                 self.sample_rate, self.noise_multiplier, options.max_grad_norm, self.delta, self.planned_steps,
                 options.target_epsilon if options.noise_multiplier is None else "see report")

    def batches(self, examples) -> DataLoader:
        """The training loader: Poisson-sampled users (see :class:`PoissonUserBatches`), one
        epoch = 1 / q steps (each user is sampled once per epoch on average)."""
        data = PoissonUserBatches(examples, self.sample_rate, self.options.max_events_per_user,
                                  steps_per_epoch(self.sample_rate))
        return DataLoader(data, batch_size=None, shuffle=False, collate_fn=_keep)

    def _negatives(self, n_items: int, loss: str, batch: dict, k_bpr: int, device) -> tuple[torch.Tensor, int | None]:
        if loss == "softmax":
            if n_items <= self.options.num_negatives:
                return torch.arange(n_items, device=device), None
            return torch.randint(n_items, (self.options.num_negatives,), device=device), None
        b, e = batch["item"].shape
        return torch.randint(n_items, (b, e, max(1, k_bpr)), device=device), 0

    def clipped_noisy_gradients(self, module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(parameter name -> noisy mean gradient, mean per-user loss) for one Poisson batch."""
        from torch.func import functional_call, grad_and_value, vmap

        h = module.hparams
        if h.loss not in ("softmax", "bpr"):
            raise ConfigError(f"privacy.dp supports model.module.loss softmax or bpr, got {h.loss!r}")
        wrapper = _UserLoss(module.net, h.loss, h.temperature, h.l2 if h.loss == "bpr" else 0.0)
        params = {n: p.detach() for n, p in wrapper.named_parameters() if p.requires_grad}
        buffers = dict(wrapper.named_buffers())
        device = next(iter(params.values())).device
        batch = {k: v.to(device) for k, v in batch.items()}
        negatives, neg_dim = self._negatives(module.net.n_items, h.loss, batch, h.num_negatives, device)

        def user_loss(p, user, item, weight, history, neg):
            return functional_call(wrapper, (p, buffers), (user, item, weight, history, neg))

        per_user = vmap(grad_and_value(user_loss), in_dims=(None, 0, 0, 0, 0, neg_dim), randomness="different")
        inputs = (batch["user"], batch["item"], batch["weight"], batch["history"], negatives)
        with torch.autocast(device_type=device.type, enabled=False):
            summed, losses = clipped_gradient_sum(per_user, params, inputs, (0, 0, 0, 0, neg_dim), len(batch["user"]),
                                                  self.options.chunk_users, float(self.options.max_grad_norm))
        return self.noisy_mean(summed), losses.mean() if len(losses) else torch.zeros((), device=device)

    def noisy_mean(self, summed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sum of a step's clipped per-user gradients -> the noisy mean gradient: Gaussian noise
        of standard deviation ``noise_multiplier * C`` on every coordinate, divided by the expected
        batch size ``q * n_users`` (a constant: dividing by the sampled size would leak it)."""
        clip = float(self.options.max_grad_norm)
        expected = self.sample_rate * self.n_users
        noisy = {}
        for name, total in summed.items():
            noise = torch.randn_like(total) * (self.noise_multiplier * clip) if self.noise_multiplier > 0 else 0.0
            noisy[name] = (total + noise) / expected
        return noisy

    def training_step(self, module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One DP-SGD step with the module's optimiser (manual optimisation). Returns the mean
        per-user loss (for the progress bar only)."""
        optimizer = module.optimizers()
        optimizer.zero_grad()
        grads, loss = self.clipped_noisy_gradients(module, batch)
        named = dict(module.net.named_parameters())
        for name, g in grads.items():
            named[name.removeprefix("net.")].grad = g.to(named[name.removeprefix("net.")].dtype)
        optimizer.step()
        module.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=max(len(batch["user"]), 1))
        return loss

    def report(self, steps: int) -> dict[str, Any]:
        """The guarantee of a run that took ``steps`` optimiser steps (for the manifest and reports)."""
        eps = epsilon_spent(self.noise_multiplier, self.sample_rate, steps, self.delta)
        return {
            "epsilon": eps if math.isfinite(eps) else None,
            "delta": self.delta,
            "unit": "user",
            "mechanism": "DP-SGD, Poisson-subsampled Gaussian, per-user clipping",
            "accountant": "rdp (opacus)",
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": float(self.options.max_grad_norm),
            "sample_rate": self.sample_rate,
            "steps": int(steps),
            "users": self.n_users,
            "covers": "the embedding network's parameters (not the propensity model, vocabularies or popularity counts)",
            "options": asdict(self.options),
        }


def build_dp_training(cfg, dm, options: DPOptions):
    """The DP engine and the module for ``cfg.model`` with it (``privacy.dp.enabled``).

    Refuses what the guarantee cannot hold with: data-parallel training (each rank would sample on
    its own), a learning-rate scheduler (manual optimisation does not step it) and losses other
    than softmax / bpr.
    """
    from hydra.utils import instantiate

    strategy = str(cfg.trainer.get("strategy", "") or "")
    if "ddp" in strategy:
        raise ConfigError("privacy.dp.enabled=true trains on one device: drop trainer=ddp")
    if cfg.model.module.get("scheduler") is not None:
        raise ConfigError("privacy.dp.enabled=true does not step a learning-rate scheduler: set model.module.scheduler=null")
    examples = dm.train_dataset()
    n_users = int(len(np.unique(examples.user.numpy())))
    engine = DPSGD(options, n_users, planned_steps(cfg.trainer, sample_rate(options, n_users)))
    net = instantiate(cfg.model.net, _convert_="all")(**dm.net_kwargs())
    # no item counts: the DP loss has no logQ correction, and the counts are a private statistic
    module = instantiate(cfg.model.module, _convert_="all")(net=net, item_counts=None, dp=engine)
    return engine, module, engine.batches(examples)
