"""Running the training job as an ordered list of stages, each ending ok, skipped or failed.

A stage is a function ``fn(cfg, state) -> str | None`` that reads and adds to ``state`` (the dict
``pipeline.run`` returns). It ends in one of three ways, recorded as a :class:`StageResult`:

* ``ok``: it returned; a returned string is a note on what it left out (e.g. segments not built).
* ``skipped``: it raised :class:`SkipStage` (switched off in the config: logged at INFO) or, for an
  optional stage, a :class:`~dmp_dl.core.errors.DataError` (the data cannot support it: one WARNING
  line). ``<stage>.required=true`` turns the latter into the error it is (one line, exit status 2).
* ``failed``: an optional stage raised anything else (a bug or a resource problem): one ERROR line
  with the exception's summary, the traceback at DEBUG, and the run goes on without the stage.

A :class:`~dmp_dl.core.errors.ConfigError` is never a skip (a bad setting is the user's to fix), and a
stage that is not optional (data, model, export) fails the run the way any error does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dmp_dl.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

STATUSES = ("ok", "skipped", "failed")


class SkipStage(Exception):
    """Raised by a stage that is switched off in the config (e.g. ``propensity.enabled=false``)."""


@dataclass
class StageResult:
    """How one stage ended: ``status`` (ok | skipped | failed), ``reason`` (why it was skipped or
    failed, or a note on an ok stage that ran in part; None otherwise), wall-clock ``seconds`` and
    ``peak_rss_gib``: the most memory the process held during it, as the run's memory watch saw it
    (every half second; None when it was not watched)."""

    status: str
    reason: str | None = None
    seconds: float = 0.0
    peak_rss_gib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Stage:
    """A named step of the job. ``optional`` stages may be skipped or fail without ending the run;
    ``required_key`` is the config key that makes an optional stage required (``<name>.required``)."""

    name: str
    fn: Callable[[DictConfig, dict], str | None]
    optional: bool = False
    required_key: str | None = None

    @property
    def key(self) -> str:
        return self.required_key or f"{self.name}.required"


def is_required(cfg: DictConfig, stage: Stage) -> bool:
    """Whether ``cfg`` sets ``stage``'s required key; raises :class:`ConfigError` unless it is a boolean."""
    if not stage.optional:
        return True
    value = OmegaConf.select(cfg, stage.key, default=False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"{stage.key} must be true or false, got {value!r}")
    return value


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_stage(cfg: DictConfig, stage: Stage, state: dict) -> StageResult:
    """Run one stage and say how it ended (see the module docstring). Errors that end the run propagate."""
    t0 = time.perf_counter()

    def result(status: str, reason: str | None) -> StageResult:
        return StageResult(status, reason, time.perf_counter() - t0)

    try:
        note = stage.fn(cfg, state)
    except SkipStage as exc:
        log.info("%s: skipped (%s)", stage.name, exc)
        return result("skipped", str(exc))
    except ConfigError:
        raise
    except DataError as exc:
        if not stage.optional or is_required(cfg, stage):
            raise
        log.warning("%s skipped: %s", stage.name, exc)
        return result("skipped", str(exc))
    except Exception as exc:
        if not stage.optional or is_required(cfg, stage):
            raise
        log.error("%s failed, the run continues without it: %s", stage.name, _one_line(exc))
        log.debug("%s failed", stage.name, exc_info=True)
        return result("failed", _one_line(exc))
    return result("ok", note)


def run_stages(cfg: DictConfig, stages: Sequence[Stage], state: dict,
               after_each: Callable[[dict[str, StageResult]], None] | None = None,
               before_each: Callable[[str], None] | None = None) -> dict[str, StageResult]:
    """Run ``stages`` in order; ``before_each(stage name)`` is called before each one and
    ``after_each(results so far)`` after it. A stage may set ``state["halt"] = True`` to end the
    job early (e.g. on DDP ranks other than 0)."""
    for stage in stages:  # a misspelt required key is an error before anything runs
        is_required(cfg, stage)
    results: dict[str, StageResult] = {}
    for stage in stages:
        if before_each is not None:
            before_each(stage.name)
        results[stage.name] = run_stage(cfg, stage, state)
        if after_each is not None:
            after_each(results)
        if state.get("halt"):
            break
    return results
