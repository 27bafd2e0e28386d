"""Score-space distortion per layer and KV head, from captured exact attention inputs.

The exact model runs once per window with a capturing attention function, which records every
layer's post-RoPE queries, keys and values. For a (keys, values) combination, each layer's keys and
values then go through a fresh cache layer exactly as in decode perplexity (prefill the prefix,
then the scored tokens with the streaming rule), and at sampled decode positions the exact and
quantized attention are compared with every registered distortion metric. Layers are measured in
isolation: the errors of earlier layers do not flow into later ones, which is what makes a metric
a property of the method at that layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import torch
from transformers import AttentionInterface

from headq_core.attention import ATTN_NAME, headq_attention
from headq_core.devices import on_device
from headq_core.harness.perplexity import CacheSettings
from headq_core.interfaces import AttentionSample, DistortionMetric
from headq_core.layer import QuantizedLayer
from headq_core.reference import attend_reference, masked_softmax
from headq_core.registry import get_registry

CAPTURE_NAME = "headq_capture"


@attrs.frozen
class Captured:
    """One layer's exact attention inputs: query (b, hq, T, d), keys and values (b, hkv, T, d)."""

    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float
    key_grad: torch.Tensor | None = None  # d loss / d keys (b, hkv, T, d), with capture_window(grads=True)
    value_grad: torch.Tensor | None = None


_CAPTURED: dict[int, Captured] | None = None
_LEAVES: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # (keys, values) leaves to differentiate


def _capture_attention(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    if _CAPTURED is not None:
        if _LEAVES is not None:  # the loss's gradient w.r.t. this layer's keys and values, nothing upstream
            key, value = key.detach().requires_grad_(), value.detach().requires_grad_()
            _LEAVES[module.layer_idx] = (key, value)
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        _CAPTURED[module.layer_idx] = Captured(
            query.detach().float(), key.detach().float(), value.detach().float(), float(scaling)
        )
    return headq_attention(module, query, key, value, *args, **kwargs)


@contextmanager
def _capturing(model: Any, grads: bool = False) -> Iterator[dict[int, Captured]]:
    global _CAPTURED, _LEAVES
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_NAME, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    _CAPTURED, _LEAVES = {}, ({} if grads else None)
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        yield _CAPTURED
    finally:
        model.set_attn_implementation(previous if previous != CAPTURE_NAME else ATTN_NAME)
        _CAPTURED, _LEAVES = None, None


@torch.no_grad()
def capture_window(model: Any, ids: torch.Tensor, *, grads: bool = False) -> dict[int, Captured]:
    """Exact attention inputs of every layer for ids (b, T), from one forward without a cache.

    With ``grads``, also the gradients of the window's summed next-token NLL with respect to each
    layer's keys and values (one backward pass), in ``key_grad`` / ``value_grad``.
    """
    with _capturing(model, grads) as captured:
        ids = ids.to(model.device)
        if not grads:
            model(ids, use_cache=False)
            return dict(captured)
        leaves = _LEAVES if _LEAVES is not None else {}
        with torch.enable_grad():
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), ids[:, 1:].flatten().to(logits.device), reduction="sum"
            )
            inputs = [t for i in sorted(leaves) for t in leaves[i]]
            found = torch.autograd.grad(loss, inputs, allow_unused=True)
        grad = [torch.zeros_like(t) if g is None else g.float() for g, t in zip(found, inputs, strict=True)]
        out = dict(captured)
        for j, i in enumerate(sorted(leaves)):
            out[i] = attrs.evolve(out[i], key_grad=grad[2 * j], value_grad=grad[2 * j + 1])
        return out


@attrs.define
class DistortionTable:
    """Per-metric (layers, kv_heads) means over sampled positions and windows."""

    sums: dict[str, torch.Tensor] = attrs.Factory(dict)
    count: int = 0

    def add(self, layer: int, n_layers: int, values: dict[str, torch.Tensor]) -> None:
        for name, per_head in values.items():
            if name not in self.sums:
                self.sums[name] = torch.zeros(n_layers, per_head.shape[-1], dtype=torch.float64)
            self.sums[name][layer] += per_head.double().sum(0).cpu()  # layers may be on several devices

    def means(self) -> dict[str, torch.Tensor]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def _causal(start: int, n: int, total: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(start, start + n, device=device)[:, None]
    return (torch.arange(total, device=device)[None, :] <= rows)[None, None]


@torch.no_grad()
def layer_distortion(
    captured: Captured,
    layer_idx: int,
    settings: CacheSettings,
    config: Any,
    prefix: int,
    positions: list[int],
    metrics: list[DistortionMetric],
) -> dict[str, torch.Tensor]:
    """Metric sums over ``positions`` (offsets into the scored part) for one layer: name -> (b, kv_heads)."""
    cache = settings.build(config)
    layer = QuantizedLayer(cache, layer_idx)
    q_all, k, v = captured.query, captured.keys, captured.values
    b, hq, total, d = q_all.shape
    hkv = k.shape[1]
    g = hq // hkv
    n = total - prefix

    def grouped(q: torch.Tensor) -> torch.Tensor:
        return q.reshape(b, hkv, g * q.shape[-2], d)

    layer.update(k[..., :prefix, :], v[..., :prefix, :])
    prefill_mask = _causal(0, prefix, prefix, k.device).repeat(1, 1, g, 1)
    step = layer.begin_step()
    attend_reference(layer, step, grouped(q_all[..., :prefix, :]), prefill_mask, captured.scaling, None)
    cache.emulate_streaming = True
    layer.update(k[..., prefix:, :], v[..., prefix:, :])
    mask = _causal(prefix, n, total, k.device)
    step = layer.begin_step()
    _, logits_hat = attend_reference(
        layer, step, grouped(q_all[..., prefix:, :]), mask.repeat(1, 1, g, 1), captured.scaling, None
    )
    keys_dec, values_dec = layer.decoded()
    key_state = step.read_encoded(step.keys, 0, k.device)  # (n, T)
    value_state = step.read_encoded(step.values, 0, k.device)

    sums: dict[str, torch.Tensor] = {}
    for j in positions:
        rows = torch.arange(g, device=k.device) * n + j
        q = grouped(q_all[..., prefix:, :])[:, :, rows]
        row_mask = mask[..., j : j + 1, :]
        logits = q @ k.transpose(-1, -2) * captured.scaling
        lh = logits_hat[:, :, rows]
        sample = AttentionSample(
            query=q,
            keys=k,
            keys_hat=torch.where(key_state[j][:, None], keys_dec, k),
            values=v,
            values_hat=torch.where(value_state[j][:, None], values_dec, v),
            logits=logits,
            logits_hat=lh,
            probs=masked_softmax(logits, row_mask),
            probs_hat=masked_softmax(lh, row_mask),
            mask=row_mask,
        )
        for metric in metrics:
            value = metric(sample)
            sums[metric.name] = sums.get(metric.name, 0) + value
    return sums


def distortion(
    model: Any,
    windows: list[torch.Tensor],
    settings: CacheSettings,
    prefix: int,
    *,
    positions_per_window: int = 16,
    captured: list[dict[int, Captured]] | None = None,
) -> DistortionTable:
    """Every registered metric per (layer, kv_head) for one combination, over ``windows``."""
    metrics = get_registry().metrics()
    table = DistortionTable()
    for i, ids in enumerate(windows):
        layers = captured[i] if captured is not None else capture_window(model, ids[None])
        n = ids.shape[-1] - prefix
        step = max(1, n // positions_per_window)
        positions = list(range(step - 1, n, step))[:positions_per_window]
        for layer_idx, cap in sorted(layers.items()):
            with on_device(cap.keys.device):  # the layer's own GPU under a device_map
                sums = layer_distortion(cap, layer_idx, settings, model.config, prefix, positions, metrics)
            table.add(layer_idx, len(layers), sums)
        table.count += len(positions) * ids.shape[0] if ids.dim() > 1 else len(positions)
    return table


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two flat tensors (ties broken by order)."""
    x, y = x.flatten().double(), y.flatten().double()
    if x.numel() < 3:
        return float("nan")
    rx = torch.empty_like(x).scatter_(0, x.argsort(), torch.arange(x.numel(), dtype=x.dtype))
    ry = torch.empty_like(y).scatter_(0, y.argsort(), torch.arange(y.numel(), dtype=y.dtype))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / denom) if denom > 0 else float("nan")
