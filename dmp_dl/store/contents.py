"""Every part a bundle may hold, in the order they are written, loaded and erased.

Export (:func:`dmp_dl.training.export.export_bundle`), loading (:meth:`dmp_dl.serving.recommender.Recommender.load`)
and erasure (:func:`dmp_dl.privacy.erasure.stage_erasure`) loop over :func:`known_parts`
(:mod:`dmp_dl.store.parts` describes the interface). A manifest entry that is none of them (the
run's ``stages``, ``privacy``, an entry added by other code) is a plain part (:class:`BundlePart`):
stored as its writer returns it, erased by its ``user_aligned`` files.

The store names each part and the module that implements it (:data:`PART_CLASSES`) but does not
import those modules: they live in the layers above (models, propensity, audience, realtime,
campaign), which import the store. Each is imported the first time a bundle is written, loaded or
erased.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from typing import Any

from dmp_dl.store.bundle import Bundle
from dmp_dl.store.manifest import part_entries
from dmp_dl.store.parts import BundlePart

# (manifest entry, module, class), in the order parts are written, loaded and erased.
PART_CLASSES: tuple[tuple[str, str, str], ...] = (
    ("vectors", "dmp_dl.models.parts", "VectorsPart"),
    ("indexes", "dmp_dl.models.parts", "IndexesPart"),
    ("network", "dmp_dl.models.parts", "NetworkPart"),
    ("user_table", "dmp_dl.data.table_part", "UserTablePart"),
    ("propensity", "dmp_dl.propensity.bundle", "PropensityPart"),
    ("profiles", "dmp_dl.audience.bundle", "ProfilesPart"),
    ("segments", "dmp_dl.audience.bundle", "SegmentsPart"),
    ("scoring", "dmp_dl.models.scoring", "ScoringPart"),
    ("item_categories", "dmp_dl.serving.item_rules", "ItemCategoriesPart"),
    ("realtime", "dmp_dl.realtime.part", "RealtimeInputsPart"),
    ("uplift", "dmp_dl.campaign.bundle", "UpliftPart"),
)
KNOWN = tuple(name for name, _, _ in PART_CLASSES)
# Loaded by the Recommender before it exists; "uplift" reads the Recommender, "realtime" the real-time service.
SERVED = ("vectors", "indexes", "network", "user_table", "propensity", "profiles", "segments", "scoring", "item_categories")
UPLIFT = "uplift"


@cache
def known_parts() -> tuple[BundlePart, ...]:
    """One instance of every part of :data:`PART_CLASSES`, in order."""
    parts = []
    for name, module, cls in PART_CLASSES:
        part_ = getattr(importlib.import_module(module), cls)()
        if part_.name != name:
            raise TypeError(f"{module}.{cls}.name is {part_.name!r}, listed as {name!r}")
        parts.append(part_)
    return tuple(parts)


def by_name() -> dict[str, BundlePart]:
    """Manifest entry -> its part, for the known parts."""
    return {p.name: p for p in known_parts()}


def part(name: str) -> BundlePart:
    """The part called ``name`` (a plain :class:`BundlePart` for any other manifest entry)."""
    return by_name().get(name) or BundlePart(name)


def parts_of(bundle: Bundle) -> list[BundlePart]:
    """The parts ``bundle`` holds, in order: the known ones, then its other part entries."""
    others = [BundlePart(name) for name in part_entries(bundle.manifest) if name not in KNOWN]
    return [p for p in known_parts() if p.present(bundle)] + others


def parts_for(names: Iterable[str]) -> list[BundlePart]:
    """The parts to save for the values named ``names``: the known ones in order, then the others
    in the order given."""
    names = list(names)
    return [p for p in known_parts() if p.name in names] + [BundlePart(n) for n in names if n not in KNOWN]


def load_parts(bundle: Bundle, names: Iterable[str], loaded: Mapping[str, Any] | None = None,
               **options: Any) -> dict[str, Any]:
    """``{name: the loaded part, or None when the bundle has none}`` for ``names`` (in
    :data:`PART_CLASSES` order, each seeing those before it and ``loaded``). ``options`` go to every
    part's ``load`` (e.g. ``search_params``)."""
    out = dict(loaded or {})
    wanted = set(names)
    for p in known_parts():
        if p.name in wanted:
            out[p.name] = p.load(bundle, out, **options) if p.present(bundle) else None
    return out


def verify_parts(bundle: Bundle, recommender_from_parts: Callable[[Bundle, Mapping[str, Any]], Any]) -> None:
    """Check every part ``bundle`` holds against the rest of it (:class:`BundleError` naming the
    file otherwise): the served parts by loading them, then the others, the uplift model against
    the bundle's Recommender (``recommender_from_parts(bundle, loaded)``, e.g.
    :meth:`Recommender.from_parts <dmp_dl.serving.recommender.Recommender.from_parts>`)."""
    loaded = load_parts(bundle, SERVED)
    for p in parts_of(bundle):
        if p.name not in SERVED and p.name != UPLIFT:
            p.verify(bundle, loaded)
    uplift = part(UPLIFT)
    if uplift.present(bundle):
        uplift.verify(bundle, {**loaded, "recommender": recommender_from_parts(bundle, loaded)})
