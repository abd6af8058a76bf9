"""The HTTP API against its own OpenAPI document: schemathesis, a few hundred cases per endpoint.

Starts ``serve.py`` on a bundle (with a bearer token), loads ``/openapi.json`` and, for every
operation, generates schema-valid requests (which must be answered 2xx, or 401/403/404/409) and
schema-invalid ones (which must be refused with a 4xx), checking every answer with all of
schemathesis' checks: no server error, only documented statuses, bodies and content types as
declared, unknown methods answered 405, the token enforced.

    python bench/api_contract.py                          # trains a tiny bundle first (~1 min)
    python bench/api_contract.py --artifacts DIR --examples 300

``fuzz`` is also what ``tests/test_api_contract.py`` runs (in-process, fewer cases).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench's own modules
import output  # noqa: E402

TOKEN = "contract-check-token"


def audience_rules():
    """Valid audience rules (the ``audience-rule`` string format of ``/audiences/*``, a language
    JSON Schema cannot express): comparisons of ``distinct_items``, a column every bundle has,
    joined by and / or / not with parentheses."""
    from hypothesis import strategies as st

    number = st.floats(-1e6, 1e6, allow_nan=False).map(lambda x: f"{x:g}")
    compare = st.builds("distinct_items {} {}".format, st.sampled_from(["<", "<=", ">", ">=", "==", "!=", "="]), number)
    member = st.lists(number, min_size=1, max_size=4).map(lambda xs: f"distinct_items in [{', '.join(xs)}]")
    return st.recursive(compare | member, lambda inner: st.one_of(
        st.builds("({}) and ({})".format, inner, inner), st.builds("{} or {}".format, inner, inner),
        inner.map("not ({})".format)), max_leaves=6)


def load_schema(source, token: str):
    """The schemathesis schema of a URL (``.../openapi.json``) or an ASGI app, with the bearer token
    as schemathesis auth: applied to every generated request, dropped or mangled only where a case
    tests the auth itself (which must then be refused)."""
    import schemathesis
    from schemathesis.config import SchemathesisConfig

    schemathesis.openapi.format("audience-rule", audience_rules())

    # schemathesis' list of refusals plus 413: a body over max_body_bytes is refused before it is
    # parsed (declared on every POST), so an invalid request that large (max_ids + 1 long ids) gets 413
    rejected = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
    config = SchemathesisConfig.from_dict({
        "auth": {"openapi": {"HTTPBearer": {"bearer": token}}},
        "checks": {"negative_data_rejection": {"expected-statuses": rejected}},
    })
    headers = {"Authorization": f"Bearer {token}"}  # to read the document itself
    if isinstance(source, str):
        return schemathesis.openapi.from_url(source, config=config, headers=headers)
    return schemathesis.openapi.from_asgi("/openapi.json", source, config=config, headers=headers)


def fuzz(schema, examples: int, seed: int = 0) -> dict:
    """Run every operation of ``schema`` (see :func:`load_schema`) with ``examples`` positive and
    ``examples`` negative cases. Returns ``{"cases": {operation: {mode: n}}, "statuses": {operation:
    {mode: {status: n}}}, "failures": [text]}``."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    cases: dict[str, dict[str, int]] = {}
    statuses: dict[str, dict[str, dict[str, int]]] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            cases.setdefault(operation.label, {})[mode.value] = 0
            seen = statuses.setdefault(operation.label, {}).setdefault(mode.value, {})

            @hypothesis_seed(seed)
            @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                cases[operation.label][mode.value] += 1
                try:
                    response = case.call_and_validate()
                    seen[str(response.status_code)] = seen.get(str(response.status_code), 0) + 1
                except BaseException as exc:  # noqa: BLE001 - a failed check is recorded, the run goes on
                    failures.append(f"{operation.label} ({mode.value}): {str(exc).strip()[:2000]}")

            try:
                check()
            except Unsatisfiable:  # e.g. no invalid request exists for an endpoint without parameters
                pass
    return {"cases": cases, "statuses": statuses, "failures": failures}


def tiny_bundle(where: Path) -> Path:
    from common import compose_train_cfg

    from dmp_dl.pipeline.run import run

    overrides = ["data.source.n_users=400", "data.source.n_items=150", "data.source.n_events=12000",
                 "trainer.max_epochs=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                 "logger=none", "propensity.enabled=false",
                 # POST /erase is fuzzed too: its list and log stay in the temporary folder
                 f"privacy.erasure_list={where / 'erased_users.txt'}", f"privacy.audit_log={where / 'audit.jsonl'}"]
    return Path(run(compose_train_cfg(overrides, where / "run"))["bundle_dir"])


def against_server(artifacts: Path, examples: int) -> dict:
    """:func:`fuzz` over HTTP against ``python serve.py artifacts=...`` (bench/load.py's Server)."""
    from load import Server

    with Server(artifacts, TOKEN) as server:
        schema = load_schema(f"{server.base}/openapi.json", TOKEN)
        t0 = time.perf_counter()
        out = fuzz(schema, examples)
        out["seconds"] = time.perf_counter() - t0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, help="a bundle (default: train a tiny one)")
    parser.add_argument("--examples", type=int, default=300, help="cases per operation and mode (valid / invalid)")
    output.add_arguments(parser)
    args = parser.parse_args()
    output.require({"schemathesis": "the generated requests", "hypothesis": "their search"}, "bench/api_contract.py")
    output.use(args)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import markdown_table, write_section

    with tempfile.TemporaryDirectory(prefix="dmp-contract-") as tmp:
        artifacts = args.artifacts or tiny_bundle(Path(tmp))
        result = against_server(artifacts, args.examples)
    def answers(op: str, mode: str) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(result["statuses"][op][mode].items()))

    rows = [{"operation": op, "valid cases": n.get("positive", 0), "answers": answers(op, "positive"),
             "invalid cases": n.get("negative", 0), "answers ": answers(op, "negative")}
            for op, n in result["cases"].items()]
    total = sum(r["valid cases"] + r["invalid cases"] for r in rows)
    verdict = "**0 failures of any kind**" if not result["failures"] else f"**{len(result['failures'])} FAILURES**"
    body = (f"schemathesis {_version()} against `serve.py` over HTTP (bearer token), every check enabled "
            f"(server errors, undocumented statuses, response schemas and content types, valid data accepted, "
            f"invalid data refused, 405 for other methods, the token enforced): {total} cases in "
            f"{result['seconds']:.0f} s, {verdict}.\n\n{markdown_table(rows)}")
    if result["failures"]:
        body += "\n\n```\n" + "\n\n".join(result["failures"][:5]) + "\n```"
    write_section("api_contract", "API contract: schemathesis against serve.py (bench/api_contract.py)", body,
                  {"examples": args.examples, **result})
    print(json.dumps({"cases": total, "failures": len(result["failures"])}))
    return 0 if not result["failures"] else 1


def _version() -> str:
    from importlib.metadata import version

    return version("schemathesis")


if __name__ == "__main__":
    sys.exit(main())
