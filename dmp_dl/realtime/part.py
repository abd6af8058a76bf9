"""What a bundle stores so that real-time events can update its users exactly (``realtime/``).

A part (written through :func:`dmp_dl.training.export.export_bundle`'s ``parts`` hook) with a manifest
entry ``realtime`` and the files::

    realtime/recent_items.npy        (n_users, L) int32 each user's last L items, most recent
                                     first, -1 padding (the bundle's seen-items rows are unordered)   } user-
    realtime/reference_times.npy     (n_users,) float64 each user's latest event: the time the       } user-
                                     bundle's summed event weights (``seen_sums.npy``) decay to      } aligned
    realtime/behaviour_stats.npy     (n_users, S) float64 propensity sufficient statistics as of     }
                                     ``data_end`` (:mod:`dmp_dl.realtime.behaviour`)                 }
    realtime/propensity_tokens.npy   (n_users, T) int32  } the propensity model's attribute inputs of }
    realtime/propensity_numeric.npy  (n_users, D) float32 } each user (known users are not otherwise  }
    realtime/encoder_tokens.npy      (n_users, T') int32  } stored: they are scored in advance)       }
    realtime/encoder_numeric.npy     (n_users, D') float32                                            }
    realtime/item_categories_{indptr,index,share}.npy   the (n_items, C) CSR of category shares the
                                     interest profiles were built from

The entry records ``data_end`` (the last event of the training data), ``timestamps`` (whether the
training data had event times: without them profiles are not time-decayed) and ``journals``: for every
real-time journal the run read (``data.extra_paths``), the last sequence number it read, so that
a server replays only the journal rows the bundle has not seen. Every per-user file is listed
under ``user_aligned``, so erasure removes a user's rows. The propensity and profile files are
present only when the run trained those parts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from dmp_dl.audience.profiles import item_category_shares
from dmp_dl.core.errors import BundleError
from dmp_dl.data.recency import reference_times
from dmp_dl.data.schema import ITEM, TIME, TYPE, VALUE
from dmp_dl.propensity.features import SECONDS_PER_DAY
from dmp_dl.realtime.behaviour import BehaviourStats
from dmp_dl.store.bundle import Bundle, BundleWriter
from dmp_dl.store.parts import BundlePart

log = logging.getLogger(__name__)

PART = "realtime"
RECENT = "recent_items"
REFERENCE = "reference_times"
STATS = "behaviour_stats"
PROPENSITY_INPUTS = ("propensity_tokens", "propensity_numeric", "encoder_tokens", "encoder_numeric")
CATEGORIES = ("item_categories_indptr", "item_categories_index", "item_categories_share")


def _file(name: str) -> str:
    return f"{PART}/{name}.npy"


def realtime_part(dm, propensity=None, audience=None) -> Callable[[BundleWriter], dict]:
    """A bundle part with what :mod:`dmp_dl.realtime` needs, from a finished run's prepared
    DataModule, its propensity result (or None) and its audience result (or None). Everything is
    computed here, before the bundle is written; the returned writer only saves it."""
    n_users, n_items = dm.n_users, dm.n_items
    events = dm.events
    data_end = int(events[TIME].max())
    user, times = events["user_idx"].to_numpy(), events[TIME].to_numpy()
    arrays: dict[str, np.ndarray] = {RECENT: np.where(dm.full_history >= n_items, -1, dm.full_history).astype(np.int32),
                                     REFERENCE: reference_times(user, times, n_users)}
    aligned = [RECENT, REFERENCE]
    entry: dict = {"data_end": data_end, "journals": dict(dm.journal_marks), "history_len": int(dm.full_history.shape[1]),
                   "timestamps": bool(getattr(dm.report, "has_timestamps", True))}
    if propensity is not None:
        features = propensity.scorer.features
        layout = BehaviourStats(features.behaviour)
        arrays[STATS] = layout.from_events(user, times, layout.type_codes(events[TYPE]), events[VALUE].to_numpy(),
                                           n_users, float(data_end))
        aligned.append(STATS)
        for side, table in (("propensity", features.attributes), ("encoder", features.encoder_attributes)):
            if table is not None:
                arrays[f"{side}_tokens"] = table.tokens[:n_users].astype(np.int32)
                arrays[f"{side}_numeric"] = table.numeric[:n_users].astype(np.float32)
                aligned += [f"{side}_tokens", f"{side}_numeric"]
        entry["behaviour"] = {"event_types": list(layout.spec.event_types), "half_lives_days": layout.h.tolist(),
                              "width": layout.width}
    profiles = getattr(audience, "profiles", None)
    if profiles is not None and profiles.category_column is not None and dm.log_.items is not None:
        items = dm.log_.items
        shares, categories = item_category_shares(items, profiles.category_column,
                                                  dm.item_vocab.index_of(items[ITEM].tolist()), n_items)
        if categories == list(profiles.categories):
            shares = sp.csr_matrix(shares)
            shares.sort_indices()
            arrays.update({CATEGORIES[0]: shares.indptr.astype(np.int64), CATEGORIES[1]: shares.indices.astype(np.int32),
                           CATEGORIES[2]: shares.data.astype(np.float64)})
            entry["categories"] = len(categories)
    entry["user_aligned"] = [_file(name) for name in aligned]

    def write(w: BundleWriter) -> dict:
        for name, array in arrays.items():
            w.save_array(_file(name), array)
        return entry

    return write


@dataclass
class RealtimePart:
    """A bundle's ``realtime`` part, loaded (arrays as described in the module docstring; absent
    ones None). ``entry`` is its manifest entry."""

    entry: dict
    recent_items: np.ndarray | None
    behaviour_stats: np.ndarray | None
    propensity_tokens: np.ndarray | None
    propensity_numeric: np.ndarray | None
    encoder_tokens: np.ndarray | None
    encoder_numeric: np.ndarray | None
    item_categories: sp.csr_matrix | None
    reference_times: np.ndarray | None = None

    @property
    def data_end(self) -> int | None:
        value = self.entry.get("data_end")
        return None if value is None else int(value)

    @property
    def journals(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in (self.entry.get("journals") or {}).items()}

    def activity(self) -> dict[str, np.ndarray] | None:
        """Per user, as of ``data_end``: ``events``, ``active_days`` (distinct days with an event),
        ``recency_days`` / ``tenure_days`` (days from the last / first event to ``data_end``; NaN
        for a user without events), each (n_users,) float64; None without behaviour statistics."""
        stats, end = self.behaviour_stats, self.data_end
        if stats is None or end is None:
            return None
        last, first = stats[:, BehaviourStats.LAST], stats[:, BehaviourStats.FIRST]
        with np.errstate(invalid="ignore"):
            recency = np.where(np.isfinite(last), (end - last) / SECONDS_PER_DAY, np.nan)
            tenure = np.where(np.isfinite(first), (end - first) / SECONDS_PER_DAY, np.nan)
        return {"events": stats[:, BehaviourStats.N].astype(np.float64), "active_days": stats[:, BehaviourStats.DAYS].astype(np.float64),
                "recency_days": recency, "tenure_days": tenure}


def load_realtime_part(bundle: Bundle, n_users: int, n_items: int) -> RealtimePart:
    """The bundle's ``realtime`` part (an empty one, every array None, for bundles without it).
    Raises :class:`BundleError` naming the file when an array does not fit the vocabularies."""
    entry = bundle.manifest.get(PART)
    if not isinstance(entry, dict):
        return RealtimePart({}, None, None, None, None, None, None, None)

    def array(name: str, aligned: bool = True):
        if not bundle.has(_file(name)):
            return None
        bundle._verify(_file(name))  # the server's own load verified it too; this catches a swap in between
        a = bundle.array(_file(name))
        if aligned and a.shape[:1] != (n_users,):
            raise BundleError(f"{bundle.root / _file(name)}: {a.shape[0] if a.ndim else 0} rows for {n_users} users")
        return a

    reference = array(REFERENCE)
    if reference is not None and (reference.ndim != 1 or np.isnan(reference).any() or (reference == np.inf).any()):
        raise BundleError(f"{bundle.root / _file(REFERENCE)}: not one time (or -inf) per user")
    recent = array(RECENT)
    if recent is not None and recent.size and int(recent.max()) >= n_items:
        raise BundleError(f"{bundle.root / _file(RECENT)}: item rows beyond the {n_items} items")
    stats = array(STATS)
    width = (entry.get("behaviour") or {}).get("width")
    if stats is not None and (stats.ndim != 2 or stats.shape[1] != width):
        raise BundleError(f"{bundle.root / _file(STATS)}: {stats.shape} does not match the recorded width {width}")
    categories = None
    if all(bundle.has(_file(c)) for c in CATEGORIES):
        indptr, index, share = (array(c, aligned=False) for c in CATEGORIES)
        n_cat = int(entry.get("categories", 0))
        if indptr.shape != (n_items + 1,) or indptr[-1] != len(index) or len(index) != len(share) or (
                len(index) and int(index.max()) >= n_cat):
            raise BundleError(f"{bundle.root / _file(CATEGORIES[0])}: item categories do not match {n_items} items")
        categories = sp.csr_matrix((share, index, indptr), shape=(n_items, n_cat))
    inputs = {name: array(name) for name in PROPENSITY_INPUTS}
    return RealtimePart(entry, recent, stats, item_categories=categories, reference_times=reference, **inputs)


class RealtimeInputsPart(BundlePart):
    """What real-time updates read (this module): written by the run's prepared
    writer, erased by its ``user_aligned`` files, loaded by the real-time service."""

    name = "realtime"

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], **options: Any):
        vectors = loaded["vectors"]
        return load_realtime_part(bundle, len(vectors.user_vocab), len(vectors.item_vocab))
