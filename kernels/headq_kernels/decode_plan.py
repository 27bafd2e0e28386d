"""The host side of the fused decode attention: segments, splits and the tables the kernel reads.

Nothing here needs Triton or a GPU. :func:`plan` turns the segments of one layer (sinks, encoded
blocks, window; keys and values) into a table of device pointers and strides and a list of
splits; ``triton_decode.attend`` runs a plan on the GPU, and :func:`attend_torch` computes the
same thing split by split in torch, so that the planning is tested wherever the tests run.

Plan once, run many: the splits depend only on where the segments start and end, which every
layer of a model shares in a step, and the pointer table only on where a layer's buffers are,
which changes when a buffer grows. :class:`Tables` keeps both on the device, keyed by those
integers, so a decode step uploads the splits once for all layers and a layer's pointers only
after its buffers move.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from headq_kernels.affine_reference import dequantize_affine, dequantize_along_tokens
from headq_kernels.symmetric_reference import dequantize_symmetric


def next_power_of_2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


# Columns of the segment table (int64); what the pointers hold depends on the segment's kind.
KIND, TOKENS, PTR0, PTR1, PTR2, PTR3, PTR4, STRIDE_B, STRIDE_H, STRIDE_T, EXTRA = range(11)
COLUMNS = 11
# Segment kinds. Keys: AFFINE (AffineTokens), DENSE, CODEBOOK, SCALED, ROTATED; values: AFFINE
# (AffineChannels), DENSE, MIXED, CODEBOOK, SCALED, ROTATED.
AFFINE, DENSE, MIXED, CODEBOOK, SCALED, ROTATED = range(6)
# Formats of scaled tokens: offset integers packed along channels, float8 e4m3 or e5m2 bytes.
INT, E4M3, E5M2 = range(3)


@dataclass
class Dense:
    """Exact tokens: the rows of ``data`` (b, h, rows, d) from row ``start``, any strides with a
    unit channel stride. The table points at row 0, so a buffer that gains tokens keeps its row;
    ``start`` goes to the splits."""

    data: torch.Tensor
    start: int = 0
    covered: int | None = None  # attend only the first ``covered`` rows from ``start``

    @property
    def tokens(self) -> int:
        return self.data.shape[-2] - self.start


@dataclass
class AffineTokens:
    """Keys grouped along tokens: codes (b, h, t*bits/8, d) uint8 (``bytes_along_tokens``),
    scale/zero (b, h, d, t/group), contiguous.

    ``side_codes`` (b, h, r, t*zbits/32) and ``side_step`` (b, h, t): HeadQ's mid-rise side code.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    tokens: int
    bits: int = 2
    group: int = 32
    side_codes: torch.Tensor | None = None
    side_step: torch.Tensor | None = None
    covered: int | None = None  # attend only the first ``covered`` tokens
    side_bits: int = 0
    side_basis: torch.Tensor | None = None  # (h, d, r): the side code reads ``side_sign * U^T q``
    side_sign: float = 1.0

    @property
    def side_rank(self) -> int:
        return 0 if self.side_codes is None or self.side_basis is None else self.side_basis.shape[-1]


@dataclass
class AffineChannels:
    """Values grouped along channels: codes (b, h, t, d*bits/32), scale/zero (b, h, t, d/group), contiguous."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    tokens: int
    bits: int = 2
    group: int = 32
    covered: int | None = None  # attend only the first ``covered`` tokens


@dataclass
class MixedChannels:
    """Values at per-token bit widths (A²), one allocation row of ``chunk`` tokens per KV head.

    codes (b, h, t/chunk * row_words) int32: each row's tokens' bases (a code's top ``widths[0]``
    bits, channels along the word as in :class:`AffineChannels`), then for each token above
    ``widths[0]``, in row order, the bits of each rung up to its width (``widths[0] * 2^s``,
    adding ``widths[0] * 2^(s - 1)`` bits), then zeros;
    width_index (b, h, t/chunk * ceil(chunk * index_bits / 32)) int32, each token's index into
    ``widths`` packed along tokens, or None with one width; scale/zero (b, h, t, d/group) float16.
    ``decode`` returns the tokens dequantized, (b, h, t, d) float32 (the reference).
    """

    codes: torch.Tensor
    width_index: torch.Tensor | None
    scale: torch.Tensor
    zero: torch.Tensor
    tokens: int
    widths: tuple[int, ...]
    group: int
    chunk: int
    row_words: int
    index_bits: int
    decode: Callable[[], torch.Tensor]
    covered: int | None = None


@dataclass
class Codebook:
    """Residual-VQ tokens (GSRQ): ``indices`` (b, h, t, bytes) uint8, the ``P x M`` codeword indices
    of a token bit-packed position-major, stage-minor, least significant bit first; ``books``: per
    stage (P, K_m, dim) float16, shared by every head; ``scale`` (h, d) float16 or None: the
    codewords approximate ``scale * x``. ``decode`` as for :class:`MixedChannels`.
    """

    indices: torch.Tensor
    books: tuple[torch.Tensor, ...]
    scale: torch.Tensor | None
    tokens: int
    decode: Callable[[], torch.Tensor]
    covered: int | None = None

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(book.shape[1]).bit_length() - 1 for book in self.books)


@dataclass
class Scaled:
    """Tokens of one row each with one float16 scale per token (vLLM's per-token-head formats):
    ``x = scale * level``. format INT: codes (b, h, t, d*bits/32) int32 packed along channels,
    ``level = code - (2^(bits-1) - 1)``; E4M3 / E5M2 (bits 8): codes (b, h, t, d/4) int32,
    each token's float8 bytes viewed as words.
    scale (b, h, t, 1) float16, or None: a unit scale. ``decode`` as for :class:`MixedChannels`.
    """

    codes: torch.Tensor
    scale: torch.Tensor | None
    tokens: int
    format: int
    bits: int
    decode: Callable[[], torch.Tensor]
    covered: int | None = None


@dataclass
class Rotated:
    """Tokens in a rotated basis (the TurboQuant family): ``x = (norm / sqrt(d)) * y R``, where
    the first half of ``y`` is ``levels[0][code]`` at ``widths[0]`` bits and the second half
    ``levels[1][code]`` at ``widths[1]``. first, second (b, h, t, words) int32: each half's codes as
    bit planes (``pack_planes``); norm (b, h, t, 1) float16; levels (2, 16) float32.

    basis (d, d) float32: ``R`` with its rows interleaved (row ``2i`` is ``R[i]``, ``2i + 1`` is
    ``R[d/2 + i]``), so that the kernel sets the two halves' levels side by side: it attends with
    ``basis q`` and turns its values' readout back with ``basis``.
    """

    first: torch.Tensor
    second: torch.Tensor
    norm: torch.Tensor
    levels: torch.Tensor
    basis: torch.Tensor
    tokens: int
    widths: tuple[int, int]
    decode: Callable[[], torch.Tensor]
    covered: int | None = None


Segment = Dense | AffineTokens | AffineChannels | MixedChannels | Codebook | Scaled | Rotated


def kind(seg: Segment) -> int:
    if isinstance(seg, Dense):
        return DENSE
    if isinstance(seg, MixedChannels):
        return MIXED
    if isinstance(seg, Codebook):
        return CODEBOOK
    if isinstance(seg, Scaled):
        return SCALED
    if isinstance(seg, Rotated):
        return ROTATED
    return AFFINE


def interleaved_basis(rotation: torch.Tensor) -> torch.Tensor:
    """:attr:`Rotated.basis` of a rotation ``R`` (d, d): its rows of the two halves interleaved."""
    d = rotation.shape[0]
    return torch.stack([rotation[: d // 2], rotation[d // 2 :]], dim=1).reshape(d, d).float().contiguous()


@dataclass
class Plan:
    """Device tables for one decode step, and the tensors they point into (kept alive)."""

    segments: torch.Tensor  # (n_segments, COLUMNS) int64
    # per (key kind, value kind): (n, 7) int32 rows k_seg, k_off, v_seg, v_off, length, position, split
    launches: list[tuple[int, int, torch.Tensor]]
    n_splits: int
    length: int
    key_bits: int
    key_group: int
    value_bits: int
    value_group: int
    side_rank: int
    side_bits: int
    block_n: int  # tokens per tile: splits start on whole tiles, and tiles on key groups and mixed rows
    split: int  # the most tokens of one split
    parts: list[Segment] = field(default_factory=list)  # keys then values; keeps the tensors alive
    value_segments: int = 0  # the last ones of ``parts``
    # affine codes start on 16 bytes and key segments hold whole groups (the folded kernel's bytes)
    aligned: bool = False

    def every(self, kind_: int, *, keys: bool) -> list[Segment]:
        """The key (or value) segments of a kind."""
        n_keys = len(self.parts) - self.value_segments
        stream = self.parts[:n_keys] if keys else self.parts[n_keys:]
        return [seg for seg in stream if kind(seg) == kind_]

    def first(self, kind_: int, *, keys: bool) -> Segment | None:
        """The first key (or value) segment of a kind: the kernel's settings for that kind."""
        return next(iter(self.every(kind_, keys=keys)), None)


def _row(seg: Segment) -> list[int]:
    row = [0] * COLUMNS
    if isinstance(seg, Dense):
        d = seg.data
        if d.stride(-1) != 1:
            raise ValueError("dense segments need a unit channel stride")
        row[KIND], row[TOKENS], row[PTR0] = DENSE, seg.tokens, d.data_ptr()
        row[STRIDE_B], row[STRIDE_H], row[STRIDE_T] = d.stride(0), d.stride(1), d.stride(2)
        return row
    row[KIND], row[TOKENS] = kind(seg), seg.tokens
    if isinstance(seg, Scaled):  # PTR0 codes, PTR1 the scales (or 0)
        _contiguous([seg.codes, *([] if seg.scale is None else [seg.scale])])
        if seg.codes.data_ptr() % 16:  # the kernel reads a token's bytes as 16-byte vectors
            raise ValueError("scaled codes must start on 16 bytes")
        row[PTR0], row[PTR1] = seg.codes.data_ptr(), 0 if seg.scale is None else seg.scale.data_ptr()
        return row
    if isinstance(seg, Rotated):  # PTR0 / PTR1 the halves' codes, PTR2 norms, PTR3 levels, PTR4 basis
        tensors = [seg.first, seg.second, seg.norm, seg.levels, seg.basis]
        _contiguous(tensors)
        row[PTR0], row[PTR1], row[PTR2], row[PTR3], row[PTR4] = (t.data_ptr() for t in tensors)
        return row
    if isinstance(seg, Codebook):
        # PTR0 indices, PTR1 / PTR2 the first two stages' codebooks, PTR3 the channel scale (or 0)
        if len(seg.books) > 2 or any(book.dtype != torch.float16 for book in seg.books):
            raise ValueError("codebook segments take one or two float16 stages")
        if any(book.data_ptr() % 16 for book in seg.books):  # the kernel reads codewords as 16-byte vectors
            raise ValueError("codebooks must start on 16-byte boundaries")
        tensors = [seg.indices, *seg.books, *([] if seg.scale is None else [seg.scale])]
        _contiguous(tensors)
        row[PTR0], row[PTR1] = seg.indices.data_ptr(), seg.books[0].data_ptr()
        row[PTR2] = seg.books[1].data_ptr() if len(seg.books) > 1 else 0
        row[PTR3] = 0 if seg.scale is None else seg.scale.data_ptr()
        return row
    # affine and mixed: PTR0 codes, PTR1 scale, PTR2 zero; PTR3 / PTR4 the side code and its steps
    # (AffineTokens) or the width index (MixedChannels, with the row's words in EXTRA)
    _contiguous([seg.codes, seg.scale, seg.zero])
    row[PTR0], row[PTR1], row[PTR2] = seg.codes.data_ptr(), seg.scale.data_ptr(), seg.zero.data_ptr()
    if isinstance(seg, AffineTokens) and seg.side_codes is not None:
        assert seg.side_step is not None
        _contiguous([seg.side_codes, seg.side_step])
        row[PTR3], row[PTR4] = seg.side_codes.data_ptr(), seg.side_step.data_ptr()
    if isinstance(seg, MixedChannels):
        if seg.width_index is not None:
            _contiguous([seg.width_index])
            row[PTR3] = seg.width_index.data_ptr()
        row[EXTRA] = seg.row_words
    return row


def _contiguous(tensors: list[torch.Tensor]) -> None:
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("encoded segments must be contiguous")


def _bounds(segments: Sequence[Segment]) -> list[int]:
    return list(itertools.accumulate(map(_covered, segments), initial=0))


def _covered(seg: Segment) -> int:
    return seg.tokens if seg.covered is None else seg.covered


def _first(segments: Sequence[Segment], cls: type) -> Any:
    return next((seg for seg in segments if isinstance(seg, cls)), None)


def tile_tokens(head_dim: int, key_group: int, chunk: int) -> int:
    """Tokens per tile of the decode kernels: 128 up to head_dim 128, 64 above (tuned on an H100 at
    Llama-3-8B shapes, docs/kernels.md; 64 is the least at which the folded kernel's 2-bit key
    products take 16 tokens per code position), and whole key groups and allocation rows of
    mixed-width values."""
    return max(128 if head_dim <= 128 else 64, key_group, chunk)


def split_length(length: int, batch_heads: int, block_n: int) -> int:
    """Tokens per split: enough splits times ``batch_heads`` programs to fill an H100's 132 SMs
    eight times over (no kernel is specialized on it: it may change from step to step). With three
    folded programs a multiprocessor, four times over left a second wave a third full at batch 8,
    32k (docs/kernels.md)."""
    want = max(1, math.ceil(8 * 132 / max(1, batch_heads)))
    return min(4096, max(block_n, next_power_of_2(max(1, length // want))))


def _splits(
    layout: tuple[Any, ...], key_group: int, block_n: int, split: int, strict: bool
) -> tuple[dict[tuple[int, int], list[tuple[int, ...]]], int, int]:
    """Split rows per pair of segment kinds for a layout (see :func:`plan`): rows, splits, length."""
    keys, values = layout
    kb = list(itertools.accumulate((n for _, n, _, _ in keys), initial=0))
    vb = list(itertools.accumulate((n for _, n, _, _ in values), initial=0))
    length = kb[-1]
    if vb[-1] != length:
        raise ValueError(f"keys cover {length} tokens, values {vb[-1]}")
    cuts = sorted(set(kb) | set(vb))
    rows: dict[tuple[int, int], list[tuple[int, ...]]] = {}
    ki = vi = n_splits = 0
    for a, z in itertools.pairwise(cuts):
        while kb[ki + 1] <= a:
            ki += 1
        while vb[vi + 1] <= a:
            vi += 1
        (k_kind, _, k_start, _), (v_kind, _, v_start, chunk) = keys[ki], values[vi]
        for start in range(a, z, split):
            k_off, v_off = start - kb[ki], start - vb[vi]
            if strict and k_kind == AFFINE and k_off % key_group:
                raise ValueError(f"a split starts inside a key group (token {start})")
            if strict and v_kind == MIXED and (v_off % chunk or block_n % chunk):
                raise ValueError(f"a split or tile starts inside an allocation row (token {start})")
            row = (
                ki,
                k_off + k_start,
                len(keys) + vi,
                v_off + v_start,
                min(split, z - start),
                start,
                n_splits,
            )
            rows.setdefault((k_kind, v_kind), []).append(row)
            n_splits += 1
    return rows, n_splits, length


class Tables:
    """Device copies of split and pointer tables, by the integers they hold (plan once, run many).

    Tables are uploaded from pinned memory without a sync and kept for the ``size`` latest keys
    of each kind: a step's splits serve every layer, a layer's pointers every step until a buffer
    of it moves.
    """

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._held: dict[Any, Any] = {}

    def get(self, key: Any, make: Any) -> Any:
        found = self._held.pop(key, None)
        if found is None:
            found = make()
            while self._held and len(self._held) >= self.size:
                del self._held[next(iter(self._held))]
        if self.size:
            self._held[key] = found
        return found


def _upload(rows: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def plan(
    keys: Sequence[Segment],
    values: Sequence[Segment],
    *,
    batch_heads: int,
    block_n: int = 64,
    split: int | None = None,
    strict: bool = True,
    tables: Tables | None = None,
) -> Plan:
    """Tables for the decode kernel: key and value segments in token order, each covering the same tokens.

    Splits never cross a segment boundary of either stream and, for the kernel (``strict``), start
    on a whole key group of an affine key segment and on a whole allocation row of a mixed value
    segment (:func:`attend_torch` needs neither); ``split`` caps their length (by default
    :func:`split_length`). The kernel's settings (bits, groups, side code) are the first affine
    segment's of each stream. ``tables``: reuse device tables made for the same integers.
    """
    tables = tables or Tables(size=0)
    if any(isinstance(seg, AffineChannels) for seg in keys) or any(
        isinstance(seg, AffineTokens) for seg in values
    ):
        raise ValueError("the kernel reads affine keys grouped along tokens and affine values along channels")
    k_affine, v_affine = _first(keys, AffineTokens), _first(values, AffineChannels)
    key_group = k_affine.group if k_affine is not None else 0
    layout = tuple(
        tuple(
            (kind(seg), _covered(seg), seg.start if isinstance(seg, Dense) else 0, getattr(seg, "chunk", 0))
            for seg in stream
        )
        for stream in (keys, values)
    )
    length = sum(n for _, n, _, _ in layout[0])
    split = split_length(length, batch_heads, block_n) if split is None else split
    split = max(block_n, split // block_n * block_n)
    device = first_tensor([*keys, *values][0]).device
    rows = [_row(seg) for seg in [*keys, *values]]

    def make_splits() -> tuple[list[tuple[int, int, torch.Tensor]], int]:
        by_pair, n_splits, _ = _splits(layout, key_group, block_n, split, strict)
        return [(k, v, _upload(r, torch.int32, device)) for (k, v), r in by_pair.items()], n_splits

    launches, n_splits = tables.get(
        ("splits", layout, key_group, block_n, split, strict, device), make_splits
    )
    table = tables.get(
        ("segments", tuple(map(tuple, rows)), device), lambda: _upload(rows, torch.int64, device)
    )
    return Plan(
        segments=table,
        launches=launches,
        n_splits=n_splits,
        length=length,
        key_bits=k_affine.bits if k_affine is not None else 0,
        key_group=key_group,
        value_bits=v_affine.bits if v_affine is not None else 0,
        value_group=v_affine.group if v_affine is not None else 0,
        side_rank=k_affine.side_rank if k_affine is not None else 0,
        side_bits=k_affine.side_bits if k_affine is not None else 0,
        block_n=block_n,
        split=split,
        parts=[*keys, *values],
        value_segments=len(values),
        aligned=all(
            seg.codes.data_ptr() % 16 == 0
            and (not isinstance(seg, AffineTokens) or seg.tokens % seg.group == 0)
            for seg in [*keys, *values]
            if isinstance(seg, AffineTokens | AffineChannels)
        ),
    )


def first_tensor(seg: Segment) -> torch.Tensor:
    """A segment's first stored tensor, (b, kv_heads, ...)."""
    if isinstance(seg, Dense):
        return seg.data
    if isinstance(seg, Rotated):
        return seg.first
    return seg.indices if isinstance(seg, Codebook) else seg.codes


def attend_torch(
    q: torch.Tensor,
    plan: Plan,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    side_query: torch.Tensor | None = None,
    tail_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the kernel computes, in float32 torch, split by split, then merged: (b, hkv, g, d).

    Same arguments as ``triton_decode.attend``; for tests of the plan on any device.
    """
    parts = []
    decoded: dict[int, torch.Tensor] = {}

    def tokens(index: int, off: int, length: int) -> torch.Tensor:
        if index not in decoded:
            decoded[index] = _decoded(plan.parts[index])
        return decoded[index][..., off : off + length, :]

    for _, _, splits in plan.launches:
        for k_seg, k_off, v_seg, v_off, length, position, split in splits.tolist():
            if not length:  # an empty row of a launch sized for more (the static decode's)
                continue
            keys = tokens(k_seg, k_off, length)
            values = tokens(v_seg, v_off, length)
            logits = q.float() @ keys.transpose(-1, -2)
            seg = plan.parts[k_seg]
            if isinstance(seg, AffineTokens) and seg.side_rank:
                assert side_query is not None and seg.side_step is not None and seg.side_codes is not None
                steps = seg.side_step.float().unsqueeze(-2)
                z = dequantize_symmetric(seg.side_codes, steps, seg.side_bits, seg.tokens)
                logits = logits + side_query.float() @ z[..., k_off : k_off + length]
            logits = logits * scale
            if mask is not None:
                keep = mask[:, None, None, position : position + length].bool()
                logits = logits.masked_fill(~keep, float("-inf"))
            top = logits.amax(-1, keepdim=True)
            top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
            p = torch.exp(logits - top)
            parts.append((split, position, logits, top, p.sum(-1, keepdim=True), p @ values))
    parts.sort(key=lambda part: part[0])
    tops = torch.stack([part[3] for part in parts])
    best = tops.amax(0)
    best = torch.where(torch.isinf(best), torch.zeros_like(best), best)
    weights = torch.exp(tops - best)
    mass = sum(w * part[4] for w, part in zip(weights, parts, strict=True))
    out = sum(w * part[5] for w, part in zip(weights, parts, strict=True))
    assert isinstance(mass, torch.Tensor) and isinstance(out, torch.Tensor)
    if tail_probs is not None:
        lse = best + mass.clamp_min(1e-30).log()
        every = torch.cat([part[2] for part in sorted(parts, key=lambda part: part[1])], dim=-1)
        probs = torch.exp(every[..., plan.length - tail_probs.shape[-1] :] - lse)
        tail_probs.copy_(torch.where(mass > 0, probs, torch.zeros_like(probs)))
    return torch.where(mass > 0, out / mass.clamp_min(1e-30), torch.zeros_like(out)).to(q.dtype)


def _decoded(seg: Segment) -> torch.Tensor:
    """A segment's tokens, dequantized: (b, h, tokens, d) float32 (a dense one: all its rows)."""
    if isinstance(seg, Dense):
        return seg.data.float()
    if isinstance(seg, MixedChannels | Codebook | Scaled | Rotated):
        return seg.decode().float()
    dequantize = dequantize_affine if isinstance(seg, AffineChannels) else dequantize_along_tokens
    return dequantize(seg.codes, seg.scale, seg.zero, seg.bits, seg.group)
