"""GSRQ methods: lookup-table decode, index packing, bits accounting, stage plans and calibration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from headq_core.compat import cache_kwargs

pytest.importorskip("headq_gsrq", reason="headq-gsrq not installed")

from headq_gsrq.block import CodebookBlock, pack_indices, unpack_indices

from headq_core import CalibrationError, QuantizedKVCache, SpecError, get_registry
from headq_core.calibration import Calibration, calibrate
from headq_core.layouts import Codebook, block_nbytes
from headq_core.testing import feed, outlier_data, synthetic_calibration
from headq_core.testing.driving import model_config

CONFIG = model_config(kv_heads=2, head_dim=32, layers=2)


def _bound(kind: str, spec: str):
    registry = get_registry()
    method = registry.key_quantizer(spec) if kind == "key" else registry.value_policy(spec)
    method.bind(CONFIG, synthetic_calibration([(kind, method)], CONFIG, tokens=512))
    return method


@pytest.mark.parametrize(
    "spec",
    ["gsrq:dim=8,stages=16x4", "gsrq:bits=1,dim=4,scale=fisher", "gsrq:bits=0.5,dim=16,learner=kmeans"],
)
def test_lut_logits_and_readout_equal_dequantize_then_attend(spec: str) -> None:
    x = outlier_data((2, 2, 37, 32), seed=1)
    gen = torch.Generator().manual_seed(0)
    keys = _bound("key", spec)
    block = keys.encode(x, 1)
    assert isinstance(block, CodebookBlock)
    query = torch.randn(2, 2, 5, 32, generator=gen)
    want = query @ block.dequantize().transpose(-1, -2)
    torch.testing.assert_close(keys.logits(query, block, 1), want, rtol=1e-5, atol=1e-4)

    values = _bound("value", spec)
    vblock = values.encode(x, 1)
    probs = torch.softmax(2 * torch.randn(2, 2, 5, 37, generator=gen), dim=-1)
    torch.testing.assert_close(
        values.readout(probs, vblock, 1), probs @ vblock.dequantize(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("widths", [(8,), (8, 8), (4,), (6, 2), (3,), (1, 5, 7), (16,)])
def test_index_packing_round_trips_in_exact_bytes(widths: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    positions = 4
    codes = torch.stack(
        [torch.randint(0, 1 << w, (3, 2, 9, positions), generator=gen) for w in widths], dim=-1
    )
    packed = pack_indices(codes, widths)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 2, 9, math.ceil(positions * sum(widths) / 8))
    assert torch.equal(unpack_indices(packed, positions, widths), codes)


def test_encoding_is_greedy_and_beats_fewer_stages() -> None:
    x = outlier_data((1, 2, 64, 32), seed=2)
    one = _bound("key", "gsrq:dim=8,stages=16").encode(x, 0).dequantize()
    two = _bound("key", "gsrq:dim=8,stages=16x16").encode(x, 0).dequantize()
    assert (x - two).square().sum() < (x - one).square().sum()


@pytest.mark.parametrize(
    ("spec", "sizes", "payload"),
    [
        ("gsrq", (256,), 1.0),
        ("gsrq:bits=2,dim=8", (256, 256), 2.0),
        ("gsrq:bits=0.75", (64,), 0.75),
        ("gsrq:bits=0.5,dim=16", (256,), 0.5),
        ("gsrq:dim=8,stages=256x16", (256, 16), 1.5),
        ("gsrq:bits=1.5,dim=8,stages=256x16", (256, 16), 1.5),
    ],
)
def test_stage_plan_and_payload_bits(spec: str, sizes: tuple[int, ...], payload: float) -> None:
    method = get_registry().key_quantizer(spec)
    assert method.config.sizes == sizes
    assert method.nominal_bits(64) == {"payload": payload}


@pytest.mark.parametrize(
    "spec", ["gsrq:bits=0.3", "gsrq:stages=100", "gsrq:bits=1,stages=256x256", "gsrq:dim=0"]
)
def test_bad_specs_are_clear_errors(spec: str) -> None:
    with pytest.raises(SpecError):
        get_registry().key_quantizer(spec)


def test_bits_report_index_payload_and_amortized_codebooks() -> None:
    registry = get_registry()
    keys = registry.key_quantizer("gsrq:bits=1,dim=8,scale=fisher")
    values = registry.value_policy("gsrq:dim=8,stages=16x4,scale=fisher")
    calibration = synthetic_calibration([("key", keys), ("value", values)], CONFIG, tokens=512)
    cache = QuantizedKVCache(keys, values, window=3, sinks=2, config=CONFIG, calibration=calibration)
    b, h, t, d = 2, 2, 41, 32
    k = outlier_data((b, h, t, d), seed=3, dtype=torch.float16)
    v = outlier_data((b, h, t, d), seed=4, dtype=torch.float16)
    q = outlier_data((b, 2 * h, t, d), seed=5, dtype=torch.float16)
    feed(cache, k, v, q, [20, 1, 7, 13], layers=2)
    bits = cache.bits_per_element()
    encoded = (t - 3 - 2) / t
    elements = b * h * t * d  # per layer
    assert bits["keys"]["payload"] == pytest.approx(1.0 * encoded)  # 8 bits per 8-channel sub-vector
    assert bits["values"]["payload"] == pytest.approx(0.75 * encoded)  # (4 + 2) bits per sub-vector
    assert bits["keys"]["exact"] == pytest.approx(16 * (3 + 2) / t)
    scale = 2 * 32 * 2  # (kv_heads, head_dim) float16 channel scale per layer
    key_books = 4 * 256 * 8 * 2 + scale  # bytes per layer: (P=4, 256, 8) float16, and the scale
    value_books = 4 * (16 + 4) * 8 * 2 + scale
    assert bits["keys"]["other"] == pytest.approx(8 * key_books / elements)
    assert bits["values"]["other"] == pytest.approx(8 * value_books / elements)
    assert keys.state_nbytes(0) == key_books and values.state_nbytes(1) == value_books
    block = cache.quantized_layers()[0].k.blocks[0]
    assert block.layout == Codebook(8, (256,))
    assert block_nbytes(block) == {
        "payload": b * h * block.tokens * 4,
        "scales": 0,
        "side": 0,
        "exact": 0,
        "other": 0,
    }


def _tiny_lm():
    from transformers import AutoModelForCausalLM

    from headq_core import use_headq_attention

    torch.manual_seed(0)
    return use_headq_attention(AutoModelForCausalLM.from_config(CONFIG).eval())


def test_calibrate_fits_codebooks_saves_and_binds(tmp_path: Path) -> None:
    model = _tiny_lm()
    registry = get_registry()
    methods = [
        ("key", registry.key_quantizer("gsrq:bits=1,dim=8,scale=fisher")),
        ("value", registry.value_policy("gsrq:bits=0.5,dim=8,weighted=false")),
    ]
    windows = [torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    lines: list[str] = []
    artifact = calibrate(
        model, windows, methods, model_name="tiny", fingerprint="tiny", text_name="random", text_sha256="0",
        stage=lines.append,
    )  # fmt: skip
    assert set(artifact.metadata["statistics"]) == {"key_samples", "key_fisher", "value_samples"}
    # every stage says when it starts and ends (a log file shows where the time goes)
    assert lines[0].startswith("collecting key_fisher, key_samples, value_samples over 144 tokens")
    assert "tokens/s" in lines[1] and len(lines) == 2 + 2 * len(methods)
    assert lines[-1].startswith("fitted value method gsrq:bits=0.5")
    names = sorted(artifact.tensors)
    assert names == [
        "key:gsrq:bits=1.0,scale=fisher/layer0.scale",
        "key:gsrq:bits=1.0,scale=fisher/layer0.stage0",
        "key:gsrq:bits=1.0,scale=fisher/layer1.scale",
        "key:gsrq:bits=1.0,scale=fisher/layer1.stage0",
        "value:gsrq:bits=0.5,weighted=false/layer0.stage0",
        "value:gsrq:bits=0.5,weighted=false/layer1.stage0",
    ]
    assert (
        artifact.tensors[names[1]].shape == (4, 256, 8) and artifact.tensors[names[1]].dtype == torch.float16
    )
    assert artifact.tensors[names[0]].shape == (2, 32)
    loaded = Calibration.load(artifact.save(tmp_path / "gsrq.safetensors"), CONFIG)
    for name in names:
        assert torch.equal(loaded.tensors[name], artifact.tensors[name])
    cache = QuantizedKVCache(
        "gsrq:bits=1,dim=8,scale=fisher", "gsrq:bits=0.5,weighted=false", config=CONFIG, calibration=loaded
    )
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 24)), **cache_kwargs(model, cache), use_cache=True)
    assert (
        cache.nbytes_by_part()["keys"]["payload"] == 2 * 2 * 2 * 24 * 4
    )  # layers x batch x heads x tokens x bytes


def test_fisher_statistic_is_aligned_with_samples() -> None:
    from headq_core.calibration import collect_statistics

    model = _tiny_lm()
    windows = [torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    full = collect_statistics(model, windows, {"key_samples", "key_fisher", "value_fisher"})
    assert len(full.key_fisher) == len(full.value_fisher) == 2 and len(full.value_samples) == 2
    sub = collect_statistics(model, windows, {"key_samples", "key_fisher"}, max_samples=30)
    keep = [
        i
        for i in range(80)
        if any(torch.equal(full.key_samples[0][:, i], sub.key_samples[0][:, j]) for j in range(30))
    ]
    assert len(keep) == 30
    torch.testing.assert_close(sub.key_fisher[0], full.key_fisher[0][:, keep])
    assert bool((full.key_fisher[0] >= 0).all()) and float(full.key_fisher[0].sum()) > 0
    # the last token's key and value do not reach any scored prediction
    assert float(full.value_fisher[0][:, 39].abs().max()) == 0.0


def test_missing_calibration_names_the_command() -> None:
    registry = get_registry()
    for kind in ("key", "value"):
        method = (
            registry.key_quantizer("gsrq:bits=2") if kind == "key" else registry.value_policy("gsrq:bits=2")
        )
        with pytest.raises(CalibrationError, match=f"headq calibrate --{kind}s 'gsrq:bits=2.0'"):
            method.bind(CONFIG, None)
        other = synthetic_calibration(
            [(kind, registry.key_quantizer("gsrq") if kind == "key" else registry.value_policy("gsrq"))],
            CONFIG,
            tokens=256,
        )
        with pytest.raises(CalibrationError, match=f"headq calibrate --{kind}s"):
            method.bind(CONFIG, other)
    with pytest.raises(CalibrationError, match="before bind"):
        registry.key_quantizer("gsrq").encode(torch.randn(1, 2, 4, 32), 0)
