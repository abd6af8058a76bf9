"""The Hydra callback that runs a command's checks before Hydra creates the run folder."""

from __future__ import annotations

import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dmp_dl.core.errors import DmpError
from dmp_dl.core.logs import quiet_third_party
from dmp_dl.pipeline.checks import CHECKS


class PreflightCallback(Callback):
    """Hydra callback (``hydra.callbacks.preflight`` in a command's config) that runs the command's
    checks (:data:`dmp_dl.pipeline.checks.CHECKS`) before Hydra creates the run folder and its log file, so
    a bad setting or an unwritable output folder is one line and exit status 2 with nothing written.

    The command runs the same checks again itself (for callers that do not go through Hydra).
    """

    def __init__(self, command: str):
        if command not in CHECKS:
            raise ValueError(f"PreflightCallback: unknown command {command!r} (known: {', '.join(CHECKS)})")
        self.check = CHECKS[command]

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        quiet_third_party()  # the checks import faiss (index options), whose loader logs on import
        try:
            self.check(config)
        except DmpError as exc:  # the job's logging is not configured yet: print the one line ourselves
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
