"""Where a bench run writes its results, and the optional packages it needs before it starts.

Results go where the user says: ``--results FILE`` writes each section into ``FILE`` and its
numbers to ``results/<section>.json`` beside it; ``--write-results`` is ``--results
bench/RESULTS.md``, the tracked file (with ``bench/results/``). Without either, a run writes into the
git-ignored ``bench/out/`` (``RESULTS.md`` and ``results/``) and prints where: running a bench never
rewrites the recorded numbers unless asked. ``--quick`` (tiny sizes, a plumbing check) never writes
the tracked file.

A bench whose packages are not installed stops before any work with one ``error: ...`` line naming
them and the pip extra that installs them (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path

import common

RECORDED_MD = common.BENCH_DIR / "RESULTS.md"  # the tracked results, with RECORDED_MD.parent / "results"
QUICK_DIR = common.BENCH_DIR / "out"
# The optional packages benches import, and the pip extra of pyproject.toml that installs each.
EXTRA_OF = {"implicit": "bench", "cornac": "bench", "httpx": "bench", "psutil": "bench",
            "schemathesis": "dev", "hypothesis": "dev", "opacus": "dp"}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The ``--results FILE`` and ``--write-results`` options of every bench."""
    ap.add_argument("--results", metavar="FILE", type=Path,
                    help="write the sections into FILE (and results/<section>.json beside it); default: bench/out/RESULTS.md")
    ap.add_argument("--write-results", action="store_true",
                    help="rewrite the tracked bench/RESULTS.md and bench/results/ (the same as --results bench/RESULTS.md)")


def results_file(args: argparse.Namespace, quick: bool = False) -> Path:
    """The Markdown file a run with ``args`` writes (see the module docstring)."""
    named = getattr(args, "results", None)
    if getattr(args, "write_results", False):
        if named is not None and Path(named).resolve() != RECORDED_MD:
            fail(f"--write-results writes {RECORDED_MD.relative_to(common.ROOT)}; give it or --results {named}, not both")
        named = RECORDED_MD
    if quick and named is not None and Path(named).resolve() == RECORDED_MD:
        fail("--quick measures tiny sizes (a plumbing check): its numbers do not go into bench/RESULTS.md")
    return Path(named).absolute() if named is not None else QUICK_DIR / "RESULTS.md"


def use(args: argparse.Namespace, quick: bool = False) -> Path:
    """Point ``common.write_section`` at the results file of ``args`` and say where; returns it."""
    path = results_file(args, quick)
    common.RESULTS_MD = path
    common.RESULTS_DIR = path.parent / "results"
    print(f"results: {path} (numbers in {common.RESULTS_DIR})", flush=True)
    return path


def forward(args: argparse.Namespace) -> list[str]:
    """The results options of ``args`` as arguments for another bench's ``main``."""
    return ["--results", str(common.RESULTS_MD)] if (args.results or args.write_results) else []


def fail(message: str) -> None:
    """One ``error:`` line on stderr and exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def missing(needs: Mapping[str, str]) -> list[str]:
    """The packages of ``needs`` (package -> what it is for) that cannot be imported."""
    return [name for name in needs if importlib.util.find_spec(name) is None]


def require(needs: Mapping[str, str], what: str, hint: str = "") -> None:
    """Stop with one ``error:`` line (exit status 2) unless every package of ``needs`` is installed.

    needs: package -> what it is for, e.g. ``{"implicit": "the ALS / BPR anchors"}``.
    what: the bench, for the message; hint: how to run without them, if there is a way.
    """
    absent = missing(needs)
    if not absent:
        return
    extras = sorted({EXTRA_OF.get(name, "bench") for name in absent})
    packages = ", ".join(f"{name} ({needs[name]})" for name in absent)
    fail(f"{what} needs {packages}, not installed; install with: pip install -e '.[{','.join(extras)}]'"
         + (f"; {hint}" if hint else ""))
