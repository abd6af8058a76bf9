"""Every part a bundle may hold, in the order they are written, loaded and erased.

Export (:func:`dmp_dl.bundle.export_bundle`), loading (:meth:`dmp_dl.recommender.Recommender.load`)
and erasure (:func:`dmp_dl.privacy.erasure.stage_erasure`) loop over :data:`PARTS`
(:mod:`dmp_dl.bundle_parts` describes the interface). A manifest entry that is none of them (the
run's ``stages``, ``privacy``, an entry added by other code) is a plain part (:class:`BundlePart`):
stored as its writer returns it, erased by its ``user_aligned`` files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dmp_dl.audience.bundle import ProfilesPart, SegmentsPart
from dmp_dl.bundle import Bundle
from dmp_dl.bundle_parts import BundlePart, IndexesPart, NetworkPart, VectorsPart
from dmp_dl.manifest import part_entries
from dmp_dl.models.scoring import ScoringPart
from dmp_dl.propensity.bundle import PropensityPart


class RealtimeInputsPart(BundlePart):
    """What real-time updates read (:mod:`dmp_dl.realtime.part`): written by the run's prepared
    writer, erased by its ``user_aligned`` files, loaded by the real-time service."""

    name = "realtime"

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], **options: Any):
        from dmp_dl.realtime.part import load_realtime_part

        vectors = loaded["vectors"]
        return load_realtime_part(bundle, len(vectors.user_vocab), len(vectors.item_vocab))


class UpliftPart(BundlePart):
    """The uplift model (:mod:`dmp_dl.campaign.bundle`), added to a bundle after a measured campaign.
    Loaded with ``loaded["recommender"]`` (the bundle's Recommender), whose inputs it checks."""

    name = "uplift"

    def save(self, writer, value) -> dict[str, Any]:
        """value: an :class:`~dmp_dl.campaign.bundle.UpliftScorer`."""
        from dmp_dl.campaign.bundle import write_uplift

        return {self.name: write_uplift(writer, value)}

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], **options: Any):
        from dmp_dl.campaign.bundle import load_uplift

        return load_uplift(bundle, loaded.get("recommender"))


PARTS: tuple[BundlePart, ...] = (
    VectorsPart(), IndexesPart(), NetworkPart(), PropensityPart(), ProfilesPart(), SegmentsPart(), ScoringPart(),
    RealtimeInputsPart(), UpliftPart(),
)
BY_NAME: dict[str, BundlePart] = {p.name: p for p in PARTS}
# Loaded by the Recommender before it exists; "uplift" reads the Recommender, "realtime" the real-time service.
SERVED = ("vectors", "indexes", "network", "propensity", "profiles", "segments", "scoring")


def part(name: str) -> BundlePart:
    """The part called ``name`` (a plain :class:`BundlePart` for any other manifest entry)."""
    return BY_NAME.get(name) or BundlePart(name)


def parts_of(bundle: Bundle) -> list[BundlePart]:
    """The parts ``bundle`` holds, in order: the known ones, then its other part entries."""
    others = [BundlePart(name) for name in part_entries(bundle.manifest) if name not in BY_NAME]
    return [p for p in PARTS if p.present(bundle)] + others


def parts_for(names: Iterable[str]) -> list[BundlePart]:
    """The parts to save for the values named ``names``: the known ones in order, then the others
    in the order given."""
    names = list(names)
    return [p for p in PARTS if p.name in names] + [BundlePart(n) for n in names if n not in BY_NAME]


def load_parts(bundle: Bundle, names: Iterable[str], loaded: Mapping[str, Any] | None = None,
               **options: Any) -> dict[str, Any]:
    """``{name: the loaded part, or None when the bundle has none}`` for ``names`` (in
    :data:`PARTS` order, each seeing those before it and ``loaded``). ``options`` go to every
    part's ``load`` (e.g. ``search_params``)."""
    out = dict(loaded or {})
    wanted = set(names)
    for p in PARTS:
        if p.name in wanted:
            out[p.name] = p.load(bundle, out, **options) if p.present(bundle) else None
    return out


def verify_parts(bundle: Bundle) -> None:
    """Check every part ``bundle`` holds against the rest of it (:class:`BundleError` naming the
    file otherwise): the served parts by loading them, then the others, the uplift model against
    the bundle's Recommender."""
    from dmp_dl.recommender import Recommender

    loaded = load_parts(bundle, SERVED)
    for p in parts_of(bundle):
        if p.name not in SERVED and p.name != UpliftPart.name:
            p.verify(bundle, loaded)
    if BY_NAME[UpliftPart.name].present(bundle):
        BY_NAME[UpliftPart.name].verify(bundle, {**loaded, "recommender": Recommender.from_parts(bundle, loaded)})
