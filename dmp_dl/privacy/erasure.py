"""The right to be forgotten: removing users from a bundle, the erasure list and the audit log.

``forget_users(bundle, raw_ids)`` (the ``forget`` command and the HTTP endpoint):

1. appends the users' keyed hashes to the erasure list, so that every later training run drops
   their events (done first: if anything after it fails, the next run still forgets them);
2. rewrites the bundle without them (:func:`erase_rows`): a new bundle is built with
   :class:`~dmp_dl.bundle.BundleWriter` from the old one's files minus the users' rows, checksums
   and manifest updated, and published with a rename, so readers see the old or the new bundle;
3. appends one audit entry per user: the keyed hash (never the raw id), the time, and what was
   removed from which file.

Removed: the id from ``users.json`` (the vocabulary is re-indexed), the user's row of
``user_vectors.npy``, their vector from ``user_index.faiss`` (rebuilt), their row of the seen-items
CSR, their rows of the network's per-user tables (``network/weights.pt``: the user-id embedding and
the attribute buffers; row ``n_users``, the unknown user, is kept), of the propensity model's copy
of those tables and of ``propensity/known_scores.npy``, and their row of every file that a
manifest entry lists under ``user_aligned`` (interest profiles, segment assignments, ...): an
``.npy`` array, a JSON list or a ``.parquet`` table whose row i belongs to user i of ``users.json``.

Not removed: what the user contributed to *shared* parameters and aggregates — the network's other
weights, the item vectors and index, item popularity counts. Model weights may carry a user's
influence until the next training run, which the erasure list keeps them out of; for a bound on
that influence, train with ``privacy.dp.enabled=true``. Nor the training run's own directory: its
``checkpoints/`` hold the per-user id embedding (delete them once the run is done; they only serve
to resume it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from dmp_dl import bundle as layout
from dmp_dl.bundle import Bundle, BundleWriter
from dmp_dl.data.schema import normalize_ids
from dmp_dl.data.vocab import IdVocab
from dmp_dl.errors import BundleError, ConfigError
from dmp_dl.io import atomic_write_text
from dmp_dl.privacy.erasure_list import append_to_erasure_list
from dmp_dl.privacy.pseudonymize import DEFAULT_SECRET_ENV, Pseudonymizer, check_key, parse_tag

log = logging.getLogger(__name__)

# Per-user rows of each exportable network's state_dict: (n_users + 1, ...), the last row the unknown user.
NETWORK_USER_ROWS = {
    "TwoTowerNet": ("user_id.weight", "user_attr.tokens", "user_attr.numeric"),
    "MatrixFactorization": ("user.weight",),
}
PROPENSITY_SPEC, PROPENSITY_WEIGHTS, PROPENSITY_SCORES = "propensity/propensity.json", "propensity/weights.pt", "propensity/known_scores.npy"
WEIGHTS_NOTE = ("the removed rows are gone; shared model weights (towers, item vectors) may still carry the user's "
                "influence until the next training run, which drops the user via the erasure list")
_MANIFEST_OWN = ("format", "format_version", "created_at", "packages", "files")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- rewriting a bundle --------------------------------------------------------------------------
def _drop_state_rows(state: dict, keys: Iterable[str], keep_ext: np.ndarray, n_users: int, where: Path) -> list[str]:
    import torch

    done = []
    for key in keys:
        if key not in state:
            continue
        if state[key].shape[0] != n_users + 1:
            raise BundleError(f"{where}: {key} has {state[key].shape[0]} rows, expected {n_users + 1} (users + unknown)")
        state[key] = state[key][torch.from_numpy(keep_ext)].contiguous()
        done.append(key)
    return done


def _user_aligned_files(bundle: Bundle) -> dict[str, str]:
    """Bundle file -> manifest entry name, for every entry's ``user_aligned`` list (paths inside the
    bundle, or inside the part's folder)."""
    manifest = bundle.manifest
    files = manifest["files"]
    out = {}
    for name, entry in manifest.items():
        if not isinstance(entry, dict) or not entry.get("user_aligned"):
            continue
        for f in entry["user_aligned"]:
            path = f if f in files else f"{name}/{f}"
            if path not in files:
                raise BundleError(f"{bundle.root / layout.MANIFEST}: part {name!r} lists user_aligned file {f!r}, "
                                  "which is not in the bundle")
            out[path] = name
    return out


def erase_rows(bundle: Bundle, rows: np.ndarray, erasure: dict | None = None) -> dict[str, Any]:
    """Rewrite ``bundle`` in place (atomically) without the users at vocabulary ``rows``.

    erasure: an entry appended to the manifest's ``privacy.erasures`` (time, counts).
    Returns ``{"removed": {file: what}, "seen_items": (len(rows),) seen counts, "users_before",
    "users_after"}``. No-op (nothing rewritten) when ``rows`` is empty.
    """
    from dmp_dl.index import IndexOptions, build_and_measure

    vocab = IdVocab.load(bundle.file(layout.USER_VOCAB))
    n = len(vocab)
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"user rows out of range 0..{n - 1}")
    indptr, seen_items = bundle.array(layout.SEEN_INDPTR), bundle.array(layout.SEEN_ITEMS)
    seen_counts = (indptr[rows + 1] - indptr[rows]).astype(np.int64)
    result: dict[str, Any] = {"removed": {}, "seen_items": seen_counts, "users_before": n, "users_after": n - len(rows)}
    if not len(rows):
        return result
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), rows)
    keep_ext = np.r_[keep, n]
    manifest = bundle.manifest
    removed: dict[str, str] = {}
    with BundleWriter(bundle.root) as w:
        written = set()

        def done(name: str, what: str) -> None:
            written.add(name)
            removed[name] = what

        IdVocab(vocab.ids[keep], vocab.kind).save(w.path(layout.USER_VOCAB))
        done(layout.USER_VOCAB, "id")
        users = np.ascontiguousarray(bundle.array(layout.USER_VECTORS)[keep])
        w.save_array(layout.USER_VECTORS, users)
        done(layout.USER_VECTORS, "vector row")
        n_items = len(IdVocab.load(bundle.file(layout.ITEM_VOCAB)))
        seen = sp.csr_matrix((np.ones(len(seen_items), np.float32), seen_items, indptr), shape=(n, n_items))[keep]
        w.save_array(layout.SEEN_INDPTR, seen.indptr.astype(np.int64))
        w.save_array(layout.SEEN_ITEMS, seen.indices.astype(np.int32))
        done(layout.SEEN_INDPTR, "seen-items row")
        done(layout.SEEN_ITEMS, "seen items")
        options = IndexOptions(**manifest.get("index_options", {}))
        user_index, user_info = build_and_measure(users, users, options, "user")
        w.save_index(layout.USER_INDEX, user_index)
        done(layout.USER_INDEX, "vector (index rebuilt)")

        if bundle.has(layout.NETWORK_WEIGHTS):
            spec = bundle.json(layout.NETWORK_SPEC)
            state = bundle.torch_state(layout.NETWORK_WEIGHTS)
            keys = _drop_state_rows(state, NETWORK_USER_ROWS.get(spec.get("class"), ()), keep_ext, n,
                                    bundle.root / layout.NETWORK_WEIGHTS)
            spec["n_users"] = len(keep)
            w.save_torch(layout.NETWORK_WEIGHTS, state)
            w.save_json(layout.NETWORK_SPEC, spec)
            done(layout.NETWORK_WEIGHTS, "rows of " + ", ".join(keys) if keys else "no per-user rows")
            written.add(layout.NETWORK_SPEC)

        if bundle.has(PROPENSITY_SCORES):
            scores = bundle.array(PROPENSITY_SCORES)
            if scores.shape[0] != n:
                raise BundleError(f"{bundle.root / PROPENSITY_SCORES}: {scores.shape[0]} scores for {n} users")
            w.save_array(PROPENSITY_SCORES, scores[keep])
            done(PROPENSITY_SCORES, "score")
            spec = bundle.json(PROPENSITY_SPEC)
            spec["n_users"] = len(keep)
            encoder = spec.get("encoder")
            if encoder and bundle.has(PROPENSITY_WEIGHTS):
                state = bundle.torch_state(PROPENSITY_WEIGHTS)
                names = [f"encoder.{k}" for k in NETWORK_USER_ROWS.get(encoder.get("class"), ())]
                keys = _drop_state_rows(state, names, keep_ext, int(encoder["n_users"]), bundle.root / PROPENSITY_WEIGHTS)
                encoder["n_users"] = len(keep)
                w.save_torch(PROPENSITY_WEIGHTS, state)
                done(PROPENSITY_WEIGHTS, "rows of " + ", ".join(keys) if keys else "no per-user rows")
            w.path(PROPENSITY_SPEC).write_text(json.dumps(spec, indent=1), encoding="utf-8")
            written.add(PROPENSITY_SPEC)

        for name, part in _user_aligned_files(bundle).items():
            path = bundle.root / name
            if name.endswith(".npy"):
                array = bundle.array(name)
                if array.shape[:1] != (n,):
                    raise BundleError(f"{path}: part {part!r} declares it user-aligned but it has shape {array.shape} for {n} users")
                w.save_array(name, array[keep])
            elif name.endswith(".json"):
                values = bundle.json(name)
                if not isinstance(values, list) or len(values) != n:
                    raise BundleError(f"{path}: part {part!r} declares it user-aligned but it is not a list of {n} entries")
                w.save_json(name, [values[i] for i in keep.tolist()])
            elif name.endswith(".parquet"):
                import pandas as pd

                table = pd.read_parquet(bundle.file(name))
                if len(table) != n:
                    raise BundleError(f"{path}: part {part!r} declares it user-aligned but it has {len(table)} rows for {n} users")
                table.iloc[keep].reset_index(drop=True).to_parquet(w.path(name), index=False)
            else:
                raise BundleError(f"{path}: cannot remove user rows from this file type (user-aligned files must be "
                                  ".npy, a JSON list or .parquet, one row per user in vocabulary order)")
            done(name, "row")

        for name in manifest["files"]:
            if name not in written:
                shutil.copyfile(bundle.root / name, w.path(name))

        content = {k: v for k, v in manifest.items() if k not in _MANIFEST_OWN}
        content["counts"] = {**content.get("counts", {}), "users": int(len(keep)), "seen_pairs": int(seen.nnz)}
        indexes = dict(content.get("indexes", {}))
        indexes["users"] = {"file": layout.USER_INDEX, **user_info}
        content["indexes"] = indexes
        privacy = dict(content.get("privacy") or {"pseudonymized": False})
        privacy["erasures"] = [*privacy.get("erasures", []), {**(erasure or {"time": _now()}), "users_removed": int(len(rows))}]
        content["privacy"] = privacy
        content.setdefault("trained_at", manifest.get("created_at"))
        w.commit(content)
    result["removed"] = removed
    return result


# -- the whole job -------------------------------------------------------------------------------
@contextlib.contextmanager
def _exclusive(path: Path):
    """One erasure at a time per erasure list (an advisory lock beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _append_audit(path: Path, entries: list[dict]) -> None:
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    atomic_write_text(path, existing + "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def settings_from_manifest(bundle: Bundle, erasure_list=None, audit_log=None, secret_env=None, secret_file=None,
                           pseudonymizer: Pseudonymizer | None = None) -> tuple[Path, Path, Pseudonymizer]:
    """(erasure list, audit log, key) for erasing from ``bundle``: the given values, else what the
    training run recorded in the manifest. The key must match a pseudonymised bundle's fingerprint."""
    recorded = bundle.manifest.get("privacy") or {}
    erasure_list = erasure_list or recorded.get("erasure_list")
    audit_log = audit_log or recorded.get("audit_log")
    if not erasure_list or not audit_log:
        raise ConfigError(f"{bundle.root}: the bundle records no erasure list / audit log; give erasure_list=FILE and audit_log=FILE")
    if pseudonymizer is None:
        pseudonymizer = Pseudonymizer.from_env(secret_env or recorded.get("secret_env") or DEFAULT_SECRET_ENV,
                                               secret_file or recorded.get("secret_file"),
                                               int(recorded.get("id_length", 32)))
    check_key(bundle.manifest, pseudonymizer)
    return Path(erasure_list), Path(audit_log), pseudonymizer


def pseudonyms_of(user_ids: Iterable[object], pseudonymizer: Pseudonymizer) -> list[str]:
    """Pseudonyms of raw ids (normalised like training does); entries already in the tagged form
    ``hmac-sha256:<fingerprint>:<pseudonym>`` are taken as they are (their key must match)."""
    raw, tagged = [], []
    for i, value in enumerate(user_ids):
        text = str(value).strip()
        tag = parse_tag(text)
        if tag is None:
            raw.append(text)
        elif tag[0] != pseudonymizer.fingerprint:
            raise ConfigError(f"user id #{i + 1} is a keyed hash made with another key (fingerprint {tag[0]}, "
                              f"configured {pseudonymizer.fingerprint})")
        else:
            tagged.append(tag[1])
    import pandas as pd

    normalised = normalize_ids(pd.Series(raw, dtype=object)).tolist() if raw else []
    if any(x == "" for x in normalised):
        raise ConfigError("an empty user id was given to forget; remove the blank entry")
    return list(dict.fromkeys([*pseudonymizer.many(normalised).tolist(), *tagged]))


def forget_users(artifacts: str | Path, user_ids: Iterable[object], *, erasure_list=None, audit_log=None,
                 secret_env: str | None = None, secret_file: str | None = None,
                 pseudonymizer: Pseudonymizer | None = None) -> dict[str, Any]:
    """Forget ``user_ids`` (raw external ids, or tagged keyed hashes): erasure list, bundle, audit.

    Paths and the secret default to what the bundle's manifest recorded at training time.
    Returns a summary without any raw id: ``requested``, ``removed_from_bundle``, ``not_in_bundle``,
    ``added_to_erasure_list``, ``erasure_list``, ``audit_log``, ``removed`` (file -> what).
    """
    bundle = Bundle.open(artifacts)
    list_path, audit_path, key = settings_from_manifest(bundle, erasure_list, audit_log, secret_env, secret_file, pseudonymizer)
    pseudonyms = pseudonyms_of(user_ids, key)
    if not pseudonyms:
        raise ConfigError("no user ids given to forget")
    with _exclusive(list_path):
        added = append_to_erasure_list(list_path, [key.tag(p) for p in pseudonyms])
        bundle = Bundle.open(artifacts)  # again, under the lock: another erasure may have just published
        vocab = IdVocab.load(bundle.file(layout.USER_VOCAB))
        pseudonymized = bool((bundle.manifest.get("privacy") or {}).get("pseudonymized"))
        vocab_keys = vocab.ids if pseudonymized else key.many(vocab.ids)
        row_of = {k: i for i, k in enumerate(vocab_keys.tolist())}
        rows = np.asarray([row_of.get(p, -1) for p in pseudonyms], dtype=np.int64)
        time = _now()
        result = erase_rows(bundle, rows[rows >= 0], {"time": time, "audit_log": str(audit_path)})
        seen_by_row = dict(zip(np.unique(rows[rows >= 0]).tolist(), result["seen_items"].tolist()))
        entries = []
        for p, row in zip(pseudonyms, rows.tolist()):
            removed = {}
            if row >= 0:
                removed = dict(result["removed"])
                removed[layout.SEEN_ITEMS] = f"{seen_by_row[row]} seen items"
            entries.append({"time": time, "user": key.tag(p), "bundle": str(Path(artifacts).absolute()),
                            "in_bundle": row >= 0, "removed": removed, "erasure_list": str(list_path),
                            "note": WEIGHTS_NOTE})
        _append_audit(audit_path, entries)
    summary = {"requested": len(pseudonyms), "removed_from_bundle": int((rows >= 0).sum()),
               "not_in_bundle": int((rows < 0).sum()), "added_to_erasure_list": added,
               "erasure_list": str(list_path), "audit_log": str(audit_path), "removed": result["removed"],
               "users_after": result["users_after"]}
    log.info("forget: %d users requested, %d removed from %s, %d not in the bundle; erasure list %s, audit %s",
             summary["requested"], summary["removed_from_bundle"], artifacts, summary["not_in_bundle"], list_path, audit_path)
    return summary


class ErasureService:
    """Erasure for a running server: :func:`forget_users` on its bundle, then the new bundle loaded.

    artifacts: the served bundle; load: builds a Recommender from it (the server's settings);
    settings: ``erasure_list``, ``audit_log``, ``secret_env``, ``secret_file``, ``pseudonymizer``
    for :func:`forget_users` (default: what the manifest recorded).
    """

    def __init__(self, artifacts: str | Path, load, **settings):
        import threading

        self.artifacts, self.load, self.settings = Path(artifacts), load, settings
        self._lock = threading.Lock()

    def forget(self, user_ids: Iterable[object]):
        """(summary, the reloaded Recommender). One erasure at a time."""
        with self._lock:
            summary = forget_users(self.artifacts, list(user_ids), **self.settings)
            return summary, self.load()
