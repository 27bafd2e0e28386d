"""Spec strings: parsing, formatting, nested specs, and the errors a user sees."""

from __future__ import annotations

import re
from typing import Literal

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from headq_core import KeyQuantizer, MethodConfig, Spec, SpecError, get_registry, parse_spec
from headq_core.builtin import ExactKeys, ExactValues
from headq_core.layouts import EncodedBlock
from headq_core.registry import Registry

KIVI = "kivi" in get_registry().names("key")
needs_kivi = pytest.mark.skipif(not KIVI, reason="headq-kivi not installed")


# --- parsing and formatting ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("fp16", Spec("fp16")),
        ("kivi:bits=2,group=32", Spec("kivi", (("bits", "2"), ("group", "32")))),
        ("  kivi : bits = 2 ,\tgroup=32 ", Spec("kivi", (("bits", "2"), ("group", "32")))),
        ("a2:bits=2,hi=4,frac=0.1", Spec("a2", (("bits", "2"), ("hi", "4"), ("frac", "0.1")))),
        ("m:x=-1.5e-3,y=True", Spec("m", (("x", "-1.5e-3"), ("y", "True")))),
        (
            "outer:base=(kivi:bits=2,group=32),rank=8",
            Spec("outer", (("base", Spec("kivi", (("bits", "2"), ("group", "32")))), ("rank", "8"))),
        ),
        # without parentheses a nested spec takes every parameter that follows
        (
            "outer:base=kivi:bits=2,rank=8",
            Spec("outer", (("base", Spec("kivi", (("bits", "2"), ("rank", "8")))),)),
        ),
        ("outer:base=(kivi),rank=8", Spec("outer", (("base", Spec("kivi")), ("rank", "8")))),
        (
            "o:a=(b:c=(d:e=1)),f=2",
            Spec("o", (("a", Spec("b", (("c", Spec("d", (("e", "1"),))),))), ("f", "2"))),
        ),
    ],
)
def test_parse(text: str, spec: Spec) -> None:
    assert parse_spec(text) == spec
    assert parse_spec(str(spec)) == spec
    assert parse_spec(spec) is spec


def test_format_is_canonical() -> None:
    assert str(parse_spec(" kivi : bits = 2 , group = 32 ")) == "kivi:bits=2,group=32"
    assert str(parse_spec("outer:base=kivi:bits=2")) == "outer:base=(kivi:bits=2)"
    assert str(Spec("outer", (("base", Spec("fp16")),))) == "outer:base=(fp16)"
    assert parse_spec("kivi:bits=2").get("bits") == "2" and parse_spec("kivi").get("bits") is None


def test_a_nested_spec_without_parameters_round_trips() -> None:
    # "outer:base=fp16" would read back as the string "fp16"; the formatter must keep it a Spec
    spec = Spec("outer", (("base", Spec("fp16")), ("rank", "8")))
    assert parse_spec(str(spec)) == spec


_NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,5}", fullmatch=True)
_ATOM = st.text(alphabet="abcXYZ019_.-+*/%@#!?~", min_size=1, max_size=6)


def _specs(children: st.SearchStrategy[Spec]) -> st.SearchStrategy[Spec]:
    params = st.lists(st.tuples(_NAME, st.one_of(_ATOM, children)), max_size=4, unique_by=lambda p: p[0])
    return st.builds(lambda name, ps: Spec(name, tuple(ps)), _NAME, params)


_SPEC = st.recursive(st.builds(Spec, _NAME), _specs, max_leaves=8)


@given(_SPEC)
def test_every_spec_round_trips(spec: Spec) -> None:
    assert parse_spec(str(spec)) == spec


@given(_SPEC, st.sampled_from([" ", "  ", "\t"]))
def test_whitespace_between_tokens_is_ignored(spec: Spec, space: str) -> None:
    text = str(spec)
    for token in ":,=()":
        text = text.replace(token, f"{space}{token}{space}")
    assert parse_spec(f"{space}{text}{space}") == spec


@pytest.mark.parametrize(
    ("text", "message", "column"),
    [
        ("", "expected a method name", 0),
        ("kivi:bits", "expected '=' after parameter 'bits'", 9),
        ("kivi:bits=2,,group=3", "expected a parameter name", 12),
        ("kivi:bits=2,bits=4", "parameter 'bits' is given twice", 16),
        ("outer:base=(kivi:bits=2", "expected ')' to close the nested spec", 23),
        ("kivi:bits=2 extra", "unexpected text after the spec", 12),
        ("kivi:bits=", "expected a value", 10),
        ("3kivi", "expected a method name", 0),
    ],
)
def test_syntax_errors_point_at_the_problem(text: str, message: str, column: int) -> None:
    with pytest.raises(SpecError, match=re.escape(message)) as info:
        parse_spec(text)
    _, shown, pointer = str(info.value).split("\n")
    assert shown.strip() == text.strip()
    assert pointer.index("^") - 2 == column


def test_a_spec_must_be_a_string() -> None:
    with pytest.raises(SpecError, match="must be a string, got int"):
        parse_spec(3)  # type: ignore[arg-type]


# --- resolving against the registry ---------------------------------------------------------


@needs_kivi
@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("kivi", "kivi"),
        ("kivi:bits=2,group=32", "kivi"),  # defaults are dropped
        ("kivi:group=64,bits=4", "kivi:bits=4,group=64"),  # config field order
        ("kivi: bits = 04", "kivi:bits=4"),  # values normalized
        ("fp16:dtype=float32", "fp16:dtype=float32"),
    ],
)
def test_resolve_gives_the_canonical_spec(text: str, canonical: str) -> None:
    registry = get_registry()
    assert str(registry.resolve("key", text)) == canonical
    assert registry.resolve("key", canonical) == parse_spec(canonical)
    method = registry.key_quantizer(text)
    assert registry.key_quantizer(str(method.spec)).config == method.config


@needs_kivi
@pytest.mark.parametrize(
    ("kind", "text", "pattern"),
    [
        ("key", "kiwi", r"unknown key quantizer 'kiwi'\. Did you mean 'kivi'\? Known: .*fp16.*kivi"),
        ("value", "kivl:bits=2", r"unknown value policy 'kivl'\. Did you mean 'kivi'\?"),
        ("key", "zzz", r"unknown key quantizer 'zzz'\. Known: "),
        (
            "key",
            "kivi:bitz=2",
            r"method 'kivi' has no parameter 'bitz'\. Did you mean 'bits'\? Its parameters: bits, group\.",
        ),
        ("key", "kivi:rank=2", r"no parameter 'rank'\. Its parameters: bits, group\."),
        ("key", "kivi:bits=two", r"parameter 'bits' of 'kivi' must be int, got 'two'"),
        ("key", "kivi:bits=2.5", r"must be int, got '2.5'"),
        ("key", "kivi:bits=(fp16)", r"parameter 'bits' of 'kivi' takes a plain value, not a nested spec"),
        (
            "key",
            "kivi:bits=3",
            r"^invalid parameters for 'kivi': 'bits' must be in \(1, 2, 4, 8\) \(got 3\)$",
        ),
        ("value", "kivi:group=0", r"invalid parameters for 'kivi': group must be positive, got 0"),
        (
            "key",
            "kivi:bits=4,group=12",
            r"group=12 does not fill whole 32-bit words at 4 bits; use a multiple of 8",
        ),
        ("key", "fp16:dtype=float8", r"'dtype' of 'fp16' must be one of model, float16, bfloat16, float32"),
        ("key", "fp16:dtype=bfloat61", r"Did you mean 'bfloat16'\?"),
    ],
)
def test_clear_errors(kind: str, text: str, pattern: str) -> None:
    registry = get_registry()
    build = registry.key_quantizer if kind == "key" else registry.value_policy
    with pytest.raises(SpecError, match=pattern):
        build(text)


# --- nested specs and typed parameters, on a registry of our own ---------------------------


@attrs.frozen
class _OuterConfig(MethodConfig):
    base: Spec = attrs.field(default=Spec("fp16"), metadata={"help": "the wrapped key method"})
    rank: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    scale: float = 1.0
    flag: bool = False
    mode: Literal["a", "b"] = "a"


class _OuterKeys(KeyQuantizer):
    name = "outer"
    config_class = _OuterConfig

    def encode(self, keys: object, layer_idx: int) -> EncodedBlock:
        raise NotImplementedError


@pytest.fixture
def registry() -> Registry:
    registry = Registry()
    for cls in (ExactKeys, _OuterKeys):
        registry.add_key_quantizer(cls)
    registry.add_value_policy(ExactValues)
    if KIVI:
        kivi = get_registry().entry("key", "kivi").obj
        registry.add_key_quantizer(kivi)
    return registry


@needs_kivi
@pytest.mark.parametrize(
    "text",
    [
        "outer:base=(kivi:bits=4),rank=8",
        "outer:base=kivi:bits=4,rank=8",
        "outer:rank=8,base=kivi:bits=4",
        "outer:rank=8,base=(kivi:bits=4,group=32)",
        " outer : base = kivi : rank = 8 , bits = 4 ",
    ],
)
def test_nested_specs_in_both_forms_mean_the_same(registry: Registry, text: str) -> None:
    method = registry.key_quantizer(text)
    assert method.config == _OuterConfig(base=Spec("kivi", (("bits", "4"),)), rank=8)
    assert str(method.spec) == "outer:base=(kivi:bits=4),rank=8"
    assert registry.resolve("key", text) == method.spec
    assert parse_spec(str(method.spec)) == method.spec


@needs_kivi
def test_a_nested_default_spec_round_trips(registry: Registry) -> None:
    for text, base in (
        ("outer", Spec("fp16")),
        ("outer:base=kivi", Spec("kivi")),
        ("outer:base=(kivi)", Spec("kivi")),
    ):
        method = registry.key_quantizer(text)
        assert method.config.base == base
        assert parse_spec(str(method.spec)) == method.spec
        assert registry.key_quantizer(str(method.spec)).config == method.config


@needs_kivi
def test_nested_spec_errors(registry: Registry) -> None:
    with pytest.raises(SpecError, match="parameter 'rank' is given twice"):
        registry.key_quantizer("outer:rank=8,base=kivi:rank=9")
    with pytest.raises(SpecError, match=r"unknown key quantizer 'kiwi'\. Did you mean 'kivi'"):
        registry.key_quantizer("outer:base=(kiwi:bits=2)")
    with pytest.raises(SpecError, match="'bits' must be in"):
        registry.key_quantizer("outer:base=(kivi:bits=3)")
    with pytest.raises(SpecError, match=r"method 'outer' has no parameter 'ranks'\. Did you mean 'rank'"):
        registry.key_quantizer("outer:base=kivi:ranks=2")


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"scale": "0.25"}, _OuterConfig(scale=0.25)),
        ({"scale": "1e-3"}, _OuterConfig(scale=1e-3)),
        ({"flag": "true"}, _OuterConfig(flag=True)),
        ({"flag": "Yes"}, _OuterConfig(flag=True)),
        ({"flag": "off"}, _OuterConfig(flag=False)),
        ({"flag": "1", "mode": "b"}, _OuterConfig(flag=True, mode="b")),
        ({"rank": 3, "flag": True}, _OuterConfig(rank=3, flag=True)),  # typed values from code
    ],
)
def test_typed_parameters(params: dict[str, object], expected: _OuterConfig) -> None:
    config = _OuterConfig.from_params(params, method="outer")
    assert config == expected
    text = str(Spec("outer", config.to_params()))
    assert _OuterConfig.from_params(dict(parse_spec(text).params), method="outer") == config


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({"flag": "maybe"}, "'flag' of 'outer' must be bool, got 'maybe'"),
        ({"scale": "big"}, "'scale' of 'outer' must be float, got 'big'"),
        ({"mode": "c"}, "'mode' of 'outer' must be one of a, b; got 'c'"),
        ({"rank": "0"}, "^invalid parameters for 'outer': 'rank' must be >= 1: 0$"),
    ],
)
def test_typed_parameter_errors(params: dict[str, object], pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        _OuterConfig.from_params(params, method="outer")


def test_to_params_lists_what_differs_from_the_defaults() -> None:
    config = _OuterConfig(rank=8, flag=True)
    assert config.to_params() == (("rank", "8"), ("flag", "true"))
    assert dict(config.to_params(all_fields=True)) == {
        "base": Spec("fp16"),
        "rank": "8",
        "scale": "1.0",
        "flag": "true",
        "mode": "a",
    }


@pytest.mark.parametrize("text", ["bits=２", "group=1_6", "bits=2.0"])
def test_spec_numbers_are_ascii_digits(text: str) -> None:
    with pytest.raises(SpecError, match="must be int"):
        get_registry().key_quantizer(f"kivi:{text}")
