"""``dmp_dl.fit(events, items=None, users=None, **overrides)``: ``train.py`` from a notebook.

The run is the one ``python train.py data=events ...`` makes (the same Hydra config, stages and
seed), on pandas DataFrames instead of files, and it returns the loaded
:class:`~dmp_dl.serving.recommender.Recommender` with the run's ``metrics``::

    import dmp_dl
    rec = dmp_dl.fit(events, items=items, model="ease", **{"propensity.enabled": False})
    rec.metrics["ranking"]["ease"]["ndcg@20"]
    rec.recommend("u1", k=10, exclude_categories=["Horror"])

``overrides`` are ``train.py``'s settings as keyword arguments: a config group by its name
(``model="ease"``, ``trainer="cpu"``) and any other key by its dotted path, passed with ``**``
(``**{"model.time_budget_s": 10, "data.cleaning.min_value": 4}``). Values are Python values (numbers,
strings, lists, dicts, None). A key the config does not have is one :class:`ConfigError` naming it.
Without ``output_dir`` everything the run writes goes to a temporary folder that is removed once the
bundle is loaded; with it, the run's files are there as ``train.py`` writes them (the bundle under
``artifacts/``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dmp_dl.core.cli import CONF_DIR
from dmp_dl.core.errors import ConfigError
from dmp_dl.core.scratch import ScratchFolder

# data.* keys that name files: fit reads the DataFrames it is given instead
FILE_KEYS = ("data.path", "data.users", "data.items", "data.extra_paths", "data.source")


def compose_config(overrides: Mapping[str, Any], output_dir: str | Path) -> DictConfig:
    """``train.py``'s config with ``data=events``, the config groups among ``overrides`` chosen at
    composition and the other keys set after it, writing under ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    groups, values = ["data=events"], {}
    for key, value in overrides.items():
        if key == "data" or any(key == k or key.startswith(k + ".") for k in FILE_KEYS):
            raise ConfigError(f"fit: {key} cannot be set: fit trains on the DataFrames it is given "
                              "(data.cleaning.* and data.split.* can be set)")
        if "." not in key and isinstance(value, str) and (Path(CONF_DIR) / key).is_dir():
            groups.append(f"{key}={value}")
        else:
            values[key] = value
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=groups, return_hydra_config=False)
    except HydraException as exc:
        raise ConfigError(f"fit: {str(exc).strip().splitlines()[0]}") from None
    cfg.data.path = None
    cfg.paths.output_dir = str(output_dir)
    for key, value in values.items():
        if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            raise ConfigError(f"fit: unknown setting {key!r}: no such key in train.py's config (see conf/ and "
                              "`python train.py --cfg job`)")
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except (OmegaConfBaseException, ValueError) as exc:
            raise ConfigError(f"fit: cannot set {key}={value!r} ({str(exc).strip().splitlines()[0]})") from None
    if cfg.get("export") is not True:
        raise ConfigError("fit: export must stay true: the Recommender it returns is the run's bundle")
    return cfg


_ABSENT = object()


def fit(events, items=None, users=None, *, output_dir: str | Path | None = None, **overrides: Any):
    """Train on DataFrames as ``train.py`` trains on files; returns the loaded Recommender.

    events: (n_events,) rows with ``user_id``, ``item_id`` and optionally ``timestamp`` (epoch
        seconds or ISO-8601), ``event_type`` and ``value``; items: ``item_id`` plus attribute
        columns (``category``: what :meth:`Recommender.recommend`'s category rules read); users:
        ``user_id`` plus CRM attribute columns.
    output_dir: where the run writes (as ``paths.output_dir``); None: a temporary folder, removed
        once the bundle is loaded.
    overrides: ``train.py`` settings (module docstring).

    The Recommender's ``metrics`` is the run's ``metrics.json`` content: ``stages``, ``ranking``
    (test metrics of the model and the baselines), ``train``, ``propensity``, ``audience``.
    Bad input raises a :class:`~dmp_dl.core.errors.DmpError` naming the table, column or key.
    """
    from dmp_dl.core.logs import quiet_third_party
    from dmp_dl.data.frame_source import DataFrameSource
    from dmp_dl.pipeline.run import run
    from dmp_dl.serving.recommender import Recommender

    quiet_third_party()
    bad = [k for k in overrides if not isinstance(k, str) or not k]
    if bad:
        raise ConfigError(f"fit: setting names must be text, got {bad[0]!r}")
    source = DataFrameSource(events, users, items)
    with ScratchFolder("fit") as scratch:
        out = Path(output_dir) if output_dir is not None else Path(scratch)
        state = run(compose_config(overrides, out), source=source)
        recommender = Recommender.load(state["bundle_dir"])
    recommender.metrics = state["metrics"]
    return recommender
