"""Triton kernels against their torch references, on a GPU (skipped without CUDA and Triton).

Tolerances of the fused decode attention against the reference path (which computes in float32
from the same stored tensors): the kernel feeds the matrix units in the model's dtype, so keys
and values dequantized in float32 are rounded once more, as are the softmax weights.

| dtype    | relative error of the attention output |
| -------- | -------------------------------------- |
| float16  | 4e-3                                   |
| bfloat16 | 3e-2                                   |
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
triton = pytest.importorskip("triton")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from headq_core import QuantizedKVCache, get_registry  # noqa: E402
from headq_core import fused as fused_module  # noqa: E402
from headq_core.attention import headq_attention  # noqa: E402
from headq_core.harness.perplexity import CacheSettings, Windowing, perplexity  # noqa: E402
from headq_core.spec import parse_spec  # noqa: E402
from headq_core.testing.calibration import calibration_for  # noqa: E402
from headq_kernels import affine_reference, decode_plan, triton_affine, triton_decode  # noqa: E402
from headq_kernels.decode_plan import AFFINE, MIXED  # noqa: E402

TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
CUDA = torch.device("cuda")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def outliers(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian data with a few large channels, as keys have; never all zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    x[..., :: max(1, shape[-1] // 5)] *= 6.0
    return x.to(dtype).to(CUDA)


# --- quantize and pack ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_pack_is_bit_exact_on_both_axes(bits: int, group: int, dtype: torch.dtype) -> None:
    # Values grouped along channels: (batch, heads, tokens, channels), an awkward token count.
    values = outliers((3, 5, 37, 256), seed=bits * 100 + group, dtype=dtype)
    values[0, 0, 3, :group] = 1.25  # a zero-range group
    # Keys grouped along tokens, read through the transposed view the KIVI plugin passes.
    keys = outliers((2, 3, 3 * group, 96), seed=bits * 100 + group + 1, dtype=dtype).transpose(-1, -2)
    for x in (values, keys):
        got = triton_affine.quantize_affine(x, bits, group)
        want = affine_reference.quantize_affine(x, bits, group)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert torch.equal(g, w)


def test_dispatcher_uses_the_kernel_on_cuda_and_the_reference_elsewhere(monkeypatch) -> None:
    import headq_kernels

    x = outliers((4, 64, 128), seed=3, dtype=torch.float16)
    calls = []
    real = triton_affine.quantize_affine
    monkeypatch.setattr(triton_affine, "quantize_affine", lambda *a: calls.append(1) or real(*a))
    on_gpu = headq_kernels.quantize_affine(x, 2, 32)
    on_cpu = headq_kernels.quantize_affine(x.cpu(), 2, 32)
    assert calls == [1]
    for g, c in zip(on_gpu, on_cpu, strict=True):
        assert torch.equal(g.cpu(), c)


# --- fused decode attention against the reference path --------------------------------------------


class _Attn(torch.nn.Module):
    training = False


def _config(hq: int, hkv: int, d: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
        num_hidden_layers=1, intermediate_size=64, vocab_size=64,
    )  # fmt: skip


def _masks(pads: list[int], n: int, total: int) -> torch.Tensor:
    """(b, 1, n, total) bool: causal over the last n positions, left padding per row."""
    pos = torch.arange(total, device=CUDA)
    query = torch.arange(total - n, total, device=CUDA)
    pad = torch.tensor(pads, device=CUDA)
    mask = (pos[None, None, :] <= query[None, :, None]) & (pos[None, None, :] >= pad[:, None, None])
    return mask[:, None]


def _run_pair(
    monkeypatch,
    keys: str,
    values: str,
    *,
    b: int,
    hq: int,
    hkv: int,
    d: int,
    prefix: int,
    steps: int,
    window: int,
    sinks: int,
    dtype: torch.dtype,
    pads: list[int] | None = None,
    kernel_steps: int | None = None,
) -> list[float]:
    """Identical caches, one attended by the reference and one by the kernel; per-step errors.

    Float16 KIVI keys (2 or 4 bits, HeadQ's base included) with KIVI values of 2 or 4 bits, or A²
    values of those widths, must run on the folded kernel wherever both are encoded, and nothing
    else may.
    """
    config = _config(hq, hkv, d)
    calibration = calibration_for(keys, values, config, tokens=512)
    caches = [
        QuantizedKVCache(keys, values, window=window, sinks=sinks, config=config, calibration=calibration)
        for _ in range(2)
    ]
    pads = pads or [0] * b
    scaling = d**-0.5
    module = _Attn()
    calls: list[int] = []
    real = triton_decode.attend
    affine_pairs: list[bool] = []  # per call: whether the plan has a launch of affine keys with affine values

    def attend(q, plan, **kwargs):
        calls.append(1)
        affine_pairs.append(any(k == AFFINE and v in (AFFINE, MIXED) for k, v, _ in plan.launches))
        return real(q, plan, **kwargs)

    monkeypatch.setattr(triton_decode, "attend", attend)
    folded: list[int] = []
    real_folded = triton_decode._attend_folded
    monkeypatch.setattr(triton_decode, "_attend_folded", lambda *a: folded.append(1) or real_folded(*a))
    errors = []
    total = 0
    for step in range(steps + 1):
        n = prefix if step == 0 else 1
        k = outliers((b, hkv, n, d), seed=10 * step + 1, dtype=dtype)
        v = outliers((b, hkv, n, d), seed=10 * step + 2, dtype=dtype)
        q = outliers((b, hq, n, d), seed=10 * step + 3, dtype=dtype)
        total += n
        mask = _masks(pads, n, total)
        outs = []
        for cache, use_kernel in zip(caches, (False, True), strict=True):
            monkeypatch.setenv(fused_module.ENV, "1" if use_kernel else "0")
            tagged, vv = cache.update(k, v, 0)
            outs.append(headq_attention(module, q, tagged, vv, mask, scaling)[0])
        if step:
            ref, got = outs
            live = torch.tensor([p < total for p in pads], device=CUDA)
            assert torch.isfinite(got).all()
            errors.append(rel(got[live], ref[live]))
    expected = steps if kernel_steps is None else kernel_steps
    assert len(calls) == expected, (
        "the fused kernel did not run" if not calls and expected else f"{len(calls)} kernel calls"
    )
    foldable = dtype == torch.float16 and _fold_bits(keys, "kivi", "headq") and _fold_values(values)
    assert bool(folded) == (foldable and any(affine_pairs)), f"{len(folded)} folded launches"
    ref_stats, got_stats = (cache.quantized_layers()[0].sq_attention for cache in caches)
    if ref_stats is not None:  # the value policy's attention statistics, from the kernel's probabilities
        assert got_stats is not None and rel(got_stats, ref_stats) < TOLERANCE[dtype]
    return errors


def _fold_bits(spec: str, *methods: str) -> bool:
    """Whether a spec is one of ``methods`` at 2 or 4 bits (HeadQ's base: KIVI-2 by default)."""
    parsed = parse_spec(spec)
    return parsed.name in methods and parsed.get("bits") in (None, "2", "4")


def _fold_values(spec: str) -> bool:
    """KIVI values at 2 or 4 bits, or A² tiers whose widths are 2 or 4 bits."""
    parsed = parse_spec(spec)
    if parsed.name == "a2":
        widths = {parsed.get("bits") or "2", parsed.get("hi") or "4"}
        return parsed.get("mode") != "greedy" and widths <= {"2", "4"}
    return _fold_bits(spec, "kivi")


CASES = [
    ("kivi:bits=2", "kivi:bits=2"),
    ("kivi:bits=4,group=64", "kivi:bits=4"),
    ("kivi:bits=1", "kivi:bits=8,group=64"),
    ("kivi:bits=8", "kivi:bits=1"),
    ("kivi:bits=2", "fp16"),
    ("fp16", "kivi:bits=2"),
    ("fp16", "fp16"),
    ("headq", "kivi:bits=2"),
    ("headq:rank=16,zbits=2", "fp16"),
    # HeadQ on the folded kernel: side codes of 8, 2 and 1 bits, on 2- and 4-bit keys
    ("headq:rank=5,zbits=8", "kivi:bits=2"),
    ("headq:base=(kivi:bits=4,group=32),rank=16,zbits=2", "kivi:bits=4"),
    ("headq:rank=8,zbits=1", "kivi:bits=2"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("keys", "values"), CASES)
def test_decode_matches_reference_per_layout(monkeypatch, keys: str, values: str, dtype: torch.dtype) -> None:
    exact = keys == values == "fp16"  # an exact cache decodes through SDPA, not the kernel
    errors = _run_pair(
        monkeypatch, keys, values, b=2, hq=8, hkv=2, d=64, prefix=95, steps=3, window=0, sinks=0, dtype=dtype,
        kernel_steps=0 if exact else None,
    )  # fmt: skip
    assert max(errors) < TOLERANCE[dtype], errors


@pytest.mark.parametrize(
    ("hq", "hkv", "d"),
    [(32, 8, 128), (8, 1, 128), (4, 4, 256), (12, 3, 64)],
    ids=["gqa", "mqa", "mha256", "g4d64"],
)
@pytest.mark.parametrize(
    ("prefix", "window", "sinks"),
    # R = 32: the window holds R-1 tokens and nothing is encoded, or R+G-1 and the next step flushes;
    # R = 0: it holds 0 or 1 token; sinks with a short window; a step that starts a second block
    [(31, 32, 0), (63, 32, 0), (96, 0, 0), (97, 0, 0), (130, 5, 4), (1100, 0, 0)],
)
def test_decode_matches_reference_on_awkward_shapes(monkeypatch, hq, hkv, d, prefix, window, sinks) -> None:
    errors = _run_pair(
        monkeypatch, "kivi:bits=2", "kivi:bits=2", b=3, hq=hq, hkv=hkv, d=d, prefix=prefix, steps=3,
        window=window, sinks=sinks, dtype=torch.float16, pads=[0, 7, 40],
        # 31 tokens in a 32-token window: nothing is encoded until it overflows, values then leave
        # one token at a time (encoded before the attention), so steps 2 and 3 find a block to read
        kernel_steps=3 if prefix > window + sinks else 2,
    )  # fmt: skip
    assert max(errors) < TOLERANCE[torch.float16], errors


NEW_LAYOUTS = [
    ("kivi:bits=2", "a2"),
    ("headq", "a2:chunk=128,frac=0.25"),
    ("kivi:bits=4", "a2:bits=4"),
    ("headq", "a2:mode=greedy,avg=3,bits=1,hi=8,weight=abs"),
    ("fp16", "a2:chunk=64"),
    ("gsrq", "gsrq"),
    ("gsrq:bits=2,scale=fisher", "kivi:bits=2"),
    ("kivi:bits=2", "gsrq:bits=0.75,scale=fisher"),
    # headq-baselines: float8 and per-token-head integers (scaled tokens), rotated tokens
    ("fp8", "fp8"),
    ("fp8:format=e5m2,scale=none", "int:bits=4"),
    ("int", "rotation:bits=2.5"),
    ("rotation:bits=3.5", "fp8:format=e5m2"),
    ("rotation", "a2"),
    ("int:bits=4", "kivi:bits=2"),
    ("kivi:bits=2", "rotation:bits=4"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(("keys", "values"), NEW_LAYOUTS)
def test_decode_matches_reference_on_mixed_width_and_codebook_layouts(
    monkeypatch, keys, values, d, dtype
) -> None:
    """A² values (their statistics included), GSRQ codebooks and the engine formats, with sinks and
    a short window."""
    errors = _run_pair(
        monkeypatch, keys, values, b=3, hq=8, hkv=2, d=d, prefix=161, steps=3, window=4, sinks=2, dtype=dtype,
        pads=[0, 7, 40],
    )  # fmt: skip
    assert max(errors) < TOLERANCE[dtype], errors


def test_a_step_that_encodes_its_own_token_runs_on_the_reference(monkeypatch) -> None:
    """A² with no window: the step whose flush takes its own token must see its own statistic first."""
    errors = _run_pair(
        monkeypatch, "kivi:bits=2", "a2", b=2, hq=4, hkv=2, d=64, prefix=95, steps=3, window=0, sinks=0,
        dtype=torch.float16, kernel_steps=2,  # token 96 completes a chunk of 32; 97 and 98 do not
    )  # fmt: skip
    assert max(errors) < TOLERANCE[torch.float16], errors


def test_layouts_the_kernel_does_not_know_run_on_the_reference(monkeypatch) -> None:
    """A² rows that span every KV head of a layer: the kernel knows one row per head only."""
    with pytest.raises(AssertionError, match="did not run"):
        _run_pair(
            monkeypatch, "kivi:bits=2", "a2:scope=layer", b=1, hq=4, hkv=2, d=64, prefix=70, steps=2, window=0,
            sinks=0, dtype=torch.float16,
        )  # fmt: skip


@pytest.mark.parametrize(("spec", "vector"), [("gsrq", 16), ("gsrq:bits=2", 16), ("gsrq:bits=0.75", 0)])
def test_codebook_indices_read_as_vectors_only_where_aligned(spec: str, vector: int) -> None:
    """Whole-byte GSRQ indices on a vector boundary are read a token at a time; the same indices one
    byte off, or 6-bit ones, one byte per sub-vector and stage: every way gives the same attention."""
    hq, hkv, d, tokens = 8, 2, 128, 300
    config = _config(hq, hkv, d)
    calibration = calibration_for(spec, spec, config, tokens=512)
    registry = get_registry()
    km, vm = registry.key_quantizer(spec), registry.value_policy(spec)
    km.bind(config, calibration)
    vm.bind(config, calibration)
    k = outliers((2, hkv, tokens, d), 1, torch.float16)
    v = outliers((2, hkv, tokens, d), 2, torch.float16)
    kseg = km.encode(k, 0).kernel_segment(tokens)
    vseg = vm.encode(v, 0).kernel_segment(tokens)

    def shifted(seg):  # the same bytes, one byte past an aligned start
        buf = torch.empty(seg.indices.numel() + 1, dtype=torch.uint8, device=CUDA)
        moved = buf[1:].view(seg.indices.shape)
        moved.copy_(seg.indices)
        return dataclasses.replace(seg, indices=moved)

    q = outliers((2, hkv, hq // hkv, d), 3, torch.float16)
    plans = [
        decode_plan.plan([ks], [vs], batch_heads=2 * hkv, block_n=128)
        for ks, vs in ((kseg, vseg), (shifted(kseg), shifted(vseg)))
    ]
    assert [triton_decode._book(p, keys=True)[5] for p in plans] == [vector, 0]
    assert [triton_decode._book(p, keys=False)[5] for p in plans] == [vector, 0]
    aligned, off = (triton_decode.attend(q, p, scale=d**-0.5) for p in plans)
    reference = decode_plan.attend_torch(q, plans[0], scale=d**-0.5)
    assert torch.equal(aligned, off)
    assert rel(aligned, reference) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("spec", ["gsrq", "gsrq:bits=2,scale=fisher", "gsrq:bits=0.75"])
@pytest.mark.parametrize(("hq", "hkv"), [(2, 2), (6, 2), (16, 2)], ids=["g1", "g3", "g8"])
def test_codebook_keys_are_scored_from_the_query_tables(spec: str, hq: int, hkv: int) -> None:
    """Codebook keys' logits are sums of the query's table entries (one per sub-vector and stage),
    at any count of query heads per KV head (padded to a power of two in the tables), from 32-bit
    words of whole-byte indices or from 6-bit ones; two segments with other codebooks are refused."""
    d, tokens = 128, 300
    config = _config(hq, hkv, d)
    calibration = calibration_for(spec, spec, config, tokens=512)
    km = get_registry().key_quantizer(spec)
    km.bind(config, calibration)
    vm = get_registry().value_policy("kivi:bits=2")
    vm.bind(config, calibration)
    kseg = km.encode(outliers((2, hkv, tokens, d), 4, torch.float16), 0).kernel_segment(tokens)
    vseg = vm.encode(outliers((2, hkv, tokens, d), 5, torch.float16), 0).kernel_segment(tokens)
    q = outliers((2, hkv, hq // hkv, d), 6, torch.float16)
    plan = decode_plan.plan([kseg], [vseg], batch_heads=2 * hkv, block_n=128)
    got = triton_decode.attend(q, plan, scale=d**-0.5)
    assert rel(got, decode_plan.attend_torch(q, plan, scale=d**-0.5)) < TOLERANCE[torch.float16]

    other = dataclasses.replace(kseg, books=tuple(book.clone() for book in kseg.books))
    both = decode_plan.plan([kseg, other], [vseg, vseg], batch_heads=2 * hkv, block_n=128)
    with pytest.raises(ValueError, match="share their codebooks"):
        triton_decode.attend(q, both, scale=d**-0.5)


@pytest.mark.parametrize(
    ("keys", "values", "tolerance"),
    # A²'s widths follow the attention the kernel computes (float16 operands on the folded kernel):
    # a token near the cut between widths may take the other one
    [("kivi:bits=2", "kivi:bits=2", 5e-3), ("kivi:bits=2", "a2", 1e-2)],
)
def test_harness_perplexity_is_the_same_on_the_kernel_and_reference_paths(
    monkeypatch, keys, values, tolerance
) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, attn_implementation="headq",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(CUDA, torch.float16).eval()
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 256, (160,), generator=gen) for _ in range(2)]
    windowing = Windowing(prefix=96, scored=64, windows=2, batch=2)
    settings = CacheSettings(keys, values, window=8, sinks=2)
    calls: list[int] = []
    real = triton_decode.attend
    monkeypatch.setattr(triton_decode, "attend", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(fused_module.ENV, "0")
    reference = perplexity(model, windows, settings, windowing, mode="stream").ppl
    assert not calls
    monkeypatch.setenv(fused_module.ENV, "1")
    kernel = perplexity(model, windows, settings, windowing, mode="stream").ppl
    assert len(calls) == 2 * 63  # every decode step of both layers
    assert math.isfinite(kernel) and abs(kernel / reference - 1) < tolerance, (kernel, reference)
