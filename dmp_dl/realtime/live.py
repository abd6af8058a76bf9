"""``LiveRecommender``: a bundle plus every user that real-time events changed since it was trained.

A :class:`~dmp_dl.serving.recommender.Recommender` whose user-facing queries (``recommend``, ``profile``,
``segment``, ``propensity``, ``lookalike``) answer from an overlay of *live users* when a user has
events the bundle has not seen, and from the bundle otherwise. A live user is a known user with new
events, or a user the bundle does not know (a new row). Applying events (:meth:`LiveRecommender._apply`,
called by :class:`~dmp_dl.realtime.service.RealtimeService`) updates, for each user they touch:

* the item history: the user's whole known history, oldest first (the bundle's seen items, its
  recorded most recent items in order, then the new events' items);
* the user's row: each item's summed event weights, decayed to the user's latest event exactly as
  the next training run will decay them (:mod:`dmp_dl.data.recency`: the bundle's sums moved
  forward, plus the new events' weights);
* the user vector: for a network that encodes rows (the default autoencoder), its encoding of that
  row and the user's stored attributes (:meth:`Recommender.row_user_vectors`), the vector the next
  training run's encoder gives the same events; for other networks, the cold-start encoder on the
  whole history (:meth:`Recommender.cold_user_vectors`). Recommendations for a live user are the
  bundle's served score of that vector and row (or of that history);
* the interest profile, decayed and added to exactly as in training (2^(-age/half-life), ages to
  the user's latest event) and the event-type affinities;
* the segment: the nearest centre of the bundle's segments;
* the propensity features (from sufficient statistics, :mod:`dmp_dl.realtime.behaviour`); the
  calibrated score, as of the later of the data's end and the user's latest event, is computed when
  it is read (:meth:`LiveRecommender.propensity`) and kept until the user's next event, so an event
  costs no propensity pass.

Lookalike seeds use their current vectors at once; the users searched come from a user index that
is rebuilt with every user's current vector (new users included) at most ``refresh_seconds`` after a
change (bounded staleness; :meth:`LiveRecommender.refresh_user_index`).

The overlay is published per user by replacing an immutable :class:`LiveUser`, so a query sees a
user's state before or after an update, never half of one.

Users withheld by the service (being erased, or erased while it runs:
:meth:`~dmp_dl.realtime.service.RealtimeService.withhold`) are unknown to every query, in the overlay
and in the bundle alike (404), and never among lookalike results or segment representatives.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from dmp_dl.audience.bundle import StoredSegments
from dmp_dl.audience.segments import assign
from dmp_dl.core.errors import UnknownIdError
from dmp_dl.data.erasure_list import SALTED_PREFIX
from dmp_dl.data.pseudonymize import parse_tag
from dmp_dl.data.recency import decayed, row_strength
from dmp_dl.data.schema import MULTI_VALUE_SEP, canonical_id
from dmp_dl.index.ann import build_index
from dmp_dl.propensity.features import Snapshot
from dmp_dl.realtime.behaviour import BehaviourStats
from dmp_dl.serving.recommender import LOOKALIKE_METHODS, InvalidRequestError, Ranked, Recommender, lookalike_search
from dmp_dl.store.bundle import MissingPartError

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
VECTOR_CHUNK = 1024  # users per cold-start network pass


def category_sums(shares: sp.csr_matrix, user: np.ndarray, item: np.ndarray, weight: np.ndarray,
                  n_users: int) -> np.ndarray:
    """(n_users, C) each user's events' weights spread over their items' categories: the sum over a
    user's events e of ``weight[e] * shares[item[e]]``, with ``shares`` the (n_items, C) CSR of
    category shares. Reads the CSR arrays directly: a few events cost microseconds, not a sparse
    product's set-up."""
    out = np.zeros((n_users, shares.shape[1]))
    starts, ends = shares.indptr[item], shares.indptr[np.asarray(item) + 1]
    counts = ends - starts
    total = int(counts.sum())
    if total:
        owner = np.repeat(np.arange(len(item)), counts)
        flat = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(total)
        np.add.at(out, (np.asarray(user)[owner], shares.indices[flat]), shares.data[flat] * np.asarray(weight)[owner])
    return out


@dataclass(frozen=True)
class LiveUser:
    """One user's state after real-time events (replaced as a whole on every update).

    key: the id as the bundle holds it (the pseudonym for pseudonymised bundles); row: the bundle's
    row, -1 for a user it does not know. items: (h,) int64 item rows, oldest first. attributes:
    the user's attributes for the encoder (known users: as stored), or None. vector: (dim,)
    float32 or None (no cold-start network). interest: (C,) float64 I(c, u) as of ``as_of``;
    affinity: (T,) event-type affinities; stats: (S,) behaviour statistics as of ``stats_ref``.
    propensity: the bundle's score of a known user whose statistics it lacks, else None (scored from
    ``stats`` when read). row_items: (m,) int64 the distinct items of the user's row, sorted, and row_sums: (m,) float64
    their summed event weights decayed to ``row_ref`` (the user's latest event); None when the
    bundle stores no sums (written before it did).
    """

    key: str
    row: int
    items: np.ndarray
    attributes: dict | None
    vector: np.ndarray | None
    segment: int | None
    distance: float | None
    interest: np.ndarray | None
    interest_total: float
    affinity: np.ndarray | None
    as_of: float
    stats: np.ndarray | None
    stats_ref: float
    propensity: float | None
    events: int
    last_event: int
    row_items: np.ndarray | None = None
    row_sums: np.ndarray | None = None
    row_ref: float = -np.inf


@dataclass
class UserTable:
    """The users lookalike searches: ids (n,), vectors (n, dim), an index over them, built at ``built_at``
    (time.monotonic()) with the first ``n_new`` new users."""

    ids: np.ndarray
    vectors: np.ndarray
    index: object
    n_new: int
    built_at: float


class LiveRecommender(Recommender):
    """A :class:`Recommender` over a bundle plus live users; build it with :meth:`load` (Python) or
    :meth:`RealtimeService.attach <dmp_dl.realtime.service.RealtimeService.attach>` (the server).

    The id-based queries answer for live users; the array forms over vocabulary rows
    (``recommend_rows``, ``lookalike_rows``, ``propensity_rows``, ``user_rows``), which batch jobs
    use on a bundle, answer from the bundle as exported."""

    # The service that owns live views and their journal (RealtimeService): it imports this module
    # and sets itself here, so :meth:`load` can start one.
    service_class: Any = None

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path, journal=None, options=None, **load_kwargs) -> "LiveRecommender":
        """Load the bundle at ``path`` with its journal (default: ``<path>.journal`` beside it),
        replaying the journal's events the bundle has not seen. ``options``: a
        :class:`~dmp_dl.realtime.service.RealtimeOptions`; other keywords go to :meth:`Recommender.load`.
        Call :meth:`close` (or use ``with``) to release the journal."""
        return cls.service_class.open(path, journal, options, **load_kwargs)

    @classmethod
    def wrap(cls, rec: Recommender, part, service, intake, refresh_seconds: float = 5.0) -> "LiveRecommender":
        """A live view of the loaded ``rec`` (its arrays are shared, never copied)."""
        live = cls.__new__(cls)
        live.__dict__.update(rec.__dict__)
        live._part, live._service, live._intake = part, service, intake
        live._users: dict[str, LiveUser] = {}
        live._new_keys: list[str] = []
        live._new_rows: dict[str, int] = {}
        live._refresh_seconds = float(refresh_seconds)
        live._table = UserTable(rec.user_vocab.ids, rec.user_vectors, rec.user_index, 0, time.monotonic())
        live._table_lock = threading.Lock()
        live._changed_at: float | None = None  # first change the user index does not have yet
        live._counts = {"events_applied": 0, "events_replayed": 0}
        # key -> (the user's event count when scored, score): a score read since the user's latest event
        live._scored: dict[str, tuple[int, float]] = {}
        live._data_end = part.data_end
        live._timeless = part.entry.get("timestamps") is False
        # a network that encodes rows reads them, and so does a served score with an item-item term of the
        # decayed rows: continued from the bundle's decayed sums when it stores them and each user's
        # reference time (older bundles: the cold-start encoder on the history)
        reads_rows = rec.encodes_rows or (rec.served is not None and rec.served.reads_rows)
        live._keeps_rows = reads_rows and rec._seen_sums is not None and part.reference_times is not None
        live._half_life = None if live._timeless else rec.half_life_days
        live._behaviour = None
        live._propensity_items = None
        scorer = rec._propensity
        if scorer is not None:
            live._behaviour = BehaviourStats(scorer.features.behaviour)
            if live._data_end is None:
                live._data_end = int(scorer.data_end)
            same_items = scorer.item_vocab is None or scorer.item_vocab == rec.item_vocab
            live._propensity_items = None if same_items else scorer.item_vocab.index_of(rec.item_vocab.ids)
        live._profile_types = {str(t): i for i, t in enumerate(rec.profiles.event_types)} if rec.profiles is not None else {}
        if live._data_end is None and rec.profiles is not None:
            live._data_end = int(rec.profiles.as_of)
        live._warn_missing()
        return live

    def _warn_missing(self) -> None:
        part = self._part
        if self.network is None:
            log.warning("real time: the bundle has no cold-start network, so events update profiles and propensity "
                        "but not user vectors; new users get no recommendations")
        if part.recent_items is None:
            log.warning("real time: the bundle has no realtime part (exported by an older version): a known user's "
                        "history before their new events is their seen items, in no particular order")
        if self._propensity is not None and part.behaviour_stats is None:
            log.warning("real time: the bundle lacks propensity statistics: known users keep their exported "
                        "propensity score; new users are scored from their events")
        if self.profiles is not None and self.profiles.categories and part.item_categories is None:
            log.warning("real time: the bundle lacks item categories: interest profiles decay but gain no new interests")

    # -- the Python API ------------------------------------------------------------------------
    def ingest(self, events: Sequence[Mapping]) -> dict:
        """Journal ``events`` (durably, before returning) and apply them to the users at once.

        events: dicts ``{"user_id", "item_id", "timestamp"?, "event_type"?, "value"?, "event_id"?}``.
        Returns ``{"accepted": n, "rejected": {reason: count}}`` (plus ``ignored_fields`` when an
        event had fields this API does not know); see :mod:`dmp_dl.realtime.intake` for the rules.
        """
        return self._service.ingest(events)

    def close(self) -> None:
        """Close the journal and release its lock (later ``ingest`` calls are refused; queries still answer)."""
        self._service.close()

    def __enter__(self) -> "LiveRecommender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- ids -----------------------------------------------------------------------------------
    def _key(self, user_id: object) -> str:
        """A raw user id as the bundle holds it (canonical; hashed when the bundle holds pseudonyms)."""
        if self.pseudonymizer is None:
            return canonical_id(user_id)
        return self.pseudonymizer.one(canonical_id(user_id))

    def user_keys(self, user_ids: Sequence[object]) -> set[str]:
        """The ids as the bundle holds them of ``user_ids``: raw ids, or ``hmac-sha256:...`` keyed
        hashes made with this bundle's key (taken as the pseudonyms they name). Other keyed or
        salted hashes, blank and malformed ids name no one here and are left out."""
        keys = set()
        for value in self._check_ids(user_ids, "user_ids"):
            text = canonical_id(value)
            try:
                tag = parse_tag(text)
            except ValueError:
                continue
            if tag is not None:
                if self.pseudonymizer is not None and tag[0] == self.pseudonymizer.fingerprint:
                    keys.add(tag[1])
            elif text and not text.startswith(SALTED_PREFIX):
                keys.add(self._key(text))
        return keys

    @property
    def _withheld(self) -> set[str]:
        return self._service.withheld

    def _check_served(self, ids: Sequence[object]) -> None:
        """:class:`UnknownIdError` naming the ids of ``ids`` that are withheld (being erased)."""
        withheld = self._withheld
        if withheld:
            gone = [str(x) for x in ids if self._key(x) in withheld]
            if gone:
                raise UnknownIdError("user", gone[0] if len(gone) == 1 else gone[:5])

    def live_user(self, user_id: object) -> LiveUser | None:
        """The live state of ``user_id`` (a raw id), or None when events have not changed it."""
        return self._users.get(self._key(user_id))

    @property
    def n_live_users(self) -> int:
        return len(self._users)

    @property
    def n_new_users(self) -> int:
        return len(self._new_keys)

    # -- applying events -----------------------------------------------------------------------
    def _initial(self, key: str) -> LiveUser:
        """A user's state before any real-time event: from the bundle, or empty for a new user."""
        row = self._user_rows.get(key, -1)
        prof, seg, part = self.profiles, self.stored_segments, self._part
        if row < 0:
            return LiveUser(key, -1, np.zeros(0, np.int32), None, None, None, None,
                            np.zeros(len(prof.categories)) if prof is not None else None, 0.0,
                            np.zeros(len(prof.event_types)) if prof is not None else None, -np.inf,
                            self._behaviour.empty(1)[0] if self._behaviour is not None else None,
                            float(self._data_end) if self._data_end is not None else -np.inf, None, 0, 0,
                            *((np.zeros(0, np.int64), np.zeros(0, np.float64)) if self._keeps_rows else (None, None)))
        lo, hi = self._seen_indptr[row], self._seen_indptr[row + 1]
        seen = self._seen_items[lo:hi]
        if part.recent_items is not None:
            recent = part.recent_items[row]
            recent = recent[recent >= 0][::-1]  # oldest first
            if len(seen) * len(recent) <= 1 << 16:  # a few comparisons cost less than np.isin's sorts
                keep = ~(seen[:, None] == recent[None, :]).any(axis=1)
            else:
                keep = ~np.isin(seen, recent)
            items = np.concatenate([seen[keep], recent]).astype(np.int32)
        else:
            items = seen.astype(np.int32)
        interest = affinity = None
        total, as_of = 0.0, -np.inf
        if prof is not None:
            interest = np.zeros(len(prof.categories))
            cats = prof.top_categories[row]
            interest[cats[cats >= 0]] = prof.top_weights[row][cats >= 0]
            total, affinity, as_of = float(prof.interest_total[row]), prof.event_type_affinity[row].astype(np.float64), float(prof.as_of)
        stats = part.behaviour_stats[row].copy() if part.behaviour_stats is not None and self._behaviour is not None else None
        score = float(self._propensity.known_scores[row]) if self._propensity is not None else None
        return LiveUser(key, row, items, self._stored_attributes(row), self.user_vectors[row].copy(),
                        int(seg.assignments[row]) if seg is not None else None,
                        float(seg.distances[row]) if seg is not None else None,
                        interest, total, affinity, as_of, stats,
                        float(self._data_end) if self._data_end is not None else -np.inf, score, 0, 0,
                        *((seen.astype(np.int64), self._seen_sums[lo:hi].copy(), float(part.reference_times[row]))
                          if self._keeps_rows else (None, None)))

    def _stored_attributes(self, row: int) -> dict | None:
        """The user's attributes as the encoder's attribute table stores them, as a record
        ``cold_user_vectors`` encodes back to the same inputs (None when the model reads none)."""
        table = self.user_features
        if table is None or not self.reads_user_attributes:
            return None
        record: dict[str, object] = {}
        for token in table.tokens[row].tolist():
            if token <= 0:
                continue
            text = table.token_vocab[token - 1]
            column = next((c for c in table.categorical_columns if text.startswith(c + "=")), None)
            if column is not None:
                value = text[len(column) + 1 :]
                record[column] = f"{record[column]}{MULTI_VALUE_SEP}{value}" if column in record else value
        for j, column in enumerate(table.numeric_columns):
            record[column] = float(table.numeric[row, j]) * table.numeric_std[j] + table.numeric_mean[j]
        return record or None

    def _apply(self, events, replay: bool = False) -> None:
        """Apply clean events (an :class:`~dmp_dl.realtime.intake.EventBatch`, in order): every
        user's history, profile and statistics in vectorised passes over the batch, then their
        vectors, segments and scores (:meth:`_with_vectors`), ``VECTOR_CHUNK`` users at a time."""
        if not len(events):
            return
        codes, keys = pd.factorize(events.user)
        order = np.argsort(codes, kind="stable")  # each user's events together, in their order
        bounds = np.r_[0, np.cumsum(np.bincount(codes, minlength=len(keys)))]
        item, t, types = events.item[order], events.timestamp[order], events.event_type[order]
        value, weight = events.value[order], events.weight[order]
        user = codes[order]
        for start in range(0, len(keys), VECTOR_CHUNK):
            stop = min(start + VECTOR_CHUNK, len(keys))
            span = slice(bounds[start], bounds[stop])
            before = [self._users.get(str(k)) or self._initial(str(k)) for k in keys[start:stop]]
            drafts = self._updated(before, user[span] - start, bounds[start : stop + 1] - bounds[start], item[span],
                                   t[span], types[span], value[span], weight[span])
            drafts = self._with_vectors(drafts)
            for u in drafts:
                if u.row < 0 and u.key not in self._new_rows:
                    self._new_rows[u.key] = len(self._new_keys)
                    self._new_keys.append(u.key)
                self._users[u.key] = u
        self._counts["events_replayed" if replay else "events_applied"] += int(len(events))
        if self._changed_at is None:
            self._changed_at = time.monotonic()

    def _updated(self, users: list[LiveUser], user: np.ndarray, bounds: np.ndarray, item: np.ndarray, t: np.ndarray,
                 types: np.ndarray, value: np.ndarray, weight: np.ndarray) -> list[dict]:
        """``users`` (U) after their events: ``user`` (n,) 0..U-1, grouped in order (user u's events are
        ``bounds[u]:bounds[u + 1]``), item rows, times, types, values and loss weights. Histories,
        interest profiles and propensity statistics, as the fields of each user's next
        :class:`LiveUser`; vectors, segments and scores come after (:meth:`_with_vectors`)."""
        n_users = len(users)
        last = np.full(n_users, -np.inf)
        np.maximum.at(last, user, t.astype(np.float64))
        fields: list[dict] = [{} for _ in range(n_users)]
        prof = self.profiles
        if prof is not None and users[0].interest is not None:
            half_life = prof.half_life_days * SECONDS_PER_DAY
            old = np.array([u.as_of for u in users])
            if self._timeless:  # trained without event times: profiles are plain weighted counts
                as_of, shift, decay = np.where(np.isfinite(old), old, 0.0), np.ones(n_users), np.ones(len(t))
            else:
                as_of = np.maximum(old, last)
                with np.errstate(invalid="ignore"):
                    shift = np.where(np.isfinite(old), np.exp2(-(as_of - np.where(np.isfinite(old), old, as_of)) / half_life), 0.0)
                decay = np.exp2(-(as_of[user] - t) / half_life)
            if prof.event_weights is not None:
                w = np.array([float(prof.event_weights.get(str(x), 0.0)) for x in types.tolist()])
            else:
                w = weight
            interest = np.stack([u.interest for u in users]) * shift[:, None]
            total = np.array([u.interest_total for u in users]) * shift
            shares = self._part.item_categories
            if shares is not None and shares.shape[1] == interest.shape[1]:
                added = category_sums(shares, user, item, w * decay, n_users)
                interest += added
                total += added.sum(axis=1)
            affinity = np.stack([u.affinity for u in users]) * shift[:, None]
            index = self._profile_types.get
            type_index = np.fromiter((index(x, -1) for x in types.tolist()), dtype=np.int64, count=len(types))
            known = type_index >= 0
            np.add.at(affinity, (user[known], type_index[known]), decay[known])
            for i in range(n_users):
                fields[i].update(interest=interest[i].copy(), interest_total=float(total[i]), affinity=affinity[i].copy(),
                                 as_of=float(as_of[i]))
        if self._behaviour is not None and users[0].stats is not None:
            stats, refs = self._behaviour.update_many(np.stack([u.stats for u in users]), np.array([u.stats_ref for u in users]),
                                                      user, t, self._behaviour.type_codes(types), value)
            for i in range(n_users):
                fields[i].update(stats=stats[i].copy(), stats_ref=float(refs[i]))
        if self._keeps_rows:
            self._updated_rows(users, user, item, t, weight, last, fields)
        out = []
        for i, u in enumerate(users):
            lo, hi = bounds[i], bounds[i + 1]
            draft = dict(u.__dict__)
            draft.update(items=np.concatenate([u.items, item[lo:hi]]).astype(np.int32), events=u.events + int(hi - lo),
                         last_event=int(max(u.last_event, last[i])), **fields[i])
            out.append(draft)
        return out

    def _updated_rows(self, users: list[LiveUser], user: np.ndarray, item: np.ndarray, t: np.ndarray,
                      weight: np.ndarray, last: np.ndarray, fields: list[dict]) -> None:
        """Each user's row after their events, into ``fields``: the summed weights as of their
        previous reference time moved forward to their latest event, plus the new events' weights
        decayed to it (:func:`~dmp_dl.data.recency.decayed`, the function training sums with), one
        vectorised pass over the batch. ``last``: (U,) each user's latest event in the batch."""
        n_users, n_items = len(users), self.n_items
        old_ref = np.array([u.row_ref for u in users], dtype=np.float64)
        new_ref = np.maximum(old_ref, last)
        sizes = np.fromiter((len(u.row_items) for u in users), dtype=np.int64, count=n_users)
        owner = np.repeat(np.arange(n_users, dtype=np.int64), sizes)
        old_items = np.concatenate([u.row_items for u in users]) if sizes.sum() else np.zeros(0, np.int64)
        old_sums = np.concatenate([u.row_sums for u in users]) if sizes.sum() else np.zeros(0, np.float64)
        moved = decayed(old_sums, old_ref[owner], new_ref[owner], self._half_life)  # old refs are finite: they have events
        added = decayed(weight, t.astype(np.float64), new_ref[user], self._half_life)
        keys, where = np.unique(np.concatenate([owner * n_items + old_items, user.astype(np.int64) * n_items + item]),
                                return_inverse=True)
        sums = np.bincount(where, weights=np.concatenate([moved, added]), minlength=len(keys))
        bounds = np.searchsorted(keys // n_items, np.arange(n_users + 1))
        for i in range(n_users):
            lo, hi = bounds[i], bounds[i + 1]
            fields[i].update(row_items=keys[lo:hi] % n_items, row_sums=sums[lo:hi], row_ref=float(new_ref[i]))

    def _with_vectors(self, drafts: list[dict]) -> list[LiveUser]:
        """The updated users (fields from :meth:`_updated`) with their vectors (one network pass),
        segments and propensity scores."""
        if self.network is not None:
            if self._keeps_rows and self.encodes_rows:  # attributes as stored for known users, none for new ones
                indptr, items, strength = self._rows_of(drafts)
                vectors = self.row_user_vectors(indptr, items, strength, user_rows=np.array([d["row"] for d in drafts]))
            else:
                attributes = [d["attributes"] for d in drafts]
                attributes = attributes if any(a for a in attributes) else None
                histories = [self.item_vocab.ids[d["items"]].tolist() for d in drafts]
                vectors, _, _ = self.cold_user_vectors(histories, attributes)
            for d, v in zip(drafts, vectors):
                d["vector"] = v
        seg = self.stored_segments
        with_vec = [d for d in drafts if d["vector"] is not None]
        if seg is not None and with_vec:
            labels, dist = assign(np.stack([d["vector"] for d in with_vec]), seg.centroids,
                                  bool(seg.meta.get("normalize", True)))
            for d, label, distance in zip(with_vec, labels.tolist(), dist.tolist()):
                d["segment"], d["distance"] = int(label), float(distance)
        for d in drafts:
            if d["stats"] is not None:  # scored from the statistics when read (:meth:`propensity`)
                d["propensity"] = None
        return [LiveUser(**d) for d in drafts]

    @staticmethod
    def _rows_of(users) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows of live users (:class:`LiveUser` or their fields) as CSR pieces: indptr (U + 1,),
        item rows (nnz,) and each item's strength ``log2(1 + sum)`` (nnz,) float32."""
        get = (lambda u, k: u[k]) if users and isinstance(users[0], dict) else getattr
        sizes = np.fromiter((len(get(u, "row_items")) for u in users), dtype=np.int64, count=len(users))
        indptr = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(sizes, out=indptr[1:])
        if not indptr[-1]:
            return indptr, np.zeros(0, np.int64), np.zeros(0, np.float32)
        items = np.concatenate([get(u, "row_items") for u in users]).astype(np.int64)
        return indptr, items, row_strength(np.concatenate([get(u, "row_sums") for u in users]))

    def _snapshot(self, users: list[dict]):
        """The propensity model's inputs of live users (their fields as dicts), as of their statistics."""
        features, part = self._propensity.features, self._part
        n = len(users)
        refs = np.array([u["stats_ref"] for u in users])
        behaviour = self._behaviour.features(np.stack([u["stats"] for u in users]), refs, refs,
                                             np.array([len(np.unique(u["items"])) for u in users]))
        rows = np.array([u["row"] for u in users])
        known = rows >= 0
        # unknown attributes encode as zeros: no token, numeric values at the mean
        tokens = np.zeros((n, features.attributes.tokens.shape[1]), np.int64)
        numeric = np.zeros((n, len(features.attributes.numeric_columns)), np.float32)
        if part.propensity_tokens is not None and known.any():
            tokens[known], numeric[known] = part.propensity_tokens[rows[known]], part.propensity_numeric[rows[known]]
        enc = features.encoder_attributes
        enc_tokens = np.zeros((n, enc.tokens.shape[1] if enc is not None else 1), np.int64)
        enc_numeric = np.zeros((n, len(enc.numeric_columns) if enc is not None else 0), np.float32)
        if enc is not None and part.encoder_tokens is not None and known.any():
            enc_tokens[known], enc_numeric[known] = part.encoder_tokens[rows[known]], part.encoder_numeric[rows[known]]
        history = np.full((n, features.history_len), features.n_items, dtype=np.int64)
        for r, u in enumerate(users):
            recent = u["items"][-features.history_len :][::-1] if features.history_len else u["items"][:0]
            if self._propensity_items is not None:
                recent = self._propensity_items[recent]
                recent = np.where(recent >= 0, recent, features.n_items)
            history[r, : len(recent)] = recent
        return Snapshot(behaviour, tokens, numeric, history, enc_tokens, enc_numeric)

    # -- queries -------------------------------------------------------------------------------
    def recommend_batch(self, user_ids: Sequence[object], k: int = 10, exclude_seen: bool = True,
                        chunk: int = 4096, **rules: Any) -> list[Ranked]:
        """:meth:`Recommender.recommend_batch`; a live user is answered from their whole current
        history, exactly as the model scores a history (:meth:`Recommender.recommend_for_histories`).
        ``rules``: the business rules of :meth:`Recommender.recommend`."""
        k = self._check_k(k)
        self.item_rules(**rules)  # checked once, before any user is answered
        ids = self._check_ids(user_ids, "user_ids")
        self._check_served(ids)
        live = [self._users.get(self._key(x)) for x in ids]
        if not any(live):
            return super().recommend_batch(ids, k, exclude_seen, chunk, **rules)
        out: list[Ranked | None] = [None] * len(ids)
        rest = [i for i, u in enumerate(live) if u is None]
        if rest:
            for i, ranked in zip(rest, super().recommend_batch([ids[i] for i in rest], k, exclude_seen, chunk, **rules)):
                out[i] = ranked
        hit = [i for i, u in enumerate(live) if u is not None]
        if self.network is None:
            new = [ids[i] for i in hit if live[i].row < 0]
            if new:
                raise MissingPartError(f"user {new[0]!r} is new since this bundle was trained, and the bundle has no "
                                       "cold-start network to recommend from their events")
            for i in hit:  # known users keep their exported vector
                out[i] = super().recommend_batch([ids[i]], k, exclude_seen, **rules)[0]
            return out  # type: ignore[return-value]
        if self._keeps_rows:  # the live vector and row, scored as the bundle scores its users
            users = [live[i] for i in hit]
            indptr, items, strength = self._rows_of(users)
            rows_of = (indptr, items)
            ids, scores = self._top_items(np.stack([u.vector for u in users]), rows_of, k,
                                          rows_of if exclude_seen else (None, None), self.item_rules(**rules), strength)
            answers = self._ranked(ids, scores, self.item_vocab)
        else:
            histories = [self.item_vocab.ids[live[i].items].tolist() for i in hit]
            attributes = [live[i].attributes for i in hit]
            answers = self.recommend_for_histories(histories, k, exclude_seen, attributes if any(attributes) else None,
                                                   **rules)
        for i, ranked in zip(hit, answers):
            out[i] = ranked
        return out  # type: ignore[return-value]

    def propensity(self, user_ids: Sequence[object]) -> list[float]:
        """:meth:`Recommender.propensity`, live users scored as of their latest event."""
        if self._propensity is None:
            raise self.missing_propensity()
        ids = self._check_ids(user_ids, "user_ids")
        self._check_served(ids)
        live = [self._users.get(self._key(x)) for x in ids]
        out: list[float | None] = [u.propensity if u is not None else None for u in live]
        stale: dict[str, LiveUser] = {}
        for i, u in enumerate(live):
            if u is not None and u.stats is not None:
                kept = self._scored.get(u.key)
                if kept is not None and kept[0] == u.events:
                    out[i] = kept[1]
                else:
                    stale[u.key] = u
        if stale:  # one pass for every user whose score is older than their latest event
            users = list(stale.values())
            scores = self._propensity.score_snapshot(self._snapshot([vars(u) for u in users])).tolist()
            for u, score in zip(users, scores):
                self._scored[u.key] = (u.events, float(score))
            for i, u in enumerate(live):
                if u is not None and u.key in stale:
                    out[i] = self._scored[u.key][1]
        rest = [i for i, p in enumerate(out) if p is None]
        if rest:
            known = [ids[i] for i in rest]
            unknown = [x for x, u in zip(known, (live[i] for i in rest)) if u is not None and u.row < 0]
            if unknown:  # a new user without a score (no network history and no statistics)
                raise MissingPartError(f"user {unknown[0]!r} is new and cannot be scored by this bundle's propensity model")
            for i, p in zip(rest, super().propensity(known)):
                out[i] = p
        return out  # type: ignore[return-value]

    def profile(self, user_id: object, top: int | None = None) -> dict:
        """:meth:`Recommender.profile`; a live user's interests and affinities are as of their latest event."""
        self._check_served([user_id])
        user = self._users.get(self._key(user_id))
        if user is None:
            return super().profile(user_id, top)
        profiles = self._audience_part(self.profiles, "interest profiles")
        n = profiles.top_categories.shape[1]
        top = n if top is None else self._check_k(top, "top")
        interest = user.interest
        order = np.lexsort((np.arange(len(interest)), -interest))[: min(top, n)]
        order = order[interest[order] > 0]
        total = float(user.interest_total)
        return {
            "user_id": self._display_id(user),
            "interests": [{"category": profiles.categories[c], "weight": float(interest[c]),
                           "share": float(interest[c]) / total if total > 0 else 0.0} for c in order.tolist()],
            "event_types": dict(zip(profiles.event_types, user.affinity.astype(float).tolist())),
            "as_of": int(user.as_of),
            "half_life_days": float(profiles.half_life_days),
            "segment": self._live_segment(user) if self.stored_segments is not None else None,
        }

    def _display_id(self, user: LiveUser) -> str:
        return str(self.user_vocab.ids[user.row]) if user.row >= 0 else user.key

    def _live_segment(self, user: LiveUser) -> dict | None:
        if user.segment is None:
            return None
        agg = self.stored_segments.meta["segments"][user.segment]
        return {"segment": int(user.segment), "distance": float(user.distance),
                "top_categories": [c["category"] for c in agg.get("top_categories", [])]}

    def segment(self, user_id: object) -> dict:
        """:meth:`Recommender.segment`; a live user's segment is the nearest centre of their current vector."""
        self._check_served([user_id])
        user = self._users.get(self._key(user_id))
        if user is None:
            return super().segment(user_id)
        self._audience_part(self.stored_segments, "segments")
        found = self._live_segment(user)
        if found is None:
            raise MissingPartError(f"user {user_id!r} has no vector to place in a segment (the bundle has no cold-start network)")
        return found

    def segments(self, representatives: int = 5) -> list[dict]:
        """:meth:`Recommender.segments` with sizes, shares and representatives over the current users."""
        seg = self._audience_part(self.stored_segments, "segments")
        users = list(self._users.values())
        assignments, distances = seg.assignments.copy(), seg.distances.copy()
        for u in users:
            if u.row >= 0 and u.segment is not None:
                assignments[u.row], distances[u.row] = u.segment, u.distance
        new = [self._users[k] for k in self._new_keys if self._users[k].segment is not None]
        ids = np.concatenate([self.user_vocab.ids, np.array([u.key for u in new], dtype=object)])
        current = StoredSegments(np.r_[assignments, [u.segment for u in new]].astype(np.int64),
                                 np.r_[distances, [u.distance for u in new]].astype(np.float32), seg.centroids, seg.meta)
        described = current.describe(ids, representatives)
        withheld = self._withheld
        if withheld:
            for d in described:
                d["representatives"] = [r for r in d["representatives"] if r not in withheld]
        return described

    def uplift(self, user_ids: Sequence[object]) -> list[dict]:
        """:meth:`Recommender.uplift`. Known users are scored as the bundle holds them (the uplift
        model reads no real-time state); a user new since the bundle was trained cannot be scored
        (:class:`MissingPartError`, 409) until a training run includes them."""
        self._uplift_part()  # 409 first when the bundle has no uplift model
        ids = self._check_ids(user_ids, "user_ids")
        self._check_served(ids)
        new = [x for x in ids if (u := self._users.get(self._key(x))) is not None and u.row < 0]
        if new:
            raise MissingPartError(f"user {str(new[0])!r} is new since this bundle was trained: its uplift model scores "
                                   "the bundle's users only, and scores this one once a training run includes their events")
        return super().uplift(ids)

    def lookalike(self, seed_user_ids: Sequence[object], k: int = 100, exclude_seeds: bool = True,
                  method: str = "centroid") -> Ranked:
        """:meth:`Recommender.lookalike` with the seeds' current vectors, over the user index of at
        most ``refresh_seconds`` ago (every user, new ones included, with their vectors then)."""
        k = self._check_k(k)
        seeds = self._check_ids(seed_user_ids, "seed_user_ids")
        if not seeds:
            raise InvalidRequestError("seed_user_ids is empty: give at least one known user id")
        if method not in LOOKALIKE_METHODS:
            raise InvalidRequestError(f"method must be one of {LOOKALIKE_METHODS}, got {method!r}")
        self._check_served(seeds)
        by_key = {}
        for x in seeds:
            by_key.setdefault(self._key(x), x)
        withheld = self._withheld.copy()  # a snapshot: an erasure may add to it meanwhile
        if not any(key in self._users for key in by_key) and not withheld:
            table = self._current_table()
            if table.n_new == 0 and table.vectors is self.user_vectors:
                return super().lookalike(seeds, k, exclude_seeds, method)
        vectors, unknown = [], []
        for key, x in by_key.items():
            user = self._users.get(key)
            if user is not None and user.vector is not None:
                vectors.append(user.vector)
            elif key in self._user_rows:
                vectors.append(self.user_vectors[self._user_rows[key]])
            elif user is None:
                unknown.append(str(x))
        if unknown:
            raise UnknownIdError("user", unknown[0] if len(unknown) == 1 else unknown[:5])
        if not vectors:
            raise MissingPartError("the seed users have no vectors (the bundle has no cold-start network)")
        table = self._current_table()
        rows = [self._table_row(key, table) for key in by_key] if exclude_seeds else []
        rows += [self._table_row(key, table) for key in withheld]  # never in an audience
        exclude = np.array([r for r in rows if r >= 0], dtype=np.int64) if exclude_seeds or withheld else None
        found, scores = lookalike_search(table.index, table.vectors, np.stack(vectors).astype(np.float32),
                                         exclude, k, method)
        return list(zip([str(x) for x in table.ids[found]], scores.astype(float).tolist()))

    # -- the lookalike user index --------------------------------------------------------------
    def _table_row(self, key: str, table: UserTable) -> int:
        row = self._user_rows.get(key)
        if row is not None:
            return row
        j = self._new_rows.get(key)
        return len(self.user_vocab) + j if j is not None and j < table.n_new else -1

    def _current_table(self) -> UserTable:
        """The user table lookalike searches; rebuilt here when it is stale and no background
        refresher (the server's) keeps it fresh."""
        if self._changed_at is not None and not self._service.refreshing and \
                time.monotonic() - self._changed_at >= self._refresh_seconds:
            self.refresh_user_index()
        return self._table

    @property
    def user_index_age(self) -> float | None:
        """Seconds since the oldest change the lookalike user index does not have yet (None: none)."""
        changed = self._changed_at
        return None if changed is None else time.monotonic() - changed

    def refresh_user_index(self) -> UserTable:
        """Rebuild the lookalike user index now, with every user's current vector (new users appended)."""
        with self._table_lock:
            changed_at = self._changed_at
            users = list(self._users.values())
            new_keys = list(self._new_keys)
            vectors = self.user_vectors.copy()
            for u in users:
                if u.row >= 0 and u.vector is not None:
                    vectors[u.row] = u.vector
            new_vectors = [self._users[k].vector for k in new_keys]
            usable = 0
            while usable < len(new_vectors) and new_vectors[usable] is not None:
                usable += 1
            if usable:
                vectors = np.concatenate([vectors, np.stack(new_vectors[:usable])]).astype(np.float32)
            ids = np.concatenate([self.user_vocab.ids, np.array(new_keys[:usable], dtype=object)])
            info = (self.manifest.get("indexes") or {}).get("users") or {}
            t0 = time.perf_counter()
            index = build_index(vectors, info.get("factory") or "Flat", info.get("search_params") or "")
            self._table = UserTable(ids, vectors, index, usable, time.monotonic())
            if self._changed_at == changed_at:
                self._changed_at = None
            log.debug("lookalike user index rebuilt: %d users in %.3f s", len(ids), time.perf_counter() - t0)
            return self._table

    # -- facts ---------------------------------------------------------------------------------
    def info(self) -> dict:
        out = super().info()
        out["users"] = self.n_users + len(self._new_keys)
        out["realtime"] = {
            **self._counts,
            "live_users": len(self._users),
            "new_users": len(self._new_keys),
            "user_index_age_seconds": self.user_index_age,
            "user_index_refresh_seconds": self._refresh_seconds,
            **self._service.describe(),
        }
        return out
