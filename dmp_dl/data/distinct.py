"""Column transforms computed once per distinct value.

An event log repeats its ids, event types and often its times and values millions of times; the
string work of cleaning (normalising, parsing, checking for missing tokens) runs on the distinct
values only and reaches every row through an integer code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from dmp_dl.core.arrays import index_dtype

# How pandas stores a column of Python strings by default (pandas 3: arrow-backed ``str``).
TEXT_DTYPE = pd.Series(np.array(["x"], dtype=object)).dtype


@dataclass
class Coded:
    """A column as integer codes into its distinct values: ``values[codes]`` is the column.

    codes: (n,) int64 (int32 from a categorical column); values: (k,) the distinct values (object for
    text, else as computed).
    """

    codes: np.ndarray
    values: np.ndarray

    def take(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The column's values (of ``rows`` only when given), as an (n,) array of ``values``' dtype."""
        return self.values[self.codes if rows is None else self.codes[rows]]

    def text_column(self, rows: np.ndarray | None = None) -> pd.api.extensions.ExtensionArray | np.ndarray:
        """The text values (of ``rows`` only when given) as pandas stores Python strings by default
        (``TEXT_DTYPE``), built by one arrow ``take`` instead of converting (n,) Python strings."""
        codes = self.codes if rows is None else self.codes[rows]
        if len(codes) and isinstance(TEXT_DTYPE, pd.StringDtype) and TEXT_DTYPE.storage == "pyarrow":
            try:
                dictionary = pa.array(self.values, type=pa.large_string())
            except (pa.ArrowException, UnicodeError):  # e.g. lone surrogates: pandas decides how to store them
                return self.values[codes]
            return pd.array(dictionary.take(pa.array(codes)), dtype=TEXT_DTYPE)
        return self.values[codes]


def _distinct_is_exact(values: pd.Series, floats: bool) -> bool:
    """Whether values that compare equal (as pandas factorises them) are indistinguishable to a
    string transform: not so for ``1``, ``1.0`` and ``True`` in one object column, or for ``0.0``
    and ``-0.0`` (``floats``: the transform maps those alike)."""
    dtype = values.dtype
    if isinstance(dtype, pd.StringDtype) or pd.api.types.is_bool_dtype(dtype):
        return True
    if isinstance(dtype, pd.CategoricalDtype):
        return False
    if pd.api.types.is_integer_dtype(dtype):
        return True
    if pd.api.types.is_float_dtype(dtype):
        return floats
    if dtype == object:  # noqa: E721  (numpy dtype equality: object columns, not a type comparison)
        return pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty", "integer", "boolean")
    return False


def _categories(values: pd.Series) -> pd.Series | None:
    """A categorical column's categories (its distinct values) as a Series; None for other columns."""
    if not isinstance(values.dtype, pd.CategoricalDtype):
        return None
    return pd.Series(values.cat.categories)


def per_distinct(values: pd.Series, transform: Callable[[pd.Series], pd.Series | np.ndarray], *,
                 floats_alike: bool = False, merge: bool = True) -> Coded:
    """``transform(values)`` as a :class:`Coded` column, with ``transform`` applied to each distinct
    value once.

    transform: an elementwise function of a Series (each output depends on its own input only),
        returning a Series or array of the same length. Text outputs (object) are made distinct:
        two inputs with one output share a code, so codes compare as the outputs do.
    floats_alike: ``transform`` maps ``0.0`` and ``-0.0`` to one output, so a float column may be
        factorised (see :func:`_distinct_is_exact`); otherwise such a column is transformed whole.
    merge: False when the caller only reads the outputs (``take``): text outputs are then left as
        computed, possibly repeated.
    """
    categories = _categories(values)
    if categories is not None and _distinct_is_exact(categories, floats_alike):
        # the categorical's own codes, widened only to hold the extra last value (-1: missing)
        codes = values.cat.codes.to_numpy().astype(index_dtype(len(categories)))
        codes[codes < 0] = len(categories)
        out = transform(pd.concat([categories, pd.Series([None], dtype=categories.dtype)], ignore_index=True))
    elif _distinct_is_exact(values, floats_alike):
        codes, uniques = pd.factorize(values, use_na_sentinel=False)
        out = transform(pd.Series(uniques, dtype=values.dtype))
    else:
        codes, out = np.arange(len(values), dtype=np.int64), transform(values)
    out = out.to_numpy() if isinstance(out, pd.Series) else np.asarray(out)
    codes = np.asarray(codes)  # int64, or a categorical's int32: half the memory per row
    if out.dtype != object or not merge:  # numbers: kept as computed (0.0 and -0.0 stay apart)
        return Coded(codes, out)
    inner, distinct = pd.factorize(out, use_na_sentinel=False)
    return Coded(inner.astype(codes.dtype, copy=False)[codes], np.asarray(distinct, dtype=object))


def per_distinct_cells(values: pd.Series) -> Coded:
    """The cells of ``values`` as codes into its distinct cells (object; missing cells as None),
    for work done once per distinct cell (e.g. splitting multi-valued attributes)."""
    if _distinct_is_exact(values, floats=False):
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        cells = np.append(np.asarray(uniques, dtype=object), None)  # code -1 (missing) -> the last entry
        return Coded(np.where(codes < 0, len(cells) - 1, codes).astype(np.int64), cells)
    cells = values.astype(object).where(values.notna(), None).to_numpy(dtype=object)
    return Coded(np.arange(len(values), dtype=np.int64), cells)
