"""The model stage on one device: EASE fitted once per run (the report's baseline is the candidate),
validation on a fixed sample of users, the memory guard reading the device, float32 with a float64
fallback, and the same scores through every scoring path."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dmp_dl.core import memory
from dmp_dl.evaluation.baselines import EASEScorer
from dmp_dl.evaluation.ranking import sample_users
from dmp_dl.models import ease as ease_lib
from dmp_dl.pipeline.run import run
from dmp_dl.training import selection as model_selection

from .test_user_level_models import planted_cfg, planted_log  # noqa: F401  (fixture)


def _random_binary(n_users: int, n_items: int, density: float, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = sp.random(n_users, n_items, density=density, random_state=rng, format="csr", dtype=np.float32)
    x.data[:] = 1.0
    return x


def test_one_ease_fit_per_run_and_the_baseline_is_the_candidate(planted_log, tmp_path, monkeypatch):  # noqa: F811
    calls = []
    inverse = ease_lib.regularised_inverse
    monkeypatch.setattr(ease_lib, "regularised_inverse", lambda gram, l2, *a: calls.append(l2) or inverse(gram, l2, *a))
    # no recency decay: the candidate reads 0/1 rows, as the baseline does (a decayed candidate's
    # baseline is its weights on 0/1 rows, another score)
    run(planted_cfg(planted_log, tmp_path / "run", "model=auto", "model.ease.l2=12.0", "model.refit=false",
                    "data.recency_half_life_days=null"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert calls == [12.0]  # the candidate's fit; the report's EASE baseline did not fit again
    assert metrics["ranking"]["ease"] == metrics["model"]["candidates"]["ease"]["test"]
    assert metrics["model"]["device"] == "cpu"


def test_an_ease_baseline_with_another_l2_is_fitted_on_its_own(planted_log, tmp_path, monkeypatch):  # noqa: F811
    calls = []
    inverse = ease_lib.regularised_inverse
    monkeypatch.setattr(ease_lib, "regularised_inverse", lambda gram, l2, *a: calls.append(l2) or inverse(gram, l2, *a))
    run(planted_cfg(planted_log, tmp_path / "run", "model=auto", "model.ease.l2=12.0", "model.refit=false",
                    "evaluation.ease_l2=30.0"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert sorted(calls) == [12.0, 30.0]
    assert metrics["ranking"]["ease"] != metrics["model"]["candidates"]["ease"]["test"]


def test_validation_reads_a_fixed_sample_and_the_choice_every_user(planted_log, tmp_path, monkeypatch):  # noqa: F811
    seen_sizes = []
    evaluate = model_selection.evaluate_scorers

    def spy(fn, dataset, *args, **kwargs):
        seen_sizes.append(len(dataset))
        return evaluate(fn, dataset, *args, **kwargs)

    monkeypatch.setattr(model_selection, "evaluate_scorers", spy)
    loaders = []
    fit = model_selection.DataLoader

    def loader(dataset, *args, **kwargs):
        loaders.append(len(dataset))
        return fit(dataset, *args, **kwargs)

    monkeypatch.setattr(model_selection, "DataLoader", loader)
    result = run(planted_cfg(planted_log, tmp_path / "run", "model=auto", "model.val_users=20", "model.refit=false"))
    dm = result["datamodule"]
    all_val, all_test = len(dm.val_users), len(dm.test_users)
    assert all_val > 20
    assert loaders == [20]  # the autoencoder's per-epoch validation
    record = result["metrics"]["model"]
    # the l2 grid (5 values and any tried past its edge) and the blend grid on the sample, the
    # choice on every validation user, the test once
    tried = len(record["candidates"]["ease"]["details"]["l2_grid"])
    assert tried >= 5
    assert seen_sizes == [20] * tried + [20, all_val, all_test]
    assert record["validation_users"] == {"sample": 20, "all": all_val}


def test_a_sample_is_fixed_and_no_larger_than_asked():
    class Users:
        def __init__(self, users, history=None, seen=None, relevant=None):
            self.users, self.history, self.seen, self.relevant = np.asarray(users), history, seen, relevant

        def __len__(self):
            return len(self.users)

    data = Users(np.arange(100, 200))
    a, b = sample_users(data, 30, seed=1), sample_users(data, 30, seed=1)
    assert len(a) == 30 and (a.users == b.users).all() and (np.diff(a.users) > 0).all()
    assert sample_users(data, 500) is data and sample_users(data, None) is data


def test_the_memory_guard_reads_the_device(monkeypatch):
    monkeypatch.setattr(ease_lib, "available_bytes", lambda device="cpu": 3 * 2**30)
    reason = ease_lib.check_memory(1000, 20_000, "auto", "cpu")
    assert reason is not None and "of the 3.0 GiB free on cpu" in reason and "max_memory_gb" in reason
    monkeypatch.setattr(ease_lib, "available_bytes", lambda device="cpu": 139 * 2**30)
    assert ease_lib.check_memory(100_000, 20_000, "auto", "cpu") is None  # what a 4 GiB cap refused
    assert ease_lib.check_memory(100_000, 20_000, 2, "cpu") is not None  # a number given is a cap


def test_the_memory_guard_counts_the_matrices_a_fit_holds():
    """On the CPU one (items x items) float32 matrix is inverted in place, plus the Gram matrix when
    an l2 grid is searched from it; elsewhere the factor and the inverse sit beside the matrix."""
    gib = 20_000 * 20_000 * 4 / 2**30  # 1.49
    assert ease_lib.check_memory(100_000, 20_000, 1.6, "cpu", keep_gram=False) is None
    assert f"({2 * gib:.1f} GiB) > 1.6 GiB" in ease_lib.check_memory(100_000, 20_000, 1.6, "cpu", keep_gram=True)
    assert f"({3 * gib:.1f} GiB)" in ease_lib.check_memory(100_000, 20_000, 1.6, "cuda", keep_gram=False)
    assert f"({4 * gib:.1f} GiB)" in ease_lib.check_memory(100_000, 20_000, 1.6, "cuda", keep_gram=True)


@pytest.fixture(params=["lapack", "sweep"])
def cpu_inverse(request, monkeypatch):
    """The CPU inverse of a small matrix by LAPACK, or by the blocked sweep that large catalogues
    get (small blocks, so several pivots and row ranges, the last ones partial)."""
    if request.param == "sweep":
        monkeypatch.setattr(ease_lib, "LAPACK_MAX_ROW_BYTES", 0)
        monkeypatch.setattr(ease_lib, "SWEEP_BLOCK", 16)
        monkeypatch.setattr(ease_lib, "SWEEP_ROWS", 40)

        def no_lapack(m):
            raise AssertionError("LAPACK's in-place inverse called above its size limit")

        monkeypatch.setattr(ease_lib, "_lapack_inverse", no_lapack)
    return request.param


def test_the_cpu_inverse_is_written_into_the_gram_matrix(caplog, cpu_inverse):
    x = _random_binary(400, 90, 0.1, seed=4)
    gram = ease_lib.gram_matrix(x)
    expected = np.linalg.inv((x.T @ x).toarray().astype(np.float64) + 5.0 * np.eye(90))
    with caplog.at_level("WARNING"):
        inverse = ease_lib.regularised_inverse(gram, 5.0)
    assert "float64" not in caplog.text
    assert inverse.data_ptr() == gram.data_ptr()  # no second (items x items) matrix
    assert torch.equal(inverse, inverse.T)
    np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-3, atol=1e-6)
    patterns = _random_binary(3, 60, 0.3, seed=1).toarray()  # the float64 fallback writes its result there too
    rank3 = ease_lib.gram_matrix(sp.csr_matrix(np.repeat(patterns, 3000, axis=0)))
    exact = np.linalg.inv(rank3.numpy().astype(np.float64) + 1e-4 * np.eye(60))
    with caplog.at_level("WARNING"):
        inverse = ease_lib.regularised_inverse(rank3, 1e-4)
    assert "float64" in caplog.text and inverse.data_ptr() == rank3.data_ptr()
    assert torch.equal(inverse, inverse.T)
    np.testing.assert_allclose(inverse.numpy(), exact, rtol=1e-3)


@pytest.mark.parametrize("n, block, rows", [(90, 16, 40), (50, 7, 7), (33, 64, 64), (64, 8, 1000)])
def test_the_sweep_inverts_the_upper_triangle_and_leaves_the_lower_one(n, block, rows):
    x = _random_binary(10 * n, n, 0.1, seed=n)
    gram = ease_lib.gram_matrix(x)
    gram.diagonal().add_(3.0)
    gram.tril(-1).mul_(0)  # nothing below the diagonal is read: make it something else
    lower = torch.arange(n * n, dtype=torch.float32).view(n, n).tril(-1)
    gram.copy_(gram.triu() + lower)
    symmetric = gram.triu().double() + gram.triu(1).double().T
    assert ease_lib._sweep_inverse(gram, block, rows)
    assert torch.equal(gram.tril(-1), lower)
    np.testing.assert_allclose(gram.triu().numpy(), np.triu(np.linalg.inv(symmetric.numpy())), rtol=1e-4, atol=1e-7)


def test_the_sweep_says_when_a_matrix_is_not_positive_definite():
    m = torch.eye(40) * 2.0
    m[30, 30] = -1.0  # one negative pivot, in the second block
    lower = torch.randn(40, 40, generator=torch.Generator().manual_seed(0)).tril(-1)
    m.add_(lower)
    assert not ease_lib._sweep_inverse(m, 16, 32)
    assert torch.equal(m.tril(-1), lower)  # the float64 fallback reads X'X from there


@pytest.mark.parametrize("block", [1, 3, 7, 100])
@pytest.mark.parametrize("upper", [True, False])
def test_a_triangle_is_mirrored_in_place(block, upper):
    m = torch.randn(7, 7, generator=torch.Generator().manual_seed(block))
    kept = m.triu() if upper else m.tril()
    expected = kept + (kept.triu(1) if upper else kept.tril(-1)).T
    out = ease_lib.mirror_triangle(m, upper=upper, block=block)
    assert out is m and torch.equal(m, expected)


def test_a_solver_that_keeps_no_gram_matrix_solves_every_l2_alike():
    x = _random_binary(300, 80, 0.1, seed=6)
    kept, single = ease_lib.EASESolver(x), ease_lib.EASESolver(x, keep_gram=False)
    for l2 in (5.0, 40.0, 5.0):  # a second value computes the Gram matrix again instead of reading a spent one
        assert torch.equal(single.dense(l2), kept.dense(l2))
    assert single._gram is None and kept._gram is not None


def test_the_gram_matrix_is_kept_only_for_a_grid():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": {"ease": {"l2": None, "l2_scales": [0.5, 1.0, 2.0], "short_grid_above_items": 50,
                                                "dropout": "auto", "dropout_grid": [0.2]}}})
    assert model_selection.ease_keeps_gram(cfg, 1000, 40)  # a grid of l2 (and dropout) values
    assert not model_selection.ease_keeps_gram(cfg, 1000, 60)  # a wide catalogue: the middle l2 alone
    cfg.model.ease.l2 = 10.0
    cfg.model.ease.dropout = 0.0
    assert not model_selection.ease_keeps_gram(cfg, 1000, 40)  # l2 given


def test_the_host_reports_free_memory():
    free = ease_lib.available_bytes("cpu")
    assert 2**20 < free < 2**50


@pytest.mark.parametrize("block", [1, 3, 50, 1 << 21])
def test_the_gram_matrix_is_written_densely_block_by_block(block):
    """The CPU's dense X'X equals scipy's, whatever the block of entries scattered at a time,
    with empty rows, a row longer than a block and an all-zero matrix."""
    x = _random_binary(200, 40, 0.15, seed=3).tolil()
    x[:, 7] = 0  # an item nobody has: an empty row of X'X
    x[0, :] = 1  # a user with every item: long rows
    x = x.tocsr()
    gram = sp.csr_matrix(x.T @ x)
    assert torch.equal(ease_lib.csr_to_dense(gram, block=block), torch.from_numpy(gram.toarray().astype(np.float32)))
    assert torch.equal(ease_lib.gram_matrix(x), torch.from_numpy((x.T @ x).toarray().astype(np.float32)))
    empty = sp.csr_matrix((4, 6), dtype=np.float32)
    assert torch.equal(ease_lib.csr_to_dense(empty, block=block), torch.zeros(4, 6))
    repeated = sp.csr_matrix((np.array([1.0, 2.0, 4.0], dtype=np.float32), np.array([2, 2, 0]), np.array([0, 2, 3])),
                             shape=(2, 3))  # row 0 names column 2 twice: summed
    assert torch.equal(ease_lib.csr_to_dense(repeated, block=block), torch.tensor([[0.0, 0.0, 3.0], [4.0, 0.0, 0.0]]))


@pytest.mark.parametrize("entries", [1, 40, 1000, 10**9])
def test_a_large_logs_gram_matrix_is_summed_over_ranges_of_users(entries):
    """On the CPU, users whose squared lengths sum past ``product_entries`` are multiplied a range
    at a time (a user longer than the bound is a range of its own): the same X'X as one product."""
    x = _random_binary(300, 40, 0.15, seed=8).tolil()
    x[3, :] = 1  # 40 items: 1,600 squared, past the smaller bounds alone
    x[200:210, :] = 0  # users with nothing
    x = x.tocsr()
    expected = torch.from_numpy((x.T @ x).toarray().astype(np.float32))
    assert torch.equal(ease_lib.gram_matrix(x, product_entries=entries), expected)
    added = torch.ones(40, 40)
    assert torch.equal(ease_lib.csr_to_dense(sp.csr_matrix(x.T @ x), out=added), expected + 1)  # adds into out


@pytest.mark.parametrize("chunk", [1, 7, 8192])
def test_the_gpus_gram_matrix_by_user_chunks_is_the_cpus(chunk):
    """The algorithm CUDA runs (a sum over chunks of users), run here on the CPU: the same X'X."""
    x = _random_binary(50, 30, 0.2, seed=5)
    assert torch.equal(ease_lib.gram_by_user_chunks(x, torch.device("cpu"), chunk), ease_lib.gram_matrix(x))


def test_served_ease_weights_score_alike_dense_sparse_and_unplaced(monkeypatch):
    """The served weights on a device: dense when they fit in a quarter of its free memory; when
    not, on the CPU the scipy product of the unplaced scorer, and elsewhere torch's sparse x sparse
    product (what a GPU short of memory runs, forced here on the CPU); all give the scores of the
    unplaced scorer's scipy product, for 0/1 rows and weighted rows."""
    weights = sp.random(40, 40, density=0.2, random_state=np.random.default_rng(2), format="csr", dtype=np.float32)
    rows = sp.random(6, 40, density=0.15, random_state=np.random.default_rng(4), format="lil", dtype=np.float32)
    rows[5, :] = 0  # a user with no items
    rows = rows.tocsr()
    expected = {w: ease_lib.ItemItemScorer(weights)(rows, weighted=w).numpy() for w in (False, True)}
    dense = ease_lib.ItemItemScorer(weights).to("cpu")
    monkeypatch.setattr(ease_lib, "available_bytes", lambda device="cpu": 1024)  # 40 x 40 float32 does not fit
    host = ease_lib.ItemItemScorer(weights).to("cpu")
    sparse = ease_lib.ItemItemScorer(weights).to("cpu", form="sparse")
    assert dense._on_device.layout == torch.strided and sparse._on_device.layout != torch.strided
    assert host._on_device is None and host.device == torch.device("cpu")
    for scorer in (dense, host, sparse):
        for weighted in (False, True):
            np.testing.assert_allclose(scorer(rows, weighted=weighted).numpy(), expected[weighted], rtol=1e-5, atol=1e-6)


def test_float32_falls_back_to_float64_when_it_fails(caplog):
    patterns = _random_binary(3, 60, 0.3, seed=1).toarray()
    x = sp.csr_matrix(np.repeat(patterns, 3000, axis=0))  # 9,000 users of three kinds: X'X has rank 3
    gram = ease_lib.gram_matrix(x)  # exact integer counts, so float64 sees the same matrix
    l2 = 1e-4  # condition number ~1e12: beyond float32, within float64
    exact = np.linalg.inv(gram.numpy().astype(np.float64) + l2 * np.eye(60))
    with caplog.at_level("WARNING"):
        inverse = ease_lib.regularised_inverse(gram.clone(), l2)
    assert "float64" in caplog.text
    assert torch.isfinite(inverse).all() and inverse.dtype == torch.float32
    np.testing.assert_allclose(np.diag(inverse.numpy()), np.diag(exact), rtol=1e-3)


def test_a_float64_fallback_that_does_not_fit_in_memory_is_refused_naming_the_setting(monkeypatch):
    patterns = _random_binary(3, 60, 0.3, seed=1).toarray()
    gram = ease_lib.gram_matrix(sp.csr_matrix(np.repeat(patterns, 3000, axis=0)))
    monkeypatch.setattr(ease_lib, "available_bytes", lambda device="cpu": 8 * 60 * 60 - 1)
    with pytest.raises(ease_lib.ConfigError, match=r"float64 solve needs .* GiB .*; raise model.ease.l2"):
        ease_lib.regularised_inverse(gram, 1e-4)


def test_well_conditioned_systems_stay_in_float32(caplog):
    x = _random_binary(300, 80, 0.1)
    gram = ease_lib.gram_matrix(x)
    np.testing.assert_array_equal(gram.numpy(), (x.T @ x).toarray())
    with caplog.at_level("WARNING"):
        inverse = ease_lib.regularised_inverse(gram.clone(), 5.0)
    assert "float64" not in caplog.text
    expected = np.linalg.inv((x.T @ x).toarray().astype(np.float64) + 5.0 * np.eye(80))
    np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-3, atol=1e-6)


def test_pruning_keeps_each_rows_largest_weights():
    b = torch.randn(5000, 40, generator=torch.Generator().manual_seed(2))  # more rows than one block
    pruned = ease_lib.prune_rows(b, 7)
    assert (np.diff(pruned.indptr) == 7).all() and pruned.has_sorted_indices  # canonical CSR, as the bundle stores it
    dense = b.numpy()
    for i in (0, 1234, 4095, 4096, 4999):
        expected = np.sort(np.argsort(-np.abs(dense[i]))[:7])
        row = pruned[i]
        assert np.array_equal(np.sort(row.indices), expected)
        np.testing.assert_array_equal(row.toarray()[0, expected], dense[i, expected])
    everything = ease_lib.prune_rows(b, 40)
    np.testing.assert_array_equal(everything.toarray(), dense)


def test_pruning_reads_a_bounded_number_of_bytes_at_a_time_with_the_same_result(monkeypatch):
    """The rows of B are pruned in blocks of a fixed size in bytes, not of 4,096 rows: at 50,000 items
    a block of 4,096 rows and its absolute values took 0.8 GiB each at the 50M run's largest moment."""
    b = torch.randn(1000, 40, generator=torch.Generator().manual_seed(3))
    whole = ease_lib.prune_rows(b, 7)
    seen, topk = [], torch.topk

    def counted(x, *args, **kwargs):
        seen.append(x.shape[0] * x.shape[1] * 4)
        return topk(x, *args, **kwargs)

    monkeypatch.setattr(ease_lib, "PRUNE_BLOCK_BYTES", 4 * 40 * 333)  # 333 rows a block
    monkeypatch.setattr(torch, "topk", counted)
    blocked = ease_lib.prune_rows(b, 7)
    assert len(seen) == 4 and max(seen) <= 4 * 40 * 333
    assert (blocked != whole).nnz == 0 and np.array_equal(blocked.indices, whole.indices)


def test_the_ease_weights_are_laid_out_by_rows(caplog):
    """Scoring gathers rows of B: a column-major B (LAPACK's layout) gives the same numbers ~100x slower."""
    x = _random_binary(300, 80, 0.1)
    gram = ease_lib.gram_matrix(x)
    factor = torch.linalg.cholesky(gram + 5.0 * torch.eye(80))
    inverse = ease_lib.cholesky_inverse(factor)
    assert inverse.is_contiguous() and torch.equal(inverse, torch.cholesky_inverse(factor))
    assert ease_lib.regularised_inverse(gram.clone(), 5.0).is_contiguous()
    patterns = _random_binary(3, 60, 0.3, seed=1).toarray()  # the float64 fallback too
    with caplog.at_level("WARNING"):
        assert ease_lib.regularised_inverse(ease_lib.gram_matrix(sp.csr_matrix(np.repeat(patterns, 3000, axis=0))),
                                            1e-4).is_contiguous()
    assert "float64" in caplog.text
    assert ease_lib.ease_weights(x, 5.0).is_contiguous()
    assert ease_lib.EASESolver(x, torch.device("cpu")).dense(5.0).is_contiguous()


@pytest.mark.parametrize("n_users,n_items", [(300, 80), (40, 200)])  # primal and dual forms
def test_every_scoring_path_gives_the_same_ease_scores(n_users, n_items):
    x = _random_binary(n_users, n_items, 0.08, seed=3)
    solver = ease_lib.EASESolver(x)
    dense = ease_lib.ease_weights(x, 9.0).numpy()
    users = np.arange(0, n_users, 7)
    expected = x[users] @ dense
    np.testing.assert_allclose(solver.scores(users, 9.0).numpy(), expected, rtol=1e-4, atol=1e-4)
    served = solver.served(9.0, n_items)  # nothing pruned
    np.testing.assert_allclose(served(x[users]).numpy(), expected, rtol=1e-4, atol=1e-4)
    served.to("cpu")  # the device copy: one sparse x dense product
    np.testing.assert_allclose(served(x[users]).numpy(), expected, rtol=1e-4, atol=1e-4)
    baseline = EASEScorer(x, 9.0, device="cpu", precise=False)
    np.testing.assert_allclose(baseline({"user": torch.as_tensor(users)}).numpy(), expected, rtol=1e-4, atol=1e-4)
    precise = EASEScorer(x, 9.0, device="cpu", precise=True)
    np.testing.assert_allclose(precise({"user": torch.as_tensor(users)}).numpy(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_cpu_give_the_same_ease_weights():
    x = _random_binary(500, 120, 0.05, seed=5)
    wide = _random_binary(40, 120, 0.05, seed=6)  # the dual form
    for data, dropout in ((x, 0.0), (x, 0.5), (wide, 0.0), (wide, 0.5)):  # EASE and EDLAE
        cpu = ease_lib.ease_weights(data, 7.0, "cpu", dropout=dropout).numpy()
        gpu = ease_lib.ease_weights(data, 7.0, "cuda", dropout=dropout).cpu().numpy()
        np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4)
    assert ease_lib.model_device("auto").type == "cuda" and ease_lib.model_device("cpu").type == "cpu"


@pytest.mark.slow
def test_a_larger_log_trains_past_its_first_epoch_and_stays_well_above_popularity(tmp_path):
    """20,000 users x 4,000 items x 600,000 events: the KL weight reaches its value within
    ``anneal_max_steps``, so validation improves after the first epoch (with the weight rising over
    ten of these long epochs it peaked after the first and fell), and the model is far above popularity."""
    from .conftest import QUIET_TRAINER, compose_cfg

    cfg = compose_cfg([*QUIET_TRAINER, "data.source.n_users=20000", "data.source.n_items=4000",
                       "data.source.n_events=600000", "model=vae", "model.time_budget_s=null", "model.vae.max_epochs=4",
                       "model.vae.patience=4", "model.refit=false", "propensity.enabled=false", "audience.enabled=false",
                       "export=false", "evaluation.report=null", "logger=none"], tmp_path)
    result = run(cfg)
    record, ranking = result["metrics"]["model"], result["metrics"]["ranking"]
    assert record["candidates"]["vae"]["details"]["best_epoch"] >= 1
    assert ranking["vae"]["ndcg@20"] > 1.5 * ranking["popularity"]["ndcg@20"]


def test_tensor_cores_only_while_the_autoencoder_trains_in_mixed_precision_on_cuda():
    """TF32 products (``high``) for the bf16-mixed autoencoder fit on CUDA alone; full float32 for
    the CPU and for a float32 trainer, and the previous setting restored after the fit."""
    from dmp_dl.training.selection import matmul_precision

    before = torch.get_float32_matmul_precision()
    cases = [("cuda", "bf16-mixed", "high"), ("cuda", "16-mixed", "high"), ("cuda", "32-true", "highest"),
             ("cpu", "bf16-mixed", "highest")]
    for device, precision, expected in cases:
        with matmul_precision(torch.device(device), precision):
            assert torch.get_float32_matmul_precision() == expected, (device, precision)
        assert torch.get_float32_matmul_precision() == before


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or not memory._libc_function("mallopt"),
                    reason="reads Linux's /proc and glibc's allocator")
def test_freed_blocks_are_kept_for_reuse_inside_the_model_stages_and_handed_back_after():
    """A 64 MiB block freed inside :func:`reuse_freed_blocks` stays resident for the next block
    (the training steps' and scoring batches' blocks are not paged in afresh); outside, the old rule
    is back: the same block is handed back to the OS when it is freed."""
    size = 64 * 2**20

    def resident_after_free() -> int:
        block = np.ones(size, dtype=np.uint8)  # written, so paged in
        before = _resident_bytes()
        del block
        return before - _resident_bytes()

    with memory.reuse_freed_blocks() as kept:
        assert kept is True
        assert resident_after_free() < size // 4  # still resident
    assert resident_after_free() > size // 2  # unmapped at once, as glibc does by default


def test_a_stage_frees_on_its_way_out_what_only_reference_cycles_kept():
    """Arrays reachable only through reference cycles (a stage's trainers, modules and closures) are
    freed when the stage ends, not whenever Python's full collection happens to run (after the model
    stage of a 5M-event log they held 0.47 GiB)."""
    import gc
    import weakref

    class Holder:
        pass

    was_enabled = gc.isenabled()
    gc.disable()  # only the stage's own collection may free the cycle
    try:
        with memory.reuse_freed_blocks():
            holder = Holder()
            holder.me, holder.block = holder, np.ones(1 << 20)
            alive = weakref.ref(holder.block)
            del holder
            assert alive() is not None
        assert alive() is None
    finally:
        if was_enabled:
            gc.enable()


def test_every_stage_after_the_data_stage_reuses_freed_blocks():
    """The data stage hands its memory back step by step (its peak is what limits the log size);
    the stages after it keep freed blocks for reuse."""
    from dmp_dl.pipeline.run import STAGES

    wrapped = {s.name: hasattr(s.fn, "__wrapped__") for s in STAGES}
    assert wrapped.pop("data") is False
    assert all(wrapped.values()), wrapped
