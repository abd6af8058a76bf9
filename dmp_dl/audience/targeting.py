"""Budgeted targeting: whom to contact to maximise expected profit under a budget.

Contacting user u costs c_u and converts with probability p_u (the propensity model), worth v_u
per conversion, so its expected profit is π_u = p_u · v_u − c_u. The plan chooses x_u ∈ {0, 1} to

    maximise Σ x_u π_u   subject to   Σ x_u c_u ≤ budget,   Σ_{u in segment s} x_u ≤ cap_s,

with cost and value given globally or per segment. Users with π_u ≤ 0 are never worth contacting.

* **Uniform cost** (one c for everybody, with or without caps): the budget is a head count
  n = ⌊budget / c⌋, and the best n users are the n highest π_u — with caps, the highest π_u that
  still fit their segment's cap. Sets that respect a head count and per-segment caps form a
  (laminar) matroid, on which this greedy choice is optimal: ``solver=greedy`` is exact.
* **Costs that differ** (per segment): a 0/1 knapsack (with caps, a multi-constraint one), which
  greedy does not solve. ``solver=lp`` solves its linear relaxation (x_u ∈ [0, 1]) with HiGHS
  (``scipy.optimize.linprog``); a basic optimal solution has at most one fractional x_u per
  constraint (1 + number of caps), which are dropped, and the budget left is filled greedily by
  π_u / c_u. The relaxation's optimum bounds the true optimum from above, so the plan reports
  ``upper_bound`` and the ``gap`` to it (at most the π of those few fractional users).
  ``solver=milp`` solves the integer problem exactly (``scipy.optimize.milp``, HiGHS branch and
  bound, with a time limit), for small problems and checks.

``solver=auto`` picks greedy for a uniform cost and lp otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dmp_dl.core.errors import ConfigError
from dmp_dl.core.rules import MAX_AMOUNT, segment_number

log = logging.getLogger(__name__)

SOLVERS = ("auto", "greedy", "lp", "milp")


@dataclass
class TargetingPlan:
    """The chosen contacts and what they are expected to bring.

    selected: (m,) int64 user rows, highest expected profit first.
    solver: the solver used; upper_bound: an upper bound on the best achievable expected profit
    (equal to ``expected_profit`` when the solver is exact); gap = upper_bound − expected_profit.
    """

    selected: np.ndarray
    expected_conversions: float
    expected_revenue: float
    cost: float
    expected_profit: float
    budget: float
    solver: str
    upper_bound: float

    @property
    def gap(self) -> float:
        return max(self.upper_bound - self.expected_profit, 0.0)

    def summary(self) -> dict:
        return {"contacts": int(len(self.selected)), "budget": self.budget, "cost": self.cost,
                "expected_conversions": self.expected_conversions, "expected_revenue": self.expected_revenue,
                "expected_profit": self.expected_profit, "solver": self.solver, "upper_bound": self.upper_bound,
                "gap": self.gap}


def per_user(setting: float | Mapping, groups: np.ndarray | None, n: int, name: str) -> np.ndarray:
    """A global number, or a {segment: number} mapping covering every segment, as (n_users,) float64.

    Every number is in [0, MAX_AMOUNT]; entries for segments no user is in are ignored, with a warning.
    """
    if isinstance(setting, Mapping):
        if groups is None:
            raise ConfigError(f"{name} is given per segment but the bundle has no segments; give one number")
        table = {}
        for key, val in setting.items():
            segment = segment_number(key)
            try:
                if segment is None or isinstance(val, bool):
                    raise ValueError
                table[segment] = float(val)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: segment {key!r} -> {val!r} is not a segment number and a number") from None
        present = np.unique(groups)
        missing = [int(s) for s in present if int(s) not in table]
        if missing:
            raise ConfigError(f"{name} has no entry for segment(s) {missing}; give every segment a value")
        unused = sorted(set(table) - set(present.tolist()))
        if unused:
            log.warning("%s gives a value to segment(s) %s, which no user is in; ignored", name, unused)
        lookup = np.zeros(int(present.max()) + 1)
        for key in present.tolist():
            lookup[key] = table[key]
        values = lookup[groups]
    else:
        try:
            if isinstance(setting, bool):
                raise TypeError
            values = np.full(n, float(setting))
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number or a {{segment: number}} mapping, got {setting!r}") from None
    if not ((values >= 0) & (values <= MAX_AMOUNT)).all():  # NaN compares False
        raise ConfigError(f"{name} must be a number in [0, {MAX_AMOUNT:g}] (or one per segment), got {setting!r}")
    return values


def _check(probability, value, cost, budget, groups, caps, signed: bool = False):
    p = np.asarray(probability, dtype=np.float64)
    v, c = np.broadcast_to(np.asarray(value, np.float64), p.shape), np.broadcast_to(np.asarray(cost, np.float64), p.shape)
    if not 0 <= budget <= MAX_AMOUNT:  # NaN compares False
        raise ConfigError(f"budget must be a number in [0, {MAX_AMOUNT:g}], got {budget}")
    if signed and not ((p >= -1) & (p <= 1)).all():
        raise ConfigError("uplifts must be differences of probabilities, in [-1, 1]")
    if not signed and not ((p >= 0) & (p <= 1)).all():
        raise ConfigError("propensities must be probabilities in [0, 1]")
    if not (((c >= 0) & (c <= MAX_AMOUNT)).all() and ((v >= 0) & (v <= MAX_AMOUNT)).all()):
        raise ConfigError(f"cost and value must be numbers in [0, {MAX_AMOUNT:g}]")
    cap_of = None
    if caps:
        if groups is None:
            raise ConfigError("caps are per segment but the bundle has no segments")
        g = np.asarray(groups, dtype=np.int64)
        no_cap = np.iinfo(np.int64).max
        cap_of = np.full(int(g.max()) + 1 if len(g) else 1, no_cap, dtype=np.int64)
        for key, val in caps.items():
            if segment_number(key) is None or isinstance(val, bool) or int(val) != val:
                raise ConfigError(f"caps: {key!r}: {val!r} is not a segment number and a whole number of contacts")
            if int(val) < 0:
                raise ConfigError(f"caps: segment {key} has a negative cap {val}")
            if segment_number(key) < len(cap_of):  # a segment nobody is in needs no cap
                cap_of[segment_number(key)] = min(int(val), no_cap)
    return p, v, c, cap_of


def _within_caps(order: np.ndarray, groups: np.ndarray | None, cap_of: np.ndarray | None) -> np.ndarray:
    """The users of ``order`` (a priority order) that fit their segment's cap when taken in that order."""
    if cap_of is None:
        return order
    g = np.asarray(groups, dtype=np.int64)[order]
    rank = pd.Series(g).groupby(g).cumcount().to_numpy()
    return order[rank < cap_of[g]]


def _greedy_fill(chosen: np.ndarray, candidates: np.ndarray, profit: np.ndarray, c: np.ndarray, budget: float,
                 groups, cap_of) -> np.ndarray:
    """Add ``candidates`` by decreasing profit per cost while budget and caps allow.

    After the LP the budget left is below the cost of the few users it split, so this adds few
    users: one vectorised pass over the remaining candidates per addition.
    """
    taken = np.zeros(len(profit), dtype=bool)
    taken[chosen] = True
    left = budget - c[chosen].sum()
    used = np.bincount(np.asarray(groups, np.int64)[chosen], minlength=len(cap_of)) if cap_of is not None else None
    rest = candidates[~taken[candidates]]
    ratio = np.divide(profit[rest], c[rest], out=np.full(len(rest), np.inf), where=c[rest] > 0)
    rest = rest[np.lexsort((rest, -ratio))]
    extra = []
    while len(rest):
        fits = c[rest] <= left
        if used is not None:
            g = np.asarray(groups, np.int64)[rest]
            fits &= used[g] < cap_of[g]
        if not fits.any():
            break
        at = int(np.argmax(fits))
        u = rest[at]
        extra.append(u)
        left -= c[u]
        if used is not None:
            used[int(groups[u])] += 1
        rest = rest[at + 1 :]
    return np.r_[chosen, np.asarray(extra, dtype=np.int64)]


def plan_contacts(probability: np.ndarray, value: np.ndarray | float, cost: np.ndarray | float, budget: float,
                  groups: np.ndarray | None = None, caps: Mapping[int, int] | None = None,
                  solver: str = "auto", time_limit: float = 60.0, signed: bool = False) -> TargetingPlan:
    """Choose whom to contact (see the module docstring).

    probability: (n,) conversion probabilities, or with ``signed`` the uplift (the change in the
    conversion probability a contact causes, in [-1, 1]); value, cost: (n,) or scalars per
    conversion / contact; budget: total spend allowed; groups: (n,) int segment of each user (for
    caps); caps: segment -> most contacts in it; solver: auto | greedy | lp | milp.
    """
    if solver not in SOLVERS:
        raise ConfigError(f"solver must be one of {SOLVERS}, got {solver!r}")
    p, v, c, cap_of = _check(probability, value, cost, float(budget), groups, caps, signed)
    budget = float(budget)
    profit = p * v - c
    candidates = np.flatnonzero(profit > 0)
    uniform = len(c) == 0 or np.all(c == c[0])
    if solver == "auto":
        solver = "greedy" if uniform else "lp"
    if solver == "greedy" and not uniform:
        raise ConfigError("solver=greedy is exact only for a uniform cost per contact; use lp or milp (or auto)")

    if solver == "greedy":
        order = _within_caps(candidates[np.lexsort((candidates, -profit[candidates]))], groups, cap_of)
        unit = c[0] if len(c) else 0.0
        if unit > 0:
            n = int(np.floor(budget / unit))
            while n > 0 and n * unit > budget:  # floating point: never a cent over the budget
                n -= 1
            order = order[:n]
        chosen = order
        bound = None
    else:
        chosen, bound = _solve_lp(profit, c, budget, candidates, groups, cap_of, exact=solver == "milp", time_limit=time_limit)
        # HiGHS meets constraints to a tolerance (1e-7): drop the least profitable per cost until within budget
        chosen = chosen[np.lexsort((chosen, -profit[chosen] / np.maximum(c[chosen], 1e-300)))]
        chosen = chosen[np.cumsum(c[chosen]) <= budget]
        if solver == "lp":
            chosen = _greedy_fill(chosen, candidates, profit, c, budget, groups, cap_of)
    chosen = chosen[np.lexsort((chosen, -profit[chosen]))].astype(np.int64)
    total_profit = float(profit[chosen].sum())
    return TargetingPlan(
        selected=chosen, expected_conversions=float(p[chosen].sum()), expected_revenue=float((p * v)[chosen].sum()),
        cost=float(c[chosen].sum()), expected_profit=total_profit, budget=budget, solver=solver,
        upper_bound=total_profit if bound is None else float(max(bound, total_profit)),
    )


def _solve_lp(profit, c, budget, candidates, groups, cap_of, exact: bool, time_limit: float):
    """HiGHS on the candidates: the LP relaxation rounded down (or the exact MILP). Returns the
    integral users and the relaxation's (or the MILP's best bound) objective."""
    import scipy.sparse as sp
    from scipy.optimize import Bounds, LinearConstraint, linprog, milp

    n = len(candidates)
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0.0
    rows = [sp.csr_matrix(c[candidates][None, :])]
    upper = [budget]
    if cap_of is not None:
        g = np.asarray(groups, dtype=np.int64)[candidates]
        capped = np.flatnonzero(cap_of < np.iinfo(np.int64).max)
        if len(capped):
            which = np.searchsorted(capped, g)
            hit = (which < len(capped)) & (capped[np.minimum(which, len(capped) - 1)] == g)
            rows.append(sp.csr_matrix((np.ones(hit.sum()), (which[hit], np.flatnonzero(hit))), shape=(len(capped), n)))
            upper.extend(cap_of[capped].astype(np.float64).tolist())
    a = sp.vstack(rows).tocsr()
    objective = -profit[candidates]
    if exact:
        res = milp(objective, constraints=LinearConstraint(a, -np.inf, upper), integrality=np.ones(n),
                   bounds=Bounds(0, 1), options={"time_limit": float(time_limit)})
        if res.x is None:
            raise ConfigError(f"the integer targeting problem found no solution within {time_limit} s; use solver=lp")
        bound = -getattr(res, "mip_dual_bound", res.fun)
        return candidates[res.x > 0.5], float(bound)
    res = linprog(objective, A_ub=a, b_ub=upper, bounds=(0, 1), method="highs")
    if res.status != 0:
        raise ConfigError(f"the targeting LP failed: {res.message}")
    return candidates[res.x >= 1 - 1e-9], float(-res.fun)


def random_selection_profit(probability, value, cost, budget: float, groups=None, caps=None, draws: int = 20,
                            seed: int = 0, signed: bool = False) -> float:
    """Mean expected profit of contacting users in a random order until the next one would exceed
    the budget (or its segment's cap), over ``draws`` random orders: the no-model baseline."""
    p, v, c, cap_of = _check(probability, value, cost, float(budget), groups, caps, signed)
    profit = p * v - c
    rng = np.random.default_rng(seed)
    totals = []
    for _ in range(int(draws)):
        order = _within_caps(rng.permutation(len(p)), groups, cap_of)
        within = np.cumsum(c[order]) <= budget
        stop = len(order) if within.all() else int(np.argmin(within))
        totals.append(profit[order[:stop]].sum())
    return float(np.mean(totals)) if totals else 0.0


def gains_curve(probability, value, cost, points: int = 20) -> pd.DataFrame:
    """Cumulative gains of contacting users in decreasing expected-profit order.

    One row per ``1/points`` of the users: ``contacts``, ``share_contacted``, ``cost``,
    ``expected_conversions``, ``share_of_conversions`` (of all users' expected conversions; random
    contact order gives share_of_conversions = share_contacted), ``expected_profit``.
    """
    p = np.asarray(probability, dtype=np.float64)
    v = np.broadcast_to(np.asarray(value, np.float64), p.shape)
    c = np.broadcast_to(np.asarray(cost, np.float64), p.shape)
    profit = p * v - c
    order = np.lexsort((np.arange(len(p)), -profit))
    cut = np.unique(np.ceil(np.linspace(0, len(p), int(points) + 1)[1:]).astype(np.int64))
    cum_conv, cum_cost, cum_profit = np.cumsum(p[order]), np.cumsum(c[order]), np.cumsum(profit[order])
    total = max(p.sum(), 1e-300)
    at = cut - 1
    return pd.DataFrame({
        "contacts": cut, "share_contacted": cut / max(len(p), 1), "cost": cum_cost[at],
        "expected_conversions": cum_conv[at], "share_of_conversions": cum_conv[at] / total,
        "expected_profit": cum_profit[at],
    })
