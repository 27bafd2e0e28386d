"""Decode perplexity: the one-pass fast path equals true one-token-at-a-time streaming."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import SLIDING_WINDOW, dynamic_cache_nll, random_ids, tiny_model
from transformers import PreTrainedModel

from headq_core.harness.perplexity import CacheSettings, Windowing, decode_speed, perplexity, window_nll


@pytest.fixture(scope="module")
def tiny_llama() -> PreTrainedModel:
    return tiny_model("llama", attn="headq")


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_family(request: pytest.FixtureRequest, tiny_llama: PreTrainedModel) -> Any:
    """The tiny Llama, and a tiny Gemma 3 with a sliding-window layer (conftest)."""
    return tiny_llama if request.param == "llama" else tiny_model("gemma3", attn="headq")


@pytest.fixture(scope="module")
def windows() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (150,), generator=generator) for _ in range(4)]


COMBOS = [
    CacheSettings("kivi:bits=2", "kivi:bits=2"),
    CacheSettings("kivi:bits=2,group=16", "kivi:bits=4", window=8, sinks=4),
    CacheSettings("kivi:bits=4", "fp16", window=5),
]


@pytest.mark.parametrize("settings", COMBOS, ids=lambda s: f"{s.keys}|{s.values}|R{s.window}|S{s.sinks}")
def test_one_pass_decode_equals_token_by_token(tiny_family, windows, settings) -> None:
    windowing = Windowing(prefix=90, scored=60, windows=4, batch=2)
    fast = perplexity(tiny_family, windows, settings, windowing, mode="decode")
    slow = perplexity(tiny_family, windows, settings, windowing, mode="stream")
    assert fast.tokens == slow.tokens == 4 * 60
    assert abs(fast.nll_sum - slow.nll_sum) / abs(slow.nll_sum) < 1e-4
    # the quantized caches end in the same state too
    assert fast.caches[0].nbytes() == slow.caches[0].nbytes()


def test_quantization_changes_perplexity_and_exact_matches_plain_model(tiny_llama, windows) -> None:
    windowing = Windowing(prefix=90, scored=60, windows=2, batch=2)
    exact = perplexity(tiny_llama, windows[:2], CacheSettings("fp16", "fp16"), windowing)
    kivi1 = perplexity(tiny_llama, windows[:2], CacheSettings("kivi:bits=1", "kivi:bits=1"), windowing)
    assert exact.ppl != kivi1.ppl
    # the exact cache reproduces the plain model's own next-token loss on the scored tokens
    ids = torch.stack(windows[:2])
    tiny_llama.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            logits = tiny_llama(ids).logits[:, 89:-1].double()
    finally:
        tiny_llama.set_attn_implementation("headq")
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, 90:, None]).sum().item()
    assert math.isclose(exact.nll_sum, nll, rel_tol=1e-5)


def test_prefill_mode_scores_the_same_tokens(tiny_llama, windows) -> None:
    batch = torch.stack(windows[:2])
    settings = CacheSettings("kivi:bits=2", "kivi:bits=2")
    decode, _ = window_nll(tiny_llama, batch, 90, settings, "decode")
    prefill, _ = window_nll(tiny_llama, batch, 90, settings, "prefill")
    exact, _ = window_nll(tiny_llama, batch, 90, CacheSettings("fp16", "fp16"), "prefill")
    assert decode.shape == prefill.shape == (2,)
    # quantizing the prefix too is a different (and here different-valued) measurement
    assert not torch.allclose(decode, prefill)
    assert torch.all(torch.isfinite(exact))


def test_decode_speed_is_measured(tiny_llama, windows) -> None:
    speed = decode_speed(
        tiny_llama, windows[0][None, :40], CacheSettings("kivi:bits=2", "kivi:bits=2"), steps=4
    )
    assert speed > 0 and math.isfinite(speed)


@pytest.mark.parametrize("settings", COMBOS[:2], ids=lambda s: f"{s.keys}|{s.values}|R{s.window}|S{s.sinks}")
def test_prefill_perplexity_does_not_depend_on_the_chunk(tiny_llama, windows, settings) -> None:
    """Prefill mode emulates streaming from the first token, so feeding the window in chunks
    (``prefill_chunk``) changes nothing; in decode mode an exact cache is just as blind to it."""
    whole = Windowing(prefix=90, scored=60, windows=2, batch=2)
    chunked = Windowing(prefix=90, scored=60, windows=2, batch=2, prefill_chunk=23)
    a = perplexity(tiny_llama, windows[:2], settings, whole, mode="prefill")
    b = perplexity(tiny_llama, windows[:2], settings, chunked, mode="prefill")
    assert a.tokens == b.tokens == 2 * 60
    assert abs(a.nll_sum - b.nll_sum) / abs(a.nll_sum) < 1e-5
    exact = CacheSettings("fp16", "fp16")
    a = perplexity(tiny_llama, windows[:2], exact, whole, mode="decode")
    b = perplexity(tiny_llama, windows[:2], exact, chunked, mode="decode")
    assert abs(a.nll_sum - b.nll_sum) / abs(a.nll_sum) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_exact_decode_perplexity_equals_dynamic_cache(arch: str) -> None:
    """Through headq with the exact cache, one pass and streamed, decode perplexity is the model's
    own. Gemma 3's sliding layer (a window of 8 against a 40-token prefix) must hide what its
    window hides, in the prefill, in the one-pass emulation of streaming and token by token."""
    model = tiny_model(arch, attn="headq")
    windows = [random_ids(1, 64, seed=40 + i)[0] for i in range(4)]
    windowing = Windowing(prefix=40, scored=24, windows=4, batch=2)
    want = dynamic_cache_nll(model, torch.stack(windows), 40)
    exact = CacheSettings("fp16", "fp16")
    for mode in ("decode", "stream"):
        got = perplexity(model, windows, exact, windowing, mode=mode)  # type: ignore[arg-type]
        assert math.isclose(got.nll_sum, want, rel_tol=1e-6), (mode, got.nll_sum, want)
    if arch == "gemma3":  # the window matters here: with full attention on every layer the NLL moves
        assert SLIDING_WINDOW < windowing.prefix
        unwindowed = tiny_model(arch, attn="headq", layer_types=["full_attention"] * 2)
        assert not math.isclose(dynamic_cache_nll(unwindowed, torch.stack(windows), 40), want, rel_tol=1e-3)
