"""The decode runtime on a GPU: no device-to-host sync in a step, no compilation after warm-up,
non-finite tokens caught without a sync (skipped without CUDA and Triton)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
pytest.importorskip("triton")

from transformers import LlamaConfig  # noqa: E402

from headq_core import CacheStateError, QuantizedKVCache  # noqa: E402
from headq_core.attention import headq_attention  # noqa: E402
from headq_core.testing.calibration import calibration_for  # noqa: E402
from headq_kernels import compiled_kernels  # noqa: E402

CUDA = torch.device("cuda")
HQ, HKV, D = 8, 2, 128


class _Attn(torch.nn.Module):
    training = False


def _cache(keys: str, values: str, layers: int = 2, window: int = 32) -> QuantizedKVCache:
    config = LlamaConfig(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                         num_hidden_layers=layers, intermediate_size=64, vocab_size=64)  # fmt: skip
    calibration = calibration_for(keys, values, config, tokens=512)
    return QuantizedKVCache(keys, values, window=window, config=config, calibration=calibration)


def _step(cache: QuantizedKVCache, mask: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """One decode step of every layer: update, then the headq attention."""
    b = 3
    out = None
    for layer in range(len(cache.layers)):
        k, v = (
            torch.randn((b, HKV, 1, D), generator=gen, device=CUDA, dtype=torch.float16) for _ in range(2)
        )
        q = torch.randn((b, HQ, 1, D), generator=gen, device=CUDA, dtype=torch.float16)
        key, value = cache.update(k, v, layer)
        out = headq_attention(_Attn(), q, key, value, mask, D**-0.5)[0]
    assert out is not None
    return out


def _prefill(cache: QuantizedKVCache, tokens: int) -> None:
    gen = torch.Generator(device=CUDA).manual_seed(0)
    for layer in range(len(cache.layers)):
        k, v = (
            torch.randn((3, HKV, tokens, D), generator=gen, device=CUDA, dtype=torch.float16)
            for _ in range(2)
        )
        cache.store(layer, k, v)


def _mask(total: int, padded: bool) -> torch.Tensor | None:
    """(b, 1, 1, total) bool of a decode step: row 1 left-padded by 7 tokens, row 2 by 40."""
    if not padded:
        return None
    pad = torch.tensor([0, 7, 40], device=CUDA)
    return (torch.arange(total, device=CUDA)[None, :] >= pad[:, None])[:, None, None, :]


@contextmanager
def _no_sync():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


PAIRS = [
    ("kivi:bits=2", "kivi:bits=2"),  # the folded kernel
    ("headq", "a2"),  # side codes, mixed widths and the statistic from the kernel
    ("gsrq", "kivi:bits=4"),  # codebook keys on the generic kernel
    ("fp16", "fp16"),  # SDPA over the exact buffers
]


@pytest.mark.parametrize(("keys", "values"), PAIRS)
@pytest.mark.parametrize("padded", [False, True])
def test_decode_steps_make_no_device_to_host_sync(keys: str, values: str, padded: bool) -> None:
    """40 steps (a key group flushed, values flushed every step) under sync debug mode 'error'."""
    cache = _cache(keys, values)
    prefill = 300
    _prefill(cache, prefill)
    gen = torch.Generator(device=CUDA).manual_seed(1)
    for i in range(3):  # warm-up: the kernels compile (compilation may synchronize)
        _step(cache, _mask(prefill + i + 1, padded), gen)
    total = prefill + 3
    masks = [_mask(total + i + 1, padded) for i in range(40)]  # made before: transformers' work
    with _no_sync():
        for mask in masks:
            out = _step(cache, mask, gen)
    assert bool(torch.isfinite(out).all())
    assert cache.get_seq_length() == total + 40


@pytest.mark.parametrize(("keys", "values"), [("kivi:bits=2", "kivi:bits=2"), ("kivi:bits=2", "a2")])
def test_no_kernel_compiles_over_a_thousand_steps_after_warm_up(keys: str, values: str) -> None:
    """The context grows by 1,000 tokens (split lengths, mask strides and counts change): nothing
    the kernels are specialized on does."""
    cache = _cache(keys, values, layers=1)
    prefill = 1500
    _prefill(cache, prefill)
    gen = torch.Generator(device=CUDA).manual_seed(2)
    for i in range(40):
        _step(cache, _mask(prefill + i + 1, True), gen)
    before = compiled_kernels()
    for i in range(40, 1040):
        _step(cache, _mask(prefill + i + 1, True), gen)
    torch.cuda.synchronize()
    assert compiled_kernels() == before


def test_a_non_finite_token_is_caught_a_pass_later_without_a_sync() -> None:
    cache = _cache("kivi:bits=2", "kivi:bits=2", layers=2)
    _prefill(cache, 200)
    gen = torch.Generator(device=CUDA).manual_seed(3)
    _step(cache, None, gen)
    k = torch.randn((3, HKV, 1, D), device=CUDA, dtype=torch.float16)
    k[1, 0, 0, 5] = float("nan")
    with _no_sync():  # stored without a sync, and without an error yet
        for layer in range(2):
            key, value = cache.update(k if layer == 1 else torch.zeros_like(k), torch.zeros_like(k), layer)
            headq_attention(
                _Attn(), torch.ones((3, HQ, 1, D), device=CUDA, dtype=torch.float16), key, value, None, 1.0
            )
    with pytest.raises(
        CacheStateError, match=r"layer 1: keys hold nan at batch 1, kv head 0, position 201, channel 5"
    ):
        cache.check_finite()
    torch.cuda.synchronize()  # as generate does between steps
    with pytest.raises(CacheStateError, match="layer 1"):
        _step(cache, None, gen)


def _long_pass(keys: str, values: str, stored: int, n: int) -> tuple:
    """A chunk of ``n`` tokens over ``stored`` ones through the headq attention: the layer, its
    state before the chunk, the chunk, the output and the peak memory the attention added."""
    cache = _cache(keys, values, layers=1, window=128)
    _prefill(cache, stored)
    gen = torch.Generator(device=CUDA).manual_seed(4)
    k, v = (torch.randn((3, HKV, n, D), generator=gen, device=CUDA, dtype=torch.float16) for _ in range(2))
    q = torch.randn((3, HQ, n, D), generator=gen, device=CUDA, dtype=torch.float16)
    layer = cache.quantized_layers()[0]
    before = layer._snapshot()
    key, value = cache.update(k, v, 0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = headq_attention(_Attn(), q, key, value, None, D**-0.5)[0]
    torch.cuda.synchronize()
    return cache, layer, before, (k, v, q), out, torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize(("keys", "values"), [("kivi:bits=2", "kivi:bits=2"), ("headq:rank=8", "a2")])
def test_a_long_chunk_over_a_long_cache_runs_in_bounded_memory(keys: str, values: str) -> None:
    """A 4k-token chunk over 16k stored tokens in half precision: the materialized logits would be
    3 x 8 heads x 4k x 20k float32 (7.5 GiB); the pass stays far below."""
    from headq_core import tiled

    *_, extra = _long_pass(keys, values, 16384, 4096)
    full = 3 * HQ * 4096 * (16384 + 4096) * 4
    assert extra < full / 4, f"{extra / 2**30:.2f} GiB extra for {full / 2**30:.2f} GiB of logits"
    assert (
        extra < 12 * tiled.TILE_ELEMENTS * 4 + 16 * 3 * HQ * 4096 * D
    )  # a few tiles, float copies of q and out


@pytest.mark.parametrize(("keys", "values"), [("kivi:bits=2", "kivi:bits=2"), ("headq:rank=8", "a2")])
def test_a_long_chunk_on_the_gpu_equals_the_materialized_oracle(keys: str, values: str) -> None:
    """The statistic a value policy keeps, and the output where no statistic decides how values
    are stored (A² ranks tokens by it: float rounding may flip a near tie, and a token's width)."""
    from headq_core.reference import attend_reference, row_mask

    stored, n = 4096, 1024
    cache, layer, before, (k, v, q), out, _ = _long_pass(keys, values, stored, n)
    statistic = layer.sq_attention
    layer._restore(before)
    cache.update(k, v, 0)
    causal = row_mask(None, HQ // HKV, n, stored, stored + n, CUDA)
    grouped = q.float().reshape(3, HKV, HQ // HKV * n, D)
    ref, _ = attend_reference(layer, layer.begin_step(), grouped, causal, D**-0.5, None)
    if statistic is not None:
        assert layer.sq_attention is not None and statistic.abs().sum() > 0
        torch.testing.assert_close(statistic, layer.sq_attention, rtol=1e-3, atol=1e-6)
    else:
        want = ref.reshape(3, HQ, n, D).transpose(1, 2)
        torch.testing.assert_close(out.float(), want, rtol=2e-3, atol=2e-3)
