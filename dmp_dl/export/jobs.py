"""The activation exports, as streams of pyarrow tables over a loaded bundle.

Each task maps a :class:`~dmp_dl.serving.recommender.Recommender` and the user rows to export to a schema
and an iterator of chunks (``(users done, table)``); :func:`write_export` writes them with a
:class:`~dmp_dl.export.tables.TableWriter`. Everything goes through the Recommender's batch
methods (``recommend_rows``, ``propensity_rows``, ``lookalike_rows``, the stored segments), so the
files hold exactly what the API serves.

``user_id`` is the bundle's id: for a bundle with pseudonymised ids (``privacy.pseudonymize``)
that is the keyed pseudonym, never the raw id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from dmp_dl.audience.jobs import lookalike_job, user_rows_or_skip
from dmp_dl.audience.segments import segment_label
from dmp_dl.core.errors import ConfigError
from dmp_dl.export.tables import TableWriter

# column -> meaning, per task: the summary file and the README carry these
COLUMNS = {
    "recommendations": {
        "user_id": "the bundle's user id (the pseudonym when the bundle's ids are pseudonymised)",
        "rank": "1 = best; 1..k for every user",
        "item_id": "a recommended item the user has not interacted with (unless exclude_seen=false)",
        "score": "the model's score for the pair (higher = better; comparable within one bundle only)",
    },
    "scores": {
        "user_id": "the bundle's user id (the pseudonym when pseudonymised)",
        "probability": "calibrated probability of the propensity target event within the horizon",
        "rank": "1 = most likely among the users exported",
        "decile": "1 = the top 10 % of the users exported by probability, 10 = the bottom 10 %",
    },
    "segments": {
        "user_id": "the bundle's user id (the pseudonym when pseudonymised)",
        "segment": "segment number (0..K-1)",
        "label": "the segment's label: top interest categories and the most over-represented attribute",
        "distance": "squared distance of the user's vector to the segment's centre (lower = more typical)",
    },
    "lookalike": {
        "user_id": "a user most like the seeds (never a seed); the pseudonym when pseudonymised",
        "rank": "1 = most similar",
        "score": "similarity to the seed set (method-dependent scale)",
        "segment": "the user's segment (when the bundle has segments)",
    },
}
# What the bundle knows of a user besides the task's own columns, appended when the bundle has the part.
USER_DETAILS = {
    "segment": "the user's segment number (when the bundle has segments)",
    "segment_label": "the label of the user's segment (when the bundle has segments)",
    "top_interest": "the user's strongest interest category (when the bundle has interest profiles; empty for a "
                    "user without one)",
    "probability": "calibrated propensity of the user (when the bundle has a propensity model)",
}
DETAILS_OF = {"scores": ("segment", "segment_label", "top_interest"), "segments": ("top_interest", "probability"),
              "lookalike": ("segment_label", "top_interest", "probability")}


@dataclass
class Export:
    """A task ready to write: its ``schema``, the number of ``users`` it covers, its ``chunks``
    (an iterator of (users done in this chunk, table)) and ``stats`` the chunks fill in as they go."""

    task: str
    schema: pa.Schema
    users: int
    chunks: Iterator[tuple[int, pa.Table]]
    stats: dict = field(default_factory=dict)


def _strings(ids: np.ndarray) -> pa.Array:
    """Ids as an Arrow string array: ``take`` then maps vocabulary rows to ids in C++."""
    return pa.array(np.asarray(ids, dtype=object).tolist(), type=pa.string())


def id_order(ids: np.ndarray) -> np.ndarray:
    """The rows of ``ids`` (n,) in the natural order of the ids: by value when every id is a number
    ("2" before "10"), else as given (a bundle's vocabulary: text order). (n,) int64; ties (ids of
    one value, "7" and "007") keep their given order."""
    rows = np.arange(len(ids), dtype=np.int64)
    values = pd.to_numeric(pd.Series(np.asarray(ids, dtype=object)), errors="coerce")
    if not len(ids) or values.isna().any() or values.dtype == object:  # object: beyond 64-bit and float
        return rows
    return np.lexsort((rows, values.to_numpy()))


DETAIL_TYPES = {"segment": pa.int32(), "segment_label": pa.string(), "top_interest": pa.string(), "probability": pa.float64()}


def detail_names(rec, task: str) -> list[str]:
    """The :data:`USER_DETAILS` columns of ``task`` that the bundle ``rec`` can fill."""
    has = {"segment": rec.stored_segments is not None, "segment_label": rec.stored_segments is not None,
           "top_interest": rec.profiles is not None, "probability": rec.has_propensity}
    return [name for name in DETAILS_OF.get(task, ()) if has[name]]


def user_details(rec, rows: np.ndarray, names: Sequence[str], labels: pa.Array | None = None) -> dict[str, pa.Array]:
    """The :data:`USER_DETAILS` columns among ``names`` that the bundle has, for the users at
    ``rows`` (n,): name -> (n,) Arrow array. ``labels``: the segments' labels, by segment number."""
    out: dict[str, pa.Array] = {}
    seg = rec.stored_segments
    profiles = rec.profiles
    if seg is not None and "segment" in names:
        out["segment"] = pa.array(np.asarray(seg.assignments, dtype=np.int32)[rows])
    if seg is not None and "segment_label" in names:
        labels = labels if labels is not None else pa.array([d["label"] for d in segment_descriptions(rec)], pa.string())
        out["segment_label"] = labels.take(pa.array(np.asarray(seg.assignments, dtype=np.int64)[rows]))
    if profiles is not None and "top_interest" in names:
        top = np.asarray(profiles.top_categories[rows, 0] if profiles.top_categories.shape[1] else np.full(len(rows), -1),
                         dtype=np.int64)
        categories = pa.array(list(map(str, profiles.categories)), pa.string())
        out["top_interest"] = categories.take(pa.array(top, mask=top < 0))  # null: no interest
    if rec.has_propensity and "probability" in names:
        out["probability"] = pa.array(rec.propensity_rows(rows), pa.float64())
    return out


def select_users(rec, user_ids: Sequence[str] | None, source: str = "users", skip_unknown: bool = False) -> tuple[np.ndarray, dict]:
    """Vocabulary rows of the users to export: all (``user_ids`` None) in the natural order of
    their ids (:func:`id_order`), else the given ids in their order, each once. Unknown ids stop
    the export (naming up to five) unless ``skip_unknown``; returns the rows and counts (``given``,
    ``duplicates``, ``unknown_skipped``)."""
    if user_ids is None:
        return id_order(rec.user_vocab.ids), {"given": "all"}
    ids = list(user_ids)
    rows, n_unknown = user_rows_or_skip(rec, ids, source, skip_unknown)
    known = rows[rows >= 0]
    _, first_at = np.unique(known, return_index=True)
    unique = known[np.sort(first_at)]  # each user once, in the order given
    return unique, {"given": len(ids), "duplicates": int(len(known) - len(unique)), "unknown_skipped": n_unknown}


def _recommend_grouped(rec, batch: np.ndarray, k: int, activity: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``rec.recommend_rows(batch, k)`` with the batch's users grouped by how many items they have
    seen: a search over-fetches by the largest seen count of its batch, so the few heavy users
    (a long tail: hundreds of items) are searched apart from the rest instead of making every
    user's search that deep (2-3x less work on a skewed log)."""
    if activity is None:
        return rec.recommend_rows(batch, k, False)
    counts = activity[batch]
    cuts = np.unique(np.quantile(counts, (0.9, 0.99), method="higher")) if len(batch) >= 100 else np.zeros(0)
    group = np.searchsorted(cuts, counts, side="left")  # 0: <= the 90th percentile, 1: <= the 99th, 2: above
    if len(np.unique(group)) < 2:
        return rec.recommend_rows(batch, k, True)
    ids = np.empty((len(batch), k), np.int64)
    scores = np.empty((len(batch), k), np.float32)
    for g in np.unique(group):
        at = np.flatnonzero(group == g)
        ids[at], scores[at] = rec.recommend_rows(batch[at], k, True)
    return ids, scores


def recommendations(rec, rows: np.ndarray, k: int, exclude_seen: bool = True, chunk: int = 8192) -> Export:
    """Top ``k`` items of each user at ``rows``: ``user_id, rank, item_id, score``, users in the order
    of ``rows``, ranks 1..k within a user. A user with fewer than ``k`` items left to recommend
    (``exclude_seen`` and a catalogue nearly all seen) gets fewer rows, counted in
    ``stats["users_short"]``."""
    n_items = rec.n_items
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_items:
        raise ConfigError(f"k must be a whole number in 1..{n_items} (the bundle's items), got {k!r}")
    k = int(k)
    schema = pa.schema([("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()), ("score", pa.float32())])
    users, items = _strings(rec.user_vocab.ids), _strings(rec.item_vocab.ids)
    stats = {"k": k, "users_short": 0, "exclude_seen": bool(exclude_seen)}
    ranks = np.arange(1, k + 1, dtype=np.int32)
    activity = rec.user_activity() if exclude_seen else None

    def chunks() -> Iterator[tuple[int, pa.Table]]:
        for s in range(0, len(rows), chunk):
            batch = rows[s : s + chunk]
            ids, scores = _recommend_grouped(rec, batch, k, activity)  # (B, k), padded with -1 at the end
            keep = ids >= 0
            stats["users_short"] += int((~keep[:, -1]).sum())
            flat = keep.ravel()
            yield len(batch), pa.table({
                "user_id": users.take(pa.array(np.repeat(batch, k)[flat])),
                "rank": pa.array(np.tile(ranks, len(batch))[flat]),
                "item_id": items.take(pa.array(ids.ravel()[flat])),
                "score": pa.array(scores.ravel()[flat].astype(np.float32)),
            })

    return Export("recommendations", schema, len(rows), chunks(), stats)


def scores(rec, rows: np.ndarray, chunk: int = 262144) -> Export:
    """Propensity of each user at ``rows``: ``user_id, probability, rank, decile`` (rank and decile
    among the users exported; ties share neither: the lower row ranks first)."""
    p = np.concatenate([rec.propensity_rows(rows[s : s + chunk]) for s in range(0, len(rows), chunk)]) if len(rows) \
        else np.zeros(0)
    order = np.lexsort((np.arange(len(p)), -p))
    rank = np.empty(len(p), dtype=np.int64)
    rank[order] = np.arange(1, len(p) + 1)
    decile = np.minimum(10, (rank - 1) * 10 // max(len(p), 1) + 1).astype(np.int8)
    details = detail_names(rec, "scores")
    schema = pa.schema([("user_id", pa.string()), ("probability", pa.float64()), ("rank", pa.int64()), ("decile", pa.int8()),
                        *((name, DETAIL_TYPES[name]) for name in details)])
    users = _strings(rec.user_vocab.ids)
    labels = _segment_labels(rec) if "segment_label" in details else None
    stats = {"probability_mean": float(p.mean()) if len(p) else None}

    def chunks() -> Iterator[tuple[int, pa.Table]]:
        for s in range(0, len(rows), chunk):
            sl = slice(s, s + chunk)
            yield len(rows[sl]), pa.table({"user_id": users.take(pa.array(rows[sl])), "probability": pa.array(p[sl]),
                                           "rank": pa.array(rank[sl]), "decile": pa.array(decile[sl]),
                                           **user_details(rec, rows[sl], details, labels)})

    return Export("scores", schema, len(rows), chunks(), stats)


def segment_descriptions(rec) -> list[dict]:
    """The bundle's segments with their ``label`` (raises MissingPartError without segments)."""
    descriptions = rec.segments(representatives=0)
    for d in descriptions:
        d["label"] = segment_label(d)
    return descriptions


def _segment_labels(rec) -> pa.Array:
    """(K,) the segments' labels, by segment number."""
    return pa.array([d["label"] for d in segment_descriptions(rec)], type=pa.string())


def segments(rec, rows: np.ndarray, chunk: int = 262144) -> Export:
    """Segment membership of each user at ``rows``: ``user_id, segment, label, distance`` (+
    ``top_interest``, ``probability`` when the bundle has them)."""
    descriptions = segment_descriptions(rec)
    stored = rec.stored_segments
    labels = pa.array([d["label"] for d in descriptions], type=pa.string())
    details = detail_names(rec, "segments")
    schema = pa.schema([("user_id", pa.string()), ("segment", pa.int32()), ("label", pa.string()), ("distance", pa.float32()),
                        *((name, DETAIL_TYPES[name]) for name in details)])
    users = _strings(rec.user_vocab.ids)
    seg = np.asarray(stored.assignments, dtype=np.int32)
    dist = np.asarray(stored.distances, dtype=np.float32)
    stats = {"k": len(descriptions), "segments": [{key: d.get(key) for key in ("segment", "size", "label")} for d in descriptions]}

    def chunks() -> Iterator[tuple[int, pa.Table]]:
        for s in range(0, len(rows), chunk):
            r = rows[s : s + chunk]
            yield len(r), pa.table({"user_id": users.take(pa.array(r)), "segment": pa.array(seg[r]),
                                    "label": labels.take(pa.array(seg[r])), "distance": pa.array(dist[r]),
                                    **user_details(rec, r, details, labels)})

    return Export("segments", schema, len(rows), chunks(), stats)


def lookalike(rec, seed_ids: Sequence[str], size: int, method: str = "contrast", source: str = "seeds",
              skip_unknown: bool = False) -> Export:
    """The ``size`` users most like the seeds, as ``python -m dmp_dl.audience task=lookalike``:
    ``user_id, rank, score`` (+ ``segment``, ``segment_label``, ``top_interest``, ``probability``
    when the bundle has them), best first."""
    table, summary = lookalike_job(rec, seed_ids, size, method, source, skip_unknown)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.cast(pa.schema([(f.name, pa.string() if f.name == "user_id" else f.type) for f in arrow.schema]))
    found = rec.user_vocab.index_of(table["user_id"].tolist())
    for name, column in user_details(rec, np.asarray(found, dtype=np.int64), detail_names(rec, "lookalike")).items():
        arrow = arrow.append_column(pa.field(name, DETAIL_TYPES[name]), column)
    stats = {k: v for k, v in summary.items() if k != "task"}
    return Export("lookalike", arrow.schema, len(table), iter([(len(table), arrow)]), stats)


def write_export(export: Export, path, fmt: str, progress: bool | None = None,
                 on_chunk: Callable[[int], None] | None = None, mode: int | None = None) -> dict:
    """Write ``export`` to ``path`` atomically; returns the summary (rows, seconds, rows/s, columns).

    progress: a bar on stderr (True), none (False), or only when stderr is a terminal (None).
    mode: the file's permission bits; None: those of the file it replaces, or the umask's.
    """
    from tqdm.auto import tqdm


    t0 = time.perf_counter()
    with TableWriter(path, fmt, export.schema, mode) as writer, \
            tqdm(total=export.users, unit="users", desc=export.task, disable=None if progress is None else not progress,
                 dynamic_ncols=True, mininterval=1.0) as bar:
        for done, table in export.chunks:
            writer.write(table)
            bar.update(done)
            if on_chunk is not None:
                on_chunk(done)
    seconds = time.perf_counter() - t0
    return {"task": export.task, "file": str(path), "format": fmt, "users": int(export.users), "rows": int(writer.rows),
            **export.stats, "seconds": round(seconds, 3),
            "rows_per_second": round(writer.rows / seconds) if seconds > 0 else None,
            "columns": {name: COLUMNS[export.task].get(name) or USER_DETAILS.get(name, "") for name in export.schema.names}}
