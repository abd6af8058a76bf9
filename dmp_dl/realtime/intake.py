"""From a request's events to clean events a bundle can apply: the training log's cleaning, plus
what only a server can check.

Each event is ``{"user_id", "item_id", "timestamp"?, "event_type"?, "value"?, "event_id"?}``. The
batch is cleaned by :func:`dmp_dl.data.cleaning.clean_events` with the bundle's own cleaning
options (``data.cleaning`` of its training run), so an event means what the same row of a training
log means and is refused for the same reasons (``missing_user_id``, ``bad_timestamp``,
``unknown_event_type``, ``below_min_value``, ``duplicate``, ``erased_user``, ...). Before that, an
event that is not an object of scalar fields is ``malformed_row``; after it, an item the bundle does
not know is ``unknown_item`` (the next training run adds it to the catalogue), and an event whose
key was seen before, in the batch or in the journal, is a ``duplicate``. The key is the client's
``event_id`` when given (two events with different ids are two events, whatever their contents),
else a hash of what the client sent, without the receive time, so that resending an event is safe.
Unknown fields are ignored and named in the answer, as a log's extra columns are. A missing
timestamp is the time the server received the event; a missing event type is
``data.cleaning.default_event_type``. Ids are read by :func:`~dmp_dl.data.schema.canonical_id`
(``7777.0`` is user ``"7777"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dmp_dl.core.errors import ConfigError
from dmp_dl.data.cleaning import DROP_REASONS, MISSING_TOKENS, CleaningOptions, clean_events, clean_few_events, plain_id
from dmp_dl.data.erasure_list import ErasureEntries, bundle_erasure_lists, read_erasure_list
from dmp_dl.data.pseudonymize import DEFAULT_SECRET_ENV, TAG_PREFIX, Pseudonymizer, pseudonymize_ids, recorded_privacy
from dmp_dl.data.schema import EVENT_ID, ITEM, TIME, TYPE, USER, VALUE, WEIGHT, normalize_ids

log = logging.getLogger(__name__)

FIELDS = (USER, ITEM, TIME, TYPE, VALUE, EVENT_ID)
REJECT_REASONS = tuple(r for r in DROP_REASONS if r != "kcore") + ("unknown_item",)
MAX_FIELD_CHARS = 512
FEW_EVENTS = 64  # batches up to this size are cleaned without pandas (its fixed cost per call dominates them)
_ROW = "_row"


def _event_hashes(keys: Iterable[str]) -> np.ndarray:
    """(n,) uint64: the first 8 bytes of BLAKE2b of each key (collisions: ~1 in 10^19 per pair)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest(), "little")
                        for k in keys), dtype=np.uint64)


class KeySet:
    """The event keys journaled so far, 8 bytes each: a sorted array plus a small set of recent ones."""

    MERGE_AT = 1 << 16

    def __init__(self):
        self._base = np.zeros(0, dtype=np.uint64)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return len(self._base) + len(self._recent)

    @property
    def nbytes(self) -> int:
        return int(self._base.nbytes) + 80 * len(self._recent)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """(n,) bool: which of ``hashes`` (uint64) are in the set."""
        found = np.zeros(len(hashes), dtype=bool)
        if len(self._base):
            at = np.searchsorted(self._base, hashes).clip(max=len(self._base) - 1)
            found = self._base[at] == hashes
        if self._recent:
            found |= np.fromiter((int(h) in self._recent for h in hashes.tolist()), dtype=bool, count=len(hashes))
        return found

    def add(self, hashes: np.ndarray) -> None:
        self._recent.update(int(h) for h in hashes.tolist())
        if len(self._recent) >= self.MERGE_AT:
            merged = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            self._base = np.union1d(self._base, merged)
            self._recent = set()


class ErasedUsers:
    """Who is on the erasure list (:mod:`dmp_dl.data.erasure_list`), for one bundle.

    entries: the parsed list, or None; key: the bundle's pseudonymisation key, or (raw-id bundles
    whose list holds keyed hashes) the key the list was written with; pseudonymized: whether the
    bundle's ids are pseudonyms.
    """

    def __init__(self, entries=None, key: Pseudonymizer | None = None, pseudonymized: bool = False):
        self.entries, self.key, self.pseudonymized = entries, key, pseudonymized
        self._hashed_raw = ({key.one(r) for r in entries.raw_ids} if entries is not None and pseudonymized else set())
        self._warned = False

    def __len__(self) -> int:
        return 0 if self.entries is None else len(self.entries)

    def among(self, raw_ids: Sequence[str | None], keys: Sequence[str]) -> set[str]:
        """The ``keys`` (user ids as the bundle holds them) of users on the list. raw_ids: the same
        users' normalised ids as given; ``None`` for an id given as its tagged pseudonym (what the
        journal of a pseudonymised bundle holds), which is matched by its pseudonym alone."""
        if not len(self) or not len(keys):
            return set()
        raw = np.asarray(raw_ids, dtype=object)
        keys = np.asarray(keys, dtype=object)
        known = np.array([r is not None for r in raw.tolist()], dtype=bool)
        found = np.zeros(len(keys), dtype=bool)
        if known.any():
            found[known] = self.entries.resolve(raw[known].astype(str), self.key,
                                                keys[known] if self.pseudonymized else None)
        if (~known).any():  # pseudonyms alone: keyed entries, and raw entries hashed with the key
            e = self.entries
            found[~known] = [k in e.tagged or k in self._hashed_raw for k in keys[~known].tolist()]
            if e.salted and not self._warned:
                self._warned = True
                log.warning("the erasure list has salted entries, which cannot be matched against journaled "
                            "pseudonyms (they need the raw id); they apply to new events only")
        return set(keys[found].tolist())

    @classmethod
    def for_bundle(cls, manifest: dict, pseudonymizer: Pseudonymizer | None, erasure_list=None) -> "ErasedUsers":
        """The users on every erasure list that names the bundle
        (:func:`~dmp_dl.data.erasure_list.bundle_erasure_lists`), ``erasure_list`` included."""
        paths = bundle_erasure_lists(manifest, erasure_list)
        if not paths:
            return cls()
        entries = ErasureEntries()
        for path in paths:
            read_erasure_list(path, entries, required=False)
        key = pseudonymizer
        if entries.tagged and key is None:
            recorded = recorded_privacy(manifest)
            where = next(iter(entries.tagged.values()))[0]
            try:
                key = Pseudonymizer.from_env(recorded.get("secret_env") or DEFAULT_SECRET_ENV, recorded.get("secret_file"),
                                             int(recorded.get("id_length", 32)))
            except ConfigError as exc:
                raise ConfigError(f"{where} holds erased users as keyed hashes: the server needs that secret to keep their "
                                  f"events out ({exc})") from None
        if key is not None and entries.fingerprints:
            entries.check_key(key)
        return cls(entries, key, pseudonymizer is not None)


@dataclass
class EventBatch:
    """Accepted events, in the order they are journaled and applied: arrays of equal length.

    user: user ids as the bundle holds them (pseudonyms for pseudonymised bundles); item: item rows;
    item_id: item ids; timestamp: int64 epoch seconds; event_type; value; weight: the event type's
    loss weight (``data.cleaning.event_weights``); event_id: the event's key.
    """

    user: np.ndarray
    item: np.ndarray
    item_id: np.ndarray
    timestamp: np.ndarray
    event_type: np.ndarray
    value: np.ndarray
    weight: np.ndarray
    event_id: np.ndarray

    def __len__(self) -> int:
        return len(self.timestamp)


@dataclass
class Intake:
    """The outcome of :meth:`EventIntake.prepare`: the accepted :class:`EventBatch`, the events
    refused per reason, the unknown fields seen (ignored) and the accepted events' key hashes."""

    events: EventBatch
    rejected: dict[str, int] = field(default_factory=dict)
    ignored_fields: list[str] = field(default_factory=list)
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    def answer(self) -> dict:
        out = {"accepted": int(len(self.events)), "rejected": dict(self.rejected)}
        if self.ignored_fields:
            out["ignored_fields"] = list(self.ignored_fields)
        return out


def bundle_cleaning(manifest: dict) -> CleaningOptions:
    """The cleaning options of the bundle's training run (``data.cleaning``), without the k-core
    filter (a rule about the whole log, not about one event)."""
    node = ((manifest.get("config") or {}).get("data") or {}).get("cleaning")
    if not isinstance(node, Mapping):
        log.warning("the bundle records no data.cleaning settings: real-time events are cleaned with the defaults")
        node = {}
    known = {f.name for f in dataclasses.fields(CleaningOptions)}
    options = {k: v for k, v in node.items() if k in known}
    options.update(kcore_users=0, kcore_items=0)
    return CleaningOptions(**options)


class EventIntake:
    """Cleans batches of events for one bundle.

    cleaning: the bundle's :func:`bundle_cleaning`; item_rows: item id -> row of the bundle;
    pseudonymizer: the bundle's key when its user ids are pseudonyms; erased: :class:`ErasedUsers`;
    withheld: user ids as the bundle holds them whose events are refused as ``erased_user`` too (the
    server's users being erased, read at every batch: the caller may add to it).

    Duplicates are found by the event key alone (:meth:`_event_key`), in a batch and against the
    keys journaled before, never by comparing contents: two events with different ``event_id``
    are two events, and a live batch and the replay of its journal rows keep exactly the same events.
    """

    def __init__(self, cleaning: CleaningOptions, item_rows: Mapping[str, int], pseudonymizer: Pseudonymizer | None,
                 erased: ErasedUsers, withheld: set[str] | None = None):
        self.cleaning, self.item_rows, self.pseudonymizer, self.erased = cleaning, item_rows, pseudonymizer, erased
        self.withheld = withheld if withheld is not None else set()
        # the log's cleaning without its content comparison: the key decides (see the class docstring)
        self._rules = dataclasses.replace(cleaning, dedupe=False)
        self._tag = f"{TAG_PREFIX}{pseudonymizer.fingerprint}:" if pseudonymizer is not None else None

    def journal_user(self, key: str) -> str:
        """How the journal writes a user id the bundle holds as ``key``: pseudonyms tagged with the key."""
        return key if self._tag is None else self._tag + key

    def _user_keys(self, users: pd.Series) -> pd.Series:
        """Normalised ids -> the bundle's form (pseudonyms for pseudonymised bundles; an id already
        tagged with the bundle's key is taken as that pseudonym). Missing ids stay as they are."""
        if self.pseudonymizer is None:
            return users

        return pseudonymize_ids(users, self.pseudonymizer)

    def prepare(self, events: Sequence[object], received_at: int, seen: KeySet | None = None) -> Intake:
        """Clean a request's ``events`` (dicts), ordered by time as a training log is.

        received_at: epoch seconds given to events without a timestamp. seen: the keys journaled so
        far (an event whose key is there is a ``duplicate``).
        """
        rejected: dict[str, int] = {}
        ignored: set[str] = set()
        rows: list[int] = []
        columns: dict[str, list] = {f: [] for f in FIELDS}
        for i, ev in enumerate(events):
            if not isinstance(ev, Mapping) or not self._fill(ev, columns, ignored):
                rejected["malformed_row"] = rejected.get("malformed_row", 0) + 1
                continue
            rows.append(i)
        times = [received_at if t is None else t for t in columns[TIME]]
        intake = self._clean_few(columns, times, seen) if len(rows) <= FEW_EVENTS else None
        if intake is None:
            intake = self._clean_frame(columns, times, seen)
        for reason, n in rejected.items():
            intake.rejected[reason] = intake.rejected.get(reason, 0) + n
        intake.rejected = {r: intake.rejected[r] for r in REJECT_REASONS if intake.rejected.get(r)}
        intake.ignored_fields = sorted(ignored)
        return intake

    def _clean_few(self, columns: dict[str, list], times: list, seen: KeySet | None) -> Intake | None:
        """:meth:`_clean` of a few events in plain Python (:func:`~dmp_dl.data.cleaning.clean_few_events`);
        None when they need the full cleaning (text times or values, pseudonymised ids)."""
        if self.pseudonymizer is not None:
            return None
        erased: set[str] = set()
        if (len(self.erased) or self.withheld) and columns[USER]:
            raw = sorted({plain_id(u) for u in columns[USER]})
            erased = self.erased.among(raw, raw) if len(self.erased) else set()
            erased |= self.withheld.intersection(raw)
        cleaned = clean_few_events(columns[USER], columns[ITEM], times, columns[TYPE], columns[VALUE], columns[EVENT_ID],
                                   self._rules, exclude_users=erased)
        if cleaned is None:
            return None
        cols, rejected = cleaned
        return self._finish({_ROW if c == "_row" else c: v for c, v in cols.items()},
                            np.asarray(columns[EVENT_ID], dtype=object),
                            np.fromiter((t is not None for t in columns[TIME]), dtype=bool, count=len(columns[TIME])),
                            rejected, seen)

    def _clean_frame(self, columns: dict[str, list], times: list, seen: KeySet | None) -> Intake:
        n = len(columns[USER])
        frame = pd.DataFrame({USER: pd.Series(columns[USER], dtype=object), ITEM: pd.Series(columns[ITEM], dtype=object),
                              TIME: pd.Series(times, dtype=object if any(isinstance(t, str) for t in times) else None),
                              TYPE: pd.Series(columns[TYPE], dtype=object), VALUE: pd.Series(columns[VALUE], dtype=object),
                              EVENT_ID: pd.Series(columns[EVENT_ID], dtype=object), _ROW: np.arange(n, dtype=np.int64)})
        timed = np.fromiter((t is not None for t in columns[TIME]), dtype=bool, count=n)
        return self._clean(frame, timed, seen, journal_order=False)

    def clean(self, frame: pd.DataFrame, seen: KeySet | None = None, journal_order: bool = False) -> Intake:
        """Clean a frame of raw events (columns of :data:`FIELDS`, e.g. journal rows being replayed).

        seen: the keys journaled so far (a replay passes the keys of the rows replayed before).
        journal_order: keep the frame's row order (a journal's) instead of ordering by time.
        """
        frame = frame.copy()
        frame[_ROW] = np.arange(len(frame), dtype=np.int64)
        for name in FIELDS:
            if name not in frame.columns:
                frame[name] = pd.Series([None] * len(frame), dtype=object)
        timed = frame[TIME].notna().to_numpy()
        return self._clean(frame[list(FIELDS) + [_ROW]], timed, seen, journal_order)

    def _clean(self, frame: pd.DataFrame, timed: np.ndarray, seen: KeySet | None, journal_order: bool) -> Intake:
        rejected: dict[str, int] = {}
        raw = normalize_ids(frame[USER])
        if self.pseudonymizer is not None:
            frame[USER] = self._user_keys(raw)
        erased = set()
        if (len(self.erased) or self.withheld) and len(frame):
            pairs = pd.DataFrame({"raw": raw.to_numpy(dtype=object), "key": frame[USER].to_numpy(dtype=object)}).drop_duplicates()
            if len(self.erased):
                given = pairs["raw"].where(~pairs["raw"].str.startswith(TAG_PREFIX), None) if self._tag else pairs["raw"]
                erased = self.erased.among(given.tolist(), pairs["key"].tolist())
            erased |= self.withheld.intersection(pairs["key"].tolist())
        clean, report = clean_events(frame, self._rules, exclude_users=erased, carry=(_ROW,),
                                     constant_time_is_no_time=False)
        for reason, n in report.dropped.items():
            rejected[reason] = rejected.get(reason, 0) + int(n)
        if journal_order:
            clean = clean.sort_values(_ROW, kind="stable").reset_index(drop=True)
        cols = {c: clean[c].to_numpy() for c in (USER, ITEM, TIME, TYPE, VALUE, WEIGHT, _ROW)}
        return self._finish(cols, frame[EVENT_ID].to_numpy(dtype=object), timed, rejected, seen)

    def _finish(self, cols: dict[str, np.ndarray], given_ids: np.ndarray, timed: np.ndarray,
                rejected: dict[str, int], seen: KeySet | None) -> Intake:
        """Clean events (columns, ``_ROW`` their position in the input, whose ``event_id`` is
        ``given_ids[_ROW]`` and whose timestamp was given when ``timed[_ROW]``) -> an :class:`Intake`:
        unknown items, keys repeated in the batch and keys journaled before refused."""
        item = np.fromiter((self.item_rows.get(x, -1) for x in cols[ITEM].tolist()), dtype=np.int64, count=len(cols[ITEM]))
        unknown = item < 0
        if unknown.any():
            rejected["unknown_item"] = int(unknown.sum())
            cols = {c: v[~unknown] for c, v in cols.items()}
            item = item[~unknown]
        given = given_ids[cols[_ROW]]  # _ROW is the input's position
        keys = [self._event_key(g, u, it, t if when else None, ty, v) for g, u, it, t, when, ty, v in zip(
            given.tolist(), cols[USER].tolist(), cols[ITEM].tolist(), cols[TIME].tolist(), timed[cols[_ROW]].tolist(),
            cols[TYPE].tolist(), cols[VALUE].tolist())]
        hashes = _event_hashes(keys)
        keys = np.asarray(keys, dtype=object)
        if len(hashes):
            dup = np.ones(len(hashes), dtype=bool)
            dup[np.unique(hashes, return_index=True)[1]] = False  # a key again in the same batch
            if seen is not None:
                dup |= seen.contains(hashes)
            if dup.any():
                rejected["duplicate"] = rejected.get("duplicate", 0) + int(dup.sum())
                cols = {c: v[~dup] for c, v in cols.items()}
                item, hashes, keys = item[~dup], hashes[~dup], keys[~dup]
        batch = EventBatch(cols[USER].astype(object), item, cols[ITEM].astype(object), cols[TIME].astype(np.int64),
                           cols[TYPE].astype(object), cols[VALUE].astype(np.float64), cols[WEIGHT].astype(np.float64), keys)
        return Intake(batch, {r: rejected[r] for r in REJECT_REASONS if rejected.get(r)}, [], hashes)

    @staticmethod
    def _fill(ev: Mapping, columns: dict[str, list], ignored: set[str]) -> bool:
        """Append one event's fields to ``columns``; False (nothing appended) when it is malformed."""
        values = {}
        for name, value in ev.items():
            if name not in FIELDS:
                ignored.add(str(name)[:MAX_FIELD_CHARS])
                continue
            if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
                return False
            if isinstance(value, str) and (len(value) > MAX_FIELD_CHARS or not value.isprintable()):
                return False  # control characters (a newline) in an id: no log could hold it either
            if isinstance(value, int) and abs(value) >= 2**63:
                return False
            values[name] = value
        for name in FIELDS:
            columns[name].append(values.get(name))
        return True

    def _event_key(self, given, user: str, item: str, t: int | None, event_type: str, value: float) -> str:
        """The event's key, by which duplicates are found: the client's ``event_id`` when given;
        else a hash of what the client sent (user, item, event type, value, and the timestamp only
        when the client gave one, ``t`` None otherwise: the receive time is not part of it, so a
        resent event is recognised); or a fresh random key when cleaning keeps exact repeats
        (``dedupe: false``)."""
        text = plain_id(given)
        if text.lower() not in MISSING_TOKENS:
            return text
        if not self.cleaning.dedupe:
            return "r" + secrets.token_hex(8)
        when = "" if t is None else str(t)
        digest = hashlib.blake2b(f"{user}\x1f{item}\x1f{when}\x1f{event_type}\x1f{value!r}".encode("utf-8"), digest_size=8)
        return "h" + digest.hexdigest()
