"""``python -m dmp_dl.export task=recommendations|scores|segments|lookalike artifacts=DIR ...``
(config: ``conf/export.yaml``).

Writes the export to ``output`` (default ``<output_dir>/<task>.csv`` or ``.parquet``) atomically,
and its summary (rows, columns with their meaning, time) to ``<file>.summary.json``, which it also
prints. Every setting, the id file and the place to write are checked before the bundle is loaded;
a bad bundle, file, id or parameter is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

from dmp_dl.core.cli import CONF_DIR, report_errors
from dmp_dl.core.io import atomic_write_text
from dmp_dl.pipeline.checks import THREADS, FileMode, check_export_config, check_rules

log = logging.getLogger("dmp_dl.export")  # not __main__ under python -m


def read_ids(cfg: DictConfig, task: str) -> tuple[list[str] | None, str]:
    """The user ids the task is for (None: every user) and where they came from, for messages:
    the seeds of ``task=lookalike`` (``seeds=FILE`` or ``seed_ids=[...]``), else ``users=FILE``."""
    from dmp_dl.data.id_lists import ids_from_config, read_id_file

    if task == "lookalike":
        if cfg.seeds is None:
            return ids_from_config(cfg.seed_ids, "seed_ids"), "seed_ids"
        return read_id_file(cfg.seeds, "seeds", str(cfg.seed_column), "seed_column"), str(cfg.seeds)
    if str(cfg.users) == "all":
        return None, "all"
    return read_id_file(cfg.users, "users", str(cfg.user_column), "user_column"), str(cfg.users)


def run_export(cfg: DictConfig) -> dict:
    """Run ``cfg.task`` and write its file and summary. Returns the summary."""
    # the jobs (torch, faiss) load once the settings are checked, so a bad one is refused at once
    from dmp_dl.export import jobs
    from dmp_dl.serving.recommender import Recommender

    task, path = check_export_config(cfg)
    ids, source = read_ids(cfg, task)
    fmt, mode = str(cfg.format), FileMode.bits(cfg.get("mode"))
    rec = Recommender.load(cfg.artifacts, max_k=max(cfg.size if task == "lookalike" else 1, 1000))
    selection: dict = {}
    if task == "lookalike":
        export = jobs.lookalike(rec, ids, cfg.size, str(cfg.method), source, cfg.skip_unknown)
    else:
        rows, selection = jobs.select_users(rec, ids, source, cfg.skip_unknown)
        if task == "recommendations":
            export = jobs.recommendations(rec, rows, cfg.k, cfg.exclude_seen, cfg.chunk_users)
        elif task == "scores":
            export = jobs.scores(rec, rows, cfg.chunk_users)
        else:
            export = jobs.segments(rec, rows, cfg.chunk_users)
    progress = None if cfg.progress == "auto" else bool(cfg.progress)
    summary = jobs.write_export(export, path, fmt, progress, mode=mode)
    summary["bundle"] = str(cfg.artifacts)
    summary["user_ids"] = "pseudonyms" if rec.pseudonymizer is not None else "as in the training data"
    if selection:
        summary["selection"] = selection
    if summary.get("users_short"):
        log.warning("%d users have fewer than k=%d items left to recommend (they have seen nearly the whole "
                    "catalogue): they have fewer rows", summary["users_short"], summary["k"])
    summary_path = path.with_name(path.name + ".summary.json")
    summary["summary_file"] = str(summary_path)
    atomic_write_text(summary_path, json.dumps(summary, indent=1), mode)
    log.info("%s: %d rows for %d users written to %s in %.1f s", task, summary["rows"], summary["users"], path,
             summary["seconds"])
    return summary


def run_limited(cfg: DictConfig) -> dict:
    """:func:`run_export` with at most ``cfg.num_threads`` BLAS/OpenMP threads (None: unchanged)."""
    from threadpoolctl import threadpool_limits

    if cfg.get("num_threads") is None:
        return run_export(cfg)
    check_rules(cfg, {"num_threads": THREADS})
    with threadpool_limits(limits=cfg.num_threads):
        return run_export(cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    with report_errors():
        summary = run_limited(cfg)
        print(json.dumps({k: v for k, v in summary.items() if k != "columns"}, indent=1))


if __name__ == "__main__":
    main()
