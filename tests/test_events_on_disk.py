"""The clean events leave memory while EASE's dense fit runs on the CPU, and come back unchanged:
the frame spill round trip, the data module's ``events_on_disk``, the fit that uses it, and EASE's
binary matrix taken without a copy when it already is one."""

from __future__ import annotations

import dataclasses
import logging
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from dmp_dl.data.datamodule import InteractionDataModule
from dmp_dl.data.frame_spill import spill_frame
from dmp_dl.data.synthetic import SyntheticSource
from dmp_dl.models import ease as ease_lib
from dmp_dl.training import selection

from .test_ease_l2_search import _fit_cfg


def _mixed_frame() -> pd.DataFrame:
    frame = pd.DataFrame({
        "user": pd.Categorical(["b", "a", "b", "c"], categories=["c", "b", "a"]),
        "when": np.array([5, 1, 3, 2], dtype=np.int64),
        "value": np.array([0.5, np.nan, 2.0, -1.0]),
        "weight": np.array([1, 2, 3, 4], dtype=np.float32),
        "part": np.array([0, 1, 2, 0], dtype=np.int8),
        "note": np.array(["x", None, "z", "w"], dtype=object),
        "text": pd.array(["p", "q", None, "s"], dtype="string"),
    }, index=pd.Index([10, 11, 12, 13], name="row"))
    frame.attrs["source"] = "events.csv"
    return frame


def test_a_spilled_frame_reads_back_equal_and_its_files_go(tmp_path):
    frame = _mixed_frame()
    spilled = spill_frame(frame, tmp_path)
    assert spilled.folder.parent == tmp_path
    on_disk = sorted(p.name for p in spilled.folder.iterdir())
    assert on_disk == ["0.npy", "1.npy", "2.npy", "3.npy", "4.npy"]  # the NumPy columns and the codes; not the text
    assert spilled.nbytes > 0
    back = spilled.load()
    pd.testing.assert_frame_equal(back, frame)
    assert list(back["user"].cat.categories) == ["c", "b", "a"] and back.attrs == {"source": "events.csv"}
    spilled.remove()
    spilled.remove()
    assert not spilled.folder.exists()


def test_a_truncated_column_file_is_refused(tmp_path):
    spilled = spill_frame(_mixed_frame(), tmp_path)
    np.save(spilled.folder / "1.npy", np.arange(3, dtype=np.int64))
    with pytest.raises(OSError, match=r"1\.npy: \(3,\) values, expected \(4,\)"):
        spilled.load()


def _prepared() -> InteractionDataModule:
    return InteractionDataModule(SyntheticSource(n_users=120, n_items=50, n_events=2000, seed=3), history_len=3).prepare()


def test_the_events_are_on_disk_inside_the_block_and_back_after(tmp_path):
    dm = _prepared()
    before = dm.events.copy()
    with dm.events_on_disk(str(tmp_path)):
        assert dm.log_.events is None  # the frame is not held in memory inside the block
        folders = list(tmp_path.iterdir())
        assert len(folders) == 1 and any(folders[0].iterdir())
    pd.testing.assert_frame_equal(dm.events, before)
    assert list(tmp_path.iterdir()) == []  # the temporary files are removed


def test_reading_the_events_inside_the_block_brings_them_back(tmp_path):
    dm = _prepared()
    before = dm.events.copy()
    with dm.events_on_disk(str(tmp_path)):
        pd.testing.assert_frame_equal(dm.events, before)
        assert dm.log_.events is not None and list(tmp_path.iterdir()) == []
    pd.testing.assert_frame_equal(dm.events, before)
    view = dm.everything_as_training()  # a view shares the log and its spill: either reads the events back
    with view.events_on_disk(str(tmp_path)):
        assert dm.log_.events is None
        pd.testing.assert_frame_equal(dm.events, before)
        assert len(view.events) == len(before) and list(tmp_path.iterdir()) == []
    with dm.events_on_disk(str(tmp_path)):
        assert len(view.events) == len(before)
    pd.testing.assert_frame_equal(dm.events, before)


def test_a_disk_that_refuses_leaves_the_events_in_memory(tmp_path, caplog):
    dm = _prepared()
    frame = dm.events
    with caplog.at_level(logging.WARNING), dm.events_on_disk(str(tmp_path / "missing")):
        assert dm.log_.events is frame
    assert dm.events is frame
    assert sum("stay in memory" in r.getMessage() for r in caplog.records) == 1


class _Holder:
    pass


def test_arrays_on_disk_are_memory_maps_inside_and_the_same_values_after(tmp_path):
    from dmp_dl.data.array_spill import arrays_on_disk

    rng = np.random.default_rng(0)
    owner = _Holder()
    owner.history = rng.integers(0, 50, size=(40, 5)).astype(np.int32)
    owner.same_history = owner.history  # two names, one array
    owner.pairs = sp.random(40, 30, density=0.2, format="csr", dtype=np.float32, random_state=1)
    owner.fitted = sp.random(40, 30, density=0.2, format="csr", dtype=np.float32, random_state=2)
    owner.replaced = np.arange(7)
    owner.empty, owner.text = np.zeros(0), "not an array"
    sharer = owner.pairs  # held elsewhere too: reads the map inside, its own values after
    expected = {"history": owner.history.copy(), "pairs": owner.pairs.toarray(), "fitted": owner.fitted.toarray()}
    fitted_data = owner.fitted.data
    # nothing but the owner holds these: on disk, their memory goes (the last one named too)
    originals = [weakref.ref(owner.history), weakref.ref(owner.replaced)]
    names = ["history", "same_history", "pairs", "fitted", "replaced", "empty", "text", "missing"]
    with arrays_on_disk(owner, names, tmp_path, keep=[owner.fitted]) as written:
        assert written == owner.history.nbytes + sum(getattr(sharer, p).nbytes for p in ("data", "indices", "indptr")) + 7 * 8
        assert isinstance(owner.history, np.memmap) and owner.same_history is owner.history
        assert all(isinstance(getattr(sharer, p), np.memmap) for p in ("data", "indices", "indptr"))
        assert not owner.history.flags.writeable
        assert [ref() for ref in originals] == [None, None]
        assert owner.fitted.data is fitted_data  # kept: left in memory
        np.testing.assert_array_equal(owner.history, expected["history"])
        np.testing.assert_allclose(sharer @ np.ones(30, dtype=np.float32), expected["pairs"].sum(axis=1), rtol=1e-6)
        owner.replaced = np.array([1, 2])  # a new value set inside the block stays
        assert len(list(tmp_path.iterdir())) == 1
    assert list(tmp_path.iterdir()) == []
    assert type(owner.history) is np.ndarray and owner.same_history is owner.history
    np.testing.assert_array_equal(owner.history, expected["history"])
    assert all(type(getattr(sharer, p)) is np.ndarray for p in ("data", "indices", "indptr"))
    np.testing.assert_array_equal(owner.pairs.toarray(), expected["pairs"])
    assert owner.replaced.tolist() == [1, 2] and owner.text == "not an array"
    with arrays_on_disk(owner, ["history"], tmp_path / "missing") as written:  # a disk that refuses
        assert written == 0 and type(owner.history) is np.ndarray


def test_arrays_left_on_disk_stay_maps_readable_after_their_folder_is_gone(tmp_path):
    from dmp_dl.data.array_spill import arrays_on_disk

    owner = _Holder()
    owner.history = np.arange(60, dtype=np.int32).reshape(12, 5)
    owner.pairs = sp.random(12, 9, density=0.3, format="csr", dtype=np.float32, random_state=3)
    expected = (owner.history.copy(), owner.pairs.toarray())
    with arrays_on_disk(owner, ["history", "pairs"], tmp_path, read_back=False) as written:
        assert written > 0 and len(list(tmp_path.iterdir())) == 1
    assert list(tmp_path.iterdir()) == []  # the folder goes; the maps outlive it
    assert isinstance(owner.history, np.memmap) and isinstance(owner.pairs.indices, np.memmap)
    np.testing.assert_array_equal(owner.history, expected[0])
    np.testing.assert_array_equal(owner.pairs.toarray(), expected[1])
    small = owner.history.nbytes + sum(getattr(owner.pairs, p).nbytes for p in ("data", "indices", "indptr"))
    owner.history, owner.pairs = expected[0].copy(), sp.csr_matrix(expected[1])
    with arrays_on_disk(owner, ["history", "pairs"], tmp_path, min_bytes=small + 1) as written:  # too small to bother
        assert written == 0 and type(owner.history) is np.ndarray and list(tmp_path.iterdir()) == []


def test_after_evaluation_a_large_runs_model_inputs_are_maps_and_the_run_ends_clean(monkeypatch, tmp_path, caplog):
    """The stages after evaluation run with what only the model and evaluation read on disk; a later
    stage that reads them still gets their values, and no folder is left."""
    from dmp_dl.data import datamodule
    from dmp_dl.pipeline import run as run_module

    from .conftest import QUIET_TRAINER, TINY_DATA, compose_cfg

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setattr(datamodule, "MODEL_INPUTS_ASIDE_BYTES", 0)  # this small run counts as large
    seen_in_propensity = []

    def spy(stage_fn):
        def fn(cfg, state):
            dm = state["datamodule"]
            seen_in_propensity.append({n: type(v.indices if sp.issparse(v) else v)
                                       for n, v in ((n, getattr(dm, n)) for n in datamodule.READ_BY_MODEL_AND_EVALUATION)})
            return stage_fn(cfg, state)
        return fn

    monkeypatch.setattr(run_module, "STAGES", tuple(dataclasses.replace(s, fn=spy(s.fn)) if s.name == "propensity"
                                                    else s for s in run_module.STAGES))
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "logger=none", "model.vae.max_epochs=1"], tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="dmp_dl.data.array_spill"):
        state = run_module.run(cfg)
    assert set(seen_in_propensity[0].values()) == {np.memmap}, seen_in_propensity
    assert "for the rest of the run" in caplog.text
    assert state["stages"]["export"].status == "ok" and list((tmp_path / "tmp").iterdir()) == []
    dm, fresh = state["datamodule"], run_module.load_data(cfg)  # the same data prepared again, in memory
    for name in datamodule.READ_BY_MODEL_AND_EVALUATION:
        now, then = getattr(dm, name), getattr(fresh, name)
        assert (now != then).nnz == 0 if sp.issparse(then) else np.array_equal(now, then), name


@pytest.mark.parametrize("aside_bytes, expect_on_disk", [(0, True), (1 << 40, False)])
def test_a_large_cpu_ease_fit_runs_with_the_events_on_disk(monkeypatch, tmp_path, aside_bytes, expect_on_disk):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setattr(selection, "EVENTS_ASIDE_BYTES", aside_bytes)
    dm = _prepared()
    before = dm.events.copy()
    seen_in_memory = []
    gram = ease_lib.gram_matrix

    later = {name: getattr(dm, name) for name in ("full_history", "test_input_history", "all_seen", "test_relevant")}
    later = {name: v.copy() for name, v in later.items()}
    mapped = []

    def spy(x, device, *args, **kwargs):
        seen_in_memory.append(dm.log_.events is not None)
        mapped.append((isinstance(dm.full_history, np.memmap), isinstance(dm.all_seen.indices, np.memmap),
                       isinstance(x.indices, np.memmap)))
        return gram(x, device, *args, **kwargs)

    monkeypatch.setattr(ease_lib, "gram_matrix", spy)
    shallow, facts, _ = selection.fit_ease(_fit_cfg([2.0]), dm, dm.train_seen, l2=50.0)
    assert seen_in_memory == [not expect_on_disk]
    # the arrays prepared for later steps are memory maps during the fit (the fitted matrix is not), and come back
    assert mapped == [(expect_on_disk, expect_on_disk, False)]
    for name, value in later.items():
        now = getattr(dm, name)
        assert type(now if isinstance(now, np.ndarray) else now.indices) is np.ndarray
        assert (now != value).nnz == 0 if sp.issparse(value) else np.array_equal(now, value)
    pd.testing.assert_frame_equal(dm.events, before)
    expected = ease_lib.ease_weights(dm.train_seen, 50.0).numpy()
    served = shallow(sp.identity(dm.n_items, format="csr", dtype=np.float32)).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-3, atol=1e-4)
    assert [p for p in Path(tmp_path).iterdir() if p.name.startswith("dmp_dl-tmp-")] == []


def test_ease_takes_a_binary_matrix_as_it_is_and_copies_any_other():
    ones = sp.csr_matrix(np.array([[1, 0, 1], [0, 1, 0]], dtype=np.float32))
    assert ease_lib.binary(ones) is ones
    counts = sp.csr_matrix(np.array([[3, 0, 1], [0, 2, 0]], dtype=np.float32))
    out = ease_lib.binary(counts)
    assert out is not counts and out.toarray().tolist() == [[1, 0, 1], [0, 1, 0]]
    assert counts.toarray().tolist() == [[3, 0, 1], [0, 2, 0]]  # the input is not written into
    wide = sp.csr_matrix(np.array([[1, 0], [0, 1]], dtype=np.float64))
    assert ease_lib.binary(wide) is not wide and ease_lib.binary(wide).dtype == np.float32
