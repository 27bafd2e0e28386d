"""The fused decode path's host side on the CPU: plans, segments, and the step they describe.

The Triton kernel runs only on a GPU (``test_kernels_gpu.py``); everything it is given is built
here without one. ``decode_plan.attend_torch`` computes, split by split in torch, what the kernel
computes, so running the ``headq`` attention function with it in the kernel's place checks the
plan, the segments and the flush rule of the fused path against the reference path everywhere.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from transformers import LlamaConfig

from headq_core import QuantizedKVCache, fused
from headq_core.attention import headq_attention
from headq_core.testing.calibration import calibration_for
from headq_kernels import bytes_along_tokens, decode_plan, quantize_affine

# --- plans --------------------------------------------------------------------------------------


def _affine_keys(b: int, h: int, d: int, tokens: int, covered: int | None) -> decode_plan.AffineTokens:
    codes, scale, zero = quantize_affine(torch.randn(b, h, tokens, d).transpose(-1, -2), 2, 32)
    return decode_plan.AffineTokens(bytes_along_tokens(codes), scale, zero, tokens, covered=covered)


def _random_streams(rng: random.Random) -> tuple[list, list]:
    b, h, d = 2, 3, 16
    keys: list = []
    sinks = rng.randint(0, 4)
    if sinks:
        keys.append(decode_plan.Dense(torch.randn(b, h, sinks, d)))
    blocks = [32 * rng.randint(1, 40) for _ in range(rng.randint(1, 4))]
    cut = rng.randint(0, 31) if rng.random() < 0.5 else 0  # the last block attended only in part
    for i, tokens in enumerate(blocks):
        last = i == len(blocks) - 1
        keys.append(_affine_keys(b, h, d, tokens, tokens - cut if last and cut else None))
    tail = rng.randint(0, 40)
    if tail:
        window = torch.randn(b, h, tail + 7, d)[..., 7:, :]  # a strided view, as a window slice is
        keys.append(decode_plan.Dense(window))
    # Values in dense blocks with boundaries of their own, on key groups where keys are encoded
    # (the plan refuses others: see the test below).
    allowed, pos = [], 0
    for seg in keys:
        n = seg.tokens if isinstance(seg, decode_plan.Dense) or seg.covered is None else seg.covered
        step = 32 if isinstance(seg, decode_plan.AffineTokens) else 1
        allowed += range(pos + step, pos + n + 1, step) if step == 1 else range(pos + step, pos + n, step)
        pos += n
        allowed.append(pos)
    cuts = sorted(set(rng.sample(allowed, min(len(allowed), rng.randint(1, 6)))) | {pos})
    values = [
        decode_plan.Dense(torch.randn(b, h, z - a, d)) for a, z in zip([0, *cuts[:-1]], cuts, strict=True)
    ]
    return keys, values


@pytest.mark.parametrize("seed", range(40))
def test_splits_partition_the_tokens_inside_segments_and_on_key_groups(seed: int) -> None:
    rng = random.Random(seed)
    keys, values = _random_streams(rng)
    split = rng.choice([None, 64, 128, 1024])
    plan = decode_plan.plan(keys, values, batch_heads=rng.choice([1, 6, 96]), block_n=64, split=split)
    kb, vb = decode_plan._bounds(keys), decode_plan._bounds(values)
    rows = [row for _, _, splits in plan.launches for row in splits.tolist()]
    assert sorted(r[6] for r in rows) == list(range(plan.n_splits))
    covered = []
    for k_seg, k_off, v_seg, v_off, length, position, _ in rows:
        v_seg -= len(keys)
        assert 0 < length and (split is None or length <= max(64, split))
        assert kb[k_seg] + k_off == position == vb[v_seg] + v_off  # the same token in both streams
        assert position + length <= min(kb[k_seg + 1], vb[v_seg + 1])  # inside both segments
        if isinstance(keys[k_seg], decode_plan.AffineTokens):
            assert k_off % 32 == 0
        covered += range(position, position + length)
    assert sorted(covered) == list(range(plan.length)) and plan.length == kb[-1]
    for k_kind, v_kind, splits in plan.launches:  # one launch per pair of segment kinds
        for k_seg, _, v_seg, *_ in splits.tolist():
            assert decode_plan.kind(keys[k_seg]) == k_kind
            assert decode_plan.kind(values[v_seg - len(keys)]) == v_kind


def test_the_segment_table_points_into_the_cache_tensors() -> None:
    window = torch.randn(2, 3, 50, 16)[..., 10:, :]
    block = _affine_keys(2, 3, 16, 64, None)
    plan = decode_plan.plan([block, decode_plan.Dense(window)], [decode_plan.Dense(torch.randn(2, 3, 104, 16))],
                            batch_heads=6)  # fmt: skip
    table = plan.segments.tolist()
    assert table[0][decode_plan.PTR0 : decode_plan.PTR2 + 1] == [
        block.codes.data_ptr(), block.scale.data_ptr(), block.zero.data_ptr()
    ]  # fmt: skip
    assert table[1][decode_plan.PTR0] == window.data_ptr()  # a view, not a copy
    assert table[1][decode_plan.STRIDE_B : decode_plan.STRIDE_T + 1] == list(window.stride()[:3])


def test_mismatched_streams_and_split_groups_are_refused() -> None:
    block = _affine_keys(1, 1, 16, 64, None)
    with pytest.raises(ValueError, match="keys cover 64 tokens, values 63"):
        decode_plan.plan([block], [decode_plan.Dense(torch.randn(1, 1, 63, 16))], batch_heads=1)
    values = [decode_plan.Dense(torch.randn(1, 1, n, 16)) for n in (40, 24)]
    with pytest.raises(ValueError, match="inside a key group"):
        decode_plan.plan([block], values, batch_heads=1)
    # affine keys grouped along channels (per-token keys) would be read as if grouped along tokens
    codes, scale, zero = quantize_affine(torch.randn(1, 1, 64, 16), 2, 16)
    per_token = decode_plan.AffineChannels(codes, scale, zero, 64, group=16)
    with pytest.raises(ValueError, match="affine keys grouped along tokens"):
        decode_plan.plan([per_token], [decode_plan.Dense(torch.randn(1, 1, 64, 16))], batch_heads=1)
    with pytest.raises(ValueError, match="affine keys grouped along tokens"):
        decode_plan.plan([decode_plan.Dense(torch.randn(1, 1, 64, 16))], [block], batch_heads=1)


# --- the fused step against the reference path ----------------------------------------------------


class _Attn(torch.nn.Module):
    training = False


def _masks(pads: list[int], n: int, total: int) -> torch.Tensor:
    pos = torch.arange(total)
    query = torch.arange(total - n, total)
    pad = torch.tensor(pads)
    mask = (pos[None, None, :] <= query[None, :, None]) & (pos[None, None, :] >= pad[:, None, None])
    return mask[:, None]


def _emulated(calls: list[int], use: list[bool]):
    """``fused.decode`` with ``attend_torch`` in the kernel's place, for the caches ``use`` says."""

    def decode(step, query, attention_mask, scaling, softcap):
        if not use[0]:
            return None
        mask = fused.decode_mask(attention_mask, step.length)
        out = fused.decode_step(step, query, mask, scaling, decode_plan.attend_torch)
        if out is not None:
            calls.append(1)
        return out

    return decode


CASES = [
    ("kivi:bits=2", "kivi:bits=2", 0, 0),
    ("kivi:bits=4,group=64", "kivi:bits=4", 0, 0),
    ("kivi:bits=1", "kivi:bits=8,group=16", 5, 0),
    ("kivi:bits=2", "fp16", 3, 2),
    ("fp16", "kivi:bits=2", 0, 0),
    ("headq", "kivi:bits=2", 0, 0),
    ("headq:rank=16,zbits=2", "fp16", 32, 4),
    ("kivi:bits=2", "kivi:bits=2", 32, 4),
    ("kivi:bits=2", "a2", 4, 0),
    ("headq", "a2:mode=greedy,avg=3,bits=2,hi=8,weight=abs", 8, 2),
    ("gsrq", "gsrq", 0, 0),
    ("gsrq:bits=2", "kivi:bits=2", 3, 1),
    ("kivi:bits=2", "gsrq:bits=0.75", 0, 0),
]


@pytest.mark.parametrize(("keys", "values", "window", "sinks"), CASES)
@pytest.mark.parametrize("prefix", [95, 96, 97, 1100])
def test_the_fused_step_matches_the_reference_path(monkeypatch, keys, values, window, sinks, prefix) -> None:
    _fused_against_reference(monkeypatch, keys, values, window, sinks, prefix, d=16)


ENGINE_CASES = [
    ("fp8", "fp8", 0, 0),
    ("fp8:format=e5m2,scale=none", "int:bits=4", 3, 2),
    ("int", "rotation:bits=2.5", 4, 0),
    ("rotation:bits=3.5", "kivi:bits=2", 0, 1),
    ("kivi:bits=2", "int:bits=8", 32, 0),
]


@pytest.mark.parametrize(("keys", "values", "window", "sinks"), ENGINE_CASES)
@pytest.mark.parametrize("prefix", [95, 1100])
def test_engine_formats_take_the_fused_step(monkeypatch, keys, values, window, sinks, prefix) -> None:
    """fp8, per-token-head integers and rotated tokens (headq-baselines) as the kernel reads them."""
    pytest.importorskip("headq_baselines")
    _fused_against_reference(monkeypatch, keys, values, window, sinks, prefix, d=64)


def _fused_against_reference(monkeypatch, keys, values, window, sinks, prefix, *, d: int) -> None:
    b, hq, hkv = 3, 4, 2
    config = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
                         num_hidden_layers=1, intermediate_size=32, vocab_size=32)  # fmt: skip
    calibration = calibration_for(keys, values, config, tokens=256)
    caches = [
        QuantizedKVCache(keys, values, window=window, sinks=sinks, config=config, calibration=calibration)
        for _ in range(2)
    ]
    calls: list[int] = []
    use = [False]
    monkeypatch.setattr(fused, "decode", _emulated(calls, use))
    pads, gen, total, steps = [0, 9, 70], torch.Generator().manual_seed(prefix), 0, 3
    for step in range(steps + 1):
        n = prefix if step == 0 else 1
        k, v, q = (torch.randn(b, h, n, d, generator=gen) * 2 for h in (hkv, hkv, hq))
        total += n
        outs = []
        for cache in caches:
            use[0] = cache is caches[1]
            outs.append(
                headq_attention(_Attn(), q, *cache.update(k, v, 0), _masks(pads, n, total), d**-0.5)[0]
            )
        if step:
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert len(calls) == steps, "the fused step did not run"
    ref_layer, got_layer = (cache.quantized_layers()[0] for cache in caches)
    ref_k, ref_v = ref_layer.decoded()
    got_k, got_v = got_layer.decoded()
    assert torch.equal(ref_k, got_k) and torch.equal(ref_v, got_v)  # the same state after the steps
    if ref_layer.sq_attention is not None:  # and the same attention statistics for the value policy
        assert got_layer.sq_attention is not None and ref_layer.sq_attention.abs().sum() > 0
        torch.testing.assert_close(got_layer.sq_attention, ref_layer.sq_attention, rtol=1e-5, atol=1e-7)


def test_a_plan_that_the_kernel_cannot_run_still_runs_in_torch() -> None:
    """A value boundary inside a key group: refused for the kernel, computed exactly in torch."""
    gen = torch.Generator().manual_seed(3)
    block = _affine_keys(2, 2, 16, 64, None)
    v = torch.randn(2, 2, 64, 16, generator=gen)
    values = [decode_plan.Dense(v[..., :40, :]), decode_plan.Dense(v[..., 40:, :])]
    plan = decode_plan.plan([block], values, batch_heads=4, strict=False)
    q = torch.randn(2, 2, 3, 16, generator=gen)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, :5] = False  # left padding of the second row
    keys = decode_plan._decoded(block)
    logits = (q @ keys.transpose(-1, -2) * 0.25).masked_fill(~mask[:, None, None, :], float("-inf"))
    want = torch.softmax(logits, dim=-1) @ v
    got = decode_plan.attend_torch(q, plan, scale=0.25, mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rotated_segments_attend_in_their_interleaved_basis() -> None:
    """What the kernel computes for rotated tokens, written out in torch: logits of the query
    turned by the segment's basis against the two halves' levels set side by side, times each
    token's norm, and a readout turned back by the basis, equal attention over the tokens decoded."""
    rotation = pytest.importorskip("headq_baselines.rotation")
    from headq_kernels import unpack_planes

    gen = torch.Generator().manual_seed(5)
    d = 64
    x = torch.randn(2, 3, 40, d, generator=gen)
    block = rotation.encode(x, rotation.RotationConfig(bits=2.5, seed=3))
    seg = block.kernel_segment(40)
    lo = seg.levels[0][unpack_planes(seg.first, seg.widths[0], d // 2).long()]
    hi = seg.levels[1][unpack_planes(seg.second, seg.widths[1], d // 2).long()]
    tiles = torch.stack([lo, hi], dim=-1).reshape(2, 3, 40, d)  # the halves side by side
    q = torch.randn(2, 3, 5, d, generator=gen)
    logits = (q @ seg.basis.T) @ tiles.transpose(-1, -2) * seg.norm.float().transpose(-1, -2)
    decoded = block.dequantize()
    torch.testing.assert_close(logits, q @ decoded.transpose(-1, -2), rtol=1e-4, atol=1e-4)
    p = torch.softmax(logits, dim=-1)
    readout = ((p * seg.norm.float().transpose(-1, -2)) @ tiles) @ seg.basis
    torch.testing.assert_close(readout, p @ decoded, rtol=1e-4, atol=1e-5)


def test_scaled_codes_are_read_as_bytes_in_channel_order() -> None:
    """The scaled-token kernel reads a token as its row of bytes, 16 at a time: byte c of an 8-bit
    token is the code of channel c, byte j of a 4-bit token holds channel 2j low and 2j + 1 high;
    the plan refuses codes that do not start on 16 bytes, and 4-bit tokens under 32 channels stay
    on the reference path."""
    from headq_core.layouts import NoKernelLayout

    fp8 = pytest.importorskip("headq_baselines.fp8")
    integer = pytest.importorskip("headq_baselines.integer")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 40, 64, generator=gen)
    for block in (
        fp8.encode(x, fp8.Fp8Config(format="e4m3")),
        fp8.encode(x, fp8.Fp8Config(format="e5m2")),
        integer.encode(x, integer.IntConfig(bits=8)),
        integer.encode(x, integer.IntConfig(bits=4)),
    ):
        seg = block.kernel_segment(40)
        byte = seg.codes.view(torch.uint8)
        if seg.bits == 4:
            level = torch.stack([byte & 15, byte >> 4], dim=-1).flatten(-2).float() - 7
        elif seg.format == decode_plan.INT:
            level = byte.float() - 127
        else:
            level = byte.view(
                torch.float8_e4m3fn if seg.format == decode_plan.E4M3 else torch.float8_e5m2
            ).float()
        assert level.shape == x.shape
        torch.testing.assert_close(level * seg.scale.float(), seg.decode().float(), rtol=0, atol=0)
        values = [decode_plan.Dense(torch.randn(2, 3, 40, 64))]
        decode_plan.plan([seg], values, batch_heads=6)
        shifted = torch.empty(seg.codes.numel() + 1, dtype=torch.int32)[1:].view(seg.codes.shape)
        with pytest.raises(ValueError, match="start on 16 bytes"):
            decode_plan.plan([dataclasses.replace(seg, codes=shifted)], values, batch_heads=6)
    with pytest.raises(NoKernelLayout, match="head_dim 16"):
        integer.encode(x[..., :16], integer.IntConfig(bits=4)).kernel_segment(40)
