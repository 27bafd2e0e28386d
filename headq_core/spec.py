"""Method spec strings: ``name:key=value,key=value``.

Grammar (whitespace around tokens is ignored)::

    spec   := NAME [":" param ("," param)*]
    param  := KEY "=" value
    value  := "(" spec ")" | NAME ":" param ("," param)* | ATOM

A value may itself be a spec, which is how a key method wraps another:
``headq:base=(kivi:bits=2,group=32),rank=8``. The parenthesized form is canonical and is what
``str(spec)`` writes. Without parentheses a nested spec takes every following parameter
(``headq:base=kivi:bits=2,rank=8``); when the spec is resolved against the registry, parameters
the inner method does not know move back out to the outer one, so both forms mean the same.
``parse(str(spec)) == spec`` holds for every spec.
"""

from __future__ import annotations

import re
from typing import Union

import attrs

from headq_core.errors import SpecError

Value = Union[str, "Spec"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_ATOM = re.compile(r"[^,()=:\s]+")


@attrs.frozen
class Spec:
    """A parsed method spec: a method name and its parameters in the order given."""

    name: str
    params: tuple[tuple[str, Value], ...] = ()

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}:" + ",".join(f"{k}={_format_value(v)}" for k, v in self.params)

    def get(self, key: str) -> Value | None:
        return dict(self.params).get(key)


def _format_value(value: Value) -> str:
    # Always parenthesized: a bare "base=kivi" would parse back as the string "kivi", not a Spec.
    return f"({value})" if isinstance(value, Spec) else value


def parse_spec(text: str | Spec) -> Spec:
    """Parse a spec string; raise :class:`SpecError` pointing at the first bad character."""
    if isinstance(text, Spec):
        return text
    if not isinstance(text, str):
        raise SpecError(f"a method spec must be a string, got {type(text).__name__}")
    parser = _Parser(text)
    spec = parser.spec(greedy=True)
    parser.skip_space()
    if parser.pos != len(text):
        parser.fail("unexpected text after the spec")
    return spec


MAX_DEPTH = 32  # nested specs deeper than this are refused (the parser recurses once per level)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    def fail(self, why: str) -> None:
        pointer = " " * self.pos + "^"
        raise SpecError(f"invalid method spec: {why}\n  {self.text}\n  {pointer}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def match(self, pattern: re.Pattern[str], what: str) -> str:
        self.skip_space()
        found = pattern.match(self.text, self.pos)
        if not found:
            self.fail(f"expected {what}")
            raise AssertionError  # unreachable: fail() raises
        self.pos = found.end()
        return found.group(0)

    def spec(self, greedy: bool) -> Spec:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"nested too deeply (more than {MAX_DEPTH} levels)")
        name = self.match(_NAME, "a method name")
        params: list[tuple[str, Value]] = []
        if self.peek() == ":":
            self.pos += 1
            while True:
                key = self.match(_NAME, "a parameter name")
                if any(k == key for k, _ in params):
                    self.fail(f"parameter {key!r} is given twice")
                if self.peek() != "=":
                    self.fail(f"expected '=' after parameter {key!r}")
                self.pos += 1
                params.append((key, self.value()))
                if self.peek() != ",":
                    break
                self.pos += 1
        self.depth -= 1
        return Spec(name, tuple(params))

    def value(self) -> Value:
        if self.peek() == "(":
            self.pos += 1
            inner = self.spec(greedy=True)
            if self.peek() != ")":
                self.fail("expected ')' to close the nested spec")
            self.pos += 1
            return inner
        start = self.pos
        atom = self.match(_ATOM, "a value")
        if self.peek() == ":" and _NAME.fullmatch(atom):
            # An unparenthesized nested spec: it takes the rest of the parameters.
            self.pos = start
            return self.spec(greedy=True)
        return atom
