"""Serving patterns on real (tiny) models: left padding never reaches a row's output, and a
speculative pass's rejected tokens leave no trace."""

from __future__ import annotations

import pytest
import torch

from headq_core import QuantizedKVCache, cache_kwargs, get_registry
from headq_core.testing.calibration import calibration_for

_REGISTRY = get_registry()
PAIRS = (
    [(k, "fp16") for k in _REGISTRY.names("key") if k != "fp16"]
    + [("fp16", v) for v in _REGISTRY.names("value") if v != "fp16"]
    + [("kivi:bits=2", "kivi:bits=2"), ("fp16", "fp16")]
)


def _generate(model, ids, mask, keys, values, calibration, **kwargs):
    cache = QuantizedKVCache(keys, values, window=4, config=model.config, calibration=calibration)
    out = model.generate(
        ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize(("keys", "values"), PAIRS)
def test_what_padding_holds_never_changes_a_row(make_model, make_ids, keys: str, values: str) -> None:
    """Left-padded greedy generation: only the ids at padding positions differ between two runs;
    every row's logits are bit-identical (KIVI-2 keys moved them by several units before)."""
    model = make_model("llama", attn="headq")
    calibration = calibration_for(keys, values, model.config, tokens=256)
    ids = make_ids(3, 48, seed=3)
    mask = torch.ones_like(ids)
    for row, pads in ((1, 7), (2, 37)):
        mask[row, :pads] = 0
    other = torch.where(mask.bool(), ids, make_ids(3, 48, seed=4))
    assert not torch.equal(other, ids)
    with torch.no_grad():
        first = _generate(model, ids, mask, keys, values, calibration)
        second = _generate(model, other, mask, keys, values, calibration)
    assert torch.equal(first[1], second[1])
    assert torch.equal(first[0][:, 48:], second[0][:, 48:])


CROPPABLE = [(k, v) for k, v in PAIRS if v not in ("a2",)]


@pytest.mark.parametrize(("keys", "values"), CROPPABLE)
def test_speculative_decoding_gives_the_plain_greedy_text(make_model, keys: str, values: str) -> None:
    """Prompt lookup and an assistant model propose tokens that a multi-token pass checks and a
    crop takes back: with a window at least as long as a pass, the text is plain greedy's (before:
    KIVI-2 text differed from token 8 on). A² keeps a statistic of the queries a crop removes,
    so its cache says it is not croppable."""
    model = make_model("llama", attn="headq")
    assistant = make_model("llama", attn="headq", seed=5)
    assistant.generation_config.num_assistant_tokens = 5
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    calibration = calibration_for(keys, values, model.config, tokens=256)
    pattern = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33]])
    ids = torch.cat([pattern.repeat(1, 5), pattern[:, :3]], dim=1)  # repeats: prompt lookup finds candidates

    def run(**kwargs):
        cache = QuantizedKVCache(
            keys, values, window=8, sinks=1, config=model.config, calibration=calibration
        )
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=40,
            do_sample=False, **kwargs,
        )  # fmt: skip

    with torch.no_grad():
        plain = run()
        assert torch.equal(run(prompt_lookup_num_tokens=3), plain)
        assert torch.equal(run(assistant_model=assistant), plain)


def _sliding_model():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, use_sliding_window=True,
        sliding_window=24, max_window_layers=1, pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    assert config.layer_types == ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="headq").eval()


def test_a_sliding_window_layer_keeps_only_its_window(make_ids) -> None:
    """Layer 1 of this model slides over 24 tokens: an exact quantized cache gives DynamicCache's
    greedy tokens, and holds a bounded number of tokens there (before: every token, in every
    layer) while the full-attention layer holds them all."""
    from transformers import DynamicCache

    model = _sliding_model()
    ids = make_ids(2, 60, seed=5)
    with torch.no_grad():
        cache = QuantizedKVCache(config=model.config)
        got = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=150, do_sample=False)
        model.set_attn_implementation("sdpa")
        want = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), max_new_tokens=150,
                              do_sample=False)  # fmt: skip
    assert torch.equal(got, want)
    full, sliding = cache.quantized_layers()
    assert not full.is_sliding and sliding.is_sliding and cache.is_sliding == [False, True]
    assert full.get_seq_length() == sliding.get_seq_length() == 209
    held = sliding.length - sliding.k.dropped
    assert sliding.k.dropped > 0 and held <= 2 * 24 + 64, held  # window, one window of slack, CROP_TOKENS
    nbytes = [
        sum(sum(parts.values()) for parts in layer.nbytes_by_part().values()) for layer in (full, sliding)
    ]
    assert nbytes[1] < nbytes[0] * held / 209 * 1.1  # what it holds is what it keeps


@pytest.mark.parametrize(("keys", "values"), [("kivi:bits=2", "kivi:bits=2"), ("headq", "kivi:bits=4")])
def test_dropping_what_a_sliding_window_hides_changes_nothing(monkeypatch, make_ids, keys, values) -> None:
    """The same quantized cache with and without the sliding layer dropping its old tokens:
    identical logits (they were masked), and far fewer tokens held."""
    from headq_core.layer import QuantizedLayer

    model = _sliding_model()
    calibration = calibration_for(keys, values, model.config, tokens=256)
    ids = make_ids(2, 60, seed=6)

    def run():
        cache = QuantizedKVCache(keys, values, window=4, config=model.config, calibration=calibration)
        with torch.no_grad():
            out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=150, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)  # fmt: skip
        return torch.stack(out.logits, dim=1), cache

    dropping, cache = run()
    assert cache.quantized_layers()[1].k.dropped > 0
    monkeypatch.setattr(QuantizedLayer, "_slide", lambda self: None)
    keeping, kept = run()
    assert kept.quantized_layers()[1].k.dropped == 0
    torch.testing.assert_close(dropping, keeping, rtol=1e-5, atol=1e-5)
    assert cache.nbytes() < kept.nbytes()


def test_the_bench_compares_memory_with_what_the_models_own_cache_holds(make_ids) -> None:
    """On the sliding model the exact cache holds about what DynamicCache holds (its sliding layer
    keeps a bounded number of tokens), so the ratio is near 1, not the bits/elem of a full layer."""
    from transformers import DynamicCache

    from headq_core.harness.bench import model_cache_bytes

    model = _sliding_model()
    ids = make_ids(1, 300, seed=8)
    cache, own = QuantizedKVCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
        model.set_attn_implementation("sdpa")
        model(ids, **cache_kwargs(model, own))
    held = sum(t.numel() * t.element_size() for layer in own.layers for t in (layer.keys, layer.values))
    assert model_cache_bytes(cache) == held
    assert cache.nbytes() < 1.6 * held  # the sliding layer keeps its window and a crop's 64 tokens
