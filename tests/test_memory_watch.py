"""A run short of memory says so in its log before the system may stop it: one warning per shortage,
naming the stage, again only after memory came back, never more than a few; a run with room is silent."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from dmp_dl.core import memory_watch
from dmp_dl.core.memory_watch import MemoryWatch, warn_below
from dmp_dl.pipeline.run import run

from .conftest import QUIET_TRAINER, TINY_DATA, compose_cfg

REPO = Path(__file__).resolve().parents[1]

MIB, GIB = 2**20, 2**30


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dmp_dl.core.memory_watch"]


def test_one_warning_per_shortage_naming_the_stage(caplog):
    free = iter([8 * GIB, 100 * MIB, 90 * MIB, 80 * MIB, 8 * GIB, 50 * MIB])
    watch = MemoryWatch(available=lambda: next(free), held=lambda: 2 * GIB)
    watch.stage = "model"
    with caplog.at_level(logging.WARNING, logger="dmp_dl.core.memory_watch"):
        looks = [watch.check() for _ in range(6)]
    assert looks == [False, True, False, False, False, True]  # the shortage once; again after memory came back
    lines = _warnings(caplog)
    assert len(lines) == 2 and "during the model stage" in lines[0] and "100 MiB is left" in lines[0]
    assert "holds 2.0 GiB" in lines[0] and "data.cleaning.min_timestamp" in lines[0]


def test_a_server_is_named_with_its_own_advice(caplog):
    watch = MemoryWatch(available=lambda: 10 * MIB, held=lambda: GIB, subject="server", advice=memory_watch.SERVER_ADVICE)
    with caplog.at_level(logging.WARNING, logger="dmp_dl.core.memory_watch"):
        assert watch.check()
    line = _warnings(caplog)[0]
    assert "stops the server here, give it more memory" in line and "during" not in line


def test_serve_runs_uvicorn_under_the_watch(monkeypatch, trained, tmp_path):
    import uvicorn
    from omegaconf import OmegaConf

    from dmp_dl.api.server import serve

    watched = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: watched.append(
        [t.name for t in threading.enumerate() if t.name == "dmp_dl-memory-watch"]))
    cfg = OmegaConf.load(REPO / "conf" / "serve.yaml")
    cfg.artifacts = str(trained["bundle_dir"])
    cfg.journal = str(tmp_path / "journal")
    serve(cfg)
    assert watched == [["dmp_dl-memory-watch"]]
    assert "dmp_dl-memory-watch" not in [t.name for t in threading.enumerate()]  # it ends with the server


def test_a_run_short_of_memory_for_long_warns_a_few_times_at_most(caplog):
    free = iter([50 * MIB, 8 * GIB] * 10)
    watch = MemoryWatch(available=lambda: next(free), held=lambda: GIB)
    with caplog.at_level(logging.WARNING, logger="dmp_dl.core.memory_watch"):
        warned = sum(watch.check() for _ in range(20))
    assert warned == memory_watch.MAX_WARNINGS == len(_warnings(caplog))


@pytest.mark.parametrize("held, free, expected", [
    (GIB, GIB, memory_watch.MIN_WARN_BYTES),  # a small container: a floor
    (20 * GIB, 40 * GIB, memory_watch.MAX_WARN_BYTES),  # a large machine: a cap
    (3 * GIB, 2 * GIB, int(0.5 * GIB)),  # in between: a tenth of what the process can reach
])
def test_the_threshold_follows_what_the_process_can_reach(held, free, expected):
    assert warn_below(held, free) == expected


def test_the_watch_runs_beside_the_block_and_stops_with_it():
    looked = threading.Event()

    def available():
        looked.set()
        return 64 * GIB

    with MemoryWatch(available=available, interval=0.01) as watch:
        assert looked.wait(5)
        thread = watch._thread
        assert thread.daemon and thread.is_alive()
    assert not thread.is_alive()


def test_a_run_warns_in_its_log_when_memory_runs_short_and_not_otherwise(tmp_path, monkeypatch, caplog):
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "logger=none", "model.vae.max_epochs=1",
                       "propensity.enabled=false"], tmp_path / "roomy")
    with caplog.at_level(logging.WARNING, logger="dmp_dl.core.memory_watch"):
        state = run(cfg)
    assert _warnings(caplog) == []
    # each stage that ran says how much memory the process held at most during it, in metrics.json too
    stages = json.loads((tmp_path / "roomy" / "metrics.json").read_text())["stages"]
    ran = {name: s["peak_rss_gib"] for name, s in stages.items() if s["status"] == "ok"}
    assert {"data", "model", "export"} <= set(ran) and all(0.05 < gib < 64 for gib in ran.values()), ran
    assert ran["model"] >= ran["data"] * 0.5 and state["stages"]["model"].peak_rss_gib == ran["model"]
    assert "peak memory GiB" in (tmp_path / "roomy" / "report.html").read_text()
    monkeypatch.setattr(memory_watch, "MIN_WARN_BYTES", 1 << 62)  # every look finds memory short
    monkeypatch.setattr(memory_watch, "MAX_WARN_BYTES", 1 << 62)
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "logger=none", "model.vae.max_epochs=1",
                       "propensity.enabled=false"], tmp_path / "short")
    with caplog.at_level(logging.WARNING, logger="dmp_dl.core.memory_watch"):
        run(cfg)
    lines = _warnings(caplog)
    assert len(lines) == 1 and "during the data stage" in lines[0], lines  # the first look, before any stage's work
