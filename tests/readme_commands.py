"""The commands and Python examples of README.md, as tests read them.

``shell_commands()`` reads every ```` ```bash ```` block: a line starting with ``#`` is example output,
a trailing ``\\`` continues a line, a quoted argument may span lines (``python -c "..."``), ``#``
outside quotes starts a comment, and ``a && b`` are two commands. ``python_snippets()`` reads every
```` ```python ```` block. Each command has a ``kind`` saying how tests check and run it; the
commands no test runs are :data:`NOT_RUN`, by an explicit rule with its reason.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# The Hydra commands: what follows `python` -> (config name in conf/, the check in dmp_dl.pipeline.checks.CHECKS).
HYDRA_COMMANDS = {
    ("train.py",): ("train", "train"),
    ("serve.py",): ("serve", "serve"),
    ("-m", "dmp_dl.evaluate"): ("evaluate", "evaluate"),
    ("-m", "dmp_dl.audience"): ("audience_cli", "audience"),
    ("-m", "dmp_dl.export"): ("export", "export"),
    ("-m", "dmp_dl.privacy", "forget"): ("privacy_cli", "privacy"),
}
# Programs whose lines no test runs, and why (any other program is an error: a new kind of line
# in the README needs a rule here or a way to be checked).
NOT_RUN = {
    "make": "installs the environment or runs the test suite itself",
    "ln": "re-points a deployment's bundle link (/srv): an operator's file operation",
    "mv": "re-points a deployment's bundle link (/srv): an operator's file operation",
    "ray": "starts or stops a Ray cluster's node: an operator's command (tests/test_ray.py starts a two-node one)",
}
PYTHONS = ("python", ".venv/bin/python")


@dataclass
class Command:
    """One README command line: ``argv`` as the shell splits it, at ``line`` of README.md."""

    line: int
    argv: list[str]
    kind: str = ""  # hydra | bench | curl | python-c | not-run
    config: str = ""  # hydra: the config name
    check: str = ""  # hydra: the CHECKS entry
    args: list[str] = field(default_factory=list)  # hydra: the overrides; bench: the script's arguments
    script: str = ""  # bench: bench/<name>.py
    multirun: bool = False
    output: list[str] = field(default_factory=list)  # the example output lines under it, without "# "

    @property
    def documented_error(self) -> str | None:
        """The error line the README shows for this command (``error: ...``), if any."""
        return self.output[0] if self.output and self.output[0].startswith("error: ") else None

    @property
    def id(self) -> str:
        return f"README.md:{self.line}: {' '.join(self.argv)[:70]}"


@dataclass
class Snippet:
    """One ```python block, starting at ``line`` of README.md."""

    line: int
    code: str

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the block's first line, its lines) of every fenced block."""
    blocks, lang, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            if lang is None:
                lang, start, lines = line[3:].strip(), number + 1, []
            else:
                blocks.append((lang, start, lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def _split(buffer: str) -> list[str] | None:
    """The shell words of ``buffer``, or None while a quote is still open."""
    try:
        return shlex.split(buffer, comments=True)
    except ValueError:
        return None


def classify(command: Command) -> Command:
    argv = command.argv
    if argv[0] in NOT_RUN:
        command.kind = "not-run"
    elif argv[0] == "curl":
        command.kind = "curl"
    elif argv[0] in PYTHONS and argv[1:2] == ["-c"]:
        command.kind = "python-c"
    elif argv[0] in PYTHONS and argv[1].startswith("bench/"):
        command.kind, command.script, command.args = "bench", argv[1], argv[2:]
    elif argv[0] in PYTHONS:
        for head, (config, check) in HYDRA_COMMANDS.items():
            if tuple(argv[1:1 + len(head)]) == head:
                rest = argv[1 + len(head):]
                command.kind, command.config, command.check = "hydra", config, check
                command.multirun = "-m" in rest
                command.args = [a for a in rest if a != "-m"]
                break
    if not command.kind:
        raise ValueError(f"README.md:{command.line}: no rule for {' '.join(argv)!r}: add one to tests/readme_commands.py")
    return command


def shell_commands(text: str | None = None) -> list[Command]:
    """Every command of the README's bash blocks, classified (see the module docstring)."""
    text = README.read_text() if text is None else text
    commands = []
    for lang, start, lines in fenced_blocks(text):
        if lang not in ("bash", "sh", "shell"):
            continue
        buffer, first, last = "", 0, []
        for offset, line in enumerate(lines):
            if not buffer and line.lstrip().startswith("#"):
                for command in last:  # example output of the command(s) above
                    command.output.append(line.lstrip()[1:].strip())
                continue
            if not buffer and not line.strip():
                last = []
                continue
            if not buffer:
                first = start + offset
            buffer += line + "\n"
            if buffer.rstrip().endswith("\\"):
                buffer = buffer.rstrip()[:-1] + " "
                continue
            words = _split(buffer)
            if words is None:
                continue  # a quoted argument spans lines
            buffer, last = "", []
            part: list[str] = []
            for word in [*words, "&&"]:
                if word == "&&":
                    if part:
                        last.append(classify(Command(first, part)))
                        commands.append(last[-1])
                    part = []
                else:
                    part.append(word)
        assert not buffer, f"README.md:{first}: unterminated command {buffer!r}"
    return commands


def python_snippets(text: str | None = None) -> list[Snippet]:
    text = README.read_text() if text is None else text
    return [Snippet(start, "\n".join(lines)) for lang, start, lines in fenced_blocks(text) if lang == "python"]


def curl_request(argv: list[str]) -> tuple[str, str, dict[str, str], str | None]:
    """(method, URL, headers, body) of a curl command line."""
    method, url, headers, body = "GET", "", {}, None
    words = iter(argv[1:])
    for word in words:
        if word == "-X":
            method = next(words)
        elif word == "-H":
            name, _, value = next(words).partition(":")
            headers[name.strip().lower()] = value.strip()
        elif word in ("-d", "--data"):
            body = next(words)
            method = "POST" if method == "GET" else method
        elif not word.startswith("-"):
            url = word
    return method, url, headers, body


def url_path(url: str) -> str:
    """The path of ``localhost:8000/recommend?user_id=...`` (``/recommend``)."""
    return "/" + re.sub(r"^(https?://)?[^/]*/?", "", url).split("?")[0]
