"""The HTTP API: in-process with FastAPI's TestClient, and once as a real `serve.py` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from dmp_dl import Recommender
from dmp_dl.api.server import create_app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def client(rec):
    return TestClient(create_app(rec, max_ids=50, max_body_bytes=4096))


def test_health_and_docs(client, rec):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["users"] == rec.n_users and body["items"] == rec.n_items
    assert body["indexes"]["items"]["factory"] == "Flat"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/recommend", "/similar-items", "/lookalike", "/propensity"} <= set(paths)


def test_recommend_matches_the_python_api(client, rec):
    user = rec.user_vocab.ids[5]
    r = client.get("/recommend", params={"user_id": user, "k": 10})
    assert r.status_code == 200
    assert [(x["item_id"], x["score"]) for x in r.json()["items"]] == rec.recommend(user, k=10)
    r = client.get("/recommend", params={"user_id": user, "k": 5, "exclude_seen": "false"})
    assert [x["item_id"] for x in r.json()["items"]] == [i for i, _ in rec.recommend(user, k=5, exclude_seen=False)]


def test_post_recommend_for_a_new_user(client, rec):
    history = rec.item_vocab.ids[:3].tolist()
    r = client.post("/recommend", json={"history": history, "k": 4})
    assert r.status_code == 200
    assert [x["item_id"] for x in r.json()["items"]] == [i for i, _ in rec.recommend_for_history(history, k=4)]
    r = client.post("/recommend", json={"history": history, "k": 4, "attributes": {"age": 30}})
    want = rec.recommend_for_history(history, k=4, attributes={"age": 30})
    assert [x["item_id"] for x in r.json()["items"]] == [i for i, _ in want]


def test_similar_items_lookalike(client, rec):
    item = rec.item_vocab.ids[0]
    r = client.get("/similar-items", params={"item_id": item, "k": 3})
    assert r.status_code == 200 and [x["item_id"] for x in r.json()["items"]] == [i for i, _ in rec.similar_items(item, 3)]
    seeds = rec.user_vocab.ids[:5].tolist()
    r = client.post("/lookalike", json={"seed_user_ids": seeds, "k": 20, "method": "neighbours"})
    assert r.status_code == 200
    assert [x["user_id"] for x in r.json()["users"]] == [u for u, _ in rec.lookalike(seeds, 20, method="neighbours")]


@pytest.mark.parametrize("method, url, kwargs, status, needle", [
    ("get", "/recommend", {"params": {"user_id": "ghost"}}, 404, "unknown user id: 'ghost'"),
    ("get", "/similar-items", {"params": {"item_id": "ghost"}}, 404, "unknown item id: 'ghost'"),
    ("post", "/recommend", {"json": {"history": ["ghost"]}}, 404, "unknown item id"),
    ("post", "/lookalike", {"json": {"seed_user_ids": ["ghost"]}}, 404, "ghost"),
    ("get", "/recommend", {"params": {"user_id": "<user>", "k": 0}}, 422, "k must be an integer in 1..1000"),
    ("get", "/recommend", {"params": {"user_id": "<user>", "k": 5000}}, 422, "1..1000"),
    ("get", "/recommend", {"params": {"user_id": "<user>", "k": "ten"}}, 422, "int"),
    ("get", "/recommend", {"params": {"k": 3}}, 422, "user_id"),
    ("post", "/recommend", {"json": {"history": []}}, 422, "history is empty"),
    ("post", "/recommend", {"json": {"k": 3}}, 422, "history"),
    ("post", "/recommend", {"json": {"history": ["<item>"], "attributes": {"shoe": "x"}}}, 422, "unknown attribute"),
    ("post", "/recommend", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "json"),
    ("post", "/lookalike", {"json": {"seed_user_ids": []}}, 422, "seed_user_ids is empty"),
    ("post", "/lookalike", {"json": {"seed_user_ids": ["<user>"], "method": "magic"}}, 422, "centroid"),
    ("post", "/lookalike", {"json": {"seed_user_ids": ["<user>"] * 51}}, 422, "at most 50 per request"),
    ("post", "/propensity", {"json": {"user_ids": "<user>"}}, 422, "list"),
    ("post", "/recommend", {"json": {"history": ["<item>"] * 2000}}, 413, "over 4096 bytes"),
])
def test_bad_input_gets_a_json_4xx(client, rec, method, url, kwargs, status, needle):
    known = {"<user>": str(rec.user_vocab.ids[1]), "<item>": str(rec.item_vocab.ids[1])}

    def fill(x):
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fill(v) for v in x]
        return known.get(x, x) if isinstance(x, str) else x

    r = getattr(client, method)(url, **fill(kwargs))
    assert r.status_code == status, r.text
    assert needle.lower() in r.text.lower()
    assert r.headers["content-type"].startswith("application/json")


def test_streamed_body_over_the_limit_is_413(client):
    chunks = iter([b'{"history": [', b'"x", ' * 1000, b'"x"]}'])  # no Content-Length: chunked upload
    r = client.post("/recommend", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over 4096 bytes" in r.json()["detail"]


def test_propensity_without_a_model_is_409(client, rec):
    if rec.has_propensity:
        pytest.skip("this bundle has a propensity model")
    r = client.post("/propensity", json={"user_ids": [rec.user_vocab.ids[0]]})
    assert r.status_code == 409 and "no propensity model" in r.json()["detail"]


def test_token_guards_everything_but_health(rec):
    client = TestClient(create_app(rec, token="s3cret"))
    user = rec.user_vocab.ids[0]
    assert client.get("/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        r = client.get("/recommend", params={"user_id": user}, headers=headers)
        assert r.status_code == 401 and r.json()["detail"] == "missing or invalid bearer token"
    assert client.post("/lookalike", json={"seed_user_ids": [user]}).status_code == 401
    r = client.get("/recommend", params={"user_id": user}, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200


def test_swapping_the_recommender_takes_effect_for_new_requests(rec, trained):
    app = create_app(rec)
    client = TestClient(app)
    smaller = Recommender.load(trained["bundle_dir"], max_k=3)
    assert client.get("/recommend", params={"user_id": rec.user_vocab.ids[0], "k": 5}).status_code == 200
    app.state.recommender = smaller
    r = client.get("/recommend", params={"user_id": rec.user_vocab.ids[0], "k": 5})
    assert r.status_code == 422 and "1..3" in r.json()["detail"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_py_answers_over_http(trained, rec, tmp_path):
    port = free_port()
    env = {**os.environ, "DMP_SERVE_TOKEN": "tok"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "serve.py"), f"artifacts={trained['bundle_dir']}", f"port={port}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve.py did not come up"
            time.sleep(0.3)
        user = rec.user_vocab.ids[2]
        auth = {"Authorization": "Bearer tok"}
        r = httpx.get(f"{base}/recommend", params={"user_id": user, "k": 10}, headers=auth)
        assert r.status_code == 200
        assert [x["item_id"] for x in r.json()["items"]] == [i for i, _ in rec.recommend(user, k=10)]
        assert httpx.get(f"{base}/recommend", params={"user_id": user}).status_code == 401  # token from the env
        assert httpx.get(f"{base}/recommend", params={"user_id": "ghost"}, headers=auth).status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not list(tmp_path.iterdir()), "serving writes nothing into the working directory"


def test_serve_refuses_a_missing_bundle_with_one_line(tmp_path, capsys):
    from omegaconf import OmegaConf

    from dmp_dl.api.server import serve
    from dmp_dl.core.cli import report_errors

    cfg = OmegaConf.load(REPO / "conf" / "serve.yaml")
    cfg.artifacts = str(tmp_path / "none")
    with pytest.raises(SystemExit) as exit_info, report_errors():
        serve(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bundle not found") and err.count("\n") == 1
