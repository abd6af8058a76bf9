"""The artifact bundle: atomic writing, verification on load, and the export at the end of a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from dmp_dl import Recommender
from dmp_dl.core.errors import BundleError
from dmp_dl.models.embeddings import export_embeddings
from dmp_dl.models.parts import load_network
from dmp_dl.pipeline.run import run
from dmp_dl.store.bundle import (
    FORMAT_VERSION,
    ITEM_VECTORS,
    MANIFEST,
    NETWORK_SPEC,
    NETWORK_WEIGHTS,
    Bundle,
    BundleWriter,
    MissingPartError,
    write_manifest,
)

from .conftest import without_propensity


@pytest.fixture
def bundle_copy(trained, tmp_path):
    """A private copy of the trained bundle that a test may damage."""
    return Path(shutil.copytree(trained["bundle_dir"], tmp_path / "artifacts"))


# -- the writer and reader --------------------------------------------------------------------


def test_writer_round_trip_and_manifest(tmp_path):
    target = tmp_path / "b"
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    with BundleWriter(target) as w:
        w.save_array("a.npy", arr)
        w.save_json("part/meta.json", {"x": 1})
        (w.subdir("extra") / "blob.txt").write_text("hello")
        w.commit({"dim": 4})
    b = Bundle.open(target)
    np.testing.assert_array_equal(b.array("a.npy"), arr)
    assert b.json("part/meta.json") == {"x": 1}
    assert b.has("extra") and (b.file("extra") / "blob.txt").read_text() == "hello"
    m = json.loads((target / MANIFEST).read_text())
    assert m["format_version"] == FORMAT_VERSION and m["dim"] == 4 and m["created_at"]
    assert set(m["files"]) == {"a.npy", "part/meta.json", "extra/blob.txt"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert {"python", "numpy"} <= set(m["packages"])
    with pytest.raises(MissingPartError, match="no propensity"):
        b.file("propensity")
    assert not list(tmp_path.glob(".b.*")), "no temporary folders left behind"


def test_crashed_export_keeps_the_previous_bundle(tmp_path):
    target = tmp_path / "b"
    with BundleWriter(target) as w:
        w.save_json("v.json", 1)
        w.commit({})
    with pytest.raises(RuntimeError, match="disk on fire"):
        with BundleWriter(target) as w:
            w.save_json("v.json", 2)
            raise RuntimeError("disk on fire")
    assert Bundle.open(target).json("v.json") == 1
    assert not list(tmp_path.glob(".b.*"))
    with BundleWriter(target) as w:  # a finished export replaces the bundle
        w.save_json("v.json", 3)
        w.commit({})
    assert Bundle.open(target).json("v.json") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_half_written_bundle_does_not_load(tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    np.save(half / ITEM_VECTORS, np.zeros((2, 2), np.float32))
    with pytest.raises(BundleError, match="manifest.json: missing"):
        Bundle.open(half)
    with pytest.raises(BundleError, match="bundle not found"):
        Bundle.open(tmp_path / "nowhere")


def test_corrupt_file_is_refused_naming_it(bundle_copy):
    path = bundle_copy / ITEM_VECTORS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"item_vectors\.npy: checksum mismatch"):
        Recommender.load(bundle_copy)


def _replace_sealed(bundle: Path, name: str, array: np.ndarray) -> None:
    """Write ``array`` as bundle file ``name`` with a manifest that vouches for it (a bundle
    consistent on disk whose contents do not fit)."""
    import hashlib

    np.save(bundle / name, array)
    manifest = json.loads((bundle / MANIFEST).read_text())
    data = (bundle / name).read_bytes()
    manifest["files"][name] = {**manifest["files"][name], "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    write_manifest(bundle, manifest)


@pytest.mark.parametrize("change, message", [
    (lambda tokens: tokens[:-1], r"user_table/tokens\.npy: shape \(\d+, \d+\), expected \d+ users' rows"),
    (lambda tokens: tokens + 10_000, r"user_table/tokens\.npy: token ids outside the \d+ tokens"),
])
def test_a_user_table_that_does_not_fit_the_bundle_is_refused_naming_it(bundle_copy, change, message):
    tokens = np.load(bundle_copy / "user_table/tokens.npy", allow_pickle=False)
    assert tokens.shape[0] == Recommender.load(bundle_copy).n_users
    _replace_sealed(bundle_copy, "user_table/tokens.npy", change(tokens))
    with pytest.raises(BundleError, match=message):
        Recommender.load(bundle_copy)


def test_missing_file_is_refused_naming_it(bundle_copy):
    (bundle_copy / NETWORK_WEIGHTS).unlink()
    with pytest.raises(BundleError, match=r"weights\.pt: listed in the manifest but missing"):
        Recommender.load(bundle_copy)


@pytest.mark.parametrize("change, message", [
    ({"format_version": FORMAT_VERSION + 1}, "upgrade dmp_dl"),
    ({"format_version": 0}, "export the bundle again"),
    ({"format": "something-else"}, "not a dmp_dl bundle"),
])
def test_incompatible_manifest_is_refused(bundle_copy, change, message):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest.update(change)
    write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError, match=message):
        Recommender.load(bundle_copy)


def test_manifest_cannot_point_outside_the_bundle(bundle_copy):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["files"]["../secret"] = {"sha256": "0" * 64, "bytes": 1}
    write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.open(bundle_copy)


def test_network_class_comes_only_from_the_allowlist(tmp_path):
    with BundleWriter(tmp_path / "b") as w:
        w.save_torch(NETWORK_WEIGHTS, {"w": torch.zeros(1)})
        w.save_json(NETWORK_SPEC, {"class": "subprocess.Popen", "kwargs": {}, "n_users": 1, "n_items": 1})
        w.commit({})
    with pytest.raises(BundleError, match="unknown network class 'subprocess.Popen'"):
        load_network(Bundle.open(tmp_path / "b"))


# -- the export at the end of a run -----------------------------------------------------------


def test_run_exports_a_bundle_matching_the_model(trained):
    dm, net = trained["datamodule"], trained["module"].net
    bundle_dir = Path(trained["bundle_dir"])
    assert bundle_dir.name == "artifacts" and (bundle_dir.parent / "metrics.json").exists()
    b = Bundle.open(bundle_dir)
    m = b.manifest
    assert m["counts"] == {"users": dm.n_users, "items": dm.n_items, "seen_pairs": int(dm.all_seen.nnz)}
    assert m["dim"] == net.dim and m["metric"] == "inner_product"
    assert m["config"]["model"]["name"] == "auto"
    for name in ("items", "users"):
        info = m["indexes"][name]
        assert info["factory"] == "Flat" and info["recall@10"] == 1.0 and info["qps_batch"] > 0

    rec = Recommender.load(bundle_dir)
    users, items = export_embeddings(net, dm.full_history, torch.device("cpu"))
    np.testing.assert_allclose(rec.user_vectors, users, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rec.item_vectors, items, rtol=1e-5, atol=1e-6)
    assert rec.user_vocab == dm.user_vocab and rec.item_vocab == dm.item_vocab
    np.testing.assert_array_equal(b.array("item_popularity.npy"), dm.item_counts)
    seen_rows = np.diff(b.array("seen_indptr.npy"))
    np.testing.assert_array_equal(seen_rows, np.diff(dm.all_seen.indptr))

    # the rebuilt network gives the trained network's cold-start vectors
    history = torch.as_tensor(dm.full_history[:5])
    net.cpu().eval()
    with torch.no_grad():
        expected = net.cold_user_vectors(history).numpy()
        got = rec.network.cold_user_vectors(history).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_export_can_be_switched_off(tiny_cfg):
    cfg = without_propensity(tiny_cfg("debug=fdr", "export=false", "logger=none"))
    result = run(cfg)
    assert "bundle_dir" not in result
    assert not (Path(cfg.paths.output_dir) / "artifacts").exists()


def test_propensity_model_travels_in_the_bundle(tiny_cfg):
    pytest.importorskip("dmp_dl.propensity.bundle", reason="the propensity step is not in this tree")
    from dmp_dl.propensity.bundle import load_propensity

    cfg = tiny_cfg("debug=fdr", "logger=none")
    if "propensity" not in cfg:
        pytest.skip("conf/train.yaml has no propensity group")
    with open_dict(cfg):
        cfg.propensity.enabled = True
    result = run(cfg)
    assert "propensity" in result, "the run produced no propensity result"
    rec = Recommender.load(result["bundle_dir"])
    assert rec.has_propensity
    ids = rec.user_vocab.ids[:7].tolist()
    scores = rec.propensity(ids)
    assert len(scores) == 7 and all(np.isfinite(scores))
    direct = load_propensity(Path(result["bundle_dir"]) / "propensity").score_known(rec.user_vocab.index_of(ids))
    np.testing.assert_allclose(scores, direct, rtol=1e-6)
