"""Temporary folders that a killed process does not leave behind for good.

A folder is locked (``flock`` on the folder itself) by the process that made it for as long as it
uses it. The kernel drops the lock when that process ends, however it ends (SIGKILL, the kernel's
out-of-memory killer, a power-off of a container), so an unlocked folder under a locking name was
left by a process that is gone. :class:`ScratchFolder` makes ``TMPDIR/dmp_dl-tmp-KIND-*`` folders
(the clean events and prepared arrays set aside during a large EASE fit: 2.9 GiB at 50M events)
and, each time it makes one, removes the ``dmp_dl-tmp-*`` folders there that nobody holds. A lock, not a process id:
a pid can be reused, and a folder shared between containers sees other pid namespaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "dmp_dl-tmp-"  # every ScratchFolder's name starts so; the sweep looks at these only


def lock_folder(path: str | os.PathLike) -> int | None:
    """An exclusive ``flock`` on folder ``path`` (held until the returned descriptor is closed, or
    the process ends), or None when another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def locked_tempdir(prefix: str, parent: str | os.PathLike | None = None) -> tuple[Path, int]:
    """A new folder ``parent/prefix*`` (``parent``: default ``TMPDIR``) and the lock on it, taken
    before anyone can clean it away (a sweep that took it between the two is answered by a new one)."""
    for _ in range(10):
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            fd = lock_folder(path)
        except FileNotFoundError:  # a cleanup of stale folders took it between mkdtemp and the lock
            continue
        if fd is not None and path.exists() and os.path.samestat(os.fstat(fd), os.stat(path)):
            return path, fd
        if fd is not None:
            os.close(fd)
    raise OSError(f"cannot create a temporary folder in {parent or tempfile.gettempdir()}")


def remove_if_unheld(folder: Path, left_by: str, before: Callable[[Path], None] | None = None) -> bool:
    """Remove ``folder`` when no process holds it (:func:`lock_folder`), holding its lock meanwhile;
    ``before(folder)`` runs first (e.g. to move back what must not go with it). ``left_by`` says in the
    log what left it. Returns whether it was removed; what cannot be removed is logged and kept."""
    try:
        fd = lock_folder(folder)
    except OSError:
        return False
    if fd is None:  # in use
        return False
    try:
        if before is not None:
            before(folder)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder)
        log.info("removed %s (%.0f MiB), left by %s", folder, size / 2**20, left_by)
        return True
    except OSError as exc:
        log.warning("cannot remove %s, left by %s: %s", folder, left_by, exc)
        return False
    finally:
        os.close(fd)


def remove_unheld(pattern: str, parent: str | os.PathLike | None = None) -> list[Path]:
    """Remove the folders ``parent/pattern`` (default ``TMPDIR``) of this user that no process holds
    locked (:func:`remove_if_unheld`). Returns those removed."""
    parent = Path(parent or tempfile.gettempdir())
    try:
        candidates = sorted(parent.glob(pattern))
    except OSError:
        return []
    removed = []
    for folder in candidates:
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.geteuid():
                continue
        except OSError:
            continue
        if remove_if_unheld(folder, "a run that ended before it could"):
            removed.append(folder)
    return removed


class ScratchFolder:
    """A new folder ``directory/dmp_dl-tmp-KIND-*`` (``directory``: default ``TMPDIR``), locked by this
    process until :meth:`remove` (or the end of a ``with`` block, or of the process). Making one first
    removes the ``dmp_dl-tmp-*`` folders there that no process holds: those of killed runs.
    Raises OSError when the folder cannot be made."""

    def __init__(self, kind: str, directory: str | os.PathLike | None = None):
        remove_unheld(f"{SCRATCH_PREFIX}*", directory)
        self.path, self._lock = locked_tempdir(f"{SCRATCH_PREFIX}{kind}-", directory)

    def remove(self) -> None:
        """Delete the folder and release its lock (again: nothing)."""
        if self._lock is None:
            return
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            with contextlib.suppress(OSError):
                os.close(self._lock)
            self._lock = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.remove()
