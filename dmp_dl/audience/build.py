"""The audience step of a training run: interest profiles and segments of every known user.

``build_audience(cfg.audience, dm, user_vectors, propensity)`` runs after the embedding model (and the
propensity model, when trained); its result goes into the bundle (:meth:`Audience.bundle_parts`),
``metrics.json`` (:meth:`Audience.summary`) and the report's segment section
(:meth:`Audience.segment_inputs`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from hydra.utils import instantiate
from threadpoolctl import threadpool_limits

from dmp_dl.audience.bundle import PROFILES_DIR, SEGMENTS_DIR, profiles_part, segments_part
from dmp_dl.audience.profiles import ProfileOptions, Profiles, compute_profiles
from dmp_dl.audience.segments import Segmentation, SegmentOptions, describe_segments, segment_label, segment_users
from dmp_dl.core.errors import DataError
from dmp_dl.evaluation.report import SegmentInputs
from dmp_dl.training.fit import config_to_dict

log = logging.getLogger(__name__)


@dataclass
class Audience:
    """Profiles and segments of the users of a run (rows = the user vocabulary).

    user_vectors: (n_users, d) float32 the segments were built from (the bundle's user vectors).
    descriptions: one dict per segment (:func:`~dmp_dl.audience.segments.describe_segments`).
    """

    profiles: Profiles
    segmentation: Segmentation | None
    descriptions: list[dict]
    user_vectors: np.ndarray
    segment_options: dict
    seconds: float
    segments_skipped: str | None = None

    def bundle_parts(self) -> dict[str, Any]:
        parts = {PROFILES_DIR: profiles_part(self.profiles)}
        if self.segmentation is not None:
            parts[SEGMENTS_DIR] = segments_part(self.segmentation, self.descriptions, self.segment_options)
        return parts

    def segment_inputs(self):
        """The report's segment section input (None when no segments were built)."""
        if self.segmentation is None:
            return None
        return SegmentInputs(assignments=self.segmentation.assignments, user_vectors=self.user_vectors,
                             descriptions=self.descriptions)

    def summary(self) -> dict:
        """``metrics.json``'s ``audience``: K, silhouette per K, sizes and a label per segment."""
        if self.segmentation is None:
            return {"segments_skipped": self.segments_skipped, "categories": len(self.profiles.categories),
                    "seconds": self.seconds}
        return {
            "k": self.segmentation.k,
            "silhouette": {str(k): v for k, v in self.segmentation.silhouette.items()},
            "segments": [{"segment": d["segment"], "size": d["size"], "label": segment_label(d),
                          "mean_propensity": d.get("mean_propensity")} for d in self.descriptions],
            "categories": len(self.profiles.categories),
            "seconds": self.seconds,
        }


def _options(node, cls):
    if node is None:
        return cls()
    return instantiate(node, _convert_="all") if "_target_" in node else cls(**node)


def build_audience(cfg, dm, user_vectors: np.ndarray, propensity=None, progress: bool = False) -> Audience:
    """Profiles (``cfg.profiles``) and segments (``cfg.segments``) of ``dm``'s users.

    dm: the prepared DataModule; user_vectors: (n_users, d) the trained network's vectors of each
    user's full history, the bundle's own; propensity: the propensity step's result (mean propensity
    per segment).
    """
    t0 = time.perf_counter()
    profile_opts = _options(cfg.get("profiles"), ProfileOptions)
    segment_opts = _options(cfg.get("segments"), SegmentOptions)
    profiles = compute_profiles(dm.events, dm.log_.items, dm.item_vocab, dm.n_users, profile_opts)
    users = np.ascontiguousarray(user_vectors, dtype=np.float32)
    node = cfg.get("segments")
    options = {k: v for k, v in (config_to_dict(node) if node is not None else {}).items() if not k.startswith("_")}
    threads = cfg.get("num_threads")
    try:
        # FAISS's OpenMP threads spin-wait: on a busy machine a small k-means takes many times
        # longer with all cores than with one
        with threadpool_limits(limits=int(threads)) if threads else contextlib.nullcontext():
            seg = segment_users(users, segment_opts, progress=progress)
    except DataError as exc:  # e.g. 2 users, or identical vectors: the rest of the run still stands
        log.warning("segments skipped: %s", exc)
        return Audience(profiles, None, [], users, options, time.perf_counter() - t0, str(exc))
    scores = None if propensity is None else propensity.scorer.known_scores
    descriptions = describe_segments(seg, dm.user_vocab.ids, profiles, scores, dm.user_features, segment_opts)
    for d in descriptions:
        log.info("segment %d: %d users (%s)", d["segment"], d["size"], segment_label(d))
    return Audience(profiles, seg, descriptions, users, options, time.perf_counter() - t0)
