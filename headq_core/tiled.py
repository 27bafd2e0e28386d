"""Attention of a multi-token pass over a quantized layer, in bounded memory.

n in-flight queries over T tokens would need (b, kv_heads, g·n, T) float32 logits at once. Here
the queries go in chunks of positions, and each chunk meets the tokens piece by piece in token
order: the sinks, slices of the encoded arenas (a key method computes the logits of its own
slice, HeadQ's correction included; a value policy reads out its own slice), and the exact
tokens. An online softmax (running maximum and sum, as flash attention merges its splits)
combines the pieces, so the extra memory is one chunk's tile of logits, about
:data:`TILE_ELEMENTS` float32 values, whatever n and T are.

A value policy that wants an attention statistic (A²) needs each token's final probability
before the layer encodes its values, and the readout needs those values: such a pass goes over
the keys three times per chunk (the log-sum-exp of every row, then the statistic of the tokens
still in the window, then, once :meth:`~headq_core.layer.QuantizedLayer.end_step` has stored the
values, the readout with the known log-sum-exp). Every other pass goes over them once.

Which tokens a query reads encoded follows :meth:`~headq_core.step.Step.encoded_limit`: in
serving the limit is one position known on the host, so a slice is read through its method or
exact as a whole, and nothing is computed twice; when emulating streaming each query has its own
limit, and slices flushed by the pass are read both ways and chosen per query.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import torch

from headq_core.layer import QuantizedLayer
from headq_core.layouts import EncodedBlock
from headq_core.step import Step, StreamView

TILE_ELEMENTS = 1 << 25  # float32 logits of one tile: 128 MiB (a pass holds a few such tensors)
MIN_TILE = 1024  # tokens per tile before the queries are split into chunks


@attrs.frozen
class Piece:
    """Tokens ``[start, stop)`` of one stream: an encoded ``block``, or exact tokens (``block`` None)."""

    start: int
    stop: int
    block: EncodedBlock | None


def pieces(view: StreamView, tile: int) -> Iterator[Piece]:
    """The stream's tokens ``[0, view.length)`` in token order, at most about ``tile`` per piece
    (an arena is cut in whole units of its quantum)."""
    if view.sink_len:
        yield Piece(0, view.sink_len, None)
    pos = view.stored_from  # tokens a sliding window dropped are never read
    if not view.identity:
        for arena in view.arenas:
            unit = max(1, tile // arena.quantum) * arena.quantum
            for offset in range(0, arena.tokens, unit):
                stop = min(offset + unit, arena.tokens)
                yield Piece(pos + offset, pos + stop, arena.slice(offset, stop))
            pos += arena.tokens
    for start in range(pos, view.length, tile):
        yield Piece(start, min(start + tile, view.length), None)


@attrs.frozen
class _Stream:
    """How one chunk of queries reads one stream: its encoded pieces from ``view`` (the stream as
    stored), its exact tokens from ``rows`` (the stream when the pass began, whose exact rows
    stay readable through the pass) and per query the end of what it reads encoded."""

    view: StreamView
    rows: StreamView
    limit: torch.Tensor  # (queries,) per in-flight query
    host_limit: int | None  # the same, where every query shares it (serving)
    sinks: int

    def exact(self, start: int, stop: int) -> torch.Tensor:
        if start < self.rows.sink_len:
            assert self.rows.sinks is not None and stop <= self.rows.sink_len
            return self.rows.sinks[..., start:stop, :].float()
        assert self.rows.exact is not None
        return self.rows.exact.rows(start, stop).float()

    def encoded(self, start: int, stop: int, chunk: _Chunk) -> torch.Tensor:
        """(rows, stop - start) bool: whether the chunk's queries read these tokens encoded."""
        k = torch.arange(start, stop, device=self.limit.device)
        return chunk.rows((k >= self.sinks) & (k < self.limit[chunk.first : chunk.stop, None]))

    def split(self, piece: Piece, chunk: _Chunk) -> tuple[int, torch.Tensor | None]:
        """Columns ``[piece.start, split)`` of an encoded piece are read encoded; of
        ``[split, piece.stop)``, those where the returned (rows, columns) mask holds (None: none)."""
        first = max(piece.start, min(piece.stop, self.rows.exact_first))
        if self.host_limit is not None:
            return max(first, min(piece.stop, self.host_limit)), None
        return first, self.encoded(first, piece.stop, chunk)


@attrs.frozen
class _Chunk:
    """In-flight queries ``[first, stop)`` (offsets into the pass), grouped heads folded into rows."""

    q: torch.Tensor  # (b, hkv, g * (stop - first), d) float32
    first: int
    stop: int
    g: int

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """(positions, ...) -> (g * positions, ...) in the folded row order (head in group, position)."""
        return t.repeat(self.g, *([1] * (t.ndim - 1)))


class _Pass:
    """One multi-token pass of one layer: its keys' logits and its values' readout per piece."""

    def __init__(
        self,
        step: Step,
        mask: torch.Tensor | None,
        scaling: float,
        softcap: float | None,
        tile: int,
        device: torch.device,
    ) -> None:
        self.step, self.mask, self.scaling, self.softcap, self.tile = step, mask, scaling, softcap, tile
        self.device = device
        self.keys = self._stream(step.keys, step.keys)

    def _stream(self, view: StreamView, rows: StreamView) -> _Stream:
        step = self.step
        limit = step.encoded_limit(rows, self.device)
        return _Stream(view, rows, limit, step.shared_limit(rows), step.sinks)

    def values(self, view: StreamView) -> _Stream:
        return self._stream(view, self.step.values)

    # --- keys -------------------------------------------------------------------------------

    def logits(self, piece: Piece, chunk: _Chunk) -> torch.Tensor:
        """(b, hkv, rows, piece tokens): scaled, softcapped and masked (-inf) logits."""
        keys = self.keys
        if piece.block is None:
            out = chunk.q @ keys.exact(piece.start, piece.stop).mT
        else:
            split, where = keys.split(piece, chunk)
            out = keys.view.method.logits(chunk.q, piece.block, self.step.layer_idx)  # type: ignore[union-attr]
            if split < piece.stop:
                exact = chunk.q @ keys.exact(split, piece.stop).mT
                tail = exact if where is None else torch.where(where, out[..., split - piece.start :], exact)
                out = torch.cat([out[..., : split - piece.start], tail], dim=-1)
        out = out * self.scaling
        if self.softcap:
            out = self.softcap * torch.tanh(out / self.softcap)
        allowed = self._mask(piece.start, piece.stop, chunk)
        return out if allowed is None else out.masked_fill(~allowed, float("-inf"))

    def _mask(self, start: int, stop: int, chunk: _Chunk) -> torch.Tensor | None:
        """(b or 1, 1, rows, stop - start) bool, True = attend; None = every column."""
        step, device = self.step, chunk.q.device
        if self.mask is None:
            if stop <= step.start + chunk.first + 1:
                return None  # causal, and every column is at or before the chunk's first query
            q = torch.arange(step.start + chunk.first, step.start + chunk.stop, device=device)
            return chunk.rows(torch.arange(start, stop, device=device) <= q[:, None])[None, None]
        offset = self.mask.shape[-1] - step.length
        m = self.mask[..., offset + start : offset + stop]
        if m.shape[-2] > 1:
            m = m[..., chunk.first : chunk.stop, :].repeat(1, 1, chunk.g, 1)
        return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2

    def columns(self, chunk: _Chunk, first: int = 0) -> _Columns:
        return _Columns(self, chunk, first)

    # --- values -----------------------------------------------------------------------------

    def readout(self, values: _Stream, piece: Piece, weights: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
        """(b, hkv, rows, d): ``weights`` (b, hkv, rows, piece tokens) applied to the piece's values."""
        if piece.block is None:
            return weights @ values.exact(piece.start, piece.stop)
        split, where = values.split(piece, chunk)
        cut = split - piece.start
        out = None
        if cut or where is not None:
            encoded = weights
            if split < piece.stop:
                tail = torch.zeros_like(weights[..., cut:]) if where is None else weights[..., cut:] * where
                encoded = torch.cat([weights[..., :cut], tail], dim=-1)
            out = values.view.method.readout(encoded, piece.block, self.step.layer_idx)  # type: ignore[union-attr]
        if split < piece.stop:
            tail = weights[..., cut:] if where is None else weights[..., cut:] * ~where
            exact = tail @ values.exact(split, piece.stop)
            out = exact if out is None else out + exact
        assert out is not None
        return out


class _Columns:
    """The keys' logits of one chunk, taken range by range in token order, each piece computed once."""

    def __init__(self, attn: _Pass, chunk: _Chunk, first: int) -> None:
        self.attn, self.chunk = attn, chunk
        self.todo = (p for p in pieces(attn.step.keys, attn.tile) if p.stop > first)
        self.start = self.stop = first
        self.held: torch.Tensor | None = None  # logits of [start, stop)

    def take(self, start: int, stop: int) -> torch.Tensor:
        parts = [] if self.held is None else [self.held[..., start - self.start :]]
        while self.stop < stop:
            piece = next(self.todo)
            logits = self.attn.logits(piece, self.chunk)
            parts.append(logits[..., max(0, start - piece.start) :])
            self.stop = piece.stop
        held = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        self.held, self.start = held, start
        return held[..., : stop - start]


def attend_tiled(
    layer: QuantizedLayer,
    step: Step,
    q: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """Attention of grouped queries q (b, hkv, g·n, d) float32, rows ordered (head in group,
    position), over the pass ``step`` of ``layer``; ends the step. Returns (b, hkv, g·n, d) float32.

    mask: transformers' (b, 1, n or 1, T) mask (bool, True = attend, or additive), or None for
    the causal rule.
    """
    b, hkv, rows, _ = q.shape
    n = step.queries
    g = rows // n
    budget = max(1, TILE_ELEMENTS // (b * hkv * rows))  # columns of a tile holding every query
    if budget >= MIN_TILE or budget >= step.length:
        tile, per_chunk = budget, n
    else:
        tile, per_chunk = MIN_TILE, max(1, TILE_ELEMENTS // (b * g * hkv * MIN_TILE))
    grouped = q.unflatten(2, (g, n))
    chunks = [
        _Chunk(grouped[:, :, :, i : i + per_chunk].flatten(2, 3), i, min(i + per_chunk, n), g)
        for i in range(0, n, per_chunk)
    ]
    attn = _Pass(step, mask, scaling, softcap, tile, q.device)
    if step.statistic is None:
        values = attn.values(layer.end_step(step))  # stored before the attention (nothing waits for it)
        out = [_online(attn, values, chunk) for chunk in chunks]
    else:
        lse = [_log_sum_exp(attn, chunk) for chunk in chunks]
        statistic = sum(_statistic(attn, chunk, s) for chunk, s in zip(chunks, lse, strict=True))
        values = attn.values(layer.end_step(step, statistic))  # type: ignore[arg-type]
        out = [_read(attn, values, chunk, s) for chunk, s in zip(chunks, lse, strict=True)]
    return torch.cat([o.unflatten(2, (g, -1)) for o in out], dim=3).flatten(2, 3)


def _finite(m: torch.Tensor) -> torch.Tensor:
    """A row's running maximum, 0 where the row has attended to nothing yet (-inf)."""
    return m.masked_fill(m == float("-inf"), 0.0)


def _online(attn: _Pass, values: _Stream, chunk: _Chunk) -> torch.Tensor:
    """One pass: logits and readout piece by piece, merged by a running maximum and sum."""
    columns = attn.columns(chunk)
    m, s, acc = _empty(chunk)
    for piece in pieces(values.view, attn.tile):
        logits = columns.take(piece.start, piece.stop)
        m_new = torch.maximum(m, logits.amax(dim=-1, keepdim=True))
        base = _finite(m_new)
        p = torch.exp(logits - base)
        alpha = torch.exp(m - base)
        s = s * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + attn.readout(values, piece, p, chunk)
        m = m_new
    return acc / s.clamp(min=torch.finfo(s.dtype).tiny)  # rows that attend to nothing: zeros


def _empty(chunk: _Chunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Running maximum (-inf), sum and output (zeros) of the chunk's rows before any piece."""
    shape = (*chunk.q.shape[:-1], 1)
    return chunk.q.new_full(shape, float("-inf")), chunk.q.new_zeros(shape), torch.zeros_like(chunk.q)


def _log_sum_exp(attn: _Pass, chunk: _Chunk) -> torch.Tensor:
    """(b, hkv, rows, 1) log-sum-exp of every row's logits; -inf for a row that attends to nothing."""
    m, s, _ = _empty(chunk)
    for piece in pieces(attn.step.keys, attn.tile):
        logits = attn.logits(piece, chunk)
        m_new = torch.maximum(m, logits.amax(dim=-1, keepdim=True))
        base = _finite(m_new)
        s = s * torch.exp(m - base) + torch.exp(logits - base).sum(dim=-1, keepdim=True)
        m = m_new
    return _finite(m) + torch.log(s)


def _statistic(attn: _Pass, chunk: _Chunk, lse: torch.Tensor) -> torch.Tensor:
    """(b, hkv, T) the chunk's attention (or its square) on the T tokens that were in the values'
    window when the pass began, summed over rows, zero where a query reads the token encoded."""
    step = attn.step
    first = step.values.exact_first
    values = attn.values(step.values)
    columns = attn.columns(chunk, first)
    out = []
    for start in range(first, step.length, attn.tile):
        stop = min(start + attn.tile, step.length)
        p = torch.exp(columns.take(start, stop) - _finite(lse))
        seen = p * ~values.encoded(start, stop, chunk)
        out.append((seen.square() if step.statistic == "sq_attention" else seen).sum(dim=-2))
    return torch.cat(out, dim=-1) if out else lse.new_zeros((*lse.shape[:2], 0))


def _read(attn: _Pass, values: _Stream, chunk: _Chunk, lse: torch.Tensor) -> torch.Tensor:
    """The readout with every row's log-sum-exp known."""
    columns = attn.columns(chunk)
    out = None
    for piece in pieces(values.view, attn.tile):
        p = torch.exp(columns.take(piece.start, piece.stop) - _finite(lse))
        part = attn.readout(values, piece, p, chunk)
        out = part if out is None else out + part
    assert out is not None
    return out
