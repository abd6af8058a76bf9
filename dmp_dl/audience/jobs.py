"""The marketer's audience jobs on a loaded bundle: lookalike, segments, budgeted targeting.

Each job takes a :class:`~dmp_dl.serving.recommender.Recommender` and plain parameters and returns the
audience as a DataFrame (one row per user, ``user_id`` first) plus a JSON-safe summary; the command
line (``python -m dmp_dl.audience``) reads the parameters from its config and writes both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dmp_dl.audience.lookalike import expand
from dmp_dl.audience.segments import SegmentOptions, describe_segments, segment_label, segment_users
from dmp_dl.audience.targeting import gains_curve, per_user, plan_contacts, random_selection_profit
from dmp_dl.audience.user_columns import attribute_table
from dmp_dl.campaign.control import check_fraction, draw_control
from dmp_dl.campaign.stats import minimum_detectable_lift
from dmp_dl.core.errors import ConfigError, DataError, UnknownIdError
from dmp_dl.core.io import atomic_writer
from dmp_dl.data.id_lists import read_id_file
from dmp_dl.data.schema import normalize_ids

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet")


# -- input ---------------------------------------------------------------------------------------


def read_seed_ids(path: str | Path, column: str = "user_id", what: str = "seeds") -> list[str]:
    """User ids from ``path`` (see :func:`dmp_dl.data.id_lists.read_id_file`): a CSV/TSV/Parquet
    file with a ``column`` column (or a single column), otherwise a text file with one id per line.
    ``what``: the config key that named the file (``seeds``; ``users``), for the messages."""
    return read_id_file(path, what, column, "seed_column" if what == "seeds" else "user_column")


def user_rows_or_skip(rec, ids: Sequence[str], source: str, skip_unknown: bool = False,
                      noun: str = "user") -> tuple[np.ndarray, int]:
    """Vocabulary rows of ``ids`` in their order ((n,) int64, -1 for an unknown id) and how many
    were unknown. Unknown ids raise :class:`UnknownIdError` naming up to five of them and
    ``source`` unless ``skip_unknown`` (then one warning line); a list with no known id at all is
    always an error, and so is an empty list. ``noun`` names the ids in the messages ("user",
    "seed"). The ids are taken as :func:`~dmp_dl.data.schema.normalize_ids` spells them, as the
    training data's were."""
    if not len(ids):
        raise DataError(f"{source}: no {noun} ids given; give at least one")
    ids = normalize_ids(pd.Series(list(ids), dtype=object)).tolist()
    rows = rec.user_rows(ids, strict=False)
    unknown = np.flatnonzero(rows < 0)
    if len(unknown) and not skip_unknown:
        first = [ids[i] for i in unknown[:5]]
        error = UnknownIdError("user", first[0] if len(first) == 1 else first)
        error.args = (f"{source}: {len(unknown)} of {len(ids)} {noun} ids are not in the bundle (first: "
                      f"{', '.join(map(repr, first))}); remove them or set skip_unknown=true",)
        raise error
    if len(unknown) == len(ids):
        raise DataError(f"{source}: none of the {len(ids)} {noun} ids is in the bundle (first: {ids[0]!r}); "
                        "check that the ids are the ones the bundle was trained on")
    if len(unknown):
        log.warning("%s: %d of %d %s ids are not in the bundle and were skipped (first: %s)", source,
                    len(unknown), len(ids), noun, ", ".join(repr(ids[i]) for i in unknown[:5]))
    return rows, int(len(unknown))


def seed_rows(rec, ids: Sequence[str], source: str, skip_unknown: bool = False) -> tuple[np.ndarray, int]:
    """Distinct vocabulary rows of ``ids`` and how many ids were unknown (skipped); unknown ids as
    :func:`user_rows_or_skip` says."""
    rows, n_unknown = user_rows_or_skip(rec, ids, source, skip_unknown, noun="seed")
    return np.unique(rows[rows >= 0]), n_unknown


def _number_or_mapping(value, name: str):
    """A number, or a {segment: number} mapping from the config (keys as ints)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{name} must be a number or a {{segment: number}} mapping, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number or a {{segment: number}} mapping, got {value!r}") from None


def parse_caps(caps, k: int | None) -> dict[int, int] | None:
    """``caps`` ({segment: most contacts}) checked against the bundle's K segments."""
    if caps is None:
        return None
    if not isinstance(caps, Mapping):
        raise ConfigError(f"caps must be a {{segment: most contacts}} mapping, e.g. caps={{0:500,3:200}}, got {caps!r}")
    if k is None:
        raise ConfigError("caps are per segment but the bundle has no segments (train with audience.enabled=true)")
    out = {}
    for key, val in caps.items():
        try:
            seg, cap = int(key), int(val)
        except (TypeError, ValueError):
            raise ConfigError(f"caps: {key!r}: {val!r} is not a segment number and a whole number of contacts") from None
        if not 0 <= seg < k:
            raise ConfigError(f"caps: segment {seg} does not exist (the bundle has segments 0..{k - 1})")
        if cap < 0:
            raise ConfigError(f"caps: segment {seg} has a negative cap {cap}")
        out[seg] = cap
    return out


# -- jobs ----------------------------------------------------------------------------------------


def _segments_of(rec) -> np.ndarray | None:
    return None if rec.stored_segments is None else rec.stored_segments.assignments


def lookalike_job(rec, ids: Sequence[str], size: int, method: str = "contrast", source: str = "seeds",
                  skip_unknown: bool = False) -> tuple[pd.DataFrame, dict]:
    """Expand the seed users ``ids`` to ``size`` users not in the seed list.

    Returns columns ``user_id``, ``rank`` (1 = most similar), ``score`` (and ``segment`` when the
    bundle has segments), and a summary (seeds used, unknown seeds skipped, users found, score range).
    """
    rows, skipped = seed_rows(rec, ids, source, skip_unknown)
    found, scores = expand(rec, rows, size, method)
    table = pd.DataFrame({"user_id": rec.user_vocab.ids[found], "rank": np.arange(1, len(found) + 1), "score": scores})
    segments = _segments_of(rec)
    if segments is not None:
        table["segment"] = segments[found]
    summary = {"task": "lookalike", "method": method, "seeds_given": len(ids), "seeds_used": int(len(rows)),
               "seeds_unknown_skipped": skipped, "requested": int(size), "users": int(len(found)),
               "score_max": float(scores.max()) if len(scores) else None,
               "score_min": float(scores.min()) if len(scores) else None}
    if len(found) < size:
        log.warning("only %d users are left besides the %d seeds: the audience has %d users, not %d",
                    rec.n_users - len(rows), len(rows), len(found), size)
    if segments is not None:
        summary["by_segment"] = {str(s): int(n) for s, n in enumerate(np.bincount(segments[found], minlength=rec.stored_segments.k))}
    return table, summary


def segments_job(rec, k: int | None = None, options: SegmentOptions | None = None,
                 representatives: int = 5, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Every user's segment: the bundle's (``k`` None) or a new k-means with ``k`` segments on the
    bundle's user vectors (``options`` as the bundle was built with, unless given).

    Returns columns ``user_id``, ``segment``, ``distance`` (squared, to the segment's centre) and a
    summary with one description per segment.
    """
    stored = rec.stored_segments
    if k is None:
        if stored is None:
            raise ConfigError("the bundle has no segments (trained with audience.enabled=false); set k=N to build them")
        assignments, distances = stored.assignments, stored.distances
        descriptions = stored.describe(rec.user_vocab.ids, representatives)
        silhouette = stored.meta.get("silhouette", {})
    else:
        if options is None:
            recorded = dict((stored.meta.get("options") if stored is not None else None) or {})
            known = set(SegmentOptions.__dataclass_fields__)
            options = SegmentOptions(**{key: v for key, v in recorded.items() if key in known})
        options.k, options.representatives = int(k), int(representatives)
        options.__post_init__()
        seg = segment_users(rec.user_vectors, options, progress=progress)
        scores = rec.propensity_rows(np.arange(rec.n_users)) if rec.has_propensity else None
        descriptions = describe_segments(seg, rec.user_vocab.ids, rec.profiles, scores, attribute_table(rec), options)
        assignments, distances, silhouette = seg.assignments, seg.distances, {}
    table = pd.DataFrame({"user_id": rec.user_vocab.ids, "segment": np.asarray(assignments, dtype=np.int64),
                          "distance": np.asarray(distances, dtype=np.float64)})
    for d in descriptions:
        d["label"] = segment_label(d)
    summary = {"task": "segments", "source": "bundle" if k is None else f"k-means, k={k}", "users": int(len(table)),
               "k": len(descriptions), "silhouette": silhouette, "segments": descriptions}
    return table, summary


SCORES = ("propensity", "uplift")


def _ranking_scores(rec, score: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(what to rank by (n_users,), the propensity (n_users,) or None) for ``score``."""
    every = np.arange(rec.n_users)
    propensity = rec.propensity_rows(every) if rec.has_propensity or score == "propensity" else None
    if score == "propensity":
        return propensity, propensity
    return rec.uplift_rows(every), propensity


def target_job(rec, budget: float, cost, value, caps=None, solver: str = "auto", time_limit: float = 60.0,
               gains_points: int = 20, random_draws: int = 20, seed: int = 0, score: str = "propensity",
               control_frac: float = 0.0, control_seed: int | None = None) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """Whom to contact to maximise expected profit Σ p·value − cost within ``budget``.

    cost, value: per contact / per conversion, a number or {segment: number}; caps: {segment: most
    contacts}. score: ``propensity`` (p is the conversion probability) or ``uplift`` (p is the
    bundle's uplift model's predicted change in it: the profit is the incremental one).
    control_frac: share of the selected users held out as a control group, stratified by segment
    and decile of the propensity (:mod:`dmp_dl.campaign.control`), drawn with ``control_seed``
    (None: a fresh seed, recorded in the summary).

    Returns the chosen users (``user_id``, ``rank``, ``probability`` (score=uplift: ``uplift``
    first), ``value``, ``cost``, ``expected_profit``, ``segment`` when the bundle has segments,
    and with a control group ``group`` (treatment / control) and ``decile``; best first), a
    summary (expected conversions, cost, profit, the solver's bound, random contact order's profit
    for the same budget; the control group's sizes, seed, strata and balance) and the cumulative
    gains curve over all users.
    """
    if score not in SCORES:
        raise ConfigError(f"score must be one of {SCORES}, got {score!r}")
    control_frac = check_fraction(control_frac)
    if budget is None:
        raise ConfigError("budget is required: the most to spend on contacts, e.g. budget=5000")
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise ConfigError(f"budget must be a number, got {budget!r}") from None
    if not np.isfinite(budget) or budget < 0:
        raise ConfigError(f"budget must be a finite number >= 0, got {budget}")
    segments = _segments_of(rec)
    n = rec.n_users
    k = rec.stored_segments.k if segments is not None else None
    c = per_user(_number_or_mapping(cost, "cost"), segments, n, "cost")
    v = per_user(_number_or_mapping(value, "value"), segments, n, "value")
    caps = parse_caps(caps, k)
    p, propensity = _ranking_scores(rec, score)
    signed = score == "uplift"
    plan = plan_contacts(p, v, c, budget, groups=segments, caps=caps, solver=solver, time_limit=time_limit, signed=signed)
    chosen = plan.selected
    columns = {"user_id": rec.user_vocab.ids[chosen], "rank": np.arange(1, len(chosen) + 1)}
    if signed:
        columns["uplift"] = p[chosen]
    if propensity is not None:
        columns["probability"] = propensity[chosen]
    table = pd.DataFrame({**columns, "value": v[chosen], "cost": c[chosen], "expected_profit": p[chosen] * v[chosen] - c[chosen]})
    if segments is not None:
        table["segment"] = segments[chosen]
    summary = {"task": "target", "score": score, **plan.summary(),
               "users": n, "users_with_positive_expected_profit": int((p * v - c > 0).sum()),
               "random_order_expected_profit": random_selection_profit(p, v, c, budget, segments, caps, random_draws, seed,
                                                                       signed=signed)}
    if signed:  # the plan's conversions are the incremental ones
        summary["expected_incremental_conversions"] = summary.pop("expected_conversions")
        summary["expected_incremental_revenue"] = summary.pop("expected_revenue")
    if segments is not None:
        summary["contacts_by_segment"] = {str(s): int(m) for s, m in enumerate(np.bincount(segments[chosen], minlength=k))}
    if control_frac > 0:
        strata_scores = (propensity if propensity is not None else p)[chosen]
        hold = draw_control(chosen, strata_scores, control_frac, control_seed,
                            None if segments is None else segments[chosen])
        table["group"] = hold.groups
        table["decile"] = hold.decile
        summary["control"] = _control_summary(hold, strata_scores, "probability" if propensity is not None else score,
                                              table, budget, propensity is not None)
    return table, summary, gains_curve(p, v, c, gains_points)


def _control_summary(hold, strata_scores: np.ndarray, decile_of: str, table: pd.DataFrame, budget: float,
                     has_propensity: bool) -> dict:
    """The holdout's summary plus what the treatment group (the users actually contacted) costs and
    is expected to bring, and the smallest lift the campaign can show (80 % power, 95 %)."""
    out = hold.summary(strata_scores)
    out["decile_of"] = decile_of
    treated = ~hold.control
    out["treatment_cost"] = float(table["cost"].to_numpy()[treated].sum())
    out["budget_unspent"] = float(budget - out["treatment_cost"])
    out["treatment_expected_profit"] = float(table["expected_profit"].to_numpy()[treated].sum())
    if has_propensity:
        base = float(table["probability"].to_numpy()[hold.control].mean()) if hold.control.any() else None
        mde = None if base is None else float(minimum_detectable_lift(base, out["treatment"], out["control"]))
        out["expected_control_conversion_rate"] = base
        out["minimum_detectable_lift"] = mde if mde is not None and np.isfinite(mde) else None
        if mde is not None and np.isfinite(mde) and mde > base:
            log.warning("the control group (%d users) is small: only a lift of %.4f or more in the conversion rate "
                        "(expected without contact: %.4f) can be told from chance; raise control_frac or the budget",
                        out["control"], mde, base)
    log.info("control group: %d of %d selected users held out (seed %d, %d strata)", out["control"],
             out["control"] + out["treatment"], out["seed"], out["strata"]["count"])
    return out


# -- output --------------------------------------------------------------------------------------


def write_table(table: pd.DataFrame, path: str | Path, fmt: str = "csv", mode: int | None = None) -> Path:
    """Write ``table`` atomically as CSV or Parquet (permissions: ``mode``, or as
    :func:`dmp_dl.core.io.atomic_writer` says: an existing file's kept, a new one's from the umask)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    with atomic_writer(path, mode) as fh:
        if fmt == "csv":
            table.to_csv(fh, index=False)
        else:
            table.to_parquet(fh, index=False)
    return path
