"""The user-level autoencoder, EASE and their blend: planted structure, cold start, served scores,
the memory guard, and the automatic choice."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from dmp_dl import Recommender
from dmp_dl.core.errors import ConfigError
from dmp_dl.models import ease as ease_lib
from dmp_dl.models.autoencoder import UserAutoencoder
from dmp_dl.models.scoring import ServedScore
from dmp_dl.pipeline.run import run

from .conftest import QUIET_TRAINER, compose_cfg

N_GROUPS, USERS_PER_GROUP, ITEMS_PER_GROUP = 4, 40, 15


@pytest.fixture(scope="module")
def planted_log(tmp_path_factory) -> str:
    """Users of group g interact only with items of group g (a popular half and a long tail)."""
    rng = np.random.default_rng(0)
    rows = []
    t0 = 1_700_000_000
    for g in range(N_GROUPS):
        items = [f"g{g}_i{j:02d}" for j in range(ITEMS_PER_GROUP)]
        p = np.r_[np.full(ITEMS_PER_GROUP // 2, 3.0), np.ones(ITEMS_PER_GROUP - ITEMS_PER_GROUP // 2)]
        for u in range(USERS_PER_GROUP):
            chosen = rng.choice(items, size=8, replace=False, p=p / p.sum())
            for n, it in enumerate(chosen):
                rows.append((f"g{g}_u{u:02d}", it, t0 + 3600 * (u * 10 + n)))
    path = tmp_path_factory.mktemp("planted") / "events.csv"
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(path, index=False)
    return str(path)


def planted_cfg(path: str, out, *overrides: str):
    return compose_cfg([*QUIET_TRAINER, "data=events", f"data.path={path}", "data.split.method=random_per_user",
                        "data.split.val_frac=0.15", "data.split.test_frac=0.15", "logger=none",
                        "propensity.enabled=false", "audience.enabled=false", "evaluation.report=null",
                        "model.vae.max_epochs=40", "model.vae.patience=10", "model.dim=16", "model.vae.net.hidden=64",
                        "model.time_budget_s=null", *overrides], out)


def in_group_share(ranked: list[tuple[str, float]], group: int) -> float:
    return float(np.mean([item.startswith(f"g{group}_") for item, _ in ranked]))


@pytest.mark.parametrize("model", ["vae", "ease", "auto"])
def test_planted_groups_are_recovered_and_served(planted_log, tmp_path, model):
    result = run(planted_cfg(planted_log, tmp_path / "run", f"model={model}"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["model"]["selected"] in ({"vae"} if model == "vae" else {"ease"} if model == "ease" else
                                            {"vae", "ease", "vae+ease"})
    # far above popularity on held-out items, which the planted groups make easy to find
    assert metrics["ranking"][model]["recall@20"] > 1.5 * metrics["ranking"]["popularity"]["recall@20"]
    rec = Recommender.load(result["bundle_dir"])
    for g in range(N_GROUPS):
        user = f"g{g}_u03"
        assert in_group_share(rec.recommend(user, k=5), g) == 1.0, (model, g)
        # cold start: a new user with three items of group g
        history = [f"g{g}_i{j:02d}" for j in (0, 5, 9)]
        assert in_group_share(rec.recommend_for_history(history, k=5), g) == 1.0, (model, g)


def test_served_score_is_the_models_score(planted_log, tmp_path):
    """What Recommender returns is the score the model selection evaluated: vector dot product plus
    the weighted item-item term (of the user's decayed row when the run chose a recency half-life,
    else of their 0/1 items), over the whole catalogue, seen items excluded."""
    result = run(planted_cfg(planted_log, tmp_path / "run", "model=auto", "model.candidates=[vae,ease]"))
    rec = Recommender.load(result["bundle_dir"])
    choice = result["choice"]
    dm = result["datamodule"]
    user = "g2_u07"
    row = dm.user_vocab.index_of([user])[0]
    seen = dm.all_seen[row]
    users = rec.user_vectors[[row]]
    x = dm.interaction_rows("all")[row] if choice.served.reads_rows else seen
    expected = choice.served.scores(users, rec.item_vectors, x).numpy()[0]
    expected[seen.indices] = -np.inf
    top = np.argsort(-expected, kind="stable")[:10]
    got = rec.recommend(user, k=10)
    assert [i for i, _ in got] == list(dm.item_vocab.ids[top])
    np.testing.assert_allclose([s for _, s in got], expected[top], rtol=1e-4, atol=1e-4)


def test_blend_with_only_the_dot_product_uses_the_index(tmp_path):
    served = ServedScore(1.0, 0.0, None)
    assert not served.uses_shallow and served.describe() == "embedding dot product"


def test_ease_weights_primal_and_dual_agree():
    rng = np.random.default_rng(1)
    tall = sp.csr_matrix((rng.random((60, 25)) < 0.2).astype(np.float32))  # more users than items: primal
    wide = sp.csr_matrix((rng.random((20, 45)) < 0.2).astype(np.float32))  # more items than users: dual
    for x in (tall, wide):
        b = ease_lib.ease_weights(x, 7.0).numpy()
        g = (x.T @ x).toarray().astype(np.float64) + 7.0 * np.eye(x.shape[1])
        p = np.linalg.inv(g)
        ref = -p / np.diag(p)
        np.fill_diagonal(ref, 0.0)
        np.testing.assert_allclose(b, ref, atol=2e-4)
        assert np.all(np.diag(b) == 0.0)


def test_ease_memory_guard_refuses_before_allocating(planted_log, tmp_path):
    assert ease_lib.check_memory(1000, 100_000, max_memory_gb=4) is not None  # 100k items: 75 GiB
    assert ease_lib.check_memory(1000, 1_000, max_memory_gb=4) is None
    with pytest.raises(ConfigError, match="max_memory_gb"):
        run(planted_cfg(planted_log, tmp_path / "a", "model=ease", "model.ease.max_memory_gb=0.000001"))
    # the automatic choice skips the candidate, says why, and serves the autoencoder
    result = run(planted_cfg(planted_log, tmp_path / "b", "model=auto", "model.ease.max_memory_gb=0.000001"))
    record = result["metrics"]["model"]
    assert record["selected"] == "vae"
    assert record["candidates"]["ease"]["status"] == "skipped" and "max_memory_gb" in record["candidates"]["ease"]["reason"]


def test_sampled_softmax_for_large_catalogues_learns(planted_log, tmp_path):
    result = run(planted_cfg(planted_log, tmp_path / "run", "model=vae",
                             "model.vae.module.full_softmax_max_items=10", "model.vae.module.num_negatives=20"))
    rec = Recommender.load(result["bundle_dir"])
    shares = [in_group_share(rec.recommend(f"g{g}_u01", k=5), g) for g in range(N_GROUPS)]
    assert np.mean(shares) >= 0.9, shares


def test_autoencoder_vocab_axes_and_cold_start_shapes():
    net = UserAutoencoder(n_users=5, n_items=7, dim=3, hidden=8)
    state = net.state_dict()
    for key, axes in net.vocab_axes().items():
        assert key in state and len(axes) <= state[key].ndim
        # the vocabulary plus the padding item / unknown user row
        assert state[key].shape[0] == {"item": 7, "user": 5}[axes[0]] + 1
    history = torch.tensor([[1, 2, 7, 7], [7, 7, 7, 3]])
    net.eval()
    assert net.cold_user_vectors(history).shape == (2, 4)
    # the same items in another order and with repeats give the same vector (a set, not a sequence)
    again = net.cold_user_vectors(torch.tensor([[2, 1, 1, 7], [3, 7, 7, 7]]))
    torch.testing.assert_close(net.cold_user_vectors(history), again)
    # a known user's vector is the cold-start vector of their row
    net.attach_rows(sp.csr_matrix(np.array([[0, 1, 1, 0, 0, 0, 0]] * 5, dtype=np.float32)))
    torch.testing.assert_close(net.user_vectors(torch.tensor([0]))[0], net.cold_user_vectors(history)[0])


def test_the_refit_learns_items_seen_only_in_the_held_out_period(planted_log, tmp_path):
    """A new item of group 0 that appears only at the end of the log (the test period of a temporal
    split): the refitted bundle recommends it to group 0; without the final fit it cannot know it."""
    events = pd.read_csv(planted_log)
    late = events["timestamp"].max() + 86_400
    fans = [f"g0_u{u:02d}" for u in range(0, USERS_PER_GROUP, 2)]
    extra = pd.DataFrame({"user_id": fans, "item_id": "g0_new", "timestamp": late + np.arange(len(fans))})
    path = tmp_path / "events.csv"
    pd.concat([events, extra]).to_csv(path, index=False)

    def top_share(*overrides: str) -> float:
        cfg = planted_cfg(str(path), tmp_path / "-".join(overrides), "model=vae", "data.split.method=global_temporal",
                          "data.split.val_frac=0.1", "data.split.test_frac=0.05", *overrides)
        rec = Recommender.load(run(cfg)["bundle_dir"])
        others = [f"g0_u{u:02d}" for u in range(1, USERS_PER_GROUP, 2)]  # never had it
        return float(np.mean(["g0_new" in [i for i, _ in rec.recommend(u, k=5)] for u in others]))

    assert top_share("model.refit=true") >= 0.8
    assert top_share("model.refit=false") <= 0.2


def test_on_a_large_log_the_refit_continues_the_held_out_fit(planted_log, tmp_path):
    """Above model.vae.refit_continue_above_events (here 0) the refit continues the held-out fit for
    refit_continue_epochs over every event, the rows of items without a training event started
    afresh: it still learns an item seen only in the test period (measured: 7th for each of these
    users after 10 continued epochs; in none of their top 5 when the item's rows were continued as
    the held-out fit left them, pushed down as a negative; a refit from scratch puts it 0th-4th)."""
    events = pd.read_csv(planted_log)
    late = events["timestamp"].max() + 86_400
    fans = [f"g0_u{u:02d}" for u in range(0, USERS_PER_GROUP, 2)]
    extra = pd.DataFrame({"user_id": fans, "item_id": "g0_new", "timestamp": late + np.arange(len(fans))})
    path = tmp_path / "events.csv"
    pd.concat([events, extra]).to_csv(path, index=False)
    cfg = planted_cfg(str(path), tmp_path / "run", "model=vae", "data.split.method=global_temporal",
                      "data.split.val_frac=0.1", "data.split.test_frac=0.05", "model.vae.refit_continue_above_events=0",
                      "model.vae.refit_continue_epochs=10")
    result = run(cfg)
    facts = result["metrics"]["model"]["refit_facts"]
    assert facts["vae_refit"].startswith("continued from the fit on the training period for 10 epoch(s)")
    assert facts["vae_epochs_run"] == 10
    rec = Recommender.load(result["bundle_dir"])
    others = [f"g0_u{u:02d}" for u in range(1, USERS_PER_GROUP, 2)]
    assert facts["vae_continued"]["items_reinitialised"] >= 1  # g0_new at least
    assert np.mean(["g0_new" in [i for i, _ in rec.recommend(u, k=10)] for u in others]) >= 0.8


def test_on_the_cpu_a_wide_catalogue_serves_the_training_period_ease(planted_log, tmp_path):
    """model.ease.refit=auto: above short_grid_above_items (here 10 items) on the CPU the refit fits
    EASE no second time and says so; the served weights are the candidate's."""
    result = run(planted_cfg(planted_log, tmp_path / "run", "model=ease", "model.ease.short_grid_above_items=10"))
    record = result["metrics"]["model"]
    assert record["selected"] == "ease" and record["refit"] is True
    assert record["refit_facts"]["ease_refit"].startswith("the weights fitted on the training period are served")
    assert "ease_seconds" not in record["refit_facts"]
    rec = Recommender.load(result["bundle_dir"])
    assert in_group_share(rec.recommend("g2_u03", k=5), 2) == 1.0
    again = run(planted_cfg(planted_log, tmp_path / "again", "model=ease", "model.ease.short_grid_above_items=10",
                            "model.ease.refit=true"))
    assert again["metrics"]["model"]["refit_facts"]["ease_refit"].startswith("fitted again on every event")
    assert again["metrics"]["model"]["refit_facts"]["ease_seconds"] > 0


def test_early_stopping_on_a_large_log_counts_only_gains_of_one_per_cent():
    """The validation curve of the 100,000-user x 3M-event log: with a 1 % gain required and a
    patience of 2 the fit stops after the 5th epoch; with any gain counting it would go on."""
    from dmp_dl.training.selection import GainEarlyStopping

    curve = [0.028249, 0.029276, 0.029624, 0.029629, 0.029749, 0.029710, 0.029879, 0.02990, 0.02992]

    def epochs_run(gain: float) -> int:
        stop = GainEarlyStopping(gain, monitor="val", patience=2)
        for epoch, value in enumerate(curve):
            should, _ = stop._evaluate_stopping_criteria(torch.tensor(value))
            if should:
                return epoch + 1
        return len(curve)

    assert epochs_run(0.01) == 5
    assert epochs_run(0.0) == len(curve)


def test_the_scale_rules_of_the_model_stage():
    from omegaconf import OmegaConf

    from dmp_dl.training.selection import autoencoder_refit_plan, ease_refit_skipped, patience_for_data

    assert [patience_for_data(n) for n in (10_000, 1_000_000, 1_300_000, 2_700_000, 5_000_000, 50_000_000)] == [
        (5, 0.0), (5, 0.0), (4, 0.01), (2, 0.01), (1, 0.01), (1, 0.01)]
    cfg = OmegaConf.create({"model": {"vae": {"refit_continue_above_events": 1_000_000, "refit_continue_epochs": 2},
                                      "ease": {"refit": "auto", "short_grid_above_items": 8000}}})
    assert autoencoder_refit_plan(cfg, 900_000, 7)[:2] == (7, False)
    assert autoencoder_refit_plan(cfg, 2_000_000, 7)[:2] == (2, True)
    cfg.model.vae.refit_continue_above_events = None
    assert autoencoder_refit_plan(cfg, 50_000_000, 7)[:2] == (7, False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ease_refit_skipped(cfg, 20_000, "primal", cpu) is not None
    assert ease_refit_skipped(cfg, 20_000, "primal", cuda) is None
    assert ease_refit_skipped(cfg, 20_000, "dual", cpu) is None
    assert ease_refit_skipped(cfg, 8_000, "primal", cpu) is None
    cfg.model.ease.refit = True
    assert ease_refit_skipped(cfg, 20_000, "primal", cpu) is None
    cfg.model.ease.refit = False
    assert ease_refit_skipped(cfg, 100, "primal", cpu) is not None


def test_the_model_record_says_what_was_fitted_and_served(planted_log, tmp_path):
    result = run(planted_cfg(planted_log, tmp_path / "run", "model=auto"))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["model"]
    assert record["refit"] is True and record["refit_facts"]["seconds"] > 0
    for name in ("vae", "ease", "vae+ease"):
        c = record["candidates"][name]
        assert c["status"] == "ok" and 0 <= c["val"]["ndcg@20"] <= 1 and 0 <= c["test"]["ndcg@20"] <= 1
    best_val = max(record["candidates"][n]["val"]["ndcg@20"] for n in ("vae", "ease", "vae+ease"))
    assert record["candidates"][record["selected"]]["val"]["ndcg@20"] == best_val
    assert record["best_baseline"]["name"] in ("popularity", "ease")
    manifest = json.loads((result["bundle_dir"] / "manifest.json").read_text())
    assert manifest["scoring"]["model"] == record["selected"] and manifest["scoring"]["refit"] is True


@pytest.mark.parametrize("value", ["abc", -1, 0, "inf"])
def test_a_bad_time_budget_is_one_line(planted_log, tmp_path, value):
    with pytest.raises(ConfigError, match="model.time_budget_s"):
        run(planted_cfg(planted_log, tmp_path / "run", f"model.time_budget_s={value}"))


def test_without_validation_users_the_blend_is_served_and_refitted(planted_log, tmp_path):
    result = run(planted_cfg(planted_log, tmp_path / "run", "model=auto", "data.split.val_frac=0"))
    record = result["metrics"]["model"]
    assert record["selected"] == "vae+ease" and record["candidates"]["vae+ease"]["details"]["weight"] > 0
    assert record["refit"] is True and "test" in record["candidates"]["vae+ease"]
    rec = Recommender.load(result["bundle_dir"])
    assert in_group_share(rec.recommend("g1_u05", k=5), 1) == 1.0


def test_a_time_budget_given_as_a_number_caps_the_autoencoder(planted_log, tmp_path):
    """A number caps the stage as given: the fit stops within it, and the record says the cap fired."""
    result = run(planted_cfg(planted_log, tmp_path / "run", "model=auto", "model.time_budget_s=0.05",
                             "model.vae.patience=100"))
    record = result["metrics"]["model"]
    vae = record["candidates"]["vae"]["details"]
    assert record["budget"] == {"time_budget_s": 0.05, "clock": "cpu_seconds"}
    assert 0 < vae["time_budget_s"] <= 0.05 and vae["epochs_run"] < 40 and vae["time_budget_fired"] is True


def test_the_autoencoders_row_softmax_loss_and_its_gradients_equal_the_plain_autograd_expression():
    from dmp_dl.models.losses import row_softmax_nll

    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    row = torch.tensor([0, 0, 1, 3, 3, 3, 4])  # user 2 has no items
    items = torch.tensor([1, 8, 0, 2, 5, 7, 8])
    values = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0, 0.25, 3.0], dtype=torch.float64)
    want = -(values * torch.log_softmax(latent @ weight.T + bias, 1)[row, items]).sum()
    got = row_softmax_nll(latent, weight, bias, row, items, values)
    assert torch.allclose(got, want)
    expected = torch.autograd.grad(want, (latent, weight, bias))
    for g, e in zip(torch.autograd.grad(got, (latent, weight, bias)), expected):
        assert torch.allclose(g, e)


def test_the_cpu_bf16_rule_reads_the_cpu_flags_the_log_size_and_the_trainer_setting(tmp_path):
    from dmp_dl.training.cpu_precision import autoencoder_precision, cpu_has_bf16

    flags = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {}\n"
    (tmp_path / "with").write_text(flags.format("avx512_bf16 avx512_vnni"))
    (tmp_path / "without").write_text(flags.format("avx512_vnni"))
    assert cpu_has_bf16.__wrapped__(str(tmp_path / "with")) is True
    assert cpu_has_bf16.__wrapped__(str(tmp_path / "without")) is False
    assert cpu_has_bf16.__wrapped__(str(tmp_path / "missing")) is False
    assert autoencoder_precision("32-true", "cpu", 2_000_000, 1_000_000, True)[0] == "bf16-mixed"
    assert autoencoder_precision("32-true", "cpu", 2_000_000, 1_000_000, True)[1].startswith("autoencoder: bf16-mixed")
    for args in [("32-true", "cpu", 999_999, 1_000_000, True),  # a small log
                 ("32-true", "cpu", 2_000_000, 1_000_000, False),  # no bf16 units: emulated bf16 is slower
                 ("32-true", "cpu", 2_000_000, None, True),  # switched off
                 ("64-true", "cpu", 2_000_000, 1_000_000, True),  # the trainer's own choice stands
                 ("32-true", "cuda", 2_000_000, 1_000_000, True)]:  # GPUs: trainer.precision (trainer=gpu: bf16-mixed)
        assert autoencoder_precision(*args) == (args[0], None)


def test_a_large_log_on_a_cpu_with_bf16_units_trains_the_autoencoder_in_bf16_mixed(planted_log, tmp_path, monkeypatch):
    """Above model.vae.cpu_bf16_above_pairs (here 0) on a CPU with bf16 units (here said to have
    them: emulated bf16 gives the same numbers, only slower) the autoencoder's fits run bf16-mixed,
    say so in metrics.json, and the bundle still ranks each user's own group first."""
    from dmp_dl.training import selection

    monkeypatch.setattr(selection, "cpu_has_bf16", lambda: True)
    result = run(planted_cfg(planted_log, tmp_path / "run", "model=vae", "model.vae.cpu_bf16_above_pairs=0"))
    vae = result["metrics"]["model"]["candidates"]["vae"]["details"]
    assert vae["precision"] == "bf16-mixed"
    rec = Recommender.load(result["bundle_dir"])
    top = [i for i, _ in rec.recommend("g0_u01", k=5)]
    assert sum(i.startswith("g0_") for i in top) >= 4, top
