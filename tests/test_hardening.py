"""Hardening: bad input of every kind gets a clear error and leaves nothing half-done.

Property tests (hypothesis; examples per property in the ``*_EXAMPLES`` constants):

- any string given as a spec parses or raises :class:`SpecError`, through ``parse_spec`` and the
  registry, never another exception;
- KIVI keys and values through the cache, on random shapes, bit widths, groups, windows, pass
  sizes and magnitudes (outlier channels x1e4, constant groups, float32 and float16 subnormals,
  lengths not a multiple of the group), decode within ``scale/2`` plus the float16 rounding of
  scale and minimum, and the tokens still in the window or sinks are bit-exact;
- a NaN or Inf anywhere in a pass is refused, naming layer and position, and the cache is left as
  it was, so no other token's group is touched.

Then single cases: wrong dtype, device or shape; values the storage cannot hold; a method that
fails while encoding; a forward pass that failed part-way; calibration artifacts for another
model, truncated or corrupted; plugins whose classes break the rules.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headq_core import (
    CacheStateError,
    CalibrationError,
    KeyQuantizer,
    MethodConfig,
    QuantizedKVCache,
    SpecError,
    get_registry,
    parse_spec,
)
from headq_core.attention import headq_attention
from headq_core.builtin import ExactKeys
from headq_core.calibration import FORMAT, Calibration, model_shape
from headq_core.compat import cache_kwargs
from headq_core.layouts import AffineBlock, DenseBlock
from headq_core.registry import load_registry
from headq_core.spec import Spec
from headq_core.testing import feed, model_config

pytestmark = pytest.mark.usefixtures("no_grad")

# Examples per property; HEADQ_HARDENING_SCALE=10 multiplies them all for a longer soak.
_SCALE = float(os.environ.get("HEADQ_HARDENING_SCALE", "1"))
SPEC_TEXT_EXAMPLES = int(400 * _SCALE)
SPEC_GRAMMAR_EXAMPLES = int(400 * _SCALE)
ROUND_TRIP_EXAMPLES = int(60 * _SCALE)
NON_FINITE_EXAMPLES = int(40 * _SCALE)

_KIVI = "kivi" in get_registry().names("key")
needs_kivi = pytest.mark.skipif(not _KIVI, reason="headq-kivi not installed")


# --- spec strings ------------------------------------------------------------------------------

SPEC_ALPHABET = "abkivfp16:=,()_.- \t0123456789ê"


def _parse_or_spec_error(text: str) -> Spec | None:
    try:
        spec = parse_spec(text)
    except SpecError:
        return None
    assert parse_spec(str(spec)) == spec, f"{text!r} parsed to {spec!r}, which does not round-trip"
    return spec


def _build_or_spec_error(text: str) -> None:
    registry = get_registry()
    for build in (registry.key_quantizer, registry.value_policy):
        try:
            build(text)
        except SpecError:
            pass


@settings(max_examples=SPEC_TEXT_EXAMPLES, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet=SPEC_ALPHABET, max_size=40)))
def test_any_text_parses_or_is_a_spec_error(text: str) -> None:
    _parse_or_spec_error(text)
    _build_or_spec_error(text)


def _spec_texts() -> st.SearchStrategy[str]:
    """Near-valid spec strings: known and unknown names and parameters, nested specs, typos."""
    registry = get_registry()
    names = sorted({*registry.names("key"), *registry.names("value"), "nope", "kiwi"})
    params = sorted(
        {
            f.name
            for kind in ("key", "value")
            for e in registry.entries(kind)
            for f in e.obj.config_class.parameters()
        }
        | {"colour", "bit"}
    )
    atoms = st.one_of(
        st.integers(-2, 64).map(str),
        st.sampled_from(
            ["", "1e400", "nan", "inf", "-0", "true", "no", "float16", "model", "٢", "0x10", "3.5"]
        ),
        st.text(alphabet="abz019_.-", max_size=6),
    )

    def spec(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        param = st.tuples(st.sampled_from(params), st.one_of(atoms, inner.map(lambda s: f"({s})"), inner))
        return st.tuples(st.sampled_from(names), st.lists(param, max_size=4)).map(
            lambda t: t[0] + (":" + ",".join(f"{k}={v}" for k, v in t[1]) if t[1] else "")
        )

    nested = st.recursive(st.sampled_from(names), spec, max_leaves=6)
    mutate = st.tuples(nested, st.integers(0, 60), st.sampled_from(["", "(", ")", ",", "=", ":", " ", "(("]))
    return st.one_of(nested, mutate.map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]))


@settings(max_examples=SPEC_GRAMMAR_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_spec_texts())
def test_near_valid_specs_build_a_method_or_raise_spec_error(text: str) -> None:
    _parse_or_spec_error(text)
    _build_or_spec_error(text)


@pytest.mark.parametrize("value", [None, 3, 2.5, b"kivi", ["kivi"], {"name": "kivi"}])
def test_a_spec_that_is_not_a_string_is_a_spec_error(value: Any) -> None:
    with pytest.raises(SpecError, match="must be a string"):
        parse_spec(value)
    with pytest.raises(SpecError, match="must be a string"):
        get_registry().key_quantizer(value)


DEEP = "a:b=" + "(a:b=" * 2000 + "1" + ")" * 2000


def test_a_spec_nested_too_deeply_is_a_spec_error_through_the_registry() -> None:
    with pytest.raises(SpecError, match="nested too deeply"):
        get_registry().key_quantizer(DEEP)


def test_a_spec_nested_too_deeply_is_a_spec_error_from_parse_spec() -> None:
    with pytest.raises(SpecError, match="nested too deeply"):
        parse_spec(DEEP)
    unparenthesized = "a:b=" * 40 + "1"
    with pytest.raises(SpecError, match="nested too deeply"):
        parse_spec(unparenthesized)
    assert str(parse_spec("a:b=" * 8 + "1")).count("(") == 7  # ordinary nesting still parses


# --- round trip through the cache --------------------------------------------------------------


def _data(gen: torch.Generator, shape: tuple[int, ...], regime: str, scale: float) -> torch.Tensor:
    """(b, h, t, d) float32 data of one magnitude regime, within what float16 scales can hold."""
    *_, t, d = shape
    x = (2 * torch.rand(shape, generator=gen) - 1) * scale
    if regime == "outliers":  # a few channels 1e4 times larger (|x| <= 3e4: ranges stay below 65504)
        channels = torch.randperm(d, generator=gen)[: max(1, d // 16)]
        x[..., channels] *= 1e4
    elif regime == "constant":  # whole channels and whole tokens constant: zero-range groups
        x[..., torch.randperm(d, generator=gen)[: d // 2]] = 0.75 * scale
        x[..., torch.randperm(t, generator=gen)[: t // 2], :] = -0.5 * scale
    elif regime == "subnormal32":
        x = x * 1e-40  # float32 subnormals (scales round to 0 in float16)
    elif regime == "subnormal16":
        x = x * 3e-6  # float16 subnormal range
    return x


def _group_bound(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-element error bound for groups along the last axis: x (..., n), scale/zero (..., n/g)."""
    g = x.shape[-1] // scale.shape[-1]
    grouped = x.double().reshape(*x.shape[:-1], -1, g)
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    levels = (1 << bits) - 1
    s16, z16 = scale.double(), zero.double()
    exact_scale = (hi - lo) / levels  # in float64: float32 subnormal arithmetic would round it
    # the float32 arithmetic of quantize and dequantize: relative rounding, and the subnormal grid
    slack = 4 * torch.finfo(torch.float32).eps * (z16.abs() + levels * s16) + 2**-149
    bound = s16 / 2 + levels * (s16 - exact_scale).abs() + (z16 - lo).abs() + slack
    return bound.repeat_interleave(g, dim=-1)


def _check_encoded(stream: Any, x: torch.Tensor, first: int) -> None:
    """Every encoded token of ``stream`` decodes within the affine bound of its group."""
    pos = first
    for block in stream.blocks:
        assert isinstance(block, AffineBlock)
        part = x[..., pos : pos + block.tokens, :].float()
        got = block.dequantize(torch.float32)
        if block.axis == "tokens":  # keys: groups along tokens, per channel
            bound = _group_bound(part.transpose(-1, -2), block.scale, block.zero, block.bits).transpose(
                -1, -2
            )
        else:
            bound = _group_bound(part, block.scale, block.zero, block.bits)
        error = (got.double() - part.double()).abs()
        worst = (error - bound).max().item()
        assert worst <= 0, f"error exceeds the bound by {worst:.3g} ({block.layout}, tokens {pos}..)"
        pos += block.tokens


@needs_kivi
@settings(max_examples=ROUND_TRIP_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_kivi_through_the_cache_keeps_the_round_trip_bound(data: st.DataObject) -> None:
    bits = data.draw(st.sampled_from([1, 2, 4, 8]), label="bits")
    group = data.draw(
        st.sampled_from([g for g in (4, 8, 16, 32, 64) if g % (32 // bits) == 0]), label="group"
    )
    head_dim = data.draw(st.sampled_from([d for d in (8, 16, 24, 32, 48, 64, 96) if d % min(group, d) == 0]))
    batch, heads = data.draw(st.integers(1, 2), label="batch"), data.draw(st.integers(1, 3), label="heads")
    tokens = data.draw(st.integers(1, 2 * group + 7), label="tokens")  # rarely a multiple of the group
    window, sinks = data.draw(st.sampled_from([0, 1, 5]), label="window"), data.draw(st.sampled_from([0, 2]))
    regime = data.draw(st.sampled_from(["plain", "outliers", "constant", "subnormal32", "subnormal16"]))
    scale = data.draw(st.sampled_from([1e-3, 1.0, 3.0] if regime == "outliers" else [1e-3, 1.0, 1e3]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="dtype")
    chunks = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=12), label="passes")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")

    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, tokens, head_dim)
    keys = _data(gen, shape, regime, scale).to(dtype)
    values = _data(gen, shape, regime, scale).to(dtype)
    queries = torch.randn(shape, generator=gen).to(dtype)
    spec = f"kivi:bits={bits},group={group}"
    cache = QuantizedKVCache(spec, spec, window=window, sinks=sinks)
    passes, left = [], tokens
    for n in [*chunks, tokens]:
        if left:
            passes.append(min(n, left))
            left -= passes[-1]
    feed(cache, keys, values, queries, passes)

    [layer] = cache.quantized_layers()
    assert layer.get_seq_length() == tokens
    for stream, x in ((layer.k, keys), (layer.v, values)):
        s = stream.sink_len()
        window_len = 0 if stream.window is None else stream.window.shape[-2]
        assert s + stream.encoded + window_len == tokens
        if stream.sinks is not None:
            assert torch.equal(stream.sinks, x[..., :s, :])
        if stream.window is not None:  # the remainder (a partial group, the recent window) stays exact
            assert torch.equal(stream.window, x[..., tokens - window_len :, :])
        _check_encoded(stream, x, s)
        assert torch.isfinite(layer.decoded()[0]).all() and torch.isfinite(layer.decoded()[1]).all()


@needs_kivi
@pytest.mark.parametrize("where", ["keys", "values"])
def test_values_beyond_float16_scales_are_refused_not_stored_as_nan(where: str) -> None:
    cache = QuantizedKVCache("kivi:bits=1,group=32", "kivi:bits=1,group=32")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 40, 32, generator=gen)
    big = x.clone()
    big[..., 11, :] = 4e4  # two tokens that make every channel and token group span 8e4 > 65504
    big[..., 13, :] = -4e4
    big[..., 13, ::2] = 4e4
    keys, values = (big, x) if where == "keys" else (x, big)
    _step(cache, x[..., :8, :], x[..., :8, :], x[..., :8, :])
    before = _state(cache)
    with pytest.raises(CacheStateError, match=r"layer 0: .*non-finite 'scale' for positions \d+ to \d+"):
        _step(cache, keys[..., 8:, :], values[..., 8:, :], x[..., 8:, :])
    assert _state(cache) == before


# --- NaN and Inf ---------------------------------------------------------------------------------


def _step(cache: QuantizedKVCache, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> None:
    """One forward pass of layer 0 over new tokens (b, h, n, d), as a model's attention runs it."""
    start, n = cache.get_seq_length(), keys.shape[-2]
    positions = torch.arange(start + n)
    mask = (positions[None, :] <= positions[start:, None]).expand(keys.shape[0], 1, n, start + n)
    k, v = cache.update(keys, values, 0)
    headq_attention(torch.nn.Module().eval(), queries, k, v, mask)


def _state(cache: QuantizedKVCache) -> list[tuple[Any, ...]]:
    """A comparable picture of everything a cache holds, layer by layer."""
    out = []
    for layer in cache.quantized_layers():
        if not layer.is_initialized:
            continue  # a layer object that never held anything
        streams = []
        for stream in (layer.k, layer.v):
            stored = [
                (type(b).__name__, b.tokens, b.dequantize(torch.float32).double().sum().item())
                for b in stream.blocks
            ]
            exact = [
                None if t is None else (tuple(t.shape), t.double().sum().item())
                for t in (stream.sinks, stream.window)
            ]
            streams.append((stream.encoded, stored, exact))
        out.append((layer.length, layer.pending is None, streams))
    return out


@settings(max_examples=NON_FINITE_EXAMPLES, deadline=None)
@given(
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    target=st.sampled_from(["keys", "values"]),
    prefix=st.integers(0, 40),
    n=st.integers(1, 20),
    where=st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 19), st.integers(0, 15)),
    spec=st.sampled_from(["kivi:bits=4,group=8", "fp16"] if _KIVI else ["fp16"]),
)
def test_a_non_finite_token_is_refused_with_layer_and_position(
    bad: float, target: str, prefix: int, n: int, where: tuple[int, int, int, int], spec: str
) -> None:
    gen = torch.Generator().manual_seed(prefix * 31 + n)
    total = prefix + n
    keys, values, queries = (torch.randn(2, 2, total, 16, generator=gen) for _ in range(3))
    cache = QuantizedKVCache(spec, spec, window=3)
    if prefix:
        _step(cache, keys[..., :prefix, :], values[..., :prefix, :], queries[..., :prefix, :])
    before = _state(cache)
    b, h, t, c = where[0], where[1], where[2] % n, where[3]
    poisoned = (keys if target == "keys" else values).clone()
    poisoned[b, h, prefix + t, c] = bad
    k, v = (poisoned, values) if target == "keys" else (keys, poisoned)
    message = f"layer 0: {target} hold {bad} at batch {b}, kv head {h}, position {prefix + t} "
    with pytest.raises(CacheStateError, match=message.replace("(", r"\(").replace(".", r"\.")):
        cache.update(k[..., prefix:, :], v[..., prefix:, :], 0)
    assert _state(cache) == before  # nothing of the pass stored, no other token's group touched
    _step(cache, keys[..., prefix:, :], values[..., prefix:, :], queries[..., prefix:, :])
    assert cache.get_seq_length() == total  # the clean pass goes through afterwards
    decoded_k, decoded_v = cache.quantized_layers()[0].decoded()
    assert torch.isfinite(decoded_k).all() and torch.isfinite(decoded_v).all()


def test_a_nan_inside_a_model_names_its_layer_and_a_failed_pass_cannot_continue(make_model: Any) -> None:
    model = make_model("llama")
    model.set_attn_implementation("headq")
    cache = QuantizedKVCache("fp16", "fp16", config=model.config)
    ids = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    model(ids[:, :8], **cache_kwargs(model, cache))
    hook = model.model.layers[1].self_attn.k_proj.register_forward_hook(
        lambda m, i, out: out.fill_(float("nan"))
    )
    try:
        with pytest.raises(CacheStateError, match="layer 1: keys hold nan at batch 0, kv head 0, position 8"):
            model(ids[:, 8:10], **cache_kwargs(model, cache))
    finally:
        hook.remove()
    assert [layer.length for layer in cache.quantized_layers()] == [10, 8]  # layer 0 finished its pass
    with pytest.raises(CacheStateError, match=r"layer 0: 10 tokens, layer 1: 8 tokens.*start a new one"):
        model(ids[:, 10:11], **cache_kwargs(model, cache))


# --- wrong dtype, device, shape -----------------------------------------------------------------


def _bad_inputs() -> list[Any]:
    k = torch.randn(2, 2, 5, 16)
    cases = [
        ("3-D keys", k[0], k[0], "must be \\(batch, kv_heads, tokens, head_dim\\)"),
        ("a list", [1.0], k, "must be a tensor"),
        ("integer keys", k.long(), k.long(), "must be floating point"),
        ("token counts differ", k, k[..., :4, :], "must share dtype, device, batch, heads and tokens"),
        ("dtypes differ", k, k.half(), "must share dtype"),
        ("another dtype", k.half(), k.half(), "holds torch.float32 tokens on cpu, was given torch.float16"),
        ("another device", k.to("meta"), k.to("meta"), "was given torch.float32 on meta"),
        ("another batch", k[:1], k[:1], "holds keys of batch 2, 2 heads of 16 channels"),
        ("other heads", k[:, :1], k[:, :1], "holds keys of batch 2, 2 heads"),
        ("another head_dim", k[..., :8], k[..., :8], "holds keys of batch 2, 2 heads of 16 channels"),
    ]
    return [pytest.param(k_, v_, msg, id=name) for name, k_, v_, msg in cases]


@pytest.mark.parametrize("spec", ["fp16", pytest.param("kivi:bits=4,group=8", marks=needs_kivi)])
@pytest.mark.parametrize(("keys", "values", "message"), _bad_inputs())
def test_wrong_dtype_device_or_shape_is_refused_and_changes_nothing(
    spec: str, keys: Any, values: Any, message: str
) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 9, 16, generator=gen)
    cache = QuantizedKVCache(spec, spec, window=2, sinks=1)
    feed(cache, x, x, torch.randn(2, 2, 9, 16, generator=gen), [6, 3])
    before = _state(cache)
    with pytest.raises(CacheStateError, match=message):
        cache.update(keys, values, 0)
    assert _state(cache) == before


@pytest.mark.parametrize("layer_idx", [-1, 1.0, "0", True])
def test_a_bad_layer_index_is_refused(layer_idx: Any) -> None:
    x = torch.randn(1, 1, 2, 8)
    with pytest.raises(CacheStateError, match="layer_idx must be a non-negative int"):
        QuantizedKVCache().update(x, x, layer_idx)


@needs_kivi
def test_a_value_method_that_cannot_encode_this_head_dim_leaves_the_layer_as_before() -> None:
    # KIVI values group channels: head_dim 48 is not a whole number of groups of 32. The value flush
    # runs in attention, after update stored the pass: the whole pass is rolled back.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 6, 48, generator=gen)
    cache = QuantizedKVCache("fp16", "kivi:bits=2,group=32", window=4)
    _step(cache, x[..., :3, :], x[..., :3, :], x[..., :3, :])  # all in the window: nothing encoded
    before = _state(cache)
    with pytest.raises(ValueError, match="not a whole number of groups of 32") as info:
        _step(cache, x[..., 3:, :], x[..., 3:, :], x[..., 3:, :])
    assert "nothing was stored" in "".join(getattr(info.value, "__notes__", []))
    assert _state(cache) == before


@needs_kivi
def test_methods_called_directly_reject_token_counts_that_are_not_whole_groups() -> None:
    keys = get_registry().key_quantizer("kivi:bits=2,group=32")
    with pytest.raises(ValueError, match="axis of length 33 is not a whole number of groups of 32"):
        keys.encode(torch.randn(1, 1, 33, 16), 0)


# --- calibration artifacts ------------------------------------------------------------------------


def _artifact(tmp_path: Path, config: Any) -> Path:
    gen = torch.Generator().manual_seed(3)
    tensors = {"key:calib/basis": torch.randn(2, 16, 4, generator=gen), "key:calib/scale": torch.ones(2)}
    metadata = {"format": FORMAT, "model": "tiny", "model_shape": model_shape(config)}
    return Calibration(tensors, metadata).save(tmp_path / "calib.safetensors")


def test_a_calibration_round_trips_and_fits_its_model(tmp_path: Path) -> None:
    config = model_config(head_dim=16)
    loaded = Calibration.load(_artifact(tmp_path, config), config)
    assert set(loaded.tensors) == {"key:calib/basis", "key:calib/scale"}
    assert len(loaded.metadata["tensors_sha256"]) == 64


def test_a_calibration_from_another_model_is_refused(tmp_path: Path) -> None:
    path = _artifact(tmp_path, model_config(head_dim=16))
    other = model_config(head_dim=32, layers=3)
    with pytest.raises(
        CalibrationError, match=r"does not fit this model \(layers: artifact 2 vs model 3, .*head_dim"
    ):
        Calibration.load(path, other)


@attrs.frozen
class _CalibConfig(MethodConfig):
    pass


class _CalibratedKeys(ExactKeys):
    """Exact keys that insist on a calibration fitted to the model they run in."""

    name = "calibrated"
    config_class = _CalibConfig  # type: ignore[assignment]
    calibration_needs = frozenset({"key_moments"})

    def bind(self, model_config: Any, calibration: Any = None) -> None:
        if calibration is None:
            raise CalibrationError("calibrated needs a calibration")
        calibration.check_model(model_config)


def test_a_cache_refuses_a_calibration_for_another_model(tmp_path: Path) -> None:
    calibration = Calibration.load(_artifact(tmp_path, model_config(head_dim=16)))
    with pytest.raises(CalibrationError, match="head_dim: artifact 16 vs model 32"):
        QuantizedKVCache(_CalibratedKeys(), "fp16", config=model_config(head_dim=32), calibration=calibration)
    with pytest.raises(CalibrationError, match="needs a calibration"):
        QuantizedKVCache(_CalibratedKeys(), "fp16", config=model_config(head_dim=16))


@pytest.mark.parametrize("cut", [0, 4, 8, 20, "half", -1])
def test_a_truncated_artifact_is_a_calibration_error(tmp_path: Path, cut: Any) -> None:
    path = _artifact(tmp_path, model_config(head_dim=16))
    data = path.read_bytes()
    end = len(data) // 2 if cut == "half" else cut
    path.write_bytes(data[:end])
    with pytest.raises(CalibrationError, match="not a readable calibration artifact"):
        Calibration.load(path)


def test_a_bit_flip_in_the_tensors_is_a_calibration_error(tmp_path: Path) -> None:
    path = _artifact(tmp_path, model_config(head_dim=16))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CalibrationError, match="do not match their checksum"):
        Calibration.load(path)


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], header: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"headq": header})


@pytest.mark.parametrize(
    ("header", "tensor", "message"),
    [
        ("[1, 2]", None, "not a JSON object"),
        ('"text"', None, "not a JSON object"),
        ("{not json", None, "corrupted calibration metadata"),
        ('{"format": "other/9"}', None, "unknown calibration format 'other/9'"),
        (json.dumps({"format": FORMAT, "model_shape": [1]}), None, "records no model shape"),
        (json.dumps({"format": FORMAT}), torch.tensor([1.0, float("nan")]), "'key:x/t' holds NaN or Inf"),
    ],
)
def test_corrupted_metadata_or_tensors_are_calibration_errors(
    tmp_path: Path, header: str, tensor: torch.Tensor | None, message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    _rewrite(path, {"key:x/t": torch.zeros(2) if tensor is None else tensor}, header)
    with pytest.raises(CalibrationError, match=message):
        Calibration.load(path, model_config(head_dim=16))


def test_a_folder_or_a_plain_safetensors_file_is_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no calibration file"):
        Calibration.load(tmp_path)
    from safetensors.torch import save_file

    save_file({"t": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CalibrationError, match="without headq calibration metadata"):
        Calibration.load(tmp_path / "plain.safetensors")


# --- plugins that break the rules ---------------------------------------------------------------


def _even(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value % 2:
        raise ValueError(f"{attribute.name} must be even, got {value}")


@attrs.frozen
class _OddDefault(MethodConfig):
    bits: int = attrs.field(default=3, validator=_even)


class _RejectsDefaults(ExactKeys):
    name = "rejects"
    config_class = _OddDefault  # type: ignore[assignment]


class _SpacedName(ExactKeys):
    name = "my method"


class _PlainConfig(ExactKeys):
    name = "plainconfig"
    config_class = dict  # type: ignore[assignment]


class _NotAMethod:
    name = "notamethod"


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (_RejectsDefaults, "its config rejects its own defaults: bits must be even, got 3"),
        (_SpacedName, "name must be a name a spec can use"),
        (_PlainConfig, "config_class must subclass MethodConfig"),
        (_NotAMethod, "expected a subclass of KeyQuantizer"),
    ],
)
def test_a_method_class_that_breaks_the_rules_is_refused_and_leaves_no_entry(cls: Any, message: str) -> None:
    registry = load_registry()
    before = {kind: registry.names(kind) for kind in ("key", "value", "metric")}
    with pytest.raises(TypeError, match=message):
        registry.add_key_quantizer(cls)
    assert {kind: registry.names(kind) for kind in ("key", "value", "metric")} == before
    with pytest.raises(SpecError, match=r"unknown key quantizer|invalid method spec"):
        registry.key_quantizer(cls.name)


def test_a_method_that_encodes_the_wrong_token_count_is_caught_by_the_cache() -> None:
    class Short(KeyQuantizer):
        name = "short"
        config_class = _CalibConfig

        def encode(self, keys: torch.Tensor, layer_idx: int) -> DenseBlock:
            return DenseBlock(tokens=keys.shape[-2] - 1, data=keys[..., 1:, :])

    x = torch.randn(1, 1, 4, 8)
    cache = QuantizedKVCache(Short(), "fp16")
    with pytest.raises(CacheStateError, match="encoded 3 tokens, was given 4"):
        cache.store(0, x, x)  # keys are encoded when the attention takes the pass
    assert cache.get_seq_length() == 0 and cache.quantized_layers()[0].k.window is None
