"""Where a bench run writes: ``bench/RESULTS.md`` and ``bench/results/`` for real runs, the
git-ignored ``bench/out/`` for ``--quick`` plumbing checks and ``--scratch`` runs (so they never
replace the recorded numbers)."""

from __future__ import annotations

from pathlib import Path

import common

QUICK_DIR = common.BENCH_DIR / "out"


def use(scratch: bool) -> Path:
    """Point ``common.write_section`` at ``bench/out/`` when ``scratch``; returns the RESULTS.md it will write."""
    if scratch:
        QUICK_DIR.mkdir(parents=True, exist_ok=True)
        common.RESULTS_MD = QUICK_DIR / "RESULTS.md"
        common.RESULTS_DIR = QUICK_DIR / "results"
    return common.RESULTS_MD
