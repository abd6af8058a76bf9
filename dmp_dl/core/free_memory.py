"""How much memory this process can still take: the host's free memory, and the room left under the
memory limits of its control group (a container's or a job scheduler's), whichever is smaller.

Inside a container ``/proc/meminfo`` describes the whole host: a pod limited to 8 GiB on a 256 GiB
node reads 200 GiB free there, and the kernel kills the process when it passes 8 GiB. Every check
that plans memory before it is spent (a log too large to prepare, EASE's dense matrices) reads
:func:`host_available_bytes`, so it sees the container's limit too, and a user's own cap for a
stage (:func:`memory_budget`: ``data.memory_limit_gb``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

PROC_MEMINFO = Path("/proc/meminfo")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as the largest page-aligned 63-bit number
_BUDGET: ContextVar[tuple[int, str] | None] = ContextVar("memory_budget", default=None)


@contextlib.contextmanager
def memory_budget(limit_gb: float | None, setting: str) -> Iterator[None]:
    """Inside, :func:`host_available_bytes` is at most ``limit_gb`` GiB (None: no cap): the memory a
    stage may plan on, set by the user as ``setting`` (e.g. ``data.memory_limit_gb``), on a machine
    whose free memory is shared with others."""
    token = _BUDGET.set(None if limit_gb is None else (int(float(limit_gb) * 2**30), f"{setting}={float(limit_gb):g}"))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def host_available_bytes() -> int:
    """Memory this process can take now without swapping or being killed: the smaller of the host's
    ``MemAvailable`` (``/proc/meminfo``; else the free pages) and :func:`cgroup_headroom_bytes`, and
    at most the :func:`memory_budget` in force; ``1 << 62`` (no limit) when none is known."""
    known = [b for b in (_meminfo_available(), cgroup_headroom_bytes()) if b is not None]
    free = min(known) if known else 1 << 62
    budget = _BUDGET.get()
    return min(free, budget[0]) if budget is not None else free


def describe_available(free: int) -> str:
    """``free`` bytes (from :func:`host_available_bytes`) in words for a message: "data.memory_limit_gb=2
    allows 2.0 GiB (raise it ...)" when the :func:`memory_budget` in force is what bounds it, else "4.0 GiB is free
    to this process"."""
    budget = _BUDGET.get()
    if bounded_by_budget(free):
        return f"{budget[1]} allows {free / 2**30:.1f} GiB (raise it where the machine has more free)"
    return f"{free / 2**30:.1f} GiB is free to this process"


def bounded_by_budget(free: int) -> bool:
    """Whether ``free`` (from :func:`host_available_bytes`) is the :func:`memory_budget` in force, a plan
    set by the user, rather than what the host and the container have free."""
    budget = _BUDGET.get()
    return budget is not None and free == budget[0]


def _meminfo_available() -> int | None:
    try:
        with open(PROC_MEMINFO) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def cgroup_headroom_bytes(proc_cgroup: Path | None = None, root: Path | None = None) -> int | None:
    """Bytes this process's control groups still allow: for each group on its path that sets a memory
    limit (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``; the mount's own root counts too,
    which is the container's group where the host's path is not visible), the limit less the memory
    charged to it that the kernel cannot reclaim (usage less its inactive file pages); the smallest of
    these, at least 0. None when no group sets a limit or none can be read (not Linux).

    ``proc_cgroup`` and ``root``: ``/proc/self/cgroup`` and ``/sys/fs/cgroup`` (for tests)."""
    proc_cgroup = PROC_SELF_CGROUP if proc_cgroup is None else Path(proc_cgroup)
    root = CGROUP_ROOT if root is None else Path(root)
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    room = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: the unified hierarchy (mounted at the root, or under unified/)
            mount = root if (root / "cgroup.controllers").exists() else root / "unified"
            files = ("memory.max", "memory.current", ("inactive_file",))
        elif "memory" in controllers.split(","):  # cgroup v1: the memory controller's own hierarchy
            mount = root / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file", "inactive_file"))
        else:
            continue
        for folder in _groups_on_path(mount, path):
            headroom = _group_headroom(folder, *files)
            if headroom is not None:
                room.append(headroom)
    return min(room) if room else None


def _groups_on_path(mount: Path, path: str) -> list[Path]:
    """The folders of the group ``path`` and of each of its ancestors under ``mount`` that exist,
    the mount's root included."""
    folders, folder = [mount], mount
    for name in [p for p in path.strip().split("/") if p and p not in (".", "..")]:
        folder = folder / name
        folders.append(folder)
    return [f for f in folders if f.is_dir()]


def _group_headroom(folder: Path, limit_file: str, usage_file: str, inactive_keys: tuple[str, ...]) -> int | None:
    """``folder``'s limit less its unreclaimable usage (its usage less the first of ``inactive_keys``
    found in its ``memory.stat``), or None when it sets no limit or cannot be read."""
    try:
        text = (folder / limit_file).read_text().strip()
        if text == "max":
            return None
        limit = int(text)
        if limit >= NO_LIMIT:
            return None
        usage = int((folder / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        stat = dict(line.split(" ", 1) for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
        inactive = next((int(stat[k]) for k in inactive_keys if k in stat), 0)
    except (OSError, ValueError):
        pass
    return max(limit - max(usage - inactive, 0), 0)
