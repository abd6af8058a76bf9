"""What the propensity model knows about a user as of a moment ``as_of``.

Only events with ``timestamp <= as_of`` are read. Three groups of features:

* behaviour: aggregates of the user's events, overall and per event type (counts, recency, tenure,
  active days, distinct items, value sums and means, exponentially time-decayed counts), on a
  log scale; see :meth:`BehaviourSpec.names`.
* attributes: the user table's categorical columns as tokens, numeric columns standardised
  (missing values at the mean, unknown categories ignored), without the label column.
* the inputs of the embedding network's history/attribute user tower (``cold_user_vectors``): the
  user's most recent items before ``as_of`` and the attributes encoded for that network.

The same code computes the features of known users (training, and scoring at the end of the data)
and of new users described by attribute dicts and event dicts (serving).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from dmp_dl.core.arrays import distinct_pairs
from dmp_dl.core.errors import DataError
from dmp_dl.core.row_blocks import BLOCK_ENTRIES, blocks_of_rows
from dmp_dl.data.cleaning import MISSING_TOKENS, parse_timestamps
from dmp_dl.data.datamodule import last_items
from dmp_dl.data.features import FeatureTable
from dmp_dl.data.schema import ITEM, TIME, TYPE, USER, VALUE, normalize_ids
from dmp_dl.data.vocab import IdVocab

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
BLOCK_EVENTS = BLOCK_ENTRIES  # the events of a block of users whose features are computed together


@dataclass
class BehaviourSpec:
    """Which behavioural aggregates are computed.

    event_types: the types with their own features (those of the training data), in order.
    half_lives_days: half-lives of the exponentially time-decayed event counts.
    """

    event_types: list[str]
    half_lives_days: list[float] = field(default_factory=lambda: [7.0, 30.0])

    def names(self) -> list[str]:
        """Feature names, in column order of :func:`behaviour_features`."""
        decays = [f"decayed_{h:g}d" for h in self.half_lives_days]
        overall = ["events", "active_days", "distinct_items", "tenure_days", "recency_days", "value_sum", *decays]
        per_type = ["count", "recency_days", "never", "value_sum", "value_mean", *decays]
        return overall + [f"{t}.{name}" for t in self.event_types for name in per_type]


def event_type_codes(event_types: Sequence[str], types: pd.Series | np.ndarray | Sequence) -> np.ndarray:
    """(n,) int32 index of each of ``types`` (n events' types, compared as text) in ``event_types``,
    -1 for the others; a categorical column (the clean log's) is mapped through its categories,
    not event by event."""
    index = pd.Index([str(t) for t in event_types], dtype=object)
    if isinstance(types, pd.Series) and isinstance(types.dtype, pd.CategoricalDtype):
        by_category = np.append(index.get_indexer(pd.Index(types.cat.categories.map(str), dtype=object)), -1)
        return by_category.astype(np.int32)[types.cat.codes.to_numpy()]  # code -1 (no type) reads the appended -1
    texts = pd.Index([str(t) for t in types], dtype=object)
    return index.get_indexer(texts).astype(np.int32)


def _signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def _last_time(row: np.ndarray, t: np.ndarray, n_rows: int, fill: np.ndarray) -> np.ndarray:
    out = np.full(n_rows, -np.inf)
    np.maximum.at(out, row, t)
    return np.where(np.isfinite(out), out, fill)


def behaviour_features(row: np.ndarray, timestamp: np.ndarray, type_code: np.ndarray, value: np.ndarray,
                       item_code: np.ndarray, n_rows: int, as_of: np.ndarray | float,
                       spec: BehaviourSpec) -> np.ndarray:
    """Behavioural aggregates, one row per user.

    Parameters
    ----------
    row: (n,) int64 output row of each event (the caller has already dropped events after ``as_of``
        or accepts that they count as happening at ``as_of``).
    timestamp: (n,) epoch seconds; type_code: (n,) int64 index into ``spec.event_types`` (-1: none);
    value: (n,) float64; item_code: (n,) int64, equal for equal items.
    as_of: scalar or (n_rows,) epoch seconds, the moment the features describe.

    Returns
    -------
    (n_rows, len(spec.names())) float32: counts, days and value sums as ``log1p`` (value sums
    sign-preserving), value means as is. A type the user never did has recency equal to the
    tenure and ``never = 1``.
    """
    as_of = np.broadcast_to(np.asarray(as_of, dtype=np.float64), (n_rows,))
    t = timestamp.astype(np.float64)
    age_days = np.maximum(as_of[row] - t, 0.0) / SECONDS_PER_DAY
    decay_w = [0.5 ** (age_days / h) for h in spec.half_lives_days]

    def count(mask=None, weights=None):
        r = row if mask is None else row[mask]
        w = None if weights is None else (weights if mask is None else weights[mask])
        return np.bincount(r, weights=w, minlength=n_rows).astype(np.float64)

    def distinct(codes: np.ndarray) -> np.ndarray:
        return np.bincount(distinct_pairs(row, codes)[0], minlength=n_rows).astype(np.float64)

    first = -_last_time(row, -t, n_rows, -as_of)
    day = np.floor(t / SECONDS_PER_DAY).astype(np.int64)
    per_type = []
    for k in range(len(spec.event_types)):
        m = type_code == k
        per_type.append((count(m), _last_time(row[m], t[m], n_rows, first), count(m, value),
                         [count(m, w) for w in decay_w]))
    return behaviour_columns(as_of, count(), distinct(day), distinct(item_code), first,
                             _last_time(row, t, n_rows, as_of), count(weights=value),
                             [count(weights=w) for w in decay_w], per_type)


def behaviour_columns(as_of: np.ndarray, n_events: np.ndarray, days: np.ndarray, distinct_items: np.ndarray,
                      first: np.ndarray, last: np.ndarray, value_sum: np.ndarray, decayed: list[np.ndarray],
                      per_type: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]]) -> np.ndarray:
    """The behaviour features of U users from their aggregates, each (U,) float64: the moment
    described, event count, active days, distinct items, first and last event time, value sum, the
    time-decayed counts (one per half-life), and per event type (count, last time — ``first`` when
    never —, value sum, decayed counts). The one layout for :func:`behaviour_features` (from events)
    and :class:`dmp_dl.realtime.behaviour.BehaviourStats` (from running statistics). Returns (U, F) float32."""
    cols = [
        np.log1p(n_events), np.log1p(days), np.log1p(distinct_items),
        np.log1p(np.maximum(as_of - first, 0.0) / SECONDS_PER_DAY),
        np.log1p(np.maximum(as_of - last, 0.0) / SECONDS_PER_DAY),
        _signed_log1p(value_sum), *[np.log1p(d) for d in decayed],
    ]
    for n_k, last_k, value_k, decayed_k in per_type:
        cols += [
            np.log1p(n_k),
            np.log1p(np.maximum(as_of - last_k, 0.0) / SECONDS_PER_DAY),
            (n_k == 0).astype(np.float64),
            _signed_log1p(value_k),
            np.where(n_k > 0, value_k / np.maximum(n_k, 1.0), 0.0),
            *[np.log1p(d) for d in decayed_k],
        ]
    return np.stack(cols, axis=1).astype(np.float32)


@dataclass
class Snapshot:
    """The model inputs of N users as of one moment.

    behaviour: (N, F) float32, :func:`behaviour_features`.
    attr_tokens: (N, T) int64 attribute tokens (0 = padding); attr_numeric: (N, D) float32.
    history: (N, L) int64 most recent items first, padded with ``n_items`` (L = 0: no network).
    enc_tokens: (N, T') int64, enc_numeric: (N, D') float32: attributes as the embedding network
        encodes them.
    """

    behaviour: np.ndarray
    attr_tokens: np.ndarray
    attr_numeric: np.ndarray
    history: np.ndarray
    enc_tokens: np.ndarray
    enc_numeric: np.ndarray

    def __len__(self) -> int:
        return len(self.behaviour)

    def take(self, rows: np.ndarray) -> "Snapshot":
        return Snapshot(*(getattr(self, f.name)[rows] for f in fields(self)))

    @staticmethod
    def concat(parts: Sequence["Snapshot"]) -> "Snapshot":
        return Snapshot(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Snapshot)))


def _empty_table(n_rows: int) -> FeatureTable:
    return FeatureTable(np.zeros((n_rows + 1, 1), np.int64), np.zeros((n_rows + 1, 0), np.float32), [], [], [], [], [])


def _without_column(table: FeatureTable, column: str) -> FeatureTable:
    """``table`` with the tokens and numeric values of ``column`` blanked (its spec unchanged, so
    token ids still match the network that was trained on it)."""
    tokens = table.tokens.copy()
    label_tokens = [i + 1 for i, tok in enumerate(table.token_vocab) if tok.startswith(f"{column}=")]
    tokens[np.isin(tokens, label_tokens)] = 0
    numeric = table.numeric.copy()
    if column in table.numeric_columns:
        numeric[:, table.numeric_columns.index(column)] = 0.0
    return FeatureTable(tokens, numeric, table.token_vocab, table.categorical_columns, table.numeric_columns,
                        table.numeric_mean, table.numeric_std, table.skipped_columns)


@dataclass
class UserFeatures:
    """Turns events and attributes into :class:`Snapshot` s, for known and for new users.

    behaviour: the aggregates to compute.
    attributes: the propensity model's encoding of the user table (label column excluded).
    encoder_attributes: the embedding network's user table (label column blanked), or None when
        the embedding feature is off.
    history_len: recent items fed to the network (0 when the embedding feature is off).
    n_items: the network's catalogue size (the history padding index).
    label_column: the CRM label column, never a feature.
    default_event_type, value_fill, accepted_types, min_value: how the training data was
        cleaned, applied again to a new user's events.
    """

    behaviour: BehaviourSpec
    attributes: FeatureTable
    encoder_attributes: FeatureTable | None
    history_len: int
    n_items: int
    label_column: str | None = None
    default_event_type: str = "interaction"
    value_fill: float = 0.0
    accepted_types: list[str] | None = None
    min_value: float | None = None

    @classmethod
    def build(cls, dm, behaviour: BehaviourSpec, use_attributes: bool = True, use_embedding: bool = True,
              label_column: str | None = None) -> "UserFeatures":
        """From a prepared :class:`~dmp_dl.data.datamodule.InteractionDataModule`."""
        users = dm.log_.users
        attributes = _empty_table(dm.n_users)
        if use_attributes and users is not None:
            kinds = dict(dm.report.attributes.get("users", {}))
            if label_column:
                users = users.drop(columns=[label_column], errors="ignore")
                kinds.pop(label_column, None)
            attributes = FeatureTable.build(users, USER, dm.user_vocab, kinds)
        encoder_attributes = None
        if use_embedding:
            encoder_attributes = dm.user_features
            if label_column:
                encoder_attributes = _without_column(encoder_attributes, label_column)
        c = dm.cleaning
        accepted = None
        if c.event_weights is not None:
            accepted = sorted(c.event_weights)
        if c.positive_event_types is not None:
            accepted = sorted(set(accepted or c.positive_event_types) & set(c.positive_event_types))
        return cls(behaviour, attributes, encoder_attributes, dm.history_len if use_embedding else 0, dm.n_items,
                   label_column, c.default_event_type, float(c.value_fill), accepted,
                   None if c.min_value is None else float(c.min_value))

    # -- known users --------------------------------------------------------------------------
    def known(self, events: pd.DataFrame, users: np.ndarray, as_of: int) -> Snapshot:
        """Snapshot of vocabulary users ``users`` (n,) from the clean ``events`` at or before ``as_of``.

        ``events``: time-sorted, with ``user_idx``, ``item_idx``, ``timestamp``, ``event_type``, ``value``.
        The users are taken in blocks of about :data:`BLOCK_EVENTS` events (each block's events in
        log order, so in time order): every feature is the user's own, so the blocks give the
        snapshot one pass would, with temporaries the size of a block, not of the log (a pass over
        50M events held about 125 bytes an event).
        """
        users = np.asarray(users, dtype=np.int64)
        n = len(users)
        ts = events[TIME].to_numpy()
        slot = np.full(len(self.attributes.tokens), -1, dtype=np.int64 if n >= 2**31 else np.int32)  # n_users + 1 rows
        slot[users] = np.arange(n)
        row = slot[events["user_idx"].to_numpy()]
        row[~(ts <= as_of)] = -1  # nothing after as_of (nor without a time) is read
        codes = self._type_codes(events[TYPE])
        item, value = events["item_idx"].to_numpy(), events[VALUE].to_numpy()
        parts = []
        for lo, hi, at in blocks_of_rows(row, n, BLOCK_EVENTS):
            block_item = item[at]
            parts.append(self._snapshot(
                row[at].astype(np.int64) - lo, ts[at], codes[at], value[at].astype(np.float64), block_item, block_item,
                hi - lo, float(as_of), self.attributes.tokens[users[lo:hi]], self.attributes.numeric[users[lo:hi]],
                *self._encoder_rows(users[lo:hi]),
            ))
        return parts[0] if len(parts) == 1 else Snapshot.concat(parts)

    def _type_codes(self, types: pd.Series | np.ndarray) -> np.ndarray:
        return event_type_codes(self.behaviour.event_types, types)

    def _encoder_rows(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.encoder_attributes is None:
            return np.zeros((len(users), 1), np.int64), np.zeros((len(users), 0), np.float32)
        return self.encoder_attributes.tokens[users], self.encoder_attributes.numeric[users]

    def _snapshot(self, row, ts, code, value, item_code, history_item, n, as_of, attr_tokens, attr_numeric,
                  enc_tokens, enc_numeric) -> Snapshot:
        """``code``: each event's type as :meth:`_type_codes` gives it; ``item_code`` tells items apart
        for the aggregates; ``history_item`` is the network's item index (``n_items`` for items it
        does not know)."""
        behaviour = behaviour_features(row, ts, code, value, item_code, n, as_of, self.behaviour)
        if self.history_len > 0:
            order = np.argsort(ts, kind="stable")
            history = last_items(row[order], history_item[order], n, self.history_len, pad=self.n_items)
        else:
            history = np.zeros((n, 0), np.int64)
        return Snapshot(behaviour, attr_tokens, attr_numeric, history, enc_tokens, enc_numeric)

    # -- new users ----------------------------------------------------------------------------
    def new(self, attributes: Sequence[Mapping | None], events: Sequence[Sequence[Mapping]], as_of: float,
            item_vocab: IdVocab | None) -> Snapshot:
        """Snapshot of users the model has never seen.

        attributes: one dict of user-table columns per user (None or {} when unknown).
        events: one list per user of dicts with ``item_id``, ``timestamp`` (epoch seconds or
            ISO-8601) and optionally ``event_type`` and ``value``.
        as_of: the moment scored (epoch seconds); events later than it count as happening at it.
        item_vocab: the network's item vocabulary (items it does not know are left out of the
            history but still counted in the aggregates).

        Events the training data's cleaning would have dropped (an event type it did not accept,
        a value below ``min_value``) are left out, with a warning. Malformed input raises
        :class:`DataError` naming ``events[user][event]`` and the field.
        """
        n = len(attributes)
        if len(events) != n:
            raise DataError(f"score_new: {n} attribute records but {len(events)} event lists; give one of each per user")
        records = []
        for u, rec in enumerate(attributes):
            if rec is not None and not isinstance(rec, Mapping):
                raise DataError(f"attributes[{u}]: expected a dict of user attributes or None, got {type(rec).__name__}")
            rec = dict(rec or {})
            rec.pop(self.label_column, None)
            records.append(rec)
        frame, positions = self._event_frame(events)
        row = np.asarray([u for u, _ in positions], dtype=np.int64)
        ts, types, value = self._parse_events(frame, positions)
        keep = np.ones(len(frame), dtype=bool)
        if self.accepted_types is not None:
            unknown = ~np.isin(types, self.accepted_types)
            if unknown.any():
                log.warning("score_new: %d events of types the model was not trained on are ignored (%s)",
                            int(unknown.sum()), ", ".join(sorted(set(types[unknown].tolist()))))
            keep &= ~unknown
        if self.min_value is not None:
            low = keep & (value < self.min_value)
            if low.any():
                log.warning("score_new: %d events with value below %g are ignored, as in training", int(low.sum()), self.min_value)
            keep &= ~low
        items = normalize_ids(frame[ITEM]).to_numpy(dtype=object)[keep] if len(frame) else np.zeros(0, dtype=object)
        item_code = pd.factorize(items)[0].astype(np.int64)
        if self.history_len > 0 and item_vocab is not None:
            known_item = item_vocab.index_of(items)
            hist_items = np.where(known_item >= 0, known_item, self.n_items)
        else:
            hist_items = np.full(len(items), self.n_items, dtype=np.int64)
        attr_tokens, attr_numeric = self.attributes.encode_records(records)
        if self.encoder_attributes is not None:
            enc_tokens, enc_numeric = self.encoder_attributes.encode_records(records)
        else:
            enc_tokens, enc_numeric = np.zeros((n, 1), np.int64), np.zeros((n, 0), np.float32)
        return self._snapshot(row[keep], ts[keep], self._type_codes(types[keep]), value[keep], item_code, hist_items, n,
                              float(as_of), attr_tokens, attr_numeric, enc_tokens, enc_numeric)

    @staticmethod
    def _event_frame(events: Sequence[Sequence[Mapping]]) -> tuple[pd.DataFrame, list[tuple[int, int]]]:
        """All events in one frame, with the (user, event) position of each row."""
        positions, flat = [], []
        for u, user_events in enumerate(events):
            if user_events is None:
                continue
            if isinstance(user_events, (str, bytes, Mapping)) or not isinstance(user_events, Sequence):
                raise DataError(f"events[{u}]: expected a list of event dicts, got {type(user_events).__name__}")
            for j, ev in enumerate(user_events):
                if not isinstance(ev, Mapping):
                    raise DataError(f"events[{u}][{j}]: expected a dict with item_id and timestamp, got {type(ev).__name__}")
                for name in (ITEM, TIME):
                    if ev.get(name) is None or str(ev.get(name)).strip() == "":
                        raise DataError(f"events[{u}][{j}]: missing {name} (each event needs item_id and timestamp)")
                positions.append((u, j))
                flat.append(ev)
        frame = pd.DataFrame.from_records(flat, columns=[ITEM, TIME, TYPE, VALUE]) if flat else pd.DataFrame(
            {ITEM: [], TIME: [], TYPE: [], VALUE: []}, dtype=object)
        return frame, positions

    def _parse_events(self, frame: pd.DataFrame, positions: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(timestamps (n,) float64, types (n,) object, values (n,) float64), as cleaning parses them."""
        def refuse(mask: np.ndarray, field_name: str, what: str) -> None:
            if mask.any():
                i = int(np.flatnonzero(mask)[0])
                u, j = positions[i]
                raise DataError(f"events[{u}][{j}].{field_name}: {frame[field_name].iloc[i]!r} {what}")

        ts = parse_timestamps(frame[TIME].astype(object))
        refuse(~np.isfinite(ts), TIME, "is neither epoch seconds nor an ISO-8601 time")
        types = frame[TYPE].astype(object).where(frame[TYPE].notna(), "").map(str).str.strip().str.lower()
        types = types.where(types != "", self.default_event_type).to_numpy(dtype=object)
        text = frame[VALUE].astype(object).where(frame[VALUE].notna(), "").map(str).str.strip()
        missing = text.str.lower().isin(MISSING_TOKENS).to_numpy()
        value = pd.to_numeric(text.where(~missing), errors="coerce").to_numpy(np.float64, na_value=np.nan)
        refuse(~missing & ~np.isfinite(value), VALUE, "is not a finite number")
        return ts, types, np.where(missing, self.value_fill, value)

    # -- storage ------------------------------------------------------------------------------
    def spec(self) -> dict:
        """JSON-safe description; with :meth:`from_spec` it rebuilds everything new users need."""
        return {
            "behaviour": {"event_types": self.behaviour.event_types, "half_lives_days": self.behaviour.half_lives_days},
            "attributes": self.attributes.spec(),
            "attribute_token_width": int(self.attributes.tokens.shape[1]),
            "encoder_attributes": None if self.encoder_attributes is None else self.encoder_attributes.spec(),
            "encoder_token_width": None if self.encoder_attributes is None else int(self.encoder_attributes.tokens.shape[1]),
            "history_len": self.history_len,
            "n_items": self.n_items,
            "label_column": self.label_column,
            "default_event_type": self.default_event_type,
            "value_fill": self.value_fill,
            "accepted_types": self.accepted_types,
            "min_value": self.min_value,
        }

    @classmethod
    def from_spec(cls, spec: Mapping) -> "UserFeatures":
        """Rebuild from :meth:`spec` (the per-user arrays of known users are not kept: known users
        are scored in advance)."""

        def table(s: Mapping | None, width: int | None) -> FeatureTable | None:
            if s is None:
                return None
            numeric = np.zeros((1, len(s["numeric_columns"])), np.float32)
            return FeatureTable.from_spec(s, np.zeros((1, int(width)), np.int64), numeric)

        b = spec["behaviour"]
        return cls(
            BehaviourSpec([str(t) for t in b["event_types"]], [float(h) for h in b["half_lives_days"]]),
            table(spec["attributes"], spec["attribute_token_width"]),
            table(spec["encoder_attributes"], spec["encoder_token_width"]),
            int(spec["history_len"]), int(spec["n_items"]), spec.get("label_column"),
            str(spec["default_event_type"]), float(spec["value_fill"]), spec.get("accepted_types"),
            spec.get("min_value"),
        )
