"""Kernels for the quantized KV cache. Every kernel sits beside its torch reference.

On machines without CUDA or Triton (and for layouts no kernel knows) the references are the
code path; :func:`quantize_affine` picks the Triton kernel for CUDA tensors by itself.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from headq_kernels import (
    affine_reference,
    decode_plan,
)
from headq_kernels.affine_reference import (
    SUPPORTED_BITS,
    bytes_along_tokens,
    codes_per_word,
    dequantize_affine,
    dequantize_along_tokens,
    pack_codes,
    pack_planes,
    plane_widths,
    unpack_codes,
    unpack_planes,
    words_along_tokens,
)
from headq_kernels.symmetric_reference import (
    dequantize_symmetric,
    quantize_symmetric,
    symmetric_step,
)


@functools.cache
def triton_module(name: str) -> Any:
    """``headq_kernels.<name>``, a module of Triton kernels, or None on a machine without Triton."""
    try:
        return importlib.import_module(f"headq_kernels.{name}")
    except ImportError:
        return None


def compiled_kernels() -> int:
    """Triton kernels the decode path has compiled in this process, every variant of every kernel
    (0 without Triton): a count that must not grow once a decode is warm."""
    kernels = [
        (triton_module("triton_decode"), "_decode_split_kernel"),
        (triton_module("triton_decode"), "_merge_kernel"),
        (triton_module("triton_folded"), "_folded_split_kernel"),
        (triton_module("triton_affine"), "_quantize_pack_kernel"),
    ]
    total = 0
    for module, name in kernels:
        if module is None:
            continue
        caches = getattr(getattr(module, name), "device_caches", None)
        if caches is None:
            raise RuntimeError("this Triton keeps its compiled kernels elsewhere: update compiled_kernels")
        total += sum(len(entry[0]) for entry in caches.values())
    return total


def quantize_affine(
    x: torch.Tensor, bits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine quantize-and-pack; see :func:`headq_kernels.affine_reference.quantize_affine`.

    CUDA tensors run the Triton kernel (bit for bit the same codes, scales and minima) where it
    supports the group; everything else runs the torch reference.
    """
    kernel = triton_module("triton_affine") if x.is_cuda else None
    if kernel is not None and kernel.supports(x, bits, group):
        return kernel.quantize_affine(x, bits, group)  # type: ignore[no-any-return]
    return affine_reference.quantize_affine(x, bits, group)


__all__ = [
    "SUPPORTED_BITS",
    "bytes_along_tokens",
    "codes_per_word",
    "compiled_kernels",
    "decode_plan",
    "dequantize_affine",
    "dequantize_along_tokens",
    "dequantize_symmetric",
    "pack_codes",
    "pack_planes",
    "plane_widths",
    "quantize_affine",
    "quantize_symmetric",
    "symmetric_step",
    "triton_module",
    "unpack_codes",
    "unpack_planes",
    "words_along_tokens",
]
