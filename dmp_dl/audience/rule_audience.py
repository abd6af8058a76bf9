"""Rule audiences and the overlap of audiences, on a loaded bundle.

:func:`rule_job` selects the users a rule (:mod:`dmp_dl.audience.rule`) picks over the bundle's
columns (:mod:`dmp_dl.audience.user_columns`) and returns its size and share, and the members as a
table (one row per user, ``user_id`` first, in the bundle's user order). :func:`overlap_job` takes
two or more audiences (rules, segments, lists of ids) and returns their sizes, the intersection,
union and Jaccard index of every pair, from one product of their membership matrix.

Users a real-time server withholds (being erased) are in no audience.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from dmp_dl.audience.rule import Rule, RuleError, evaluate, parse_rule
from dmp_dl.audience.user_columns import columns_of
from dmp_dl.core.errors import ConfigError, UnknownIdError
from dmp_dl.data.id_lists import read_id_file
from dmp_dl.data.schema import normalize_ids

log = logging.getLogger(__name__)

MAX_AUDIENCES = 20
SPEC_KINDS = ("rule", "segment", "user_ids", "file")


def served(rec) -> np.ndarray:
    """(n_users,) bool: False for users a real-time server withholds (being erased)."""
    keep = np.ones(rec.n_users, dtype=bool)
    withheld = getattr(rec, "_withheld", None) if hasattr(rec, "_service") else None
    if withheld:
        keep &= ~np.isin(rec.user_vocab.ids, np.asarray(sorted(withheld), dtype=object))
    return keep


def rule_members(rec, text: str) -> tuple[Rule, np.ndarray]:
    """The parsed rule and its members, (n_users,) bool over the bundle's users."""
    rule = parse_rule(text)
    return rule, evaluate(rule, columns_of(rec)) & served(rec)


def _by_segment(rec, members: np.ndarray) -> dict[str, int] | None:
    seg = rec.stored_segments
    if seg is None:
        return None
    return {str(s): int(n) for s, n in enumerate(np.bincount(seg.assignments[members], minlength=seg.k))}


def rule_job(rec, text: str) -> tuple[pd.DataFrame, dict]:
    """The users ``text`` selects: a table (``user_id``, ``segment`` when the bundle has segments,
    then each numeric column the rule reads) and a summary (``users``, ``share`` of the bundle's
    users, per segment)."""
    rule, members = rule_members(rec, text)
    rows = np.flatnonzero(members)
    columns = columns_of(rec)
    table = {"user_id": rec.user_vocab.ids[rows]}
    if rec.stored_segments is not None:
        table["segment"] = rec.stored_segments.assignments[rows]
    for name in rule.columns:
        key = columns.resolve(name)
        if key not in table and columns.kind(key) == "numeric":
            table[key] = columns.values(key).numbers[rows]
    summary = {"task": "rule", "rule": text, "columns": [columns.resolve(n) for n in rule.columns],
               "users": int(len(rows)), "share": float(len(rows) / max(rec.n_users, 1)), "bundle_users": int(rec.n_users)}
    by_segment = _by_segment(rec, members)
    if by_segment is not None:
        summary["by_segment"] = by_segment
    return pd.DataFrame(table), summary


# -- overlap -------------------------------------------------------------------------------------


def audience_members(rec, name: str, spec: Mapping) -> tuple[np.ndarray, dict]:
    """(n_users,) bool members of one audience and what it is: ``spec`` is ``{"rule": text}``,
    ``{"segment": number}``, ``{"user_ids": [...]}`` or ``{"file": path}`` (a saved audience: a
    CSV/Parquet with a ``user_id`` column, or one id per line); ids the bundle does not know are
    counted (``unknown_ids``), not matched. A segment the bundle does not have is an
    :class:`UnknownIdError` (kind ``segment``)."""
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
        raise ConfigError(f"audience {name!r}: give one of {', '.join(SPEC_KINDS)}, e.g. {{\"rule\": \"segment == 1\"}}; "
                          f"got {spec!r}")
    kind, value = next(iter(spec.items()))
    about = {"name": name, "kind": kind}
    if kind == "rule":
        try:
            rule, members = rule_members(rec, value)
        except RuleError as exc:
            raise type(exc)(f"audience {name!r}: {exc}") from None
        return members, {**about, "rule": rule.text}
    if kind == "segment":
        seg = rec.stored_segments
        if seg is None:
            raise ConfigError(f"audience {name!r}: this bundle has no segments (train with audience.enabled=true)")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"audience {name!r}: segment must be a whole number, got {value!r}")
        if not 0 <= int(value) < seg.k:
            error = UnknownIdError("segment", int(value))
            error.args = (f"audience {name!r}: segment {value} does not exist (the bundle has segments 0..{seg.k - 1})",)
            raise error
        return (seg.assignments == int(value)) & served(rec), {**about, "segment": int(value)}
    if kind == "file":
        ids, source = read_id_file(str(value), f"audiences.{name}"), str(value)
    else:
        ids, source = value, f"audience {name!r}"
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise ConfigError(f"{source}: user_ids must be a list of ids")
    if not len(ids):
        raise ConfigError(f"{source}: no user ids given; give at least one")
    rows = rec.user_rows(normalize_ids(pd.Series(list(ids), dtype=object)).tolist(), strict=False)
    unknown = int((rows < 0).sum())
    if unknown:
        log.warning("%s: %d of %d user ids are not in the bundle (counted as unknown_ids, in no audience)",
                    source, unknown, len(ids))
    members = np.zeros(rec.n_users, dtype=bool)
    members[rows[rows >= 0]] = True
    return members & served(rec), {**about, "given": len(ids), "unknown_ids": unknown,
                                   **({"file": source} if kind == "file" else {})}


def overlap_of(names: Sequence[str], members: np.ndarray) -> dict:
    """Sizes and pairwise overlaps of audiences: ``members`` (n_users, A) bool, column a = ``names[a]``.

    Returns ``sizes`` {name: users}, ``pairs`` (one per unordered pair: ``a``, ``b``,
    ``intersection``, ``union``, ``jaccard`` = |a ∩ b| / |a ∪ b| (0 for two empty audiences),
    ``share_of_a`` / ``share_of_b`` = |a ∩ b| / |a|, / |b|) and the ``intersection`` matrix.
    """
    m = np.asarray(members, dtype=np.float64)
    inter = np.rint(m.T @ m).astype(np.int64)  # (A, A): exact counts (float64 holds integers up to 2**53)
    sizes = np.diag(inter).copy()
    pairs = []
    for a, b in itertools.combinations(range(len(names)), 2):
        both = int(inter[a, b])
        union = int(sizes[a] + sizes[b] - both)
        pairs.append({"a": names[a], "b": names[b], "size_a": int(sizes[a]), "size_b": int(sizes[b]),
                      "intersection": both, "union": union, "jaccard": both / union if union else 0.0,
                      "share_of_a": both / sizes[a] if sizes[a] else 0.0,
                      "share_of_b": both / sizes[b] if sizes[b] else 0.0})
    return {"sizes": {n: int(s) for n, s in zip(names, sizes)}, "pairs": pairs,
            "intersection": {n: {o: int(inter[i, j]) for j, o in enumerate(names)} for i, n in enumerate(names)}}


def overlap_job(rec, audiences: Mapping[str, Mapping]) -> tuple[pd.DataFrame, dict]:
    """The overlap report of two or more named audiences (each as :func:`audience_members` reads
    it): one row per pair (``a``, ``b``, sizes, ``intersection``, ``union``, ``jaccard``, shares)
    and a summary (the audiences, their sizes and shares, the pairs)."""
    if not isinstance(audiences, Mapping) or not 2 <= len(audiences) <= MAX_AUDIENCES:
        count = len(audiences) if isinstance(audiences, Mapping) else audiences
        raise ConfigError(f"audiences: give 2 to {MAX_AUDIENCES} named audiences, got {count!r}")
    names, columns, described = [], [], []
    for name, spec in audiences.items():
        members, about = audience_members(rec, str(name), spec)
        names.append(str(name))
        columns.append(members)
        described.append({**about, "users": int(members.sum()), "share": float(members.sum() / max(rec.n_users, 1))})
    report = overlap_of(names, np.stack(columns, axis=1))
    summary = {"task": "overlap", "bundle_users": int(rec.n_users), "audiences": described, **report}
    return pd.DataFrame(report["pairs"], columns=["a", "b", "size_a", "size_b", "intersection", "union", "jaccard",
                                                  "share_of_a", "share_of_b"]), summary


def overlap_text(summary: dict) -> str:
    """The overlap report as a plain-text table: each audience's size, then one line per pair."""
    lines = [f"{'audience':<24} {'users':>9} {'share':>7}"]
    for a in summary["audiences"]:
        lines.append(f"{a['name'][:24]:<24} {a['users']:>9d} {a['share']:>7.2%}")
    lines += ["", f"{'a':<20} {'b':<20} {'a ∩ b':>9} {'a ∪ b':>9} {'jaccard':>8} {'of a':>7} {'of b':>7}"]
    for p in summary["pairs"]:
        lines.append(f"{p['a'][:20]:<20} {p['b'][:20]:<20} {p['intersection']:>9d} {p['union']:>9d} "
                     f"{p['jaccard']:>8.4f} {p['share_of_a']:>7.2%} {p['share_of_b']:>7.2%}")
    return "\n".join(lines)
