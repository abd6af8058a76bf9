"""The verified manifest: its digest, its one written form and its schema, checked by every reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir

from dmp_dl import Recommender
from dmp_dl.api.server import bundle_loader, create_app
from dmp_dl.core.cli import report_errors
from dmp_dl.core.errors import BundleError
from dmp_dl.privacy.erasure import ErasureError, forget_users
from dmp_dl.store.bundle import MANIFEST, Bundle, write_manifest
from dmp_dl.store.manifest import DIGEST_KEY, digest, manifest_text, seal

from .conftest import CONF_DIR

AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def pristine(trained, tmp_path_factory) -> Path:
    """A copy of the trained bundle that the tests of this module only read."""
    return Path(shutil.copytree(trained["bundle_dir"], tmp_path_factory.mktemp("manifest") / "artifacts"))


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "artifacts"))


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def one_line(capsys, fn) -> str:
    """The single ``error: ...`` line an entry point prints for ``fn``'s error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info, report_errors():
        fn()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    return lines[0]


# -- the digest ---------------------------------------------------------------------------------
def test_the_manifest_carries_the_digest_of_its_canonical_form(pristine):
    text = (pristine / MANIFEST).read_text()
    manifest = json.loads(text)
    assert manifest["format_version"] == 2 and text == manifest_text(manifest)
    recorded = manifest.pop(DIGEST_KEY)
    import hashlib

    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert recorded == hashlib.sha256(canonical).hexdigest() == digest(manifest)


def test_random_single_bit_flips_never_load(pristine, tmp_path):
    """300 seeded single-bit flips anywhere in manifest.json: every one is refused with a BundleError
    (never loaded, never an AttributeError/TypeError/KeyError from a reader further down)."""
    original = (pristine / MANIFEST).read_bytes()
    bundle = Path(shutil.copytree(pristine, tmp_path / "flipped"))
    rng = np.random.default_rng(16)
    positions = rng.integers(0, len(original) * 8, size=300)
    reasons = {}
    for bit in positions.tolist():
        data = bytearray(original)
        data[bit // 8] ^= 1 << (bit % 8)
        (bundle / MANIFEST).write_bytes(bytes(data))
        with pytest.raises(BundleError) as err:
            Bundle.open(bundle, verify=False)
        reason = str(err.value).split(": ", 1)[1][:30]
        reasons[reason] = reasons.get(reason, 0) + 1
    # the flips land in values, keys, the digest, the JSON syntax and the UTF-8: several reasons
    assert len(reasons) >= 3, reasons


def test_bit_flips_are_refused_by_load_forget_and_reload(pristine, tmp_path):
    original = (pristine / MANIFEST).read_bytes()
    bundle = Path(shutil.copytree(pristine, tmp_path / "artifacts"))
    rec = Recommender.load(pristine)
    client = TestClient(create_app(rec, token="s3cret", reload=bundle_loader(bundle)))
    rng = np.random.default_rng(3)
    for bit in rng.integers(0, len(original) * 8, size=20).tolist():
        data = bytearray(original)
        data[bit // 8] ^= 1 << (bit % 8)
        (bundle / MANIFEST).write_bytes(bytes(data))
        with pytest.raises(BundleError):
            Recommender.load(bundle)
        with pytest.raises(ErasureError) as err:
            forget_users(bundle, [rec.user_vocab.ids[0]], erasure_list=tmp_path / "list.txt", audit_log=tmp_path / "audit.jsonl")
        assert err.value.code == "bad_bundle"
        r = client.post("/reload", headers=AUTH)
        assert r.status_code == 409 and r.json()["error"] == "bad_bundle"
    assert not (tmp_path / "list.txt").exists() and not (tmp_path / "audit.jsonl").exists()
    assert (bundle / MANIFEST).read_bytes() != original  # the last flip is still there: nothing rewrote it


def test_an_edit_that_keeps_the_content_is_still_refused(copy):
    text = (copy / MANIFEST).read_text()
    (copy / MANIFEST).write_text(text + "\n")  # same JSON, other bytes
    with pytest.raises(BundleError, match="edited"):
        Bundle.open(copy)
    manifest = json.loads(text)
    (copy / MANIFEST).write_text(json.dumps(manifest))  # same content, other layout
    with pytest.raises(BundleError, match="edited"):
        Bundle.open(copy)
    manifest["dim"] += 1  # other content, old digest
    (copy / MANIFEST).write_text(manifest_text(manifest))
    with pytest.raises(BundleError, match="does not match its digest"):
        Bundle.open(copy)


def test_an_old_bundle_without_a_digest_is_refused_with_the_fix(copy):
    manifest = manifest_of(copy)
    manifest.pop(DIGEST_KEY)
    manifest["format_version"] = 1
    (copy / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with pytest.raises(BundleError, match="format version 1, this dmp_dl reads 2; export the bundle again"):
        Recommender.load(copy)
    manifest["format_version"] = 2
    (copy / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with pytest.raises(BundleError, match="no manifest digest .*export the bundle again"):
        Recommender.load(copy)


# -- the schema (a manifest with a valid digest but malformed fields) ----------------------------
MALFORMED = [
    # (change to the manifest, the field the message names)
    (lambda m: m.update(privacy="x"), "field privacy:"),
    (lambda m: m.update(indexes="x"), "field indexes:"),
    (lambda m: m.update(network="x"), "field network:"),
    (lambda m: m.update(counts=[1, 2]), "field counts:"),
    (lambda m: m["indexes"]["users"].update(factory=7), "field indexes.users.factory:"),
    (lambda m: m["indexes"]["items"].update(ntotal=3), "field indexes.items.ntotal:"),
    (lambda m: m.update(dim=0), "field dim:"),
    (lambda m: m.update(dim=True), "field dim:"),
    (lambda m: m["counts"].update(users=-1), "field counts.users:"),
    (lambda m: m["privacy"].update(id_length=99), "field privacy.id_length:"),
    (lambda m: m["privacy"].update(erasure_list="privacy_data/x.txt"), "field privacy:.*absolute"),
    (lambda m: m["privacy"].update(erasure_liss="/tmp/x.txt"), "field privacy.erasure_liss:"),
    (lambda m: m["privacy"].update(pseudonymized="yes"), "field privacy.pseudonymized:"),
    (lambda m: m["privacy"].update(erasures="none"), "field privacy.erasures:"),
    (lambda m: m["index_options"].update(factorx=m["index_options"].pop("factory")), "field index_options.factorx: unknown option"),
    (lambda m: m["index_options"].update(exact_below="many"), "field index_options.exact_below:"),
    (lambda m: m["index_options"].update(eval_queries=0), "field index_options: index.eval_queries"),
    (lambda m: m["segments"].update(user_aligned="segments/assignments.npy"), "field segments.user_aligned:"),
    (lambda m: m["segments"].update(user_aligned=["segments/assignmentz.npy"]), r"field segments.user_aligned\[0\]: .*not in the bundle"),
    (lambda m: m["segments"].update(user_aligned=["segments/centroids.faiss"]), r"field segments.user_aligned\[0\]: .*not a .npy"),
    (lambda m: m.update(segments=5), "field segments"),
    (lambda m: m["files"].pop("users.json"), r"field files\['users.json'\]: missing"),
    (lambda m: m["files"]["users.json"].update(sha256="zz"), r"field files\['users.json'\].sha256:"),
    (lambda m: m["files"].update({"../secret": {"sha256": "0" * 64, "bytes": 1}}), "outside the bundle"),
    (lambda m: m.update(created_at="yesterday"), "field created_at:"),
    (lambda m: m.update(packages={"numpy": 2}), r"field packages.numpy:"),
]


@pytest.mark.parametrize("change, field", MALFORMED, ids=[f for _, f in MALFORMED])
def test_a_malformed_manifest_is_refused_naming_the_field(copy, change, field):
    manifest = manifest_of(copy)
    change(manifest)
    write_manifest(copy, manifest)  # a valid digest: only the schema stands in the way
    with pytest.raises(BundleError, match=field) as err:
        Bundle.open(copy, verify=False)
    assert "\n" not in str(err.value) and "export the bundle again" in str(err.value)


def test_every_reader_refuses_a_malformed_manifest_with_one_line(pristine, copy, tmp_path, capsys):
    from dmp_dl.commands.audience import run_task
    from dmp_dl.commands.evaluate import evaluate_bundle

    manifest = manifest_of(copy)
    manifest["privacy"] = "not an object"
    write_manifest(copy, manifest)
    with pytest.raises(BundleError, match="field privacy"):
        Recommender.load(copy)
    # /reload: 409 and the current bundle keeps serving
    client = TestClient(create_app(Recommender.load(pristine), token="s3cret", reload=bundle_loader(copy)))
    r = client.post("/reload", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"] == "bad_bundle" and "field privacy" in r.json()["detail"]
    assert client.get("/health").json()["users"] > 0
    # forget, evaluate and the audience command: one line each, nothing written
    assert "field privacy" in one_line(capsys, lambda: forget_users(
        copy, ["u000001"], erasure_list=tmp_path / "list.txt", audit_log=tmp_path / "audit.jsonl"))
    assert not (tmp_path / "list.txt").exists()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        eval_cfg = compose("evaluate", overrides=[f"artifacts={copy}", f"output_dir={tmp_path / 'report'}"])
        audience_cfg = compose("audience_cli", overrides=["task=segments", f"artifacts={copy}",
                                                          f"output_dir={tmp_path / 'audience'}"])
    assert "field privacy" in one_line(capsys, lambda: evaluate_bundle(eval_cfg))
    assert "field privacy" in one_line(capsys, lambda: run_task(audience_cfg))
    assert not (tmp_path / "report").exists() and not (tmp_path / "audience").exists()


def _paths(value, prefix=()):
    """Every (key path) of a JSON value, containers included, leaves last."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:2]):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def test_any_field_of_the_wrong_type_is_refused_or_harmless(pristine, tmp_path):
    """Every field of the manifest (the run's config aside) replaced by a value of each other JSON
    type, with a valid digest: the bundle is refused with a BundleError, or it loads, serves and
    can be erased from without any other exception (no reader trips over a field: AttributeError,
    TypeError, KeyError ...)."""
    base = manifest_of(pristine)
    paths = [p for p in _paths(base) if p[0] not in ("config", DIGEST_KEY)]
    bundle = Path(shutil.copytree(pristine, tmp_path / "artifacts"))
    user = Recommender.load(pristine).user_vocab.ids[0]
    accepted, refused = {}, 0
    for path in paths:
        for value in ("x", 7, [], {}, None):
            manifest = json.loads(json.dumps(base))
            node = manifest
            for key in path[:-1]:
                node = node[key]
            if type(node[path[-1]]) is type(value):
                continue
            node[path[-1]] = value
            (bundle / MANIFEST).write_text(manifest_text(seal(manifest)))
            try:
                Bundle.open(bundle, verify=False)
            except BundleError:
                refused += 1
                continue
            accepted.setdefault(path, manifest)
    assert refused > 400 and len(accepted) > 10, (refused, len(accepted))
    for i, manifest in enumerate(accepted.values()):  # then every reader copes with it
        (bundle / MANIFEST).write_text(manifest_text(seal(manifest)))
        rec = Recommender.load(bundle)
        rec.recommend(user, k=3)
        json.dumps(rec.info())
        if i % 4 == 0:
            forget_users(bundle, [user], erasure_list=tmp_path / "l.txt", audit_log=tmp_path / "a.jsonl")
            shutil.rmtree(bundle)
            shutil.copytree(pristine, bundle)
