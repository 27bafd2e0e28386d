"""The standard distortion metrics: zero for the exact cache, blind to key shifts, Fisher ≈ KL."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from headq_core import AttentionSample, get_registry
from headq_core.harness.diagnostics import capture_window, distortion, spearman
from headq_core.harness.perplexity import CacheSettings
from headq_core.reference import masked_softmax

# The exact cache's attention reads the same keys and values as the plain model, but its logits
# are float32 dot products over the cache's own segments (sinks, blocks, window), summed in
# another order than one matrix product over the whole sequence: they agree to float32 rounding,
# |ds| ~ 1e-7 |s|. Every score-space metric is then of order |ds|^2 ~ 1e-16 (seen: 2.2e-16 for
# attn_kl, 6e-18 for logit_mse); a real quantization error is above 1e-6. Metrics of the stored
# tensors alone (key_mse, a2_value) see no arithmetic and stay exactly zero.
EXACT_TOLERANCE = 1e-12
STORAGE_METRICS = {"key_mse", "a2_value"}


def _sample(keys_hat: torch.Tensor | None = None, seed: int = 0, tokens: int = 50) -> AttentionSample:
    g = torch.Generator().manual_seed(seed)
    b, h, rows, d = 2, 3, 4, 16
    q = torch.randn(b, h, rows, d, generator=g)
    k = torch.randn(b, h, tokens, d, generator=g)
    v = torch.randn(b, h, tokens, d, generator=g)
    kh = k if keys_hat is None else keys_hat
    mask = torch.ones(b, 1, 1, tokens, dtype=torch.bool)
    mask[0, ..., :7] = False  # a left-padded row
    scale = d**-0.5
    logits, logits_hat = q @ k.transpose(-1, -2) * scale, q @ kh.transpose(-1, -2) * scale
    return AttentionSample(
        query=q,
        keys=k,
        keys_hat=kh,
        values=v,
        values_hat=v,
        logits=logits,
        logits_hat=logits_hat,
        probs=masked_softmax(logits, mask),
        probs_hat=masked_softmax(logits_hat, mask),
        mask=mask,
    )


def test_every_metric_is_exactly_zero_for_an_exact_sample() -> None:
    sample = _sample()
    for metric in get_registry().metrics():
        value = metric(sample)
        assert value.shape == (2, 3), metric.name
        assert torch.all(value == 0), metric.name


def test_a_shared_key_shift_is_invisible_to_score_space_metrics() -> None:
    base = _sample()
    mu = 3.0 * torch.randn(1, 1, 1, 16, generator=torch.Generator().manual_seed(5))
    shifted = _sample(keys_hat=base.keys + mu)
    metrics = {m.name: m(shifted) for m in get_registry().metrics()}
    assert metrics["key_mse"].min() > 1.0
    assert metrics["logit_mse"].min() > 1e-2
    for name in ("shift_logit_err", "fisher", "attn_kl"):
        assert metrics[name].abs().max() < 1e-6, name


def test_two_kl_over_fisher_term_tends_to_one_for_small_errors() -> None:
    base = _sample(tokens=200)
    noise = torch.randn(base.keys.shape, generator=torch.Generator().manual_seed(3))
    small = _sample(keys_hat=base.keys + 1e-3 * noise, tokens=200)
    registry = get_registry()
    kl = registry.metric("attn_kl")(small)
    fisher = registry.metric("fisher")(small)
    # fisher holds the 1/2 factor: KL ≈ 1/2 Var_p(Δs)
    ratio = kl / fisher
    assert torch.all((ratio - 1).abs() < 0.05), ratio


def test_spearman_matches_a_known_ranking() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_distortion_on_a_tiny_model_is_zero_exact_and_positive_quantized() -> None:
    model = tiny_model("llama", attn="headq")
    windows = [torch.randint(0, 128, (120,))]
    captured = [capture_window(model, windows[0][None])]
    assert model.config._attn_implementation == "headq"
    exact = distortion(model, windows, CacheSettings("fp16", "fp16"), 80, captured=captured).means()
    quant = distortion(
        model, windows, CacheSettings("kivi:bits=2", "kivi:bits=2"), 80, captured=captured
    ).means()
    for name, table in exact.items():
        assert table.shape == (2, 2)
        if name in STORAGE_METRICS:  # the exact cache stores the very tensors: no rounding at all
            assert torch.all(table == 0), name
        else:  # logits of the same tensors summed in another order: float32 rounding, no more
            assert torch.all(table < EXACT_TOLERANCE), (name, table.max().item())
        assert torch.all(quant[name] > 0), name
