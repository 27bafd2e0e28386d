"""Which decode plans run on the folded kernel (:mod:`headq_kernels.triton_folded`), and the
settings of its launches: the sizes of its products and scratch, its register cap and pipeline
depth, each chosen by what measured faster on an H100 (docs/kernels.md).
``benchmarks/kernel_report.py`` compiles with the same settings.
"""

from __future__ import annotations

from typing import Any

import triton

from headq_kernels.decode_plan import MixedChannels, Plan

FOLD_BITS = (2, 4)  # code widths the kernel folds


def rows(groups: int, heads: int) -> int:
    """Rows of a folded product: groups x heads (heads padded to a power of two), at least 16."""
    return max(16, groups * triton.next_power_of_2(heads))


def bias_columns(plan: Plan) -> int:
    """Columns of the key zero-term scratch: the key groups of the longest split, at least 16."""
    return max(16, triton.next_power_of_2(-(-plan.split // plan.key_group)))


def registers(
    head_dim: int, heads: int, key_bits: int, side_rank: int, hilo: bool, mixed: bool
) -> int | None:
    """The register cap of a launch with 3 or 4 query heads per KV head (where it was measured) and
    head_dim up to 128: 128, four programs a multiprocessor, for 2-bit keys with affine values
    (KIVI-2, and HeadQ up to rank 8 on it, with 7 local loads and stores a tile there); 168, three instead
    of two, for the others (KIVI-4, A²). Both were faster on an H100 (docs/kernels.md). With other
    head counts, ``hilo`` or head_dim 256 these caps spill more in the token loop
    (benchmarks/kernel_report.py), so there is none."""
    if head_dim > 128 or hilo or triton.next_power_of_2(heads) != 4:
        return None
    return 128 if key_bits == 2 and side_rank <= 8 and not mixed else 168


STAGES = 3
"""The software pipeline's depth of a launch: the code bytes of two tiles ahead in flight (20 KiB of
shared memory a program at 2 bits). Faster on an H100 than two for affine and mixed-width values
alike (docs/kernels.md)."""


def settings(
    head_dim: int, heads: int, key_bits: int, side_rank: int, hilo: bool, mixed: bool
) -> dict[str, Any]:
    """What a launch of the kernel takes besides its tables and shapes: its pipeline depth and
    register cap."""
    return dict(num_stages=STAGES, maxnreg=registers(head_dim, heads, key_bits, side_rank, hilo, mixed))


def _values_fold(widths: tuple[int, ...], group: int, heads: int, head_dim: int) -> bool:
    return (
        all(b in FOLD_BITS and group % (32 // b) == 0 and head_dim * b // 8 >= 16 for b in widths)
        and head_dim % group == 0
        and rows(head_dim // group, heads) <= 32
    )


def rung_places(mixed: MixedChannels, head_dim: int) -> int:
    """Rung slots of an allocation row of two-width ``mixed`` values (each as wide as a token's
    base, after the row's bases), as the kernel's power of two."""
    lo_words = head_dim * mixed.widths[0] // 32
    return triton.next_power_of_2(max(1, (mixed.row_words - mixed.chunk * lo_words) // lo_words))


def eligible(plan: Plan, heads: int, head_dim: int, *, mixed: MixedChannels | None = None) -> bool:
    """Whether the launches of ``plan`` with affine keys and affine values (or the ``mixed`` value
    segments) can run folded (float16 queries checked by the caller)."""
    kb, kg = plan.key_bits, plan.key_group
    keys = (
        kb in FOLD_BITS
        and kg % (32 // kb) == 0
        and plan.block_n % kg == 0
        and plan.block_n * kb // 8 >= 16  # a token plane's columns: tokens of one code position
        and heads <= 16
        and rows(plan.block_n // kg, heads) <= 32
        and plan.side_rank <= 16
        and plan.aligned
    )
    if mixed is None:
        return keys and _values_fold((plan.value_bits,), plan.value_group, heads, head_dim)
    lo_words = head_dim * mixed.widths[0] // 32
    return (
        keys
        and (len(mixed.widths) == 1 or (len(mixed.widths) == 2 and mixed.widths[1] == 2 * mixed.widths[0]))
        and mixed.chunk <= 128
        and plan.block_n % mixed.chunk == 0
        and _values_fold(mixed.widths, mixed.group, heads, head_dim)
        # the kernel reads a token's base and rung as 16-byte vectors
        and lo_words % 4 == 0
        and mixed.row_words % lo_words == 0
        and mixed.codes.data_ptr() % 16 == 0
    )
