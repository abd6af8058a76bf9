"""Business rules on a recommendation: items left out and items boosted, as masks over the catalogue.

A bundle exported from an item table with a category column (``category``, ``categories``,
``genre``, ``genres``, or ``audience.profiles.category_column``) holds each item's categories
(the ``item_categories`` part)::

    item_categories/categories.json   the category names, sorted
    item_categories/indptr.npy        (n_items + 1,) int64  } CSR rows: the categories of item i
    item_categories/index.npy         (nnz,) int32          } (a multi-valued cell ``Action|Comedy`` gives two)

:class:`ItemRules` turns a request's rules into two vectors over the item axis, applied to the
exact scores of the whole catalogue before the top ``k`` are taken (so ``k`` items still come
back while ``k`` items are left):

* ``blocked`` (n_items,) bool: items never returned (``exclude_categories``, ``exclude_items``, and
  every item outside ``include_items`` when that list is given).
* ``bonus`` (n_items,) float32: ``ln(factor)`` added to a boosted item's score. Scores are logits
  of the model's softmax over the catalogue, so a factor ``f`` makes the item ``f`` times as likely
  under the model (``f > 1`` raises it, ``f < 1`` lowers it, ``f = 0`` leaves it out); an item in
  several boosted categories gets the product of their factors; ``boost_items`` multiplies on top.
  The scores returned are the boosted ones (the list stays in score order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from dmp_dl.core.errors import BundleError, DmpError
from dmp_dl.store.bundle import Bundle, BundleWriter, MissingPartError
from dmp_dl.store.parts import BundlePart

PART = "item_categories"
NAMES, INDPTR, INDEX = f"{PART}/categories.json", f"{PART}/indptr.npy", f"{PART}/index.npy"
NO_CATEGORIES = ("this bundle has no item categories (train with an item table that has a category column: "
                 "category, categories, genre or genres, or set audience.profiles.category_column)")


class RuleError(DmpError, ValueError):
    """A rule of a recommendation request names something the bundle does not know, or a bad factor."""


@dataclass(frozen=True)
class ItemCategories:
    """Each item's categories: ``names`` (C,) sorted, ``members`` (n_items, C) CSR of 0/1 and the
    item table's ``column`` they were read from."""

    names: list[str]
    members: sp.csr_matrix
    column: str | None = None

    def columns_of(self, categories: Iterable[object], key: str) -> np.ndarray:
        """Column indices (m,) of ``categories``; :class:`RuleError` names the first unknown one."""
        wanted = [str(c) for c in categories]
        at = {name: i for i, name in enumerate(self.names)}
        unknown = [c for c in wanted if c not in at]
        if unknown:
            known = ", ".join(repr(n) for n in self.names[:20]) + (" ..." if len(self.names) > 20 else "")
            raise RuleError(f"{key}: unknown category {unknown[0]!r}; this bundle's categories are {known}")
        return np.fromiter((at[c] for c in wanted), dtype=np.int64, count=len(wanted))

    def items_in(self, columns: np.ndarray) -> np.ndarray:
        """(n_items,) bool: the items in any of the category ``columns``."""
        if not len(columns):
            return np.zeros(self.members.shape[0], dtype=bool)
        return np.asarray(self.members[:, columns].sum(axis=1)).ravel() > 0


def item_categories_part(members: sp.spmatrix, names: Sequence[str], column: str) -> Callable[[BundleWriter], dict]:
    """The bundle part writer for ``members`` (n_items, C): nonzero where item i is in category j."""
    csr = sp.csr_matrix(members)
    csr.eliminate_zeros()
    csr.sort_indices()
    names = [str(n) for n in names]

    def write(w: BundleWriter) -> dict:
        w.save_json(NAMES, names)
        w.save_array(INDPTR, csr.indptr.astype(np.int64))
        w.save_array(INDEX, csr.indices.astype(np.int32))
        return {"column": column, "categories": len(names), "items": int(csr.shape[0])}

    return write


class ItemCategoriesPart(BundlePart):
    """The bundle's ``item_categories`` (module docstring): loaded with the served parts."""

    name = PART

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], **options: Any) -> ItemCategories:
        n_items = len(loaded["vectors"].item_vocab)
        names, indptr, index = bundle.json(NAMES), bundle.array(INDPTR), bundle.array(INDEX)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BundleError(f"{bundle.root / NAMES}: not a list of category names")
        if indptr.shape != (n_items + 1,) or indptr[0] != 0 or indptr[-1] != len(index) or (np.diff(indptr) < 0).any() \
                or (len(index) and not 0 <= int(index.min()) <= int(index.max()) < len(names)):
            raise BundleError(f"{bundle.root / INDPTR}: item categories do not fit {n_items} items and {len(names)} categories")
        members = sp.csr_matrix((np.ones(len(index), np.float32), index.astype(np.int64), indptr.astype(np.int64)),
                                shape=(n_items, len(names)))
        return ItemCategories(names, members, (bundle.manifest.get(PART) or {}).get("column"))


def _factor(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)) or float(value) < 0:
        raise RuleError(f"{key} must be a finite number >= 0 (1 leaves the score as it is, 0 leaves the items "
                        f"out), got {value!r}")
    return float(value)


def _log_factors(values: list[float]) -> np.ndarray:
    """ln of each factor; ln 0 = -inf: the item is left out."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(values, dtype=np.float64))


@dataclass(frozen=True)
class ItemRules:
    """A request's rules as vectors over the item axis (module docstring); None where a rule is absent."""

    blocked: np.ndarray | None = None
    bonus: np.ndarray | None = None

    @property
    def active(self) -> bool:
        return self.blocked is not None or self.bonus is not None

    @classmethod
    def build(cls, n_items: int, categories: ItemCategories | None, item_rows: Callable[[list, str], np.ndarray], *,
              exclude_categories: Iterable[object] | None = None, exclude_items: Iterable[object] | None = None,
              include_items: Iterable[object] | None = None, boost: Mapping[object, object] | None = None,
              boost_items: Mapping[object, object] | None = None) -> "ItemRules":
        """The rules of one request. ``item_rows(ids, key)`` maps item ids to rows (raising for unknown
        ids); categories name the bundle's :class:`ItemCategories` (:class:`MissingPartError` when it
        has none, :class:`RuleError` naming an unknown one or a bad factor)."""
        blocked = np.zeros(n_items, dtype=bool)
        restricted = False

        def needs_categories() -> ItemCategories:
            if categories is None:
                raise MissingPartError(NO_CATEGORIES)
            return categories

        for key, value in (("exclude_categories", exclude_categories), ("exclude_items", exclude_items),
                           ("include_items", include_items)):
            if value is not None and (isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable)):
                raise RuleError(f"{key} must be a list, got {type(value).__name__}")
        if exclude_categories:
            cats = needs_categories()
            blocked |= cats.items_in(cats.columns_of(exclude_categories, "exclude_categories"))
            restricted = True
        if exclude_items:
            blocked[item_rows(list(exclude_items), "exclude_items")] = True
            restricted = True
        if include_items is not None:
            if not list(include_items):
                raise RuleError("include_items is empty: give the item ids that may be returned, or leave it out")
            allowed = np.zeros(n_items, dtype=bool)
            allowed[item_rows(list(include_items), "include_items")] = True
            blocked |= ~allowed
            restricted = True
        bonus = None
        for key, value in (("boost", boost), ("boost_items", boost_items)):
            if value is not None and not isinstance(value, Mapping):
                raise RuleError(f"{key} must be an object of name: factor, got {type(value).__name__}")
        if boost:
            cats = needs_categories()
            names = list(boost)
            log_factor = _log_factors([_factor(boost[c], f"boost[{c!r}]") for c in names])
            per_category = np.zeros(len(cats.names), dtype=np.float64)
            np.add.at(per_category, cats.columns_of(names, "boost"), log_factor)
            bonus = np.asarray(cats.members @ per_category, dtype=np.float64)
        if boost_items:
            ids = list(boost_items)
            log_factor = _log_factors([_factor(boost_items[i], f"boost_items[{i!r}]") for i in ids])
            per_item = np.zeros(n_items, dtype=np.float64)
            np.add.at(per_item, item_rows(ids, "boost_items"), log_factor)
            bonus = per_item if bonus is None else bonus + per_item
        return cls(blocked if restricted else None, None if bonus is None else bonus.astype(np.float32))

    def apply(self, scores):
        """``scores`` (B, n_items) torch tensor with the rules applied, in place: blocked items
        ``-inf``, boosted ones raised by their bonus. Returns it."""
        import torch

        if self.bonus is not None:
            scores += torch.from_numpy(self.bonus)[None, :]
        if self.blocked is not None:
            scores[:, torch.from_numpy(self.blocked)] = float("-inf")
        return scores
