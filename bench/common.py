"""Shared bench plumbing: machine description, result files, timing helpers.

Each bench writes a dated section to a results file (replacing the previous run of the same
section) and its raw numbers to ``results/<section>.json`` beside it: the git-ignored
``bench/out/RESULTS.md`` unless the run names another (``--results FILE``, or ``--write-results``
for the tracked ``bench/RESULTS.md``; see ``output.py``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shlex
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "out" / "RESULTS.md"  # output.use points these at the file a run names
RESULTS_DIR = BENCH_DIR / "out" / "results"
ML100K = Path(os.environ.get("DMP_ML100K", ROOT.parent / "shared" / "data" / "ml-100k"))

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def compose_train_cfg(overrides: list[str], output_dir: str | Path):
    """``conf/train.yaml`` with Hydra ``overrides``, writing everything under ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from dmp_dl.core.open_settings import register

    register()  # the dict settings that take new keys, as every command registers them
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def peak_rss_mib() -> float:
    """This process's peak resident memory, MiB: VmHWM (reset at exec, unlike ``ru_maxrss``, which
    Linux carries over from the parent), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def machine() -> dict:
    """Cores, memory, GPU and package versions, stated in every bench's output."""
    import torch

    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/meminfo") as fh:
            kb = int(re.search(r"MemTotal:\s+(\d+)", fh.read()).group(1))
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, AttributeError):
        pass
    versions = {}
    for pkg in ("torch", "pytorch-lightning", "numpy", "pandas", "faiss-cpu", "scikit-learn", "implicit"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def machine_line(info: dict) -> str:
    gpu = info["gpu"] or "no GPU"
    v = ", ".join(f"{k} {val}" for k, val in info["versions"].items())
    return (f"{info['date']} · {info['cpu_cores']} CPU cores, {info.get('memory_gib', '?')} GiB, {gpu} · "
            f"load avg {info['load_average']:.1f} at start · Python {info['python']} · {v}")


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".4f") -> str:
    """A GitHub table from dicts (missing cells blank)."""
    if not rows:
        return "_(no rows)_"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, data: dict) -> None:
    """Replace section ``name`` of RESULTS.md (or append it) and write results/<name>.json."""
    info = data.setdefault("machine", machine())
    data.setdefault("command", command())
    block = (
        f"<!-- section:{name} -->\n## {title}\n\n"
        f"`{data['command']}`  \n{machine_line(info)}\n\n{body.strip()}\n<!-- /section:{name} -->"
    )
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- /section:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    print(f"\n## {title}\n{body}\n(written to {RESULTS_MD} and {RESULTS_DIR / f'{name}.json'})")
    import headline  # imports this module: loaded when the first section is written

    if name in headline.SOURCES:
        headline.write_headline(quiet=True)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
