"""The LightningDataModule: events -> clean -> vocab -> split -> training batches and eval sets."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import time
from collections.abc import Callable, Collection, Sequence

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset

from dmp_dl.core.arrays import BLOCK, bincount_blocks, count_per_segment, flatnonzero_blocks, index_dtype
from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.core.free_memory import memory_budget
from dmp_dl.core.memory import release_freed_memory
from dmp_dl.data.array_spill import arrays_on_disk
from dmp_dl.data.cleaning import CleaningOptions, clean_log
from dmp_dl.data.erasure_list import read_erasure_list
from dmp_dl.data.event_files import add_extra_events
from dmp_dl.data.features import FeatureTable
from dmp_dl.data.frame_spill import SpilledFrame, spill_frame
from dmp_dl.data.grouping import group_bounds, sorted_order, stable_order
from dmp_dl.data.pairs import SplitPairs, pair_matrix  # noqa: F401 (pair_matrix: part of this module's API)
from dmp_dl.data.privacy_options import log_user_ids
from dmp_dl.data.recency import AUTO, check_half_life, decayed_sums, describe, row_strength
from dmp_dl.data.schema import ITEM, TIME, USER, WEIGHT
from dmp_dl.data.sequences import TrainSequences
from dmp_dl.data.split import TEST, TRAIN, VAL, SplitOptions, resolve_split
from dmp_dl.data.vocab import IdVocab

log = logging.getLogger(__name__)
_RESOLVED = object()  # interaction_rows' default half-life: the data module's own
# what the data stage prepares for the steps after the model's fit (the test pass, the refit, the bundle),
# which a fit on the training pairs does not read: on disk during EASE's dense fit (prepared_arrays_on_disk)
PREPARED_FOR_LATER = ("full_history", "test_input_history", "all_seen", "test_relevant", "test_seen")
# what only the model and evaluation stages read (the training pairs, histories and events, the validation and test
# sets): memory maps of files for the rest of a run once those stages are done, when they take this much or more
READ_BY_MODEL_AND_EVALUATION = ("train_idx", "train_seen", "train_history", "test_input_history", "val_seen",
                                "test_seen", "val_relevant", "test_relevant")
MODEL_INPUTS_ASIDE_BYTES = 64 * 2**20  # 117 MiB at 5M events; a few MiB on the logs of the tests


def weighted_rows(n_users: int, n_items: int, users: np.ndarray, items: np.ndarray, weights: np.ndarray,
                  times: np.ndarray | None = None, half_life_days: float | None = None) -> sp.csr_matrix:
    """(n_users, n_items) CSR of interaction strength: log2(1 + the summed event weights of a pair).

    One event of weight 1 gives 1; repeated or heavier events (a purchase after views) count more,
    with diminishing returns. With ``times`` (epoch seconds) and ``half_life_days``, each event's
    weight halves every ``half_life_days`` before its user's latest event (:mod:`dmp_dl.data.recency`,
    the one definition training and real-time updates share). The input of the user-level models.
    """
    sums, _ = decayed_sums(n_users, n_items, users, items, weights, times, half_life_days)
    m = sp.csr_matrix((row_strength(sums.data), sums.indices, sums.indptr), shape=sums.shape)
    m.eliminate_zeros()
    return m


def last_items(user: np.ndarray, item: np.ndarray, n_users: int, length: int, pad: int) -> np.ndarray:
    """Each user's ``length`` most recent items, most recent first, padded with ``pad``.

    ``user``/``item`` must be in time order. Returns (n_users, length) int32 (int64 when ``pad`` does not fit).
    """
    order = stable_order(user)
    return _last_items_grouped(user[order], item[order], n_users, length, pad)


def _last_items_grouped(user: np.ndarray, item: np.ndarray, n_users: int, length: int, pad: int) -> np.ndarray:
    """:func:`last_items` of events already grouped by user (each user's in time order): (n_users,
    length) int32 (int64 when ``pad`` does not fit), the per-user table every model reads histories from."""
    starts, ends = group_bounds(user)
    return _last_items_of_groups(item, user[starts], ends - starts, n_users, length, pad)


def _last_items_of_groups(item: np.ndarray, group_user: np.ndarray, group_size: np.ndarray, n_users: int, length: int,
                          pad: int, chunk: int = 1 << 16) -> np.ndarray:
    """:func:`last_items` of items in consecutive groups, one group per user in time order:
    ``item`` (n,), ``group_user`` (g,) the group's user and ``group_size`` (g,) its number of items
    (0 allowed; the sizes sum to n). Returns (n_users, length) int32 (int64 when ``pad`` does not fit)."""
    out = np.full((n_users, max(length, 0)), pad, dtype=index_dtype(pad))
    if length <= 0 or len(item) == 0:
        return out
    ends = np.cumsum(group_size, dtype=np.int64)
    starts = ends - group_size
    back = np.arange(length)
    for lo in range(0, len(ends), chunk):  # whole rows of `chunk` users at a time: bounded temporaries
        pos = ends[lo:lo + chunk, None] - 1 - back  # (users, length) positions, most recent first
        out[group_user[lo:lo + chunk]] = np.where(pos >= starts[lo:lo + chunk, None], item[np.maximum(pos, 0)], pad)
    return out


class StepClock:
    """Wall and CPU seconds (all threads of the process) of named steps: ``seconds[name] = {"wall", "cpu"}``.

    Each step ends by handing the memory it freed back to the OS (its temporaries, not carried by
    the allocator into the next step)."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            release_freed_memory()  # the step's temporaries, not kept by the allocator for the next one
            self.seconds[name] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def per_process_step(batch: int, processes: int) -> int:
    """Examples each of ``processes`` data-parallel processes loads so that one step of them all
    together is ``batch``: shared out, rounded up (at least 1)."""
    return max(1, -(-int(batch) // max(int(processes), 1)))


def _keep(batch):
    """collate_fn for datasets whose ``__getitems__`` already returns a batch."""
    return batch


class TrainExamples(Dataset):
    """Training events, one example each, batched by ``__getitems__`` without per-example Python.

    Events are held grouped by user (in time order), so an example's history is a vectorised gather:

    * ``history_sampling="recent"``: the user's ``history_len`` previous training items, most recent
      first — right when held-out events come after training ones (temporal splits).
    * ``history_sampling="random"``: up to ``history_len`` other training items of the user, drawn
      afresh for every batch (a random window of the user's items, the example's own item masked) —
      right when held-out items are a random subset of the user's items (random splits), where
      "what came before" is not what the model is asked at evaluation time.

    A batch is a dict: ``user`` (B,) int64, ``item`` (B,) int64, ``weight`` (B,) float32 and,
    if ``history_len > 0``, ``history`` (B, L) int64 padded with ``pad``.
    """

    def __init__(self, user: np.ndarray, item: np.ndarray, weight: np.ndarray, history_len: int, pad: int,
                 history_sampling: str = "recent"):
        if history_sampling not in ("recent", "random"):
            raise ConfigError(f"data.history_sampling must be recent, random or auto, got {history_sampling!r}")
        order = stable_order(user)
        self.user = torch.from_numpy(np.ascontiguousarray(user[order]))
        self.item = torch.from_numpy(np.ascontiguousarray(item[order]))
        self.weight = torch.from_numpy(np.ascontiguousarray(weight[order], dtype=np.float32))
        starts, ends = group_bounds(self.user.numpy())
        counts = ends - starts
        self.start = torch.from_numpy(np.repeat(starts, counts).astype(np.int64))
        self.count = torch.from_numpy(np.repeat(counts, counts).astype(np.int64))
        self.history_len = history_len
        self.history_sampling = history_sampling
        self.pad = pad
        self._offsets = torch.arange(1, history_len + 1)

    def __len__(self) -> int:
        return len(self.user)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        # held in the events' index type (int32 below 2**31), handed to models as int64
        batch = {"user": self.user[idx].long(), "item": self.item[idx].long(), "weight": self.weight[idx]}
        if self.history_len > 0:
            start = self.start[idx][:, None]
            if self.history_sampling == "recent":
                pos = idx[:, None] - self._offsets
                valid = pos >= start
            else:
                count = self.count[idx][:, None]
                offset = (torch.rand(len(idx), 1) * count).long()
                rel = (offset + self._offsets - 1) % count
                pos = start + rel
                valid = (pos != idx[:, None]) & (self._offsets <= count)
            batch["history"] = torch.where(valid, self.item[pos.clamp(min=0)], self.pad).long()
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


class EvalUsers(Dataset):
    """Users to evaluate with what full-ranking evaluation needs, batched by ``__getitems__``.

    A batch: ``user`` (B,), ``history`` (B, L), and two sparse sets as (row-in-batch, item) pairs:
    ``seen_rows``/``seen_cols`` (items to exclude) and ``rel_rows``/``rel_cols`` (held-out items).
    """

    def __init__(self, users: np.ndarray, history: np.ndarray, seen: sp.csr_matrix, relevant: sp.csr_matrix):
        self.users = np.asarray(users, dtype=np.int64)
        self.history = history
        self.seen = seen
        self.relevant = relevant

    def __len__(self) -> int:
        return len(self.users)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        users = self.users[np.asarray(indices, dtype=np.int64)]
        seen = self.seen[users].tocoo()
        rel = self.relevant[users].tocoo()
        return {
            "user": torch.from_numpy(users),
            "history": torch.from_numpy(self.history[users].astype(np.int64, copy=False)),
            "seen_rows": torch.from_numpy(seen.row.astype(np.int64)),
            "seen_cols": torch.from_numpy(seen.col.astype(np.int64)),
            "rel_rows": torch.from_numpy(rel.row.astype(np.int64)),
            "rel_cols": torch.from_numpy(rel.col.astype(np.int64)),
        }

    def __getitem__(self, i: int):
        return self.__getitems__([i])


class InteractionDataModule(pl.LightningDataModule):
    """Loads, cleans, indexes and splits an event log; serves batches for the embedding models.

    Parameters
    ----------
    source: a source object with ``load() -> EventLog``, or a factory (Hydra ``_partial_``) that is
        called with the given ``path`` / ``users`` / ``items``.
    path, users, items: input files (``data.path`` ...), passed to the source factory.
    cleaning, split: :class:`CleaningOptions`, :class:`SplitOptions` (or dicts of them).
    batch_size: training batch size; eval_batch_size: users per evaluation batch.
    history_len: recent items per user fed to models that use history (0: none).
    history_sampling: how training examples get their history (see :class:`TrainExamples`):
        ``recent``, ``random``, or ``auto`` (``random`` when the split, once ``auto`` is resolved, is
        random_per_user, else ``recent``).
    extra_paths: more event files, folders or real-time journal folders, read after the main log
        and cleaned with it (``data.extra_paths``): duplicates across them count once, and
        ``data_quality.json`` counts rows in and out per file. ``journal_marks`` then holds the last
        sequence number read of each journal (the bundle records it, so that a server does not
        apply those events twice).
    erasure_list: file of erased user ids (one per line); their events are dropped on load.
    recency_half_life_days: how event weights decay with age in each user's row
        (:mod:`dmp_dl.data.recency`): a number of days, null (no decay), or ``auto`` (the automatic
        model choice picks it on validation, :meth:`use_half_life`; other models read no decay). A
        log without event times has no decay, whatever the setting (said once in the log).
    privacy: a :class:`dmp_dl.privacy.PrivacyOptions` (``privacy`` in the train config): user ids
        are replaced by keyed pseudonyms right after loading when ``privacy.pseudonymize``, and the
        erasure lists (``privacy.erasure_list`` and ``erasure_list``) may hold keyed-hash entries.
    memory_limit_gb: the memory :meth:`prepare` may plan on, in GiB (``data.memory_limit_gb``; None:
        what the host and the process's container have free). A log whose preparation is estimated
        to need more stops with one line before it is read (:mod:`dmp_dl.data.memory_check`);
        nothing is spilled to disk to stay under it.
    """

    def __init__(
        self,
        source: Callable[..., object] | object,
        cleaning: CleaningOptions | dict | None = None,
        split: SplitOptions | dict | None = None,
        path: str | None = None,
        users: str | None = None,
        items: str | None = None,
        batch_size: int = 2048,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        history_len: int = 20,
        history_sampling: str = "auto",
        erasure_list: str | None = None,
        name: str = "data",
        privacy: object | None = None,
        extra_paths: list[str] | None = None,
        recency_half_life_days: float | str | None = None,
        memory_limit_gb: float | None = None,
    ):
        super().__init__()
        self.source = _make_source(source, path=path, users=users, items=items, name=name)
        self.cleaning = cleaning if isinstance(cleaning, CleaningOptions) else CleaningOptions(**(cleaning or {}))
        self.split_opts = split if isinstance(split, SplitOptions) else SplitOptions(**(split or {}))
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"data.batch_size and data.eval_batch_size must be >= 1, got {batch_size}, {eval_batch_size}")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.history_len = int(history_len)
        if self.history_len < 0:
            raise ConfigError(f"data.history_len must be >= 0, got {history_len}")
        self.history_sampling_setting = history_sampling
        self.history_sampling = self._resolve_history_sampling(self.split_opts.method)
        self.erasure_list = erasure_list
        self.privacy = privacy
        if isinstance(extra_paths, str):
            extra_paths = [extra_paths]
        self.extra_paths = [str(x) for x in (extra_paths or [])]
        self.journal_marks: dict[str, int] = {}
        self.memory_limit_gb = _check_memory_limit(memory_limit_gb)
        self.recency_setting = check_half_life(recency_half_life_days)
        self.half_life_days: float | None = self.recency_setting if self.recency_setting != AUTO else None
        self._interaction_rows: dict[tuple, sp.csr_matrix] = {}
        # the clean events while on disk (events_on_disk): a list shared with the views of everything_as_training
        self._events_spilled: list[SpilledFrame] = []
        self.step_seconds: dict[str, dict[str, float]] = {}
        self.name = name
        self._prepared = False

    # -- loading -------------------------------------------------------------------------
    def prepare(self) -> "InteractionDataModule":
        """Load, clean, index and split (once). Returns ``self``.

        ``step_seconds`` then holds each step's wall and CPU seconds (``load``, ``clean``,
        ``vocabularies``, ``split``, ``evaluation_sets``, ``features``)."""
        if self._prepared:
            return self
        with memory_budget(self.memory_limit_gb, "data.memory_limit_gb"):
            return self._prepare()

    def _prepare(self) -> "InteractionDataModule":
        clock = StepClock()
        with clock.step("load"):
            raw = _load(self.source, self.cleaning)
            if self.extra_paths:
                raw = add_extra_events(raw, self.extra_paths, self.cleaning.timestamp_unit)
            self._check_journals(raw.meta.get("journals", {}))
            if self.privacy is not None:  # pseudonymise ids (after normalisation, before vocabularies)
                raw, erased = self.privacy.prepare_log(raw, self.erasure_list)
            else:
                erased = self._erased_users(raw)
            self.raw_meta = raw.meta
        with clock.step("clean"):
            cleaned, report = clean_log(raw, self.cleaning, exclude_users=erased, index_ids=True, consume=True)
            del raw  # the raw columns are not needed past cleaning: free them before indexing and splitting
        with clock.step("vocabularies"):
            ev = cleaned.events  # with user_idx and item_idx, the indices of these vocabularies:
            self.user_vocab = IdVocab.from_indexed(ev[USER], ev["user_idx"].to_numpy(), "user")
            self.item_vocab = IdVocab.from_indexed(ev[ITEM], ev["item_idx"].to_numpy(), "item")
        with clock.step("split"):
            split = resolve_split(ev["user_idx"].to_numpy(), ev["item_idx"].to_numpy(), ev[TIME].to_numpy(),
                                  report.has_timestamps, self.split_opts, len(self.user_vocab), len(self.item_vocab))
            method, reason = split.method, split.reason
            ev["split"] = split.labels
        self.split_method = method
        self.history_sampling = self._resolve_history_sampling(method)
        if reason:
            log.info("split: %s (%s)", method, reason)
        self.log_ = cleaned
        self.report = report
        with clock.step("evaluation_sets"):
            self._index_splits(ev, split.pairs)
        report.split = {"method": method, "method_requested": self.split_opts.method, "method_reason": reason,
                        "history_sampling": self.history_sampling, **report.split}
        with clock.step("features"):
            count_unmatched(cleaned.users, USER, self.user_vocab, report.users_table, "data.users")
            count_unmatched(cleaned.items, ITEM, self.item_vocab, report.items_table, "data.items")
            self.user_features = FeatureTable.build(cleaned.users, USER, self.user_vocab, report.attributes.get("users"))
            self.item_features = FeatureTable.build(cleaned.items, ITEM, self.item_vocab, report.attributes.get("items"))
        report.attributes["skipped"] = {
            **{f"users.{k}": v for k, v in self.user_features.skipped_columns.items()},
            **{f"items.{k}": v for k, v in self.item_features.skipped_columns.items()},
        }
        self.step_seconds = clock.seconds
        self._resolve_recency()
        log.debug("data stage: %s", ", ".join(f"{k} {v['wall']:.2f} s" for k, v in clock.seconds.items()))
        self._prepared = True
        return self

    def _resolve_recency(self) -> None:
        """No decay for a log without event times, said once."""
        if self.recency_setting is not None and not self.report.has_timestamps:
            log.info("recency: the log has no event times, so event weights do not decay with age "
                     "(data.recency_half_life_days=%s is not used)", self.recency_setting)
            self.half_life_days = None

    def use_half_life(self, half_life_days: float | None) -> None:
        """Decay event weights with this half-life (days; None: no decay) in :meth:`interaction_rows`
        and :meth:`user_item_sums` from now on (the automatic model choice's pick for ``auto``, or a
        bundle's, to score it as it was trained). Ignored, as no decay, for a log without event times."""
        self.half_life_days = float(half_life_days) if half_life_days is not None and self.has_timestamps else None
        for key in [k for k in self._interaction_rows if k[1] != self.half_life_days]:
            del self._interaction_rows[key]  # the rows of half-lives tried and not kept

    def recency_candidates(self) -> list[float | None]:
        """The half-lives to choose from on validation (:func:`dmp_dl.data.recency.candidates`): for
        ``auto``, no decay and shares of the training events' time span; else the one setting."""
        from dmp_dl.data.recency import candidates

        span = None
        if self.has_timestamps:
            t = self.events[TIME].to_numpy()[self.train_idx]
            span = float(t.max() - t.min()) if len(t) else 0.0
        setting = self.recency_setting if self.recency_setting == AUTO else self.half_life_days
        return list(candidates(setting, span, self.has_timestamps))

    def _resolve_history_sampling(self, split_method: str) -> str:
        """``history_sampling`` with ``auto`` resolved for ``split_method`` (left ``auto`` while the
        split itself is still ``auto``)."""
        if self.history_sampling_setting != "auto" or split_method == "auto":
            return self.history_sampling_setting
        return "random" if split_method == "random_per_user" else "recent"

    @property
    def has_timestamps(self) -> bool:
        """Whether the clean log has event times (see :func:`dmp_dl.data.cleaning.describe_times`)."""
        return self.report.has_timestamps

    def _check_journals(self, journals: dict[str, dict]) -> None:
        """A journal of pseudonymised ids is read only by a run that pseudonymises with the same key."""
        for info in journals.values():
            if not info.get("pseudonymized"):
                continue
            pseudonymize = self.privacy is not None and getattr(self.privacy, "pseudonymize", False)
            if not pseudonymize:
                raise ConfigError(f"{info['path']}: this journal holds pseudonymised user ids (key fingerprint "
                                  f"{info.get('key_fingerprint')}); train with privacy.pseudonymize=true and that key")
            fingerprint = self.privacy.pseudonymizer().fingerprint
            if info.get("key_fingerprint") != fingerprint:
                raise ConfigError(f"{info['path']}: this journal's pseudonyms were made with the key of fingerprint "
                                  f"{info.get('key_fingerprint')}, the configured secret has fingerprint {fingerprint}")
        self.journal_marks = {jid: int(info["max_seq"]) for jid, info in journals.items()}

    def _erased_users(self, raw) -> Collection[str]:
        """The users of ``raw`` on ``erasure_list`` (raw ids and salted hashes; keyed hashes need
        the privacy settings)."""
        if not self.erasure_list:
            return ()

        entries = read_erasure_list(self.erasure_list, required=True)
        if entries.tagged:
            raise DataError(f"{self.erasure_list} holds keyed-hash entries, which need the privacy settings to match: "
                            "pass privacy=PrivacyOptions(...) (train.py does)")
        ids = log_user_ids(raw)
        return set(ids[entries.resolve(ids, None)].tolist())

    def _index_splits(self, ev: pd.DataFrame, pairs: SplitPairs | None = None) -> None:
        """Training indices, item counts, histories and the evaluation sets of the split ``ev``;
        ``pairs``: its :class:`SplitPairs` when already computed."""
        n_users, n_items = len(self.user_vocab), len(self.item_vocab)
        u, i, s = ev["user_idx"].to_numpy(), ev["item_idx"].to_numpy(), ev["split"].to_numpy()
        train = s == TRAIN
        if not train.any():
            raise DataError(f"{self.report.source}: the split left no training events; lower data.split.val_frac/test_frac")
        if pairs is None:
            pairs = SplitPairs.build(u, i, s, n_users, n_items)
        self.train_idx = flatnonzero_blocks(train, index_dtype(len(train)))
        del train
        self.item_counts = np.zeros(n_items, dtype=np.int64)
        for lo in range(0, len(self.train_idx), BLOCK):  # no gathered copy of the training items
            self.item_counts += np.bincount(i[self.train_idx[lo:lo + BLOCK]], minlength=n_items)
        self.train_seen = pairs.train
        # every event grouped by user in time order (the training ones a subsequence), as int32 below 2**31
        narrow = index_dtype(max(len(u), n_users, n_items + 1))
        by_user, u_by_user = sorted_order(u, dtype=narrow)
        starts, _ = group_bounds(u_by_user)
        group_user = u_by_user[starts]
        bounds = np.append(starts, len(u_by_user))
        del u_by_user, starts
        i_by_user, s_by_user = i.astype(narrow, copy=False)[by_user], s[by_user]
        del by_user
        length = self.history_len
        train_by_user = s_by_user == TRAIN
        self.train_history = _last_items_of_groups(i_by_user[train_by_user], group_user,
                                                   count_per_segment(train_by_user, bounds), n_users, length, n_items)
        del train_by_user
        self.full_history = _last_items_of_groups(i_by_user, group_user, np.diff(bounds), n_users, length, n_items)
        before_test = s_by_user != TEST  # what a test user did before the test period: their input when ranked
        del s_by_user
        self.test_input_history = _last_items_of_groups(i_by_user[before_test], group_user,
                                                        count_per_segment(before_test, bounds), n_users, length, n_items)
        del i_by_user, before_test, group_user, bounds
        self.all_seen = pairs.all()
        per_part = bincount_blocks(s, minlength=3)  # events per split part, then those of users / items unseen in training
        cold_user = np.bincount(s[~pairs.warm[u]], minlength=3)
        cold_item = np.bincount(s[(self.item_counts == 0)[i]], minlength=3)
        train_time_max = None
        if self.report.has_timestamps:
            times = ev[TIME].to_numpy()
            train_time_max = max(int(times[self.train_idx[lo:lo + BLOCK]].max())
                                 for lo in range(0, len(self.train_idx), BLOCK))
        stats: dict[str, object] = {
            "events": {"train": int(per_part[TRAIN]), "val": int(per_part[VAL]), "test": int(per_part[TEST])},
            "train_time_max": train_time_max,
        }
        seen = {"val": self.train_seen, "test": pairs.seen((1 << TRAIN) | (1 << VAL))}
        for name, code in (("val", VAL), ("test", TEST)):
            stats[f"{name}_events_user_unseen_in_train"] = int(cold_user[code])
            stats[f"{name}_events_item_unseen_in_train"] = int(cold_item[code])
            stats[f"{name}_pairs_already_seen"] = pairs.already_seen(code)
            held = pairs.relevant(code)
            setattr(self, f"{name}_relevant", held)
            # the test period excludes what the user did in training and validation
            setattr(self, f"{name}_seen", seen[name])
            users_with = np.flatnonzero(np.diff(held.indptr) > 0)
            setattr(self, f"{name}_users", users_with)
            stats[f"{name}_users"] = int(len(users_with))
            stats[f"{name}_pairs"] = int(held.nnz)
        self.report.split = stats

    # -- views ---------------------------------------------------------------------------
    @property
    def events(self) -> pd.DataFrame:
        """Clean events with ``user_idx``, ``item_idx`` and ``split`` columns, in time order (read back
        from disk first while :meth:`events_on_disk` holds them there)."""
        if self.log_.events is None and self._events_spilled:
            self._read_events_back()
        return self.log_.events

    @contextlib.contextmanager
    def events_on_disk(self, directory: str | None = None):
        """While the block runs, the clean events frame is on disk (:mod:`dmp_dl.data.frame_spill`, a
        temporary folder under ``directory``, default ``TMPDIR``) and its memory free for a step that
        needs memory and not the events (EASE's dense fit on the CPU); read back when the block ends,
        or earlier if :attr:`events` is read inside it. A disk that refuses leaves the events in
        memory (one warning)."""
        if self._events_spilled or self.log_.events is None:
            yield
            return
        try:
            spilled = spill_frame(self.log_.events, directory)
        except OSError as e:
            log.warning("the clean events stay in memory during this step (writing them to %s failed: %s)",
                        directory or "the temporary folder", e)
            yield
            return
        self._events_spilled.append(spilled)
        self.log_.events = None
        release_freed_memory()
        log.info("the clean events are on disk (%s, %.0f MiB) during this step", spilled.folder, spilled.nbytes / 2**20)
        try:
            yield
        finally:
            self._read_events_back()

    def prepared_arrays_on_disk(self, directory: str | None = None, keep: Collection[object] = ()):
        """While the block runs, what the data stage prepared for the steps after a fit and that a fit
        on the training pairs does not read (:data:`PREPARED_FOR_LATER`: the histories up to each
        user's last event and before the test period, every pair, the test sets) are memory maps of
        files in a temporary folder under ``directory`` (:func:`dmp_dl.data.array_spill.arrays_on_disk`;
        not those in ``keep``, e.g. the matrix being fitted); read back into memory when it ends."""
        return arrays_on_disk(self, PREPARED_FOR_LATER, directory, keep)

    def model_inputs_on_disk(self, directory: str | None = None):
        """For the block (the stages after evaluation: propensity, audience, export), what only the
        model and evaluation stages read (:data:`READ_BY_MODEL_AND_EVALUATION`) are memory maps of
        files in a temporary folder under ``directory``, not read back when it ends; when they take
        less than :data:`MODEL_INPUTS_ASIDE_BYTES` (a small log) they stay as they are. The cached
        interaction rows are dropped (built again if asked for)."""
        self._interaction_rows.clear()
        return arrays_on_disk(self, READ_BY_MODEL_AND_EVALUATION, directory, read_back=False,
                              min_bytes=MODEL_INPUTS_ASIDE_BYTES,
                              during="for the rest of the run (the model and evaluation stages' inputs)")

    def _read_events_back(self) -> None:
        if not self._events_spilled:
            return
        spilled = self._events_spilled.pop()
        try:
            if self.log_.events is None:
                self.log_.events = spilled.load()
        finally:
            spilled.remove()

    @property
    def n_users(self) -> int:
        return len(self.user_vocab)

    @property
    def n_items(self) -> int:
        return len(self.item_vocab)

    def net_kwargs(self) -> dict:
        """Sizes and feature tables a network needs (passed to ``model.net``)."""
        return {
            "n_users": self.n_users,
            "n_items": self.n_items,
            "user_features": self.user_features,
            "item_features": self.item_features,
        }

    def everything_as_training(self) -> "InteractionDataModule":
        """A view of this DataModule in which every event is a training event and nobody is held
        out: what a final fit on all data trains on (same vocabularies, features and events)."""
        view = copy.copy(self)
        ev = self.events
        view.train_idx = np.arange(len(ev), dtype=index_dtype(len(ev)))
        view.item_counts = np.bincount(ev["item_idx"].to_numpy(), minlength=self.n_items).astype(np.int64)
        view.train_seen, view.train_history, view.test_input_history = self.all_seen, self.full_history, self.full_history
        for stage in ("val", "test"):
            setattr(view, f"{stage}_users", np.zeros(0, dtype=np.int64))
        return view

    def interaction_rows(self, which: str = "train", half_life_days: float | None | object = _RESOLVED) -> sp.csr_matrix:
        """Per-user interaction strengths (:func:`weighted_rows`) of the training events
        (``which="train"``, ages measured to each user's latest training event), of the events
        before the test period (``"before_test"``: training and validation, a test user's input) or
        of every event (``"all"``), event weights decayed with ``half_life_days`` (default: the
        run's, :attr:`half_life_days`). (n_users, n_items) CSR, built once per ``which`` and
        half-life and shared by every caller: its arrays are read-only (copy it to write into it; at
        50M events each copy was 0.3 GiB)."""
        if which not in ("train", "before_test", "all"):
            raise ValueError(f"which must be train, before_test or all, got {which!r}")
        h = self.half_life_days if half_life_days is _RESOLVED else half_life_days
        key = (which, h if self.has_timestamps else None)
        built = self._interaction_rows.get(key)
        if built is None:
            users, items, weights, times = self._events_of(key[0])
            built = weighted_rows(self.n_users, self.n_items, users, items, weights, times, key[1])
            for values in (built.data, built.indices, built.indptr):
                values.flags.writeable = False
            self._interaction_rows[key] = built
            if key[1] is not None:
                log.debug("interaction rows (%s events): %s", key[0], describe(key[1]))
        return built

    def user_item_sums(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """Every event's summed weights per (user, item), decayed with :attr:`half_life_days` to
        each user's latest event, and those reference times: what real-time updates continue from
        (:func:`dmp_dl.data.recency.decayed_sums`; the rows of :meth:`interaction_rows` ``("all")``
        are ``log2(1 + sums)``)."""
        users, items, weights, times = self._events_of("all")
        return decayed_sums(self.n_users, self.n_items, users, items, weights, times, self.half_life_days)

    def rows_of_users(self, users: np.ndarray, half_lives: Sequence[float | None], which: str = "train"
                      ) -> list[sp.csr_matrix]:
        """:meth:`interaction_rows` of ``users`` alone, one (n_users, n_items) CSR per half-life of
        ``half_lives`` (the other users' rows empty; nothing cached): what scoring a sample of users
        reads, without every user's rows built, and copied, once per half-life. A user's row is the
        one :meth:`interaction_rows` gives (ages run to that user's own latest event)."""
        wanted = np.zeros(self.n_users, dtype=bool)
        wanted[np.asarray(users, dtype=np.int64)] = True
        users_, items, weights, times = self._events_of(which, wanted)
        return [weighted_rows(self.n_users, self.n_items, users_, items, weights, times,
                              h if self.has_timestamps else None) for h in half_lives]

    def _events_of(self, which: str, users: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """user rows, item rows, type weights and (when the log has them) times of the training
        events (``train``), of those before the test period (``before_test``) or of every event (``all``);
        ``users``: an (n_users,) bool mask, the events of those users alone."""
        ev = self.events
        split = ev["split"].to_numpy()
        keep = {"train": lambda: split == TRAIN, "before_test": lambda: split != TEST, "all": lambda: None}[which]()
        if users is not None:
            of_users = users[ev["user_idx"].to_numpy()]
            keep = of_users if keep is None else keep & of_users
        rows = slice(None) if keep is None else np.flatnonzero(keep)
        times = ev[TIME].to_numpy()[rows] if self.has_timestamps else None
        return (ev["user_idx"].to_numpy()[rows], ev["item_idx"].to_numpy()[rows], ev[WEIGHT].to_numpy()[rows], times)

    def train_dataset(self) -> TrainExamples:
        ev = self.events
        idx = self.train_idx
        return TrainExamples(
            ev["user_idx"].to_numpy()[idx], ev["item_idx"].to_numpy()[idx],
            ev[WEIGHT].to_numpy()[idx], self.history_len, pad=self.n_items,
            history_sampling=self.history_sampling,
        )

    def train_sequences(self, length: int) -> TrainSequences:
        """The training events as windows of each user's events in time order, a next-item target
        at every position (:class:`dmp_dl.data.sequences.TrainSequences`)."""
        ev = self.events
        idx = self.train_idx
        return TrainSequences(ev["user_idx"].to_numpy()[idx], ev["item_idx"].to_numpy()[idx], ev[WEIGHT].to_numpy()[idx],
                              length, pad=self.n_items)

    def eval_dataset(self, stage: str) -> EvalUsers:
        """``stage`` is ``val`` or ``test``. A user's history is what they did before the period
        ranked: their training events for ``val``, training and validation events for ``test``."""
        return EvalUsers(
            getattr(self, f"{stage}_users"), self.train_history if stage == "val" else self.test_input_history,
            getattr(self, f"{stage}_seen"), getattr(self, f"{stage}_relevant"),
        )

    # -- Lightning hooks -----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=_keep,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """One example per training event (:meth:`train_dataset`), unless the module being trained
        builds its own from this data module: ``train_examples(dm) -> (dataset, batch_size)``
        (a sequence model's windows of each user's events, :class:`dmp_dl.data.sequences.TrainSequences`).

        Under data-parallel training (``trainer=ddp`` or ``ray``: the trainer's world size above 1)
        the batch size is one step of all processes together, each loading its share (rounded up):
        the same settings take steps of the same size, and as many of them an epoch, on any number
        of processes."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        own = getattr(module, "train_examples", None)
        dataset, batch_size = own(self) if callable(own) else (self.train_dataset(), self.batch_size)
        processes = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        if processes > 1:
            shared = per_process_step(batch_size, processes)
            log.info("data-parallel training over %d processes: %d examples per step in each (batch size %d)",
                     processes, shared, batch_size)
            batch_size = shared
        return self._loader(dataset, batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset("test"), self.eval_batch_size, shuffle=False)


def count_unmatched(table: pd.DataFrame | None, id_col: str, vocab: IdVocab, report, key: str) -> int:
    """Rows of an attribute table whose id is no id of the cleaned events: counted in ``report``
    (its ``unmatched_ids``) and logged; a warning with examples when no row matches at all
    (typically ids written differently in the two files)."""
    if table is None or len(table) == 0:
        return 0
    ids = table[id_col].astype(str)
    unmatched = vocab.index_of(ids.tolist()) < 0
    n = int(unmatched.sum())
    if report is not None:
        report.unmatched_ids = n
    if n == len(table):
        log.warning("%s: none of its %d %s values matches an id of the events (e.g. %r in the table, %r in the "
                    "events); its attributes are unused: check that both files write the ids the same way",
                    key, n, id_col, ids.iloc[0], str(vocab.ids[0]) if len(vocab) else None)
    elif n:  # e.g. catalogue items nobody interacted with: normal, but counted
        log.info("%s: %d of %d rows have an %s that is no id of the events; their attributes are unused",
                 key, n, len(table), id_col)
    return n


def _check_memory_limit(limit: object) -> float | None:
    """``data.memory_limit_gb`` as a positive number of GiB, or None."""
    if limit is None:
        return None
    try:
        value = float(limit)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"data.memory_limit_gb must be a positive number of GiB or null, got {limit!r}")
    return value


def _load(source, cleaning: CleaningOptions):
    """``source.load()``, told the cleaning options when it takes them (a source that can skip the
    rows they drop while reading, e.g. :class:`~dmp_dl.data.event_files.EventFileSource`)."""
    try:
        takes_cleaning = "cleaning" in inspect.signature(source.load).parameters
    except (TypeError, ValueError):  # a callable without a signature
        takes_cleaning = False
    return source.load(cleaning=cleaning) if takes_cleaning else source.load()


def _make_source(source, *, path, users, items, name):
    if hasattr(source, "load") and not isinstance(source, type):
        if path or users or items:
            raise ConfigError(f"data={name}: pass the files to the source factory, not to a built source")
        return source
    given = {k: v for k, v in (("path", path), ("users", users), ("items", items)) if v}
    accepted = inspect.signature(source).parameters
    extra = [k for k in given if k not in accepted]
    if extra:
        raise ConfigError(f"data={name} does not read files given by {', '.join('data.' + k for k in extra)}; remove them")
    return source(**given)
