"""The README's commands, run: each shell command and Python example of README.md (as
tests/readme_commands.py reads them) runs in README order in one temporary folder, on small
synthetic data (extra size overrides appended to ``train.py`` lines), with the README's paths
(``/tmp/...``, ``/data/...``, the example files) placed inside that folder. A command fails the test
when it exits non-zero, or, where the README shows an ``error:`` line, when it does not stop with
that line (exit status 2).

Not run, by rule (each listed in NOT_RUN_HERE with its reason): setup lines (``make``), operator
file operations (``ln``, ``mv``), benchmarks (minutes to hours at their documented sizes: the fast
test parses their arguments), and curl lines that need a server with a token (``/events``,
``/erase``, ``/reload``: tests/test_server.py, test_realtime.py and test_privacy.py call them).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmp_dl.data.synthetic import SyntheticSource

from .conftest import ML100K
from .readme_commands import ROOT, Command, python_snippets, shell_commands
from .test_readme_commands import localize

# Its own marker: `make docs-check` runs it (minutes per README command on 2 cores), `-m slow` does not.
pytestmark = pytest.mark.readme

# Small data for every train.py line on the synthetic log: the README's examples name users up to
# u000977 and items up to i00231, so 1,000 users and 300 items.
SMALL = ["data.source.n_users=1000", "data.source.n_items=300", "data.source.n_events=15000",
         "data.source.n_categories=8", "data.source.n_segments=4"]
FAST = ["trainer.enable_progress_bar=false", "++model.vae.max_epochs=2", "propensity.trainer.max_epochs=2"]
SMOKE = ["debug=fdr"]  # one batch of everything, for the lines whose bundle no later line reads
RUN_DIR = "/tmp/run"  # the bundle later lines read: trained in full (small), not as a smoke test
NOT_RUN_HERE = {
    "not-run": "setup and operator file operations (make, ln, mv)",
    "bench": "benchmarks run for minutes to hours at their documented sizes; the fast test parses their arguments",
    "curl with a token": "needs a server with a token and real-time events; the server, real-time and privacy tests call them",
    "NEW_DIR": "a placeholder for the reader's moved data files (the synthetic run has none); the fast test checks the line",
}


def write_inputs(work: Path) -> None:
    """The files README lines name, small, inside ``work``."""
    log = SyntheticSource(n_users=1000, n_items=300, n_events=15000, n_categories=8, seed=7).load().events
    log.to_csv(work / "today.csv", index=False)
    log.to_csv(work / "march.csv", index=False)
    SyntheticSource(n_users=400, n_items=150, n_events=8000, days=7, seed=8).load().events.to_csv(work / "week.csv", index=False)
    ledger = log[log.event_type == "purchase"].assign(item_id="ANY")[["user_id", "item_id", "timestamp", "value"]]
    ledger.to_csv(work / "ledger.csv", index=False)
    (work / "data" / "logs").mkdir(parents=True)
    shutil.copy(work / "today.csv", work / "data" / "logs" / "2024-06-02.csv")
    for name in ("best_customers.txt", "crm_ids.txt", "ids.txt"):
        (work / name).write_text("u000042\nu000101\nu000977\n")


def program(argv: list[str], work: Path) -> list[str]:
    """``argv`` runnable from ``work``: this interpreter, the repository's scripts, the paths moved."""
    return [sys.executable, *(str(ROOT / a) if a in ("train.py", "serve.py") else localize(a, work) for a in argv[1:])]


def run_line(command: Command, work: Path, env: dict) -> subprocess.CompletedProcess:
    argv = program(command.argv, work)
    if command.kind == "hydra" and command.config == "train":
        synthetic = not any(a.startswith("data=") for a in command.args)
        full = any(a == f"paths.output_dir={RUN_DIR}" for a in command.args) and "model=two_tower" not in command.args
        smoke = [] if full or "debug=fdr" in command.args else SMOKE
        argv += (SMALL if synthetic else []) + FAST + ["logger=none"] + smoke
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)


def check_result(command: Command, done: subprocess.CompletedProcess) -> None:
    tail = (done.stdout[-1500:] + done.stderr[-3000:])
    if command.documented_error:
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, f"{command.id}: exit {done.returncode}\n{tail}"
        # what follows ", but " depends on the data; "..." marks where the README shortens the line
        shown = command.documented_error.split(", but ")[0].split("...")[0].rstrip(" ,")
        assert lines[0].startswith(shown), f"{command.id}: {lines[0]!r} vs README {shown!r}"
    else:
        assert done.returncode == 0, f"{command.id}: exit {done.returncode}\n{tail}"
        assert "Traceback" not in done.stderr, f"{command.id}\n{tail}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_call(command: Command, curls: list[Command], work: Path, env: dict) -> None:
    """Start the serve.py line on a free port, run the curl lines of its block against it, stop it."""
    port = free_port()
    argv = [*program(command.argv, work), f"port={port}"]
    server = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            probe = subprocess.run(["curl", "-s", f"localhost:{port}/health"], capture_output=True, text=True)
            if probe.returncode == 0 and probe.stdout:
                break
            assert server.poll() is None, f"{command.id}: the server stopped\n{server.stdout.read()[-3000:]}"
            time.sleep(0.5)
        for curl in curls:
            argv = [a.replace("localhost:8000", f"localhost:{port}") for a in curl.argv]
            done = subprocess.run([*argv, "-s", "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=60)
            status = done.stdout.strip().splitlines()[-1]
            shown = re.search(r"\(HTTP (\d{3})\)", " ".join(curl.output))
            assert status == (shown.group(1) if shown else "200"), f"{curl.id}: HTTP {status}: {done.stdout[-500:]}"
    finally:
        server.terminate()
        server.wait(timeout=60)


def run_snippet(code: str, line: int, namespace: dict, work: Path) -> None:
    """Each statement of a README Python example; one whose example output names an error must raise it."""
    code = localize(code, work)
    lines = code.splitlines()
    for statement in ast.parse(code).body:
        source = ast.get_source_segment(code, statement)
        after = lines[statement.end_lineno] if statement.end_lineno < len(lines) else ""
        raised = re.match(r"\s*#\s*(\w+Error)\(", after)
        if raised:
            with pytest.raises(Exception) as caught:
                exec(compile(source, f"README.md:{line}", "exec"), namespace)
            assert type(caught.value).__name__ == raised.group(1), f"README.md:{line}: {source}"
        else:
            exec(compile(source, f"README.md:{line}", "exec"), namespace)


def run_readme_snippet(snippet, namespace: dict, work: Path) -> None:
    if "ml-100k" in snippet.code and not (ML100K / "u.data").exists():
        return
    run_snippet(snippet.code, snippet.line, namespace, work)


def test_readme_commands_run(tmp_path, monkeypatch):
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    work = tmp_path
    write_inputs(work)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DMP_ML100K": str(ML100K)}
    env.pop("DMP_SERVE_TOKEN", None)
    monkeypatch.chdir(work)  # the Python examples run here, in this process, like the shell lines
    commands = shell_commands()
    # README order: an example reads the bundle as the lines above it left it (a later `forget` erases u000042)
    snippets = sorted(python_snippets(), key=lambda s: s.line)
    namespace: dict = {}
    seconds: dict[str, float] = {}
    ran_yesterday = False
    for i, command in enumerate(commands):
        while snippets and snippets[0].line < command.line:
            run_readme_snippet(snippets.pop(0), namespace, work)
        if command.kind in ("not-run", "bench", "curl") or any("=NEW_DIR" in a for a in command.args):
            continue  # see NOT_RUN_HERE; the curl lines without a token run with their serve.py line
        if any("ml-100k" in a for a in command.argv) and not (ML100K / "u.data").exists():
            continue
        if not ran_yesterday and any("init_from=" in a for a in command.args):
            # the runs init_from= names: a small bundle of the same log, as last night's run
            yesterday = work / "runs" / "yesterday"
            done = subprocess.run([sys.executable, str(ROOT / "train.py"), f"paths.output_dir={yesterday}",
                                   "data=events", f"data.path={work / 'today.csv'}", *FAST, *SMOKE],
                                  cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            (work / "data" / "runs").mkdir(parents=True, exist_ok=True)
            os.symlink(yesterday, work / "data" / "runs" / "2024-06-01")
            ran_yesterday = True
        t0 = time.perf_counter()
        if command.kind == "hydra" and command.config == "serve":
            block = [c for c in commands[i + 1:] if c.kind == "curl" and c.line - command.line < 10]
            serve_and_call(command, [c for c in block if "authorization" not in " ".join(c.argv).lower()], work, env)
        else:
            check_result(command, run_line(command, work, env))
        seconds[command.id] = time.perf_counter() - t0
    for snippet in snippets:
        run_readme_snippet(snippet, namespace, work)
    print("\n".join(f"{s:6.1f} s  {name}" for name, s in seconds.items()))
    assert len(seconds) >= 30
