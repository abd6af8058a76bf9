"""Helpers shared by the command-line entry points."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, open_dict

from dmp_dl.core.errors import DmpError
from dmp_dl.core.logs import quiet_third_party
from dmp_dl.core.open_settings import register as register_open_settings

log = logging.getLogger("dmp_dl")

# conf/ beside the package, as an absolute path: Hydra reads a relative config_path against the
# package of a command run as a module (python -m), not against its file.
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
# The configs in conf/ list these in their defaults: every command composes after importing this module.
register_open_settings()


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


def _log_to_files_only(level: int, message: str) -> None:
    """Record ``message`` in the log files (``train.log``) but not on the console, which gets it
    once, on stderr, from :func:`report_errors`."""
    record = log.makeRecord(log.name, level, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


@contextlib.contextmanager
def report_errors() -> Iterator[None]:
    """Turn a :class:`DmpError` (also one wrapped by Hydra) into one line on stderr and exit status 2.

    The line is printed once: on stderr, and into the run's log file when there is one (never a
    second time on the console through the logging handlers). Third-party noise is filtered for
    the whole block (:func:`dmp_dl.core.logs.quiet_third_party`).
    """
    quiet_third_party()
    try:
        yield
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        _log_to_files_only(logging.ERROR, f"error: {error}")
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def prepare_run_config(cfg: DictConfig) -> DictConfig:
    """Point ``paths.output_dir`` at Hydra's job directory (differs per job in multirun)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        with open_dict(cfg):
            cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    return cfg
