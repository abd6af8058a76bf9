"""Activation exports: files with a row per user (or per user and rank) for email and ad channels.

``python -m dmp_dl.export task=recommendations|scores|segments|lookalike artifacts=DIR`` (config:
``conf/export.yaml``); the tasks themselves are in :mod:`dmp_dl.export.jobs`, the atomic streaming
CSV / Parquet writer in :mod:`dmp_dl.export.tables`.
"""
