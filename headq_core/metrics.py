"""The standard distortion metrics, registered by the core through the same hook as any plugin.

Each maps an :class:`~headq_core.interfaces.AttentionSample` (one decode position, the query
heads of each KV head as rows) to one value per (batch, kv_head): the mean over rows of a per-row
quantity, with masked tokens left out. Logits are the scaled ones the softmax sees.
"""

from __future__ import annotations

import torch

from headq_core.hookspecs import hookimpl
from headq_core.interfaces import AttentionSample, DistortionMetric
from headq_core.registry import Registry


def _valid(sample: AttentionSample) -> torch.Tensor:
    """(b, 1 or h, rows, T) float 0/1: tokens each row may attend to."""
    return sample.mask.expand_as(sample.logits).float()


def _row_mean(per_row: torch.Tensor) -> torch.Tensor:
    return per_row.mean(dim=-1)


def key_mse(s: AttentionSample) -> torch.Tensor:
    """Mean squared key error over attended tokens and channels."""
    valid = _valid(s)[..., 0, :]  # every row of a decode position sees the same tokens
    err = (s.keys_hat - s.keys).square().mean(dim=-1)
    return (err * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def logit_mse(s: AttentionSample) -> torch.Tensor:
    """Mean squared logit error ``(s_hat - s)^2`` over attended tokens."""
    valid = _valid(s)
    delta = (s.logits_hat - s.logits) * valid
    return _row_mean(delta.square().sum(-1) / valid.sum(-1).clamp_min(1))


def shift_invariant_logit_error(s: AttentionSample) -> torch.Tensor:
    """Variance of the logit error over attended tokens: blind to a shift of all logits."""
    valid = _valid(s).double()
    n = valid.sum(-1).clamp_min(1)
    delta = (s.logits_hat.double() - s.logits.double()) * valid
    mean = delta.sum(-1) / n
    var = (((delta - mean.unsqueeze(-1)) * valid).square()).sum(-1) / n
    return _row_mean(var)


def fisher_error(s: AttentionSample) -> torch.Tensor:
    """``1/2 Var_p(delta s)``: the second-order KL of a logit error under exact attention p."""
    delta = torch.where(_valid(s) > 0, s.logits_hat.double() - s.logits.double(), 0.0)
    p = s.probs.double()
    mean = (p * delta).sum(-1)
    var = (p * (delta - mean.unsqueeze(-1)).square()).sum(-1)
    return _row_mean(0.5 * var)


def attention_kl(s: AttentionSample) -> torch.Tensor:
    """``KL(p || p_hat)`` of exact against quantized attention.

    Computed from the logits, ``sum_j p_j (-ds_j) + lse(s_hat) - lse(s)``, in float64: the
    difference of two rounded log-probabilities would swamp a small KL.
    """
    valid = _valid(s) > 0
    logits = s.logits.double().masked_fill(~valid, float("-inf"))
    logits_hat = s.logits_hat.double().masked_fill(~valid, float("-inf"))
    delta = torch.where(valid, logits_hat - logits, 0.0)
    lse_gap = torch.logsumexp(logits_hat, -1) - torch.logsumexp(logits, -1)
    kl = -(s.probs.double() * delta).sum(-1) + lse_gap
    return _row_mean(torch.nan_to_num(kl, nan=0.0).clamp_min(0))


def output_error(s: AttentionSample) -> torch.Tensor:
    """Mean squared error of the attention output ``p_hat V_hat`` against ``p V``."""
    exact = s.probs @ s.values
    quant = s.probs_hat @ s.values_hat
    return _row_mean((quant - exact).square().mean(-1))


def a2_value_surrogate(s: AttentionSample) -> torch.Tensor:
    """``sum_j p_j^2 |dv_j|^2 / d``: the value error's share of the output error at fixed attention."""
    dv = (s.values_hat - s.values).square().mean(-1)  # (b, h, T)
    return _row_mean((s.probs.square() * dv.unsqueeze(-2)).sum(-1))


STANDARD_METRICS = (
    DistortionMetric("key_mse", key_mse, "mean squared key error"),
    DistortionMetric("logit_mse", logit_mse, "mean squared logit error"),
    DistortionMetric(
        "shift_logit_err", shift_invariant_logit_error, "logit error variance (shift-invariant)"
    ),
    DistortionMetric("fisher", fisher_error, "1/2 Var_p of the logit error"),
    DistortionMetric("attn_kl", attention_kl, "KL(p || p_hat)"),
    DistortionMetric("output_err", output_error, "mean squared attention-output error"),
    DistortionMetric("a2_value", a2_value_surrogate, "sum p^2 |dv|^2 / d"),
)


@hookimpl
def register_distortion_metrics(registry: Registry) -> None:
    for metric in STANDARD_METRICS:
        registry.add_metric(metric)
