"""The event-log schema shared by every loader.

An event log is three tables:

* ``events``: one row per event, columns ``user_id``, ``item_id`` and optionally ``timestamp``,
  ``event_type``, ``value`` (a log without usable times trains too: see
  :func:`dmp_dl.data.cleaning.describe_times`) and ``event_id`` (a unique key: rows repeating one
  count once). Loaders return them raw (strings or native types); cleaning turns them into the
  canonical dtypes below.
* ``users`` (optional): ``user_id`` plus categorical (strings) or numeric attribute columns.
* ``items`` (optional): ``item_id`` plus categorical attribute columns; a multi-valued column holds
  its values joined with ``|`` (e.g. ``Action|Comedy``).

External ids are strings everywhere: ``123``, ``"123"`` and ``123.0`` are the same id, whether
read from a file, posted as an event or given to a query or an erasure (:func:`canonical_id`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dmp_dl.data.distinct import Coded, per_distinct

USER = "user_id"
ITEM = "item_id"
TIME = "timestamp"
TYPE = "event_type"
VALUE = "value"
WEIGHT = "weight"
# optional: an event's unique key (the real-time journal writes one); a repeated key is a duplicate
EVENT_ID = "event_id"

# A number larger than this in magnitude (a value, a numeric attribute) is an error, not a
# measurement: no price, count or age is 1e12, and float32 features overflow not far above it.
MAX_ABS_VALUE = 1e12

REQUIRED_EVENT_COLUMNS = (USER, ITEM)
OPTIONAL_EVENT_COLUMNS = (TIME, TYPE, VALUE)
MULTI_VALUE_SEP = "|"


@dataclass
class EventLog:
    """Events plus optional user and item attribute tables.

    After cleaning, ``events`` has exactly the columns ``user_id`` (str), ``item_id`` (str),
    ``timestamp`` (int64 epoch seconds), ``event_type`` (str), ``value`` (float64) and
    ``weight`` (float32, from the event-type weights), sorted by timestamp (stable).
    """

    events: pd.DataFrame
    users: pd.DataFrame | None = None
    items: pd.DataFrame | None = None
    source: str = "<memory>"
    meta: dict = field(default_factory=dict)


_EXACT_FLOAT_INTS = 2**53  # floats below this in magnitude hold every integer exactly


def canonical_id(value: object) -> str:
    """One external id as the text every part of dmp_dl keys it by (events, queries, erasure,
    exports): text stripped; an integer as its digits; an integral float as the integer it is
    (``7777.0`` -> ``"7777"``, as a numeric column with gaps reads it); any other float as Python
    writes it; a missing value (None, NaN, NA, ±inf) as ``""``. Text is never reinterpreted:
    ``"7777.0"`` and ``"007"`` stay as they are.

    :func:`normalize_ids` gives the same result for a whole column.
    """
    if isinstance(value, str):
        return value.strip()
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if not math.isfinite(x):
            return ""
        if x == math.floor(x) and abs(x) < _EXACT_FLOAT_INTS:
            return str(int(x))
        return str(x)
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):  # an array-like value: not missing
        pass
    return str(value).strip()


def normalize_ids(values: pd.Series) -> pd.Series:
    """External ids as stripped strings; missing ids become ``""``: :func:`canonical_id` of every value.

    Integral floats (``123.0``, as read from a numeric column with gaps, or a number among text ids)
    become ``"123"`` so that the same id written as an integer, a string or a float maps to one key.

    Returns
    -------
    pd.Series of object dtype (python ``str``), same index as ``values``.
    """
    return pd.Series(coded_ids(values).take(), index=values.index, dtype=object)


def coded_ids(values: pd.Series) -> Coded:
    """:func:`normalize_ids` of ``values`` as codes into the distinct normalised ids (each distinct
    raw id is normalised once)."""
    return per_distinct(values, _normalize_ids, floats_alike=True)


def _normalize_ids(values: pd.Series) -> pd.Series:
    """:func:`normalize_ids`, value by value."""
    if pd.api.types.is_float_dtype(values.dtype):
        arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
        out = np.full(arr.shape, "", dtype=object)
        finite = np.isfinite(arr)
        integral = finite & (np.floor(arr) == arr) & (np.abs(arr) < _EXACT_FLOAT_INTS)
        out[integral] = arr[integral].astype(np.int64).astype(str)
        rest = finite & ~integral
        out[rest] = [str(x) for x in arr[rest].tolist()]
        return pd.Series(out, index=values.index, dtype=object)
    if pd.api.types.is_integer_dtype(values.dtype) and not isinstance(values.dtype, pd.CategoricalDtype):
        if values.isna().any():  # nullable integer with gaps
            return values.astype(object).map(lambda v: "" if pd.isna(v) else str(int(v)))
        return pd.Series(values.to_numpy().astype(str), index=values.index, dtype=object)
    if pd.api.types.infer_dtype(values, skipna=False) == "string":  # text only: the common case, vectorised
        out = values.astype(object)
        if values.hasnans:  # a string dtype's missing values
            out = out.where(values.notna(), "")
        return out.str.strip().astype(object)
    return pd.Series([canonical_id(v) for v in values.astype(object).tolist()], index=values.index, dtype=object)
