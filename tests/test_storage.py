"""Storage with room to grow: exact tokens and encoded arenas hold what was appended, in place,
keep snapshots intact, and a layer's streams stay a few segments however long the context."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from headq_core import QuantizedKVCache, fused
from headq_core.attention import headq_attention
from headq_core.layouts import AffineBlock, concat_blocks
from headq_core.reference import attend_reference, row_mask
from headq_core.registry import get_registry
from headq_core.storage import BlockArena, ExactTokens
from headq_core.testing import outlier_data
from headq_kernels import bytes_along_tokens, dequantize_affine, quantize_affine


def test_exact_tokens_append_in_place_and_keep_snapshots() -> None:
    x = torch.randn(2, 3, 40, 8)
    first = ExactTokens.of(x[..., :10, :], position=5)
    grown = first.append(x[..., 10:11, :])
    assert grown.data is first.data  # in place: the buffer had room
    assert torch.equal(first.view(), x[..., :10, :])  # the snapshot still reads what it held
    assert torch.equal(grown.view(), x[..., :11, :]) and grown.first == 5
    dropped = grown.drop(4)
    assert dropped.first == 9 and torch.equal(dropped.view(), x[..., 4:11, :])
    assert torch.equal(dropped.rows(5, 16), x[..., :11, :])  # dropped rows stay readable until it moves
    state = dropped
    for i in range(11, 40):  # past its room: it moves, compacted, and reads the same
        state = state.append(x[..., i : i + 1, :])
    assert torch.equal(state.view(), x[..., 4:, :]) and state.first == 9


def _blocks(spec: str, sizes: list[int]) -> list:
    method = (
        get_registry().value_policy(spec) if spec.startswith("a2") else get_registry().key_quantizer(spec)
    )
    x = outlier_data((2, 2, sum(sizes), 64), seed=4)
    out, pos = [], 0
    for n in sizes:
        part = x[..., pos : pos + n, :]
        out.append(method.encode(part, 0) if not spec.startswith("a2") else method.encode(part, 0, None))
        pos += n
    return out


def test_an_arena_reads_as_the_concatenation_of_its_blocks() -> None:
    for spec, sizes, unit in (("kivi:bits=2", [96, 32, 32, 64] * 5, 32), ("a2", [64, 32] * 8, 32)):
        blocks = _blocks(spec, sizes)
        arena = BlockArena.of(blocks[0], unit)
        for block in blocks[1:]:
            assert arena.fits(block)
            arena = arena.append(block)
        assert arena.tokens == sum(sizes) and arena.capacity >= arena.tokens
        merged = concat_blocks(blocks)
        assert merged is not None
        torch.testing.assert_close(arena.stored().dequantize(), merged.dequantize(), rtol=0, atol=0)
        kept = arena.keep(100)  # cut down to whole units
        assert kept.tokens == 96
        torch.testing.assert_close(
            kept.stored().dequantize(), merged.dequantize()[..., :96, :], rtol=0, atol=0
        )


def test_keys_grouped_along_tokens_are_bytes_with_the_channels_adjacent() -> None:
    """The block decodes what the words decode, keeps its code bytes' tokens on axis 2, and
    refuses the words themselves, saying how to store them."""
    keys = outlier_data((2, 3, 64, 32), seed=4)
    words, scale, zero = quantize_affine(keys.transpose(-1, -2), 2, 32)  # (2, 3, 32, 4) int32
    fields = dict(tokens=64, scale=scale, zero=zero, bits=2, group=32, axis="tokens")
    block = AffineBlock(codes=bytes_along_tokens(words), **fields)
    assert block.codes.shape == (2, 3, 16, 32) and block.token_axis("codes") == 2
    assert block.token_axis("scale") == block.token_axis("zero") == 3
    assert torch.equal(block.dequantize(), dequantize_affine(words, scale, zero, 2, 32).transpose(-1, -2))
    with pytest.raises(TypeError, match="bytes_along_tokens"):
        AffineBlock(codes=words, **fields)


def test_an_arena_refuses_a_block_of_other_settings() -> None:
    two, four = _blocks("kivi:bits=2", [32])[0], _blocks("kivi:bits=4", [32])[0]
    assert not BlockArena.of(two, 32).fits(four)


def test_a_long_decode_keeps_each_stream_a_few_segments() -> None:
    """Host work per step must not grow with the context: one arena per stream, one window buffer."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_hidden_layers=1, intermediate_size=32, vocab_size=32)  # fmt: skip
    cache = QuantizedKVCache("kivi:bits=2", "kivi:bits=2", window=8, config=config)
    gen = torch.Generator().manual_seed(0)
    cache.store(0, torch.randn(1, 2, 700, 16, generator=gen), torch.randn(1, 2, 700, 16, generator=gen))
    module = torch.nn.Module().eval()
    buffers = set()
    for _ in range(600):
        k, v, q = (torch.randn(1, h, 1, 16, generator=gen) for h in (2, 2, 4))
        key, value = cache.update(k, v, 0)
        headq_attention(module, q, key, value, None, 0.25)
        layer = cache.quantized_layers()[0]
        assert len(layer.k.arenas) == len(layer.v.arenas) == 1
        buffers.add(layer.v.arenas[0].buffers.codes.data_ptr())
    assert len(buffers) <= 3  # 600 tokens appended: the arena moved a couple of times, not per step
    assert cache.get_seq_length() == 1300


def test_an_exact_cache_decodes_through_sdpa_as_the_reference_does() -> None:
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_hidden_layers=1, intermediate_size=32, vocab_size=32)  # fmt: skip
    caches = [QuantizedKVCache("fp16", "fp16", config=config) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randn(2, 2, 50, 16, generator=gen), torch.randn(2, 2, 50, 16, generator=gen)
    for cache in caches:
        cache.store(0, *prefix)
    module = torch.nn.Module().eval()
    mask = (torch.arange(51)[None, :] >= torch.tensor([0, 6])[:, None])[:, None, None, :]
    k, v, q = (torch.randn(2, h, 1, 16, generator=gen) for h in (2, 2, 4))
    sdpa = headq_attention(module, q, *caches[0].update(k, v, 0), mask, 0.25)[0]
    layer = caches[1].quantized_layers()[0]
    caches[1].update(k, v, 0)
    step = layer.begin_step()
    assert fused._exact(step, q)
    ref, _ = attend_reference(
        layer, step, q.reshape(2, 2, 2, 16), row_mask(mask, 2, 1, 50, 51, q.device), 0.25, None
    )
    torch.testing.assert_close(sdpa, ref.reshape(2, 4, 1, 16).transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_store_fills_layers_in_any_order_and_slices() -> None:
    """A benchmark fills layer 0 in slices, then layer 1: no forward-pass check gets in the way."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_hidden_layers=2, intermediate_size=32, vocab_size=32)  # fmt: skip
    cache = QuantizedKVCache("kivi:bits=2", "kivi:bits=2", window=8, config=config)
    gen = torch.Generator().manual_seed(0)
    for layer in range(2):
        for _ in range(3):
            cache.store(
                layer, torch.randn(1, 2, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
            )
    assert [layer.get_seq_length() for layer in cache.quantized_layers()] == [120, 120]
