"""``python -m dmp_dl.export task=recommendations|scores|segments|lookalike artifacts=DIR ...``
(config: ``conf/export.yaml``).

Writes the export to ``output`` (default ``<output_dir>/<task>.csv`` or ``.parquet``) atomically,
and its summary (rows, columns with their meaning, time) to ``<file>.summary.json``, which it also
prints. A bad bundle, file, id or parameter is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dmp_dl.cli import report_errors
from dmp_dl.errors import ConfigError
from dmp_dl.export.jobs import TASKS
from dmp_dl.export.tables import FORMATS
from dmp_dl.io import atomic_write_text

log = logging.getLogger("dmp_dl.export")  # not __main__ under python -m

ALIASES = {"recommend": "recommendations", "propensity": "scores", "segment": "segments"}


def _int(cfg: DictConfig, name: str, low: int = 1) -> int:
    value = cfg.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
    return value


def _flag(cfg: DictConfig, name: str) -> bool:
    value = cfg.get(name)
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def check_config(cfg: DictConfig) -> tuple[str, str]:
    """The task and format, after checking every key the task reads (before the bundle is loaded)."""
    for name in ("task", "artifacts"):
        if OmegaConf.is_missing(cfg, name):
            raise ConfigError(f"{name} is required: python -m dmp_dl.export task={'|'.join(TASKS)} artifacts=DIR ...")
    task = ALIASES.get(str(cfg.task), str(cfg.task))
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    fmt = str(cfg.get("format"))
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _int(cfg, "chunk_users")
    if task == "recommendations":
        _int(cfg, "k")
        _flag(cfg, "exclude_seen")
    if task == "lookalike":
        _int(cfg, "size")
        if (cfg.get("seeds") is None) == (cfg.get("seed_ids") is None):
            raise ConfigError("task=lookalike needs the seed users as seeds=FILE or seed_ids=[id,...] (one of the two)")
    elif cfg.get("users") in (None, ""):
        raise ConfigError("users must be `all` or a file of user ids (one per line, or a CSV/Parquet with a user_id column)")
    if cfg.get("progress") not in ("auto", True, False):
        raise ConfigError(f"progress must be auto (a bar on a terminal only), true or false, got {cfg.get('progress')!r}")
    return task, fmt


def run_export(cfg: DictConfig) -> dict:
    """Run ``cfg.task`` and write its file and summary. Returns the summary."""
    from dmp_dl.audience.jobs import read_seed_ids
    from dmp_dl.export import jobs
    from dmp_dl.recommender import Recommender

    task, fmt = check_config(cfg)
    path = Path(cfg.output) if cfg.get("output") else Path(cfg.output_dir) / f"{task}.{fmt}"
    size = _int(cfg, "size") if task == "lookalike" else 1
    rec = Recommender.load(cfg.artifacts, max_k=max(size, 1000))
    chunk = _int(cfg, "chunk_users")
    selection: dict = {}
    if task == "lookalike":
        if cfg.get("seeds") is not None:
            ids, source = read_seed_ids(cfg.seeds, str(cfg.get("seed_column", "user_id"))), str(cfg.seeds)
        else:
            given = OmegaConf.to_container(cfg.seed_ids) if OmegaConf.is_config(cfg.seed_ids) else cfg.seed_ids
            ids, source = [str(x) for x in (given if isinstance(given, list) else [given])], "seed_ids"
        export = jobs.lookalike(rec, ids, size, str(cfg.method), source, _flag(cfg, "skip_unknown"))
    else:
        users = None if str(cfg.users) == "all" else read_seed_ids(cfg.users, str(cfg.get("user_column", "user_id")), what="users")
        rows, selection = jobs.select_users(rec, users, str(cfg.users), _flag(cfg, "skip_unknown"))
        if task == "recommendations":
            export = jobs.recommendations(rec, rows, cfg.k, _flag(cfg, "exclude_seen"), chunk)
        elif task == "scores":
            export = jobs.scores(rec, rows, chunk)
        else:
            export = jobs.segments(rec, rows, chunk)
    progress = None if cfg.progress == "auto" else bool(cfg.progress)
    summary = jobs.write_export(export, path, fmt, progress)
    summary["bundle"] = str(cfg.artifacts)
    summary["user_ids"] = "pseudonyms" if rec.pseudonymizer is not None else "as in the training data"
    if selection:
        summary["selection"] = selection
    if summary.get("users_short"):
        log.warning("%d users have fewer than k=%d items left to recommend (they have seen nearly the whole "
                    "catalogue): they have fewer rows", summary["users_short"], summary["k"])
    summary_path = path.with_name(path.name + ".summary.json")
    summary["summary_file"] = str(summary_path)
    atomic_write_text(summary_path, json.dumps(summary, indent=1))
    log.info("%s: %d rows for %d users written to %s in %.1f s", task, summary["rows"], summary["users"], path,
             summary["seconds"])
    return summary


def run_limited(cfg: DictConfig) -> dict:
    """:func:`run_export` with at most ``cfg.num_threads`` BLAS/OpenMP threads (None: unchanged)."""
    from threadpoolctl import threadpool_limits

    if cfg.get("num_threads") is None:
        return run_export(cfg)
    with threadpool_limits(limits=_int(cfg, "num_threads")):
        return run_export(cfg)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with report_errors():
        summary = run_limited(cfg)
        print(json.dumps({k: v for k, v in summary.items() if k != "columns"}, indent=1))


if __name__ == "__main__":
    main()
