"""Serving reliability: hot swap with POST /reload, safe defaults of serve.py, and a small load run.

A real ``serve.py`` process (uvicorn) serves a symlink to a bundle; clients in threads keep
querying it while the link is re-pointed and ``POST /reload`` swaps bundles, and while a damaged
bundle is refused. Not one request may fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from omegaconf import OmegaConf

from dmp_dl import Recommender
from dmp_dl.api.server import bundle_loader, create_app
from dmp_dl.store.bundle import ITEM_VECTORS, MANIFEST, write_manifest

from .test_crash_safety import export_small

ROOT = Path(__file__).resolve().parents[1]


def _bench_load():
    """bench/load.py as a module (its ``Server``: serve.py on a free loopback port)."""
    spec = importlib.util.spec_from_file_location("dmp_bench_load", ROOT / "bench" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


Server = _bench_load().Server

TOKEN = "reliability-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def point(link: Path, target: Path) -> None:
    """Re-point symlink ``link`` at ``target`` atomically (a new link renamed over the old one)."""
    tmp = link.with_name(f".{link.name}.next")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def restamped(bundle: Path, dest: Path, created_at: str) -> Path:
    """A copy of ``bundle`` published under another ``created_at`` (same ids, so every request
    that worked on the old bundle works on the new one: any failure is the swap's)."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["created_at"] = created_at
    write_manifest(dest, manifest)
    return dest


@pytest.fixture(scope="module")
def bundles(trained, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("swap")
    a = restamped(trained["bundle_dir"], root / "a", "2001-01-01T00:00:00+00:00")
    b = restamped(trained["bundle_dir"], root / "b", "2002-02-02T00:00:00+00:00")
    broken = restamped(trained["bundle_dir"], root / "broken", "2003-03-03T00:00:00+00:00")
    data = (broken / ITEM_VECTORS).read_bytes()
    (broken / ITEM_VECTORS).write_bytes(data[: len(data) // 2])  # a truncated copy
    current = root / "current"
    current.symlink_to(a)
    return {"a": a, "b": b, "broken": broken, "current": current}


@pytest.fixture(scope="module")
def server(bundles):
    with Server(bundles["current"], TOKEN, "max_k=50", "max_ids=20", "max_body_bytes=4096") as srv:
        yield srv


@pytest.fixture(scope="module")
def rec(trained) -> Recommender:
    return Recommender.load(trained["bundle_dir"])


def created_at(server) -> str:
    return httpx.get(f"{server.base}/health", timeout=30).json()["created_at"]


class Traffic:
    """``n`` threads, each a keep-alive client issuing a mix of valid requests until stopped."""

    def __init__(self, base: str, rec: Recommender, n: int = 8):
        users, items = [str(u) for u in rec.user_vocab.ids[:50]], [str(i) for i in rec.item_vocab.ids[:50]]
        self.requests = [("GET", "/recommend", {"params": {"user_id": u, "k": 10}}) for u in users[:20]]
        self.requests += [("GET", "/similar-items", {"params": {"item_id": i, "k": 5}}) for i in items[:10]]
        self.requests += [("POST", "/lookalike", {"json": {"seed_user_ids": users[i:i + 3], "k": 10}}) for i in range(5)]
        if rec.network is not None:
            self.requests += [("POST", "/recommend", {"json": {"history": items[i:i + 4], "k": 10}}) for i in range(5)]
        self.base, self.stop, self.results = base, threading.Event(), Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(j,)) for j in range(n)]

    def _client(self, j: int) -> None:
        with httpx.Client(base_url=self.base, headers=AUTH, timeout=120) as client:
            i = j
            while not self.stop.is_set():
                method, path, kwargs = self.requests[i % len(self.requests)]
                i += 1
                try:
                    status = client.request(method, path, **kwargs).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with self.lock:
                    self.results[status] += 1
                    if status != 200:
                        self.failures.append(f"{method} {path}: {status}")

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def wait_for(self, n: int) -> None:
        """Until at least ``n`` more requests have been answered."""
        start = sum(self.results.values())
        while sum(self.results.values()) < start + n and not self.stop.wait(0.02):
            pass

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


# -- hot swap ---------------------------------------------------------------------------------


def test_hot_swap_under_concurrent_requests_fails_none(server, bundles, rec):
    assert created_at(server) == "2001-01-01T00:00:00+00:00"
    with Traffic(server.base, rec) as traffic:
        traffic.wait_for(40)
        point(bundles["current"], bundles["b"])  # publish the new bundle ...
        r = httpx.post(f"{server.base}/reload", headers=AUTH, timeout=300)  # ... and swap to it
        assert r.status_code == 200, r.text
        assert r.json()["created_at"] == "2002-02-02T00:00:00+00:00"
        assert r.json()["previous_created_at"] == "2001-01-01T00:00:00+00:00"
        traffic.wait_for(40)
        assert created_at(server) == "2002-02-02T00:00:00+00:00"

        point(bundles["current"], bundles["broken"])  # a damaged bundle is refused ...
        r = httpx.post(f"{server.base}/reload", headers=AUTH, timeout=300)
        assert r.status_code == 409, r.text
        assert r.headers["content-type"] == "application/json"
        assert f"{ITEM_VECTORS}: checksum mismatch" in r.json()["detail"] and r.json()["error"] == "bad_bundle"
        traffic.wait_for(40)
        assert created_at(server) == "2002-02-02T00:00:00+00:00"  # ... and the old one keeps serving

        point(bundles["current"], bundles["a"])
        assert httpx.post(f"{server.base}/reload", headers=AUTH, timeout=300).status_code == 200
        traffic.wait_for(40)
    assert not traffic.failures, (traffic.failures[:5], traffic.results)
    assert traffic.results[200] >= 160
    assert created_at(server) == "2001-01-01T00:00:00+00:00"


def test_reload_needs_the_token(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{server.base}/reload", headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["detail"] == "missing or invalid bearer token"


def test_reload_swaps_a_bundle_an_export_replaced_in_place(tmp_path):
    """The served path is a directory that a new export replaces (atomically); without a token the
    endpoint is refused unless explicitly allowed."""
    path = export_small(tmp_path / "artifacts", seed=1, n_items=60)
    load = bundle_loader(path)
    closed = TestClient(create_app(load(), reload=load), raise_server_exceptions=False)
    r = closed.post("/reload")
    assert r.status_code == 403 and "token" in r.json()["detail"]

    client = TestClient(create_app(load(), token="t", reload=load), raise_server_exceptions=False)
    auth = {"Authorization": "Bearer t"}
    export_small(path, seed=2, n_items=70)
    assert client.get("/health").json()["items"] == 60  # nothing changes before the reload
    assert client.post("/reload", headers=auth).status_code == 200
    assert client.get("/health").json()["items"] == 70
    (path / "users.json").write_text("[]")
    r = client.post("/reload", headers=auth)
    assert r.status_code == 409 and str(path / "users.json") in r.json()["detail"]
    assert client.get("/health").json()["items"] == 70
    assert client.get("/recommend", params={"user_id": "u001", "k": 3}, headers=auth).status_code == 200


# -- safe defaults ----------------------------------------------------------------------------


def test_binds_loopback_by_default(server):
    assert OmegaConf.load(ROOT / "conf" / "serve.yaml").host == "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    assert httpx.get(f"{server.base}/health", timeout=30).status_code == 200
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback address to try")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{address}:{server.port}/health", timeout=5)


def test_token_guards_every_endpoint_but_health(server):
    assert httpx.get(f"{server.base}/health", timeout=30).status_code == 200
    for method, path in [("GET", "/recommend?user_id=x"), ("GET", "/similar-items?item_id=x"), ("POST", "/lookalike"),
                         ("POST", "/recommend"), ("POST", "/propensity"), ("POST", "/reload"), ("GET", "/docs"),
                         ("GET", "/openapi.json"), ("GET", "/no-such-path")]:
        r = httpx.request(method, f"{server.base}{path}", timeout=30)
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.json()["detail"] == "missing or invalid bearer token"


def test_request_size_is_limited(server):
    r = httpx.post(f"{server.base}/lookalike", headers=AUTH, timeout=30,
                   json={"seed_user_ids": ["u" * 100] * 50})  # about 5 KB, over max_body_bytes=4096
    assert r.status_code == 413 and r.json()["detail"] == "request body over 4096 bytes"

    def chunks():  # no Content-Length: refused while streaming
        yield b'{"seed_user_ids": ['
        for _ in range(100):
            yield b'"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", '
        yield b'"x"]}'

    r = httpx.post(f"{server.base}/lookalike", headers={**AUTH, "content-type": "application/json"}, content=chunks(),
                   timeout=30)
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]
    r = httpx.post(f"{server.base}/propensity", headers=AUTH, json={"user_ids": ["u"] * 21}, timeout=30)
    assert r.status_code == 422 and "at most 20 per request" in r.json()["detail"]


@pytest.mark.parametrize("k", [0, -1, 51, 10**9])
def test_k_is_limited(server, rec, k):
    user, item = str(rec.user_vocab.ids[0]), str(rec.item_vocab.ids[0])
    for method, path, kwargs in [("GET", "/recommend", {"params": {"user_id": user, "k": k}}),
                                 ("GET", "/similar-items", {"params": {"item_id": item, "k": k}}),
                                 ("POST", "/lookalike", {"json": {"seed_user_ids": [user], "k": k}})]:
        r = httpx.request(method, f"{server.base}{path}", headers=AUTH, timeout=30, **kwargs)
        assert r.status_code == 422 and "k must be an integer in 1..50" in r.json()["detail"], (path, r.text)
    assert httpx.get(f"{server.base}/recommend", params={"user_id": user, "k": 50}, headers=AUTH,
                     timeout=30).status_code == 200


# -- load -------------------------------------------------------------------------------------


def test_small_load_run_has_no_errors(trained, tmp_path):
    """bench/load.py at small scale: 20 concurrent clients, 200 requests, 2 hot swaps, zero errors."""
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--artifacts", str(trained["bundle_dir"]),
                           "--clients", "20", "--requests", "200", "--reloads", "2", "--no-record", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["requests"] == 200 and result["errors"] == 0 and result["statuses"] == {"200": 200}
    assert [r["status"] for r in result["reloads"]] == [200, 200]
    assert {"GET /recommend", "POST /recommend", "POST /lookalike"} <= {r["endpoint"] for r in result["rows"]}
    assert 0 < result["total"]["p50_ms"] <= result["total"]["p99_ms"]
