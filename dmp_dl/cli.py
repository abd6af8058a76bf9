"""Helpers shared by the command-line entry points."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from omegaconf import DictConfig, open_dict

from dmp_dl.errors import DmpError

log = logging.getLogger("dmp_dl")


@contextlib.contextmanager
def report_errors() -> Iterator[None]:
    """Turn a :class:`DmpError` into one line on stderr and exit status 2 (no stack trace)."""
    try:
        yield
    except DmpError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def prepare_run_config(cfg: DictConfig) -> DictConfig:
    """Point ``paths.output_dir`` at Hydra's job directory (differs per job in multirun)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        with open_dict(cfg):
            cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    return cfg
