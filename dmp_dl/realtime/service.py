"""The real-time path of a server: events in, journaled, applied; replayed on start and reload.

:class:`RealtimeService` owns the journal (one per server, across bundle reloads) and the live view
of the bundle being served (:class:`~dmp_dl.realtime.live.LiveRecommender`):

* :meth:`RealtimeService.ingest`: clean a batch (:mod:`dmp_dl.realtime.intake`), append the accepted
  events to the journal, apply them to the live users, fsync, answer. Batches are journaled and
  applied one at a time, in the same order; fsyncs of concurrent batches are shared.
* :meth:`RealtimeService.attach`: a live view of a freshly loaded bundle (server start, ``/reload``,
  the reload after ``/erase``): rows of erased users are removed from the journal, and the rows the
  bundle was not trained on (after the sequence number its manifest records for this journal, or
  all of them for a bundle that never read it) are applied again, by the same rules as when they
  were accepted (the event key decides what is a duplicate), so a restart serves exactly the
  events that were acknowledged. Replaying twice gives the same state. Corrupt rows are skipped and
  counted (``replay_dropped.malformed_row``).
* erased users: every erasure list that names the bundle is honoured (events refused, journal rows
  removed and never replayed), and :meth:`RealtimeService.withhold` makes users unservable in
  memory at once, before an erasure rewrites any file (:class:`RealtimeEraser`).
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

from dmp_dl.core.errors import BundleError, ConfigError, DmpError
from dmp_dl.data.journal import JOURNAL_ID, JOURNAL_SEQ, Journal, iso_seconds, read_journal
from dmp_dl.data.pseudonymize import TAG_PREFIX
from dmp_dl.data.schema import EVENT_ID, USER
from dmp_dl.privacy.erasure import ErasureError
from dmp_dl.realtime.intake import ErasedUsers, EventIntake, KeySet, _event_hashes, bundle_cleaning
from dmp_dl.realtime.live import LiveRecommender
from dmp_dl.realtime.part import load_realtime_part
from dmp_dl.serving.recommender import InvalidRequestError, Recommender
from dmp_dl.store.bundle import Bundle

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


def check_journal_place(journal_dir: str | os.PathLike, artifacts: str | os.PathLike) -> None:
    """Refuse a journal folder inside the bundle folder, or a bundle folder inside the journal
    (symlinks resolved): publishing a bundle (an export, an erasure) replaces the bundle folder as a
    whole, and would take the journal, or the bundle, with it."""
    journal, bundle = Path(journal_dir).resolve(), Path(artifacts).resolve()
    if journal == bundle or bundle in journal.parents:
        raise ConfigError(f"journal={journal_dir} is inside the bundle folder {bundle}, which every new bundle (an "
                          "export, an erasure) replaces as a whole; give a folder outside it, e.g. "
                          f"journal={default_journal_dir(artifacts)}")
    if journal in bundle.parents:
        raise ConfigError(f"journal={journal_dir} holds the bundle folder {bundle}; give the journal a folder of its own, "
                          f"e.g. journal={default_journal_dir(artifacts)}")


def _id_space(rec: Recommender) -> dict:
    p = rec.pseudonymizer
    return {"pseudonymized": p is not None, "key_fingerprint": p.fingerprint if p is not None else None}


class RealtimeService:
    """One journal and the live view of the bundle served (see the module docstring).

    journal_dir: the journal folder (created on the first :meth:`attach`); options: :class:`RealtimeOptions`;
    erasure_list: an erasure list honoured besides the ones each bundle names
    (:func:`~dmp_dl.data.erasure_list.bundle_erasure_lists`): its users' events are refused and
    their journal rows removed.
    """

    def __init__(self, journal_dir: str | os.PathLike, options: RealtimeOptions | None = None, erasure_list=None):
        self.journal_dir = Path(journal_dir).absolute()
        self.options = options or RealtimeOptions()
        self.erasure_list = erasure_list
        self.journal: Journal | None = None
        self.current: LiveRecommender | None = None
        self.seen = KeySet()
        self.last_purged = 0
        # user ids (as bundles hold them) erased, or being erased, while this service runs: never
        # served nor accepted again by any live view. Changed in place under _lock; readers only test membership.
        self.withheld: set[str] = set()
        self.purge_error: str | None = None  # why erased users' journal rows could not be removed (retried by attach)
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

    def journal_health(self) -> dict:
        """Whether the journal can take events (``writable``; ``error``: what failed last, no path)
        and whether erased users' rows wait to be removed from it (``erased_rows_pending``)."""
        if self._broken is not None:
            error = f"a flush to disk failed ({self._broken}); restart the server"
        elif self.journal is None:
            error = "no bundle is attached"
        else:
            error = self.journal.error
        return {"writable": error is None, "error": error, "erased_rows_pending": self.purge_error is not None}

    @classmethod
    def open(cls, path, journal=None, options=None, **load_kwargs) -> LiveRecommender:
        """The bundle at ``path`` loaded and attached to a new service over ``journal`` (default:
        ``<path>.journal`` beside it): :meth:`LiveRecommender.load`. Other keywords go to
        :meth:`Recommender.load`."""
        service = cls(journal or default_journal_dir(path), options)
        try:
            return service.attach(Recommender.load(path, **load_kwargs), path)
        except BaseException:
            service.close()
            raise

    # -- attaching a bundle --------------------------------------------------------------------
    def attach(self, rec: Recommender, artifacts: str | os.PathLike) -> LiveRecommender:
        """The live view of ``rec`` (just loaded from ``artifacts``), the journal replayed into it;
        it becomes the view ingested events are applied to. Erased users' journal rows are removed
        first; if that fails (a full disk), they are left out of the replay all the same, the
        failure is kept in :attr:`purge_error` and the next attach tries again."""
        check_journal_place(self.journal_dir, artifacts)
        bundle = Bundle.open(artifacts, verify=False)
        if bundle.manifest != rec.manifest:
            raise BundleError(f"{artifacts}: a new bundle was published while this one was loading; reload again")
        part = load_realtime_part(bundle, rec.n_users, rec.n_items)
        intake = EventIntake(bundle_cleaning(rec.manifest), rec._item_rows, rec.pseudonymizer,
                             ErasedUsers.for_bundle(rec.manifest, rec.pseudonymizer, self.erasure_list), self.withheld)
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
            rows, _, parts = read_journal(self.journal_dir)
            self.last_purged, gone = self._purge_erased(intake, rows)
            if gone:
                rows = rows.loc[~rows[USER].isin(gone).to_numpy()]
            if first:
                self.seen.add(_event_hashes(rows[EVENT_ID].astype(str).tolist()))
            mark = part.journals.get(self.journal.id, 0)
            seq = pd.to_numeric(rows[JOURNAL_SEQ], errors="coerce").to_numpy()
            ours = (rows[JOURNAL_ID] == self.journal.id).to_numpy() & np.isfinite(seq)
            todo = rows.loc[ours & (seq > mark)]
            corrupt = {path: n for path, _, n in parts if n}
            foreign = int((~ours).sum())  # a row of another journal, or without a sequence number
            dropped: dict[str, int] = {}
            if corrupt or foreign:
                dropped["malformed_row"] = sum(corrupt.values()) + foreign
                where = [f"{Path(path).name}: {n}" for path, n in corrupt.items()]
                where += [f"{foreign} without this journal's id or a sequence number"] if foreign else []
                log.warning("journal %s: skipped %d corrupt rows (%s); the other rows are replayed", self.journal_dir,
                            dropped["malformed_row"], ", ".join(where))
            replayed = KeySet()  # a key replayed twice counts once, as it did when it was accepted
            for start in range(0, len(todo), REPLAY_CHUNK):
                result = intake.clean(todo.iloc[start : start + REPLAY_CHUNK], seen=replayed, journal_order=True)
                replayed.add(result.hashes)
                live._apply(result.events, replay=True)
                for reason, n in result.rejected.items():
                    dropped[reason] = dropped.get(reason, 0) + n
            live._counts["replay_dropped"] = dropped
            if len(todo) or self.last_purged or dropped:
                log.info("journal %s: replayed %d of %d events the bundle was not trained on (%d users) in %.1f s; "
                         "dropped %s; removed %d rows of erased users", self.journal_dir,
                         live._counts["events_replayed"], len(todo), live.n_live_users, time.perf_counter() - t0,
                         dropped or "none", self.last_purged)
            self.current = live
        return live

    def _purge_erased(self, intake: EventIntake, rows: pd.DataFrame | None = None,
                      reread: bool = False) -> tuple[int, list[str]]:
        """Remove the journal rows of users on the erasure lists or withheld (after an erasure, or
        at start). rows: the journal's rows, if just read; reread: read the lists again first (they
        changed under the view being served). Returns (rows removed, the user ids as journaled of
        the users to leave out, removed or not). A failure to rewrite the journal is logged and kept
        in :attr:`purge_error`; the rows are then left out of the replay by the caller."""
        if reread:
            live = self.current
            intake.erased = ErasedUsers.for_bundle(live.manifest, live.pseudonymizer, self.erasure_list)
        if not len(intake.erased) and not self.withheld:
            self.purge_error = None
            return 0, []
        if rows is None:
            rows, _, _ = read_journal(self.journal_dir)
        if not len(rows):
            self.purge_error = None
            return 0, []
        written = pd.Series(rows[USER].unique(), dtype=object)
        keys = intake._user_keys(written)
        erased = set(self.withheld.intersection(keys.tolist()))
        if len(intake.erased):
            raw = written.where(~written.str.startswith(TAG_PREFIX), None) if intake.pseudonymizer is not None else written
            erased |= intake.erased.among(raw.tolist(), keys.tolist())
        if not erased:
            self.purge_error = None
            return 0, []
        gone = written[keys.isin(erased).to_numpy()].tolist()
        try:
            removed = self.journal.forget(gone)
        except OSError as exc:
            self.purge_error = exc.strerror or str(exc)
            log.warning("journal %s: cannot remove the rows of %d erased users (%s); they are not replayed, and the "
                        "next start or reload removes them", self.journal_dir, len(gone), self.purge_error)
            return 0, gone
        self.purge_error = None
        log.info("journal %s: removed %d rows of %d erased users", self.journal_dir, removed, len(gone))
        return removed, gone

    # -- erasure -------------------------------------------------------------------------------
    def withhold(self, user_ids: Sequence[object]) -> set[str]:
        """Stop serving ``user_ids`` (raw ids, or ``hmac-sha256:...`` keyed hashes of this bundle's
        key) at once: every query of the live view answers 404 for them, lookalike leaves them out
        and their events are refused (``erased_user``). Returns the ids (as the bundle holds them)
        newly withheld, for :meth:`release`."""
        with self._lock:  # after the batch being applied, before the next
            live = self.current
            if live is None:
                return set()
            new = live.user_keys(user_ids) - self.withheld
            self.withheld |= new
            return new

    def release(self, keys: set[str]) -> None:
        """Serve ``keys`` (from :meth:`withhold`) again: their erasure did not happen."""
        with self._lock:
            self.withheld -= keys

    # -- events --------------------------------------------------------------------------------
    def ingest(self, events: Sequence[Mapping]) -> dict:
        """Clean, journal (durably) and apply ``events``; see :meth:`LiveRecommender.ingest`."""
        if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Sequence):
            raise InvalidRequestError(f"events must be a list of event objects, got {type(events).__name__}")
        received = int(time.time())
        with self._lock:
            if self._broken is not None:
                raise JournalError(f"a flush of the journal {self.journal_dir} to disk failed earlier ({self._broken}); "
                                   "restart the server")
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


LiveRecommender.service_class = RealtimeService


class RealtimeEraser:
    """The server's erasure (an :class:`~dmp_dl.privacy.erasure.ErasureService`) with the journal.

    1. The users are withheld in memory first (:meth:`RealtimeService.withhold`): from then on no
       query answers for them and their events are refused, whatever happens to the files.
    2. The erasure rewrites the bundle, the erasure list and the audit log (all or nothing). If it
       did not happen, the users are served again, as the files still say.
    3. The new bundle is attached (:meth:`RealtimeService.attach`), which removes the users' journal
       rows (they are on a list the bundle names) and replays the rest; the answer says how many
       rows went.

    Every failure after step 2 recorded the erasure is an :class:`~dmp_dl.privacy.erasure.ErasureError`
    (409) whose code says what is left: ``journal_not_rewritten`` (the journal could not be
    rewritten: its rows of the users are left out of every replay and removed by the next start or
    reload), ``reload_failed`` (the new bundle is on disk but could not be attached: the previous
    view keeps serving, without the users) or ``erasure_failed`` (the list is ahead of the bundle:
    run ``forget`` again). The users stay withheld in each case.
    """

    def __init__(self, inner, service: RealtimeService, artifacts: str | os.PathLike):
        self.inner, self.service, self.artifacts = inner, service, artifacts

    def forget(self, user_ids):
        service = self.service
        held = service.withhold(user_ids)
        try:
            summary, fresh = self.inner.forget(user_ids)
        except ErasureError as exc:
            if not exc.recorded:
                service.release(held)
                raise
            exc.fresh = None  # the bundle on disk was not replaced: the current view serves on, without the users
            if service.current is not None:
                try:
                    with service._lock:
                        service.last_purged = service._purge_erased(service.current._intake, reread=True)[0]
                except DmpError as problem:  # the next start or reload removes the rows
                    log.warning("journal %s: erased users' rows not removed: %s", service.journal_dir, problem)
            raise
        except BaseException:
            service.release(held)
            raise
        if fresh is None:
            return {**summary, "journal_rows_removed": 0}, None
        try:
            fresh = service.attach(fresh, self.artifacts)
        except (DmpError, OSError) as exc:
            err = ErasureError(f"the users were erased (bundle {summary.get('bundle')}, erasure list "
                               f"{summary.get('erasure_list')}) and are no longer served, but the server could not switch "
                               f"to the new bundle ({_one_line(exc)}); it serves the previous one without them: "
                               "POST /reload once that is fixed", "reload_failed", recorded=True)
            log.warning("%s", err)
            raise err from None
        if service.purge_error is not None:
            err = ErasureError(f"the users were erased from the bundle and added to the erasure list "
                               f"{summary.get('erasure_list')}, and are no longer served, but their rows in the event journal "
                               f"could not be removed ({service.purge_error}); they are never replayed, and the next start "
                               "or reload removes them", "journal_not_rewritten", recorded=True)
            err.fresh = fresh
            raise err
        return {**summary, "journal_rows_removed": int(service.last_purged)}, fresh


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
