"""Writes the stored bundles of ``tests/test_stored_bundles.py`` and the answers they gave.

    python tests/data/stored_bundles/generate.py OUT_DIR

trains two tiny runs on the planted synthetic log and writes into ``OUT_DIR``:

* ``auto/``: the default model (autoencoder + EASE) with propensity, profiles, segments, the
  real-time part and an uplift model trained on a simulated campaign;
* ``two_tower/``: the two-tower network (a per-user id table) with propensity;
* ``answers.json``: what :func:`ask` answered for each, and for each the manifest of the bundle
  that ``erase_rows`` wrote without the users at :data:`ERASED_ROWS` (the checksum of every file).

The committed copies were written by the package as it was before the bundle parts were read
through :mod:`dmp_dl.store.parts`; the test checks that today's code loads them and answers the
same, and erases the same rows.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ERASED_ROWS = [3, 17]
ERASURE = {"time": "2024-01-01T00:00:00+00:00"}
# Manifest fields that change with every write (the rest must match exactly): times, versions, the
# digest, and the rebuilt user index's measured speed.
VOLATILE = ("created_at", "packages", "manifest_sha256")
INDEX_TIMINGS = ("build_seconds", "qps_batch", "latency_ms_p50", "latency_ms_p99")

DATA = ["data.source.n_users=120", "data.source.n_items=60", "data.source.n_events=3000",
        "data.source.n_categories=5", "data.source.n_segments=3", "data.source.campaign_response=true",
        "data.batch_size=256"]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
         "trainer.devices=1", "logger=none", "evaluation.report=null", "trainer.max_epochs=2",
         "propensity.net.hidden=[8]", "propensity.trainer.max_epochs=2", "~propensity.baselines"]
RUNS = {
    "auto": ["model.dim=8", "model.vae.net.hidden=16", "model.vae.max_epochs=2", "model.time_budget_s=null",
             "audience.segments.k=3"],
    "two_tower": ["model=two_tower", "model.dim=8", "model.net.hidden=16", "audience.enabled=false"],
}


def _ranked(pairs) -> list:
    return [[str(i), float(s)] for i, s in pairs]


def ask(rec) -> dict:
    """The questions every stored bundle is asked (only the public :class:`Recommender` API)."""
    users = [str(u) for u in rec.user_vocab.ids[[0, 1, 2, 5, len(rec.user_vocab) // 2]]]
    items = [str(i) for i in rec.item_vocab.ids[[0, 4, 9]]]
    out = {
        "info": {k: v for k, v in rec.info().items() if k not in ("created_at",)},
        "recommend": {u: _ranked(rec.recommend(u, k=10)) for u in users},
        "recommend_with_seen": _ranked(rec.recommend(users[0], k=10, exclude_seen=False)),
        "similar_items": {i: _ranked(rec.similar_items(i, k=10)) for i in items},
        "lookalike": {m: _ranked(rec.lookalike(users[:4], k=20, method=m)) for m in ("contrast", "centroid", "neighbours")},
    }
    if rec.network is not None:
        out["recommend_for_history"] = _ranked(rec.recommend_for_history(items, k=10))
        if rec.reads_user_attributes and rec.user_features.categorical_columns:
            token = rec.user_features.token_vocab[0]
            column, _, value = token.partition("=")
            out["recommend_for_history_with_attributes"] = _ranked(
                rec.recommend_for_history(items[:1], k=10, attributes={column: value}))
    if rec.has_propensity:
        out["propensity"] = rec.propensity(users)
    if rec.profiles is not None:
        out["profile"] = rec.profile(users[0])
    if rec.stored_segments is not None:
        out["segment"] = rec.segment(users[1])
        out["segments"] = rec.segments(representatives=3)
    if rec.uplift_model is not None:
        out["uplift"] = rec.uplift(users)
    return json.loads(json.dumps(out))


def erased_manifest(bundle_dir: Path, work: Path) -> dict:
    """The manifest (without :data:`VOLATILE` fields) of a copy of ``bundle_dir`` erased of :data:`ERASED_ROWS`."""
    from dmp_dl.privacy.erasure import erase_rows
    from dmp_dl.store.bundle import Bundle

    copy = Path(shutil.copytree(bundle_dir, work / f"erased-{bundle_dir.name}"))
    erase_rows(Bundle.open(copy), np.asarray(ERASED_ROWS), dict(ERASURE))
    return comparable(json.loads((copy / "manifest.json").read_text()))


def comparable(manifest: dict) -> dict:
    """``manifest`` without what changes with every write (:data:`VOLATILE`, :data:`INDEX_TIMINGS`)."""
    out = {k: v for k, v in manifest.items() if k not in VOLATILE}
    out["indexes"] = {side: {k: v for k, v in entry.items() if k not in INDEX_TIMINGS}
                      for side, entry in (manifest.get("indexes") or {}).items()}
    return out


def _train(name: str, overrides: list[str], out: Path, work: Path) -> Path:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from dmp_dl.core.open_settings import register
    from dmp_dl.pipeline.run import run

    register()  # the dict settings of conf/ that take new keys
    conf = Path(__file__).resolve().parents[3] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[*DATA, *QUIET, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(work / name)
    bundle = Path(run(cfg)["bundle_dir"])
    if name == "auto":
        _attach_uplift(bundle, work)
    return Path(shutil.copytree(bundle, out / name))


def _attach_uplift(bundle: Path, work: Path) -> None:
    """A simulated campaign on the planted log (half held out), then an uplift model added to ``bundle``."""
    import pandas as pd
    from hydra import compose, initialize_config_dir

    from dmp_dl.commands.audience import run_task
    from dmp_dl.data.synthetic import SyntheticSource, campaign_outcomes

    conf = Path(__file__).resolve().parents[3] / "conf"

    def cli(*overrides: str):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            return compose("audience_cli", overrides=[*overrides, "num_threads=1"])

    campaign = work / "campaign"
    run_task(cli("task=target", f"artifacts={bundle}", f"output_dir={campaign}", "budget=1000", "cost=0.01", "value=20",
                 "control_frac=0.5", "control_seed=3"))
    table = pd.read_csv(campaign / "target.csv", dtype={"user_id": str})
    truth = SyntheticSource(n_users=120, n_items=60, n_events=3000, n_categories=5, n_segments=3, seed=42,
                            campaign_response=True).load()
    events = campaign_outcomes(truth, table.loc[table["group"] == "treatment", "user_id"], days=14, seed=0)
    events.to_csv(campaign / "outcomes.csv", index=False)
    run_task(cli("task=uplift", f"artifacts={bundle}", f"assignments={campaign / 'target.csv'}",
                 f"outcomes={campaign / 'outcomes.csv'}", f"output_dir={work / 'uplift'}", "uplift.max_epochs=3"))


def main(out: Path) -> None:
    from dmp_dl import Recommender

    out.mkdir(parents=True, exist_ok=True)
    answers = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, overrides in RUNS.items():
            bundle = _train(name, overrides, out, work)
            answers[name] = {"answers": ask(Recommender.load(bundle)), "erased": erased_manifest(bundle, work)}
    (out / "answers.json").write_text(json.dumps(answers, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
