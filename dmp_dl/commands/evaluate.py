"""Re-create the offline report from an artifact bundle: ``python -m dmp_dl.evaluate artifacts=DIR``.

::

    python -m dmp_dl.evaluate artifacts=outputs/<run>/artifacts                 # the run's own data
    python -m dmp_dl.evaluate artifacts=DIR data=events data.path=new.csv      # the bundle on other data
    python -m dmp_dl.evaluate artifacts=DIR output_dir=/tmp/report evaluation.ks=[10,100]

bundle (checksums verified) -> network rebuilt from ``network/`` -> data: the bundle's training data
rebuilt from its manifest's config, or ``data=...`` -> the test split in the bundle's index space
(unknown users and items counted and left out) -> the network and the baselines ranked with the
protocol of ``train.py``, user vectors from the events before the test period -> propensity test predictions
re-derived when the bundle has the model and the data are its training data ->
``report.json``, ``report.md``, ``report.html`` in ``output_dir``.

The bundle's ``user_vectors.npy`` are never used for scoring: they are computed from each user's
full history, test period included, and would leak the held-out items into the ranking.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import scipy.sparse as sp
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dmp_dl.audience.bundle import load_segments
from dmp_dl.core.cli import CONF_DIR, report_errors
from dmp_dl.core.errors import BundleError, ConfigError, DataError, DmpError
from dmp_dl.core.memory import reuse_freed_blocks
from dmp_dl.data.vocab import IdVocab
from dmp_dl.evaluation.heldout import evaluate_model_and_baselines, map_to_vocabularies, pair_matrix
from dmp_dl.evaluation.report import PropensityInputs, SegmentInputs
from dmp_dl.models.parts import load_network
from dmp_dl.pipeline.checks import check_data_config, check_evaluate_config
from dmp_dl.pipeline.run import load_data
from dmp_dl.store.bundle import ITEM_VOCAB, PROPENSITY_DIR, USER_VECTORS, USER_VOCAB, Bundle
from dmp_dl.store.renames import current_targets
from dmp_dl.training.fit import config_to_dict

log = logging.getLogger("dmp_dl.evaluate")  # not __main__ under python -m

# Settings of the `evaluation` group that decide the ranking numbers; null in conf/evaluate.yaml = the bundle's.
RANKING_SETTINGS = ("ks", "baselines", "ease_l2", "ease_max_items")


def training_config(bundle: Bundle) -> DictConfig:
    """The resolved config of the run that exported ``bundle`` (``manifest["config"]``)."""
    config = bundle.manifest.get("config")
    if not isinstance(config, Mapping) or not config:
        raise BundleError(f"{bundle.root / 'manifest.json'}: no training config stored; export the bundle again "
                          "with this version")
    return OmegaConf.create(current_targets(dict(config)))


def data_config(cfg: DictConfig, run_cfg: DictConfig, where: Path) -> tuple[DictConfig, str]:
    """The resolved ``data`` node to build, and where it comes from.

    * no ``data`` in ``cfg``: the training run's (``"training"``);
    * ``data=<group>`` (a node with ``_target_``): that config (``"override"``), with the training
      run's ``data.privacy`` when it sets none (ids must be pseudonymised as the bundle's were);
    * only keys, e.g. ``+data.path=DIR``: the training run's with those keys changed
      (``"training with overrides"``), for data that moved.

    ``cfg.seed`` null takes the run's seed first, so the split (``data.split.seed``) and synthetic
    data of a data override follow training's.
    """
    with open_dict(cfg):
        if cfg.get("seed") is None:
            cfg.seed = run_cfg.get("seed")
    given = cfg.get("data")
    if given is not None and "_target_" in given:
        node = OmegaConf.create(config_to_dict(given))
        trained_privacy = (run_cfg.get("data") or {}).get("privacy")
        if node.get("privacy") is None and trained_privacy is not None:
            # The bundle's user ids went through the run's privacy settings (pseudonyms, erasures):
            # other data must too, or none of their users would match.
            with open_dict(node):
                node.privacy = trained_privacy
        return node, "override"
    if run_cfg.get("data") is None:
        raise BundleError(f"{where}: the stored training config has no data section; pass data=... to choose the data")
    if given is None:
        return run_cfg.data, "training"
    return OmegaConf.merge(run_cfg.data, OmegaConf.create(config_to_dict(given))), "training with overrides"


def build_data(node: DictConfig):
    """The prepared DataModule of the ``data`` config ``node``. A :class:`DmpError` raised while
    it is built (a bad option) comes out as itself, not wrapped in Hydra's InstantiationException,
    so the command reports it in one line."""
    try:
        return load_data(OmegaConf.create({"data": node}))
    except InstantiationException as exc:
        if isinstance(exc.__cause__, DmpError):
            raise exc.__cause__ from None
        raise


def evaluation_settings(cfg: DictConfig, run_cfg: DictConfig) -> dict[str, Any]:
    """``cfg.evaluation`` with each null ranking setting taken from the training run (so its
    ``metrics.json`` is reproduced unless a setting is overridden)."""
    settings = config_to_dict(cfg.evaluation) if cfg.get("evaluation") is not None else {}
    trained = config_to_dict(run_cfg.evaluation) if run_cfg.get("evaluation") is not None else {}
    for key in RANKING_SETTINGS:
        if settings.get(key) is None and trained.get(key) is not None:
            settings[key] = trained[key]
    return settings


def bundle_view(data_quality: Mapping, counts: Mapping, n_items: int) -> dict:
    """``data_quality`` as the report should quote it when the data are not the bundle's own:
    the catalogue is the bundle's items and the test counts those of the users and items it knows;
    what the data had and what was left out is under ``bundle_mapping``."""
    out = dict(data_quality)
    split = dict(out.get("split") or {})
    out["bundle_mapping"] = {"data_users": out.get("n_users"), "data_items": out.get("n_items"),
                             "data_test_users": split.get("test_users"), "data_test_pairs": split.get("test_pairs"),
                             **{k: v for k, v in counts.items() if k not in ("test_users", "test_pairs")}}
    split.update(test_users=counts["test_users"], test_pairs=counts["test_pairs"])
    out["split"], out["n_items"] = split, int(n_items)
    return out


def mapping_note(counts: Mapping, origin: str) -> str:
    """The protocol statement on which data were evaluated (``origin``: see :func:`data_config`)
    and what was left out."""
    where = {
        "training": "rebuilt from the bundle's training config (source, cleaning and split as in training)",
        "training with overrides": "built from the bundle's training config with the data overrides given",
        "override": "given by the data override (cleaned and split with their own config)",
    }[origin]
    if counts["same_vocabularies"]:
        return f"The data were {where}; their user and item vocabularies are the bundle's."
    return (f"The data were {where} and mapped onto the bundle's vocabularies by id: {counts['users_unknown']} users "
            f"and {counts['items_unknown']} items the bundle does not know are left out ({counts['train_events_unknown']} "
            f"training and {counts['test_events_unknown']} test events; {counts['test_pairs_unknown_item']} held-out "
            f"user-item pairs with an unknown item; {counts['test_users_dropped']} test users left without a relevant "
            "item). The catalogue ranked is the bundle's; users are described by the attributes stored in the "
            "bundle's network.")


# -- propensity -------------------------------------------------------------------------------
def propensity_inputs(bundle: Bundle, run_cfg: DictConfig, dm) -> tuple[PropensityInputs | None, str]:
    """The propensity section's inputs re-derived from the bundle, or (None, why not).

    The served model's test predictions are recomputed exactly as in training: the task (cutoff,
    labels) and the stratified user split are rebuilt from the training config, the features from
    the data up to the cutoff, and the stored model and calibration score them. That is only
    possible on the bundle's training data, checked by the rebuilt feature encoding and task
    matching the stored ones. The models the bundle does not serve are not in it: their metrics are
    the ones recorded at training, without curves.

    Returns (inputs, protocol statement) or (None, the reason the section is absent).
    """
    if not bundle.has(PROPENSITY_DIR):
        return None, "the bundle has no propensity model (its run did not train one)"
    from dmp_dl.metrics.classification import binary_metrics
    from dmp_dl.propensity import load_propensity
    from dmp_dl.propensity.bundle import SPEC_FILE
    from dmp_dl.propensity.features import UserFeatures
    from dmp_dl.propensity.train import build_task, split_users, stage_threads

    p = run_cfg.get("propensity")
    if p is None:
        return None, "the bundle's training config has no propensity section, so its test users cannot be rebuilt"
    scorer = load_propensity(bundle.file(PROPENSITY_DIR))
    stored = bundle.json(f"{PROPENSITY_DIR}/{SPEC_FILE}")
    not_training_data = ("the data are not the propensity model's training data ({}), and its test users, cutoff "
                         "and labels are defined on those; its recorded test metrics are in the bundle's manifest "
                         "(propensity.metrics)")
    with stage_threads(p, dm.n_users):
        used = scorer.features
        features = UserFeatures.build(dm, used.behaviour, bool(p.features.get("attributes", True)),
                                      used.encoder_attributes is not None, p.get("label_column"))
        if json.loads(json.dumps(features.spec())) != stored["features"]:
            return None, not_training_data.format("their feature encoding differs from the stored one")
        task = build_task(p, dm)
        summary, recorded = task.summary(), stored.get("task") or {}
        if any(summary[k] != recorded.get(k) for k in ("cutoff", "eligible_users", "positives")):
            return None, not_training_data.format("the cutoff, eligible users or positives differ from the stored task")
        _, _, test = split_users(task.labels, float(p.split.val_frac), float(p.split.test_frac),
                                 int(p.split.get("seed", run_cfg.get("seed", 0))))
        labels = task.labels[test]
        # As in training: the snapshot of every eligible user, then the test rows.
        predictions = scorer.score_snapshot(features.known(dm.events, task.users, task.cutoff).take(test))
    served = scorer.served
    metrics = {name: dict(m) for name, m in (stored.get("metrics") or {}).items()}
    recomputed = binary_metrics(labels, predictions, int(p.get("ece_bins", 10)))
    gaps = [abs(recomputed[k] - v) for k, v in metrics.get(served, {}).items()
            if isinstance(v, float) and np.isfinite(recomputed.get(k, np.nan))]
    metrics[served] = recomputed
    others = [n for n in metrics if n != served]
    note = (f"{served}: test predictions re-derived from the bundle (the training run's cutoff "
            f"{summary['cutoff_iso']}, labels, user split and features; stored model and calibration); its metrics "
            f"match the recorded ones to {max(gaps, default=float('nan')):.1e}.")
    if others:
        note += (f" {', '.join(others)}: not served, so not stored in the bundle; their metrics are those recorded at "
                 "training on the same test users, without curves or gains.")
    return PropensityInputs(metrics=metrics, labels=labels, predictions={served: predictions}, served=served), note


# -- leakage ----------------------------------------------------------------------------------
OVERLAP_WARNING_SHARE = 0.1  # a later log shares a few pairs with the old one (repeat buyers); the same log nearly all


def heldout_overlap(bundle: Bundle, dm, split, counts: Mapping, origin: str, same_split_config: bool) -> dict[str, Any]:
    """How many evaluated held-out pairs the bundle's model may have learned from.

    The bundle's seen-items matrix holds every (user, item) pair of its training data, test period
    included. A held-out pair found there was fitted on when the bundle was refitted on every event
    (``scoring.refit``), or when the data were split anew: the training run's split put some of
    those pairs into what the model was trained on. Only the run's own split of its own data (the
    same pairs, the same split settings) keeps them out of a model that was not refitted.

    dm: the evaluated data; split: their :class:`HeldOutSplit` in the bundle's index space. Returns
    ``{"heldout_pairs", "in_bundle_training_data", "share", "refit", "same_split", "warning"}``
    (``warning``: the one line to print, or None).
    """
    from dmp_dl.store.bundle import SEEN_INDPTR, SEEN_ITEMS

    relevant = (split.test.relevant > 0).astype(np.int8).tocsr()
    indptr, items = bundle.array(SEEN_INDPTR), bundle.array(SEEN_ITEMS)
    trained_pairs = sp.csr_matrix((np.ones(len(items), np.int8), items, indptr), shape=relevant.shape)
    total, inside = int(relevant.nnz), int(relevant.multiply(trained_pairs).nnz)
    scoring = bundle.manifest.get("scoring")
    refit = bool(isinstance(scoring, dict) and scoring.get("refit"))
    same_split = origin == "training"
    if not same_split and same_split_config and counts["same_vocabularies"]:  # then the indices are the bundle's
        evaluated_pairs = pair_matrix(*relevant.shape, dm.events["user_idx"].to_numpy(), dm.events["item_idx"].to_numpy())
        same_split = (evaluated_pairs.astype(bool) != trained_pairs.astype(bool)).nnz == 0
    share = inside / total if total else 0.0
    warning = None
    if share >= OVERLAP_WARNING_SHARE and (refit or not same_split):
        how = ("it was refitted on every event of its training data" if refit else
               "these data were split anew, and the training run's split trained the model on some of them")
        warning = (f"leakage: {share:.0%} of the evaluated held-out user-item pairs ({inside} of {total}) are events "
                   f"of the bundle's training data and {how}: these metrics are not held-out numbers; evaluate on "
                   "events after its training data, or read the training run's metrics.json")
    return {"heldout_pairs": total, "in_bundle_training_data": inside, "share": share, "refit": refit,
            "same_split": bool(same_split), "warning": warning}


# -- the report -------------------------------------------------------------------------------
def evaluate_bundle(cfg: DictConfig) -> dict[str, Any]:
    """Recompute the bundle's test metrics and write its report into ``cfg.output_dir``.

    Returns ``ranking`` (name -> metrics), ``counts`` (what the id mapping left out), ``overlap``
    (:func:`heldout_overlap`: held-out pairs the bundle may have been fitted on; also in
    ``report.json["train"]["heldout_overlap"]``), ``propensity`` (:class:`PropensityInputs` or None) and ``report`` (format -> path).
    """
    if OmegaConf.is_missing(cfg, "artifacts") or not cfg.get("artifacts"):
        raise ConfigError("artifacts: set artifacts=DIR to an exported bundle (e.g. outputs/<run>/artifacts)")
    if cfg.get("evaluation") is None or cfg.evaluation.get("report") is None:
        raise ConfigError("evaluation.report: null writes nothing, and the report is all this command makes; remove the override")
    check_evaluate_config(cfg)  # every setting and the output folder, before the bundle is read
    bundle = Bundle.open(cfg.artifacts)
    run_cfg = training_config(bundle)
    net, _, history_len = load_network(bundle)
    user_vocab, item_vocab = IdVocab.load(bundle.file(USER_VOCAB)), IdVocab.load(bundle.file(ITEM_VOCAB))
    data_node, origin = data_config(cfg, run_cfg, bundle.root / "manifest.json")
    check_data_config(OmegaConf.create({"data": data_node}), paths=False)  # files: read_table names them
    try:
        dm = build_data(data_node)
    except DataError as exc:
        if origin != "training":
            raise
        raise DataError(f"{exc}; these are the files of the bundle's training config: give their current "
                        "location with +data.path=... (or choose other data with data=...)") from None
    log.info(dm.report.summary())
    rows_entry = bundle.manifest.get("user_rows")  # users are encoded from rows decayed as the bundle's were
    dm.use_half_life(rows_entry.get("half_life_days") if isinstance(rows_entry, dict) else None)

    split, counts = map_to_vocabularies(dm, user_vocab, item_vocab, history_len)
    settings = evaluation_settings(cfg, run_cfg)
    scoring = bundle.manifest.get("scoring")
    if settings.get("ease_l2") is None and isinstance(scoring, dict) and scoring.get("ease_l2") is not None:
        settings["ease_l2"] = float(scoring["ease_l2"])  # the l2 the run chose on validation
    model_name = str((run_cfg.get("model") or {}).get("name", "model"))
    from dmp_dl.models.scoring import load_scoring

    with reuse_freed_blocks():  # scoring batches of users by the catalogue, as in the training run
        ranking = evaluate_model_and_baselines(net, model_name, split, settings, served=load_scoring(bundle, split.n_items))
    same_split_config = config_to_dict(data_node.get("split") or {}) == config_to_dict((run_cfg.get("data") or {}).get("split") or {})
    overlap = heldout_overlap(bundle, dm, split, counts, origin, same_split_config)
    if overlap["warning"]:
        log.warning(overlap["warning"])
    for name, m in ranking.items():
        log.info("test %-12s recall@20=%.4f ndcg@20=%.4f", name, m.get("recall@20", float("nan")), m.get("ndcg@20", float("nan")))

    data_quality = dm.report.to_dict()
    if not counts["same_vocabularies"]:
        data_quality = bundle_view(data_quality, counts, split.n_items)
    notes = {
        "bundle": f"Re-created by python -m dmp_dl.evaluate from the bundle {bundle.root.resolve()} (exported "
                  f"{bundle.manifest.get('created_at', '?')}): the network is rebuilt from its stored weights and each "
                  "user's vector is recomputed from their events before the test period (the bundle's user_vectors.npy include the "
                  "test period and are not used); the baselines are refitted on the training split.",
        "data": mapping_note(counts, origin),
    }
    trained_settings = config_to_dict(run_cfg.evaluation) if run_cfg.get("evaluation") is not None else {}
    changed = [k for k in RANKING_SETTINGS if k in trained_settings and settings.get(k) != trained_settings[k]]
    if overlap["warning"]:
        notes["leakage"] = overlap["warning"][len("leakage: "):] + "."
    if changed:
        notes["settings"] = ("Evaluation settings differ from the training run's (" + "; ".join(
            f"{k}: {settings.get(k)} instead of {trained_settings[k]}" for k in changed) + ").")
    absent = {}
    segments = segment_inputs(bundle, len(user_vocab))
    if segments is None:
        absent["segments"] = "the bundle has no user segments"
    propensity, statement = propensity_inputs(bundle, run_cfg, dm)
    if propensity is None:
        absent["propensity"] = statement
    else:
        notes["propensity"] = statement
    config = {**config_to_dict(run_cfg), "data": config_to_dict(data_node), "evaluation": settings}
    bundle_facts = {
        "bundle": str(bundle.root.resolve()),
        "exported": bundle.manifest.get("created_at"),
        "network": (bundle.manifest.get("network") or {}).get("class"),
        "dim": bundle.manifest.get("dim"),
        "bundle_users": len(user_vocab),
        "bundle_items": len(item_vocab),
        "dmp_dl_version": (bundle.manifest.get("packages") or {}).get("dmp_dl"),
        "heldout_overlap": overlap,
    }
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = instantiate(cfg.evaluation.report)(
        out, config=config, data_quality=data_quality, ranking=ranking, model_name=model_name, train=bundle_facts,
        propensity=propensity, segments=segments, protocol_notes=notes, absent=absent,
    )
    return {"ranking": ranking, "counts": counts, "overlap": overlap, "propensity": propensity, "report": paths}


def segment_inputs(bundle: Bundle, n_users: int) -> SegmentInputs | None:
    """The segment section from the bundle's stored assignments and user vectors (None without segments)."""
    stored = load_segments(bundle, n_users)
    if stored is None:
        return None
    return SegmentInputs(assignments=stored.assignments, user_vectors=bundle.array(USER_VECTORS),
                         descriptions=stored.describe(np.arange(n_users), 0))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with report_errors():
        evaluate_bundle(cfg)


if __name__ == "__main__":
    main()
