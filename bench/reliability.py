"""Reliability figures for bench/RESULTS.md: the bad-input corpus and a killed-and-resumed training run.

Runs two parts of the test suite and records what they measured (the tests fail, and so does this
script, if a property breaks):

* ``tests/test_bad_inputs.py``: how many malformed files and bad requests were tried (hand-written
  cases and hypothesis-generated ones), all ending in a clear error or a counted drop;
* the slow test of ``tests/test_crash_safety.py``: ``train.py`` on small synthetic data, SIGKILLed
  mid-epoch, resumed with ``ckpt_path=last``, against an uninterrupted run of the same config.

Serving under load and hot-swap errors are ``bench/load.py``'s section.

    python bench/reliability.py            # a few minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, command, machine, markdown_table, write_section


def pytest(args: list[str], env: dict[str, str]) -> int:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env={**os.environ, **env}, text=True)
    return proc.returncode


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dmp-reliability-") as tmp:
        bad, resume = Path(tmp) / "bad_inputs.json", Path(tmp) / "resume.json"
        bad_rc = pytest(["tests/test_bad_inputs.py"], {"DMP_BAD_INPUTS_REPORT": str(bad)})
        resume_rc = pytest(["-m", "slow", "tests/test_crash_safety.py", "-k", "quality"], {"DMP_RESUME_REPORT": str(resume)})
        counts = json.loads(bad.read_text()) if bad.exists() else {}
        figures = json.loads(resume.read_text()) if resume.exists() else {}
    rows = []
    for name in ("uninterrupted", "resumed"):
        ranking = figures.get(name, {})
        rows.append({"run": name, "two_tower recall@20": ranking.get("two_tower", {}).get("recall@20"),
                     "two_tower ndcg@20": ranking.get("two_tower", {}).get("ndcg@20"),
                     "popularity recall@20": ranking.get("popularity", {}).get("recall@20")})
    killed, end = figures.get("killed_at", {}), figures.get("end", {})
    body = (
        f"**Bad inputs tried: {counts.get('total', '?')}** — {counts.get('loader_cases', '?')} hand-written loader cases, "
        f"{counts.get('loader_generated', '?')} generated files/frames, {counts.get('http_cases', '?')} hand-written "
        f"HTTP requests, {counts.get('http_generated', '?')} generated requests; "
        f"{'all ended in a clear error or a counted drop (0 unhandled exceptions, 0 HTTP 5xx)' if bad_rc == 0 else 'FAILED: see the pytest output'}.\n\n"
        f"**Resume after SIGKILL** (`train.py`, 400 users × 150 items × 12k synthetic events, 6 epochs, batch 256, "
        f"`last.ckpt` every 6 steps): killed at global step {killed.get('global_step', '?')} "
        f"({killed.get('batches_into_epoch', '?')} batches into the first epoch), resumed with `ckpt_path=last` to "
        f"{end.get('epochs_completed', '?')} epochs / step {end.get('global_step', '?')} "
        f"({'passed' if resume_rc == 0 else 'FAILED'}: continued from the checkpoint's step, same step count, "
        f"test metrics within 0.05 of the uninterrupted run):\n\n"
        f"{markdown_table(rows, floatfmt='.4f')}"
    )
    write_section("reliability", "Reliability: bad inputs and resume after SIGKILL (bench/reliability.py)", body,
                  {"bad_inputs": counts, "resume": figures, "pytest_exit": {"bad_inputs": bad_rc, "resume": resume_rc},
                   "machine": machine(), "command": command()})
    return 0 if bad_rc == 0 and resume_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
