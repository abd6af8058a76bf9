"""Files written atomically (dmp_dl.core.io, the export's TableWriter, the audience tables): the
permissions a plain write would give, and no temporary file left by an error, SIGTERM or Ctrl-C."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from dmp_dl.audience.jobs import write_table
from dmp_dl.core.io import atomic_write_bytes, atomic_write_text, atomic_writer
from dmp_dl.export.tables import TableWriter

REPO = Path(__file__).resolve().parents[1]
SCHEMA = pa.schema([("user_id", pa.string())])


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for the test (restored after)."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def write_table_file(path: Path, mode: int | None = None) -> None:
    with TableWriter(path, "csv", SCHEMA, mode) as writer:
        writer.write(pa.table({"user_id": ["a", "b"]}))


WRITERS = {
    "atomic_write_bytes": lambda path, mode=None: atomic_write_bytes(path, b"new\n", mode),
    "TableWriter": write_table_file,
    "write_table": lambda path, mode=None: write_table(pd.DataFrame({"user_id": ["a"]}), path, "csv", mode),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_new_file_follows_the_umask_like_a_plain_write(tmp_path, umask, writer):
    umask(0o022)
    WRITERS[writer](tmp_path / "shared.csv")
    umask(0o077)
    WRITERS[writer](tmp_path / "private.csv")
    umask(0o022)
    with open(tmp_path / "plain.csv", "w") as fh:
        fh.write("x")
    assert mode_of(tmp_path / "shared.csv") == 0o644 == mode_of(tmp_path / "plain.csv")
    assert mode_of(tmp_path / "private.csv") == 0o600


@pytest.mark.parametrize("writer", WRITERS)
def test_an_existing_file_keeps_its_permissions(tmp_path, umask, writer):
    umask(0o077)  # the umask applies to new files only
    for before in (0o644, 0o640, 0o664):
        path = tmp_path / f"{before:o}.csv"
        path.write_text("old\n")
        path.chmod(before)
        WRITERS[writer](path)
        assert mode_of(path) == before and path.read_text() != "old\n"


@pytest.mark.parametrize("writer", WRITERS)
def test_a_given_mode_is_applied_to_new_and_existing_files(tmp_path, umask, writer):
    umask(0)
    existing = tmp_path / "existing.csv"
    existing.write_text("old\n")
    existing.chmod(0o644)
    WRITERS[writer](existing, 0o600)
    WRITERS[writer](tmp_path / "new.csv", 0o640)
    assert mode_of(existing) == 0o600 and mode_of(tmp_path / "new.csv") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.csv", "new.csv"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_text(path, "previous\n")
    with pytest.raises(RuntimeError):
        with atomic_writer(path) as fh:
            fh.write(b"half")
            raise RuntimeError("failed half-way")
    assert path.read_text() == "previous\n" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_sigterm_is_raised_only_during_a_write_and_handlers_are_restored(tmp_path):
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with atomic_writer(tmp_path / "a.csv"):
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)  # converted during the write
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        def own(signum, frame):  # a program's own handler is left alone
            pass

        signal.signal(signal.SIGTERM, own)
        with atomic_writer(tmp_path / "b.csv"):
            assert signal.getsignal(signal.SIGTERM) is own
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_write_from_another_thread_works(tmp_path):
    errors = []

    def target():
        try:
            atomic_write_text(tmp_path / "t.txt", "from a worker thread")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    assert not errors and (tmp_path / "t.txt").read_text() == "from a worker thread"


CHILD = textwrap.dedent("""
    import signal, sys, time
    import pyarrow as pa
    from dmp_dl.export.tables import TableWriter

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's usual Ctrl-C, whoever started us
    schema = pa.schema([("user_id", pa.string())])
    chunk = pa.table({"user_id": [f"u{i:07d}" for i in range(20000)]})
    with TableWriter(sys.argv[1], "csv", schema) as writer:
        for i in range(300):
            writer.write(chunk)
            if i == 2:
                print("writing", flush=True)
            time.sleep(0.02)
""")


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, None)])
def test_an_export_killed_mid_write_leaves_the_previous_file_and_no_temporary_file(tmp_path, signum, status):
    path = tmp_path / "recommendations.csv"
    path.write_text("previous\n")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        assert len(list(tmp_path.glob(".recommendations.csv.*.tmp"))) == 1  # megabytes in flight
        child.send_signal(signum)
        child.wait(timeout=60)
    finally:
        child.kill()
    stderr = child.stderr.read()
    if status is not None:
        assert child.returncode == status and "Traceback" not in stderr, stderr
    else:
        assert child.returncode != 0 and "KeyboardInterrupt" in stderr
    assert path.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["recommendations.csv"]
