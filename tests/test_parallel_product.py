"""SciPy's sparse x sparse product over row blocks on threads (the CPU's scoring of large
item-item weights) gives the serial product's scores and splits the work evenly."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp

from dmp_dl.core import parallel


def _rows_and_weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = sp.random(300, 200, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    x = sp.random(50, 300, density=0.2, format="lil", dtype=np.float32, random_state=rng)
    for empty in (0, 20, 49):  # users with no items, the last row among them
        x[empty, :] = 0
    return x.tocsr(), weights


@pytest.mark.parametrize("threads", [1, 2, 3, 64])
def test_the_threaded_product_is_the_serial_product(monkeypatch, threads):
    x, weights = _rows_and_weights()
    monkeypatch.setattr(parallel, "MIN_BLOCK_PRODUCTS", 1)
    out = parallel.sparse_product_dense(x, weights, threads)
    assert out.dtype == np.float32 and out.shape == (50, 200)
    np.testing.assert_allclose(out, (x @ weights).toarray(), rtol=1e-6)


def test_a_large_product_runs_its_blocks_on_every_thread_at_once(monkeypatch):
    x, weights = _rows_and_weights(1)
    monkeypatch.setattr(parallel, "MIN_BLOCK_PRODUCTS", 1)
    ran_on: set[int] = set()
    barrier = threading.Barrier(2, timeout=10)  # both blocks must be in flight at once
    real = sp.csr_matrix.toarray

    def recording(self, *args, **kwargs):
        ran_on.add(threading.get_ident())
        barrier.wait()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(sp.csr_matrix, "toarray", recording)
    parallel.sparse_product_dense(x, weights, 2)
    assert len(ran_on) == 2 and threading.get_ident() not in ran_on


def test_a_small_product_stays_on_the_calling_thread(monkeypatch):
    x, weights = _rows_and_weights(2)
    ran_on: set[int] = set()
    real = sp.csr_matrix.toarray
    monkeypatch.setattr(sp.csr_matrix, "toarray", lambda self, *a, **k: ran_on.add(threading.get_ident()) or real(self, *a, **k))
    parallel.sparse_product_dense(x, weights, 2)  # 50 users x 60 items x 60 weights: far below a block's worth
    assert ran_on == {threading.get_ident()}


def test_row_blocks_split_the_work_evenly_and_drop_empty_blocks():
    work = np.array([0, 0, 5, 5, 0, 10, 0])
    bounds = parallel.row_blocks(work, 3)
    assert bounds[0] == 0 and bounds[-1] == len(work)
    totals = [work[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
    assert sorted(totals, reverse=True)[:2] == [10, 10] and sum(totals) == 20
    np.testing.assert_array_equal(parallel.row_blocks(np.zeros(4), 2), [0, 4])


def test_rows_without_items_give_zero_scores():
    _, weights = _rows_and_weights()
    assert not parallel.sparse_product_dense(sp.csr_matrix((3, 300), dtype=np.float32), weights).any()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: POSIX only")
def test_a_forked_child_gets_a_pool_of_its_own(monkeypatch):
    """A server or data-loader worker forked after the parent used the pool still gets its scores."""
    x, weights = _rows_and_weights(3)
    monkeypatch.setattr(parallel, "MIN_BLOCK_PRODUCTS", 1)
    parallel.sparse_product_dense(x, weights, 2)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # child: exit 0 when the product comes back right, within the parent's wait
        ok = np.allclose(parallel.sparse_product_dense(x, weights, 2), (x @ weights).toarray())
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's product never came back")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
