"""The API explorer (/docs, /redoc) works offline, and GET /segments serves the segment descriptions."""

from __future__ import annotations

import copy
import re
import socket
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from dmp_dl.api.server import create_app
from dmp_dl.audience.segments import segment_label

from .browser import dump_dom, screenshot

ENDPOINTS = ("/recommend", "/similar-items", "/lookalike", "/propensity", "/profile", "/segments")


@pytest.fixture
def client(rec):
    return TestClient(create_app(rec))


def test_docs_pages_use_only_assets_the_server_serves(client):
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?['"]([^'"]+)['"]""", r.text)
        urls = [a or b for a, b in urls]
        assert urls and not [u for u in urls if "://" in u or u.startswith("//")], urls  # nothing from a CDN
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert "googleapis" not in client.get("/redoc").text  # no web fonts either


def test_docs_and_their_assets_need_the_token_when_one_is_set(rec):
    client = TestClient(create_app(rec, token="s3cret"))
    asset = re.search(r"src=[\"']([^\"']+\.js)", TestClient(create_app(rec)).get("/docs").text).group(1)
    assert client.get("/docs").status_code == 401 and client.get(asset).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert client.get("/docs", headers=auth).status_code == 200 and client.get(asset, headers=auth).status_code == 200


def test_segments_endpoint_serves_every_description_with_its_label(client, rec):
    r = client.get("/segments", params={"representatives": 2})
    assert r.status_code == 200
    body = r.json()
    expected = rec.segments(representatives=2)
    assert body["k"] == rec.stored_segments.k == len(body["segments"]) >= 2
    assert sum(s["size"] for s in body["segments"]) == rec.n_users
    for got, want in zip(body["segments"], expected):
        assert got["segment"] == want["segment"] and got["size"] == want["size"]
        assert got["label"] == segment_label(want) and got["label"]
        assert [c["category"] for c in got["top_categories"]] == [c["category"] for c in want["top_categories"]]
        assert len(got["representatives"]) == 2 and set(got["representatives"]) <= set(rec.user_vocab.ids)
    assert client.get("/segments", params={"representatives": -1}).status_code == 422


def test_segments_is_documented_and_answers_409_without_segments(client, rec):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/segments"]["get"]
    assert {"200", "409"} <= set(op["responses"])
    assert "label" in spec["components"]["schemas"]["SegmentDescription"]["properties"]
    bare = copy.copy(rec)
    bare.stored_segments = None
    r = TestClient(create_app(bare)).get("/segments")
    assert r.status_code == 409 and r.json()["error"] == "unavailable" and "no segments" in r.json()["detail"]


@pytest.fixture
def live_server(rec):
    """The API on a free 127.0.0.1 port, in a thread of this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(rec), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_docs_render_their_endpoint_list_in_a_browser_with_the_network_off(live_server, tmp_path):
    dom = dump_dom(f"{live_server}/docs")
    rendered = set(re.findall(r'class="opblock-summary-path"[^>]*>.*?<span[^>]*>([^<]+)<', dom))  # Swagger UI's list
    rendered |= set(re.findall(r'data-path="([^"]+)"', dom))
    assert set(ENDPOINTS) <= rendered, sorted(rendered)
    redoc = dump_dom(f"{live_server}/redoc")
    assert "redoc-wrap" in redoc or "menu-content" in redoc
    for path in ENDPOINTS:
        assert path in redoc, path  # ReDoc renders each operation's path
    screenshot(f"{live_server}/docs", tmp_path / "docs.png")
