"""Activation exports: files with a row per user (or per user and rank) for email and ad channels.

``python -m dmp_dl.export task=recommendations|scores|segments|lookalike artifacts=DIR`` (config:
``conf/export.yaml``, checked by :func:`dmp_dl.pipeline.checks.check_export_config`); the tasks themselves
are in :mod:`dmp_dl.export.jobs`, the atomic streaming CSV / Parquet writer in
:mod:`dmp_dl.export.tables`.
"""

TASKS = ("recommendations", "scores", "segments", "lookalike")
TASK_ALIASES = {"recommend": "recommendations", "propensity": "scores", "segment": "segments"}
