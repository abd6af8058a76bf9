"""Checks that run before any work: every numeric and path setting of a command, in one line each.

Each command (``train.py``, ``serve.py``, ``python -m dmp_dl.evaluate | audience | export | privacy``) calls
its ``check_*_config`` first, so a bad value is a :class:`~dmp_dl.core.errors.ConfigError` naming the
key and the allowed range before a file is read or a model trained, never a traceback after an hour
of training. The same functions run from a Hydra callback (:class:`PreflightCallback`) before Hydra
creates the run folder, so a bad ``output_dir`` is refused before anything is written.

Rules are tables of ``key -> rule``; a key a config does not have (another model, a group switched
off) is skipped, so a new knob is checked by adding one line here. Settings that depend on the data
(index options against the number of vectors) are checked by :func:`check_index_against_data` right
after the data are loaded, before training.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from dmp_dl.campaign.outcomes import CAMPAIGN_START, WINDOW_DAYS
from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.core.io import regular_file_problem
from dmp_dl.core.rules import (
    ABSENT,
    AMOUNT,
    CONFIDENCE,
    COUNT,
    FRACTION,
    MAX_AMOUNT,
    MAX_SEED,
    MAX_SEGMENT,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    THREADS,
    Choice,
    Each,
    FileMode,
    Flag,
    Int,
    MetricAtK,
    Num,
    OrAuto,
    PerSegment,
    Renames,
    Rule,
    Separator,
    Text,
    check_finite,
    check_rules,
    select,
)
from dmp_dl.data.event_paths import is_glob, list_event_files
from dmp_dl.export import TASK_ALIASES, TASKS
from dmp_dl.store.manifest import FORMAT, MANIFEST
from dmp_dl.training.fitters import FITTERS

# The embedding model and its data (train.py; the data keys also for evaluate's data=...).
DATA_RULES: dict[str, Rule] = {
    "data.batch_size": Int(1, 2**31 - 1),
    "data.eval_batch_size": Int(1, 2**31 - 1),
    "data.num_workers": Int(0, 1024),
    "data.history_len": Int(0, 100_000),
    "data.history_sampling": Choice(("auto", "recent", "random")),
    "data.recency_half_life_days": OrAuto(Num(0, None, lo_open=True, null=True)),  # days; null: no decay
    "data.split.val_frac": FRACTION,
    "data.split.test_frac": FRACTION,
    "data.split.n": COUNT,
    "data.split.seed": Int(0, MAX_SEED, null=True),  # null in evaluate: the training run's
    "data.cleaning.kcore_users": Int(0, None),
    "data.cleaning.kcore_items": Int(0, None),
    "data.cleaning.max_abs_value": POSITIVE,
    "data.cleaning.timestamp_unit": Choice(("s", "ms")),
}
MODEL_RULES: dict[str, Rule] = {
    "seed": SEED,
    "model.dim": Int(1, 65_536),
    "model.net.hidden": Int(1, 1 << 20),
    "model.net.dropout": FRACTION,
    "model.net.id_dropout": FRACTION,
    "model.net.history_dropout": FRACTION,
    "model.net.init_std": POSITIVE,
    "model.net.heads": Int(1, 1024),
    "model.net.n_layers": Int(1, 64),
    "model.module.batch_sequences": Int(1, 2**31 - 1),
    "model.module.temperature": POSITIVE,
    "model.module.num_negatives": Int(0, 1 << 20),
    "model.module.full_softmax_max_items": Int(0, None),
    "model.module.l2": NON_NEGATIVE,
    "model.module.val_ks": Each(COUNT),
    "model.module.optimizer.lr": POSITIVE,
    "model.module.optimizer.weight_decay": NON_NEGATIVE,
    # the automatic choice (model=auto|vae|ease)
    "model.time_budget_s": Num(0, None, lo_open=True, null=True),  # a cap only: null (the default) keeps runs reproducible
    "model.selection_metric": MetricAtK(("ndcg", "recall")),
    "model.candidates": Each(Choice(("vae", "ease", "sasrec"))),
    "model.sequence.dim": Int(1, 65_536),
    "model.sequence.max_epochs": Int(1, 1_000_000),
    "model.sequence.patience": Int(0, None),
    "model.sequence.behind_stop": Num(0, 1, null=True),
    "model.sequence.cpu_max_scores": Num(0, None, null=True),
    "model.sequence.net.heads": Int(1, 1024),
    "model.sequence.net.n_layers": Int(1, 64),
    "model.sequence.net.dropout": FRACTION,
    "model.sequence.module.batch_sequences": Int(1, 2**31 - 1),
    "model.sequence.module.full_softmax_max_items": Int(0, None),
    "model.sequence.module.optimizer.lr": POSITIVE,
    "model.vae.batch_users": OrAuto(Int(1, None, null=True)),
    "model.vae.max_epochs": OrAuto(Int(1, 1_000_000)),
    "model.vae.patience": OrAuto(Int(0, None)),
    "model.vae.refit_continue_above_events": Int(0, None, null=True),
    "model.vae.refit_continue_epochs": Int(1, 1_000_000),
    "model.vae.cpu_bf16_above_pairs": Int(0, None, null=True),
    "model.vae.net.hidden": Int(1, 1 << 20),
    "model.vae.net.layers": Int(1, 64),
    "model.vae.net.dropout": FRACTION,
    "model.vae.net.attribute_dropout": Num(0, 1),
    "model.vae.module.beta": NON_NEGATIVE,
    "model.vae.module.anneal_epochs": NON_NEGATIVE,
    "model.vae.module.anneal_max_steps": Int(0, None, null=True),
    "model.vae.module.full_softmax_max_items": Int(0, None),
    "model.vae.module.num_negatives": Int(1, 1 << 20),
    "model.vae.module.optimizer.lr": POSITIVE,
    "model.ease.l2": Num(0, None, lo_open=True, null=True),
    "model.ease.l2_scales": Each(POSITIVE),
    "model.ease.l2_extend_factor": Num(1, None, lo_open=True),
    "model.ease.l2_extend_max": Int(0, 64),
    "model.ease.max_memory_gb": OrAuto(Num(0, None, lo_open=True)),
    "model.val_users": Int(1, None, null=True),
    "model.ease.max_bundle_mb": POSITIVE,
    "model.ease.short_grid_above_items": Int(0, None),
    "model.ease.refit": OrAuto(Flag()),
    "model.ease.dropout": OrAuto(FRACTION),  # EDLAE's dropout p; 0: EASE
    "model.ease.dropout_grid": Each(FRACTION, null=True),
    "trainer.max_epochs": Int(1, None, null=True, also=(-1,)),  # -1: until early stopping
    "trainer.min_epochs": Int(0, None, null=True),
    "callbacks.early_stopping.patience": Int(0, None),
    "callbacks.mid_epoch_checkpoint.every_n_train_steps": Int(1, None, null=True),
    "callbacks.mid_epoch_checkpoint.train_time_interval.minutes": POSITIVE,
    "index.exact_below": Int(0, None),
    "index.nlist": Int(1, None, null=True),
    "index.train_size": COUNT,
    "index.eval_queries": COUNT,
    "index.seed": SEED,
    "evaluation.ks": Each(COUNT),
    "evaluation.ease_l2": Num(0, None, lo_open=True, null=True),
    "evaluation.ease_max_items": Int(0, None),
    "evaluation.report.calibration_bins": COUNT,
    "evaluation.report.segment_sample": COUNT,
    "privacy.id_length": Int(16, 64),
}
PROPENSITY_RULES: dict[str, Rule] = {
    "propensity.horizon_days": POSITIVE,
    "propensity.cutoff_quantile": Num(0, 1, lo_open=True),
    "propensity.train_snapshots": Int(1, 1000),
    "propensity.enough_train_examples": Int(1, None, null=True),
    "propensity.baseline_max_examples": Int(1, None, null=True),
    "propensity.split.val_frac": Num(0, 1, lo_open=True, hi_open=True),
    "propensity.split.test_frac": Num(0, 1, lo_open=True, hi_open=True),
    "propensity.split.seed": SEED,
    "propensity.features.decay_half_lives_days": Each(POSITIVE),
    "propensity.features.embedding": Choice(("off", "frozen", "finetune")),
    "propensity.calibration": Choice(("platt", "isotonic", "none")),
    "propensity.ece_bins": COUNT,
    "propensity.num_threads": OrAuto(THREADS),
    "propensity.batch_size": OrAuto(COUNT),
    "propensity.net.hidden": Each(COUNT),
    "propensity.net.dropout": FRACTION,
    "propensity.net.token_dim": COUNT,
    "propensity.module.encoder_lr_scale": NON_NEGATIVE,
    "propensity.module.optimizer.lr": POSITIVE,
    "propensity.module.optimizer.weight_decay": NON_NEGATIVE,
    "propensity.trainer.max_epochs": COUNT,
    "propensity.early_stopping.patience": Int(0, None),
}
AUDIENCE_RULES: dict[str, Rule] = {
    "audience.num_threads": THREADS,
    "audience.profiles.half_life_days": OrAuto(POSITIVE),
    "audience.profiles.top_n": COUNT,
    "audience.segments.k": Int(1, None, null=True),
    "audience.segments.k_min": Int(2, None),
    "audience.segments.k_max": Int(2, None),
    "audience.segments.sample": COUNT,
    "audience.segments.niter": COUNT,
    "audience.segments.nredo": COUNT,
    "audience.segments.seed": SEED,
    "audience.segments.representatives": Int(0, None),
    "audience.segments.top_categories": Int(0, None),
    "audience.segments.top_attributes": Int(0, None),
    "audience.segments.label_categories": COUNT,
    "audience.segments.label_min_lift": Num(1, None),
}
DP_RULES: dict[str, Rule] = {
    "privacy.dp.target_epsilon": Num(0, None, lo_open=True, null=True),
    "privacy.dp.noise_multiplier": Num(0, None, null=True),
    "privacy.dp.delta": Num(0, 1, lo_open=True, hi_open=True, null=True),
    "privacy.dp.max_grad_norm": POSITIVE,
    "privacy.dp.batch_users": COUNT,
    "privacy.dp.max_events_per_user": COUNT,
    "privacy.dp.num_negatives": COUNT,
    "privacy.dp.chunk_users": COUNT,
}
SERVE_RULES: dict[str, Rule] = {
    "port": Int(1, 65_535),
    "max_k": Int(1, 1_000_000),
    "max_ids": Int(1, 10_000_000),
    "max_body_bytes": Int(1, 1 << 34),
    "faiss_threads": THREADS,
    "timeout_keep_alive": Int(1, 86_400),
    "log_level": Choice(("critical", "error", "warning", "info", "debug", "trace")),
    "torch_threads": THREADS,
    "reload_without_token": Choice((True, False)),
    "events_without_token": Choice((True, False)),
    "realtime.enabled": Choice((True, False)),
    "realtime.segment_bytes": Int(4096, 1 << 40),
    "realtime.lookalike_refresh_seconds": NON_NEGATIVE,
}
EVALUATE_RULES: dict[str, Rule] = {
    "seed": Int(0, MAX_SEED, null=True),
    "evaluation.ks": Each(COUNT, null=True),
    "evaluation.ease_l2": Num(0, None, null=True),
    "evaluation.ease_max_items": Int(0, None, null=True),
    "evaluation.report.calibration_bins": COUNT,
    "evaluation.report.segment_sample": COUNT,
}
# python -m dmp_dl.audience task=measure|uplift: one campaign's files and window.
CAMPAIGN_RULES: dict[str, Rule] = {
    "assignments": Text(null=True),
    "outcomes": Text(null=True),
    "outcome_columns": Renames(("user_id", "timestamp", "event_type", "value", "item_id"), null=True),
    "outcome_sep": Separator(),
    "conversion_event": Text(null=True),
    "start": CAMPAIGN_START,
    "window_days": WINDOW_DAYS,
}
# python -m dmp_dl.audience: the rules of every task, then those of each task (None: every task).
AUDIENCE_CLI_RULES: dict[str | None, dict[str, Rule]] = {
    None: {
        "task": Choice(("lookalike", "segments", "target", "rule", "overlap", "measure", "uplift", "segment", "targeting",
                        "measurement")),
        "format": Choice(("csv", "parquet")),
        "num_threads": THREADS,
    },
    "lookalike": {"size": COUNT, "method": Choice(("centroid", "contrast", "neighbours"))},
    "segments": {"k": Int(1, None, null=True), "representatives": Int(1, None)},
    "target": {
        "budget": Num(0, MAX_AMOUNT, null=True),  # null: refused below with what to give
        "cost": PerSegment(AMOUNT),
        "value": PerSegment(AMOUNT),
        "caps": PerSegment(Int(0, MAX_SEGMENT), null=True, mapping_only=True),  # contacts: fewer than 2**31 users
        "time_limit": Num(0, 7 * 86_400, lo_open=True),  # seconds; a week is more than any MILP here deserves
        "gains_points": Int(1, 10_000),
        "seed": SEED,
        "solver": Choice(("auto", "greedy", "lp", "milp")),
        "score": Choice(("propensity", "uplift")),
        "control_frac": FRACTION,
        "control_seed": Int(0, MAX_SEED, null=True),
    },
    "rule": {"rule": Text(null=True), "preview": Flag()},  # null: refused with an example of a rule
    "measure": {
        **CAMPAIGN_RULES,
        "artifacts": Text(null=True),
        "metric": Choice(("conversion", "revenue")),
        "confidence": CONFIDENCE,
    },
    "uplift": {
        **CAMPAIGN_RULES,
        "uplift.hidden": Each(Int(1, 1 << 16)),
        "uplift.dropout": FRACTION,
        "uplift.lr": Num(0, 1, lo_open=True),
        "uplift.weight_decay": Num(0, 1),
        "uplift.batch_size": Int(1, 1 << 24),
        "uplift.max_epochs": Int(1, 100_000),
        "uplift.patience": Int(1, 100_000),
        "uplift.val_frac": Num(0, 1, lo_open=True, hi_open=True),
        "uplift.test_frac": Num(0, 1, lo_open=True, hi_open=True),
        "uplift.calibration": Choice(("platt", "isotonic", "none")),
        "uplift.seed": SEED,
        "uplift.num_threads": THREADS,
    },
}
AUDIENCE_TASK_ALIASES = {"segment": "segments", "targeting": "target", "measurement": "measure"}
# python -m dmp_dl.export: the rules of every task, then those of each task (None: every task).
EXPORT_CLI_RULES: dict[str | None, dict[str, Rule]] = {
    None: {
        "format": Choice(("csv", "parquet")),
        "chunk_users": COUNT,
        "skip_unknown": Flag(),
        "progress": Choice(("auto", True, False)),
        "num_threads": THREADS,
        "mode": FileMode(),
    },
    "recommendations": {"k": COUNT, "exclude_seen": Flag()},
    "lookalike": {"size": COUNT, "method": Choice(("contrast", "centroid", "neighbours"))},
}


# -- paths ---------------------------------------------------------------------------------------
def check_input_file(path: str | os.PathLike, key: str, *, must_exist: bool = True, allow_dir: bool = False,
                     allow_glob: bool = False) -> None:
    """:class:`DataError` naming ``key`` when ``path`` is missing (if ``must_exist``) or is not a
    regular file (a directory is accepted when ``allow_dir``, e.g. a MovieLens folder; a glob
    pattern of event files when ``allow_glob``, if it matches some)."""
    if allow_glob and is_glob(path):
        list_event_files(path, key)
        return
    p = Path(path)
    if not p.exists():
        if must_exist:
            raise DataError(f"{key}: {p} not found (set {key} to an existing file)")
        return
    if allow_dir and p.is_dir():
        return
    problem = regular_file_problem(p)
    if problem:
        raise DataError(f"{key}: {p} {problem}")


def writable_dir_problem(path: str | os.PathLike, probe_bytes: int = 4096) -> str | None:
    """Why nothing can be written under folder ``path`` (created later if absent), or None.

    Writes and removes a small probe file in the folder (or its nearest existing parent), so a
    read-only or full file system is found before the work, not after it."""
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        return f"{p} exists and is not a folder"
    probe_dir = p
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"{probe_dir} is not a folder, so {p} cannot be created"
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check-", dir=probe_dir)
    except OSError as exc:
        return _why_not_writable(probe_dir, exc)
    try:
        try:
            os.write(fd, b"\0" * probe_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return _why_not_writable(probe_dir, exc)
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass
    return None


def _why_not_writable(where: Path, exc: OSError) -> str:
    reason = {errno.ENOSPC: "the file system is full", errno.EDQUOT: "the disk quota is exhausted",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied"}.get(exc.errno, exc.strerror or str(exc))
    return f"cannot write in {where} ({reason})"


def check_output_dir(path: Any, key: str) -> None:
    """:class:`ConfigError` naming ``key`` when ``path`` cannot be created or written."""
    if path is None or str(path).strip() == "":
        raise ConfigError(f"{key} must be a folder path, got {path!r}")
    problem = writable_dir_problem(str(path))
    if problem:
        raise ConfigError(f"{key}: {problem}; choose another folder with {key}=DIR")
    bundle = enclosing_bundle(str(path))
    if bundle is not None:
        raise ConfigError(f"{key}={path} is inside the bundle {bundle}; files written there would mix with the "
                          f"bundle's own: choose a folder outside it with {key}=DIR")


def enclosing_bundle(folder: str | os.PathLike) -> Path | None:
    """The bundle folder that ``folder`` (existing or not) is or lies in, symlinks resolved, or
    None: ``folder`` itself when it holds a ``manifest.json``, or a folder above it whose
    ``manifest.json`` is a bundle's (``folder`` is then one of the bundle's part folders, or would
    be created inside the bundle)."""
    real = Path(folder).resolve()
    for place in (real, *real.parents):
        manifest = place / MANIFEST
        if not manifest.is_file():
            continue
        if place == real:
            return place
        try:
            if json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT:
                return place
        except (OSError, ValueError, AttributeError):  # unreadable, or not a bundle's manifest
            continue
    return None


def check_output_file(path: Any, key: str, folder_key: bool = False) -> None:
    """:class:`ConfigError` naming ``key`` unless a file can be written at ``path``: not a folder
    or a pipe, not inside a bundle, in a folder where files can be created (checked by writing a
    probe, so a read-only or full file system is found before the work). ``folder_key``: ``key``
    sets the folder of ``path``, not the file."""
    if path is None or str(path).strip() == "":
        raise ConfigError(f"{key} must be a file path, got {path!r}")
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{key}: {p} is a folder; give the file to write, e.g. {key}={p / 'export.csv'}")
    if p.exists() and regular_file_problem(p):
        raise ConfigError(f"{key}: {p} exists and is not a regular file; give another file path")
    bundle = enclosing_bundle(p.parent)
    if bundle is not None:
        raise ConfigError(f"{key}: {p} is inside the bundle {bundle} (a file written there replaces or adds to "
                          "the bundle's files); write it to a folder outside the bundle")
    problem = writable_dir_problem(p.parent)
    if problem:
        raise ConfigError(f"{key}: {problem}; choose another place with {key}={'DIR' if folder_key else 'FILE'}")


def _input_paths(cfg: DictConfig, keys: Mapping[str, dict]) -> None:
    for key, options in keys.items():
        value = select(cfg, key)
        if value is ABSENT or value is None or value == "":
            continue
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{key} must be a path, got {value!r}")
        check_input_file(value, key, **options)


# -- per command ---------------------------------------------------------------------------------
def check_data_config(cfg: DictConfig, paths: bool = True) -> None:
    """The ``data`` node's knobs and (when ``paths``) input files (``cfg`` holds ``data``)."""
    check_finite(cfg)
    check_rules(cfg, DATA_RULES)
    val, test = select(cfg, "data.split.val_frac"), select(cfg, "data.split.test_frac")
    if isinstance(val, (int, float)) and isinstance(test, (int, float)) and val + test >= 1:
        raise ConfigError(f"data.split.val_frac + data.split.test_frac must be below 1, got {val} + {test}")
    if not paths:
        return
    data_dir = select(cfg, "data.name") in ("movielens", "events", ABSENT)  # a folder of files, or not known yet
    _input_paths(cfg, {
        "data.path": {"allow_dir": data_dir, "allow_glob": select(cfg, "data.name") == "events"},
        "data.users": {},
        "data.items": {},
        "data.erasure_list": {},
    })
    extra = select(cfg, "data.extra_paths")
    if extra not in (ABSENT, None):
        if isinstance(extra, (str, os.PathLike)):
            extra = [extra]
        if not isinstance(extra, (list, tuple)):
            raise ConfigError(f"data.extra_paths must be a list of event files or folders, got {extra!r}")
        for i, value in enumerate(extra):
            if not isinstance(value, (str, os.PathLike)) or str(value).strip() == "":
                raise ConfigError(f"data.extra_paths[{i}] must be a path, got {value!r}")
            check_input_file(value, f"data.extra_paths[{i}]", allow_dir=True, allow_glob=True)


def check_train_config(cfg: DictConfig) -> None:
    """Everything ``train.py`` reads from its config that can be checked before the data are read."""
    check_rules(cfg, {"seed": SEED})  # before the keys that interpolate it (data.split.seed, ...)
    check_finite(cfg)
    check_data_config(cfg)
    check_rules(cfg, MODEL_RULES)
    dropout = select(cfg, "model.ease.dropout")
    if select(cfg, "model.name") == "ease" and dropout not in (ABSENT, 0, 0.0):
        raise ConfigError(f"model.ease.dropout must be 0 for model=ease (plain EASE, also the report's EASE baseline), "
                          f"got {dropout!r}; for EDLAE use model=auto (with model.candidates=[ease]: the item-item model alone)")
    check_fitter(cfg)
    _check_ray(cfg)
    if _enabled(cfg, "propensity"):
        check_rules(cfg, PROPENSITY_RULES)
        val, test = select(cfg, "propensity.split.val_frac"), select(cfg, "propensity.split.test_frac")
        if isinstance(val, (int, float)) and isinstance(test, (int, float)) and val + test >= 1:
            raise ConfigError(f"propensity.split.val_frac + propensity.split.test_frac must be below 1, got {val} + {test}")
        cutoff = select(cfg, "propensity.cutoff")
        if cutoff not in (ABSENT, None, ""):
            import numpy as np
            import pandas as pd

            from dmp_dl.data.cleaning import parse_timestamps  # pandas: the checks run before any heavy import

            if not np.isfinite(parse_timestamps(pd.Series([cutoff], dtype=object))[0]):
                raise ConfigError(f"propensity.cutoff must be epoch seconds or an ISO-8601 time (or null), got {cutoff!r}")
        weight = select(cfg, "propensity.pos_weight")
        if weight not in (ABSENT, None, "auto", "none") and POSITIVE.problem(weight):
            raise ConfigError(f"propensity.pos_weight must be auto, none or a finite number > 0, got {weight!r}")
    if _enabled(cfg, "audience"):
        check_rules(cfg, AUDIENCE_RULES)
        k_min, k_max = select(cfg, "audience.segments.k_min"), select(cfg, "audience.segments.k_max")
        if isinstance(k_min, int) and isinstance(k_max, int) and k_min > k_max:
            raise ConfigError(f"audience.segments.k_min must be <= audience.segments.k_max, got {k_min} > {k_max}")
    if _enabled(cfg, "privacy.dp"):
        check_rules(cfg, DP_RULES)
    net_history = select(cfg, "model.net.history_len")  # usually ${data.history_len}
    if net_history is not ABSENT and select(cfg, "model.net.use_history") is not False:
        key = "data.history_len" if select(cfg, "data.history_len") == net_history else "model.net.history_len"
        if Int(1, 100_000).problem(net_history):
            raise ConfigError(f"{key} must be an integer >= 1 for model={select(cfg, 'model.name')} (its user tower "
                              f"reads the recent items), got {net_history!r}; or set model.net.use_history=false")
    _check_sequence_net(cfg)
    _input_paths(cfg, {"privacy.erasure_list": {"must_exist": False}, "privacy.secret_file": {"must_exist": False}})
    ckpt = select(cfg, "ckpt_path")
    if isinstance(ckpt, str) and ckpt not in ("", "last", "null"):
        _input_paths(cfg, {"ckpt_path": {}})
    check_index_config(cfg)
    output = select(cfg, "paths.output_dir")
    if output is not ABSENT:
        check_output_dir(output, "paths.output_dir")


def _check_ray(cfg: DictConfig) -> None:
    """``trainer=ray`` runs the model stage's network fits on Ray Train (the default model's
    autoencoder, ``model=two_tower|mf|sasrec``'s Lightning fit), without DP-SGD (one process holds
    the privacy accountant); anything else is one line."""
    if select(cfg, "trainer.strategy") != "ray":
        return
    if _enabled(cfg, "privacy.dp"):
        raise ConfigError("privacy.dp.enabled=true trains on one device: drop trainer=ray")


def _check_sequence_net(cfg: DictConfig) -> None:
    """A sequence network (``model=sasrec``) reads at least one item, and its heads split ``model.dim`` evenly."""
    max_len = select(cfg, "model.net.max_len")  # usually ${data.history_len}
    if max_len is not ABSENT and Int(1, 100_000).problem(max_len):
        key = "data.history_len" if select(cfg, "data.history_len") == max_len else "model.net.max_len"
        raise ConfigError(f"{key} must be an integer >= 1 for model={select(cfg, 'model.name')} (it reads the user's "
                          f"latest items), got {max_len!r}")
    for prefix, dim_key in (("model.net", "model.dim"), ("model.sequence.net", "model.sequence.dim")):
        heads, dim = select(cfg, f"{prefix}.heads"), select(cfg, dim_key)
        if isinstance(heads, int) and isinstance(dim, int) and heads > 0 and dim % heads:
            raise ConfigError(f"{prefix}.heads={heads} must divide {dim_key}={dim} (each attention head reads "
                              f"dim / heads entries); e.g. {prefix}.heads=2")


def _enabled(cfg: DictConfig, group: str) -> bool:
    value = select(cfg, f"{group}.enabled")
    return value is not ABSENT and bool(value)


def check_fitter(cfg: DictConfig) -> None:
    """``model.fitter`` names a fitter (:mod:`dmp_dl.training.fitters`) and the model config has every key it reads."""
    if select(cfg, "model") in (ABSENT, None):
        return
    fitter = select(cfg, "model.fitter")
    if not isinstance(fitter, str) or fitter not in FITTERS:
        raise ConfigError(f"model.fitter must be {Choice(tuple(FITTERS)).describe()} (each conf/model/*.yaml declares "
                          f"its own), got {None if fitter is ABSENT else fitter!r}")
    for key in FITTERS[fitter].needs:
        if select(cfg, f"model.{key}") in (ABSENT, None):
            raise ConfigError(f"model.fitter={fitter} reads model.{key}, which this model config does not have; start "
                              f"from a config in conf/model/ that declares fitter: {fitter}")


def vector_dim(cfg: DictConfig) -> Any:
    """The width of the exported vectors: ``model.dim``, plus the entries the fitter's network adds
    (the autoencoder of the automatic choice folds the item bias into its vectors)."""
    dim = select(cfg, "model.dim")
    fitter = select(cfg, "model.fitter")
    if isinstance(dim, int) and not isinstance(dim, bool) and isinstance(fitter, str) and fitter in FITTERS:
        return dim + FITTERS[fitter].vector_extra
    return dim


def check_index_config(cfg: DictConfig) -> None:
    """``index.factory`` / ``index.approximate`` / ``index.search_params`` against the model's
    ``dim``, by building the (empty) FAISS index they describe."""
    if select(cfg, "index") in (ABSENT, None):
        return
    check_rules(cfg, {k: v for k, v in MODEL_RULES.items() if k.startswith("index.")})
    dims = [(vector_dim(cfg), "model.dim")]
    candidates = select(cfg, "model.candidates")
    if select(cfg, "model.fitter") == "auto" and isinstance(candidates, (list, ListConfig)) and "sasrec" in candidates:
        # the vectors' width when the sequence candidate is served
        dims.append((select(cfg, "model.sequence.dim"), "model.sequence.dim, the sasrec candidate's vectors: pick a "
                     "factory that fits both widths, set model.sequence.dim, or leave sasrec out of model.candidates"))
    dims = [(d, why) for d, why in dims if isinstance(d, int) and not isinstance(d, bool) and d >= 1]
    factory, approximate = select(cfg, "index.factory"), select(cfg, "index.approximate")
    for key, value in (("index.factory", factory), ("index.approximate", approximate)):
        if value is ABSENT or value is None or (key == "index.factory" and value == "auto"):
            continue
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key} must be a faiss index_factory string (e.g. Flat, HNSW32, IVF{{nlist}},Flat), got {value!r}")
        for dim, why in dims:
            _empty_index(value, dim, key, select(cfg, "index.search_params"), why)


def _empty_index(factory: str, dim: int, key: str, search_params: Any = None, why: str = "model.dim"):
    import faiss

    from dmp_dl.index.ann import is_exact, set_search_params  # faiss

    concrete = factory.replace("{nlist}", "1")
    try:
        index = faiss.index_factory(dim, concrete, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1].split(":")[-1].strip()
        raise ConfigError(f"{key}={factory!r} is not a faiss index_factory string for the {dim}-wide vectors ({why}): "
                          f"{msg}") from None
    if isinstance(search_params, str) and search_params and not is_exact(concrete):
        try:
            set_search_params(index, search_params)
        except ConfigError as exc:
            raise ConfigError(f"{exc} ({key}={factory!r})") from None
    return index


def min_training_vectors(factory: str, dim: int) -> tuple[int, str]:
    """The fewest vectors that can train the index ``factory`` builds, and what sets it: ``lists``
    (an IVF index needs one vector per list), ``centroids`` (a product quantizer one per centroid of
    a sub-quantizer), ``training`` (anything else that trains) or ``none`` (0: no training)."""
    import faiss

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return 0, "none"
    need, reason = 1, "training"
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        ivf = None
    if ivf is not None and int(ivf.nlist) > need:
        need, reason = int(ivf.nlist), "lists"
    for candidate in (faiss.downcast_index(index), ivf and faiss.downcast_index(ivf)):
        pq = getattr(candidate, "pq", None)
        if pq is not None and int(pq.ksub) > need:
            need, reason = int(pq.ksub), "centroids"
    return need, reason


def check_index_against_data(options, n_users: int, n_items: int, dim: int) -> None:
    """The index each of the bundle's vector sets gets (``options``: :class:`~dmp_dl.index.ann.IndexOptions`)
    can be trained on that many vectors; checked right after the data are loaded, before training."""
    for what, n in (("items", n_items), ("users", n_users)):
        factory, _ = options.resolve(n)
        try:
            need, reason = min_training_vectors(factory, dim)
        except RuntimeError as exc:
            msg = str(exc).strip().splitlines()[-1].split(":")[-1].strip()
            raise ConfigError(f"index.factory={factory!r} is not a faiss index_factory string for dim {dim}: {msg}") from None
        if need > n:
            hint = {"lists": f"set index.nlist to at most {max(1, n // 39)} or null (sized from the data)",
                    "centroids": "use fewer bits per code (e.g. PQ8x4), or index=flat / index=hnsw"}.get(
                reason, "use index=flat or index=hnsw")
            raise ConfigError(f"index.factory={factory!r} needs at least {need} vectors to train, but the data have "
                              f"{n} {what}; {hint}")


def check_index_for_data(cfg: DictConfig, dm) -> None:
    """:func:`check_index_against_data` for a run config and its prepared DataModule ``dm``."""
    if select(cfg, "index") in (ABSENT, None) or not cfg.get("export", True):
        return
    dim = vector_dim(cfg)
    if not isinstance(dim, int) or isinstance(dim, bool):
        return  # a model without a configured dimension: its vectors are checked at export
    from hydra.utils import instantiate

    check_index_against_data(instantiate(cfg.index, _convert_="all"), dm.n_users, dm.n_items, dim)


def check_serve_config(cfg: DictConfig) -> str | None:
    """``serve.py``'s knobs. Returns the bearer token as a string (or None)."""
    check_finite(cfg)
    check_rules(cfg, SERVE_RULES)
    host = select(cfg, "host")
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"host must be an address to listen on, e.g. 127.0.0.1 or 0.0.0.0, got {host!r}")
    realtime = select(cfg, "realtime")
    if realtime not in (ABSENT, None):
        from dmp_dl.realtime.service import RealtimeOptions  # faiss and the Recommender: only with realtime set

        RealtimeOptions.from_config(realtime)  # unknown keys: one line naming them
    journal = select(cfg, "journal")
    if journal not in (ABSENT, None, "") and select(cfg, "realtime.enabled") is not False:
        if not isinstance(journal, (str, os.PathLike)):
            raise ConfigError(f"journal must be a folder path (or null: beside the bundle), got {journal!r}")
        artifacts = select(cfg, "artifacts")
        if isinstance(artifacts, (str, os.PathLike)) and artifacts:
            from dmp_dl.realtime.service import check_journal_place

            check_journal_place(journal, artifacts)  # not inside the bundle folder, which every new bundle replaces
        problem = writable_dir_problem(str(journal))
        if problem:
            raise ConfigError(f"journal: {problem}; choose another folder with journal=DIR (or realtime.enabled=false)")
    return token_from(select(cfg, "token"), "token")


def token_from(value: Any, key: str = "token") -> str | None:
    """A bearer token as text: Hydra reads ``token=12345`` as an integer, which is taken as its
    digits; a float or boolean (``token=1e5``, ``token=true``) is refused, as is text that cannot
    travel in an HTTP header."""
    if value is None or value is ABSENT or value == "":
        return None
    if isinstance(value, bool) or isinstance(value, float):
        raise ConfigError(f"{key}={value!r} was read as a {type(value).__name__}; quote it so it stays text, "
                          f"e.g. {key}=\"'{value}'\"")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be text, got {value!r}")
    if not all(33 <= ord(c) < 127 for c in value):
        raise ConfigError(f"{key} must be printable ASCII without spaces (it travels in the Authorization header)")
    return value


def check_evaluate_config(cfg: DictConfig) -> None:
    check_finite(cfg)
    check_rules(cfg, EVALUATE_RULES)
    if select(cfg, "data") not in (ABSENT, None):
        check_data_config(cfg)
    check_output_dir(select(cfg, "output_dir"), "output_dir")


def check_audience_config(cfg: DictConfig) -> None:
    """Every setting of ``python -m dmp_dl.audience`` the task reads, and the output folder."""
    check_finite(cfg)
    check_rules(cfg, AUDIENCE_CLI_RULES[None])
    task = select(cfg, "task")
    task = AUDIENCE_TASK_ALIASES.get(task, task)
    check_rules(cfg, AUDIENCE_CLI_RULES.get(task, {}))
    if task == "uplift":  # every option of the model is in the rules: another key is a typo
        known = sorted(k.removeprefix("uplift.") for k in AUDIENCE_CLI_RULES["uplift"] if k.startswith("uplift."))
        given = select(cfg, "uplift")
        unknown = sorted(set(given) - set(known)) if isinstance(given, Mapping) else []
        if unknown:
            raise ConfigError(f"uplift: unknown key(s) {unknown}; known: {known}")
    if task == "target" and select(cfg, "budget") is None:
        raise ConfigError("budget is required: the most to spend on contacts, e.g. budget=5000")
    if task in ("measure", "uplift"):
        for key, what in (("assignments", "the campaign's target.csv (task=target ... control_frac=0.1)"),
                          ("outcomes", "the event log from the campaign's start on (user_id, timestamp, event_type, value)")):
            if select(cfg, key) in (None, ""):
                raise ConfigError(f"{key} is required: {what}")
    if task == "uplift":
        val, test = select(cfg, "uplift.val_frac"), select(cfg, "uplift.test_frac")
        if isinstance(val, (int, float)) and isinstance(test, (int, float)) and val + test >= 1:
            raise ConfigError(f"uplift.val_frac + uplift.test_frac must be below 1, got {val} + {test}")
    _input_paths(cfg, {"seeds": {}})  # the bundle: Bundle.open; campaign files: their readers name them
    check_output_dir(select(cfg, "output_dir"), "output_dir")


def check_export_config(cfg: DictConfig) -> tuple[str, Path]:
    """Every setting ``python -m dmp_dl.export`` reads, its id file and the file it will write,
    before the bundle is loaded. Returns the task (an alias resolved) and the file to write."""
    for name in ("task", "artifacts"):
        if OmegaConf.is_missing(cfg, name):
            raise ConfigError(f"{name} is required: python -m dmp_dl.export task={'|'.join(TASKS)} artifacts=DIR ...")
    task = TASK_ALIASES.get(str(cfg.task), str(cfg.task))
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    check_finite(cfg)
    check_rules(cfg, EXPORT_CLI_RULES[None])
    check_rules(cfg, EXPORT_CLI_RULES.get(task, {}))
    if task == "lookalike":
        if (select(cfg, "seeds") in (None, ABSENT)) == (select(cfg, "seed_ids") in (None, ABSENT)):
            raise ConfigError("task=lookalike needs the seed users as seeds=FILE or seed_ids=[id,...] (one of the two)")
        _input_paths(cfg, {"seeds": {}})
    else:
        users = select(cfg, "users")
        if users in (None, "", ABSENT):
            raise ConfigError("users must be `all` or a file of user ids (one per line, or a CSV/Parquet with a "
                              "user_id column)")
        if users != "all":
            _input_paths(cfg, {"users": {}})
    output = select(cfg, "output")
    if output in (None, "", ABSENT):
        output = Path(str(select(cfg, "output_dir"))) / f"{task}.{select(cfg, 'format')}"
        check_output_file(output, "output_dir", folder_key=True)
    else:
        check_output_file(output, "output")
    return task, Path(output)


def check_privacy_config(cfg: DictConfig) -> None:
    check_finite(cfg)
    _input_paths(cfg, {"user_ids": {}})


CHECKS: dict[str, Callable[[DictConfig], Any]] = {
    "train": check_train_config,
    "serve": check_serve_config,
    "evaluate": check_evaluate_config,
    "audience": check_audience_config,
    "export": check_export_config,
    "privacy": check_privacy_config,
}
