"""Config composition, the training pipeline end to end, learning, resume, shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from dmp_dl.models.embeddings import export_embeddings
from dmp_dl.pipeline.run import load_data, run
from dmp_dl.training.fit import build_module, build_trainer

from .conftest import compose_cfg


@pytest.mark.parametrize("data", ["synthetic", "movielens", "events"])
@pytest.mark.parametrize("model", ["two_tower", "mf"])
def test_config_groups_compose(tmp_path, data, model):
    extra = [] if data == "synthetic" else ["data.path=somewhere"]
    cfg = compose_cfg([f"data={data}", f"model={model}", *extra], tmp_path)
    assert cfg.model.net.dim == cfg.model.dim
    dm = instantiate(cfg.data, _convert_="all")  # builds the source without reading anything
    assert dm.batch_size == cfg.data.batch_size


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp"])
@pytest.mark.parametrize("logger", ["csv", "none"])
def test_trainer_and_logger_groups(tmp_path, trainer, logger):
    cfg = compose_cfg(["model=two_tower", f"trainer={trainer}", f"logger={logger}"], tmp_path)  # the Lightning loop's models
    if trainer == "gpu":
        assert cfg.trainer.precision == "bf16-mixed"
        if not torch.cuda.is_available():
            return  # composes; instantiating needs a GPU
    if trainer == "ddp":
        cfg.trainer.accelerator, cfg.trainer.devices = "cpu", 2
    t = build_trainer(cfg, has_validation=True)
    assert t.max_epochs == cfg.trainer.max_epochs == 10
    assert (t.logger is not None) == (logger == "csv")


def test_experiment_composes(tmp_path):
    cfg = compose_cfg(["experiment=ml100k"], tmp_path)
    assert cfg.data.name == "movielens" and cfg.data.cleaning.min_value == 4


@pytest.mark.parametrize("model", ["two_tower", "mf"])
def test_fast_dev_run_end_to_end(tiny_cfg, model):
    cfg = tiny_cfg(f"model={model}", "debug=fdr")
    result = run(cfg)
    out = cfg.paths.output_dir
    quality = json.loads(open(f"{out}/data_quality.json").read())
    assert quality["events"]["rows_out"] == 12000
    metrics = json.loads(open(f"{out}/metrics.json").read())
    assert set(metrics["ranking"]) == {model, "popularity", "ease"}
    assert 0.0 <= metrics["ranking"][model]["recall@20"] <= 1.0
    assert result["trainer"].fast_dev_run


def test_loss_decreases_on_planted_data(tiny_cfg):
    cfg = tiny_cfg("model=two_tower")
    torch.manual_seed(0)
    dm = load_data(cfg)
    module = build_module(cfg, dm)
    module.log = lambda *a, **k: None
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    losses = []
    for _ in range(4):
        epoch = []
        for batch in dm.train_dataloader():
            loss = module.training_step(batch, 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch.append(loss.item())
        losses.append(np.mean(epoch))
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("model, margin", [("two_tower", 1.5), ("mf", 1.3)])
def test_beats_popularity_on_synthetic(tiny_cfg, model, margin):
    cfg = tiny_cfg(f"model={model}", "trainer.max_epochs=8", "logger=none")
    metrics = run(cfg)["metrics"]["ranking"]
    ours, pop = metrics[model]["recall@20"], metrics["popularity"]["recall@20"]
    assert ours > margin * pop, (ours, pop)


def test_resume_from_last_checkpoint(tiny_cfg):
    first = run(tiny_cfg("model=two_tower", "trainer.max_epochs=2", "callbacks.early_stopping.patience=100"))
    steps = first["trainer"].global_step
    assert steps > 0
    resumed = run(tiny_cfg("model=two_tower", "trainer.max_epochs=3", "ckpt_path=last", "callbacks.early_stopping.patience=100"))
    t = resumed["trainer"]
    assert t.current_epoch == 3
    assert t.global_step == steps * 3 // 2  # continued from step `steps`, did one more epoch


def test_embedding_shapes_and_cold_start(tiny_cfg):
    cfg = tiny_cfg("model=two_tower")
    dm = load_data(cfg)
    module = build_module(cfg, dm)
    users, items = export_embeddings(module.net, dm.full_history, torch.device("cpu"))
    assert users.shape == (dm.n_users, cfg.model.dim) and items.shape == (dm.n_items, cfg.model.dim)
    assert users.dtype == items.dtype == np.float32 and users.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-5)  # normalised towers
    cold = module.net.cold_user_vectors(torch.as_tensor(dm.full_history[:3]))
    assert cold.shape == (3, cfg.model.dim)


def test_bad_option_inside_a_built_object_is_one_line(tiny_cfg, capsys):
    """A DmpError raised while Hydra builds a `_target_` reaches the user as one line, exit 2."""
    from dmp_dl.core.cli import report_errors

    cfg = tiny_cfg("data.split.method=by_moon_phase")
    with pytest.raises(SystemExit) as exit_info, report_errors():
        run(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "by_moon_phase" in err and err.count("\n") == 1


def test_two_tower_final_fit_trains_the_items_seen_only_in_the_held_out_period(tiny_cfg):
    """model.refit (default): the exported network is trained on every event, so items whose every
    event is in the held-out period get trained rows; without it they keep their initialisation."""
    def exported(refit: bool):
        result = run(tiny_cfg("model=two_tower", "trainer.max_epochs=2", "data.split.method=global_temporal",
                              "data.split.test_frac=0.3", "propensity.enabled=false", "audience.enabled=false",
                              "evaluation.report=null", f"model.refit={str(refit).lower()}", "logger=none"))
        return result, result["module"].net.item_id.weight.detach().clone()

    refitted, trained_rows = exported(True)
    held_out_only = np.flatnonzero(refitted["datamodule"].item_counts == 0)
    assert len(held_out_only) > 0, "the split left every item in training: this test cannot tell"
    record = refitted["metrics"]["train"]["refit"]
    assert record["done"] and record["train_events"] == len(refitted["datamodule"].events)
    assert refitted["metrics"]["ranking"]["two_tower"]["recall@20"] > 0  # reported from the held-out fit
    _, untouched_rows = exported(False)
    assert not torch.equal(trained_rows[held_out_only], untouched_rows[held_out_only])
