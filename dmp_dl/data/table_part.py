"""The bundle part ``user_table``: the user table's (CRM) columns as encoded for training, one row
per user, whatever network the bundle serves.

Audience rules on ``attr.*`` columns and segment descriptions read it. A network that reads user
attributes (the autoencoder, the two-tower model) keeps its own copy among its weights for cold
start; a network that reads none (the sequence model) keeps none, so without this part a bundle it
serves would have lost the columns.

Files (under ``user_table/``)::

    table.json     the encoding (:meth:`FeatureTable.spec`: token vocabulary, columns, means, stds)
    tokens.npy     (n_users, T) int32: token t > 0 is ``token_vocab[t - 1]``, 0 is padding
    numeric.npy    (n_users, D) float32: standardised values, 0 where missing

Both arrays are user-aligned (listed under ``user_aligned``), so erasure removes a user's rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dmp_dl.core.errors import BundleError
from dmp_dl.data.features import FeatureTable
from dmp_dl.store.bundle import Bundle, BundleWriter
from dmp_dl.store.parts import BundlePart, spec_object

USER_TABLE_DIR = "user_table"
TABLE_SPEC = f"{USER_TABLE_DIR}/table.json"
TOKENS = f"{USER_TABLE_DIR}/tokens.npy"
NUMERIC = f"{USER_TABLE_DIR}/numeric.npy"


def has_columns(table: FeatureTable | None) -> bool:
    """Whether ``table`` encodes at least one column."""
    return table is not None and bool(table.categorical_columns or table.numeric_columns)


class UserTablePart(BundlePart):
    """The encoded user table (see the module docstring); loads as a :class:`FeatureTable` with
    ``n_users + 1`` rows, the last one the all-missing row of an unknown user."""

    name = USER_TABLE_DIR

    def present(self, bundle: Bundle) -> bool:
        return bundle.has(TABLE_SPEC)

    def save(self, writer: BundleWriter, value: FeatureTable) -> dict[str, Any]:
        """value: the run's user :class:`FeatureTable` (``n_users + 1`` rows); nothing is written
        when it has no column."""
        if not has_columns(value):
            return {}
        n = len(value.tokens) - 1
        writer.save_json(TABLE_SPEC, value.spec())
        writer.save_array(TOKENS, np.ascontiguousarray(value.tokens[:n], dtype=np.int32))
        writer.save_array(NUMERIC, np.ascontiguousarray(value.numeric[:n], dtype=np.float32))
        return {self.name: {"categorical_columns": list(value.categorical_columns),
                            "numeric_columns": list(value.numeric_columns),
                            "user_aligned": [TOKENS, NUMERIC]}}

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], **options: Any) -> FeatureTable | None:
        if not self.present(bundle):
            return None
        n_users = len(loaded["vectors"].user_vocab)
        spec = spec_object(bundle, TABLE_SPEC)
        tokens, numeric = bundle.array(TOKENS), bundle.array(NUMERIC)
        try:
            table = FeatureTable.from_spec(spec, tokens, numeric)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{bundle.root / TABLE_SPEC}: not a user-table encoding ({exc!r})") from None
        for path, array, width in ((TOKENS, tokens, None), (NUMERIC, numeric, len(table.numeric_columns))):
            if array.ndim != 2 or array.shape[0] != n_users or (width is not None and array.shape[1] != width):
                raise BundleError(f"{bundle.root / path}: shape {array.shape}, expected {n_users} users' rows"
                                  + (f" of {width} columns" if width is not None else ""))
        if tokens.dtype.kind not in "iu" or (tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > len(table.token_vocab))):
            raise BundleError(f"{bundle.root / TOKENS}: token ids outside the {len(table.token_vocab)} tokens of {TABLE_SPEC}")
        if numeric.dtype != np.float32 or not bool(np.isfinite(numeric).all()):
            raise BundleError(f"{bundle.root / NUMERIC}: not finite float32 values")
        if len(table.numeric_mean) != len(table.numeric_columns) or len(table.numeric_std) != len(table.numeric_columns):
            raise BundleError(f"{bundle.root / TABLE_SPEC}: numeric_mean / numeric_std do not match numeric_columns")
        # the all-missing row of an unknown user, as every FeatureTable has
        table.tokens = np.concatenate([tokens.astype(np.int64), np.zeros((1, tokens.shape[1]), np.int64)])
        table.numeric = np.concatenate([numeric, np.zeros((1, numeric.shape[1]), np.float32)])
        return table
