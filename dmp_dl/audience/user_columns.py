"""The per-user columns audience rules read, from a loaded bundle (:class:`UserColumns`).

=====================  ===============================================================================
``interest.<category>`` share of the user's time-decayed interest in the category, 0..1 (0 outside the
                        user's stored top ``audience.profiles.top_n`` categories); bundles with profiles
``event.<type>``        recency-weighted count of the user's events of the type (the profile's affinity)
``segment``             the user's segment number (bundles with segments)
``propensity``          calibrated conversion probability (bundles with a propensity model)
``uplift``              the uplift model's predicted change in it (bundles with one)
``distinct_items``      distinct items the user interacted with (every bundle)
``events``, ``active_days``, ``recency_days``, ``tenure_days``
                        events, distinct days with an event, days from the last / first event to the end
                        of the data (bundles trained with propensity, which stores these statistics)
``attr.<column>``       a user-table (CRM) column the bundle encodes: numeric ones as numbers (a
                        missing value matches no comparison), categorical ones by value (``==``,
                        ``in``: holds the value; ``!=``, ``not in``: does not, users without a value
                        included; a multi-valued cell ``a|b`` holds both). ``<column>`` alone works too
                        where no other column has that name.
=====================  ===============================================================================

Every column is built the first time a rule names it, with whole-array operations, and kept.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Mapping
from types import SimpleNamespace

import numpy as np

from dmp_dl.audience.rule import RuleError, Values
from dmp_dl.data.table_part import has_columns
from dmp_dl.store.bundle import Bundle
from dmp_dl.store.contents import load_parts

ACTIVITY = ("events", "active_days", "recency_days", "tenure_days")


class UnknownColumnError(RuleError):
    """A rule names a column the bundle does not have."""


def attribute_table(rec):
    """The user-table encoding the bundle holds with a row per user: its ``user_table`` part, else
    (bundles written before it) the network's, else the propensity model's; None when none holds
    one (the training data had no user table, or an older bundle whose network reads none)."""
    tables = [getattr(rec, "user_table", None), rec.user_features,
              getattr(getattr(getattr(rec, "_propensity", None), "features", None), "attributes", None)]
    for table in tables:
        if has_columns(table) and len(table.tokens) >= int(rec.n_users):
            return table
    return None


def _unstandardised(table, j: int, n: int) -> np.ndarray:
    """Column ``j`` of ``table.numeric`` in its own units, (n,) float64, NaN where the user had no
    value.

    The bundle stores z-scores as float32, so a value comes back off by up to one float32 step of
    its z-score; rounding to the decimal just above that step gives back the value written (an age
    of 40 reads 40, not 39.9999990, so that ``age >= 40`` holds for it). A missing value is stored
    as z = 0 (the mean), which a real value hits only when it equals the mean to the last bit; read
    as missing, it matches no comparison, as a rule's user expects (unless every z is 0: a column
    of one value)."""
    z = table.numeric[:n, j].astype(np.float64)
    std, mean = float(table.numeric_std[j]), float(table.numeric_mean[j])
    raw = z * std + mean
    largest_error = (float(np.abs(z).max(initial=0.0)) * std + abs(mean)) * 2.0**-23
    if largest_error > 0:
        raw = np.round(raw, int(-np.ceil(np.log10(2 * largest_error))))
    missing = z == 0
    if not missing.all():
        raw[missing] = np.nan
    return raw


def bundle_activity(rec) -> tuple[dict[str, np.ndarray] | None, str]:
    """``events``, ``active_days``, ``recency_days``, ``tenure_days`` of every user of ``rec`` (each
    (n_users,) float64) from its bundle's ``realtime`` part, or None and why not."""
    part = getattr(rec, "_part", None)  # a real-time server's view holds the part already
    if part is None:
        root = getattr(rec, "bundle_root", None)
        if root is None:
            return None, "the bundle's folder is not known (load it with Recommender.load)"
        bundle = Bundle.open(root, verify=False)  # the part's files are verified as they are read
        if bundle.manifest != rec.manifest:
            return None, f"a newer bundle was published at {root} since this one was loaded; reload it"
        vocabularies = SimpleNamespace(user_vocab=rec.user_vocab, item_vocab=rec.item_vocab)
        part = load_parts(bundle, ("realtime",), {"vectors": vocabularies})["realtime"]
    activity = part.activity() if part is not None else None
    if activity is None:
        return None, "the bundle has no per-user event statistics (train with propensity enabled)"
    return activity, ""


class UserColumns:
    """The rule columns of every user of a bundle (see the module docstring); a
    :class:`~dmp_dl.audience.rule.ColumnSource`.

    rec: the loaded :class:`~dmp_dl.serving.recommender.Recommender`; activity: the
    :data:`ACTIVITY` columns ((n_users,) each), or None with ``activity_note`` saying why not.
    """

    def __init__(self, rec, activity: Mapping[str, np.ndarray] | None = None, activity_note: str = ""):
        self.rec = rec
        self.n_users = int(rec.n_users)
        self._cache: dict[str, Values] = {}
        self._builders: dict[str, Callable[[], Values]] = {}
        self._missing: dict[str, str] = {}  # column -> why this bundle lacks it
        self._families: dict[str, list[str]] = {}
        self._add_builtin(activity, activity_note)
        self._add_profiles()
        self._add_attributes()

    # -- the columns ---------------------------------------------------------------------------
    def _add(self, family: str, name: str, build: Callable[[], Values]) -> None:
        self._builders[name] = build
        self._families.setdefault(family, []).append(name)

    def _add_builtin(self, activity, activity_note: str) -> None:
        rec = self.rec
        every = np.arange(self.n_users)
        if rec.stored_segments is not None:
            self._add("scores", "segment", lambda: Values(numbers=rec.stored_segments.assignments.astype(np.float64)))
        else:
            self._missing["segment"] = "this bundle has no segments (train with audience.enabled=true)"
        if rec.has_propensity:
            self._add("scores", "propensity", lambda: Values(numbers=rec.propensity_rows(every)))
        else:
            self._missing["propensity"] = "this bundle has no propensity model (train with propensity enabled)"
        if getattr(rec, "uplift_model", None) is not None:
            self._add("scores", "uplift", lambda: Values(numbers=rec.uplift_rows(every)))
        else:
            self._missing["uplift"] = "this bundle has no uplift model (python -m dmp_dl.audience task=uplift ...)"
        self._add("activity", "distinct_items", lambda: Values(numbers=rec.user_activity().astype(np.float64)))
        for name in ACTIVITY:
            if activity is not None and name in activity:
                column = np.asarray(activity[name], dtype=np.float64)
                self._add("activity", name, lambda column=column: Values(numbers=column))
            else:
                self._missing[name] = activity_note or "this bundle has no per-user event statistics"

    def _add_profiles(self) -> None:
        profiles = self.rec.profiles
        if profiles is None:
            self._missing["interest"] = self._missing["event"] = "this bundle has no interest profiles " \
                                                                 "(train with audience.enabled=true)"
            return
        for c, category in enumerate(profiles.categories):
            self._add("interest", f"interest.{category}", lambda c=c: Values(numbers=self._share_of(c)))
        for t, kind in enumerate(profiles.event_types):
            self._add("event", f"event.{kind}",
                      lambda t=t: Values(numbers=profiles.event_type_affinity[:, t].astype(np.float64)))

    def _share_of(self, category: int) -> np.ndarray:
        profiles = self.rec.profiles
        shares = profiles.top_shares().astype(np.float64)
        return np.where(profiles.top_categories == category, shares, 0.0).sum(axis=1)

    def _add_attributes(self) -> None:
        table = attribute_table(self.rec)
        if table is None:
            self._missing["attr"] = ("this bundle holds no user-table (CRM) column per user: its training data had no "
                                     "user table (data.users), or it was exported before bundles kept one whatever "
                                     "their network reads (export it again)")
            return
        n = self.n_users
        for j, column in enumerate(table.numeric_columns):
            self._add("attr", f"attr.{column}", lambda j=j: Values(numbers=_unstandardised(table, j, n)))
        for column in table.categorical_columns:
            prefix = f"{column}="
            codes = {text[len(prefix):]: t + 1 for t, text in enumerate(table.token_vocab) if text.startswith(prefix)}
            self._add("attr", f"attr.{column}", lambda codes=codes: Values(tokens=table.tokens[:n], codes=codes))

    # -- lookup --------------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        """The column ``name`` stands for (``age`` -> ``attr.age`` where no other column is ``age``)."""
        if name in self._builders:
            return name
        if f"attr.{name}" in self._builders:
            return f"attr.{name}"
        family = name.split(".", 1)[0] if "." in name else name
        why = self._missing.get(name) or (self._missing.get(family) if "." in name else None)
        if why:
            raise UnknownColumnError(f"rule: column {name!r} is not available: {why}")
        # a different case, a family prefix left out (Horror for interest.Horror), or a near spelling
        close = [k for k in self._builders if name.lower() in (k.lower(), k.split(".", 1)[-1].lower())][:1]
        close = close or difflib.get_close_matches(name, list(self._builders), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if "attr" in self._missing and not close:  # it may be a CRM column's name
            hint += f"; no user-table column is available: {self._missing['attr']}"
        raise UnknownColumnError(f"rule: unknown column {name!r}{hint}; the columns are: {self.describe()}")

    def values(self, name: str) -> Values:
        key = self.resolve(name)
        if key not in self._cache:
            self._cache[key] = self._builders[key]()
        return self._cache[key]

    def names(self) -> dict[str, list[str]]:
        """The columns of this bundle, by family (scores, activity, interest, event, attr)."""
        return {family: list(names) for family, names in self._families.items()}

    def describe(self, per_family: int = 8) -> str:
        """The columns in one line: every score and activity column, and up to ``per_family`` names
        of each of the other families with their count."""
        parts = []
        for family, names in self._families.items():
            if family in ("scores", "activity") or len(names) <= per_family:
                parts.extend(names)
            else:
                parts.append(f"{', '.join(names[:per_family])} (and {len(names) - per_family} more {family}.*)")
        return ", ".join(parts) if parts else "none"

    def kind(self, name: str) -> str:
        """``numeric`` or ``categorical``."""
        return "categorical" if self.values(name).tokens is not None else "numeric"


_COLUMNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def columns_of(rec) -> UserColumns:
    """The :class:`UserColumns` of ``rec`` (built once per loaded bundle and kept while it is)."""
    columns = _COLUMNS.get(rec)
    if columns is None:
        activity, note = bundle_activity(rec)
        columns = _COLUMNS[rec] = UserColumns(rec, activity, note)
    return columns
