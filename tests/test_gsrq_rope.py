"""GSRQ keys with ``rope=pre``: codebooks of keys rotated back to before the rotary embedding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("headq_gsrq", reason="headq-gsrq not installed")

from headq_gsrq.block import RotatedCodebookBlock, decode
from headq_gsrq.fitting import encode_residual
from headq_gsrq.rotary import inverse_frequencies, rotate

from headq_core import CalibrationError, QuantizedKVCache, get_registry
from headq_core.calibration import calibrate, collect_statistics
from headq_core.layouts import NoKernelLayout, block_nbytes
from headq_core.testing import feed, outlier_data, synthetic_calibration
from headq_core.testing.driving import model_config

CONFIG = model_config(kv_heads=2, head_dim=32, layers=2)
SPEC = "gsrq:dim=8,stages=16,rope=pre,weighted=false"


def _bound(spec: str = SPEC):
    keys = get_registry().key_quantizer(spec)
    keys.bind(CONFIG, synthetic_calibration([("key", keys)], CONFIG, tokens=512))
    return keys


def test_rotation_is_the_models_rotary_embedding() -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    x = torch.randn(2, 2, 7, 32, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40, 47)
    cos, sin = LlamaRotaryEmbedding(CONFIG)(x, positions[None])
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    inv_freq = inverse_frequencies(CONFIG)
    torch.testing.assert_close(rotate(x, positions, inv_freq), want)
    torch.testing.assert_close(rotate(want, positions, inv_freq, back=True), x, rtol=1e-5, atol=1e-5)


def test_keys_made_of_codewords_come_back_exactly_at_their_positions_only() -> None:
    """Pre-RoPE keys that are codewords have no codebook error: what is lost is the rotation's, and
    the rotation is undone and redone with the token's own position, not its neighbour's."""
    keys = _bound()
    book = keys.books.layers[1].stages[0].float()  # (P=4, 16, 8)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (1, 2, 24, 4), generator=gen)
    pre = book[torch.arange(4), ids].flatten(-2)  # (1, 2, 24, 32)
    start = 37
    post = rotate(pre, torch.arange(start, start + 24), keys.books.layers[1].inv_freq)
    block = keys.encode_at(post, 1, start)
    assert isinstance(block, RotatedCodebookBlock)
    assert block.positions.tolist() == [[list(range(start, start + 24))]]
    torch.testing.assert_close(block.dequantize(), post, rtol=1e-4, atol=1e-4)
    shifted = keys.encode_at(post, 1, start + 1).dequantize()
    assert float((shifted - post).square().mean()) > 1e-3 * float(post.square().mean())
    query = torch.randn(1, 2, 3, 32, generator=gen)
    torch.testing.assert_close(keys.logits(query, block, 1), query @ post.mT, rtol=1e-4, atol=1e-3)
    with pytest.raises(NoKernelLayout, match="rotary"):
        block.kernel_segment(24)
    with pytest.raises(CalibrationError, match="positions"):
        keys.encode(post, 1)


def test_error_is_the_codebook_error_of_the_pre_rope_keys() -> None:
    keys = _bound()
    pre = outlier_data((2, 2, 16, 32), seed=4)
    positions = torch.arange(5, 21)
    post = rotate(pre, positions, keys.books.layers[0].inv_freq)
    err_post = (keys.encode_at(post, 0, 5).dequantize() - post).square().sum(-1)
    # the same codebooks, applied to the pre-RoPE keys directly, without any rotation
    books = keys.books.layers[0]
    codes = encode_residual(pre.unflatten(-1, (4, 8)), books.on(pre.device))
    err_pre = (decode(codes, books.on(pre.device)).flatten(-2) - pre).square().sum(-1)
    torch.testing.assert_close(err_post, err_pre, rtol=1e-3, atol=1e-4)


def test_cache_counts_positions_and_reads_rotated_keys() -> None:
    keys = get_registry().key_quantizer(SPEC)
    calibration = synthetic_calibration([("key", keys)], CONFIG, tokens=512)
    cache = QuantizedKVCache(keys, "fp16", window=4, sinks=2, config=CONFIG, calibration=calibration)
    b, h, t, d = 2, 2, 30, 32
    k, v = outlier_data((b, h, t, d), seed=5), outlier_data((b, h, t, d), seed=6)
    out = feed(cache, k, v, outlier_data((b, 2 * h, t, d), seed=7), [17, 1, 12], layers=2)
    assert torch.isfinite(out).all()
    layer = cache.quantized_layers()[0]
    blocks = layer.k.blocks
    assert all(isinstance(block, RotatedCodebookBlock) for block in blocks)
    encoded = sum(block.tokens for block in blocks)
    assert encoded == t - 4 - 2
    # the positions are the tokens' own, after the sinks: undone and redone with the same angle
    stored = torch.cat([block.positions for block in blocks], dim=-1)
    assert stored[0, 0].tolist() == list(range(2, 2 + encoded))
    assert block_nbytes(blocks[0])["side"] == b * blocks[0].tokens * 4  # int32 per row and token
    bits = cache.bits_per_element()["keys"]
    assert bits["side"] == pytest.approx(32 / (h * d) * encoded / t)
    assert bits["payload"] == pytest.approx(4 / 8 * encoded / t)  # 4 index bits per 8 channels
    # what the cache reads is the rotated reconstruction of the pre-RoPE keys
    pre = rotate(
        k[..., 2 : 2 + encoded, :], torch.arange(2, 2 + encoded), keys.books.layers[0].inv_freq, back=True
    )
    want = keys.books.encode(SPEC, k[..., 2 : 2 + encoded, :], 0, 2).dequantize()
    torch.testing.assert_close(torch.cat([blk.dequantize() for blk in blocks], dim=-2), want)
    assert float((want - k[..., 2 : 2 + encoded, :]).square().mean()) < float(pre.square().mean())


def test_calibration_rotates_samples_back_by_their_window_positions() -> None:
    from transformers import AutoModelForCausalLM

    from headq_core import use_headq_attention

    torch.manual_seed(0)
    model = use_headq_attention(AutoModelForCausalLM.from_config(CONFIG).eval())
    windows = [torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    stats = collect_statistics(model, windows, {"key_samples", "key_positions"}, max_samples=25)
    assert stats.key_positions[0].shape == (2, 25, 1)
    full = collect_statistics(model, windows, {"key_samples", "key_positions"})
    assert full.key_positions[1][0, :, 0].tolist() == list(range(20)) * 2
    assert not full.key_fisher  # positions need no backward pass
    artifact = calibrate(
        model, windows, [("key", get_registry().key_quantizer(SPEC))], model_name="tiny",
        fingerprint="tiny", text_name="random", text_sha256="0",
    )  # fmt: skip
    assert artifact.metadata["statistics"] == ["key_positions", "key_samples"]


def test_values_and_models_without_a_plain_rotary_embedding_are_refused() -> None:
    values = get_registry().value_policy("gsrq:dim=8,stages=16,rope=pre,weighted=false")
    with pytest.raises(CalibrationError, match="values have none"):
        synthetic_calibration([("value", values)], CONFIG, tokens=256)
    scaled = model_config(kv_heads=2, head_dim=32, layers=2)
    scaled.rope_parameters = {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(CalibrationError, match="rope=post"):
        inverse_frequencies(scaled)


def test_each_layer_rotates_by_its_own_layer_types_rotary_embedding() -> None:
    """Gemma 3 keeps rotary parameters per layer type (here a linearly scaled base for the full
    layer, as its larger models have): each layer's rotation is transformers' for its type, and the
    codebooks bound for the model carry each layer's frequencies."""
    from conftest import tiny_config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding, apply_rotary_pos_emb

    config = tiny_config("gemma3")
    config.rope_parameters = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
    }
    x = torch.randn(1, 1, 7, config.head_dim, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(300, 307)
    rotary = Gemma3RotaryEmbedding(config)
    for layer, layer_type in enumerate(config.layer_types):
        cos, sin = rotary(x, positions[None], layer_type)
        want, _ = apply_rotary_pos_emb(x, x, cos, sin)
        torch.testing.assert_close(rotate(x, positions, inverse_frequencies(config, layer)), want)
    keys = get_registry().key_quantizer("gsrq:dim=8,stages=16,rope=pre,weighted=false")
    keys.bind(config, synthetic_calibration([("key", keys)], config, tokens=256))
    for layer in range(len(config.layer_types)):
        torch.testing.assert_close(keys.books.layers[layer].inv_freq, inverse_frequencies(config, layer))
    assert not torch.equal(keys.books.layers[0].inv_freq, keys.books.layers[1].inv_freq)
