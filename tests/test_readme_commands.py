"""Every command and example of README.md is checked, so that a documented line cannot rot.

Fast (default suite): each Hydra command's overrides are composed by Hydra as the command composes
them and run through the command's checks (the preflight every command runs before reading data);
each bench command's arguments go through the script's own parser; each curl line names a route
of the API; each Python example compiles and its imports resolve. The slow test
(tests/test_readme_run.py) runs the commands on small data.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import itertools
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from dmp_dl.core.errors import DmpError
from dmp_dl.pipeline.checks import CHECKS

from .conftest import CONF_DIR, ML100K
from .readme_commands import ROOT, Command, curl_request, python_snippets, shell_commands, url_path

COMMANDS = shell_commands()


def localize(arg: str, work: Path) -> str:
    """``arg`` with the README's absolute and placeholder paths moved under ``work`` (and the shared
    MovieLens 100K folder to where this machine has it, untouched by the other rules)."""
    shared = "\0ml100k\0"
    arg = arg.replace("../shared/data/ml-100k", shared)
    for old, new in (("/tmp/", f"{work}/tmp/"), ("/data/", f"{work}/data/"), ("outputs/<run>/", f"{work}/tmp/run/"),
                     ("=NEW_DIR", f"={work}/moved"), ("=DIR", f"={work}/tmp/run/artifacts")):
        arg = arg.replace(old, new)
    return arg.replace(shared, str(ML100K))


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """One override list per job of a ``-m`` sweep (``model.dim=100,200`` -> two lists)."""
    choices = []
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.is_sweep_override():
            choices.append([f"{parsed.get_key_element()}={v}" for v in parsed.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(job) for job in itertools.product(*choices)]


def paths_in(args: list[str]) -> list[str]:
    return [a.split("=", 1)[1] for a in args if "=" in a and ("/" in a.split("=", 1)[1] or "." in a.split("=", 1)[1])]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.kind == "hydra"], ids=lambda c: c.id)
def test_hydra_commands_compose_and_pass_their_checks(command: Command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [localize(a, tmp_path) for a in command.args]
    jobs = expand_sweeps(args) if command.multirun else [args]
    for overrides in jobs:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(command.config, overrides=overrides)  # an override the config lacks fails here
        try:
            CHECKS[command.check](cfg)
        except DmpError as exc:
            if command.documented_error:
                assert str(exc) == command.documented_error.removeprefix("error: ")
                continue
            missing = [p for p in paths_in(overrides) if p in str(exc) and not Path(p).exists()]
            assert missing, f"{command.id}: {exc}"  # only a file of the reader's that is not here
        else:
            # an error the README shows comes from these checks, or from loading the data or the bundle
            # (a rule naming a column the bundle lacks): the slow test runs those
            assert command.documented_error is None or command.args[:1] in (["index=ivf"], ["task=rule"]), command.id


class Parsed(Exception):
    """Raised in place of running a bench once its arguments are parsed."""


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.kind == "bench"], ids=lambda c: c.id)
def test_bench_commands_are_accepted_by_their_parsers(command: Command, monkeypatch, tmp_path):
    script = ROOT / command.script
    assert script.exists(), command.id
    monkeypatch.syspath_prepend(str(script.parent))
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    spec = importlib.util.spec_from_file_location(f"readme_bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = [localize(a, tmp_path) for a in command.args]
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with pytest.raises(Parsed):  # a flag, section or choice the script no longer has exits 2 instead
        module.main(args) if inspect.signature(module.main).parameters else module.main()


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.kind == "curl"], ids=lambda c: c.id)
def test_curl_lines_name_a_route_of_the_api(command: Command, rec):
    from fastapi.routing import APIRoute

    from dmp_dl.api.server import create_app

    method, url, _, _ = curl_request(command.argv)
    routes = {(m, r.path) for r in create_app(rec).routes if isinstance(r, APIRoute) for m in r.methods}
    assert (method, url_path(url)) in routes, f"{command.id}: {method} {url_path(url)} is not a route"


@pytest.mark.parametrize("snippet", python_snippets(), ids=lambda s: s.id)
def test_python_examples_compile_and_their_imports_resolve(snippet):
    tree = ast.parse(snippet.code, filename=f"README.md:{snippet.line}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"README.md:{snippet.line}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


def test_every_readme_command_has_a_rule():
    kinds = {c.kind for c in COMMANDS}
    assert kinds <= {"hydra", "bench", "curl", "python-c", "not-run"}
    assert sum(c.kind == "hydra" for c in COMMANDS) >= 30
