"""HeadQ (plugin headq-scorecorr): spec grammar, exactness, the window rule, storage, calibration
artifacts, and the conformance kit on its configurations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from headq_core import CalibrationError, QuantizedKVCache, get_registry
from headq_core.calibration import Calibration
from headq_core.layouts import LowRankLogit, block_nbytes, concat_blocks
from headq_core.reference import attend_reference
from headq_core.testing import (
    check_key_quantizer,
    feed,
    model_config,
    outlier_data,
    synthetic_calibration,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("headq_scorecorr") is None or importlib.util.find_spec("headq_kivi") is None,
    reason="headq-scorecorr and headq-kivi not installed",
)

D = 64


def bound(spec: str, config: Any = None, calibration: Any = None) -> Any:
    """A key method built from ``spec`` and bound to a synthetic calibration."""
    config = config or model_config()
    method = get_registry().key_quantizer(spec)
    method.bind(config, calibration or synthetic_calibration([("key", method)], config))
    return method


# --- spec grammar --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("headq:base=kivi:bits=2,rank=8,zbits=4", "headq"),
        ("headq:base=(kivi:bits=2),rank=8,zbits=4", "headq"),
        (
            "headq:base=kivi:bits=4,group=16,rank=16,zbits=2",
            "headq:base=(kivi:bits=4,group=16),rank=16,zbits=2",
        ),
        ("headq:rank=4,scale=static,basis=joint", "headq:rank=4,scale=static,basis=joint"),
        ("headq:sign=-1", "headq:sign=-1"),
        ("nullspace:mode=orthogonal,mse=0.5", "nullspace:mode=orthogonal,mse=0.5"),
    ],
)
def test_specs_resolve(text: str, canonical: str) -> None:
    assert str(get_registry().resolve("key", text)) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "headq:zbits=3",
        "headq:sign=0",
        "headq:scale=group",
        "headq:rank=0",
        "headq:lead=2",  # lead needs a static or base-derived step
        "headq:rank=4,lead=4,scale=static",
        "headq:zbits=8,lead=1,scale=static",
        "nullspace:mse=-1",
    ],
)
def test_bad_parameters_are_refused(text: str) -> None:
    from headq_core import SpecError

    with pytest.raises(SpecError):
        get_registry().key_quantizer(text)


# --- the correction --------------------------------------------------------------------------


@pytest.mark.parametrize("basis", ["query", "key", "random", "joint"])
@pytest.mark.parametrize("zbits", [32, 16])
def test_full_rank_exact_side_code_gives_exact_logits(basis: str, zbits: int) -> None:
    method = bound(f"headq:rank={D},zbits={zbits},basis={basis}")
    keys = outlier_data((2, 2, 64, D), seed=3)
    query = outlier_data((2, 2, 8, D), seed=4)
    block = method.encode(keys, 0)
    exact = query @ keys.transpose(-1, -2)
    base = method.base.logits(query, block.base, 0)
    got = method.logits(query, block, 0)
    tolerance = 1e-5 if zbits == 32 else 2e-3  # float16 side numbers round at 2^-11
    assert (got - exact).abs().max() <= tolerance * exact.abs().max()
    assert (base - exact).abs().max() > 0.05 * exact.abs().max()  # the base alone is far off
    assert torch.allclose(block.dequantize(), keys, atol=tolerance * keys.abs().max())


def test_logits_read_the_keys_dequantize_returns() -> None:
    method = bound("headq:rank=8,zbits=4")
    keys = outlier_data((2, 2, 64, D), seed=5)
    query = torch.randn(2, 2, 6, D)
    block = method.encode(keys, 1)
    torch.testing.assert_close(method.logits(query, block, 1), query @ block.dequantize().transpose(-1, -2))


@pytest.mark.parametrize("scale", ["token", "static", "base"])
def test_the_correction_lowers_the_logit_error_of_calibrated_queries(scale: str) -> None:
    config = model_config()
    headq = bound(f"headq:rank=16,zbits=4,scale={scale}", config)
    wrong = bound(f"headq:rank=16,zbits=4,scale={scale},sign=-1", config)
    keys = outlier_data((2, 2, 64, D), seed=6)
    # queries drawn from the synthetic calibration's query distribution (decaying spectrum)
    moment = next(iter(_query_moments(config)))
    query = torch.randn(2, 2, 32, D, dtype=torch.float64) @ torch.linalg.cholesky(moment).transpose(-1, -2)
    query = query.float()
    exact = query @ keys.transpose(-1, -2)
    errors = {}
    for label, method in (("headq", headq), ("wrong", wrong)):
        block = method.encode(keys, 0)
        errors[label] = (method.logits(query, block, 0) - exact).square().mean().item()
        errors["base"] = (method.base.logits(query, block.base, 0) - exact).square().mean().item()
    assert errors["headq"] < 0.5 * errors["base"] < errors["wrong"]


def _query_moments(config: Any) -> list[torch.Tensor]:
    from headq_core.testing import synthetic_stats

    return [m + 1e-9 * torch.eye(D) for m in synthetic_stats(config, {"query_moments"}).query_moments]


def test_the_window_is_never_corrected() -> None:
    """Sinks and window logits equal exact ones; only encoded tokens differ from the base's logits."""
    config = model_config(layers=1)
    headq = get_registry().key_quantizer("headq:rank=16,zbits=8")
    calibration = synthetic_calibration([("key", headq)], config)
    tokens, window, sinks = 100, 20, 3
    k = outlier_data((1, 2, tokens, D), seed=1)
    v = outlier_data((1, 2, tokens, D), seed=2)
    q = outlier_data((1, 4, tokens, D), seed=3)
    logits = {}
    for label, keys in (("headq", headq), ("kivi", "kivi")):
        cache = QuantizedKVCache(
            keys, "fp16", window=window, sinks=sinks, config=config, calibration=calibration
        )
        feed(cache, k[..., :-1, :], v[..., :-1, :], q[..., :-1, :], [60, *[1] * (tokens - 61)])
        cache.update(k[..., -1:, :], v[..., -1:, :], 0)
        layer = cache.quantized_layers()[0]
        grouped = q[..., -1:, :].reshape(1, 2, 2, D)
        _, logits[label] = attend_reference(layer, layer.begin_step(), grouped, None, 1.0, None)
        encoded = layer.k.encoded
    exact = grouped @ k.transpose(-1, -2)
    assert encoded == 64 and sinks + encoded + window <= tokens
    start = sinks + encoded
    for label in ("headq", "kivi"):
        torch.testing.assert_close(logits[label][..., :sinks], exact[..., :sinks])
        torch.testing.assert_close(logits[label][..., start:], exact[..., start:])
    assert not torch.allclose(logits["headq"][..., sinks:start], logits["kivi"][..., sinks:start])
    headq_err = (logits["headq"][..., sinks:start] - exact[..., sinks:start]).abs().mean()
    kivi_err = (logits["kivi"][..., sinks:start] - exact[..., sinks:start]).abs().mean()
    assert headq_err < kivi_err


# --- storage -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "side_bits"),
    [
        ("headq:rank=8,zbits=4", 8 * 4 / D + 16 / D),
        ("headq:rank=8,zbits=4,scale=static", 8 * 4 / D),
        ("headq:rank=16,zbits=2,scale=base,basis=joint", 16 * 2 / D),
        ("headq:rank=4,zbits=8,base=(kivi:group=16)", 4 * 8 / D + 16 / D),
        ("headq:rank=14,zbits=2,lead=2,scale=base,basis=joint", 16 * 2 / D),
    ],
)
def test_side_code_is_packed_and_counted_as_side(spec: str, side_bits: float) -> None:
    method = bound(spec)
    assert method.nominal_bits(D)["side"] == pytest.approx(side_bits)
    keys = outlier_data((2, 2, 2 * method.block_tokens, D), seed=0)
    block = method.encode(keys, 0)
    assert isinstance(block.layout, LowRankLogit) and block.layout == LowRankLogit(
        method.config.rank, method.config.zbits
    )
    assert block.codes.dtype == torch.int32
    parts = block_nbytes(block)
    assert 8 * parts["side"] / keys.numel() == pytest.approx(side_bits)
    assert parts["payload"] == block_nbytes(block.base)["payload"]
    h, r = 2, method.config.rank
    basis_bytes = h * D * r * 2 * (2 if method.config.basis == "joint" else 1)
    steps_bytes = h * r * 2 if method.config.scale != "token" else 0
    assert method.state_nbytes(0) == basis_bytes + steps_bytes


def test_blocks_merge_along_tokens() -> None:
    method = bound("headq:rank=8,zbits=4")
    keys = outlier_data((2, 2, 128, D), seed=7)
    parts = [method.encode(keys[..., :64, :], 0), method.encode(keys[..., 64:, :], 0)]
    merged = concat_blocks(parts)
    assert merged is not None and merged.tokens == 128
    torch.testing.assert_close(merged.dequantize(), torch.cat([p.dequantize() for p in parts], dim=-2))
    query = torch.randn(2, 2, 3, D)
    torch.testing.assert_close(
        method.logits(query, merged, 0), torch.cat([method.logits(query, p, 0) for p in parts], dim=-1)
    )


@pytest.mark.parametrize(
    "spec",
    [
        "headq",
        "headq:rank=16,zbits=2,scale=static",
        "headq:rank=8,zbits=4,scale=base,basis=joint",
        "headq:rank=4,zbits=8,basis=key",
        "headq:rank=8,zbits=1,basis=random,base=(kivi:bits=4,group=16)",
        "headq:rank=8,zbits=4,sign=-1",
        "headq:rank=64,zbits=32",
        "headq:rank=8,zbits=4,base=fp16",
        "headq:rank=15,zbits=2,lead=1,scale=base,basis=joint",
    ],
)
def test_configurations_conform(spec: str) -> None:
    check_key_quantizer(spec)


def test_energy_allocation_keeps_the_mean_rank() -> None:
    config = model_config(layers=4)
    method = bound("headq:rank=8,zbits=2,scale=base,basis=joint,alloc=energy", config)
    ranks = [layer.decode.shape[-1] for layer in method.layers]
    assert sum(ranks) == 4 * 8 and min(ranks) >= 1
    keys = outlier_data((1, 2, 64, D), seed=8)
    side = [block_nbytes(method.encode(keys, i))["side"] for i in range(4)]
    assert 8 * sum(side) / (4 * keys.numel()) == pytest.approx(method.nominal_bits(D)["side"])


# --- calibration ---------------------------------------------------------------------------------


def test_bind_without_calibration_names_the_command() -> None:
    method = get_registry().key_quantizer("headq:rank=4")
    with pytest.raises(CalibrationError, match="headq calibrate --keys 'headq:rank=4'"):
        method.bind(model_config(), None)
    with pytest.raises(CalibrationError, match="headq calibrate"):
        QuantizedKVCache("headq", "fp16", config=model_config())


def test_a_calibration_for_another_model_is_refused(tmp_path: Path) -> None:
    method = get_registry().key_quantizer("headq")
    calibration = synthetic_calibration([("key", method)], model_config(kv_heads=2))
    path = calibration.save(tmp_path / "cal.safetensors")
    for other in (model_config(kv_heads=1), model_config(head_dim=32), model_config(layers=3)):
        with pytest.raises(CalibrationError, match="does not fit this model"):
            method.bind(other, Calibration.load(path))
        with pytest.raises(CalibrationError, match="does not fit this model"):
            Calibration.load(path, other)


def test_a_calibration_for_another_spec_is_refused() -> None:
    calibration = synthetic_calibration(
        [("key", get_registry().key_quantizer("headq:rank=4"))], model_config()
    )
    with pytest.raises(CalibrationError, match=r"holds nothing for key method headq:rank=16.*--keys"):
        get_registry().key_quantizer("headq:rank=16").bind(model_config(), calibration)


def test_artifact_round_trip(tmp_path: Path) -> None:
    registry = get_registry()
    methods = [
        ("key", registry.key_quantizer(s))
        for s in (
            "headq",
            "headq:rank=16,zbits=2,scale=static,basis=joint",
            "nullspace:mode=orthogonal,mse=1",
        )
    ]
    calibration = synthetic_calibration(methods, model_config())
    path = calibration.save(tmp_path / "deep" / "cal.safetensors")
    loaded = Calibration.load(path, model_config())
    recorded = json.loads(json.dumps(calibration.metadata))
    assert {k: loaded.metadata.get(k) for k in recorded} == recorded  # the loader may add checksums
    assert loaded.tensors.keys() == calibration.tensors.keys()
    for name, tensor in calibration.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype and torch.equal(loaded.tensors[name], tensor)
    assert "key:headq/decode.0" in loaded.tensors
    assert loaded.tensors["key:headq/decode.1"].dtype == torch.float16
    for _, method in methods:
        fresh = registry.key_quantizer(method.spec)
        fresh.bind(model_config(), loaded)
        keys = outlier_data((1, 2, 64, D), seed=9)
        method.bind(model_config(), calibration)
        assert torch.equal(fresh.encode(keys, 1).dequantize(), method.encode(keys, 1).dequantize())
