"""Module paths that bundles written by earlier versions store, and where those objects live now.

A bundle's manifest keeps the resolved training config, whose ``_target_`` strings name classes by
module path (``dmp_dl.index.IndexOptions``). Commands that rebuild objects from a stored config
(``python -m dmp_dl.evaluate``) read it through :func:`current_targets`, so a bundle written before
a module moved still resolves.
"""

from __future__ import annotations

from typing import Any

# Old module -> its module now (every name it held moved with it).
MOVED_MODULES: dict[str, str] = {
    "dmp_dl.errors": "dmp_dl.core.errors",
    "dmp_dl.io": "dmp_dl.core.io",
    "dmp_dl.logs": "dmp_dl.core.logs",
    "dmp_dl.index": "dmp_dl.index.ann",
    "dmp_dl.bundle": "dmp_dl.store.bundle",
    "dmp_dl.manifest": "dmp_dl.store.manifest",
    "dmp_dl.embeddings": "dmp_dl.models.embeddings",
    "dmp_dl.fitters": "dmp_dl.training.fitters",
    "dmp_dl.model_selection": "dmp_dl.training.selection",
    "dmp_dl.training": "dmp_dl.training.fit",
    "dmp_dl.warm_start": "dmp_dl.training.warm_start",
    "dmp_dl.recommender": "dmp_dl.serving.recommender",
    "dmp_dl.pipeline": "dmp_dl.pipeline.run",
    "dmp_dl.stages": "dmp_dl.pipeline.stages",
    "dmp_dl.evaluation.metrics": "dmp_dl.metrics.ranking",
    "dmp_dl.propensity.metrics": "dmp_dl.metrics.classification",
    "dmp_dl.privacy.pseudonymize": "dmp_dl.data.pseudonymize",
    "dmp_dl.privacy.erasure_list": "dmp_dl.data.erasure_list",
    "dmp_dl.privacy.options": "dmp_dl.data.privacy_options",
    "dmp_dl.realtime.journal": "dmp_dl.data.journal",
}
# Old dotted name -> its dotted name now, for names that left their module.
MOVED_NAMES: dict[str, str] = {
    "dmp_dl.cli.PreflightCallback": "dmp_dl.pipeline.preflight.PreflightCallback",
    "dmp_dl.logs.EpochLog": "dmp_dl.training.progress.EpochLog",
    "dmp_dl.bundle.export_bundle": "dmp_dl.training.export.export_bundle",
    "dmp_dl.bundle.export_run": "dmp_dl.training.export.export_run",
}


def current_target(target: str) -> str:
    """``target`` (a dotted ``module.name``) as it is spelled now."""
    if target in MOVED_NAMES:
        return MOVED_NAMES[target]
    module, _, name = target.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def current_targets(config: Any) -> Any:
    """A copy of the plain config ``config`` (dicts and lists) with every ``_target_`` string
    spelled as it is now."""
    if isinstance(config, dict):
        return {k: current_target(v) if k == "_target_" and isinstance(v, str) else current_targets(v)
                for k, v in config.items()}
    if isinstance(config, list):
        return [current_targets(v) for v in config]
    return config
