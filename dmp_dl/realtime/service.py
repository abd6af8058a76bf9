"""The real-time path of a server: events in, journaled, applied; replayed on start and reload.

:class:`RealtimeService` owns the journal (one per server, across bundle reloads) and the live view
of the bundle being served (:class:`~dmp_dl.realtime.live.LiveRecommender`):

* :meth:`RealtimeService.ingest`: clean a batch (:mod:`dmp_dl.realtime.intake`), append the accepted
  events to the journal, apply them to the live users, fsync, answer. Batches are journaled and
  applied one at a time, in the same order; fsyncs of concurrent batches are shared.
* :meth:`RealtimeService.attach`: a live view of a freshly loaded bundle (server start, ``/reload``,
  the reload after ``/erase``): rows of erased users are removed from the journal, and the rows the
  bundle was not trained on (after the sequence number its manifest records for this journal, or
  all of them for a bundle that never read it) are applied again. Replaying twice gives the same state.
* a background thread rebuilds the lookalike user index of the live view when it has changes
  older than ``lookalike_refresh_seconds``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dmp_dl.bundle import Bundle
from dmp_dl.data.schema import EVENT_ID, USER
from dmp_dl.errors import BundleError, ConfigError, DmpError
from dmp_dl.realtime.intake import ErasedUsers, EventIntake, KeySet, _event_hashes, bundle_cleaning
from dmp_dl.realtime.journal import JOURNAL_ID, JOURNAL_SEQ, Journal, iso_seconds, read_journal
from dmp_dl.realtime.live import LiveRecommender
from dmp_dl.privacy.pseudonymize import TAG_PREFIX
from dmp_dl.realtime.part import load_realtime_part
from dmp_dl.recommender import InvalidRequestError, Recommender

log = logging.getLogger(__name__)

REPLAY_CHUNK = 200_000  # journal rows cleaned and applied at a time when replaying


class JournalError(DmpError):
    """The journal cannot be written: nothing of the batch was acknowledged."""


@dataclass
class RealtimeOptions:
    """``realtime`` in ``conf/serve.yaml``.

    enabled: accept ``POST /events`` (and keep a journal); segment_bytes: journal file size at which
    a new file is started; lookalike_refresh_seconds: the most a lookalike's user index lags the events.
    """

    enabled: bool = True
    segment_bytes: int = 64 << 20
    lookalike_refresh_seconds: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.segment_bytes, bool) or not isinstance(self.segment_bytes, int) or self.segment_bytes < 4096:
            raise ConfigError(f"realtime.segment_bytes must be an integer >= 4096, got {self.segment_bytes!r}")
        try:
            refresh = float(self.lookalike_refresh_seconds)
        except (TypeError, ValueError):
            refresh = -1.0
        if not np.isfinite(refresh) or refresh < 0:
            raise ConfigError(f"realtime.lookalike_refresh_seconds must be a number >= 0, got {self.lookalike_refresh_seconds!r}")
        self.lookalike_refresh_seconds = refresh

    @classmethod
    def from_config(cls, node: Mapping | None) -> "RealtimeOptions":
        node = dict(node or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ConfigError(f"realtime.{unknown[0]} is not a setting (known: {', '.join(sorted(known))})")
        return cls(**node)


def default_journal_dir(artifacts: str | os.PathLike) -> Path:
    """Where a bundle's journal lives unless ``journal=DIR`` says otherwise: ``<bundle>.journal``
    beside the bundle folder (outside it: an export replaces the bundle folder as a whole)."""
    path = Path(artifacts).absolute()
    return path.with_name(path.name + ".journal")


def _id_space(rec: Recommender) -> dict:
    p = rec.pseudonymizer
    return {"pseudonymized": p is not None, "key_fingerprint": p.fingerprint if p is not None else None}


class RealtimeService:
    """One journal and the live view of the bundle served (see the module docstring).

    journal_dir: the journal folder (created on the first :meth:`attach`); options: :class:`RealtimeOptions`;
    erasure_list: the erasure list whose users' events are refused and removed from the journal
    (default: the one the served bundle's manifest records, which erasure uses too).
    """

    def __init__(self, journal_dir: str | os.PathLike, options: RealtimeOptions | None = None, erasure_list=None):
        self.journal_dir = Path(journal_dir).absolute()
        self.options = options or RealtimeOptions()
        self.erasure_list = erasure_list  # default: the list each bundle's training run recorded
        self.journal: Journal | None = None
        self.current: LiveRecommender | None = None
        self.seen = KeySet()
        self.last_purged = 0
        self._lock = threading.RLock()  # one batch journaled + applied at a time; attach waits for it
        self._broken: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def refreshing(self) -> bool:
        """Whether a background thread keeps the lookalike user index fresh."""
        return self._thread is not None and self._thread.is_alive()

    def describe(self) -> dict:
        """The journal's id, its last sequence number and the event keys known (no paths: ``/health``
        answers without a token)."""
        return {"journal_id": self.journal.id if self.journal else None,
                "journal_last_seq": self.journal.last_seq if self.journal else 0, "event_keys": len(self.seen)}

    # -- attaching a bundle --------------------------------------------------------------------
    def attach(self, rec: Recommender, artifacts: str | os.PathLike) -> LiveRecommender:
        """The live view of ``rec`` (just loaded from ``artifacts``), the journal replayed into it;
        it becomes the view ingested events are applied to."""
        bundle = Bundle.open(artifacts, verify=False)
        if bundle.manifest != rec.manifest:
            raise BundleError(f"{artifacts}: a new bundle was published while this one was loading; reload again")
        part = load_realtime_part(bundle, rec.n_users, rec.n_items)
        intake = EventIntake(bundle_cleaning(rec.manifest), rec._item_rows, rec.pseudonymizer,
                             ErasedUsers.for_bundle(rec.manifest, rec.pseudonymizer, self.erasure_list))
        with self._lock:
            first = self.journal is None
            if first:
                self.journal = Journal(self.journal_dir, _id_space(rec), self.options.segment_bytes)
            elif (self.journal.meta.get("pseudonymized"), self.journal.meta.get("key_fingerprint")) != (
                    _id_space(rec)["pseudonymized"], _id_space(rec)["key_fingerprint"]):
                raise BundleError(f"{artifacts}: this bundle's user ids are not in the id space of the journal "
                                  f"{self.journal_dir} (raw ids vs pseudonyms, or another key); serve it with its own journal")
            live = LiveRecommender.wrap(rec, part, self, intake, self.options.lookalike_refresh_seconds)
            t0 = time.perf_counter()
            rows, _, _ = read_journal(self.journal_dir)
            self.last_purged, gone = self._purge_erased(intake, rows)
            if gone:
                rows = rows.loc[~rows[USER].isin(gone).to_numpy()]
            if first:
                self.seen.add(_event_hashes(rows[EVENT_ID].astype(str).tolist()))
            mark = part.journals.get(self.journal.id, 0)
            seq = pd.to_numeric(rows[JOURNAL_SEQ], errors="coerce").to_numpy()
            todo = rows.loc[(rows[JOURNAL_ID] == self.journal.id).to_numpy() & (seq > mark)]
            dropped: dict[str, int] = {}
            for start in range(0, len(todo), REPLAY_CHUNK):
                result = intake.clean(todo.iloc[start : start + REPLAY_CHUNK], journal_order=True)
                live._apply(result.events, replay=True)
                for reason, n in result.rejected.items():
                    dropped[reason] = dropped.get(reason, 0) + n
            live._counts["replay_dropped"] = dropped
            if len(todo) or self.last_purged:
                log.info("journal %s: replayed %d of %d events the bundle was not trained on (%d users) in %.1f s; "
                         "dropped %s; removed %d rows of erased users", self.journal_dir, len(todo) - sum(dropped.values()),
                         len(todo), live.n_live_users, time.perf_counter() - t0, dropped or "none", self.last_purged)
            self.current = live
        return live

    def _purge_erased(self, intake: EventIntake, rows: pd.DataFrame | None = None,
                      reread: bool = False) -> tuple[int, list[str]]:
        """Remove the journal rows of users on the erasure list (after an erasure, or at start).
        rows: the journal's rows, if just read; reread: read the list again first (it changed under
        the view being served). Returns (rows removed, the user ids removed as journaled)."""
        if reread:
            live = self.current
            intake.erased = ErasedUsers.for_bundle(live.manifest, live.pseudonymizer, self.erasure_list)
        if not len(intake.erased):
            return 0, []
        if rows is None:
            rows, _, _ = read_journal(self.journal_dir)
        if not len(rows):
            return 0, []
        written = pd.Series(rows[USER].unique(), dtype=object)
        keys = intake._user_keys(written)
        raw = written.where(~written.str.startswith(TAG_PREFIX), None) if intake.pseudonymizer is not None else written
        erased = intake.erased.among(raw.tolist(), keys.tolist())
        if not erased:
            return 0, []
        gone = written[keys.isin(erased).to_numpy()].tolist()
        removed = self.journal.forget(gone)
        log.info("journal %s: removed %d rows of %d erased users", self.journal_dir, removed, len(gone))
        return removed, gone

    # -- events --------------------------------------------------------------------------------
    def ingest(self, events: Sequence[Mapping]) -> dict:
        """Clean, journal (durably) and apply ``events``; see :meth:`LiveRecommender.ingest`."""
        if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Sequence):
            raise InvalidRequestError(f"events must be a list of event objects, got {type(events).__name__}")
        received = int(time.time())
        with self._lock:
            if self._broken is not None:
                raise JournalError(f"the journal {self.journal_dir} failed earlier ({self._broken}); restart the server")
            live = self.current
            if live is None or self.journal is None:
                raise JournalError("no bundle is attached to the real-time service")
            intake = live._intake.prepare(events, received, self.seen)
            accepted = intake.events
            token = None
            if len(accepted):
                rows = list(zip(accepted.event_id.tolist(), map(live._intake.journal_user, accepted.user.tolist()),
                                accepted.item_id.tolist(), iso_seconds(accepted.timestamp),
                                accepted.event_type.tolist(), map(repr, accepted.value.tolist())))
                try:
                    _, token = self.journal.append(rows)
                except OSError as exc:
                    raise JournalError(f"cannot write the journal {self.journal_dir} ({exc.strerror or exc}); "
                                       "nothing of this batch was accepted") from None
                self.seen.add(intake.hashes)
                live._apply(accepted)
        if token is not None:
            try:
                self.journal.sync(token)
            except OSError as exc:
                self._broken = exc.strerror or str(exc)
                raise JournalError(f"cannot flush the journal {self.journal_dir} to disk ({self._broken}); the batch "
                                   "may not be durable: send it again to a restarted server") from None
        return intake.answer()

    # -- the lookalike index ------------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread that keeps the lookalike user index fresh."""
        if self.refreshing or self.options.lookalike_refresh_seconds <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, name="realtime-user-index", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        period = self.options.lookalike_refresh_seconds
        while not self._stop.wait(min(period / 4, 1.0)):
            live = self.current
            age = live.user_index_age if live is not None else None
            if age is not None and age >= period:
                try:
                    live.refresh_user_index()
                except Exception:  # never take the server down; the next round tries again
                    log.exception("rebuilding the lookalike user index failed")

    def close(self) -> None:
        """Stop the refresher and release the journal."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            if self.journal is not None:
                self.journal.close()


class RealtimeEraser:
    """The server's erasure (an :class:`~dmp_dl.privacy.erasure.ErasureService`) with the journal.

    Once the erasure is recorded and the new bundle published, the new bundle is attached
    (:meth:`RealtimeService.attach`): that removes the users' journal rows (they are on the erasure
    list now) and replays the rest; the answer says how many rows went. If the erasure was recorded
    but the bundle could not be replaced, the rows go all the same and the users' new events are
    refused.
    """

    def __init__(self, inner, service: RealtimeService, artifacts: str | os.PathLike):
        self.inner, self.service, self.artifacts = inner, service, artifacts

    def forget(self, user_ids):
        from dmp_dl.privacy.erasure import ErasureError

        try:
            summary, fresh = self.inner.forget(user_ids)
        except ErasureError as exc:
            if exc.recorded and self.service.current is not None:
                with self.service._lock:
                    self.service.last_purged = self.service._purge_erased(self.service.current._intake, reread=True)[0]
            raise
        if fresh is not None:
            fresh = self.service.attach(fresh, self.artifacts)
        return {**summary, "journal_rows_removed": int(self.service.last_purged)}, fresh
