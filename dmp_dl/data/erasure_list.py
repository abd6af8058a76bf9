"""The erasure list: who has been forgotten, so that no later training run sees them again.

A text file, one entry per line (blank lines and lines starting with ``#`` are ignored):

* ``hmac-sha256:<key fingerprint>:<pseudonym>``: a keyed hash, what ``forget`` writes for a bundle
  whose ids are pseudonymised (and for any bundle when it is given ``secret_env``/``secret_file``).
  Applying it needs the secret; the fingerprint names the key, so a list used with a different key
  is refused instead of silently matching nobody.
* ``salted-sha256:<salt>:<hash>``: a salted hash, what ``forget`` writes for a bundle of raw ids
  without a configured secret: ``hash`` is the first 32 hex digits of HMAC-SHA256 keyed with the
  16-byte ``salt`` (hex) of the id. The salt travels in the entry (one random salt per list), so
  any run can apply the list without a secret, and no raw id is written. Unlike a keyed hash it
  does not stop someone holding the list from testing a guessed id: pseudonymise (or give
  ``forget`` a secret) when that matters.
* anything else: a raw user id (a hand-written list; matched after id normalisation).

Training reads the list configured as ``privacy.erasure_list`` (absent until the first erasure)
and, when set, ``data.erasure_list``; their users' events and user-table rows are dropped on
load and counted as ``erased_user`` in ``data_quality.json``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.core.io import atomic_write_text
from dmp_dl.data.pseudonymize import Pseudonymizer, hash_each_distinct, parse_tag
from dmp_dl.data.schema import normalize_ids

log = logging.getLogger(__name__)

SALTED_PREFIX = "salted-sha256:"
SALT_BYTES, SALTED_LENGTH = 16, 32
HEADER = ("# dmp_dl erasure list: one erased user per line, as hmac-sha256:<key fingerprint>:<pseudonym> (keyed) or\n"
          "# salted-sha256:<salt>:<hash> (salted). Training runs drop these users; keep it with the data, never edit entries out.\n")
_HEX = set("0123456789abcdef")


class SaltedHash:
    """The salted hash of an erasure list: HMAC-SHA256 keyed with a public random salt.

    salt: 16 bytes (a new random one when None).
    """

    def __init__(self, salt: bytes | None = None):
        self.salt = secrets.token_bytes(SALT_BYTES) if salt is None else bytes(salt)
        if len(self.salt) != SALT_BYTES:
            raise ValueError(f"a salt has {SALT_BYTES} bytes, got {len(self.salt)}")

    def one(self, external_id: object) -> str:
        return hmac.new(self.salt, str(external_id).encode("utf-8"), hashlib.sha256).hexdigest()[:SALTED_LENGTH]

    def many(self, ids: Iterable[object]) -> np.ndarray:
        """Hashes (n,) object array of ``ids``; each distinct id is hashed once."""
        return hash_each_distinct(ids, self.one)

    def tag(self, hashed: str) -> str:
        return f"{SALTED_PREFIX}{self.salt.hex()}:{hashed}"


def parse_salted(text: str) -> tuple[str, str] | None:
    """(salt hex, hash) of a salted entry, or None when ``text`` is not one."""
    if not text.startswith(SALTED_PREFIX):
        return None
    parts = text[len(SALTED_PREFIX):].split(":")
    if (len(parts) != 2 or len(parts[0]) != 2 * SALT_BYTES or len(parts[1]) != SALTED_LENGTH
            or not set("".join(parts)) <= _HEX):
        raise ValueError(f"malformed salted-sha256 entry: expected {SALTED_PREFIX}<{2 * SALT_BYTES} hex digits of salt>:"
                         f"<{SALTED_LENGTH} hex digits of hash>")
    return parts[0], parts[1]


@dataclass
class ErasureEntries:
    """The parsed contents of one or more erasure lists.

    raw_ids: raw (normalised) user ids.
    tagged: pseudonym -> (file, line) of keyed-hash entries; fingerprints: the key fingerprint of
    each keyed entry's (file, line).
    salted: salt (hex) -> {hash: (file, line)} of salted entries.
    """

    raw_ids: set[str] = field(default_factory=set)
    tagged: dict[str, tuple[str, int]] = field(default_factory=dict)
    fingerprints: dict[tuple[str, int], str] = field(default_factory=dict)
    salted: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.raw_ids) + len(self.tagged) + sum(len(h) for h in self.salted.values())

    @property
    def salt(self) -> bytes | None:
        """The salt of the first salted entry (new salted entries reuse it), or None."""
        return bytes.fromhex(next(iter(self.salted))) if self.salted else None

    def check_key(self, pseudonymizer: Pseudonymizer, how: str = "privacy.secret_env / privacy.secret_file") -> None:
        """Refuse keyed entries made with another key (they would match nobody)."""
        for (path, line), fp in self.fingerprints.items():
            if fp != pseudonymizer.fingerprint:
                raise ConfigError(
                    f"{path}, line {line}: erasure entry made with the key of fingerprint {fp}, but the configured "
                    f"secret has fingerprint {pseudonymizer.fingerprint}. Erased users would come back: use the "
                    f"secret the list was written with ({how})")

    def resolve(self, ids: Iterable[str], pseudonymizer: Pseudonymizer | None,
                pseudonyms: Iterable[str] | None = None) -> np.ndarray:
        """(n,) bool: which of ``ids`` (distinct raw, normalised user ids) are on the list.

        Raw and salted entries are matched against ``ids``; keyed entries against ``pseudonyms``
        (the ids' pseudonyms, aligned with ``ids``) when given, else against the ids hashed with
        ``pseudonymizer`` (the key), which keyed entries need.
        """
        ids = np.asarray(list(ids), dtype=object)
        found = np.fromiter((x in self.raw_ids for x in ids.tolist()), dtype=bool, count=len(ids))
        if self.tagged:
            if pseudonymizer is None:
                where = next(iter(self.tagged.values()))
                raise ConfigError(f"{where[0]}, line {where[1]}: a keyed-hash (hmac-sha256) entry: the pseudonymisation "
                                  "secret is needed to apply the list (set $DMP_PSEUDONYM_KEY or privacy.secret_env / "
                                  "privacy.secret_file)")
            self.check_key(pseudonymizer)
            hashed = np.asarray(list(pseudonyms), dtype=object) if pseudonyms is not None else pseudonymizer.many(ids)
            found |= np.fromiter((h in self.tagged for h in hashed.tolist()), dtype=bool, count=len(ids))
        for salt, hashes in self.salted.items():
            hashed = SaltedHash(bytes.fromhex(salt)).many(ids)
            found |= np.fromiter((h in hashes for h in hashed.tolist()), dtype=bool, count=len(ids))
        return found


def _check_regular(path: Path, what: str) -> None:
    """Refuse a FIFO, device or folder where a text file belongs (reading a FIFO would hang)."""
    import stat

    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise DataError(f"{what} {path} is {kind}; point it at a text file")


def read_erasure_list(path: str | Path, entries: ErasureEntries | None = None, required: bool = True) -> ErasureEntries:
    """Parse ``path`` into ``entries`` (a new :class:`ErasureEntries` by default).

    A missing file is an error when ``required`` (an explicitly configured list), else empty (the
    default list before the first erasure). A malformed hash line is refused naming the line.
    """
    path = Path(path)
    entries = entries if entries is not None else ErasureEntries()
    if not path.exists():
        if required:
            raise DataError(f"erasure list not found: {path} (set data.erasure_list to an existing file or null)")
        return entries
    try:
        _check_regular(path, "erasure list")
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a list saved by an editor may start with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: the erasure list cannot be read ({exc}); restore it from a backup") from None
    raw = []
    for number, text in enumerate(lines, start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        try:
            tag, salted = parse_tag(text), parse_salted(text)
        except ValueError as exc:
            raise DataError(f"{path}, line {number}: {exc}") from None
        if tag is not None:
            entries.tagged.setdefault(tag[1], (str(path), number))
            entries.fingerprints[(str(path), number)] = tag[0]
        elif salted is not None:
            entries.salted.setdefault(salted[0], {}).setdefault(salted[1], (str(path), number))
        else:
            raw.append(text)
    if raw:
        entries.raw_ids |= set(normalize_ids(pd.Series(raw, dtype=object)).tolist())
    return entries


def bundle_erasure_lists(manifest: object, extra: str | os.PathLike | None = None) -> list[Path]:
    """Every erasure list that names a bundle, as absolute paths without repeats: the one its
    training run recorded (``privacy.erasure_list``), each one an erasure wrote to
    (``privacy.erasures[].erasure_list``: ``forget erasure_list=FILE`` records its list there), and
    ``extra`` (a server's own setting). A server honours all of them, so that no list a user was
    erased into is forgotten by a reload or a restart."""
    privacy = manifest.get("privacy") if isinstance(manifest, dict) else None
    privacy = privacy if isinstance(privacy, dict) else {}
    named = [privacy.get("erasure_list")]
    named += [e.get("erasure_list") for e in privacy.get("erasures") or [] if isinstance(e, dict)]
    named.append(extra)
    out: dict[str, Path] = {}
    for path in named:
        if path:
            absolute = Path(path).absolute()
            out.setdefault(os.path.realpath(absolute), absolute)
    return list(out.values())


def append_to_erasure_list(path: str | Path, tags: Iterable[str]) -> int:
    """Add entries (keyed or salted tags) not yet on the list at ``path`` (created with a header
    when absent), atomically. Returns how many were added."""
    path = Path(path)
    existing = path.read_text(encoding="utf-8-sig") if path.exists() else HEADER
    present = {line.strip() for line in existing.splitlines()}
    new = [t for t in dict.fromkeys(tags) if t not in present]
    if new:
        text = existing if existing.endswith("\n") or not existing else existing + "\n"
        # a new list is its owner's alone; an existing one keeps the permissions its operator gave it
        atomic_write_text(path, text + "".join(t + "\n" for t in new), mode=None if path.exists() else 0o600)
    return len(new)
