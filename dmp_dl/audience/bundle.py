"""Interest profiles and segments in the artifact bundle: writing them as bundle parts, reading them back.

Two parts (:class:`ProfilesPart`, :class:`SegmentsPart`; :mod:`dmp_dl.store.parts`), each a folder
and a manifest entry of the same name, written by the writers :func:`profiles_part` and
:func:`segments_part` prepare::

    profiles/profiles.json          categories, event types, as_of, half-life, top_n, ...
    profiles/top_categories.npy     (n_users, N) int32 category index, best first, -1 padding   } user-
    profiles/top_weights.npy        (n_users, N) float32 I(c, u) of those, 0 padding             } aligned
    profiles/interest_total.npy     (n_users,) float32 Σ_c I(c, u)                               }
    profiles/event_type_affinity.npy (n_users, T) float32 recency-weighted events per type       }

    segments/segments.json          K, options, silhouette per K, per-segment aggregates
    segments/centroids.npy          (K, d) float32 centres (of L2-normalised vectors when ``normalize``)
    segments/assignments.npy        (n_users,) int32 segment of each user                        } user-
    segments/distances.npy          (n_users,) float32 squared distance to the centre            } aligned

Every per-user file is listed under the entry's ``user_aligned``, so erasure removes a user's rows.
Segment sizes and representative users are recomputed from the user-aligned files when loaded
(never stored as a list of ids), so they stay true after users are erased; the other per-segment
numbers (top categories, mean propensity, attribute skew) are aggregates as of the export.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dmp_dl.audience.profiles import Profiles
from dmp_dl.audience.segments import Segmentation, representatives
from dmp_dl.core.errors import BundleError
from dmp_dl.store.bundle import Bundle, BundleWriter
from dmp_dl.store.parts import BundlePart

PROFILES_DIR, SEGMENTS_DIR = "profiles", "segments"
PROFILE_ARRAYS = ("top_categories", "top_weights", "interest_total", "event_type_affinity")
SEGMENT_ARRAYS = ("assignments", "distances")
# per-segment fields recomputed from the user-aligned arrays when loaded
DERIVED_FIELDS = ("size", "share", "representatives")


def _file(folder: str, name: str) -> str:
    return f"{folder}/{name}.npy"


def profiles_part(profiles: Profiles) -> Callable[[BundleWriter], dict]:
    """An :func:`~dmp_dl.training.export.export_bundle` part writing ``profiles`` (see the module docstring)."""

    def write(w: BundleWriter) -> dict:
        for name in PROFILE_ARRAYS:
            w.save_array(_file(PROFILES_DIR, name), getattr(profiles, name))
        w.save_json(f"{PROFILES_DIR}/profiles.json", profiles.meta())
        return {"users": profiles.n_users, "categories": len(profiles.categories),
                "half_life_days": profiles.half_life_days, "top_n": int(profiles.top_categories.shape[1]),
                "user_aligned": [_file(PROFILES_DIR, n) for n in PROFILE_ARRAYS]}

    return write


def segments_part(seg: Segmentation, descriptions: list[dict], options: dict) -> Callable[[BundleWriter], dict]:
    """An :func:`~dmp_dl.training.export.export_bundle` part writing ``seg`` and the per-segment aggregates of
    ``descriptions`` (:func:`~dmp_dl.audience.segments.describe_segments`); options: the settings used."""

    def write(w: BundleWriter) -> dict:
        w.save_array(_file(SEGMENTS_DIR, "assignments"), seg.assignments.astype(np.int32))
        w.save_array(_file(SEGMENTS_DIR, "distances"), seg.distances.astype(np.float32))
        w.save_array(_file(SEGMENTS_DIR, "centroids"), seg.centroids.astype(np.float32))
        aggregates = [{k: v for k, v in d.items() if k not in DERIVED_FIELDS} for d in descriptions]
        w.save_json(f"{SEGMENTS_DIR}/segments.json", {
            "k": seg.k, "normalize": seg.normalize, "silhouette": {str(k): v for k, v in seg.silhouette.items()},
            "silhouette_sample": seg.sample_size, "options": options, "segments": aggregates})
        return {"k": seg.k, "chosen_by": "silhouette" if seg.silhouette else "config",
                "user_aligned": [_file(SEGMENTS_DIR, n) for n in SEGMENT_ARRAYS]}

    return write


def _aligned(bundle: Bundle, name: str, n_users: int) -> np.ndarray:
    array = bundle.array(name)
    if array.shape[:1] != (n_users,):
        raise BundleError(f"{bundle.root / name}: {array.shape[0] if array.ndim else 0} rows for {n_users} users")
    return array


def load_profiles(bundle: Bundle, n_users: int) -> Profiles | None:
    """The bundle's interest profiles, or None when it has none."""
    if not bundle.has(f"{PROFILES_DIR}/profiles.json"):
        return None
    meta = bundle.json(f"{PROFILES_DIR}/profiles.json")
    arrays = {name: _aligned(bundle, _file(PROFILES_DIR, name), n_users) for name in PROFILE_ARRAYS}
    top = arrays["top_categories"]
    if top.ndim != 2 or (top.size and int(top.max()) >= len(meta["categories"])):
        raise BundleError(f"{bundle.root / _file(PROFILES_DIR, 'top_categories')}: category indices do not match "
                          f"the {len(meta['categories'])} categories of profiles.json")
    return Profiles(categories=list(meta["categories"]), event_types=list(meta["event_types"]), as_of=int(meta["as_of"]),
                    half_life_days=float(meta["half_life_days"]), category_column=meta.get("category_column"),
                    event_weights=meta.get("event_weights"), half_life_rule=str(meta.get("half_life_rule", "fixed")),
                    **arrays)


@dataclass
class StoredSegments:
    """Segments as read from a bundle.

    assignments: (n_users,) int64; distances: (n_users,) float32; centroids: (K, d) float32;
    meta: ``segments.json`` (per-segment aggregates under ``segments``).
    """

    assignments: np.ndarray
    distances: np.ndarray
    centroids: np.ndarray
    meta: dict

    @property
    def k(self) -> int:
        return int(len(self.centroids))

    def describe(self, user_ids: np.ndarray, n_representatives: int = 5) -> list[dict]:
        """Per segment: the stored aggregates plus ``size``, ``share`` and ``representatives``
        (the ids of the users nearest its centre), computed from the current users."""
        n = len(self.assignments)
        sizes = np.bincount(self.assignments, minlength=self.k)
        reps = representatives(self.assignments, self.distances, self.k, int(n_representatives))
        out = []
        for s, agg in enumerate(self.meta.get("segments", [])):
            out.append({"segment": s, "size": int(sizes[s]), "share": float(sizes[s] / max(n, 1)),
                        **{k: v for k, v in agg.items() if k != "segment"},
                        "representatives": [str(u) for u in np.asarray(user_ids)[reps[s]]]})
        return out


def load_segments(bundle: Bundle, n_users: int) -> StoredSegments | None:
    """The bundle's segments, or None when it has none."""
    if not bundle.has(f"{SEGMENTS_DIR}/segments.json"):
        return None
    meta = bundle.json(f"{SEGMENTS_DIR}/segments.json")
    assignments = _aligned(bundle, _file(SEGMENTS_DIR, "assignments"), n_users).astype(np.int64)
    distances = _aligned(bundle, _file(SEGMENTS_DIR, "distances"), n_users)
    centroids = bundle.array(_file(SEGMENTS_DIR, "centroids"))
    k = len(centroids)
    if len(meta.get("segments", [])) != k or (len(assignments) and (assignments.min() < 0 or assignments.max() >= k)):
        raise BundleError(f"{bundle.root / SEGMENTS_DIR}: assignments, centroids and segments.json disagree on K={k}")
    return StoredSegments(assignments, np.asarray(distances, dtype=np.float32), centroids, meta)


class ProfilesPart(BundlePart):
    """The interest profiles (saved from :func:`profiles_part`'s writer; erased by their user-aligned files)."""

    name = PROFILES_DIR

    def present(self, bundle: Bundle) -> bool:
        return bundle.has(f"{PROFILES_DIR}/profiles.json")

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], **options: Any) -> Profiles | None:
        return load_profiles(bundle, len(loaded["vectors"].user_vocab))


class SegmentsPart(BundlePart):
    """The segments (saved from :func:`segments_part`'s writer; erased by their user-aligned files)."""

    name = SEGMENTS_DIR

    def present(self, bundle: Bundle) -> bool:
        return bundle.has(f"{SEGMENTS_DIR}/segments.json")

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], **options: Any) -> StoredSegments | None:
        return load_segments(bundle, len(loaded["vectors"].user_vocab))
