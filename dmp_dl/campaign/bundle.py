"""The uplift model as an optional part of the bundle it was trained on.

The model reads the bundle's own per-user inputs (:mod:`dmp_dl.campaign.features`), so it belongs
to that bundle: ``task=uplift`` adds it to the bundle (a new bundle built beside it with the same
files plus the part, checksummed and renamed into place, as erasure does), and loading the bundle
loads it. The part is a folder and a manifest entry ``uplift``::

    uplift/uplift.json   format and version, the inputs read, the network's arguments, the two
                         arms' calibrations, the campaign it learnt from and its held-out metrics
    uplift/weights.pt    the network's state_dict

It stores nothing per user (the inputs are the bundle's user-aligned arrays, scored on demand), so
it lists no ``user_aligned`` files and erasure needs nothing from it. A bundle exported by a new
training run has new user vectors: train the uplift model on it again.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmp_dl.campaign.features import UpliftFeatures, uplift_inputs
from dmp_dl.campaign.net import UpliftNet
from dmp_dl.core.errors import BundleError
from dmp_dl.propensity.calibration import Calibrator
from dmp_dl.store.bundle import Bundle, BundleWriter
from dmp_dl.store.manifest import DIGEST_KEY
from dmp_dl.store.parts import BundlePart

PART = "uplift"
FORMAT, FORMAT_VERSION = "dmp_dl.uplift", 1
SPEC_FILE, WEIGHTS_FILE = f"{PART}/uplift.json", f"{PART}/weights.pt"
_MANIFEST_OWN = ("format", "format_version", "created_at", "packages", "files", DIGEST_KEY)


class UpliftScorer:
    """Conversion probabilities with and without contact, and their difference, for known users.

    net: the trained :class:`UpliftNet` (CPU, eval mode); control, treated: each arm's calibration
    of its head's logit; features: the bundle inputs read; info: JSON-safe facts (campaign, metrics).
    """

    def __init__(self, net: UpliftNet, control: Calibrator, treated: Calibrator, features: UpliftFeatures,
                 info: dict | None = None):
        self.net = net.cpu().eval()
        self.control, self.treated = control, treated
        self.features = features
        self.info = dict(info or {})

    @torch.no_grad()
    def logits(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """(n, 2) float64 logits [without, with contact] of inputs x (n, F)."""
        out = [self.net(torch.from_numpy(np.ascontiguousarray(x[s: s + batch_size]))).double()
               for s in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, 2))

    def probabilities(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p_control (n,), p_treated (n,)) calibrated, float64."""
        z = self.logits(x)
        return self.control(z[:, 0]), self.treated(z[:, 1])

    def score_rows(self, rec, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uplift, p_control, p_treated), each (n,) float64, of ``rec``'s users at ``rows``."""
        p_c, p_t = self.probabilities(uplift_inputs(rec, rows, self.features))
        return p_t - p_c, p_c, p_t


def write_uplift(w: BundleWriter, scorer: UpliftScorer) -> dict:
    """Write the part with ``w``; returns its manifest entry."""
    spec = {"format": FORMAT, "format_version": FORMAT_VERSION, "features": scorer.features.to_dict(),
            "net": scorer.net.config, "calibration": {"control": scorer.control.to_dict(), "treated": scorer.treated.to_dict()},
            **{k: v for k, v in scorer.info.items() if k not in ("format", "format_version")}}
    w.save_json(SPEC_FILE, spec)
    w.save_torch(WEIGHTS_FILE, scorer.net.state_dict())
    return {"files": [SPEC_FILE, WEIGHTS_FILE], "user_aligned": [],
            **{k: scorer.info[k] for k in ("campaign", "metrics", "trained_at") if k in scorer.info}}


def attach_uplift(bundle_dir: str | Path, scorer: UpliftScorer) -> Path:
    """Add (or replace) the uplift part of the bundle at ``bundle_dir``: the bundle is verified,
    rebuilt beside itself with every other file and the part, and renamed into place."""
    bundle = Bundle.open(bundle_dir)
    manifest = bundle.manifest
    with BundleWriter(bundle.root) as w:
        for name in manifest["files"]:
            if not name.startswith(f"{PART}/"):
                shutil.copyfile(bundle.root / name, w.path(name))
        content = {k: v for k, v in manifest.items() if k not in _MANIFEST_OWN}
        content[PART] = write_uplift(w, scorer)
        content.setdefault("trained_at", manifest.get("created_at"))
        return w.commit(content)


def load_uplift(bundle: Bundle, rec=None) -> UpliftScorer | None:
    """The bundle's uplift model, or None when it has none. With ``rec`` (the bundle's
    Recommender), checks that the bundle has every input the model reads."""
    if not bundle.has(SPEC_FILE):
        return None
    where = bundle.root / SPEC_FILE
    spec = bundle.json(SPEC_FILE)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise BundleError(f"{where}: not an uplift model spec (format must be {FORMAT!r})")
    if spec.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{where}: uplift format version {spec.get('format_version')!r}, this dmp_dl reads "
                          f"{FORMAT_VERSION}; train the uplift model again")
    try:
        features = UpliftFeatures.from_dict(spec["features"])
        net = UpliftNet(**spec["net"])
        control = Calibrator.from_dict(spec["calibration"]["control"])
        treated = Calibrator.from_dict(spec["calibration"]["treated"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{where}: incomplete or invalid uplift spec ({type(exc).__name__}: {exc})") from None
    try:
        net.load_state_dict(bundle.torch_state(WEIGHTS_FILE), strict=True)
    except (RuntimeError, pickle.UnpicklingError) as exc:
        raise BundleError(f"{bundle.root / WEIGHTS_FILE}: does not fit {SPEC_FILE} ({str(exc).splitlines()[0]})") from None
    if features.width != net.config["n_features"]:
        raise BundleError(f"{where}: {features.width} inputs listed, the network reads {net.config['n_features']}")
    if rec is not None:
        features.check(rec, str(where))
    info = {k: spec.get(k) for k in ("campaign", "metrics", "trained_at", "training")}
    return UpliftScorer(net, control, treated, features, info)


class UpliftPart(BundlePart):
    """The uplift model (this module), added to a bundle after a measured campaign.
    Loaded with ``loaded["recommender"]`` (the bundle's Recommender), whose inputs it checks."""

    name = "uplift"

    def save(self, writer, value) -> dict[str, Any]:
        """value: an :class:`~dmp_dl.campaign.bundle.UpliftScorer`."""
        return {self.name: write_uplift(writer, value)}

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], **options: Any):
        return load_uplift(bundle, loaded.get("recommender"))
