"""Audience rules: a small boolean language over per-user columns, parsed without ``eval``.

A rule such as ``interest.Horror > 0.2 and recency_days <= 90 and not attr.region in ["east"]``
is read by a hand-written tokenizer and recursive-descent parser into a tree of comparisons joined
by ``and`` / ``or`` / ``not`` (and parentheses), then evaluated over whole columns at once
(numpy), so the cost is a few vector operations per comparison, whatever the number of users.

Grammar (keywords in any case)::

    rule       := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | "(" rule ")" | comparison
    comparison := value op value | value ["not"] "in" "[" literal ("," literal)* "]"
    op         := "<" | "<=" | ">" | ">=" | "==" | "=" | "!="
    value      := column | literal
    literal    := number | "-" number | 'text' | "text"
    column     := name ("." name)*     a name: letters, digits, _ ; or `any text` in backticks

Nothing in a rule is ever executed as code: a name is only looked up among the columns the
caller offers (:class:`ColumnSource`), and anything else is a :class:`RuleError` that says where.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dmp_dl.core.errors import ConfigError

MAX_RULE_CHARS = 4000
MAX_DEPTH = 50  # nested parentheses / not: a rule is a handful deep; this keeps recursion bounded
MAX_LIST = 10_000
COMPARISONS = ("<=", ">=", "==", "!=", "<", ">", "=")
KEYWORDS = ("and", "or", "not", "in")


class RuleError(ConfigError):
    """A rule that cannot be read or evaluated; the message names the position or the column."""


# -- tokens --------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<quoted>`[^`]*`)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|==|!=|<|>|=)
  | (?P<punct>[()\[\],.\-])
""", re.VERBOSE)


@dataclass(frozen=True)
class Token:
    kind: str  # number | string | name | op | punct | keyword | end
    text: str
    value: object
    at: int  # 1-based character position in the rule


def tokenize(text: str) -> list[Token]:
    """The tokens of ``text`` (a final ``end`` token); :class:`RuleError` at the first character
    that starts none."""
    tokens, i = [], 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None:
            raise RuleError(f"rule: unexpected character {text[i]!r} at position {i + 1}")
        kind, piece = m.lastgroup, m.group()
        if kind == "number":
            tokens.append(Token("number", piece, float(piece), i + 1))
        elif kind == "string":
            tokens.append(Token("string", piece, re.sub(r"\\(.)", r"\1", piece[1:-1]), i + 1))
        elif kind == "quoted":
            tokens.append(Token("name", piece, piece[1:-1], i + 1))
        elif kind == "name":
            low = piece.lower()
            tokens.append(Token("keyword", piece, low, i + 1) if low in KEYWORDS else Token("name", piece, piece, i + 1))
        elif kind in ("op", "punct"):
            tokens.append(Token(kind, piece, "==" if piece == "=" else piece, i + 1))
        i = m.end()
    tokens.append(Token("end", "end of the rule", None, len(text) + 1))
    return tokens


# -- the tree ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    at: int


@dataclass(frozen=True)
class Literal:
    value: float | str
    at: int


@dataclass(frozen=True)
class Compare:
    left: Column | Literal
    op: str  # one of <, <=, >, >=, ==, !=, in, not in
    right: Column | Literal | tuple
    at: int


@dataclass(frozen=True)
class Not:
    term: object


@dataclass(frozen=True)
class BoolOp:
    op: str  # and | or
    terms: tuple


class _Parser:
    def __init__(self, text: str):
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def fail(self, expected: str) -> RuleError:
        tok = self.tok
        found = tok.text if tok.kind == "end" else repr(tok.text)
        return RuleError(f"rule: expected {expected} at position {tok.at}, found {found}")

    def is_keyword(self, word: str) -> bool:
        return self.tok.kind == "keyword" and self.tok.value == word

    def parse(self):
        tree = self.boolean("or")
        if self.tok.kind != "end":
            raise self.fail("and, or or the end of the rule")
        return tree

    def boolean(self, op: str):
        inner = (lambda: self.boolean("and")) if op == "or" else self.negation
        terms = [inner()]
        while self.is_keyword(op):
            self.take()
            terms.append(inner())
        return terms[0] if len(terms) == 1 else BoolOp(op, tuple(terms))

    def negation(self):
        opens = self.is_keyword("not") or (self.tok.kind == "punct" and self.tok.value == "(")
        if not opens:
            return self.comparison()
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise RuleError(f"rule: 'not' and parentheses nested more than {MAX_DEPTH} deep at position {self.tok.at}")
        if self.take().value == "not":
            term = Not(self.negation())
        else:
            term = self.boolean("or")
            if not (self.tok.kind == "punct" and self.tok.value == ")"):
                raise self.fail("')'")
            self.take()
        self.depth -= 1
        return term

    def comparison(self) -> Compare:
        at = self.tok.at
        left = self.value()
        if self.is_keyword("not") or self.is_keyword("in"):
            negated = self.take().value == "not"
            if negated:
                if not self.is_keyword("in"):
                    raise self.fail("'in' after 'not'")
                self.take()
            return Compare(left, "not in" if negated else "in", self.literal_list(), at)
        if isinstance(left, Column) and self.tok.kind == "punct" and self.tok.value == "(":
            raise RuleError(f"rule: position {self.tok.at}: {left.name}(...) is a call; a rule only compares columns "
                            "with values (nothing in it is run)")
        if self.tok.kind != "op":
            raise self.fail("a comparison (<, <=, >, >=, ==, !=) or 'in'")
        op = self.take().value
        right = self.value()
        if isinstance(left, Literal) and isinstance(right, Literal):
            raise RuleError(f"rule: the comparison at position {at} compares two constants; name a column")
        return Compare(left, op, right, at)

    def value(self) -> Column | Literal:
        tok = self.tok
        if tok.kind == "name":
            parts = [self.take().value]
            while self.tok.kind == "punct" and self.tok.value == ".":
                self.take()
                if self.tok.kind not in ("name", "keyword"):
                    raise self.fail("a name after '.' (`quote` one with other characters in backticks)")
                part = self.take()
                parts.append(part.value if part.kind == "name" else part.text)
            return Column(".".join(parts), tok.at)
        return self.literal()

    def literal(self) -> Literal:
        tok = self.tok
        if tok.kind == "punct" and tok.value == "-":
            self.take()
            if self.tok.kind != "number":
                raise self.fail("a number after '-'")
            return Literal(-self.take().value, tok.at)
        if tok.kind in ("number", "string"):
            return Literal(self.take().value, tok.at)
        raise self.fail("a column name, a number or a quoted text")

    def literal_list(self) -> tuple:
        if not (self.tok.kind == "punct" and self.tok.value == "["):
            raise self.fail("'[' to open the list after 'in'")
        self.take()
        values = [self.literal().value]
        while self.tok.kind == "punct" and self.tok.value == ",":
            self.take()
            values.append(self.literal().value)
            if len(values) > MAX_LIST:
                raise RuleError(f"rule: a list of more than {MAX_LIST} values at position {self.tok.at}")
        if not (self.tok.kind == "punct" and self.tok.value == "]"):
            raise self.fail("',' or ']'")
        self.take()
        return tuple(values)


@dataclass(frozen=True)
class Rule:
    """A parsed rule: ``text`` as given, ``tree`` its comparisons, ``columns`` the names it reads
    (in order of first use) and ``positions`` where each is first named."""

    text: str
    tree: object
    columns: tuple[str, ...]
    positions: tuple[int, ...] = ()


def _columns(node, out: dict[str, int]) -> None:
    if isinstance(node, BoolOp):
        for t in node.terms:
            _columns(t, out)
    elif isinstance(node, Not):
        _columns(node.term, out)
    elif isinstance(node, Compare):
        for side in (node.left, node.right):
            if isinstance(side, Column):
                out.setdefault(side.name, side.at)


def parse_rule(text: object) -> Rule:
    """Parse ``text`` (see the module docstring); :class:`RuleError` names the position of the
    first problem."""
    if not isinstance(text, str) or not text.strip():
        raise RuleError(f"rule must be a non-empty text such as \"interest.Horror > 0.2 and recency_days <= 90\", got {text!r}")
    if len(text) > MAX_RULE_CHARS:
        raise RuleError(f"rule is {len(text)} characters long; at most {MAX_RULE_CHARS}")
    tree = _Parser(text).parse()
    first_use: dict[str, int] = {}
    _columns(tree, first_use)
    return Rule(text, tree, tuple(first_use), tuple(first_use.values()))


# -- evaluation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Values:
    """One column over every user: ``numbers`` (n,) float64 (NaN: unknown, never matches), or for a
    categorical column ``tokens`` (n, T) int64 value codes (-1 padding; a user may hold several) and
    ``codes`` (text value -> code)."""

    numbers: np.ndarray | None = None
    tokens: np.ndarray | None = None
    codes: dict | None = None


class ColumnSource(Protocol):
    n_users: int

    def values(self, name: str) -> Values:
        """The column ``name``; :class:`RuleError` naming it (and the columns there are) when unknown."""


def _numbers(side, source: ColumnSource, node: Compare) -> np.ndarray | float:
    if isinstance(side, Literal):
        if isinstance(side.value, str):
            raise RuleError(f"rule: position {side.at}: {side.value!r} is a text, but the other side of the comparison "
                            "is a numeric column; give a number")
        return float(side.value)
    values = source.values(side.name)
    if values.numbers is None:
        raise RuleError(f"rule: position {side.at}: {side.name} is categorical; compare it with ==, != or in to "
                        "quoted values, e.g. {0} == \"value\"".format(side.name))
    return values.numbers


_NUMERIC_OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
                "==": np.equal, "!=": np.not_equal}
_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


def _categorical(values: Values, wanted: tuple, node: Compare, name: str) -> np.ndarray:
    """Users holding any of the text values ``wanted`` (numbers are taken as their text, as a CSV
    column of codes reads)."""
    texts = [v if isinstance(v, str) else (str(int(v)) if float(v).is_integer() else str(v)) for v in wanted]
    codes = [values.codes[t] for t in texts if t in values.codes]
    if not codes:
        return np.zeros(len(values.tokens), dtype=bool)
    return np.isin(values.tokens, np.asarray(codes, dtype=values.tokens.dtype)).any(axis=1)


def _compare(node: Compare, source: ColumnSource) -> np.ndarray:
    left, right, op = node.left, node.right, node.op
    if isinstance(left, Literal) and isinstance(right, Column):  # 3 < x  ->  x > 3
        left, right, op = right, left, _FLIPPED[op]
    if isinstance(left, Column):
        values = source.values(left.name)
        if values.tokens is not None:  # categorical: membership only
            if isinstance(right, Column):
                raise RuleError(f"rule: position {node.at}: {left.name} is categorical; compare it with quoted values, "
                                "not with another column")
            if op not in ("==", "!=", "in", "not in"):
                raise RuleError(f"rule: position {node.at}: {left.name} is categorical; use ==, != or in, not {op}")
            wanted = right if op in ("in", "not in") else (right.value,)
            hit = _categorical(values, wanted, node, left.name)
            return ~hit if op in ("!=", "not in") else hit
    lhs = _numbers(left, source, node)
    if op in ("in", "not in"):
        texts = [v for v in right if isinstance(v, str)]
        if texts:
            raise RuleError(f"rule: position {node.at}: {left.name} is numeric; the list holds text {texts[0]!r}")
        hit = np.isin(lhs, np.asarray(right, dtype=np.float64))
        return ~hit & ~np.isnan(lhs) if op == "not in" else hit
    rhs = _numbers(right, source, node)
    with np.errstate(invalid="ignore"):
        out = _NUMERIC_OPS[op](lhs, rhs)
    if op == "!=":  # an unknown value (NaN) matches no comparison, != included
        out &= ~np.isnan(lhs) & ~np.isnan(rhs)
    return np.broadcast_to(out, (source.n_users,)).copy()


def evaluate(rule: Rule, source: ColumnSource) -> np.ndarray:
    """(n_users,) bool: the users ``rule`` selects, over ``source``'s columns."""
    for name, at in zip(rule.columns, rule.positions):  # an unknown column is reported before any work
        try:
            source.values(name)
        except RuleError as exc:
            text = str(exc)
            raise type(exc)(text.replace("rule: ", f"rule: position {at}: ", 1) if text.startswith("rule: ") else text) from None

    def walk(node) -> np.ndarray:
        if isinstance(node, BoolOp):
            out = walk(node.terms[0])
            for term in node.terms[1:]:
                out = (out & walk(term)) if node.op == "and" else (out | walk(term))
            return out
        if isinstance(node, Not):
            return ~walk(node.term)
        return _compare(node, source)

    return walk(rule.tree)
