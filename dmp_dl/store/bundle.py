"""The versioned artifact bundle: writing it atomically, reading and verifying it.

A bundle is a directory::

    manifest.json             written last: format version, created-at, package versions, the
                              resolved config, dim, metric, index settings and quality, counts,
                              and the sha256 and size of every other file
    users.json, items.json    id vocabularies (IdVocab): row i of every user/item array is id i
    user_vectors.npy          (n_users, dim) float32, from each user's full history
    item_vectors.npy          (n_items, dim) float32
    seen_indptr.npy           (n_users + 1,) int64  } CSR rows: the items each user interacted
    seen_items.npy            (nnz,) int32           } with in the cleaned data (for exclusion)
    item_popularity.npy       (n_items,) int64 training events per item
    item_index.faiss          FAISS inner-product index over item_vectors (row i = item i)
    user_index.faiss          FAISS inner-product index over user_vectors (row i = user i)
    network/weights.pt        the network's state_dict (cold start: recommend_for_history)
    network/network.json      its class (a registered network: dmp_dl.models.registry), constructor
                              kwargs, feature specs
    propensity/               the propensity model, when trained; further parts (scoring, item_categories, profiles,
                              segments, realtime, uplift) in their own folders

Each part is written, loaded and erased through one interface (:mod:`dmp_dl.store.parts`, listed
in :mod:`dmp_dl.store.contents`); this module holds the writer and reader they share.

:class:`BundleWriter` builds a bundle in a temporary directory beside the target and publishes it
with a rename (on Linux an atomic exchange with the previous bundle) only once every file and the manifest are written and fsynced, so a crashed export
never leaves a half bundle under the target name (the previous bundle stays until the new one is
complete). :class:`Bundle` refuses a bundle whose manifest is missing, fails its digest or schema
(:mod:`dmp_dl.store.manifest`), has a format version it does not know, or whose files do not match their
checksums, with a :class:`BundleError` naming the file (and the manifest field).
Nothing is unpickled: arrays load with ``allow_pickle=False``, weights with ``weights_only=True``.

Temporary folders (``.NAME.tmp-*`` while a bundle is written, ``.NAME.old-*`` while one is swapped
without an atomic exchange) are locked by the process that writes them; one left by a killed
process is removed by the next writer of ``NAME`` (an export, an erasure) and by ``serve.py`` at
start (:func:`remove_stale_temporaries`), and a previous bundle an interrupted swap left only under
``.NAME.old-*`` is put back at ``NAME``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dmp_dl.core.errors import BundleError
from dmp_dl.core.io import atomic_write_text, fsync_path
from dmp_dl.core.scratch import locked_tempdir, remove_if_unheld
from dmp_dl.store.manifest import FORMAT, FORMAT_VERSION, MANIFEST, manifest_text, read_manifest, seal

log = logging.getLogger(__name__)

USER_VOCAB, ITEM_VOCAB = "users.json", "items.json"
USER_VECTORS, ITEM_VECTORS = "user_vectors.npy", "item_vectors.npy"
SEEN_INDPTR, SEEN_ITEMS = "seen_indptr.npy", "seen_items.npy"
SEEN_SUMS = "seen_sums.npy"  # optional: each seen pair's decayed summed event weights (dmp_dl.data.recency)
ITEM_POPULARITY = "item_popularity.npy"
ITEM_INDEX, USER_INDEX = "item_index.faiss", "user_index.faiss"
NETWORK_WEIGHTS, NETWORK_SPEC = "network/weights.pt", "network/network.json"
PROPENSITY_DIR = "propensity"


class MissingPartError(BundleError):
    """The bundle is valid but lacks an optional part (e.g. the propensity model)."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _check_relative(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or not rel.parts or ".." in rel.parts or rel.as_posix() == MANIFEST:
        raise ValueError(f"bundle file names must be relative paths inside the bundle, got {name!r}")
    return rel


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that write and read bundle files."""
    out = {"python": platform.python_version()}
    for dist in ("dmp_dl", "numpy", "scipy", "torch", "faiss-cpu", "faiss-gpu", "pandas"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the ``.NAME.tmp-*`` / ``.NAME.old-*`` folders that a killed export or erasure left
    beside bundle ``target`` (and beside its real folder when ``target`` is a symlink). Folders a
    live process is writing are locked and kept. A previous bundle that an interrupted swap left
    only under ``.NAME.old-*/bundle`` is moved back to ``target`` when nothing is there.
    Returns the folders removed. Best effort: what cannot be removed is logged and kept."""
    target = Path(target).absolute()
    places = {target}
    with contextlib.suppress(OSError, RuntimeError):
        places.add(target.resolve())
    removed = []
    for place in sorted(places):
        if not place.name or not place.parent.is_dir():
            continue
        try:
            candidates = sorted([*place.parent.glob(f".{place.name}.tmp-*"), *place.parent.glob(f".{place.name}.old-*")])
        except OSError:
            continue
        for folder in candidates:
            if folder.is_symlink() or not folder.is_dir():
                continue
            def put_back(folder: Path, place: Path = place) -> None:
                kept = folder / "bundle"
                if ".old-" in folder.name and kept.exists() and not (place.exists() or place.is_symlink()):
                    os.replace(kept, place)
                    log.warning("%s: an interrupted swap left the previous bundle in %s; moved it back", place, folder)

            if remove_if_unheld(folder, "an interrupted export or erasure", before=put_back):  # a locked one is in use
                removed.append(folder)
    return removed


class BundleWriter:
    """Builds a bundle in a temporary directory beside ``target``; :meth:`commit` publishes it.

    Use as a context manager: leaving the block with an exception (or without ``commit``) deletes
    the temporary directory and leaves ``target`` untouched::

        with BundleWriter(out / "artifacts") as w:
            w.save_array("user_vectors.npy", users)
            w.save_json("users.json", {...})
            save_part(w.subdir("propensity"))
            w.commit({"dim": 64})

    ``commit`` is :meth:`seal` (checksums and manifest written: the temporary folder is then a
    complete bundle that can be opened and checked) followed by :meth:`publish` (the swap).
    ``target`` is used as given: a symlink there is replaced by the new folder (to write through a
    symlink, pass its resolved path).
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target).absolute()
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.target)
        self.root, self._lock = locked_tempdir(f".{self.target.name}.tmp-", self.target.parent)
        self.committed = False
        self.sealed = False

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self._unlock()

    def path(self, name: str) -> Path:
        """Where to write bundle file ``name`` (a relative path; parent folders are created)."""
        p = self.root / _check_relative(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def subdir(self, name: str) -> Path:
        """An empty, existing folder ``name`` inside the bundle for a part written by other code."""
        p = self.path(name)
        p.mkdir()
        return p

    def save_array(self, name: str, array: np.ndarray) -> str:
        """Save ``array`` as ``.npy`` (C-contiguous; object arrays are refused)."""
        array = np.ascontiguousarray(array)
        if array.dtype == object:
            raise TypeError(f"{name}: object arrays cannot be stored without pickle")
        with open(self.path(name), "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        return name

    def save_json(self, name: str, obj: Any) -> str:
        self.path(name).write_text(json.dumps(obj, indent=1), encoding="utf-8")
        return name

    def save_torch(self, name: str, state_dict: Mapping[str, Any]) -> str:
        """Save a state_dict of tensors (readable with ``torch.load(weights_only=True)``)."""
        import torch

        torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, self.path(name))
        return name

    def save_index(self, name: str, index) -> str:
        import faiss

        faiss.write_index(index, str(self.path(name)))
        return name

    def commit(self, content: Mapping[str, Any]) -> Path:
        """:meth:`seal` and :meth:`publish`. Returns ``target``."""
        self.seal(content)
        return self.publish()

    def seal(self, content: Mapping[str, Any]) -> Path:
        """Checksum every file and write ``manifest.json`` (``content`` plus the format fields and
        the digest); everything fsynced. Returns the temporary folder, now a complete bundle."""
        files = {}
        for p in sorted(self.root.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.root).as_posix()
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                fsync_path(p)
        manifest = seal({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "packages": package_versions(),
            **content,
            "files": files,
        })
        with open(self.root / MANIFEST, "w", encoding="utf-8") as fh:
            fh.write(manifest_text(manifest))
            fh.flush()
            os.fsync(fh.fileno())
        # mkdtemp/mkstemp create owner-only entries: give the bundle the parent folder's access bits
        mode = stat.S_IMODE(self.target.parent.stat().st_mode)
        for p in self.root.rglob("*"):
            os.chmod(p, mode if p.is_dir() else mode & 0o666)
        os.chmod(self.root, mode)
        for d in sorted({p.parent for p in self.root.rglob("*")} | {self.root}, reverse=True):
            fsync_path(d)
        self.sealed = True
        return self.root

    def publish(self) -> Path:
        """Swap the sealed bundle in at ``target``. Returns ``target``."""
        if not self.sealed:
            raise RuntimeError("seal the bundle before publishing it")
        self._publish()
        self.committed = True
        self._unlock()
        return self.target

    def _publish(self) -> None:
        # Where the OS can, swap the new folder and the old bundle in one atomic step, so that
        # ``target`` always holds a complete bundle, even if the process dies right here.
        if (self.target.exists() or self.target.is_symlink()) and _exchange(self.root, self.target):
            fsync_path(self.target.parent)
            if self.root.is_symlink():  # target was a symlink to a bundle: drop the link only
                self.root.unlink()
            else:
                shutil.rmtree(self.root, ignore_errors=True)
            return
        # Otherwise: rename(2) cannot replace a non-empty directory, so move the old bundle aside
        # first. A crash between the two renames leaves no bundle at ``target`` and the old one
        # under `.NAME.old-*` (never a partial one); Bundle.open names it in its error, and the next
        # writer or server start moves it back.
        old = old_lock = None
        if self.target.exists() or self.target.is_symlink():
            old, old_lock = locked_tempdir(f".{self.target.name}.old-", self.target.parent)
            os.replace(self.target, old / "bundle")
        try:
            try:
                os.replace(self.root, self.target)
            except BaseException:
                if old is not None:  # put the previous bundle back
                    os.replace(old / "bundle", self.target)
                    shutil.rmtree(old, ignore_errors=True)
                raise
            fsync_path(self.target.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if old_lock is not None:
                os.close(old_lock)


def write_manifest(root: str | os.PathLike, content: Mapping[str, Any]) -> dict:
    """Replace the manifest of the bundle at ``root`` by ``content`` sealed with a fresh digest
    (atomically). For tools that amend a manifest in place; the files' checksums are not
    recomputed, so ``content["files"]`` must still describe them. Returns the manifest written."""
    manifest = seal(content)
    atomic_write_text(Path(root) / MANIFEST, manifest_text(manifest))
    return manifest


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap paths ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the OS, C library or filesystem cannot (the caller falls back to renames).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28 or another C library
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


class Bundle:
    """A verified bundle on disk. ``Bundle.open(path)`` checks the manifest and every checksum."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        root = Path(path)
        manifest_path = root / MANIFEST
        if not root.is_dir():
            kept = sorted(root.parent.glob(f".{root.name}.old-*/bundle")) if root.name else []
            hint = f"; an interrupted export kept the previous bundle at {kept[-1]}" if kept else ""
            raise BundleError(f"bundle not found: {root} is not a directory (set artifacts=DIR to an exported bundle{hint})")
        if not manifest_path.is_file():
            raise BundleError(f"{manifest_path}: missing, so {root} is not a complete bundle (export it again)")
        manifest = read_manifest(manifest_path)
        bundle = cls(root, manifest)
        if verify:
            for name in manifest["files"]:
                bundle._verify(name)
        return bundle

    def _verify(self, name: str) -> None:
        entry = self.manifest["files"][name]
        try:
            rel = _check_relative(name)
        except ValueError:
            raise BundleError(f"{self.root / MANIFEST}: file entry {name!r} points outside the bundle") from None
        p = self.root / rel
        if not p.is_file():
            raise BundleError(f"{p}: listed in the manifest but missing; the bundle is incomplete (export it again)")
        if p.stat().st_size != entry.get("bytes") or sha256_file(p) != entry.get("sha256"):
            raise BundleError(f"{p}: checksum mismatch, the file is corrupt or was modified (export the bundle again)")

    def has(self, name: str) -> bool:
        """Whether ``name`` is a file, or a folder holding files, listed in the manifest."""
        files = self.manifest["files"]
        return name in files or any(f.startswith(name.rstrip("/") + "/") for f in files)

    def file(self, name: str) -> Path:
        """Path of listed file or folder ``name``; :class:`MissingPartError` if not in the bundle."""
        if not self.has(name):
            raise MissingPartError(f"{self.root}: the bundle has no {name}")
        return self.root / name

    def array(self, name: str, mmap: bool = False) -> np.ndarray:
        path = self.file(name)
        try:
            return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: not a readable array ({exc})") from None

    def json(self, name: str) -> Any:
        path = self.file(name)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: not valid JSON ({exc})") from None

    def index(self, name: str):
        import faiss

        path = self.file(name)
        try:
            return faiss.read_index(str(path))
        except RuntimeError as exc:
            raise BundleError(f"{path}: not a readable FAISS index ({str(exc).splitlines()[-1]})") from None

    def torch_state(self, name: str) -> dict:
        import pickle

        import torch

        path = self.file(name)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            raise BundleError(f"{path}: not a readable weights file ({str(exc).splitlines()[0]})") from None


# -- exporting a model's bundle ------------------------------------------------------------------
