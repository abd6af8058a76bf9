"""``PrivacyOptions``: the ``privacy`` config group as one object shared by loading, training,
export and erasure."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dmp_dl.data.erasure_list import ErasureEntries, read_erasure_list
from dmp_dl.data.pseudonymize import DEFAULT_SECRET_ENV, Pseudonymizer, pseudonymize_ids, pseudonymize_log
from dmp_dl.data.schema import USER, normalize_ids

log = logging.getLogger(__name__)


def log_user_ids(raw) -> np.ndarray:
    """The distinct normalised user ids of an :class:`~dmp_dl.data.schema.EventLog`'s events and
    user table."""
    ids = normalize_ids(raw.events[USER]).unique().astype(str)
    if raw.users is not None and USER in raw.users.columns:
        ids = np.union1d(ids, normalize_ids(raw.users[USER]).unique().astype(str))
    return ids


class PrivacyOptions:
    """What ``conf/privacy/default.yaml`` configures (a plain class, so that it can be handed to
    Hydra's ``instantiate`` as an object).

    pseudonymize: replace every external user id by its keyed pseudonym on load.
    secret_env / secret_file: where the HMAC secret is read from (the file wins when both are set);
        the secret itself is never stored in the config, the bundle or a log.
    id_length: hex digits of a pseudonym.
    erasure_list: the list ``forget`` appends to and every training run honours (absent until
        the first erasure); audit_log: the JSON-lines audit trail of erasures.
    dp: :class:`~dmp_dl.privacy.dp.DPOptions` (or None).
    """

    def __init__(self, pseudonymize: bool = False, secret_env: str | None = DEFAULT_SECRET_ENV,
                 secret_file: str | None = None, id_length: int = 32, erasure_list: str | None = None,
                 audit_log: str | None = None, dp: Any = None):
        self.pseudonymize = bool(pseudonymize)
        self.secret_env = secret_env or None
        self.secret_file = str(Path(secret_file).absolute()) if secret_file else None
        self.id_length = int(id_length)
        # absolute, so that the bundle records a list the forget job finds from any directory
        self.erasure_list = str(Path(erasure_list).absolute()) if erasure_list else None
        self.audit_log = str(Path(audit_log).absolute()) if audit_log else None
        self.dp = dp
        self._pseudonymizer: Pseudonymizer | None = None

    def pseudonymizer(self) -> Pseudonymizer:
        """The keyed hash (loaded once); :class:`~dmp_dl.core.errors.ConfigError` when no secret is set."""
        if self._pseudonymizer is None:
            self._pseudonymizer = Pseudonymizer.from_env(self.secret_env, self.secret_file, self.id_length)
        return self._pseudonymizer

    @property
    def dp_enabled(self) -> bool:
        return self.dp is not None and bool(getattr(self.dp, "enabled", False))

    # -- loading ------------------------------------------------------------------------------
    def prepare_log(self, raw, extra_erasure_list: str | None = None):
        """Resolve the erasure lists (``privacy.erasure_list`` when it exists, plus
        ``extra_erasure_list``, which must exist) against the raw ids of ``raw`` (an
        :class:`~dmp_dl.data.schema.EventLog`, straight from its source), then pseudonymise the log
        when configured. Returns (log, the ids to drop, in the log's id space).

        Keyed-hash entries need the secret (the run's, or the configured one when the run does not
        pseudonymise); salted and raw entries need nothing."""
        p = self.pseudonymizer() if self.pseudonymize else None
        entries = ErasureEntries()
        applied: list[str] = []  # "FILE (N entries, the setting)" of each list that holds entries
        for path, setting, required in ((extra_erasure_list, "data.erasure_list", True),
                                        (self.erasure_list, "privacy.erasure_list", False)):
            if path:
                before = len(entries)
                read_erasure_list(path, entries, required=required)
                if len(entries) > before:
                    applied.append(f"{Path(path).absolute()} ({len(entries) - before} entries, {setting})")
        erased: set[str] = set()
        if len(entries):
            ids = log_user_ids(raw)
            pseudonyms = pseudonymize_ids(pd.Series(ids, dtype=object), p).to_numpy() if p is not None else None
            key = p if p is not None else (self.pseudonymizer() if entries.tagged else None)
            found = entries.resolve(ids, key, pseudonyms)
            erased = set((pseudonyms if p is not None else ids)[found].tolist())
            # One line, so that a list left behind by `forget` in the folder a run starts from is never silent.
            log.info("erasure list applied: %s; %d of the log's users erased", " and ".join(applied), len(erased))
        if p is not None:
            raw = pseudonymize_log(raw, p)
        return raw, erased

    # -- the bundle --------------------------------------------------------------------------
    def manifest_entry(self, dp_report: dict | None = None) -> dict:
        """The bundle manifest's ``privacy`` entry: whether ids are pseudonymised (and the key's
        fingerprint, never the key), where the secret is read from, the erasure list and audit log
        paths, and the DP guarantee of the run."""
        entry: dict[str, Any] = {"pseudonymized": False}
        if self.pseudonymize:
            entry.update(self.pseudonymizer().manifest_entry())
        entry.update({"secret_env": self.secret_env, "secret_file": self.secret_file,
                      "erasure_list": self.erasure_list, "audit_log": self.audit_log,
                      "dp": dp_report, "erasures": []})
        return entry
