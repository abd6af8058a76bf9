"""Distinct user-item pairs of a log as sparse matrices, and which split parts each pair occurs in."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

# split labels (dmp_dl.data.split): a pair's parts are the bits 1 << label
TRAIN, VAL, TEST = 0, 1, 2


def pair_matrix(n_users: int, n_items: int, users: np.ndarray, items: np.ndarray, value: float = 1.0) -> sp.csr_matrix:
    """(n_users, n_items) CSR (float32, canonical) holding ``value`` at each distinct (user, item) pair."""
    data = np.ones(len(users), dtype=np.float32)
    m = sp.csr_matrix((data, (users, items)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = value
    return m


def select_entries(m: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    """The entries of canonical CSR ``m`` where ``keep`` ((nnz,) bool) holds, as a binary float32 CSR
    of the same shape (indices stay sorted)."""
    per_row = np.zeros(m.shape[0], dtype=np.int64)  # kept entries per row, without an (nnz,) count array
    rows = np.flatnonzero(np.diff(m.indptr) > 0)
    if len(rows):
        per_row[rows] = np.add.reduceat(keep, m.indptr[rows], dtype=np.int64)
    indptr = np.zeros(m.shape[0] + 1, dtype=np.int64)
    np.cumsum(per_row, out=indptr[1:])
    indices = m.indices[keep]
    return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=m.shape)


@dataclass
class SplitPairs:
    """Each distinct (user, item) pair of a split log and the split parts it occurs in.

    What the evaluation sets are made of: a held-out pair is *relevant* for its part when its user
    has a training event and the pair occurs in no earlier part (validation: not in training;
    test: neither in training nor in validation).

    parts: (n_users, n_items) canonical CSR, one entry per distinct pair: the bit mask of its parts
        (1 train, 2 validation, 4 test), float32.
    train: (n_users, n_items) binary float32 CSR of the training pairs.
    warm: (n_users,) bool, users with a training event.
    """

    parts: sp.csr_matrix
    train: sp.csr_matrix
    warm: np.ndarray

    @classmethod
    def build(cls, user: np.ndarray, item: np.ndarray, labels: np.ndarray, n_users: int, n_items: int) -> "SplitPairs":
        """user, item: (n,) indices below n_users / n_items; labels: (n,) split labels."""
        matrices = [pair_matrix(n_users, n_items, user[labels == code], item[labels == code], float(1 << code))
                    for code in (TRAIN, VAL, TEST)]
        parts = (matrices[0] + matrices[1] + matrices[2]).tocsr()
        matrices[0].data[:] = 1.0
        return cls(parts, matrices[0], np.diff(matrices[0].indptr) > 0)

    @functools.cached_property
    def _bits(self) -> tuple[np.ndarray, np.ndarray]:
        """(bit mask per entry, whether the entry's user is warm), each (nnz,), computed once."""
        return self.parts.data.astype(np.int8), np.repeat(self.warm, np.diff(self.parts.indptr))

    def _relevant(self, code: int) -> np.ndarray:
        """(nnz,) bool: the entries of :meth:`relevant`."""
        bits, warm = self._bits
        return warm & ((bits & (1 << code)) != 0) & ((bits & ((1 << code) - 1)) == 0)

    def seen(self, mask: int) -> sp.csr_matrix:
        """Binary CSR of the pairs occurring in any part of ``mask`` (e.g. 0b011: training or validation)."""
        return select_entries(self.parts, (self._bits[0] & mask) != 0)

    def all(self) -> sp.csr_matrix:
        """Binary CSR of every pair (sharing :attr:`parts`' index arrays: one copy of the largest
        structure of the split, whichever of the two outlives the other)."""
        return sp.csr_matrix((np.ones(self.parts.nnz, dtype=np.float32), self.parts.indices, self.parts.indptr),
                             shape=self.parts.shape)

    def relevant(self, code: int) -> sp.csr_matrix:
        """Binary CSR of the relevant pairs of part ``code`` (VAL or TEST): warm users' pairs that
        occur in part ``code`` and in no earlier part."""
        return select_entries(self.parts, self._relevant(code))

    def already_seen(self, code: int) -> int:
        """Warm users' pairs of part ``code`` that also occur in an earlier part (so not relevant)."""
        bits, warm = self._bits
        return int(np.count_nonzero(warm & ((bits & (1 << code)) != 0) & ((bits & ((1 << code) - 1)) != 0)))

    def user_counts(self) -> tuple[int, int]:
        """(validation users, test users): users with at least one relevant pair of the part."""
        counts = []
        for code in (VAL, TEST):
            relevant_before = np.zeros(self.parts.nnz + 1, dtype=np.int64)
            np.cumsum(self._relevant(code), out=relevant_before[1:])
            counts.append(int(np.count_nonzero(np.diff(relevant_before[self.parts.indptr]))))
        return counts[0], counts[1]
