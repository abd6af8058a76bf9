"""Storing a trained propensity model as plain files, and loading it for serving.

A propensity directory holds::

    propensity.json     format and version, the feature spec (event types, decay half-lives,
                        attribute encodings, cleaning rules for new users' events), the network's
                        constructor arguments, the embedding network's class and arguments, the
                        served model's name and how it was selected, the calibration of the
                        served model, the task (target, horizon, cutoff) and test metrics
    weights.pt          the network's state_dict (with the embedding network under ``encoder.``)
    tabular.npz         only when a classic model is served (``served`` is not ``mlp``): its
                        arrays (:class:`~dmp_dl.propensity.tabular.TabularModel`); the network
                        then only provides the embedding feature
    known_scores.npy    (n_users,) float64: every known user's probability as of the end of the
                        data; index i = user i of the embedding model's user vocabulary
    items.json          the embedding network's item vocabulary (only with the embedding feature)

Nothing is pickled: weights load with ``torch.load(weights_only=True)``, arrays with
``np.load(allow_pickle=False)``; an embedding-network class is looked up in the network registry
(:mod:`dmp_dl.models.registry`: a class registered with ``encodes_users``), never imported from a
name read from a file. :class:`PropensityPart` is the bundle's ``propensity`` part
(:mod:`dmp_dl.store.parts`).
"""

from __future__ import annotations

import inspect
import io
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmp_dl.core.errors import BundleError
from dmp_dl.core.io import atomic_write_bytes, atomic_write_text
from dmp_dl.data.features import FeatureTable
from dmp_dl.data.vocab import IdVocab
from dmp_dl.models import registry
from dmp_dl.models.parts import registered_or_refuse
from dmp_dl.propensity.calibration import Calibrator
from dmp_dl.propensity.features import UserFeatures
from dmp_dl.propensity.net import PropensityNet
from dmp_dl.propensity.scorer import PropensityScorer
from dmp_dl.propensity.tabular import TabularModel
from dmp_dl.store.bundle import Bundle, BundleWriter
from dmp_dl.store.parts import BundlePart, UserErasure, drop_table_rows, spec_object

FORMAT = "dmp_dl.propensity"
FORMAT_VERSION = 2  # 2: the served model may be a classic one (tabular.npz)
READABLE_VERSIONS = (1, 2)
SPEC_FILE, WEIGHTS_FILE, SCORES_FILE, ITEMS_FILE = "propensity.json", "weights.pt", "known_scores.npy", "items.json"
TABULAR_FILE = "tabular.npz"
SUMMARY_METRICS = ("roc_auc", "pr_auc", "log_loss", "brier", "ece", "lift@10")
PART = "propensity"  # the bundle folder and manifest entry


def encoder_entry(network: object) -> registry.RegisteredNetwork | None:
    """The registry entry of a network (class, class name or instance) that can encode users for
    the embedding feature (None: it cannot be one)."""
    entry = registry.registered(network)
    return entry if entry is not None and entry.encodes_users else None


def save_propensity(result: Any, directory: Path) -> dict:
    """Write ``result`` (a :class:`~dmp_dl.propensity.train.PropensityResult`) into the existing,
    empty ``directory``. Returns a small JSON-safe entry for the bundle manifest."""
    directory = Path(directory)
    scorer: PropensityScorer = result.scorer
    summary = result.summary()
    metrics = {name: {k: m.get(k) for k in SUMMARY_METRICS} for name, m in summary["metrics"].items()}
    task = summary["task"]
    spec = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "features": scorer.features.spec(),
        "net": scorer.net.config,
        "encoder": scorer.info.get("encoder"),
        "served": scorer.served,
        "selection": summary.get("selection"),
        "calibration": scorer.calibrator.to_dict(),
        "data_end": scorer.data_end,
        "n_users": scorer.n_users,
        "task": task,
        "metrics": metrics,
        "training": summary["training"],
    }
    atomic_write_text(directory / SPEC_FILE, json.dumps(spec, indent=1))
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in scorer.net.state_dict().items()}, buf)
    atomic_write_bytes(directory / WEIGHTS_FILE, buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(scorer.known_scores, dtype=np.float64), allow_pickle=False)
    atomic_write_bytes(directory / SCORES_FILE, buf.getvalue())
    files = [SPEC_FILE, WEIGHTS_FILE, SCORES_FILE]
    if scorer.tabular is not None:
        atomic_write_bytes(directory / TABULAR_FILE, scorer.tabular.to_bytes())
        files.append(TABULAR_FILE)
    if scorer.item_vocab is not None and spec["encoder"] is not None:
        scorer.item_vocab.save(directory / ITEMS_FILE)
        files.append(ITEMS_FILE)
    return {
        "model": scorer.served,
        "label_source": task["label_source"],
        "target_event": task["target_event"],
        "target_resolved": task["target_resolved"],
        "horizon_days": task["horizon_days"],
        "cutoff": task["cutoff"],
        "cutoff_iso": task["cutoff_iso"],
        "data_end": scorer.data_end,
        "embedding": summary["training"].get("embedding"),
        "metrics": metrics,
        "files": files,
    }


def _read_spec(path: Path) -> dict:
    if not path.is_file():
        raise BundleError(f"{path}: missing; not a propensity model directory (export the bundle again)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); export the bundle again") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise BundleError(f"{path}: not a propensity model spec (format must be {FORMAT!r})")
    if spec.get("format_version") not in READABLE_VERSIONS:
        raise BundleError(f"{path}: propensity format version {spec.get('format_version')!r}, this dmp_dl reads "
                          f"{FORMAT_VERSION}; export the bundle again with this version")
    return spec


def _build_encoder(spec: dict | None, state: dict[str, torch.Tensor], where: Path) -> torch.nn.Module | None:
    if spec is None:
        return None
    name = spec.get("class")
    entry = encoder_entry(name) if isinstance(name, str) else None
    if entry is None:
        known = ", ".join(sorted(n for n, e in registry.networks().items() if e.encodes_users))
        raise BundleError(f"{where}: unknown embedding network class {name!r} (known: {known})")
    cls = entry.cls
    kwargs = dict(spec.get("kwargs") or {})
    accepted = inspect.signature(cls).parameters
    for side in ("user", "item"):
        tokens, numeric = state.get(f"encoder.{side}_attr.tokens"), state.get(f"encoder.{side}_attr.numeric")
        if f"{side}_features" in accepted and tokens is not None and numeric is not None:
            # The attribute encoder is sized by these arrays only; their vocabulary lives in the feature spec.
            kwargs[f"{side}_features"] = FeatureTable(tokens.numpy(), numeric.numpy(), [], [], [], [], [])
    return cls(n_users=int(spec["n_users"]), n_items=int(spec["n_items"]), **kwargs)


def load_propensity(directory: Path) -> PropensityScorer:
    """The :class:`PropensityScorer` stored in ``directory`` by :func:`save_propensity`.

    Raises :class:`BundleError` naming the file when one is missing, unreadable or inconsistent.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"{directory}: propensity model directory not found")
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    spec = _read_spec(spec_path)
    try:
        features = UserFeatures.from_spec(spec["features"])
        calibrator = Calibrator.from_dict(spec["calibration"])
        net_kwargs = dict(spec["net"])
        n_users, data_end = int(spec["n_users"]), int(spec["data_end"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{spec_path}: incomplete or invalid propensity spec ({type(exc).__name__}: {exc})") from None
    if not weights_path.is_file():
        raise BundleError(f"{weights_path}: missing; the propensity model is incomplete (export the bundle again)")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise BundleError(f"{weights_path}: not a readable weights file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"{weights_path}: not a state_dict of tensors")
    try:
        encoder = _build_encoder(spec.get("encoder"), state, spec_path)
        net = PropensityNet(encoder=encoder, **net_kwargs)
        net.load_state_dict(state, strict=True)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise BundleError(f"{weights_path}: the network cannot be rebuilt from these weights and {SPEC_FILE} "
                          f"({str(exc).splitlines()[0]})") from None
    scores_path = directory / SCORES_FILE
    if not scores_path.is_file():
        raise BundleError(f"{scores_path}: missing; the propensity model is incomplete (export the bundle again)")
    try:
        scores = np.load(scores_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{scores_path}: not a readable array ({exc})") from None
    if scores.shape != (n_users,) or not np.issubdtype(scores.dtype, np.floating) or not (
            np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()):
        raise BundleError(f"{scores_path}: expected {n_users} probabilities in [0, 1], got shape {scores.shape} {scores.dtype}")
    item_vocab = None
    if encoder is not None:
        items_path = directory / ITEMS_FILE
        if not items_path.is_file():
            raise BundleError(f"{items_path}: missing; the propensity model is incomplete (export the bundle again)")
        item_vocab = IdVocab.load(items_path)
        if len(item_vocab) != features.n_items:
            raise BundleError(f"{items_path}: {len(item_vocab)} items, the network was trained on {features.n_items}")
    served = spec.get("served", "mlp")
    tabular = None
    if served != "mlp":
        tabular = _load_tabular(directory / TABULAR_FILE, net)
    info = {k: spec.get(k) for k in ("task", "metrics", "training", "encoder", "selection")}
    return PropensityScorer(net, calibrator, features, scores, data_end, item_vocab, info, tabular, str(served))


def _load_tabular(path: Path, net: PropensityNet) -> TabularModel:
    """The served classic model, checked against the feature widths the network was built for."""
    if not path.is_file():
        raise BundleError(f"{path}: missing; the propensity model is incomplete (export the bundle again)")
    try:
        model = TabularModel.from_file(path)
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise BundleError(f"{path}: not a readable propensity model ({exc})") from None
    c = net.config
    width = c["n_behaviour"] + c["n_attr_numeric"] + max(c["n_tokens"] - 1, 0) + (net.encoder.dim if net.encoder is not None else 0)
    if model.n_features != width:
        raise BundleError(f"{path}: the model reads {model.n_features} features, the stored feature spec gives {width}")
    return model


class PropensityPart(BundlePart):
    """The propensity model as a bundle part: the folder :func:`save_propensity` writes, loaded by
    :func:`load_propensity`; erasure drops the users' known scores and the rows of the embedding
    network's per-user tables that the registry names (``encoder.`` in ``weights.pt``)."""

    name = PART

    def present(self, bundle: Bundle) -> bool:
        return bundle.has(PART)

    def save(self, writer: BundleWriter, value: Any) -> dict[str, Any]:
        """value: a :class:`~dmp_dl.propensity.train.PropensityResult`."""
        return {PART: save_propensity(value, writer.subdir(PART))}

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], **options: Any) -> PropensityScorer:
        return load_propensity(bundle.file(PART))

    def drop_users(self, bundle: Bundle, erasure: UserErasure, writer: BundleWriter) -> None:
        scores_file, spec_file, weights_file = (f"{PART}/{f}" for f in (SCORES_FILE, SPEC_FILE, WEIGHTS_FILE))
        if not bundle.has(scores_file):
            return
        n = erasure.n_users
        scores = bundle.array(scores_file)
        if scores.shape[:1] != (n,):
            raise BundleError(f"{bundle.root / scores_file}: {scores.shape[0] if scores.ndim else 0} scores for {n} users")
        writer.save_array(scores_file, scores[erasure.keep])
        erasure.removed[scores_file] = "score"
        spec = spec_object(bundle, spec_file)
        spec["n_users"] = erasure.users_after
        encoder = spec.get("encoder")
        if isinstance(encoder, dict) and bundle.has(weights_file):
            entry = registered_or_refuse(encoder.get("class"), bundle.root / spec_file)
            try:
                encoder_users = int(encoder["n_users"])
            except (KeyError, TypeError, ValueError):
                raise BundleError(f"{bundle.root / spec_file}: encoder.n_users missing or not a number") from None
            state = bundle.torch_state(weights_file)
            keys = drop_table_rows(state, entry.tables("user"), erasure, bundle.root / weights_file, prefix="encoder.",
                                   n_users=encoder_users)
            encoder["n_users"] = erasure.users_after
            writer.save_torch(weights_file, state)
            erasure.removed[weights_file] = "rows of " + ", ".join(keys) if keys else "no per-user rows"
        writer.path(spec_file).write_text(json.dumps(spec, indent=1), encoding="utf-8")
