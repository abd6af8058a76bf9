"""Distinct user-item pairs of a log as sparse matrices, and which split parts each pair occurs in."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from dmp_dl.core.arrays import BLOCK, count_per_segment

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
    indptr = np.zeros(m.shape[0] + 1, dtype=np.int64)
    np.cumsum(count_per_segment(keep, m.indptr), out=indptr[1:])  # kept entries per row, in blocks
    indices = m.indices[keep]
    return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=m.shape)


@dataclass
class SplitPairs:
    """Each distinct (user, item) pair of a split log and the split parts it occurs in.

    What the evaluation sets are made of: a held-out pair is *relevant* for its part when its user
    has a training event and the pair occurs in no earlier part (validation: not in training;
    test: neither in training nor in validation).

    parts: (n_users, n_items) canonical CSR, one entry per distinct pair: the bit mask of its parts
        (1 train, 2 validation, 4 test), int8.
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
        parts.data = parts.data.astype(np.int8)  # the bits: a quarter of float32's memory at 10^7-10^8 pairs
        matrices[0].data[:] = 1.0
        return cls(parts, matrices[0], np.diff(matrices[0].indptr) > 0)

    @functools.cached_property
    def _bits(self) -> tuple[np.ndarray, np.ndarray]:
        """(bit mask per entry, whether the entry's user is warm), each (nnz,), computed once."""
        return self.parts.data.astype(np.int8, copy=False), np.repeat(self.warm, np.diff(self.parts.indptr))

    def _entries(self, test: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        """(nnz,) bool: ``test(bits, warm)`` of the entries, a block at a time (its temporaries a
        block's size, not the matrix's)."""
        bits, warm = self._bits
        out = np.empty(len(bits), dtype=bool)
        for lo in range(0, len(bits), BLOCK):
            out[lo:lo + BLOCK] = test(bits[lo:lo + BLOCK], warm[lo:lo + BLOCK])
        return out

    def _relevant(self, code: int) -> np.ndarray:
        """(nnz,) bool: the entries of :meth:`relevant`."""
        return self._entries(lambda bits, warm: warm & ((bits & (1 << code)) != 0) & ((bits & ((1 << code) - 1)) == 0))

    def seen(self, mask: int) -> sp.csr_matrix:
        """Binary CSR of the pairs occurring in any part of ``mask`` (e.g. 0b011: training or validation)."""
        return select_entries(self.parts, self._entries(lambda bits, _: (bits & mask) != 0))

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
        return int(np.count_nonzero(self._entries(
            lambda bits, warm: warm & ((bits & (1 << code)) != 0) & ((bits & ((1 << code) - 1)) != 0))))

    def user_counts(self) -> tuple[int, int]:
        """(validation users, test users): users with at least one relevant pair of the part."""
        counts = []
        for code in (VAL, TEST):
            counts.append(int(np.count_nonzero(count_per_segment(self._relevant(code), self.parts.indptr))))
        return counts[0], counts[1]
