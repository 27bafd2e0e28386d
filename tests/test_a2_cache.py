"""The A² value policy inside the quantized cache: the bits budget as the cache reports it, merged
blocks and beam reorder with different widths per batch row, the attention statistic it asks for,
and the conformance kit."""

from __future__ import annotations

import pytest
import torch

from headq_core import QuantizedKVCache
from headq_core.layouts import concat_blocks, map_batched
from headq_core.testing import check_value_policy, feed, outlier_data

a2 = pytest.importorskip("headq_a2")
from headq_a2.block import MixedAffineBlock  # noqa: E402

B, H, G, D = 2, 2, 3, 64  # batch, kv heads, query heads per kv head, head_dim


def _data(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = outlier_data((B, H, tokens, D), seed=seed)
    v = outlier_data((B, H, tokens, D), seed=seed + 1)
    q = outlier_data((B, H * G, tokens, D), seed=seed + 2)
    return k, v, q


def _decode_cache(values: str, tokens: int, *, prefill: int = 96, window: int = 0) -> QuantizedKVCache:
    cache = QuantizedKVCache("fp16", values, window=window)
    k, v, q = _data(tokens)
    feed(cache, k, v, q, [prefill, *[1] * (tokens - prefill)])
    return cache


# --- bits: what the cache reports -------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "budget"),
    [
        ("a2", 2.0 + 0.1 * 2),
        ("a2:bits=2,hi=4,frac=0.25,group=64", 2.5),
        ("a2:bits=2,hi=8,frac=0.0625", 2.0 + 0.0625 * 6),
        ("a2:mode=greedy,avg=2.5,bits=1,hi=8", 2.5),
        ("a2:mode=greedy,avg=2.5,bits=2,hi=8,group=64", 2.5),
        ("a2:mode=greedy,avg=3,bits=2,hi=8,scope=layer", 3.0),
        ("a2:mode=greedy,avg=2.25,bits=2,hi=4,chunk=64", 2.25),
        ("a2:frac=0", 2.0),
    ],
)
def test_average_bits_meet_the_budget(spec: str, budget: float) -> None:
    tokens = 256  # whole chunks: with window 0 every value ends encoded
    cache = _decode_cache(spec, tokens)
    layer = cache.quantized_layers()[0]
    assert layer.v.window is None or layer.v.window.shape[-2] == 0
    assert len(layer.v.blocks) == 1  # prefill and 160 one-token steps merged into one block
    bits = cache.bits_per_element()["values"]
    measured = bits["payload"] + bits["other"]  # codes and the width index (the window is empty)
    assert abs(measured - budget) <= 0.05, bits
    group = 64 if "group=64" in spec else 32
    assert bits["scales"] == pytest.approx(32 / group)
    assert bits["exact"] == 0.0


def test_bookkeeping_is_counted() -> None:
    cache = _decode_cache("a2:mode=greedy,avg=2.5,bits=1,hi=8", 256)
    block = cache.quantized_layers()[0].v.blocks[0]
    assert isinstance(block, MixedAffineBlock) and block.width_index is not None
    index_bits = 8 * block.width_index.numel() * 4 / (B * H * 256 * D)
    assert index_bits == pytest.approx(2 / 64)  # a 2-bit width index per token of 64 channels
    assert cache.bits_per_element()["values"]["other"] == pytest.approx(index_bits)


# --- merging and beam reorder --------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["a2:mode=greedy,avg=2.5,bits=1,hi=8", "a2:bits=2,hi=8,frac=0.25,scope=layer"]
)
def test_merged_blocks_decode_and_reorder(spec: str) -> None:
    from headq_core import get_registry

    policy = get_registry().value_policy(spec)
    values = outlier_data((3, H, 160, D), seed=3)
    stats = torch.rand(values.shape[:-1], generator=torch.Generator().manual_seed(4)).pow(4)
    parts = [
        policy.encode(values[..., a:b, :], 0, stats[..., a:b]) for a, b in ((0, 96), (96, 128), (128, 160))
    ]
    merged = concat_blocks(parts)
    assert isinstance(merged, MixedAffineBlock) and merged.tokens == 160
    assert torch.equal(merged.dequantize(), torch.cat([p.dequantize() for p in parts], dim=-2))
    widths = merged.token_widths()
    assert not torch.equal(widths[0], widths[1])  # the batch rows chose differently
    order = torch.tensor([2, 0, 1])
    moved = map_batched(merged, lambda t: t.index_select(0, order))
    assert torch.equal(moved.dequantize(), merged.dequantize()[order])
    assert torch.equal(moved.token_widths(), widths[order])
    again = concat_blocks([moved, map_batched(parts[0], lambda t: t.index_select(0, order))])
    assert again is not None
    want = torch.cat([merged.dequantize()[order], parts[0].dequantize()[order]], dim=-2)
    assert torch.equal(again.dequantize(), want)


def test_cache_reorder_moves_every_row_whole() -> None:
    spec = "a2:mode=greedy,avg=2.5,bits=1,hi=8"
    cache = _decode_cache(spec, 200, window=4)
    layer = cache.quantized_layers()[0]
    before_k, before_v = layer.decoded()
    before_stats = layer.sq_attention.clone()  # type: ignore[union-attr]
    beams = torch.tensor([1, 0])
    cache.reorder_cache(beams)  # type: ignore[arg-type]
    after_k, after_v = layer.decoded()
    assert torch.equal(after_v, before_v[beams]) and torch.equal(after_k, before_k[beams])
    assert torch.equal(layer.sq_attention, before_stats[beams])  # type: ignore[arg-type]
    # decoding goes on after the reorder: one more step flushes into the merged block
    k, v, q = _data(201, seed=9)
    feed(cache, k[..., 200:, :], v[..., 200:, :], q[..., 200:, :], [1])
    assert layer.get_seq_length() == 201 and len(layer.v.blocks) == 1


# --- the attention statistic ------------------------------------------------------------------


@pytest.mark.parametrize(("weight", "statistic"), [("sq", "sq"), ("abs", "abs"), ("none", None)])
def test_cache_keeps_the_statistic_the_policy_names(weight: str, statistic: str | None) -> None:
    tokens = 20  # one prefill pass, all of it still in the window (chunk 32)
    cache = QuantizedKVCache("fp16", f"a2:weight={weight}")
    k, v, q = _data(tokens)
    feed(cache, k, v, q, [tokens])
    stats = cache.quantized_layers()[0].sq_attention
    if statistic is None:
        assert stats is None
        return
    assert stats is not None and stats.shape == (B, H, tokens)
    # exact causal attention of the pass, summed over the query heads of each KV head
    logits = (q.view(B, H, G, tokens, D) @ k.unsqueeze(2).transpose(-1, -2)) / D**0.5
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    want = (p.square() if statistic == "sq" else p).sum(dim=(2, 3))
    assert torch.allclose(stats, want, rtol=1e-4, atol=1e-6)
    if statistic == "abs":  # every query row's attention sums to one
        assert torch.allclose(stats.sum(-1), torch.full((B, H), float(G * tokens)), rtol=1e-5)


# --- conformance ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "a2",
        "a2:frac=0",
        "a2:bits=2,hi=4,frac=0.25,group=64",
        "a2:mode=greedy,avg=2.5,bits=1,hi=8",
        "a2:mode=greedy,avg=2.5,bits=2,hi=8,group=64,scope=layer",
        "a2:weight=abs",
        "a2:weight=none,chunk=16",
    ],
)
def test_a2_conforms(spec: str) -> None:
    check_value_policy(spec)
