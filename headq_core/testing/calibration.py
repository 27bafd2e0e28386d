"""Synthetic calibration for tests: statistics shaped like a model's, fitted by the methods under test.

Methods that learn from data (``calibration_needs``) cannot be built without an artifact. The
conformance kit checks storage, block operations and the cache rule, not the quality of a fit, so
it calibrates such methods on random statistics of the right shapes: queries with a decaying
spectrum in a random rotation (so a query basis is well defined), keys and values from
:func:`~headq_core.testing.conformance.outlier_data`, and Gaussian squared gradients for Fisher statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from headq_core.calibration import FORMAT, Calibration, CalibrationStats, model_shape
from headq_core.interfaces import Method


def synthetic_stats(
    model_config: Any, needs: set[str], *, tokens: int = 1024, seed: int = 0
) -> CalibrationStats:
    """Random :class:`CalibrationStats` with the shapes of ``model_config``: per layer (kv_heads, ...)."""
    from headq_core.testing.driving import outlier_data

    shape = model_shape(model_config)
    h, d = shape["kv_heads"], shape["head_dim"]
    stats = CalibrationStats(shape, tokens=tokens, config=model_config)
    gen = torch.Generator().manual_seed(seed)
    for layer in range(shape["layers"]):
        decay = torch.logspace(0, -2, d, dtype=torch.float64)
        rotation, _ = torch.linalg.qr(torch.randn(h, d, d, generator=gen, dtype=torch.float64))
        q = torch.randn(h, tokens, d, generator=gen, dtype=torch.float64) * decay @ rotation
        keys = outlier_data((h, tokens, d), seed=seed + 2 * layer + 1)
        values = outlier_data((h, tokens, d), seed=seed + 2 * layer + 2)
        if "query_moments" in needs:
            stats.query_moments.append(q.transpose(-1, -2) @ q / tokens)
        if "key_moments" in needs:
            k = keys.double()
            stats.key_moments.append(k.transpose(-1, -2) @ k / tokens)
        if "key_samples" in needs:
            stats.key_samples.append(keys)
        if "value_samples" in needs:
            stats.value_samples.append(values)
        if "key_positions" in needs:  # windows of 64 tokens
            stats.key_positions.append((torch.arange(tokens) % 64).expand(h, -1)[..., None])
        for name in ("key_fisher", "value_fisher"):  # squared gradients, aligned with the samples
            if name in needs:
                grads = torch.randn(
                    h, tokens, d, generator=torch.Generator().manual_seed(seed + 97 * layer + 5)
                )
                getattr(stats, name).append(grads.square())
    return stats


def calibration_for(keys: str, values: str, model_config: Any, *, tokens: int = 1024) -> Calibration | None:
    """A synthetic calibration for whichever of a key and a value spec needs one (None if neither)."""
    from headq_core.registry import get_registry

    registry = get_registry()
    methods = [("key", registry.key_quantizer(keys)), ("value", registry.value_policy(values))]
    needs = [(kind, method) for kind, method in methods if method.calibration_needs]
    return synthetic_calibration(needs, model_config, tokens=tokens) if needs else None


def synthetic_calibration(
    methods: Sequence[tuple[str, Method]], model_config: Any, *, tokens: int = 1024, seed: int = 0
) -> Calibration:
    """Fit ``methods`` ((kind, method) pairs) on :func:`synthetic_stats` and bundle an artifact."""
    needs: set[str] = set()
    for _, method in methods:
        needs |= set(method.calibration_needs)
    stats = synthetic_stats(model_config, needs, tokens=tokens, seed=seed)
    tensors = {
        Calibration.key(kind, str(method.spec), name): tensor
        for kind, method in methods
        for name, tensor in method.fit(stats).items()
    }
    metadata = {
        "format": FORMAT,
        "model": "synthetic",
        "model_shape": stats.shape,
        "methods": [f"{kind}:{method.spec}" for kind, method in methods],
        "text": "synthetic",
        "tokens": tokens,
        "statistics": sorted(needs),
    }
    return Calibration(tensors, metadata)
