"""Layers of one model on several devices (accelerate's ``device_map``).

A layer's tokens, blocks and method state live on the device of that layer's keys and values.
Work that runs on the *current* CUDA device rather than on its tensors' (Triton launches, CUDA
events, streams) is put under :func:`on_device` of the layer's tensors, so that a layer on
``cuda:1`` never launches on ``cuda:0``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``device`` made the current CUDA device for the block (nothing to do for other devices)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
