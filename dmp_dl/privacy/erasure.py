"""The right to be forgotten: removing users from a bundle, the erasure list and the audit log.

``forget_users(bundle, ids)`` (the ``forget`` command and ``POST /erase``) is one transaction:

1. **check everything first**: the bundle (manifest digest and schema, every checksum), the ids
   (a malformed keyed hash, an empty id, a hash of another key), the erasure list (readable, well
   formed, entries of the same key), the audit log and the folders the job writes to (existing,
   writable, regular files, not folders or FIFOs), and the secret where one is needed;
2. **build the new bundle** beside the old one without the users' rows (:func:`stage_erasure`) and
   load all of it (a :class:`~dmp_dl.serving.recommender.Recommender`), so that a bundle that would not
   load is never published;
3. **record**: append the users' entries to the erasure list and one audit line per user;
4. **swap** the new bundle in (an atomic exchange of folders).

The new manifest's ``privacy.erasures`` entry names the erasure list written to, and every server
of the bundle honours each list its manifest names (:func:`~dmp_dl.data.erasure_list.bundle_erasure_lists`),
so ``forget erasure_list=OTHER`` is never forgotten by a reload. When none of the users is in the
bundle (e.g. they are only in a server's event journal) but the list is not one the bundle names
yet, the bundle is published again with just that entry added (:func:`stage_record`).

A failure in 1-2 changes nothing. A failure in 3-4 puts the erasure list and audit log back as
they were, so nothing has changed either; only if that too fails (the disk gave out in between)
does the error say that the list and log are ahead of the bundle (run ``forget`` again: it is
idempotent). Every failure is one :class:`ErasureError` line with a short ``code``.

A ``bundle`` path that is a symlink (``bundle -> runs/r1/artifacts``) is resolved: the real
folder is rewritten and the link keeps pointing at it.

The erasure list never holds a raw id. For a bundle whose ids are pseudonymised, entries are keyed
hashes ``hmac-sha256:<key fingerprint>:<pseudonym>`` (the run's secret). For a bundle of raw ids
they are salted hashes ``salted-sha256:<salt>:<hash>`` (see :mod:`dmp_dl.data.erasure_list`),
which any later run applies without a secret, unless ``forget`` is given a secret
(``secret_env``/``secret_file``), then keyed hashes.

Removed: the id from ``users.json`` (the vocabulary is re-indexed), the user's row of
``user_vectors.npy``, their vector from ``user_index.faiss`` (rebuilt), their row of the seen-items
CSR, their rows of the network's per-user tables (``network/weights.pt``: the tables its class
declares in the network registry, :mod:`dmp_dl.models.registry`, such as the user-id embedding and
the attribute buffers; row ``n_users``, the unknown user, is kept; a class that is not registered is
refused), of the propensity model's copy of those tables and of ``propensity/known_scores.npy``,
and their row of every file that a manifest entry lists under ``user_aligned`` (interest profiles,
segment assignments, ...): an ``.npy`` array, a JSON list or a ``.parquet`` table whose row i
belongs to user i of ``users.json``.

Not removed: what the user contributed to *shared* parameters and aggregates — the network's other
weights, the item vectors and index, item popularity counts. Model weights may carry a user's
influence until the next training run, which the erasure list keeps them out of; for a bound on
that influence, train with ``privacy.dp.enabled=true``. Nor the training run's own directory: its
``checkpoints/`` hold the per-user id embedding (delete them once the run is done; they only serve
to resume it). Nor other copies of the bundle (older runs, backups).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmp_dl.core.errors import BundleError, DmpError
from dmp_dl.core.io import atomic_write_bytes
from dmp_dl.data.erasure_list import (
    SALTED_PREFIX,
    SaltedHash,
    append_to_erasure_list,
    bundle_erasure_lists,
    read_erasure_list,
)
from dmp_dl.data.pseudonymize import DEFAULT_SECRET_ENV, Pseudonymizer, check_key, parse_tag, recorded_privacy
from dmp_dl.data.schema import canonical_id, normalize_ids
from dmp_dl.data.vocab import IdVocab
from dmp_dl.serving.recommender import Recommender
from dmp_dl.store import bundle as layout
from dmp_dl.store.bundle import Bundle, BundleWriter
from dmp_dl.store.contents import parts_of, verify_parts
from dmp_dl.store.manifest import DIGEST_KEY
from dmp_dl.store.parts import UserErasure

log = logging.getLogger(__name__)

WEIGHTS_NOTE = ("the removed rows are gone; shared model weights (towers, item vectors) may still carry the user's "
                "influence until the next training run, which drops the user via the erasure list")
_MANIFEST_OWN = ("format", "format_version", "created_at", "packages", "files", DIGEST_KEY)
CLI_KEYS = ("secret_env", "secret_file")


class ErasureError(DmpError):
    """An erasure that did not happen, or did not finish, with a short ``code`` and the HTTP
    ``status`` to answer.

    code: ``invalid_user_id`` (422), ``bad_bundle``, ``bad_erasure_list``, ``not_writable``,
    ``no_secret``, ``erasure_failed`` (409); a server's erasure adds ``journal_not_rewritten`` and
    ``reload_failed`` (:class:`dmp_dl.realtime.service.RealtimeEraser`). recorded: True only when the
    erasure list and audit log hold the erasure but something after them failed (the message says what).
    """

    def __init__(self, message: str, code: str, status: int = 409, recorded: bool = False):
        super().__init__(message)
        self.code, self.status, self.recorded = code, status, recorded
        self.fresh = None  # ErasureService: the Recommender without the users, when recorded


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- rewriting a bundle --------------------------------------------------------------------------
def stage_erasure(bundle: Bundle, rows: np.ndarray, w: BundleWriter, erasure: dict | None = None) -> dict[str, Any]:
    """Write ``bundle`` without the users at vocabulary ``rows`` into writer ``w`` and seal it
    (``w.root`` is then the complete new bundle; publishing it is the caller's).

    Every part the bundle holds drops the users' rows (:meth:`~dmp_dl.store.parts.BundlePart.drop_users`:
    the rows the network registry names for the network and the propensity model's copy of it,
    every ``user_aligned`` file of the other parts); every other file is copied.
    erasure: an entry appended to the manifest's ``privacy.erasures`` (time, counts).
    Returns ``{"removed": {file: what}, "seen_items": (len(rows),) seen counts, "users_before",
    "users_after"}``.
    """
    n = len(IdVocab.load(bundle.file(layout.USER_VOCAB)))
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"user rows out of range 0..{n - 1}")
    manifest = bundle.manifest
    dropping = UserErasure(rows, n, {k: v for k, v in manifest.items() if k not in _MANIFEST_OWN})
    for part in parts_of(bundle):
        part.drop_users(bundle, dropping, w)
    for name in manifest["files"]:
        if not w.path(name).exists():
            shutil.copyfile(bundle.root / name, w.path(name))

    content = dropping.content
    privacy = dict(content.get("privacy") or {"pseudonymized": False})
    privacy["erasures"] = [*privacy.get("erasures", []), {**(erasure or {"time": _now()}), "users_removed": int(len(rows))}]
    content["privacy"] = privacy
    content.setdefault("trained_at", manifest.get("created_at"))
    w.seal(content)
    return {"removed": dropping.removed, "seen_items": dropping.seen_items, "users_before": n,
            "users_after": dropping.users_after}


def stage_record(bundle: Bundle, w: BundleWriter, erasure: dict) -> None:
    """Write ``bundle`` unchanged into writer ``w`` but for one more ``privacy.erasures`` entry
    (``erasure``, with ``users_removed`` 0) and seal it: an erasure that removed no row but must be
    recorded (the list it wrote to is not one the bundle names yet)."""
    manifest = bundle.manifest
    for name in manifest["files"]:
        shutil.copyfile(bundle.root / name, w.path(name))
    content = {k: v for k, v in manifest.items() if k not in _MANIFEST_OWN}
    privacy = dict(content.get("privacy") or {"pseudonymized": False})
    privacy["erasures"] = [*privacy.get("erasures", []), {**erasure, "users_removed": 0}]
    content["privacy"] = privacy
    content.setdefault("trained_at", manifest.get("created_at"))
    w.seal(content)


def erase_rows(bundle: Bundle, rows: np.ndarray, erasure: dict | None = None) -> dict[str, Any]:
    """Rewrite ``bundle`` in place (atomically) without the users at vocabulary ``rows``; no
    erasure list, no audit (that is :func:`forget_users`). No-op when ``rows`` is empty. The new
    bundle's parts are checked before it is published. Returns what :func:`stage_erasure` returns."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        indptr = bundle.array(layout.SEEN_INDPTR)
        n = len(indptr) - 1
        return {"removed": {}, "seen_items": np.zeros(0, np.int64), "users_before": n, "users_after": n}
    with BundleWriter(bundle.root) as w:
        result = stage_erasure(bundle, rows, w, erasure)
        verify_parts(Bundle.open(w.root, verify=False), Recommender.from_parts)  # a bundle that would not load never replaces this one
        w.publish()
    return result


# -- what the job needs: ids, keys, paths --------------------------------------------------------
@dataclass
class _Plan:
    """What one erasure will do, worked out before anything is written."""

    given: Path  # the bundle path as given (may be a symlink)
    target: Path  # the real bundle folder
    list_path: Path
    audit_path: Path
    pseudonymized: bool
    key: Pseudonymizer | None  # keyed entries (and pseudonymised bundles)
    salted: SaltedHash | None  # salted entries (bundles of raw ids without a secret)
    entries: list[str] = field(default_factory=list)  # the list entry of each requested user
    lookups: list[str | None] = field(default_factory=list)  # its vocabulary id (None: find by pseudonym)
    pseudonyms: list[str | None] = field(default_factory=list)  # its pseudonym, when known


def _open_bundle(path: Path) -> Bundle:
    try:
        return Bundle.open(path)
    except BundleError as exc:
        raise ErasureError(f"{exc} (nothing was changed)", "bad_bundle") from None
    except OSError as exc:
        raise ErasureError(f"{path}: the bundle cannot be read ({_one_line(exc)}); nothing was changed", "bad_bundle") from None


def _keys_from(bundle: Bundle, secret_env, secret_file, pseudonymizer) -> tuple[Pseudonymizer | None, bool]:
    """(the key, whether the bundle's ids are pseudonyms). A bundle of raw ids gets a key only when
    one is given (``pseudonymizer``, ``secret_env`` or ``secret_file``)."""
    recorded = recorded_privacy(bundle.manifest)
    pseudonymized = bool(recorded.get("pseudonymized"))
    if pseudonymizer is None and (pseudonymized or secret_env or secret_file):
        env = secret_env or recorded.get("secret_env") or DEFAULT_SECRET_ENV
        try:
            pseudonymizer = Pseudonymizer.from_env(env, secret_file or (recorded.get("secret_file") if pseudonymized else None),
                                                   int(recorded.get("id_length") or 32), keys=CLI_KEYS)
        except DmpError as exc:
            why = "the bundle's user ids are pseudonymised, so erasing by raw id needs its secret: " if pseudonymized else ""
            raise ErasureError(f"{why}{exc}", "no_secret") from None
    if pseudonymized:
        try:
            check_key(bundle.manifest, pseudonymizer)
        except BundleError as exc:
            raise ErasureError(str(exc).replace("privacy.secret_file", "secret_file=FILE"), "no_secret") from None
    return pseudonymizer, pseudonymized


def _plan_ids(plan: _Plan, user_ids: Iterable[object]) -> None:
    """Fill ``plan.entries`` / ``lookups`` / ``pseudonyms`` from the requested ids (normalised like
    training does; ``hmac-sha256:...`` entries taken as the pseudonyms they name)."""
    import pandas as pd

    raw, tagged = [], []
    for i, value in enumerate(user_ids):
        text = canonical_id(value)  # 7777.0 is user "7777", as in events and queries
        try:
            tag = parse_tag(text)
        except ValueError as exc:
            raise ErasureError(f"user id #{i + 1}: {exc}", "invalid_user_id", 422) from None
        if tag is None and text.startswith(SALTED_PREFIX):
            raise ErasureError(f"user id #{i + 1} is a salted-sha256 erasure-list entry, not an id: give the raw id",
                               "invalid_user_id", 422)
        if tag is None:
            raw.append(text)
            continue
        if plan.key is None:
            raise ErasureError(f"user id #{i + 1} is a keyed hash (hmac-sha256); finding it in a bundle of raw ids needs "
                               "the secret it was made with: give secret_env=NAME or secret_file=FILE", "no_secret")
        if tag[0] != plan.key.fingerprint:
            raise ErasureError(f"user id #{i + 1} is a keyed hash made with another key (fingerprint {tag[0]}, "
                               f"configured {plan.key.fingerprint})", "invalid_user_id", 422)
        tagged.append(tag[1])
    normalised = normalize_ids(pd.Series(raw, dtype=object)).tolist() if raw else []
    if any(x == "" for x in normalised):
        raise ErasureError("an empty user id was given to forget; remove the blank entry", "invalid_user_id", 422)
    seen = set()
    if plan.key is not None:
        hashed = plan.key.many(normalised).tolist() if normalised else []
        for raw_id, p in [*zip(normalised, hashed), *((None, p) for p in tagged)]:
            if p in seen:
                continue
            seen.add(p)
            plan.entries.append(plan.key.tag(p))
            plan.pseudonyms.append(p)
            plan.lookups.append(p if plan.pseudonymized else raw_id)
    else:
        hashed = plan.salted.many(normalised).tolist() if normalised else []
        for raw_id, h in zip(normalised, hashed):
            if h in seen:
                continue
            seen.add(h)
            plan.entries.append(plan.salted.tag(h))
            plan.pseudonyms.append(None)
            plan.lookups.append(raw_id)
    if not plan.entries:
        raise ErasureError("no user ids given to forget", "invalid_user_id", 422)


def _rows_of(plan: _Plan, bundle: Bundle) -> tuple[np.ndarray, int]:
    """((len(plan.entries),) vocabulary row of each requested user, -1 when not in the bundle;
    the bundle's user count)."""
    vocab = IdVocab.load(bundle.file(layout.USER_VOCAB))
    ids = vocab.ids.tolist()
    row_of = {k: i for i, k in enumerate(ids)}
    by_pseudonym = None
    rows = []
    for lookup, p in zip(plan.lookups, plan.pseudonyms):
        if lookup is None:  # a keyed hash given for a bundle of raw ids: hash the vocabulary once
            if by_pseudonym is None:
                by_pseudonym = {h: i for i, h in enumerate(plan.key.many(ids).tolist())}
            rows.append(by_pseudonym.get(p, -1))
        else:
            rows.append(row_of.get(lookup, -1))
    return np.asarray(rows, dtype=np.int64), len(ids)


def _check_file_target(path: Path, what: str, key: str) -> None:
    """Refuse ``path`` unless the job can write it: an existing regular, readable file or a new
    one, in a folder (existing, or creatable under a writable one) where files can be created."""
    hint = f"(give {key}=FILE, or privacy.{key} when training)"
    if path.exists() or path.is_symlink():
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise ErasureError(f"{what} {path}: {_one_line(exc)} {hint}; nothing was changed", "not_writable") from None
        if stat.S_ISDIR(mode):
            raise ErasureError(f"{what} {path} is a folder {hint}; nothing was changed", "not_writable")
        if not stat.S_ISREG(mode):
            raise ErasureError(f"{what} {path} is not a regular file {hint}; nothing was changed", "not_writable")
        if not os.access(path, os.R_OK):
            raise ErasureError(f"{what} {path} is not readable; nothing was changed", "not_writable")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ErasureError(f"{what} {path}: {folder} is not a folder {hint}; nothing was changed", "not_writable")
    if folder != path.parent:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ErasureError(f"{what} {path}: cannot create its folder in {folder} (permission denied); nothing was "
                               "changed", "not_writable")
        return
    try:  # the real test: can a file be created (and renamed over the target) there?
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ErasureError(f"{what} {path}: cannot write in {folder} ({_one_line(exc)}); nothing was changed",
                           "not_writable") from None


def _read_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _restore(path: Path, before: bytes | None) -> None:
    if before is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_bytes(path, before)


@contextlib.contextmanager
def _exclusive(folder: Path):
    """One erasure at a time per erasure list: an advisory lock on the list's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _append_audit(path: Path, existing: bytes | None, entries: list[dict]) -> None:
    """The audit log (JSON lines) with ``entries`` after its ``existing`` bytes, written atomically."""
    existing = existing or b""
    if existing and not existing.endswith(b"\n"):
        existing += b"\n"
    atomic_write_bytes(path, existing + "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode("utf-8"),
                       mode=None if path.exists() else 0o600)  # a new audit log is its owner's alone


def plan_erasure(artifacts: str | Path, user_ids: Iterable[object], *, erasure_list=None, audit_log=None,
                 secret_env: str | None = None, secret_file: str | None = None,
                 pseudonymizer: Pseudonymizer | None = None) -> tuple[_Plan, Bundle]:
    """Step 1 of :func:`forget_users`: check the bundle, ids, key, list and paths; write nothing."""
    given = Path(artifacts).absolute()
    try:
        target = given.resolve(strict=True)
    except (OSError, RuntimeError):
        target = given
    bundle = _open_bundle(target)
    recorded = recorded_privacy(bundle.manifest)
    list_path = erasure_list or recorded.get("erasure_list")
    audit_path = audit_log or recorded.get("audit_log")
    if not list_path or not audit_path:
        raise ErasureError(f"{given}: the bundle records no erasure list / audit log; give erasure_list=FILE and "
                           "audit_log=FILE", "not_writable")
    list_path, audit_path = Path(list_path).absolute(), Path(audit_path).absolute()
    if list_path == audit_path:
        raise ErasureError(f"erasure_list and audit_log are the same file {list_path}; give two files", "not_writable")
    key, pseudonymized = _keys_from(bundle, secret_env, secret_file, pseudonymizer)
    _check_file_target(list_path, "erasure list", "erasure_list")
    _check_file_target(audit_path, "audit log", "audit_log")
    try:
        existing = read_erasure_list(list_path, required=False)
        if key is not None:
            existing.check_key(key, how="secret_env=NAME / secret_file=FILE")
    except DmpError as exc:
        raise ErasureError(f"{exc}; nothing was changed", "bad_erasure_list") from None
    plan = _Plan(given, target, list_path, audit_path, pseudonymized, key,
                 None if key is not None else SaltedHash(existing.salt))
    _plan_ids(plan, user_ids)
    _check_writable_bundle(target)
    return plan, bundle


def _check_writable_bundle(target: Path) -> None:
    folder = target.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ErasureError(f"{target}: its folder {folder} is not writable, so the bundle cannot be replaced; "
                           "nothing was changed", "not_writable")


def _default_verify(plan: _Plan) -> Callable[[Path], Any]:
    def verify(path: Path):
        return Recommender.load(path, pseudonymizer=plan.key if plan.pseudonymized else None)

    return verify


def forget_users(artifacts: str | Path, user_ids: Iterable[object], *, erasure_list=None, audit_log=None,
                 secret_env: str | None = None, secret_file: str | None = None,
                 pseudonymizer: Pseudonymizer | None = None,
                 verify: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    """Forget ``user_ids`` (raw external ids, or tagged keyed hashes): check, build, record, swap
    (see the module docstring). Raises :class:`ErasureError`; nothing is changed then unless its
    ``recorded`` is set.

    Paths and the secret default to what the bundle's manifest recorded at training time.
    verify: loads the new bundle's folder before it is published (default:
    :meth:`~dmp_dl.serving.recommender.Recommender.load`); a failure refuses the erasure. Returns a summary
    without any raw id: ``requested``, ``removed_from_bundle``, ``not_in_bundle``,
    ``added_to_erasure_list``, ``erasure_list``, ``audit_log``, ``bundle`` (the real folder),
    ``removed`` (file -> what), ``users_after``.
    """
    return _run(artifacts, user_ids, verify, False, erasure_list=erasure_list, audit_log=audit_log,
                secret_env=secret_env, secret_file=secret_file, pseudonymizer=pseudonymizer)[0]


def _run(artifacts, user_ids, verify, load_unchanged: bool, **settings) -> tuple[dict[str, Any], Any]:
    """(summary, what ``verify`` loaded: the new bundle, or with ``load_unchanged`` the current one
    when none of the users is in it, else None)."""
    plan, _ = plan_erasure(artifacts, list(user_ids), **settings)
    verify = verify or _default_verify(plan)
    try:
        with _exclusive(plan.list_path.parent):
            return _forget_locked(plan, verify, load_unchanged)
    except ErasureError:
        raise
    except (OSError, DmpError, ValueError) as exc:  # before the commit point: nothing changed
        raise ErasureError(f"erasure failed: {_one_line(exc)}; nothing was changed", "erasure_failed") from None


def _forget_locked(plan: _Plan, verify: Callable[[Path], Any], load_unchanged: bool) -> tuple[dict[str, Any], Any]:
    bundle = _open_bundle(plan.target)  # again, under the lock: another erasure may have just published
    rows, n_users = _rows_of(plan, bundle)
    in_bundle = rows[rows >= 0]
    time = _now()
    result = {"removed": {}, "seen_items": np.zeros(0, np.int64), "users_after": n_users}
    writer = loaded = None
    record = {"time": time, "audit_log": str(plan.audit_path), "erasure_list": str(plan.list_path)}
    # a list the bundle does not name yet is recorded in it even when none of the users is in it
    # (e.g. only in a server's event journal), so that every server of the bundle honours it
    unnamed = os.path.realpath(plan.list_path) not in {os.path.realpath(p) for p in bundle_erasure_lists(bundle.manifest)}
    with contextlib.ExitStack() as stack:
        if len(in_bundle) or unnamed:
            writer = stack.enter_context(BundleWriter(plan.target))
            try:
                if len(in_bundle):
                    result = stage_erasure(bundle, in_bundle, writer, record)
                else:
                    stage_record(bundle, writer, record)
            except (DmpError, ValueError) as exc:  # e.g. an index option that no longer fits the data
                raise ErasureError(f"{_one_line(exc)} (the bundle cannot be rewritten; nothing was changed)",
                                   "bad_bundle") from None
        if writer is not None or load_unchanged:
            try:
                loaded = verify(writer.root if writer is not None else plan.target)
            except (DmpError, OSError) as exc:
                what = "the bundle without these users" if writer is not None else "the bundle"
                raise ErasureError(f"{what} does not load ({_one_line(exc)}); nothing was changed", "bad_bundle") from None

        # -- the commit point: record, then swap; undo the records if anything fails ------------
        list_before, audit_before = _read_bytes(plan.list_path), _read_bytes(plan.audit_path)
        seen_by_row = dict(zip(np.unique(in_bundle).tolist(), result["seen_items"].tolist()))
        entries = []
        for entry, row in zip(plan.entries, rows.tolist()):
            removed = {}
            if row >= 0:
                removed = dict(result["removed"])
                removed[layout.SEEN_ITEMS] = f"{seen_by_row[row]} seen items"
            audit = {"time": time, "user": entry, "bundle": str(plan.target), "in_bundle": row >= 0,
                     "removed": removed, "erasure_list": str(plan.list_path), "note": WEIGHTS_NOTE}
            if plan.given != plan.target:
                audit["bundle_link"] = str(plan.given)
            entries.append(audit)
        try:
            added = append_to_erasure_list(plan.list_path, plan.entries)
            _append_audit(plan.audit_path, audit_before, entries)
            if writer is not None:
                writer.publish()
        except Exception as exc:
            if _undo(plan, list_before, audit_before):
                raise ErasureError(f"erasure failed: {_one_line(exc)}; the erasure list and audit log were put back, "
                                   "nothing was changed", "erasure_failed") from None
            err = ErasureError(f"erasure failed half-way: {_one_line(exc)}; the erasure list {plan.list_path} and audit "
                               f"log {plan.audit_path} record the users but the bundle {plan.target} was not replaced: "
                               "run forget again", "erasure_failed", recorded=True)
            err.fresh = loaded
            raise err from None
    summary = {"requested": len(plan.entries), "removed_from_bundle": int((rows >= 0).sum()),
               "not_in_bundle": int((rows < 0).sum()), "added_to_erasure_list": added,
               "erasure_list": str(plan.list_path), "audit_log": str(plan.audit_path), "bundle": str(plan.target),
               "removed": result["removed"], "users_after": int(result["users_after"])}
    log.info("forget: %d users requested, %d removed from %s, %d not in the bundle; erasure list %s, audit %s",
             summary["requested"], summary["removed_from_bundle"], plan.target, summary["not_in_bundle"],
             plan.list_path, plan.audit_path)
    return summary, loaded


def _undo(plan: _Plan, list_before: bytes | None, audit_before: bytes | None) -> bool:
    """Put the erasure list and audit log back as they were; whether that worked."""
    ok = True
    for path, before in ((plan.list_path, list_before), (plan.audit_path, audit_before)):
        try:
            _restore(path, before)
        except OSError as exc:
            ok = False
            log.error("could not put %s back after a failed erasure: %s", path, exc)
    return ok


class ErasureService:
    """Erasure for a running server: :func:`forget_users` on its bundle, checked by loading the new
    bundle the way the server loads bundles, which is then the one to serve.

    artifacts: the served bundle path; load: ``(path) -> Recommender``, the server's loader (default
    ``Recommender.load`` with the bundle's key); settings: ``erasure_list``, ``audit_log``,
    ``secret_env``, ``secret_file``, ``pseudonymizer`` for :func:`forget_users` (default: what the
    manifest recorded).
    """

    def __init__(self, artifacts: str | Path, load: Callable[[Path], Any] | None = None, **settings):
        self.artifacts, self.load, self.settings = Path(artifacts), load, settings
        self._lock = threading.Lock()

    def forget(self, user_ids: Iterable[object]):
        """(summary, the Recommender to serve from now on: the bundle without the users, or the
        bundle now on disk when none of them was in it). One erasure at a time. On an
        :class:`ErasureError` whose erasure was recorded, ``error.fresh`` is that Recommender."""
        with self._lock:
            return _run(self.artifacts, list(user_ids), self.load, True, **self.settings)
