"""The rotary embedding of a model's keys, undone before coding and applied again at read (``rope=pre``).

Llama-style models turn channel pairs ``(i, i + d/2)`` of a key at position ``p`` by the angle
``p * inv_freq[i]`` (transformers' ``k * cos + rotate_half(k) * sin``). Rotated back, the keys of
every position share one distribution, which the codebooks can then fit; the rotation of a stored
token is applied again when it is read.
"""

from __future__ import annotations

from typing import Any

import torch

from headq_core.errors import CalibrationError


def inverse_frequencies(model_config: Any, layer_idx: int = 0) -> torch.Tensor:
    """(head_dim / 2,) float32 ``inv_freq`` of the rotary embedding of layer ``layer_idx`` of
    ``model_config``: one for the model, or one per layer type where the config keeps its rotary
    parameters per type (Gemma 3: a base for sliding and one for full layers).

    Raises CalibrationError for a config without one, or with a rotary type other than the
    default and linear scaling, or a partial rotary dimension (not implemented here).
    """
    config = (
        model_config.get_text_config(decoder=True)
        if hasattr(model_config, "get_text_config")
        else model_config
    )
    rope = getattr(config, "rope_parameters", None) or {
        "rope_theta": getattr(config, "rope_theta", None),
        "rope_type": (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default"),
    }
    layer_types = getattr(config, "layer_types", None)
    if "rope_theta" not in rope and layer_types is not None and layer_types[layer_idx] in rope:
        rope = rope[layer_types[layer_idx]] or {}
    theta, kind = rope.get("rope_theta"), rope.get("rope_type", "default")
    partial = getattr(config, "partial_rotary_factor", 1.0)
    if theta is None or kind not in ("default", "linear") or partial != 1.0:
        raise CalibrationError(
            f"gsrq rope=pre rotates keys by the default or linearly scaled rotary embedding; this model "
            f"has rope {rope} (partial_rotary_factor {partial}): use rope=post"
        )
    heads = config.num_attention_heads
    d = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    inv_freq = 1.0 / float(theta) ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    return inv_freq / float(rope["factor"]) if kind == "linear" else inv_freq


def rotate(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, back: bool = False
) -> torch.Tensor:
    """x (..., tokens, d) turned by the rotary angles of ``positions`` (tokens,) or broadcastable
    to x's leading axes and tokens; ``back`` turns the other way. float32."""
    angles = positions.to(device=x.device, dtype=torch.float32)[..., None] * inv_freq.to(x.device)
    angles = torch.cat([angles, angles], dim=-1)  # (..., tokens, d)
    cos, sin = angles.cos(), angles.sin()
    x = x.float()
    half = x.shape[-1] // 2
    turned_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos - turned_half * sin if back else x * cos + turned_half * sin
