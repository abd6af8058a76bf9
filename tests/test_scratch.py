"""Temporary folders of a run that is killed do not stay on disk for good: the next one removes
those nobody holds, never one a live process uses; SIGTERM during a large EASE fit ends the run
through its cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from dmp_dl.core.io import Terminated
from dmp_dl.core.scratch import SCRATCH_PREFIX, ScratchFolder
from dmp_dl.models import ease as ease_lib
from dmp_dl.training import selection

from .test_ease_l2_search import _fit_cfg
from .test_events_on_disk import _prepared

ROOT = Path(__file__).resolve().parents[1]


def _child(code: str, tmp_path: Path) -> subprocess.Popen:
    """A Python process running ``code`` with ``folder`` = tmp_path; it prints one line when ready."""
    head = f"import sys; from pathlib import Path; folder = Path({str(tmp_path)!r})\n"
    return subprocess.Popen([sys.executable, "-c", head + textwrap.dedent(code)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _scratch(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(SCRATCH_PREFIX))


def test_a_killed_runs_folder_goes_with_the_next_one_and_a_live_ones_stays(tmp_path, caplog):
    live = _child("""
        from dmp_dl.core.scratch import ScratchFolder
        with ScratchFolder("arrays", folder) as path:
            (path / "x.npy").write_bytes(b"0" * 10)
            print(path.name, flush=True)
            sys.stdin.read()  # held until the test lets go
    """, tmp_path)
    held = live.stdout.readline().strip()
    killed = _child("""
        import os, signal
        import pandas as pd
        from dmp_dl.data.frame_spill import spill_frame
        spilled = spill_frame(pd.DataFrame({"a": range(1000)}), folder)
        print(spilled.folder.name, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """, tmp_path)
    left = killed.stdout.readline().strip()
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert left.startswith(SCRATCH_PREFIX + "frame-") and held.startswith(SCRATCH_PREFIX + "arrays-")
    assert _scratch(tmp_path) == sorted([left, held])
    (tmp_path / "unrelated").mkdir()  # not a scratch folder: never touched

    with caplog.at_level("INFO", logger="dmp_dl.core.scratch"):
        with ScratchFolder("frame", tmp_path) as mine:
            assert _scratch(tmp_path) == sorted([held, mine.name])  # the killed run's is gone, the live one kept
            assert (tmp_path / held / "x.npy").exists()
    assert f"removed {tmp_path / left}" in caplog.text
    assert _scratch(tmp_path) == [held]  # its own folder goes at the end of the block
    live.communicate("", timeout=60)
    assert live.returncode == 0 and _scratch(tmp_path) == []
    assert (tmp_path / "unrelated").is_dir()


def test_a_folder_is_removed_once_and_its_lock_let_go(tmp_path):
    scratch = ScratchFolder("fit", tmp_path)
    (scratch.path / "f").write_text("x")
    scratch.remove()
    scratch.remove()
    assert not scratch.path.exists()
    again = ScratchFolder("fit", tmp_path)  # nothing held, nothing left to sweep
    assert _scratch(tmp_path) == [again.path.name]
    again.remove()


def test_sigterm_during_a_large_ease_fit_removes_what_was_set_aside(monkeypatch, tmp_path):
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # else the run keeps the program's own handler
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setattr(selection, "EVENTS_ASIDE_BYTES", 0)  # this small fit counts as large
    dm = _prepared()
    before = dm.events.copy()
    aside = []

    def terminated_during_the_fit(x, device, *args, **kwargs):
        aside.append(_scratch(tmp_path))
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("SIGTERM did not end the fit")

    monkeypatch.setattr(ease_lib, "gram_matrix", terminated_during_the_fit)
    with pytest.raises(Terminated) as ended:
        selection.fit_ease(_fit_cfg([2.0]), dm, dm.train_seen, l2=50.0)
    assert ended.value.code == 128 + signal.SIGTERM
    assert len(aside[0]) == 2  # the events and the prepared arrays were on disk when it came
    assert _scratch(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    pd.testing.assert_frame_equal(dm.events, before)
