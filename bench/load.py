"""Serving under load: `serve.py` on a free 127.0.0.1 port, many concurrent clients, zero errors required.

Starts ``python serve.py`` on the bundle (``--artifacts DIR``, or a synthetic bundle of
``--users``/``--items`` random vectors built with ``export_bundle``), with a random bearer token,
and drives it with ``--clients`` concurrent keep-alive clients (asyncio + httpx, one connection
each) that issue ``--requests`` requests in total, a mix of the endpoints the bundle supports:
``GET /recommend``, ``GET /similar-items``, ``POST /lookalike``, and ``POST /recommend`` (cold
start) / ``POST /propensity`` when the bundle has them. Meanwhile ``--reloads`` times, evenly spread
over the run, it calls ``POST /reload`` (the server loads the bundle again and swaps it in), so the
run also counts requests failed by a hot swap.

Reports latency p50/p90/p99/max per endpoint and overall (measured by the client, queueing in the
client included), requests/s, and errors: any answer other than 200, or a transport error or
timeout. Exits with status 1 if there was any error or a reload failed. The clients run on the
same machine and take CPU from the server.

    python bench/load.py                                   # 200 clients, 4000 requests, 3 reloads
    python bench/load.py --artifacts outputs/<run>/artifacts --clients 50 --requests 1000
    python bench/load.py --clients 20 --requests 200 --no-record   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench's own modules
import output  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_bundle(target: Path, n_users: int, n_items: int, dim: int, seed: int = 0) -> Path:
    """A bundle of random unit vectors (exact indexes, ~20 seen items per user, no network)."""
    import scipy.sparse as sp

    from dmp_dl.data.vocab import IdVocab
    from dmp_dl.index.ann import IndexOptions
    from dmp_dl.training.export import export_bundle

    rng = np.random.default_rng(seed)

    def unit(n: int) -> np.ndarray:
        x = rng.standard_normal((n, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    rows = np.repeat(np.arange(n_users), 20)
    seen = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, rng.integers(0, n_items, len(rows)))),
                         shape=(n_users, n_items))
    seen.data[:] = 1
    return export_bundle(target, user_vocab=IdVocab([f"u{i:07d}" for i in range(n_users)], "user"),
                         item_vocab=IdVocab([f"i{i:07d}" for i in range(n_items)], "item"),
                         user_vectors=unit(n_users), item_vectors=unit(n_items), seen=seen,
                         item_popularity=np.asarray(seen.sum(0)).ravel(),
                         index_options=IndexOptions(factory="Flat", eval_queries=100))


class Server:
    """``python serve.py`` in a subprocess on a free loopback port, stopped on exit."""

    def __init__(self, artifacts: Path, token: str, *overrides: str, startup_timeout: float = 300):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "serve.py"), f"artifacts={artifacts}", f"port={self.port}", "log_level=warning",
             *overrides], cwd=tempfile.gettempdir(), env={**os.environ, "DMP_SERVE_TOKEN": token},
            stdout=self.log, stderr=subprocess.STDOUT)
        self._wait(startup_timeout)

    def _wait(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.py exited with status {self.proc.returncode}: {self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve.py did not answer /health within {timeout:.0f} s")
            time.sleep(0.3)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()


def request_plan(info: dict, user_ids: list[str], item_ids: list[str], n: int, seed: int = 0) -> list[tuple]:
    """``n`` requests ``(endpoint, method, path, params, body)``, a fixed mix over what the bundle serves."""
    rng = np.random.default_rng(seed)
    kinds = ["GET /recommend"] * 5 + ["GET /similar-items"] * 2 + ["POST /lookalike"]
    if info.get("cold_start"):
        kinds += ["POST /recommend"] * 2
    if info.get("propensity"):
        kinds += ["POST /propensity"]
    plan = []
    for kind in rng.choice(kinds, n):
        user, item = str(rng.choice(user_ids)), str(rng.choice(item_ids))
        if kind == "GET /recommend":
            plan.append((kind, "GET", "/recommend", {"user_id": user, "k": 10}, None))
        elif kind == "GET /similar-items":
            plan.append((kind, "GET", "/similar-items", {"item_id": item, "k": 10}, None))
        elif kind == "POST /lookalike":
            plan.append((kind, "POST", "/lookalike", None, {"seed_user_ids": rng.choice(user_ids, 3).tolist(), "k": 20}))
        elif kind == "POST /recommend":
            plan.append((kind, "POST", "/recommend", None, {"history": rng.choice(item_ids, 5).tolist(), "k": 10}))
        else:
            plan.append((kind, "POST", "/propensity", None, {"user_ids": rng.choice(user_ids, 5).tolist()}))
    return plan


async def drive(base: str, token: str, plan: list[tuple], clients: int, reloads: int, timeout: float) -> dict:
    """Issue ``plan`` with ``clients`` concurrent connections; ``reloads`` POST /reload calls spread over it."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: Counter = Counter()
    errors: Counter = Counter()  # by endpoint
    samples: list[str] = []
    reload_results: list[dict] = []
    next_request, done = 0, 0
    marks = [int(len(plan) * (i + 1) / (reloads + 1)) for i in range(reloads)]
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout, limits=limits) as http:

        async def client() -> None:
            nonlocal next_request, done
            while next_request < len(plan):
                kind, method, path, params, body = plan[next_request]
                next_request += 1
                t = time.perf_counter()
                try:
                    r = await http.request(method, path, params=params, json=body)
                    status = r.status_code
                    if status != 200 and len(samples) < 5:
                        samples.append(f"{kind}: {status} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                    if len(samples) < 5:
                        samples.append(f"{kind}: {status} {exc}")
                latencies[kind].append(time.perf_counter() - t)
                statuses[status] += 1
                errors[kind] += status != 200
                done += 1

        async def reloader() -> None:
            for mark in marks:
                while done < mark:
                    await asyncio.sleep(0.01)
                t = time.perf_counter()
                try:
                    r = await http.post("/reload")
                    reload_results.append({"status": r.status_code, "seconds": time.perf_counter() - t,
                                           "at_request": done, "detail": None if r.status_code == 200 else r.text[:200]})
                except httpx.HTTPError as exc:
                    reload_results.append({"status": type(exc).__name__, "seconds": time.perf_counter() - t,
                                           "at_request": done, "detail": str(exc)})

        t0 = time.perf_counter()
        await asyncio.gather(reloader(), *(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "statuses": statuses, "errors": errors, "wall_seconds": wall, "error_samples": samples,
            "reloads": reload_results}


def summarise(kind: str, seconds: list[float], errors: int) -> dict:
    ms = np.asarray(seconds) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"endpoint": kind, "requests": len(ms), "errors": errors, "p50_ms": float(p50), "p90_ms": float(p90),
            "p99_ms": float(p99), "max_ms": float(ms.max())}


def run_load(artifacts: Path, clients: int, requests: int, reloads: int, timeout: float, seed: int = 0,
             server_overrides: tuple[str, ...] = ()) -> dict:
    """Start serve.py on ``artifacts``, drive it, stop it; every figure of the run in one dict."""
    import httpx

    from dmp_dl.data.vocab import IdVocab

    token = secrets.token_urlsafe(16)
    user_ids = IdVocab.load(artifacts / "users.json").ids.tolist()
    item_ids = IdVocab.load(artifacts / "items.json").ids.tolist()
    with Server(artifacts, token, *server_overrides) as server:
        info = httpx.get(f"{server.base}/health", timeout=10).json()
        plan = request_plan(info, user_ids, item_ids, requests, seed)
        result = asyncio.run(drive(server.base, token, plan, clients, reloads, timeout))
        alive = server.proc.poll() is None
        log_tail = server.output()[-2000:]
    rows = [summarise(kind, result["latencies"][kind], result["errors"][kind]) for kind in sorted(result["latencies"])]
    all_latencies = [x for v in result["latencies"].values() for x in v]
    errors = sum(n for status, n in result["statuses"].items() if status != 200)
    total = summarise("all", all_latencies, errors)
    total["requests_per_s"] = len(all_latencies) / result["wall_seconds"]
    failed_reloads = [r for r in result["reloads"] if r["status"] != 200]
    return {"rows": rows, "total": total, "clients": clients, "requests": len(all_latencies), "errors": errors,
            "statuses": {str(k): v for k, v in result["statuses"].items()}, "error_samples": result["error_samples"],
            "reloads": result["reloads"], "failed_reloads": len(failed_reloads), "server_alive_at_end": alive,
            "bundle": {k: info.get(k) for k in ("users", "items", "dim", "cold_start", "propensity")},
            "server_log_tail": log_tail if errors or failed_reloads or not alive else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, help="bundle to serve (default: a synthetic one)")
    ap.add_argument("--users", type=int, default=20_000, help="synthetic bundle: users")
    ap.add_argument("--items", type=int, default=5_000, help="synthetic bundle: items")
    ap.add_argument("--dim", type=int, default=32, help="synthetic bundle: vector size")
    ap.add_argument("--clients", type=int, default=200, help="concurrent connections")
    ap.add_argument("--requests", type=int, default=4000, help="requests in total")
    ap.add_argument("--reloads", type=int, default=3, help="POST /reload calls during the run")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds (a timeout is an error)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS.md")
    output.add_arguments(ap)
    args = ap.parse_args()
    output.require({"httpx": "the HTTP clients"}, "bench/load.py")
    output.use(args)

    with tempfile.TemporaryDirectory(prefix="dmp-load-") as tmp:
        artifacts = args.artifacts or synthetic_bundle(Path(tmp) / "artifacts", args.users, args.items, args.dim)
        result = run_load(artifacts.resolve(), args.clients, args.requests, args.reloads, args.timeout)
    ok = result["errors"] == 0 and result["failed_reloads"] == 0 and result["server_alive_at_end"]
    from common import command, machine, markdown_table  # bench/common.py, beside this script

    columns = ["endpoint", "requests", "errors", "p50_ms", "p90_ms", "p99_ms", "max_ms", "requests_per_s"]
    table = markdown_table([*result["rows"], result["total"]], columns, floatfmt=".1f")
    reloads = ", ".join(f"{r['status']} in {r['seconds']:.2f} s at request {r['at_request']}" for r in result["reloads"])
    b = result["bundle"]
    body = (f"{result['clients']} concurrent clients, {result['requests']} requests on 127.0.0.1 against `serve.py` "
            f"({b['users']} users, {b['items']} items, dim {b['dim']}; "
            f"{'synthetic vectors' if not args.artifacts else 'bundle ' + str(args.artifacts)}), "
            f"token on. Latency measured by the client (its queueing included); clients and server share the machine.\n\n"
            f"{table}\n\n**Errors: {result['errors']}** (statuses: {result['statuses']}). "
            f"Hot swaps during the run: {len(result['reloads'])} `POST /reload` ({reloads or 'none'}); "
            f"requests failed by them: {result['errors']}, failed reloads: {result['failed_reloads']}.")
    data = {**result, "machine": machine(), "command": command()}
    if args.json:
        args.json.write_text(json.dumps(data, indent=2, default=str))
    if not args.no_record:
        from common import write_section

        write_section("load", "Serving under load (bench/load.py)", body, data)
    else:
        print(body)
    if not ok:
        print(f"FAILED: {result['errors']} errors, {result['failed_reloads']} failed reloads, "
              f"server alive: {result['server_alive_at_end']}; samples: {result['error_samples']}\n"
              f"{result['server_log_tail']}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
