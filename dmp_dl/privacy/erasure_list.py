"""The erasure list: who has been forgotten, so that no later training run sees them again.

A text file, one entry per line (blank lines and lines starting with ``#`` are ignored):

* ``hmac-sha256:<key fingerprint>:<pseudonym>``: what ``python -m dmp_dl.privacy forget`` and the
  HTTP erasure endpoint append. No raw id is stored; the fingerprint names the key, so a list
  used with a different key is refused instead of silently matching nobody.
* anything else: a raw user id (a hand-written list; matched after id normalisation).

Training reads the list configured as ``privacy.erasure_list`` (absent until the first erasure)
and, when set, ``data.erasure_list``; their users' events and user-table rows are dropped on
load and counted as ``erased_user`` in ``data_quality.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dmp_dl.data.schema import normalize_ids
from dmp_dl.errors import ConfigError, DataError
from dmp_dl.io import atomic_write_text
from dmp_dl.privacy.pseudonymize import Pseudonymizer, parse_tag

log = logging.getLogger(__name__)

HEADER = ("# dmp_dl erasure list: one erased user per line, as hmac-sha256:<key fingerprint>:<pseudonym>.\n"
          "# Training runs drop these users; keep this file with the data and never edit entries out.\n")


@dataclass
class ErasureEntries:
    """The parsed contents of one or more erasure lists.

    raw_ids: raw (normalised) user ids.
    tagged: pseudonym -> (file, line) of tagged entries; fingerprints: the key fingerprint of each
    tagged entry's (file, line).
    """

    raw_ids: set[str] = field(default_factory=set)
    tagged: dict[str, tuple[str, int]] = field(default_factory=dict)
    fingerprints: dict[tuple[str, int], str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.raw_ids) + len(self.tagged)

    def check_key(self, pseudonymizer: Pseudonymizer) -> None:
        """Refuse tagged entries made with another key (they would match nobody)."""
        for (path, line), fp in self.fingerprints.items():
            if fp != pseudonymizer.fingerprint:
                raise ConfigError(
                    f"{path}, line {line}: erasure entry made with the key of fingerprint {fp}, but the configured "
                    f"secret has fingerprint {pseudonymizer.fingerprint}. Erased users would come back: use the "
                    "secret the list was written with (privacy.secret_env / privacy.secret_file)")

    def resolve(self, ids: Iterable[str], pseudonymizer: Pseudonymizer | None, ids_are_pseudonyms: bool) -> set[str]:
        """The members of ``ids`` (the distinct user ids of a log, pseudonyms when
        ``ids_are_pseudonyms``) that are on the list.

        Tagged entries need ``pseudonymizer`` (the key): with raw ids in the log, each id is hashed
        to compare; raw entries are hashed instead when the log holds pseudonyms.
        """
        ids = np.asarray(list(ids), dtype=object)
        if (self.tagged or (self.raw_ids and ids_are_pseudonyms)) and pseudonymizer is None:
            where = next(iter(self.tagged.values()), ("the erasure list", 0))[0]
            raise ConfigError(f"{where} holds keyed-hash entries: the pseudonymisation secret is needed to apply it "
                              "(set $DMP_PSEUDONYM_KEY or privacy.secret_env / privacy.secret_file)")
        if pseudonymizer is not None:
            self.check_key(pseudonymizer)
        if ids_are_pseudonyms:
            wanted = set(self.tagged) | {pseudonymizer.one(r) for r in self.raw_ids}
            return {str(x) for x in ids if x in wanted}
        found = {str(x) for x in ids if x in self.raw_ids}
        if self.tagged:
            hashed = pseudonymizer.many(ids)
            found |= {str(x) for x, h in zip(ids.tolist(), hashed.tolist()) if h in self.tagged}
        return found


def read_erasure_list(path: str | Path, entries: ErasureEntries | None = None, required: bool = True) -> ErasureEntries:
    """Parse ``path`` into ``entries`` (a new :class:`ErasureEntries` by default).

    A missing file is an error when ``required`` (an explicitly configured list), else empty (the
    default list before the first erasure). A malformed tagged line is refused naming the line.
    """
    path = Path(path)
    entries = entries if entries is not None else ErasureEntries()
    if not path.exists():
        if required:
            raise DataError(f"erasure list not found: {path} (set data.erasure_list to an existing file or null)")
        return entries
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: the erasure list cannot be read ({exc}); restore it from a backup") from None
    raw = []
    for number, text in enumerate(lines, start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        try:
            tag = parse_tag(text)
        except ValueError as exc:
            raise DataError(f"{path}, line {number}: {exc}") from None
        if tag is None:
            raw.append(text)
        else:
            entries.tagged.setdefault(tag[1], (str(path), number))
            entries.fingerprints[(str(path), number)] = tag[0]
    if raw:
        entries.raw_ids |= set(normalize_ids(pd.Series(raw, dtype=object)).tolist())
    return entries


def append_to_erasure_list(path: str | Path, tags: Iterable[str]) -> int:
    """Add tagged entries (``Pseudonymizer.tag``) not yet on the list at ``path`` (created with a
    header when absent), atomically. Returns how many were added."""
    path = Path(path)
    existing = path.read_text(encoding="utf-8") if path.exists() else HEADER
    present = {line.strip() for line in existing.splitlines()}
    new = [t for t in dict.fromkeys(tags) if t not in present]
    if new:
        text = existing if existing.endswith("\n") or not existing else existing + "\n"
        atomic_write_text(path, text + "".join(t + "\n" for t in new))
    return len(new)
