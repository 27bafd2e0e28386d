"""Attention-mask helpers shared by the attention paths."""

from __future__ import annotations

import torch


def drop_columns(mask: torch.Tensor | None, start: int, count: int) -> torch.Tensor | None:
    """The mask without the key columns of positions ``[start, start + count)`` (tokens a
    sliding-window layer no longer stores); the mask's last column is the pass's last position."""
    if mask is None or not count:
        return mask
    return torch.cat([mask[..., :start], mask[..., start + count :]], dim=-1)
