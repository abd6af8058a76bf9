"""The whole training job as an ordered list of stages: ``run(cfg)``.

    data -> model -> evaluation -> propensity -> audience -> export -> report

The embeddings and the bundle are the job: ``data``, ``model`` and ``export`` must succeed.
``evaluation``, ``propensity``, ``audience`` and ``report`` are optional: when the data cannot
support one (no held-out users, a time span shorter than the label window, too few positives, no
event times, too few users for the segments) it is skipped with one warning line and its reason,
and the bundle is exported without that part (the API answers 409 for it); ``<stage>.required=true``
makes such a skip the one-line error it used to be. How each stage ended is in
``metrics.json["stages"]``, the bundle's manifest and the report (see :mod:`dmp_dl.pipeline.stages`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dmp_dl.core.errors import ConfigError, InsufficientDataError
from dmp_dl.core.io import atomic_write_text
from dmp_dl.core.memory import reusing_freed_blocks
from dmp_dl.core.memory_watch import MemoryWatch
from dmp_dl.data.datamodule import InteractionDataModule
from dmp_dl.evaluation.heldout import HeldOutSplit, evaluate_model_and_baselines
from dmp_dl.pipeline.checks import check_index_for_data, check_train_config
from dmp_dl.pipeline.stages import SkipStage, Stage, StageResult, run_stages
from dmp_dl.privacy.training import PrivacyHooks
from dmp_dl.training.fit import config_to_dict
from dmp_dl.training.fitters import check_network, fitter_of

log = logging.getLogger(__name__)


def load_data(cfg: DictConfig, source: object | None = None) -> InteractionDataModule:
    """The prepared DataModule for ``cfg.data``; ``source``: a source object with ``load()`` that
    replaces ``cfg.data.source`` (e.g. DataFrames in memory: :mod:`dmp_dl.data.frame_source`)."""
    return instantiate(cfg.data, _convert_="all", **({} if source is None else {"source": source})).prepare()


def _enabled(cfg: DictConfig, group: str) -> bool:
    node = cfg.get(group)
    return node is not None and bool(node.get("enabled", False))


# -- the stages: each reads and adds to `state` (what run() returns) ----------------------------
def data_stage(cfg: DictConfig, state: dict) -> None:
    out = Path(cfg.paths.output_dir)
    dm = state["datamodule"] = load_data(cfg, state.get("source"))
    check_index_for_data(cfg, dm)  # index options against the data's size, before training
    dm.report.write_json(out / "data_quality.json")
    log.info(dm.report.summary())


def model_stage(cfg: DictConfig, state: dict) -> None:
    state["privacy"] = PrivacyHooks.from_config(cfg)
    fitter_of(cfg).fit(cfg, state)  # model.fitter: the Lightning loop or the automatic choice (dmp_dl.training.fitters)


def evaluation_stage(cfg: DictConfig, state: dict) -> None:
    dm = state["datamodule"]
    split = HeldOutSplit.from_datamodule(dm)
    choice = state.get("choice")
    if len(split.test) == 0:
        s = dm.report.split
        raise InsufficientDataError(
            f"no test user has a held-out item to rank ({s['events']['test']} test events; "
            f"{s['test_pairs_already_seen']} of their user-item pairs were already seen in training, "
            f"{s['test_events_user_unseen_in_train']} belong to users unseen in training)")
    if choice is not None:  # scored by the model stage on its held-out fits (the bundle's are refitted)
        ranking = choice.ranking
    elif "held_out_error" in state:
        raise state["held_out_error"]
    elif "held_out_ranking" in state:  # two_tower / mf scored before their final fit
        ranking = state["held_out_ranking"]
    else:
        ranking = evaluate_model_and_baselines(state["module"].net, cfg.model.get("name", "model"), split,
                                               cfg.get("evaluation", {}))
    state["metrics"]["ranking"] = ranking
    for name, m in ranking.items():
        log.info("test %-12s recall@20=%.4f ndcg@20=%.4f", name, m.get("recall@20", float("nan")), m.get("ndcg@20", float("nan")))


def propensity_stage(cfg: DictConfig, state: dict) -> str | None:
    if not _enabled(cfg, "propensity"):
        raise SkipStage("propensity.enabled=false")
    from dmp_dl.propensity import train_propensity  # a stage's modules load when it runs: a skipped one costs nothing

    result = state["propensity"] = train_propensity(cfg, state["datamodule"], state["module"].net,
                                                    state.get("network_kwargs"))
    state["metrics"]["propensity"] = result.summary()
    return None


def final_embeddings(state: dict) -> tuple[np.ndarray, np.ndarray]:
    """(user vectors (n_users, d), item vectors (n_items, d)) of the served network, each user
    encoded from their full history: computed once (``state["embeddings"]``) for the segments and
    the bundle, which must hold the same vectors."""
    if state.get("embeddings") is None:
        from dmp_dl.models.embeddings import export_embeddings

        state["embeddings"] = export_embeddings(state["module"].net, state["datamodule"].full_history)
    return state["embeddings"]


def audience_stage(cfg: DictConfig, state: dict) -> str | None:
    if not _enabled(cfg, "audience"):
        raise SkipStage("audience.enabled=false")
    from dmp_dl.audience.build import build_audience

    if not state["datamodule"].has_timestamps:
        log.info("audience: the log has no event times, so interest profiles are weighted counts without time decay")
    audience = state["audience"] = build_audience(cfg.audience, state["datamodule"], final_embeddings(state)[0],
                                                  state.get("propensity"))
    state["metrics"]["audience"] = audience.summary()
    state["bundle_parts"] = {**state.get("bundle_parts", {}), **audience.bundle_parts()}
    return f"segments not built: {audience.segments_skipped}" if audience.segments_skipped else None


def realtime_parts(state: dict) -> dict[str, Any]:
    """The bundle part real-time updates need (recent items in order, propensity statistics, item
    categories: :mod:`dmp_dl.realtime.part`). Without it a server still takes events, less exactly,
    so a failure to build it is one warning, not a failed export."""
    from dmp_dl.realtime.part import PART, realtime_part

    try:
        return {PART: realtime_part(state["datamodule"], state.get("propensity"), state.get("audience"))}
    except Exception as exc:  # noqa: BLE001 - an optional part
        log.warning("the bundle gets no realtime part (%s: %s): real-time updates of known users will be less exact",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        log.debug("realtime part", exc_info=True)
        return {}


def item_category_parts(cfg: DictConfig, state: dict) -> dict[str, Any]:
    """The bundle part with each item's categories (what the category rules of a recommendation
    read: :mod:`dmp_dl.serving.item_rules`), from the item table's category column
    (``audience.profiles.category_column``, else the first of category / categories / genre /
    genres); none when the run has no item table or no such column."""
    from dmp_dl.audience.profiles import CATEGORY_COLUMNS, item_category_shares
    from dmp_dl.data.schema import ITEM
    from dmp_dl.serving.item_rules import PART, item_categories_part

    dm = state["datamodule"]
    items = dm.log_.items
    if items is None or not len(items):
        return {}
    column = OmegaConf.select(cfg, "audience.profiles.category_column", default=None)
    column = column if column in items.columns else next((c for c in CATEGORY_COLUMNS if c in items.columns), None)
    if column is None or column == ITEM:
        return {}
    members, names = item_category_shares(items, column, dm.item_vocab.index_of(items[ITEM].tolist()), dm.n_items)
    return {PART: item_categories_part(members, names, column)}


def export_stage(cfg: DictConfig, state: dict) -> None:
    if not cfg.get("export", True):
        raise SkipStage("export=false")
    from dmp_dl.training.export import export_run

    stages = {name: r.to_dict() for name, r in state["stage_results"].items()}
    state["bundle_parts"] = {**state.get("bundle_parts", {}), **state["privacy"].bundle_parts(),
                             **realtime_parts(state), **item_category_parts(cfg, state), "stages": lambda writer: stages}
    final_embeddings(state)
    state["bundle_dir"] = export_run(cfg, state, Path(cfg.paths.output_dir) / "artifacts")
    log.info("bundle written to %s", state["bundle_dir"])


def report_stage(cfg: DictConfig, state: dict) -> None:
    report = cfg.get("evaluation", {}).get("report")
    if report is None:
        raise SkipStage("evaluation.report=null")
    dm, metrics = state["datamodule"], state["metrics"]
    state["report"] = instantiate(report)(
        Path(cfg.paths.output_dir), config=config_to_dict(cfg), data_quality=dm.report.to_dict(),
        ranking=metrics["ranking"], model_name=cfg.model.get("name", "model"), train=metrics.get("train"),
        propensity=state.get("propensity"),
        segments=state["audience"].segment_inputs() if "audience" in state else None,
        stages={name: r.to_dict() for name, r in state["stage_results"].items()},
    )


# after the data stage (which hands its freed memory back step by step, to keep its peak low) the
# allocator keeps freed blocks of up to 256 MiB for reuse: every training step and scoring batch
# allocates blocks of a batch of users by the catalogue
STAGES: tuple[Stage, ...] = (
    Stage("data", data_stage),
    Stage("model", reusing_freed_blocks(model_stage)),
    Stage("evaluation", reusing_freed_blocks(evaluation_stage), optional=True),
    Stage("propensity", reusing_freed_blocks(propensity_stage), optional=True),
    Stage("audience", reusing_freed_blocks(audience_stage), optional=True),
    Stage("export", reusing_freed_blocks(export_stage)),
    Stage("report", reusing_freed_blocks(report_stage), optional=True),
)


def check_settings(cfg: DictConfig) -> None:
    """Settings that contradict each other or name missing files, refused before any data is read."""
    from dmp_dl.training.warm_start import check_init_from

    check_network(cfg)
    check_init_from(cfg.get("init_from"))
    for group in ("propensity", "audience"):
        node = cfg.get(group)
        if node is not None and node.get("required") is True and not node.get("enabled", False):
            raise ConfigError(f"{group}.required=true but {group}.enabled=false: enable the stage or drop required")
    if cfg.get("report", {}).get("required") is True and cfg.get("evaluation", {}).get("report") is None:
        raise ConfigError("report.required=true but evaluation.report=null: configure the report or drop required")
    if _enabled(cfg, "propensity"):
        serve = cfg.propensity.get("serve", "best")
        allowed = ["best", "mlp", *(cfg.propensity.get("baselines") or {})]
        if serve not in allowed:
            raise ConfigError(f"propensity.serve must be one of {allowed}, got {serve!r}")


def run(cfg: DictConfig, source: object | None = None) -> dict[str, Any]:
    """Run the stages as configured (``source``: the data instead of ``cfg.data.source``, see
    :func:`load_data`). Returns what they built: ``datamodule``, ``module``,
    ``trainer``, ``metrics`` (also ``metrics.json``), ``stages`` (name -> :class:`StageResult`) and,
    when they ran, ``propensity``, ``audience``, ``embeddings`` (:func:`final_embeddings`), ``bundle_dir``
    and ``report``.

    Everything is written under ``cfg.paths.output_dir``; ``metrics.json`` is rewritten after every
    stage, so it always says how far the run got.
    """
    check_train_config(cfg)  # every setting, before any data are read
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    check_settings(cfg)
    t0 = time.perf_counter()
    state: dict[str, Any] = {"metrics": {"stages": {}, "ranking": {}}, "stage_results": {}, "source": source}

    watch = MemoryWatch(stage=STAGES[0].name)  # a warning in the log before the system stops a run short of memory

    def record(results: dict[str, StageResult]) -> None:
        for name, result in results.items():
            if result.peak_rss_gib is None:
                result.peak_rss_gib = watch.peak_gib(name)
        state["stage_results"] = results
        state["metrics"]["stages"] = {name: r.to_dict() for name, r in results.items()}
        state["metrics"]["total_seconds"] = time.perf_counter() - t0
        if not state.get("halt"):
            atomic_write_text(out / "metrics.json", json.dumps(state["metrics"], indent=2, default=str))

    names = [stage.name for stage in STAGES]
    after_evaluation = names[names.index("evaluation") + 1]  # every stage is announced, skipped or not
    with watch, contextlib.ExitStack() as aside:

        def before(name: str) -> None:
            watch.enter_stage(name)
            dm = state.get("datamodule")
            if name == after_evaluation and hasattr(dm, "model_inputs_on_disk"):
                aside.enter_context(dm.model_inputs_on_disk())  # the later stages' peaks without what they never read

        state["stages"] = run_stages(cfg, STAGES, state, after_each=record, before_each=before)
    return state
