"""Multi-token passes in bounded memory: the tiled path equals the materialized oracle, tile by
tile, chunk by chunk, for every method pairing, flush rule, mask and streaming mode, and never
builds anything the size of the full logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig

from headq_core import QuantizedKVCache, attention, cache_kwargs, fused, prefill, tiled
from headq_core.attention import headq_attention
from headq_core.reference import attend_reference, row_mask
from headq_core.testing.calibration import calibration_for

B, HQ, HKV, D = 3, 4, 2, 16
CONFIG = LlamaConfig(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                     num_hidden_layers=1, intermediate_size=32, vocab_size=32)  # fmt: skip

CASES = [  # keys, values, window, sinks
    ("kivi:bits=2", "kivi:bits=2", 0, 0),
    ("kivi:bits=2,group=16", "kivi:bits=4", 5, 2),
    ("fp16", "kivi:bits=2", 3, 0),
    ("kivi:bits=2", "fp16", 0, 3),
    ("headq", "kivi:bits=2", 8, 0),
    ("headq:rank=16,zbits=2", "a2", 4, 2),
    ("kivi:bits=2", "a2:mode=greedy,avg=3,bits=2,hi=8,weight=abs", 0, 0),
    ("gsrq", "gsrq:bits=0.75", 3, 1),
    ("fp16", "fp16", 0, 2),
]


class _Attn(torch.nn.Module):
    training = False


def _mask(pads: list[int], n: int, total: int) -> torch.Tensor:
    pos, query = torch.arange(total), torch.arange(total - n, total)
    mask = (pos[None, None, :] <= query[None, :, None]) & (
        pos[None, None, :] >= torch.tensor(pads)[:, None, None]
    )
    return mask[:, None]


def _reference(cache: QuantizedKVCache, q, k, v, mask, scaling, softcap) -> torch.Tensor:
    layer = cache.quantized_layers()[0] if cache.quantized_layers() else None
    start = 0 if layer is None else layer.length
    cache.update(k, v, 0)
    layer = cache.quantized_layers()[0]
    n = q.shape[-2]
    rows = row_mask(mask, HQ // HKV, n, start, start + n, q.device)
    out, _ = attend_reference(
        layer, layer.begin_step(mask), q.reshape(B, HKV, HQ // HKV * n, D), rows, scaling, softcap
    )
    return out.reshape(B, HQ, n, D).transpose(1, 2)


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of a few tokens and chunks of a few queries, so that every boundary is crossed."""
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", B * HKV * 2 * 5 * 16)  # 5 queries x 16 tokens per tile
    monkeypatch.setattr(tiled, "MIN_TILE", 16)
    monkeypatch.setattr(fused, "decode", lambda *args: None)  # decode steps on the tiled path too


@pytest.mark.parametrize(("keys", "values", "window", "sinks"), CASES)
@pytest.mark.parametrize("mode", ["serving", "serving-tiled", "emulated"])
@pytest.mark.parametrize("padded", [False, True])
def test_multi_token_passes_equal_the_materialized_oracle(
    monkeypatch, small_tiles, keys: str, values: str, window: int, sinks: int, mode: str, padded: bool
) -> None:
    """Serving passes through the dispatch (SDPA over the tokens as read where it applies) and
    with every pass forced onto the tiled path; emulated streaming (always tiled)."""
    if mode == "serving-tiled":
        monkeypatch.setattr(attention, "_as_read", lambda *args: None)
    emulate = mode == "emulated"
    calibration = calibration_for(keys, values, CONFIG, tokens=256)
    caches = [
        QuantizedKVCache(
            keys,
            values,
            window=window,
            sinks=sinks,
            config=CONFIG,
            calibration=calibration,
            emulate_streaming=emulate,
        )
        for _ in range(2)
    ]
    gen = torch.Generator().manual_seed(len(keys) + window)
    pads = [0, 7, 40] if padded else [0, 0, 0]
    total = 0
    softcap = 30.0 if keys == "kivi:bits=2,group=16" else None  # Gemma-2 style logit softcapping
    for n in (70, 37, 1, 1, 50, 1):  # a prompt, chunks of a longer one, decode steps
        k, v, q = (torch.randn(B, h, n, D, generator=gen) * 2 for h in (HKV, HKV, HQ))
        total += n
        mask = _mask(pads, n, total) if padded else None
        want = _reference(caches[0], q, k, v, mask, D**-0.5, softcap)
        got = headq_attention(_Attn(), q, *caches[1].update(k, v, 0), mask, D**-0.5, softcap=softcap)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ref, new = (cache.quantized_layers()[0] for cache in caches)
    for a, b in zip(ref.decoded(), new.decoded(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # the same tokens stored
    if ref.sq_attention is not None and ref.sq_attention.numel():  # the same statistic for the policy
        assert new.sq_attention is not None and ref.sq_attention.abs().sum() > 0
        torch.testing.assert_close(new.sq_attention, ref.sq_attention, rtol=1e-5, atol=1e-7)


class _Largest(TorchDispatchMode):
    """The largest tensor any operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize(("keys", "values"), [("kivi:bits=2", "kivi:bits=2"), ("headq", "a2")])
def test_a_long_pass_never_builds_the_full_logits(monkeypatch, keys: str, values: str) -> None:
    """A 400-token chunk over a 1,200-token cache: (b, hkv, g·n, T) would be 3.8M floats; no
    tensor the tiled pass makes comes near (it stays within a few tiles and the inputs' size)."""
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 1 << 14)
    monkeypatch.setattr(tiled, "MIN_TILE", 64)
    calibration = calibration_for(keys, values, CONFIG, tokens=256)
    cache = QuantizedKVCache(keys, values, window=32, config=CONFIG, calibration=calibration)
    gen = torch.Generator().manual_seed(5)
    cache.store(0, *(torch.randn(B, HKV, 800, D, generator=gen) for _ in range(2)))
    k, v, q = (torch.randn(B, h, 400, D, generator=gen) for h in (HKV, HKV, HQ))
    cache.update(k, v, 0)
    layer = cache.quantized_layers()[0]
    step = layer.begin_step()
    grouped = q.reshape(B, HKV, HQ // HKV * 400, D)
    with _Largest() as largest:
        out = tiled.attend_tiled(layer, step, grouped, None, D**-0.5, None)
    full = B * HKV * (HQ // HKV) * 400 * 1200
    inputs = max(grouped.numel(), k.numel() * 3)  # the queries, the output, the pass's tokens
    assert largest.numel <= max(8 * tiled.TILE_ELEMENTS, inputs), (largest.numel, full)
    assert largest.numel * 20 < full
    assert out.shape == grouped.shape and bool(torch.isfinite(out).all())


def test_a_prompt_into_an_empty_cache_is_sdpa(monkeypatch) -> None:
    """Nothing read encoded and no statistic: SDPA, never the tiled path, and the oracle's answer."""
    monkeypatch.setattr(attention, "attend_tiled", lambda *a: pytest.fail("the tiled path ran"))
    caches = [QuantizedKVCache("kivi:bits=2", "kivi:bits=2", window=4, config=CONFIG) for _ in range(2)]
    gen = torch.Generator().manual_seed(2)
    k, v, q = (torch.randn(B, h, 90, D, generator=gen) for h in (HKV, HKV, HQ))
    mask = _mask([0, 3, 11], 90, 90)
    want = _reference(caches[0], q, k, v, mask, D**-0.5, None)
    got = headq_attention(_Attn(), q, *caches[1].update(k, v, 0), mask, D**-0.5)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layer = caches[1].quantized_layers()[0]
    assert (layer.k.encoded, layer.v.encoded) == (64, 86)  # stored encoded all the same (values per token)


def test_the_window_does_not_keep_a_prompt_sized_buffer() -> None:
    cache = QuantizedKVCache("kivi:bits=2", "kivi:bits=2", window=16, config=CONFIG)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randn(B, HKV, 4000, D, generator=gen)
    cache.store(0, prompt, prompt)
    exact_bytes = 2 * prompt.numel() * prompt.element_size()
    assert cache.reserved_nbytes() < exact_bytes / 5  # 2-bit codes, scales and a small window


# --- chunked prefill through real (tiny) models ---------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma"])
@pytest.mark.parametrize("padded", [False, True])
def test_a_prompt_fed_in_chunks_reads_as_one_pass_over_an_exact_cache(
    small_tiles, make_model, make_ids, arch, padded
) -> None:
    """fp16/fp16 stores every token exact: chunks of 23 give the one-pass logits, left padding
    included (without it, no mask is built: the attention applies the causal rule itself)."""
    model = make_model(arch, attn="headq")
    ids = make_ids(2, 100, seed=1)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :9] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        whole = model(
            ids,
            attention_mask=mask,
            position_ids=positions,
            **cache_kwargs(model, QuantizedKVCache(config=model.config)),
        ).logits
    seen: list[torch.Tensor] = []
    cache = QuantizedKVCache(config=model.config)
    last = prefill(
        model, ids, cache, chunk=23, attention_mask=mask, on_logits=lambda start, lg: seen.append(lg)
    )
    torch.testing.assert_close(torch.cat(seen, dim=1), whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, whole[:, -1], rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 100


def test_chunking_does_not_change_an_emulated_streaming_pass(small_tiles, make_model, make_ids) -> None:
    """With emulate_streaming each query reads every earlier token as streaming leaves it, so the
    chunk size is invisible: KIVI-2 logits and stored tokens equal the one-pass ones."""
    model = make_model("llama", attn="headq")
    ids = make_ids(2, 120, seed=2)
    out = []
    for chunk in (120, 17, 1):
        cache = QuantizedKVCache("kivi:bits=2,group=16", "kivi:bits=2", window=8, sinks=2, config=model.config,
                                 emulate_streaming=True)  # fmt: skip
        seen: list[torch.Tensor] = []
        prefill(model, ids, cache, chunk=chunk, on_logits=lambda start, lg, seen=seen: seen.append(lg))
        out.append((torch.cat(seen, dim=1), cache.quantized_layers()[0].decoded()[0]))
    for logits, keys in out[1:]:
        torch.testing.assert_close(logits, out[0][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(keys, out[0][1], rtol=1e-5, atol=1e-5)


def test_prefill_refuses_a_mask_that_leaves_out_the_cached_tokens(make_model, make_ids) -> None:
    model = make_model("llama", attn="headq")
    cache = QuantizedKVCache(config=model.config)
    prefill(model, make_ids(1, 10), cache, chunk=4)
    with pytest.raises(ValueError, match="cover the 10 cached tokens"):
        prefill(model, make_ids(1, 5), cache, chunk=4, attention_mask=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="positive int"):
        prefill(model, make_ids(1, 5), cache, chunk=0)


def test_the_mask_is_left_out_where_it_is_the_causal_rule() -> None:
    from transformers.masking_utils import causal_mask_function

    from headq_core.attention import headq_mask

    args = {"batch_size": 2, "q_length": 8, "kv_length": 40, "q_offset": 32, "kv_offset": 0,
            "mask_function": causal_mask_function, "allow_is_causal_skip": True}  # fmt: skip
    assert headq_mask(**args, attention_mask=None) is None
    assert headq_mask(**args, attention_mask=torch.ones(2, 40, dtype=torch.bool)) is None
    padding = torch.ones(2, 40, dtype=torch.bool)
    padding[1, :3] = False
    mask = headq_mask(**args, attention_mask=padding)
    assert mask is not None and mask.shape == (2, 1, 8, 40) and not mask[1, 0, :, :3].any()
