"""Memory checks see a container's limit, not only the host's free memory."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dmp_dl.core import free_memory
from dmp_dl.core.errors import DataError
from dmp_dl.core.free_memory import cgroup_headroom_bytes, host_available_bytes
from dmp_dl.data import memory_check
from dmp_dl.models import ease as ease_lib

GIB = 2**30


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)


def _v2_tree(tmp_path: Path, limit: str, current: int, inactive: int, path: str = "/kubepods/pod1") -> Path:
    root = tmp_path / "cgroup"
    _write(root, cgroup__controllers="cpu memory\n")
    _write(root / path.strip("/"), memory__max=f"{limit}\n", memory__current=f"{current}\n",
           memory__stat=f"anon {current - inactive}\nactive_file 0\ninactive_file {inactive}\n")
    (tmp_path / "cgroup.txt").write_text(f"0::{path}\n")
    return root


def test_v2_limit_less_what_cannot_be_reclaimed(tmp_path):
    root = _v2_tree(tmp_path, str(8 * GIB), current=3 * GIB, inactive=1 * GIB)
    # 8 GiB limit, 3 GiB charged of which 1 GiB is inactive page cache the kernel drops first
    assert cgroup_headroom_bytes(tmp_path / "cgroup.txt", root) == 6 * GIB


def test_v2_no_limit_and_the_tightest_ancestor(tmp_path):
    root = _v2_tree(tmp_path, "max", current=GIB, inactive=0)
    assert cgroup_headroom_bytes(tmp_path / "cgroup.txt", root) is None
    # a parent's limit binds its children
    _write(root / "kubepods", memory__max=f"{2 * GIB}\n", memory__current=f"{GIB}\n", memory__stat="inactive_file 0\n")
    assert cgroup_headroom_bytes(tmp_path / "cgroup.txt", root) == GIB


def test_v2_group_path_not_visible_reads_the_mount_root(tmp_path):
    """A container without its own cgroup namespace sees the host's path in /proc/self/cgroup while its
    own group is mounted at the root."""
    root = tmp_path / "cgroup"
    _write(root, cgroup__controllers="memory\n", memory__max=f"{4 * GIB}\n", memory__current=f"{GIB}\n",
           memory__stat="inactive_file 0\n")
    (tmp_path / "cgroup.txt").write_text("0::/docker/abc123\n")
    assert cgroup_headroom_bytes(tmp_path / "cgroup.txt", root) == 3 * GIB


def test_v1_memory_controller(tmp_path):
    root = tmp_path / "cgroup"
    unlimited = "9223372036854771712\n"
    _write(root / "memory", memory__limit_in_bytes=unlimited, memory__usage_in_bytes="100\n", memory__stat="")
    _write(root / "memory" / "job", memory__limit_in_bytes=f"{16 * GIB}\n", memory__usage_in_bytes=f"{10 * GIB}\n",
           memory__stat=f"cache {4 * GIB}\ninactive_file {GIB}\ntotal_inactive_file {2 * GIB}\n")
    (tmp_path / "cgroup.txt").write_text("9:cpu,cpuacct:/job\n4:memory:/job\n0::/\n")
    assert cgroup_headroom_bytes(tmp_path / "cgroup.txt", root) == 8 * GIB  # 16 - (10 - 2)
    _write(root / "memory" / "job", memory__limit_in_bytes=unlimited)
    assert cgroup_headroom_bytes(tmp_path / "cgroup.txt", root) is None


def test_nothing_readable(tmp_path):
    assert cgroup_headroom_bytes(tmp_path / "missing", tmp_path) is None
    (tmp_path / "cgroup.txt").write_text("garbage\n4:memory:/x\n")
    assert cgroup_headroom_bytes(tmp_path / "cgroup.txt", tmp_path / "nothing") is None


def test_host_available_is_the_smaller(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {256 * 2**20} kB\nMemAvailable: {200 * 2**20} kB\n")
    monkeypatch.setattr(free_memory, "PROC_MEMINFO", meminfo)
    monkeypatch.setattr(free_memory, "PROC_SELF_CGROUP", tmp_path / "cgroup.txt")
    monkeypatch.setattr(free_memory, "CGROUP_ROOT", _v2_tree(tmp_path, str(8 * GIB), current=GIB, inactive=0))
    assert host_available_bytes() == 7 * GIB
    assert ease_lib.available_bytes("cpu") == 7 * GIB
    (tmp_path / "cgroup.txt").write_text("0::/elsewhere\n")  # the root sets no limit: the host's figure
    assert host_available_bytes() == 200 * GIB


def test_a_log_too_large_for_the_container_stops_in_one_line(tmp_path, monkeypatch):
    """The preparation check refuses a CSV the container cannot hold although the host could."""
    csv = tmp_path / "events.csv"
    n = 2_000
    pd.DataFrame({"user_id": np.arange(n) % 50, "item_id": np.arange(n) % 30, "timestamp": np.arange(n)}).to_csv(
        csv, index=False)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemAvailable: {200 * 2**20} kB\n")
    monkeypatch.setattr(free_memory, "PROC_MEMINFO", meminfo)
    monkeypatch.setattr(free_memory, "PROC_SELF_CGROUP", tmp_path / "cgroup.txt")
    root = _v2_tree(tmp_path, str(GIB + 1000), current=GIB, inactive=0)
    monkeypatch.setattr(free_memory, "CGROUP_ROOT", root)
    with pytest.raises(DataError, match=r"events\.csv: about .* events .* need about"):
        memory_check.check_csv_events_fit([csv], csv)
    _write(root / "kubepods" / "pod1", memory__max=f"{2 * GIB}\n")
    memory_check.check_csv_events_fit([csv], csv)  # 1 GiB of room is plenty
