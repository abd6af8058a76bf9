"""External id <-> contiguous index vocabularies."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from dmp_dl.core.errors import BundleError, UnknownIdError
from dmp_dl.core.io import atomic_write_text


class IdVocab:
    """Sorted external ids; index ``i`` is the ``i``-th id in string order.

    Sorting (not first appearance) makes the mapping depend only on the set of ids, so two runs on
    the same data give the same indices whatever the row order.
    """

    def __init__(self, ids: Sequence[str], kind: str = "id"):
        self.kind = kind
        self.ids = np.asarray(list(ids), dtype=object)
        self._index = pd.Index(self.ids)
        if not self._index.is_unique:
            raise ValueError(f"{kind} vocabulary has duplicate ids")

    @classmethod
    def from_values(cls, values: Iterable[str], kind: str = "id") -> "IdVocab":
        return cls(sorted(set(map(str, values))), kind)

    @classmethod
    def from_indexed(cls, values: pd.Series, index: np.ndarray, kind: str = "id") -> "IdVocab":
        """The vocabulary in which row ``r`` of the id column ``values`` has index ``index[r]``
        (e.g. :func:`dmp_dl.data.cleaning.clean_log` with ``index_ids``); those indices must number
        the distinct ids in string order.

        values: (n,) ids; index: (n,) int64. Raises ValueError when they do not.
        """
        index = np.asarray(index)
        n_ids = int(index.max(initial=-1)) + 1
        if (isinstance(values.dtype, pd.CategoricalDtype) and len(values.cat.categories) == n_ids
                and np.array_equal(values.cat.codes.to_numpy(), index)):
            ids = np.asarray(values.cat.categories, dtype=object)  # the index already numbers the categories
        else:
            first = np.full(n_ids, -1, dtype=np.int64)
            first[index[::-1]] = np.arange(len(index) - 1, -1, -1)  # the first row of each index
            if (first < 0).any():
                raise ValueError(f"{kind} indices skip a number")
            ids = np.asarray(values.take(first), dtype=object)
        vocab = cls(ids, kind)
        if n_ids > 1 and not (ids[:-1] < ids[1:]).all():
            raise ValueError(f"{kind} indices do not number the ids in string order")
        return vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, external_id: object) -> bool:
        return str(external_id) in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdVocab) and np.array_equal(self.ids, other.ids)

    def index_of(self, ids: Iterable[object]) -> np.ndarray:
        """Indices (int64) of ``ids``; ``-1`` for ids not in the vocabulary."""
        if isinstance(ids, (pd.Series, pd.Index, np.ndarray, pd.api.extensions.ExtensionArray)):
            ids = np.asarray(ids, dtype=object)  # iterating Python objects, not arrow scalars
        keys = [str(x) for x in ids]
        return self._index.get_indexer(keys).astype(np.int64)

    def get(self, external_id: object) -> int:
        """Index of one id; raises :class:`UnknownIdError` if unknown."""
        i = self._index.get_indexer([str(external_id)])[0]
        if i < 0:
            raise UnknownIdError(self.kind, str(external_id))
        return int(i)

    def require(self, ids: Sequence[object]) -> np.ndarray:
        """Indices of ``ids``; raises :class:`UnknownIdError` naming the first unknown ones."""
        idx = self.index_of(ids)
        if (idx < 0).any():
            unknown = [str(ids[i]) for i in np.flatnonzero(idx < 0)[:5]]
            raise UnknownIdError(self.kind, unknown[0] if len(unknown) == 1 else unknown)
        return idx

    def lookup(self, indices: Iterable[int] | np.ndarray) -> list[str]:
        return [str(x) for x in self.ids[np.asarray(indices, dtype=np.int64)]]

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps({"kind": self.kind, "ids": self.ids.tolist()}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "IdVocab":
        try:
            with open(path, encoding="utf-8") as fh:
                payload = json.load(fh)
            return cls([str(x) for x in payload["ids"]], payload.get("kind", "id"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{path}: not a valid id vocabulary ({exc})") from None
