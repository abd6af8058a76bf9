"""The OpenAPI document tells the truth: every status, every error body, every limit.

Client generators and gateways are built from ``/openapi.json``, so each route declares each status
it can answer with the error schema it really sends (:mod:`dmp_dl.api.http_errors`), and the request
schemas carry the limits the server enforces. schemathesis (an OpenAPI fuzzer) checks both against
the app: here a bounded in-process run; ``bench/api_contract.py`` (and the slow test below) run a
few hundred cases per endpoint against a real ``serve.py``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dmp_dl.api.http_errors import ErrorBody
from dmp_dl.api.server import create_app
from dmp_dl.serving.recommender import Recommender

schemathesis = pytest.importorskip("schemathesis")

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_IDS = 50


def _bench_contract():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("dmp_bench_api_contract", ROOT / "bench" / "api_contract.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app(trained):
    # a Recommender of its own: the fuzzer calls every endpoint, and the session's must stay untouched
    return create_app(Recommender.load(trained["bundle_dir"]), token=TOKEN, max_ids=MAX_IDS, max_body_bytes=1 << 16)


@pytest.fixture(scope="module")
def spec(app) -> dict:
    return TestClient(app).get("/openapi.json", headers=AUTH).json()


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            yield path, method, op


def test_every_error_a_route_can_answer_is_declared_with_the_real_schema(spec):
    text = json.dumps(spec)
    assert "HTTPValidationError" not in text  # FastAPI's default 422, which the server never sends
    for path, method, op in operations(spec):
        codes = {int(c) for c in op["responses"]}
        assert 200 in codes and not any(c >= 500 for c in codes), (path, method, codes)
        if path != "/health":
            assert {401, 422} <= codes or (path == "/reload" and {401, 403, 409} <= codes), (path, method, codes)
            assert op.get("security"), (path, method)  # the bearer token, declared where it is required
        if method == "post":
            assert 413 in codes, (path, method, codes)
        if path == "/events":  # a write: the token, and a server without one refuses it
            assert {401, 403} <= codes, (path, method, codes)
        if path in ("/recommend", "/similar-items", "/lookalike", "/propensity", "/profile") or path == "/erase":
            assert 404 in codes, (path, method, codes)
        for code, response in op["responses"].items():
            if int(code) >= 400:
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert spec["components"]["schemas"]["ErrorBody"]["required"] == ["detail", "error"]


def test_request_schemas_carry_the_limits_the_server_enforces(spec, app):
    schemas = spec["components"]["schemas"]
    max_k = app.state.recommender.max_k
    for name, field in (("LookalikeRequest", "seed_user_ids"), ("PropensityRequest", "user_ids"), ("ErasureRequest", "user_ids")):
        prop = schemas[name]["properties"][field]
        assert (prop["minItems"], prop["maxItems"]) == (1, MAX_IDS), (name, prop)
    history = schemas["HistoryRequest"]
    assert history["properties"]["history"]["maxItems"] == MAX_IDS
    for name in ("HistoryRequest", "LookalikeRequest"):
        k = schemas[name]["properties"]["k"]
        assert (k["minimum"], k["maximum"]) == (1, max_k), k
    attributes = schemas["Attributes"]
    assert attributes["additionalProperties"] is False
    features = app.state.recommender.user_features
    assert set(attributes["properties"]) == set(features.categorical_columns) | set(features.numeric_columns)
    for column in features.numeric_columns:
        number = attributes["properties"][column]["anyOf"][0]
        assert number == {"type": "number", "minimum": -1e12, "maximum": 1e12}, number
    # an empty history is valid only together with attributes (a cold start from attributes)
    assert {"required": ["attributes"], "properties": {"attributes": {"type": "object", "minProperties": 1}}} in history["anyOf"]
    k_query = next(p for p in spec["paths"]["/recommend"]["get"]["parameters"] if p["name"] == "k")
    assert (k_query["schema"]["minimum"], k_query["schema"]["maximum"]) == (1, max_k)


@pytest.mark.parametrize("method, url, kwargs, status, code", [
    ("get", "/nowhere", {}, 404, "not_found"),
    ("put", "/recommend", {}, 405, "method_not_allowed"),
    ("get", "/recommend", {"params": {"user_id": "ghost"}}, 404, "unknown_id"),
    ("get", "/recommend", {"params": {"k": 3}}, 422, "invalid_request"),
    ("post", "/lookalike", {"json": {"seed_user_ids": []}}, 422, "invalid_request"),
    ("post", "/recommend", {"content": b'{"history": ["\xff"]}', "headers": {"content-type": "application/json"}}, 400, "bad_request"),
    ("post", "/propensity", {"content": b"x" * 70_000, "headers": {"content-type": "application/json"}}, 413, "too_large"),
    ("post", "/reload", {}, 409, "unavailable"),
])
def test_error_bodies_are_the_declared_schema(app, method, url, kwargs, status, code):
    kwargs = {**kwargs, "headers": {**AUTH, **kwargs.get("headers", {})}}
    r = getattr(TestClient(app, raise_server_exceptions=False), method)(url, **kwargs)
    assert r.status_code == status, r.text[:300]
    body = ErrorBody.model_validate(r.json())  # extra keys are refused too
    assert body.error == code and body.detail
    if status == 405:
        assert "GET" in r.headers["allow"] and "POST" in r.headers["allow"]
    if code == "unknown_id":
        assert body.kind == "user"
    if status == 422 and url != "/lookalike":
        assert body.errors and body.errors[0].loc == ["query", "user_id"]


def test_schemathesis_finds_nothing(app):
    """Valid requests (by the schema) answered 2xx/404/409, invalid ones refused with a documented
    4xx, every body and status as declared: ~15 valid and ~15 invalid cases per operation."""
    bench = _bench_contract()
    result = bench.fuzz(bench.load_schema(app, TOKEN), examples=15)
    assert not result["failures"], "\n\n".join(result["failures"][:3])
    tried = {op: n["positive"] + n["negative"] for op, n in result["cases"].items()}
    assert len(tried) >= 9 and all(n >= 15 for op, n in tried.items() if op != "GET /health"), tried
    # the token reached the server: no valid request was answered 401, and some were answered 200
    positive = [result["statuses"][op]["positive"] for op in tried]
    assert not any("401" in answers for answers in positive), positive
    assert sum(answers.get("200", 0) for answers in positive) >= 15, positive


@pytest.mark.slow
def test_schemathesis_against_serve_py_finds_nothing(trained):
    """bench/api_contract.py's run: 300 valid and 300 invalid cases per operation over HTTP."""
    result = _bench_contract().against_server(Path(trained["bundle_dir"]), examples=300)
    assert not any("401" in result["statuses"][op]["positive"] for op in result["statuses"]), result["statuses"]
    assert not result["failures"], "\n\n".join(result["failures"][:3])
