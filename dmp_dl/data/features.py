"""Encoding user / item attribute tables into tensors for the towers.

Categorical columns become tokens ``"column=value"`` (a multi-valued cell ``a|b`` gives two
tokens); numeric columns are standardised with missing values at the mean (0). Row ``n`` (one past
the last vocabulary index) is the all-missing row used for unknown users/items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dmp_dl.data.distinct import per_distinct_cells
from dmp_dl.data.grouping import group_bounds
from dmp_dl.data.schema import MULTI_VALUE_SEP
from dmp_dl.data.vocab import IdVocab


@dataclass
class FeatureTable:
    """Encoded attributes of the rows of a vocabulary.

    tokens: (n + 1, T) int64; 0 is padding, ``t > 0`` is ``token_vocab[t - 1]``.
    numeric: (n + 1, D) float32, standardised; 0 where missing.
    """

    tokens: np.ndarray
    numeric: np.ndarray
    token_vocab: list[str]
    categorical_columns: list[str]
    numeric_columns: list[str]
    numeric_mean: list[float]
    numeric_std: list[float]
    skipped_columns: dict[str, str] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """Embedding-table size including the padding token 0."""
        return len(self.token_vocab) + 1

    @classmethod
    def build(
        cls,
        table: pd.DataFrame | None,
        id_col: str,
        vocab: IdVocab,
        kinds: Mapping[str, str] | None = None,
        max_unique_ratio: float = 0.5,
    ) -> "FeatureTable":
        """Encode ``table`` (one row per id, as cleaned) for the ids of ``vocab``.

        Categorical columns with more distinct values than ``max_unique_ratio`` of the rows (and
        over 50), such as titles or zip codes, identify rows rather than describe them and are
        skipped (listed in ``skipped_columns``).
        """
        n = len(vocab)
        if table is None or len(table) == 0:
            return cls(np.zeros((n + 1, 1), np.int64), np.zeros((n + 1, 0), np.float32), [], [], [], [], [])
        kinds = dict(kinds or {})
        rows = vocab.index_of(table[id_col].tolist())
        known = rows >= 0
        table, rows = table.loc[known], rows[known]
        cat_cols, num_cols, skipped = [], [], {}
        for col in table.columns:
            if col == id_col:
                continue
            kind = kinds.get(col) or ("numeric" if pd.api.types.is_numeric_dtype(table[col].dtype) else "categorical")
            if kind == "numeric":
                num_cols.append(col)
                continue
            distinct = table[col].nunique(dropna=True)
            if distinct > 50 and distinct > max_unique_ratio * len(table):
                skipped[col] = f"{distinct} distinct values (looks like an identifier or free text)"
                continue
            cat_cols.append(col)

        # Categorical: each distinct cell split into its tokens once, then (row, token) pairs padded per row.
        pair_rows, pair_tokens, token_texts = [], [], []
        for col in cat_cols:
            cells = per_distinct_cells(table[col])
            words = [[] if v is None else [p.strip() for p in str(v).split(MULTI_VALUE_SEP) if p.strip()]
                     for v in cells.values]
            n_words = np.array([len(w) for w in words], dtype=np.int64)
            first_word = np.concatenate([[0], np.cumsum(n_words)])
            per_row = n_words[cells.codes]
            pair_rows.append(np.repeat(rows, per_row))
            within = np.arange(int(per_row.sum())) - np.repeat(np.cumsum(per_row) - per_row, per_row)
            pair_tokens.append(len(token_texts) + np.repeat(first_word[cells.codes], per_row) + within)
            token_texts.extend(f"{col}={w}" for cell in words for w in cell)
        token_vocab = sorted(set(token_texts))
        tok_index = {t: i + 1 for i, t in enumerate(token_vocab)}
        token_id = np.array([tok_index[t] for t in token_texts], dtype=np.int64)
        tokens = np.zeros((n + 1, 1), dtype=np.int64)
        if token_texts:
            row = np.concatenate(pair_rows)
            key = np.sort(row * (len(token_vocab) + 1) + token_id[np.concatenate(pair_tokens)])  # by row, then token
            key = key[np.r_[True, key[1:] != key[:-1]]]  # a token once per row
            row, tok = key // (len(token_vocab) + 1), key % (len(token_vocab) + 1)
            if len(key):
                starts, ends = group_bounds(row)
                tokens = np.zeros((n + 1, max(1, int((ends - starts).max()))), dtype=np.int64)
                tokens[row, np.arange(len(key)) - np.repeat(starts, ends - starts)] = tok

        kept, means, stds = [], [], []
        for col in num_cols:
            vals = pd.to_numeric(table[col], errors="coerce").to_numpy(np.float64)
            finite = np.isfinite(vals)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught just below
                mean = float(vals[finite].mean()) if finite.any() else 0.0
                std = float(vals[finite].std()) if finite.sum() > 1 else 1.0
            std = std if std > 1e-12 else 1.0
            if not (np.isfinite(mean) and np.isfinite(std)):  # e.g. 1e308: the mean or variance overflows
                skipped[col] = "numeric values too large to standardise (mean or variance overflows float64)"
                continue
            kept.append((col, vals, finite))
            means.append(mean)
            stds.append(std)
        num_cols = [col for col, _, _ in kept]
        numeric = np.zeros((n + 1, len(num_cols)), dtype=np.float32)
        for j, (col, vals, finite) in enumerate(kept):
            numeric[rows[finite], j] = ((vals[finite] - means[j]) / stds[j]).astype(np.float32)
        return cls(tokens, numeric, token_vocab, cat_cols, num_cols, means, stds, skipped)

    def encode_records(self, records: Sequence[Mapping[str, object]]) -> tuple[np.ndarray, np.ndarray]:
        """Encode raw attribute dicts (e.g. a new user's CRM fields) like the training rows.

        Unknown columns and categories are ignored; missing numeric values are 0 (the mean).

        Returns
        -------
        tokens (len(records), T) int64, numeric (len(records), D) float32
        """
        width = self.tokens.shape[1]
        tokens = np.zeros((len(records), width), dtype=np.int64)
        numeric = np.zeros((len(records), len(self.numeric_columns)), dtype=np.float32)
        tok_index = {t: i + 1 for i, t in enumerate(self.token_vocab)}
        for r, rec in enumerate(records):
            found = []
            for col in self.categorical_columns:
                v = rec.get(col)
                if v is None:
                    continue
                for part in str(v).split(MULTI_VALUE_SEP):
                    t = tok_index.get(f"{col}={part.strip()}")
                    if t is not None and t not in found:
                        found.append(t)
            found = found[:width]
            tokens[r, : len(found)] = found
            for j, col in enumerate(self.numeric_columns):
                try:
                    v = float(rec.get(col))  # type: ignore[arg-type]
                except (TypeError, ValueError, OverflowError):  # OverflowError: an int past float range
                    continue
                if np.isfinite(v):
                    with np.errstate(over="ignore"):  # beyond float32: inf, which the caller refuses
                        numeric[r, j] = (v - self.numeric_mean[j]) / self.numeric_std[j]
        return tokens, numeric

    def spec(self) -> dict:
        """JSON-safe description (everything but the arrays)."""
        return {
            "token_vocab": self.token_vocab,
            "categorical_columns": self.categorical_columns,
            "numeric_columns": self.numeric_columns,
            "numeric_mean": self.numeric_mean,
            "numeric_std": self.numeric_std,
            "skipped_columns": self.skipped_columns,
        }

    @classmethod
    def from_spec(cls, spec: Mapping, tokens: np.ndarray, numeric: np.ndarray) -> "FeatureTable":
        return cls(
            tokens, numeric, list(spec["token_vocab"]), list(spec["categorical_columns"]),
            list(spec["numeric_columns"]), list(spec["numeric_mean"]), list(spec["numeric_std"]),
            dict(spec.get("skipped_columns", {})),
        )
