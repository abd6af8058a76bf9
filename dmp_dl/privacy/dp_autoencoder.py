"""User-level DP-SGD for the default model's autoencoder (``model=auto`` / ``model=vae`` with
``privacy.dp.enabled``).

The autoencoder's training example already is a user: their whole interaction row goes in and the
multinomial likelihood of that row comes out, with the exact softmax over the catalogue (no other
user's data in the loss). One user is therefore one DP-SGD example, with no change to the loss:

1. users with a training row are Poisson-sampled at rate ``q = privacy.dp.batch_users / users``
   (the sampling the Rényi-DP accountant of :mod:`dmp_dl.privacy.dp` assumes);
2. each sampled user's gradient of their own loss (the row's negative log-likelihood plus the KL
   term) is computed by ``torch.func.vmap`` over ``grad`` on the row padded to the batch's longest
   one, clipped to L2 norm ``max_grad_norm`` (C) over every parameter together, summed; Gaussian
   noise ``N(0, (σC)²)`` is added to every coordinate and the sum divided by ``q * users``;
3. Adam steps on that gradient (post-processing). ``σ`` is calibrated for ``trainer.max_epochs``
   epochs of ``1 / q`` steps each, exactly as for ``model=two_tower``, and the run reports the
   (ε, δ) of the steps it took.

Catalogues above ``model.vae.module.full_softmax_max_items`` score a user's items against
``num_negatives`` uniformly drawn items shared by the step (corrected by ``log(items / negatives)``),
never against the other sampled users' items, and without the item-count (logQ) correction: the
counts are a private statistic.

What (ε, δ) covers: every parameter of the served autoencoder (encoder rows and layers, attribute
encoder, decoder rows and biases) with respect to adding or removing one user's training row. Under
DP the automatic choice (:func:`dmp_dl.training.selection.choose_model`) trains nothing else and
chooses nothing on validation: no EASE candidate or blend, no early stopping, no refit on every
event (a second fit would spend a second budget). Not covered, as for the two-tower model: the
exported user vectors (each computed from that user's own events), the vocabularies and popularity
counts, the propensity model, and the metrics reported on the validation and test users (the EASE
and popularity baselines among them: reported, never served).

Dense gradients: per-user clipping needs each user's full gradient, so under DP the encoder's item
rows train with dense gradients and one Adam (``sparse_gradients`` is ignored). A step then
materialises ``privacy.dp.chunk_users`` dense copies of the parameters (about
``(items + 1) x (hidden + dim + 1)`` floats each) and Adam updates every row, where the non-private
fit on a large catalogue updates only the rows of the batch's items.
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dmp_dl.core.errors import ConfigError
from dmp_dl.privacy.dp import (
    DPSGD,
    DPOptions,
    clip_factors,
    planned_epochs,
    planned_steps,
    sample_rate,
    steps_per_epoch,
)
from dmp_dl.training.fit import FiniteLossGuard, _instantiate_all, instantiate_trainer
from dmp_dl.training.warm_start import warm_start

log = logging.getLogger(__name__)

ENCODER_ROWS = "net.encoder.weight"


class PoissonUsers(Dataset):
    """Item ``i`` is a fresh Poisson sample of ``users`` at rate ``q``: ``{"user": (B,) sorted}``
    (B varies, may be 0); ``len`` = steps per epoch."""

    def __init__(self, users: np.ndarray, q: float, steps: int):
        self.users = torch.as_tensor(np.asarray(users, dtype=np.int64))
        self.q, self.steps = float(q), int(steps)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"user": self.users[torch.rand(len(self.users)) < self.q]}


def padded_rows(net, user: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attached rows of ``user`` (B,) as (items (B, L), values (B, L)), L the longest row,
    padded with item ``n_items`` and value 0."""
    offsets, items, values = net.gather_rows(user)
    b = user.shape[0]
    counts = torch.diff(torch.cat([offsets, offsets.new_tensor([len(items)])]))
    width = int(counts.max()) if b else 0
    row = torch.repeat_interleave(torch.arange(b, device=items.device), counts, output_size=len(items))
    slot = torch.arange(len(items), device=items.device) - offsets[row]
    out_items = torch.full((b, width), net.n_items, dtype=torch.int64, device=items.device)
    out_values = torch.zeros((b, width), dtype=values.dtype, device=items.device)
    out_items[row, slot] = items
    out_values[row, slot] = values
    return out_items, out_values


class _UserRowLoss(nn.Module):
    """One user's autoencoder loss, as :meth:`AutoencoderModule.training_step` computes it for a
    batch, written for a single padded row so that ``vmap`` gives one gradient per user.

    forward(rows (L, hidden): the encoder's rows of the user's items, items (L,), values (L,) 0 on
    padding, keep (L,) 0/1 (items the encoder sees), attr_user (1,) the attribute row (``n_users``:
    hidden), eps (dim,) posterior noise, negatives (M,) shared uniform items or an empty tensor for
    the exact softmax) -> () loss.

    The encoder's rows come in as an input rather than through ``encoder.weight``: a user's gradient
    of that table is non-zero on their own L rows only, so it is taken on those (L x hidden per
    user, not items x hidden) and scattered back after clipping.
    """

    def __init__(self, net: nn.Module, kl_weight: float):
        super().__init__()
        self.net, self.kl_weight = net, float(kl_weight)

    def forward(self, rows, items, values, keep, attr_user, eps, negatives):
        net = self.net
        kept = values * keep
        weights = kept / kept.pow(2).sum().sqrt().clamp(min=1e-12)
        h = (weights.unsqueeze(1) * rows).sum(0) + net.encoder_bias
        if net.user_attr.active:
            h = h + net.user_attr(rows=attr_user)[0]
        h = F.silu(net.norms[0](h))
        for layer, norm_layer in zip(net.hidden_layers, net.norms[1:]):
            h = F.silu(norm_layer(layer(h)))
        out = net.latent(h)
        mean, logvar = out[: net.latent_dim], None
        latent = mean
        if net.variational:
            logvar = out[net.latent_dim:].clamp(-10.0, 10.0)
            latent = mean + eps * torch.exp(0.5 * logvar)
        n = net.n_items
        item = items.clamp(max=n - 1)  # padding slots carry value 0
        real = values > 0
        if negatives.shape[0] == 0:  # the exact softmax over the catalogue
            log_p = F.log_softmax(latent @ net.item_embedding.weight[:n].T + net.item_bias[:n], 0)[item]
        else:
            w, b = net.item_embedding.weight, net.item_bias
            pos = (w[item] @ latent + b[item]).masked_fill(~real, -math.inf)
            neg = w[negatives] @ latent + b[negatives] + math.log(n / negatives.shape[0])
            neg = neg.masked_fill((negatives.unsqueeze(1) == items.unsqueeze(0)).any(1), -math.inf)
            log_p = pos - torch.logsumexp(torch.cat([pos, neg]), 0)
        nll = -torch.where(real, values * log_p, torch.zeros_like(log_p)).sum()
        if logvar is None:
            return nll
        kl = 0.5 * (torch.exp(logvar) + mean.pow(2) - 1.0 - logvar).sum()
        return nll + self.kl_weight * kl


class AutoencoderDPSGD(DPSGD):
    """The DP-SGD engine of :class:`~dmp_dl.models.autoencoder_module.AutoencoderModule` (which
    calls :meth:`training_step` when built with ``dp=``): Poisson user batches, one clipped gradient
    per user's whole row, noise; the accounting of :class:`~dmp_dl.privacy.dp.DPSGD`."""

    def batches(self, users: np.ndarray) -> DataLoader:
        """Poisson samples of ``users`` (those with a training row), ``1 / q`` steps an epoch."""
        data = PoissonUsers(users, self.sample_rate, steps_per_epoch(self.sample_rate))
        return DataLoader(data, batch_size=None, shuffle=False, collate_fn=lambda batch: batch)

    def clipped_noisy_gradients(self, module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(parameter name -> noisy mean gradient, mean per-user loss) for one Poisson batch."""
        from torch.func import functional_call, grad_and_value, vmap

        net = module.net
        wrapper = _UserRowLoss(net, module.kl_weight())
        params = {n: p.detach() for n, p in wrapper.named_parameters() if p.requires_grad}
        buffers = dict(wrapper.named_buffers())
        device = net.item_bias.device
        user = batch["user"].to(device)
        items, values = padded_rows(net, user)
        b = user.shape[0]
        keep = (torch.rand(items.shape, device=device) >= net.dropout).to(values.dtype)
        attr_user = user
        if net.attribute_dropout > 0:
            attr_user = torch.where(torch.rand(b, device=device) < net.attribute_dropout,
                                    torch.full_like(user, net.n_users), user)
        eps = torch.randn(b, net.latent_dim, device=device)
        h = module.hparams
        if net.n_items <= h.full_softmax_max_items:
            negatives = torch.zeros(0, dtype=torch.int64, device=device)
        else:
            negatives = torch.randint(net.n_items, (h.num_negatives,), device=device)

        def user_loss(p, rows, *inputs):
            return functional_call(wrapper, (p, buffers), (rows, *inputs))

        dims = (0, 0, 0, 0, 0, None)
        per_user = vmap(grad_and_value(user_loss, argnums=(0, 1)), in_dims=(None, 0, *dims))
        inputs = (items, values, keep, attr_user.unsqueeze(1), eps, negatives)
        table = params.pop(ENCODER_ROWS)
        summed = {name: torch.zeros_like(p) for name, p in params.items()}
        summed[ENCODER_ROWS] = torch.zeros_like(table)
        losses = []
        clip, chunk = float(self.options.max_grad_norm), self.options.chunk_users
        with torch.autocast(device_type=device.type, enabled=False):
            for start in range(0, b, chunk):
                part = [x if d is None else x[start:start + chunk] for x, d in zip(inputs, dims)]
                (grads, row_grads), loss = per_user(params, F.embedding(part[0], table), *part)
                factor = clip_factors({**grads, ENCODER_ROWS: row_grads}, clip)
                for name, g in grads.items():
                    summed[name] += torch.tensordot(factor, g, dims=1)
                # a user's rows are distinct items: their gradient rows are that user's gradient of the table
                scaled = row_grads * factor[:, None, None]
                summed[ENCODER_ROWS].index_add_(0, part[0].reshape(-1), scaled.reshape(-1, scaled.shape[-1]))
                losses.append(loss.detach())
        mean_loss = torch.cat(losses).mean() if losses else torch.zeros((), device=device)
        return self.noisy_mean(summed), mean_loss

    def training_step(self, module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = super().training_step(module, batch)
        module._batches += 1  # the KL annealing counts steps
        return loss

    def report(self, steps: int) -> dict:
        return {**super().report(steps),
                "covers": "the autoencoder's parameters (not EASE, which is not trained under DP; not the propensity "
                          "model, vocabularies or popularity counts)"}


def fit_private_autoencoder(cfg, dm, rows: sp.csr_matrix, options: DPOptions, loggers: list | None = None,
                            previous=None) -> tuple[AutoencoderDPSGD, nn.Module, dict]:
    """Train ``cfg.model.vae`` on ``rows`` ((n_users, n_items) training strengths) with user-level
    DP-SGD for ``trainer.max_epochs`` epochs (or ``trainer.max_steps`` steps): no early stopping,
    no time budget and no validation during training, since choosing the epoch on validation users
    would read data outside the mechanism. ``previous``: the ``init_from`` network the fit starts
    from (row by row by id). Returns (the engine, the net in eval mode, facts)."""
    node = cfg.model.vae
    if node.module.get("scheduler") is not None:
        raise ConfigError("privacy.dp.enabled=true does not step a learning-rate scheduler: set "
                          "model.vae.module.scheduler=null")
    if "ddp" in str(cfg.trainer.get("strategy", "") or ""):
        raise ConfigError("privacy.dp.enabled=true trains on one device: drop trainer=ddp")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    net = instantiate(node.net, _convert_="all")(n_users=dm.n_users, n_items=dm.n_items, user_features=dm.user_features,
                                                 sparse_gradients=False)
    net.attach_rows(rows)
    warm = None
    if previous is not None:
        warm = warm_start(net, previous, {"user": dm.user_vocab.ids, "item": dm.item_vocab.ids})
        log.warning("privacy.dp: the (epsilon, delta) guarantee covers this run's training only, not the model "
                    "init_from starts it from")
    users = np.flatnonzero(np.diff(sp.csr_matrix(rows).indptr) > 0)
    if len(users) == 0:
        raise ConfigError("privacy.dp: no users with training events")
    q = sample_rate(options, len(users))
    engine = AutoencoderDPSGD(options, len(users), planned_steps(cfg.trainer, q))
    loader = engine.batches(users)
    # no item counts: they would be a private statistic, and the DP loss does not read them
    module = instantiate(node.module, _convert_="all")(net=net, item_counts=None, steps_per_epoch=len(loader), dp=engine)
    epochs = planned_epochs(cfg.trainer)
    configured = [c for c in _instantiate_all(cfg.get("callbacks")) if not isinstance(c, (ModelCheckpoint, EarlyStopping))]
    extra = {"enable_progress_bar": False} if cfg.trainer.get("enable_progress_bar") == "auto" else {}
    trainer = instantiate_trainer(cfg.trainer, callbacks=[FiniteLossGuard(), *configured], logger=loggers or False,
                                  max_epochs=epochs, min_epochs=0, devices=1, strategy="auto", limit_val_batches=0,
                                  enable_checkpointing=False, num_sanity_val_steps=0, enable_model_summary=False,
                                  **extra)
    log.info("privacy.dp with model=%s: the autoencoder alone, trained with user-level DP-SGD for %d planned steps "
             "(no EASE candidate or blend, no epoch chosen on validation, no refit); (epsilon, delta) covers its "
             "parameters", cfg.model.get("name"), engine.planned_steps)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # no validation while training is intended: it would choose outside the mechanism
        warnings.filterwarnings("ignore", message=".*validation_step.*no .val_dataloader.*")
        trainer.fit(module, train_dataloaders=loader)
    net.eval()
    facts = {"fit_seconds": time.perf_counter() - t0, "epochs_run": int(trainer.current_epoch), "epochs": int(trainer.current_epoch),
             "batch_users": options.batch_users, "steps": int(module._batches), "warm_start": warm,
             "dense_gradients": True}
    return engine, net, facts
