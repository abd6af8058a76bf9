"""``python -m dmp_dl.audience task=lookalike|segments|target|rule|overlap|measure|uplift ...`` (config:
``conf/audience_cli.yaml``).

lookalike, segments, target, rule: write the audience to ``<output_dir>/<task>.csv`` (or ``.parquet``)
and the summary to ``<task>_summary.json`` (``target`` also writes ``gains.csv``; ``rule`` with
``preview=true`` writes nothing and prints the size). overlap: the sizes, pairwise intersections
and Jaccard indexes of two or more audiences, printed as a table and written to ``overlap.csv``
and ``overlap_summary.json``. measure: the
campaign's lift (``measure_summary.json``, ``measure.md``, ``measure.html``). uplift: an uplift
model trained on a measured campaign, added to the bundle (``uplift_summary.json``, ``qini.csv``,
``uplift.md``, ``uplift.html``). Each prints its summary. A bad bundle, file, id or parameter is
one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dmp_dl.core.cli import CONF_DIR, report_errors
from dmp_dl.core.errors import ConfigError
from dmp_dl.core.io import atomic_write_text
from dmp_dl.pipeline.checks import check_audience_config

log = logging.getLogger("dmp_dl.audience")  # not __main__ under python -m

TASKS = ("lookalike", "segments", "target", "rule", "overlap", "measure", "uplift")
ALIASES = {"segment": "segments", "targeting": "target", "measurement": "measure"}
USAGE = "python -m dmp_dl.audience task=lookalike|segments|target|rule|overlap|measure|uplift artifacts=DIR ..."


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _int(cfg: DictConfig, name: str, low: int = 1) -> int:
    value = cfg.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
    return value


def run_task(cfg: DictConfig) -> dict:
    """Run ``cfg.task`` and write its files. Returns the summary (with the paths written)."""
    # the jobs (torch, faiss) load once the settings are checked, so a bad one is refused at once
    from dmp_dl.audience import jobs
    from dmp_dl.campaign.jobs import summary_json
    from dmp_dl.serving.recommender import Recommender

    if OmegaConf.is_missing(cfg, "task"):
        raise ConfigError(f"task is required: {USAGE}")
    task = ALIASES.get(str(cfg.task), str(cfg.task))
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    check_audience_config(cfg)  # every setting and the output folder, before any file is read
    out = Path(cfg.output_dir)
    if task == "measure":  # needs no bundle; with one, its training run's reading rules and id keys
        from dmp_dl.campaign.jobs import measure_job

        artifacts = None if OmegaConf.is_missing(cfg, "artifacts") or cfg.artifacts is None else str(cfg.artifacts)
        return measure_job(_campaign_files(cfg), out, str(cfg.metric), float(cfg.confidence), artifacts)
    if OmegaConf.is_missing(cfg, "artifacts"):
        raise ConfigError(f"artifacts is required: {USAGE}")
    fmt = str(cfg.get("format", "csv"))
    size = _int(cfg, "size") if task == "lookalike" else 1
    if task == "target":  # checked before the bundle is read
        from dmp_dl.campaign.control import check_fraction

        check_fraction(cfg.get("control_frac", 0.0))
        if str(cfg.get("score", "propensity")) not in jobs.SCORES:
            raise ConfigError(f"score must be one of {jobs.SCORES}, got {cfg.get('score')!r}")
    if task == "uplift":
        options = _uplift_options(cfg)
    rec = Recommender.load(cfg.artifacts, max_k=1000)
    if task in ("rule", "overlap"):
        return _rule_task(rec, cfg, task, out, fmt)
    if size > rec.n_users:
        log.warning("size=%d is more than the bundle's %d users: the audience can hold at most all of them", size, rec.n_users)
        size = rec.n_users
    rec.max_k = max(size, rec.max_k)  # lookalike audiences may be far larger than an API answer
    if task == "uplift":
        from dmp_dl.campaign.jobs import uplift_job

        return uplift_job(rec, str(cfg.artifacts), _campaign_files(cfg), out, options)
    extra = {}
    if task == "lookalike":
        if (cfg.get("seeds") is None) == (cfg.get("seed_ids") is None):
            raise ConfigError("give the seed users as seeds=FILE or seed_ids=[id,...] (one of the two)")
        if cfg.get("seeds") is not None:
            ids, source = jobs.read_seed_ids(cfg.seeds, str(cfg.get("seed_column", "user_id"))), str(cfg.seeds)
        else:
            from dmp_dl.data.id_lists import ids_from_config

            ids, source = ids_from_config(cfg.seed_ids, "seed_ids"), "seed_ids"
        table, summary = jobs.lookalike_job(rec, ids, size, str(cfg.method), source, bool(cfg.skip_unknown))
    elif task == "segments":
        k = None if cfg.get("k") is None else _int(cfg, "k")
        table, summary = jobs.segments_job(rec, k, representatives=_int(cfg, "representatives"))
    else:
        table, summary, gains = jobs.target_job(
            rec, cfg.get("budget"), _plain(cfg.cost), _plain(cfg.value), _plain(cfg.get("caps")), str(cfg.solver),
            float(cfg.time_limit), _int(cfg, "gains_points"), seed=_int(cfg, "seed", low=0), score=str(cfg.score),
            control_frac=cfg.control_frac, control_seed=None if cfg.control_seed is None else int(cfg.control_seed))
        extra["gains"] = str(jobs.write_table(gains, out / f"gains.{fmt}", fmt))
    summary["files"] = {"audience": str(jobs.write_table(table, out / f"{task}.{fmt}", fmt)), **extra}
    summary_path = out / f"{task}_summary.json"
    summary["files"]["summary"] = str(summary_path)
    atomic_write_text(summary_path, summary_json(summary))
    log.info("%s: %d users written to %s", task, len(table), summary["files"]["audience"])
    return summary


def _audience_specs(given) -> dict[str, dict]:
    """``audiences=`` as named specs: a number is a segment, ``file:PATH`` a saved audience, any
    other text a rule; a list is named by its entries (``segment 2``, the rule's text, the path)."""
    given = _plain(given)
    if isinstance(given, list):
        given = {(f"segment {v}" if isinstance(v, int) and not isinstance(v, bool) else str(v)): v for v in given}
    if not isinstance(given, dict):
        raise ConfigError("audiences must name two or more audiences, e.g. 'audiences={horror: \"interest.Horror > 0.2\", "
                          f"vip: \"file:vip.csv\", s1: 1}}' (a number: a segment); got {given!r}")
    specs = {}
    for name, value in given.items():
        if isinstance(value, dict):
            specs[str(name)] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            specs[str(name)] = {"segment": value}
        elif isinstance(value, str) and value.startswith("file:"):
            specs[str(name)] = {"file": value[len("file:"):]}
        else:
            specs[str(name)] = {"rule": value}
    return specs


def _rule_task(rec, cfg: DictConfig, task: str, out: Path, fmt: str) -> dict:
    from dmp_dl.audience import jobs, rule_audience
    from dmp_dl.campaign.jobs import summary_json

    if task == "rule":
        if cfg.get("rule") is None:
            raise ConfigError("rule is required, e.g. 'rule=\"interest.Horror > 0.2 and recency_days <= 90\"'")
        table, summary = rule_audience.rule_job(rec, str(cfg.rule))
        if cfg.get("preview", False):
            summary["preview"] = True
            log.info("rule: %d of %d users (preview: nothing written)", summary["users"], rec.n_users)
            return summary
    else:
        table, summary = rule_audience.overlap_job(rec, _audience_specs(cfg.get("audiences")))
    summary["files"] = {"audience" if task == "rule" else "pairs": str(jobs.write_table(table, out / f"{task}.{fmt}", fmt))}
    summary_path = out / f"{task}_summary.json"
    summary["files"]["summary"] = str(summary_path)
    atomic_write_text(summary_path, summary_json(summary))
    log.info("%s: %d rows written to %s", task, len(table), out / f"{task}.{fmt}")
    return summary


def _campaign_files(cfg: DictConfig):
    from dmp_dl.campaign.jobs import CampaignFiles

    def text(value):  # Hydra reads a file or column named 3 as an int
        return None if value is None else str(value)

    columns = {str(k): text(v) for k, v in (_plain(cfg.get("outcome_columns")) or {}).items()}
    return CampaignFiles(text(cfg.get("assignments")), text(cfg.get("outcomes")), cfg.get("conversion_event"),
                         cfg.get("start"), cfg.get("window_days"), columns, str(cfg.get("outcome_sep", "auto")))


def _uplift_options(cfg: DictConfig):
    from dmp_dl.campaign.uplift import UpliftOptions

    given = _plain(cfg.get("uplift")) or {}
    known = set(UpliftOptions.__dataclass_fields__)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"uplift: unknown key(s) {unknown}; known: {sorted(known)}")
    return UpliftOptions(**given)


def short(summary: dict) -> dict:
    """The summary to print: segment descriptions cut to size, label and mean propensity; a
    measurement without its per-segment and per-decile tables (the summary file has them in full)."""
    if summary.get("task") == "overlap":
        return {k: v for k, v in summary.items() if k not in ("pairs", "intersection")}
    if summary.get("task") in ("measure", "uplift"):
        return {k: v for k, v in summary.items() if k not in ("by_segment", "by_decile", "overall", "uplift_by_decile")}
    if "segments" not in summary:
        return summary
    keep = ("segment", "size", "label", "mean_propensity")
    return {**summary, "segments": [{k: d.get(k) for k in keep} for d in summary["segments"]]}


def run_limited(cfg: DictConfig) -> dict:
    """:func:`run_task` with at most ``cfg.num_threads`` BLAS/OpenMP threads (None: unchanged)."""
    from threadpoolctl import threadpool_limits

    threads = cfg.get("num_threads")
    if threads is None:
        return run_task(cfg)
    with threadpool_limits(limits=_int(cfg, "num_threads")):
        return run_task(cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="audience_cli")
def main(cfg: DictConfig) -> None:
    with report_errors():
        summary = run_limited(cfg)
        from dmp_dl.campaign.jobs import summary_json

        if summary.get("task") == "overlap":
            from dmp_dl.audience.rule_audience import overlap_text

            print(overlap_text(summary))
            print(f"written: {summary['files']['pairs']}, {summary['files']['summary']}")
            return
        print(summary_json(short(summary)))


if __name__ == "__main__":
    main()
