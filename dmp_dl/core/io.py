"""Atomic file writes: write to a temporary file beside the target, fsync, then rename.

A reader sees the previous file or the complete new one, never a half-written one, and a write that
fails, or is stopped by SIGTERM or Ctrl-C, leaves no temporary file behind (:func:`atomic_writer`).
The file gets the permissions a plain ``open(path, "w")`` would give it: an existing file keeps its
own, a new one follows the umask (0644 under the usual 022), unless a ``mode`` is given (0600 for a
file only its owner may read).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# Signals that end a write: raised as Terminated while their action is the default one (which kills
# the process at once, leaving the temporary file behind). SIGINT's usual handler already raises
# KeyboardInterrupt, which removes the file the same way.
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Terminated(SystemExit):
    """SIGTERM (or a SIGINT without Python's handler) arrived during an atomic write.

    Raised instead of dying on the spot, so that the write's temporary file is removed; the process
    then ends quietly with status 128 + the signal's number (143 for SIGTERM), as after a kill."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """For the block, the :data:`ENDING_SIGNALS` whose action is the default one raise
    :class:`Terminated`; their previous handlers are back afterwards. A signal with a handler of
    the program's own, or ignored, is left alone, and so is every signal outside the main thread
    (where Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in ENDING_SIGNALS
                if signal.getsignal(sig) is signal.SIG_DFL}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is _raise_terminated:
                signal.signal(sig, handler)


def _open_temporary(path: Path, mode: int | None) -> tuple[int, Path]:
    """A new empty file beside ``path`` (descriptor, path) with the permissions ``path`` will have:
    ``mode``, else those of the existing ``path``, else what the umask leaves of 0666."""
    if mode is None:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            # owner-only until chmod when a mode is set, so a private file is never readable by others
            fd = os.open(tmp, flags, 0o666 if mode is None else 0o600)
            break
        except FileExistsError:
            continue
    if mode is not None:
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
    return fd, tmp


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content to; it replaces ``path`` (fsynced, renamed)
    when the block ends without an exception.

    mode: the file's permission bits (e.g. ``0o600``); None: an existing file's are kept, a new
    file follows the umask. On an exception, SIGTERM or Ctrl-C the temporary file is removed and
    ``path`` is left as it was (see :func:`signals_raise`). The folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with signals_raise():
        fd, tmp = _open_temporary(path, mode)
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one
    (permissions: ``mode``, or as :func:`atomic_writer` says)."""
    with atomic_writer(path, mode) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory by path (a directory: so that a rename or a new entry in it
    survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a data file, or None when it is a regular file (or a link to
    one). A FIFO, socket or device would block a reader forever or never end, so it is refused."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "is a directory, expected a file"
    if stat.S_ISREG(mode):
        return None
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return f"is {kind}, not a regular file (copy the data into a file and point to that)"
