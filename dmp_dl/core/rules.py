"""Rules for configuration values: each checks one value and says in words what it accepts.

A command's checks (:mod:`dmp_dl.pipeline.checks`) are tables of ``key -> rule`` run by
:func:`check_rules`; the bounds shared with the code that reads the values (segment ids, amounts,
campaign dates, confidence levels) are here so that code can use them without the checks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from omegaconf import DictConfig, ListConfig, OmegaConf

from dmp_dl.core.errors import ConfigError

MAX_SEED = 2**32 - 1  # numpy and Lightning seeds are unsigned 32-bit integers
MAX_SEGMENT = 2**31 - 1  # segment ids are int32 in the bundle and the campaign files
# A money amount (a budget, a cost per contact, a value per conversion) above this is a typo, not a
# plan: the same bound as an event's value (dmp_dl.data.schema.MAX_ABS_VALUE), and sums over a
# billion users stay finite.
MAX_AMOUNT = 1e12
ABSENT = object()


# -- rules ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int:
    """A whole number in ``lo..hi`` (None: unbounded on that side); ``null`` allows None."""

    lo: int | None = None
    hi: int | None = None
    null: bool = False
    also: tuple[int, ...] = ()  # special values allowed outside the range (e.g. -1: no limit)

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.null else f"must be {self.describe()}"
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be {self.describe()}"
        if value in self.also:
            return None
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"an integer in {self.lo}..{self.hi}"
        elif self.lo is not None:
            text = f"an integer >= {self.lo}"
        elif self.hi is not None:
            text = f"an integer <= {self.hi}"
        else:
            text = "an integer"
        return text + "".join(f" or {v}" for v in self.also) + (" or null" if self.null else "")


@dataclass(frozen=True)
class Num:
    """A finite number in the interval given by ``lo``/``hi`` (open ends with ``lo_open``/``hi_open``)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    null: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.null else f"must be {self.describe()}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be {self.describe()}"
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return f"must be {self.describe()}"
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"a finite number {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            text = f"a finite number {'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            text = "a finite number"
        return text + (" or null" if self.null else "")


@dataclass(frozen=True)
class Choice:
    options: tuple
    null: bool = False

    def problem(self, value: Any) -> str | None:
        if (value is None and self.null) or (value is not None and value in self.options):
            return None
        return f"must be {self.describe()}"

    def describe(self) -> str:
        return "one of " + " | ".join(map(str, self.options)) + (" or null" if self.null else "")


@dataclass(frozen=True)
class Each:
    """A non-empty list whose every element follows ``rule`` (one value is taken as a list of one)."""

    rule: Int | Num
    null: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.null else f"must be {self.describe()}"
        values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
        if not values or any(self.rule.problem(v) for v in values):
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        return f"a non-empty list, each {self.rule.describe()}" + (", or null" if self.null else "")


@dataclass(frozen=True)
class MetricAtK:
    """A ranking metric at a cut-off, ``name@K`` with ``name`` in ``names`` and K >= 1 (e.g. ndcg@20)."""

    names: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        name, at, k = str(value).partition("@")
        if isinstance(value, str) and at and name in self.names and k.isdigit() and int(k) >= 1:
            return None
        return f"must be {self.describe()}"

    def describe(self) -> str:
        return " or ".join(f"{n}@K" for n in self.names) + " with K >= 1 (e.g. ndcg@20)"


@dataclass(frozen=True)
class Flag:
    """true or false (a number is not taken for one)."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"must be {self.describe()}"

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class FileMode:
    """Permission bits of a file written, as octal text (``mode=0600``); ``null`` allows None.

    Only text is taken: YAML reads an unquoted ``0644`` as the number 420, which no rule could tell
    from a decimal 420, so a number is refused with the quoting to use."""

    null: bool = True

    def problem(self, value: Any) -> str | None:
        if (value is None and self.null) or (value is not None and self.bits(value) is not None):
            return None
        return f"must be {self.describe()}"

    @staticmethod
    def bits(value: Any) -> int | None:
        """The permission bits (e.g. 0o600) ``value`` spells, or None."""
        if not isinstance(value, str):
            return None
        digits = value.strip().lower().removeprefix("0o")
        if not 3 <= len(digits) <= 4 or any(c not in "01234567" for c in digits) or int(digits, 8) > 0o777:
            return None
        return int(digits, 8)

    def describe(self) -> str:
        return ("file permissions in octal, e.g. 0600 or 0644 (in a YAML file quoted: '0600')"
                + (" or null" if self.null else ""))


@dataclass(frozen=True)
class Text:
    """A non-empty text (an integer is taken as its digits: Hydra reads ``conversion_event=3`` as one)."""

    null: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.null else f"must be {self.describe()}"
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        return "a non-empty text" + (" or null" if self.null else "")


@dataclass(frozen=True)
class Separator:
    """A CSV field separator: one character other than a quote or a line break, or ``auto``."""

    def problem(self, value: Any) -> str | None:
        if value == "auto" or (isinstance(value, str) and len(value) == 1 and value not in "\r\n\""):
            return None
        return f"must be {self.describe()}"

    def describe(self) -> str:
        return "one character other than a quote or a line break, or auto"


@dataclass(frozen=True)
class PerSegment:
    """A value following ``rule``, or a ``{segment: value}`` mapping with whole segment numbers in
    0..``MAX_SEGMENT`` and values following ``rule`` (``mapping_only``: the mapping form only)."""

    rule: Int | Num
    null: bool = False
    mapping_only: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.null else f"must be {self.describe()}"
        if isinstance(value, Mapping):
            for key, v in value.items():
                if segment_number(key) is None:
                    return f"has segment {key!r}; a segment is a whole number in 0..{MAX_SEGMENT}"
                if self.rule.problem(v):
                    return f"gives segment {key} {v!r}; each value must be {self.rule.describe()}"
            return None
        if self.mapping_only or self.rule.problem(value):
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        text = "" if self.mapping_only else f"{self.rule.describe()}, or "
        return text + f"a {{segment: value}} mapping, each value {self.rule.describe()}" + (", or null" if self.null else "")


@dataclass(frozen=True)
class Renames:
    """A ``{canonical column: the file's column}`` mapping with canonical names in ``names``."""

    names: tuple[str, ...]
    null: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.null else f"must be {self.describe()}"
        if not isinstance(value, Mapping):
            return f"must be {self.describe()}"
        for key, column in value.items():
            if key not in self.names:
                return f"renames {key!r}; the names to map are {', '.join(self.names)} (e.g. {{{self.names[0]}: customer_id}})"
            if Text().problem(column):
                return f"maps {key} to {column!r}; a column name is a non-empty text"
        return None

    def describe(self) -> str:
        return (f"a {{canonical name: the file's column}} mapping (canonical names: {', '.join(self.names)}), "
                f"e.g. {{{self.names[0]}: customer_id}}" + (", or null" if self.null else ""))


def segment_number(key: Any) -> int | None:
    """A segment key of a per-segment mapping as an int in 0..MAX_SEGMENT (digits accepted), else None."""
    if isinstance(key, bool):
        return None
    if isinstance(key, str) and key.strip().isdigit():
        key = int(key.strip())
    if isinstance(key, int) and 0 <= key <= MAX_SEGMENT:
        return key
    return None


@dataclass(frozen=True)
class OrAuto:
    """``auto`` (a size or budget worked out from the data), or a value following ``rule``."""

    rule: Int | Num

    def problem(self, value: Any) -> str | None:
        return None if value == "auto" or not self.rule.problem(value) else f"must be {self.describe()}"

    def describe(self) -> str:
        return f"auto or {self.rule.describe()}"


class Rule(Protocol):
    """What a rule does: say what is wrong with a value (None: nothing), and what it accepts."""

    def problem(self, value: Any) -> str | None: ...

    def describe(self) -> str: ...

POSITIVE = Num(0, None, lo_open=True)
NON_NEGATIVE = Num(0, None)
FRACTION = Num(0, 1, hi_open=True)  # a dropout rate, a held-out share
COUNT = Int(1, None)
THREADS = Int(1, 4096, null=True)
SEED = Int(0, MAX_SEED)

CONFIDENCE = Num(0.5, 0.999)  # below 0.5 an "interval" misses more often than it holds; above 0.999 no campaign is big enough
AMOUNT = Num(0, MAX_AMOUNT)


def select(cfg: DictConfig, key: str) -> Any:
    """``cfg``'s value at dotted ``key`` as a plain value (``ABSENT`` when the key is not there)."""
    try:
        value = OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=False)
    except Exception as exc:  # an interpolation that does not resolve, e.g. ${oc.env:UNSET}
        raise ConfigError(f"{key}: cannot be resolved ({str(exc).splitlines()[0]})") from None
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def check_rules(cfg: DictConfig, rules: Mapping[str, Rule]) -> None:
    """Raise :class:`ConfigError` for the first key of ``rules`` whose value breaks its rule."""
    for key, rule in rules.items():
        value = select(cfg, key)
        if value is ABSENT:  # not in this config (or ???, which Hydra reports itself)
            continue
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{key} {problem}, got {value!r}")


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf value) of every resolvable leaf under ``node``."""
    if isinstance(node, DictConfig):
        children = [(f"{prefix}{k}", k) for k in node.keys() if not OmegaConf.is_missing(node, k)]
    elif isinstance(node, ListConfig):
        children = [(f"{prefix}[{i}]", i) for i in range(len(node))]
    else:
        yield prefix, node
        return
    for name, key in children:
        try:
            child = node[key]
        except Exception:  # an interpolation that cannot resolve: select() reports it where it matters
            continue
        yield from _walk(child, name + "." if isinstance(child, DictConfig) else name)


def check_finite(cfg: DictConfig, skip: tuple[str, ...] = ("hydra",)) -> None:
    """Refuse a NaN or infinite number anywhere in ``cfg`` (``lr=nan`` would train NaN vectors)."""
    for key, value in _walk(cfg, ""):
        if key.split(".")[0].split("[")[0] in skip:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
