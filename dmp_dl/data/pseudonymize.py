"""Keyed pseudonyms for external user ids: HMAC-SHA256 with a secret that never leaves the process.

A pseudonym is the first ``length`` hex digits of ``HMAC-SHA256(secret, id)`` (default 32, i.e.
128 bits: collisions are negligible at any realistic number of users). The same id and secret
always give the same pseudonym; without the secret a pseudonym cannot be linked to an id, even by
hashing candidate ids (unlike a plain hash).

The secret comes from an environment variable or a file, is never written anywhere, and is known
to artifacts only by its *fingerprint* (an HMAC of a fixed label, not of any id), which lets a
bundle refuse a wrong key with a clear message.

``tag`` renders an id as ``hmac-sha256:<fingerprint>:<pseudonym>``: the form the erasure list and
the audit log store, which names the key it was made with.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from dmp_dl.core.errors import BundleError, ConfigError
from dmp_dl.data.cleaning import MISSING_TOKENS
from dmp_dl.data.distinct import per_distinct
from dmp_dl.data.schema import USER, EventLog, normalize_ids

ALGORITHM = "hmac-sha256"
TAG_PREFIX = ALGORITHM + ":"
DEFAULT_SECRET_ENV = "DMP_PSEUDONYM_KEY"
MIN_SECRET_BYTES = 16
_FINGERPRINT_LABEL = b"dmp_dl key fingerprint v1"


def load_secret(secret_env: str | None = DEFAULT_SECRET_ENV, secret_file: str | os.PathLike | None = None,
                keys: tuple[str, str] = ("privacy.secret_env", "privacy.secret_file")) -> bytes:
    """The secret: the contents of ``secret_file`` when given (surrounding whitespace stripped),
    else the environment variable ``secret_env``.

    Raises :class:`ConfigError` (without ever echoing the secret) when neither is set, the file is
    unreadable, or the secret is shorter than 16 bytes. ``keys``: the names of the two settings in
    the command that reads them, for the message (``secret_env``/``secret_file`` for ``forget``).
    """
    env_key, file_key = keys
    if secret_file:
        path = Path(secret_file)
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{file_key}: cannot read {path} ({exc.strerror or exc}); "
                              "point it at the file holding the pseudonymisation secret") from None
        where = f"the file {path} ({file_key})"
    else:
        value = os.environ.get(secret_env or "", "")
        if not value:
            raise ConfigError(
                f"no pseudonymisation secret: set the environment variable ${secret_env or DEFAULT_SECRET_ENV} "
                f"({env_key}) or {file_key}=FILE to a secret of at least "
                f"{MIN_SECRET_BYTES} bytes, e.g. `export {secret_env or DEFAULT_SECRET_ENV}=$(openssl rand -hex 32)`")
        secret = value.strip().encode("utf-8")
        where = f"${secret_env} ({env_key})"
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the pseudonymisation secret in {where} is {len(secret)} bytes; use at least "
                          f"{MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)")
    return secret


def hash_each_distinct(ids: Iterable[object], one: Callable[[str], str]) -> np.ndarray:
    """``one(str(id))`` of every id of ``ids`` as an (n,) object array, each distinct id hashed once."""
    text = pd.Series([str(x) for x in ids], dtype=object)
    return per_distinct(text, lambda values: values.map(one), merge=False).take().astype(object, copy=False)


class Pseudonymizer:
    """Maps external ids to keyed pseudonyms.

    Parameters
    ----------
    secret: the key (at least 16 bytes); never stored by this object in any printable form.
    length: hex digits kept of the 64-digit HMAC (16..64).
    """

    def __init__(self, secret: bytes, length: int = 32):
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"the pseudonymisation secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
        if not 16 <= int(length) <= 64:
            raise ConfigError(f"privacy.id_length must be in 16..64 hex digits, got {length}")
        self._secret = bytes(secret)
        self.length = int(length)
        self.fingerprint = hmac.new(self._secret, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]

    @classmethod
    def from_env(cls, secret_env: str | None = DEFAULT_SECRET_ENV, secret_file: str | os.PathLike | None = None,
                 length: int = 32, keys: tuple[str, str] = ("privacy.secret_env", "privacy.secret_file")) -> "Pseudonymizer":
        return cls(load_secret(secret_env, secret_file, keys), length)

    def __repr__(self) -> str:  # never the secret
        return f"Pseudonymizer({ALGORITHM}, fingerprint={self.fingerprint}, length={self.length})"

    def one(self, external_id: object) -> str:
        """The pseudonym of one id (its string form)."""
        return hmac.new(self._secret, str(external_id).encode("utf-8"), hashlib.sha256).hexdigest()[: self.length]

    def many(self, ids: Iterable[object]) -> np.ndarray:
        """Pseudonyms (n,) object array of ``ids``; each distinct id is hashed once."""
        return hash_each_distinct(ids, self.one)

    def tag(self, pseudonym: str) -> str:
        """``hmac-sha256:<fingerprint>:<pseudonym>``: a pseudonym that names its key."""
        return f"{TAG_PREFIX}{self.fingerprint}:{pseudonym}"

    def manifest_entry(self) -> dict:
        """What a bundle records about its ids (the fingerprint, never the key)."""
        return {"pseudonymized": True, "algorithm": ALGORITHM, "id_length": self.length, "key_fingerprint": self.fingerprint}


def recorded_privacy(manifest: object) -> dict:
    """A manifest's ``privacy`` entry (``{}`` when it has none; the schema of
    :mod:`dmp_dl.store.manifest` guarantees an object in a verified bundle)."""
    entry = manifest.get("privacy") if isinstance(manifest, dict) else None
    return entry if isinstance(entry, dict) else {}


def check_key(manifest: dict, pseudonymizer: Pseudonymizer) -> None:
    """:class:`BundleError` when a bundle whose ids are pseudonymised was made with another key."""
    recorded = recorded_privacy(manifest)
    if recorded.get("pseudonymized") and recorded.get("key_fingerprint") != pseudonymizer.fingerprint:
        raise BundleError(
            f"the pseudonymisation secret (fingerprint {pseudonymizer.fingerprint}) is not the one this bundle's ids were "
            f"made with (fingerprint {recorded.get('key_fingerprint')}); set ${recorded.get('secret_env') or DEFAULT_SECRET_ENV} "
            "or privacy.secret_file to that secret")


def bundle_pseudonymizer(manifest: dict, where: object, pseudonymizer: Pseudonymizer | None = None) -> Pseudonymizer | None:
    """The key for querying a bundle by raw user id: None when its ids are not pseudonymised; else
    ``pseudonymizer`` or the secret from where the training run read it (the manifest records the
    environment variable / file name, never the secret), checked against the recorded fingerprint."""
    recorded = recorded_privacy(manifest)
    if not recorded.get("pseudonymized"):
        return None
    if pseudonymizer is None:
        try:
            pseudonymizer = Pseudonymizer.from_env(recorded.get("secret_env") or DEFAULT_SECRET_ENV,
                                                   recorded.get("secret_file"), int(recorded.get("id_length", 32)))
        except ConfigError as exc:
            raise BundleError(f"{where}: the bundle's user ids are pseudonymised and answering by raw id needs its secret: {exc}") from None
    check_key(manifest, pseudonymizer)
    return pseudonymizer


def parse_tag(text: str) -> tuple[str, str] | None:
    """(fingerprint, pseudonym) of a tagged entry, or None when ``text`` is not one.

    A text with the prefix but not the form raises ValueError (which does not echo the text)."""
    if not text.startswith(TAG_PREFIX):
        return None
    parts = text[len(TAG_PREFIX):].split(":")
    if (len(parts) != 2 or len(parts[0]) != 16 or not 16 <= len(parts[1]) <= 64
            or not all(c in "0123456789abcdef" for c in "".join(parts))):
        raise ValueError(f"malformed {ALGORITHM} entry: expected {TAG_PREFIX}<16 hex digits of key fingerprint>:"
                         "<16 to 64 hex digits of pseudonym>")
    return parts[0], parts[1]


def pseudonymize_ids(values: pd.Series, pseudonymizer: Pseudonymizer) -> pd.Series:
    """Normalised ids (see :func:`dmp_dl.data.schema.normalize_ids`) replaced by pseudonyms.

    Missing ids (empty, ``nan``, ``null``, ...) are kept as they are so that cleaning still counts
    them as missing instead of treating a hash of "nan" as a user. An id already in the tagged form
    ``hmac-sha256:<fingerprint>:<pseudonym>`` (what the real-time journal of a pseudonymised bundle
    holds) is that pseudonym; one made with another key is refused.
    """
    ids = normalize_ids(values)
    missing = ids.str.lower().isin(MISSING_TOKENS).to_numpy()
    tagged = ids.str.startswith(TAG_PREFIX).to_numpy() & ~missing
    out = ids.to_numpy(dtype=object).copy()
    out[~missing & ~tagged] = pseudonymizer.many(out[~missing & ~tagged])
    if tagged.any():
        prefix = f"{TAG_PREFIX}{pseudonymizer.fingerprint}:"
        given = ids[tagged]
        foreign = ~given.str.startswith(prefix).to_numpy()
        if foreign.any():
            raise ConfigError(f"user id {given.iloc[int(np.flatnonzero(foreign)[0])]!r} is a pseudonym made with another "
                              f"key than the configured one (fingerprint {pseudonymizer.fingerprint}); set the secret "
                              "the events were pseudonymised with")
        out[tagged] = given.str.slice(len(prefix)).to_numpy(dtype=object)
    return pd.Series(out, index=values.index, dtype=object)


def pseudonymize_log(raw, pseudonymizer: Pseudonymizer):
    """The raw :class:`~dmp_dl.data.schema.EventLog` with every user id replaced by its pseudonym:
    the events' and the user table's ``user_id`` and the index of the ``meta`` series whose key
    starts with ``user`` (a source's per-user ground truth, e.g. the synthetic ``user_segment``).
    Runs before cleaning, so no raw user id reaches the vocabularies, the reports, the logs or the
    bundle."""
    events = raw.events.copy()
    users_table = raw.users
    if USER in events.columns:
        events[USER] = pseudonymize_ids(events[USER], pseudonymizer)
    if raw.users is not None and USER in raw.users.columns:
        users_table = raw.users.copy()
        users_table[USER] = pseudonymize_ids(users_table[USER], pseudonymizer)
    meta = dict(raw.meta)
    for key, value in meta.items():
        if isinstance(value, pd.Series) and str(key).startswith("user"):
            index = pseudonymize_ids(pd.Series(value.index, dtype=object), pseudonymizer).to_numpy()
            meta[key] = pd.Series(value.to_numpy(), index=index, name=value.name)
    return EventLog(events, users_table, raw.items, raw.source, meta)
