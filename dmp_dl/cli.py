"""Helpers shared by the command-line entry points."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from omegaconf import DictConfig, open_dict

from dmp_dl.errors import DmpError

log = logging.getLogger("dmp_dl")


def user_error(exc: BaseException) -> DmpError | None:
    """The :class:`DmpError` behind ``exc``: itself, or the cause Hydra's ``instantiate`` wrapped
    (a bad option raised while a ``_target_`` was being built), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DmpError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def report_errors() -> Iterator[None]:
    """Turn a :class:`DmpError` (also one wrapped by Hydra) into one line on stderr and exit status 2."""
    try:
        yield
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def prepare_run_config(cfg: DictConfig) -> DictConfig:
    """Point ``paths.output_dir`` at Hydra's job directory (differs per job in multirun)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        with open_dict(cfg):
            cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    return cfg
