"""The quantized cache inside real (tiny) transformers models of six architectures.

With exact (``fp16``) methods the ``headq`` path must reproduce the plain model; with KIVI it must
store encoded blocks through ``generate``, greedy and beam search, and never fall back silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from headq_core import CacheStateError, QuantizedKVCache, get_registry
from headq_core.compat import cache_kwargs
from headq_core.layouts import AffineBlock

ModelFactory = Callable[..., Any]
IdsFactory = Callable[..., torch.Tensor]

KIVI = "kivi" in get_registry().names("key")
needs_kivi = pytest.mark.skipif(not KIVI, reason="headq-kivi not installed")
pytestmark = pytest.mark.usefixtures("no_grad")


def _headq(model: Any) -> Any:
    model.set_attn_implementation("headq")
    return model


def _fp16_cache(model: Any, **kwargs: Any) -> QuantizedKVCache:
    return QuantizedKVCache("fp16", "fp16", config=model.config, **kwargs)


def _kv_geometry(model: Any) -> tuple[int, int]:
    text = model.config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return kv_heads, head_dim


def test_architectures_cover_gqa_and_mqa(arch: str, make_model: ModelFactory) -> None:
    model = make_model(arch)
    kv_heads, head_dim = _kv_geometry(model)
    assert head_dim == 16
    expected = {"llama": 2, "gemma": 2, "qwen2": 1, "gpt2": 4, "gpt_neox": 4, "gemma3": 1}
    assert kv_heads == expected[arch]
    cache = _fp16_cache(_headq(model))
    model(torch.ones(1, 3, dtype=torch.long), **cache_kwargs(model, cache), use_cache=True)
    keys, _ = cache.quantized_layers()[0].decoded()
    assert keys.shape == (1, kv_heads, 3, head_dim)


def test_prefill_matches_plain_model(arch: str, make_model: ModelFactory, make_ids: IdsFactory) -> None:
    model = make_model(arch)
    ids = make_ids(2, 24, seed=1)
    want = model(ids, use_cache=False).logits
    cache = _fp16_cache(_headq(model))
    got = model(ids, **cache_kwargs(model, cache), use_cache=True).logits
    assert cache.get_seq_length() == 24
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [(8, *[1] * 16), (5, 4, 1, 7, 1, 1, 5)], ids=["decode", "chunked"])
def test_decode_matches_plain_model(
    arch: str, chunks: tuple[int, ...], make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    model = make_model(arch)
    ids = make_ids(2, sum(chunks), seed=2)
    want = model(ids, use_cache=False).logits
    cache = _fp16_cache(_headq(model))
    got, start = [], 0
    for n in chunks:
        out = model(ids[:, start : start + n], **cache_kwargs(model, cache), use_cache=True)
        got.append(out.logits)
        start += n
    assert cache.get_seq_length() == start
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-5, atol=1e-5)


def test_fp16_generate_matches_plain_generate(
    arch: str, make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    model = make_model(arch)
    ids = make_ids(2, 6, seed=3)
    settings: dict[str, Any] = {"max_new_tokens": 12, "do_sample": False}
    greedy = model.generate(ids, **settings)
    beams = model.generate(ids, num_beams=2, **settings)
    _headq(model)
    assert torch.equal(model.generate(ids, **cache_kwargs(model, _fp16_cache(model)), **settings), greedy)
    cache = _fp16_cache(model)
    assert torch.equal(model.generate(ids, num_beams=2, **cache_kwargs(model, cache), **settings), beams)
    assert cache.quantized_layers()[0].decoded()[0].shape[0] == 2 * 2  # beams live in the batch axis


def _fp16_bytes(cache: QuantizedKVCache) -> int:
    return sum(2 * 2 * keys.numel() for keys, _ in (layer.decoded() for layer in cache.quantized_layers()))


@needs_kivi
@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("window", [0, 8])
def test_kivi_generate(
    arch: str, window: int, beams: int, make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    model = make_model(arch)
    batch, prompt, new = 2, 8, 72
    ids = make_ids(batch, prompt, seed=4)
    plain = model.generate(
        ids,
        max_new_tokens=new,
        do_sample=False,
        num_beams=beams,
        output_scores=True,
        return_dict_in_generate=True,
    )
    _headq(model)
    cache = QuantizedKVCache("kivi:bits=4", "kivi:bits=4", window=window, config=model.config)
    out = model.generate(
        ids,
        **cache_kwargs(model, cache),
        max_new_tokens=new,
        do_sample=False,
        num_beams=beams,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (batch, prompt + new)
    assert torch.equal(out.sequences[:, :prompt], ids)
    length = prompt + new - 1  # the last token is never fed back
    kv_heads, head_dim = _kv_geometry(model)
    for layer in cache.quantized_layers():
        assert layer.get_seq_length() == length
        for stream in (layer.k, layer.v):
            assert stream.blocks and all(isinstance(b, AffineBlock) for b in stream.blocks)
            # keys: bytes along tokens, channels adjacent; values: int32 words along channels
            packed = torch.uint8 if stream is layer.k else torch.int32
            assert all(b.codes.dtype == packed for b in stream.blocks)
            exact = 0 if stream.window is None else stream.window.shape[-2]
            assert window <= exact < window + stream.method.block_tokens
            assert stream.encoded + exact == length
        keys, values = layer.decoded()
        assert keys.shape == values.shape == (batch * beams, kv_heads, length, head_dim)
    # Encoded blocks dominate: the cache is far below what fp16 keys and values would take.
    assert cache.nbytes() < 0.65 * _fp16_bytes(cache)
    # The first step's scores come from the prefill, which attends in flight at full precision;
    # later steps read the quantized past, so they must differ from the plain model's.
    torch.testing.assert_close(out.scores[0], plain.scores[0], rtol=0, atol=1e-4)
    assert any(
        not torch.allclose(a, b, rtol=0, atol=1e-4)
        for a, b in zip(out.scores[1:], plain.scores[1:], strict=True)
    )


@needs_kivi
def test_kivi_8bit_greedy_matches_unquantized(make_model: ModelFactory, make_ids: IdsFactory) -> None:
    model = make_model("gpt_neox")
    ids = make_ids(1, 8, seed=4)
    settings: dict[str, Any] = {
        "max_new_tokens": 40,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    plain = model.generate(ids, **settings)
    _headq(model)
    cache = QuantizedKVCache("kivi:bits=8", "kivi:bits=8", config=model.config)
    quant = model.generate(ids, **cache_kwargs(model, cache), **settings)
    assert all(layer.k.encoded >= 32 for layer in cache.quantized_layers())
    assert torch.equal(quant.sequences, plain.sequences)
    scores, scores_q = torch.stack(plain.scores, 1), torch.stack(quant.scores, 1)
    top2 = scores.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    deviation = (scores_q - scores).abs().amax(dim=-1)
    assert deviation.max() > 0, "8-bit keys and values changed nothing: the cache read exact data"
    # Why greedy is stable here: every step's top-2 margin exceeds twice the logit deviation.
    assert (margin > 2 * deviation).all()


@pytest.mark.parametrize("steps", [0, 4])
def test_left_padded_batch_matches_rows_alone(
    arch: str, steps: int, make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    model = make_model(arch)
    lengths = [10, 6, 8]
    width = max(lengths)
    rows = [make_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    follow = make_ids(len(rows), steps, seed=20)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    # Reference: each row alone, whole sequence, plain attention, no cache.
    alone = [
        model(torch.cat([row, follow[i]])[None], use_cache=False).logits[0] for i, row in enumerate(rows)
    ]

    _headq(model)
    cache = _fp16_cache(model)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = [model(ids, attention_mask=mask, position_ids=positions, **cache_kwargs(model, cache)).logits]
    for step in range(steps):
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            follow[:, step : step + 1],
            attention_mask=mask,
            position_ids=positions,
            **cache_kwargs(model, cache),
        )
        logits.append(out.logits)
    padded = torch.cat(logits, dim=1)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(padded[i, width - n :], alone[i], rtol=0, atol=1e-4)


def test_left_padded_generate_matches_rows_alone(make_model: ModelFactory, make_ids: IdsFactory) -> None:
    model = _headq(make_model("llama"))
    rows = [make_ids(1, 9, seed=30)[0], make_ids(1, 5, seed=31)[0]]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 9 - len(row) :], mask[i, 9 - len(row) :] = row, 1
    settings: dict[str, Any] = {"max_new_tokens": 10, "do_sample": False}
    batch = model.generate(ids, attention_mask=mask, **cache_kwargs(model, _fp16_cache(model)), **settings)
    for i, row in enumerate(rows):
        single = model.generate(row[None], **cache_kwargs(model, _fp16_cache(model)), **settings)
        assert torch.equal(batch[i, 9:], single[0, len(row) :])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cache_without_headq_attention_raises(
    arch: str, attn: str, make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    model = make_model(arch, attn=attn)
    ids = make_ids(1, 6, seed=5)
    cache = _fp16_cache(model)
    model(ids, **cache_kwargs(model, cache), use_cache=True)  # attention over in-flight tokens only
    with pytest.raises(CacheStateError, match="headq"):
        model(ids[:, :1], **cache_kwargs(model, cache), use_cache=True)


def test_headq_attention_without_cache_is_exact(
    arch: str, make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    model = make_model(arch)
    ids = make_ids(2, 12, seed=6)
    want = model(ids, use_cache=False).logits
    got = _headq(model)(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
