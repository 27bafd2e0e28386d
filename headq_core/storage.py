"""Where a layer's tokens live: exact tokens and encoded blocks, in buffers with room to grow.

Both kinds of storage keep their tensors in buffers with spare capacity along the token axis, so
that storing tokens writes in place, never copies what is already stored, and a kernel reads a
whole stream from a few pointers that change only when a buffer grows (a geometric growth: the
pointers change O(log n) times over n tokens). Records are frozen: an update returns a new record
that may share its buffers with the old one, whose live rows it never writes, so a record kept
from before a pass is a snapshot of the state before it (what a failed pass restores).

- :class:`ExactTokens`: tokens as the model made them, ``(batch, kv_heads, capacity, head_dim)``;
  the window, the sinks, and everything an identity method (``fp16``) stores.
- :class:`BlockArena`: the blocks a method encoded, merged into one block whose stored tensors
  are buffers of ``capacity`` tokens: :meth:`BlockArena.stored` is a block of the tokens stored so
  far, :meth:`BlockArena.kernel_segment` describes the buffers to the fused kernel.
- :class:`Stream`: one layer's keys or values: sinks, arenas, the window.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import attrs
import torch

from headq_core.interfaces import KeyQuantizer, ValuePolicy
from headq_core.layouts import _META, DenseBlock, EncodedBlock, NoKernelLayout

MIN_SLACK = 128  # spare tokens a buffer is given beyond what it holds when it (re)allocates


def _room(needed: int, quantum: int = 1) -> int:
    """Capacity for ``needed`` tokens: a quarter more (at least MIN_SLACK), a multiple of ``quantum``."""
    want = needed + max(MIN_SLACK, needed // 4)
    return -(-want // quantum) * quantum


@attrs.frozen
class ExactTokens:
    """Exact tokens: ``data`` (b, h, capacity, d); rows ``[start, stop)`` are live, and row ``r``
    holds the token at absolute position ``origin + r``."""

    data: torch.Tensor
    start: int
    stop: int
    origin: int

    @classmethod
    def of(cls, x: torch.Tensor, position: int, capacity: int = 0) -> ExactTokens:
        """A new buffer holding ``x`` (b, h, n, d), its first token at absolute ``position``."""
        n = x.shape[-2]  # room for MIN_SLACK more: a prompt is not copied into a quarter more
        data = x.new_empty((*x.shape[:2], max(capacity, n + MIN_SLACK), x.shape[-1]))
        data[..., :n, :].copy_(x)
        return cls(data, 0, n, position)

    @property
    def tokens(self) -> int:
        return self.stop - self.start

    @property
    def first(self) -> int:
        """Absolute position of the first live token."""
        return self.origin + self.start

    def view(self) -> torch.Tensor:
        return self.data[..., self.start : self.stop, :]

    def rows(self, first: int, stop: int) -> torch.Tensor:
        """The tokens at absolute positions ``[first, stop)``, live or not yet overwritten."""
        return self.data[..., first - self.origin : stop - self.origin, :]

    def append(self, x: torch.Tensor) -> ExactTokens:
        """These tokens and ``x`` after them: in place where the buffer has room, else in a new one."""
        n = x.shape[-2]
        if self.stop + n <= self.data.shape[-2]:
            self.data[..., self.stop : self.stop + n, :].copy_(x)
            return ExactTokens(self.data, self.start, self.stop + n, self.origin)
        # Compact the live rows to the front of a buffer sized for them (a window shrinks back
        # after a long prefill leaves it) or grow it: either way a quarter of spare room.
        grown = ExactTokens.of(self.view(), self.first, _room(self.tokens + n))
        return grown.append(x)

    def drop(self, n: int) -> ExactTokens:
        """Without the first ``n`` live tokens (their rows stay readable until the buffer moves)."""
        return ExactTokens(self.data, self.start + n, self.stop, self.origin)

    def compacted(self) -> ExactTokens:
        """These tokens in a buffer sized for them, where this one is more than twice that (the
        window after a long prompt was encoded); else the same record."""
        if self.data.shape[-2] <= 2 * _room(self.tokens):
            return self
        return ExactTokens.of(self.view(), self.first)

    def keep(self, n: int) -> ExactTokens:
        """Only the first ``n`` live tokens."""
        return ExactTokens(self.data, self.start, self.start + n, self.origin)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ExactTokens:
        """``fn`` (a batch reorder or selection) applied to the whole buffer."""
        return attrs.evolve(self, data=fn(self.data))


# --- encoded blocks in arenas -----------------------------------------------------------------

Path = tuple[str, ...]  # attribute names from a block to one of its (nested) tensors


def _batched(block: EncodedBlock, prefix: Path = ()) -> Iterator[tuple[Path, torch.Tensor, int]]:
    """(path, tensor, token axis) of every batched stored tensor, nested blocks included."""
    for field in attrs.fields(type(block)):
        value = getattr(block, field.name)
        if isinstance(value, EncodedBlock):
            yield from _batched(value, (*prefix, field.name))
        elif _META in field.metadata and value is not None and field.metadata[_META][1]:
            yield (*prefix, field.name), value, block.token_axis(field.name)


def _settings(block: EncodedBlock) -> tuple[Any, ...]:
    """Everything two blocks must share to live in one arena: types, plain fields, shared tensors
    (by identity), and the shape and dtype of batched tensors off their token axis."""
    out: list[Any] = [type(block)]
    for field in attrs.fields(type(block)):
        value = getattr(block, field.name)
        if field.name == "tokens":
            continue
        if isinstance(value, EncodedBlock):
            out.append(_settings(value))
        elif _META in field.metadata and value is not None:
            if field.metadata[_META][1]:
                axis = block.token_axis(field.name)
                shape = list(value.shape)
                shape[axis] = -1
                out.append((field.name, tuple(shape), value.dtype, value.device))
            else:
                out.append((field.name, id(value)))
        else:
            out.append((field.name, value if field.eq else id(value)))
    return tuple(out)


def _get(block: Any, path: Path) -> torch.Tensor:
    for name in path:
        block = getattr(block, name)
    return block  # type: ignore[no-any-return]


def _rebuilt(block: EncodedBlock, tensors: dict[Path, torch.Tensor], tokens: int, prefix: Path = ()) -> Any:
    """``block`` with the batched tensors at ``tensors``' paths and ``tokens`` tokens (nested too)."""
    changes: dict[str, Any] = {"tokens": tokens}
    for field in attrs.fields(type(block)):
        value = getattr(block, field.name)
        path = (*prefix, field.name)
        if isinstance(value, EncodedBlock):
            changes[field.name] = _rebuilt(value, tensors, tokens, path)
        elif path in tensors:
            changes[field.name] = tensors[path]
    return attrs.evolve(block, **changes)


@attrs.frozen
class _Layout:
    """Where an arena's tensors are and how they grow: per batched tensor its path, token axis,
    and length along that axis per token as ``num / den``; blocks appended must share ``settings``."""

    tensors: tuple[tuple[Path, int, int, int], ...]
    quantum: int
    settings: tuple[Any, ...]

    def units(self, index: int, tokens: int) -> int:
        _, _, num, den = self.tensors[index]
        return tokens * num // den


@attrs.frozen
class BlockArena:
    """Encoded blocks of one type and settings, merged: ``buffers`` is a block of ``capacity``
    tokens (its batched tensors sized for them), of which the first ``tokens`` are stored.

    Every tensor's length along its token axis is proportional to the tokens (e.g. 1/16 of a word
    per token for 2-bit codes packed along tokens, 1/32 of a scale for groups of 32). Every block
    appended must have exactly these lengths and a multiple of ``quantum`` tokens (the method's
    encode unit, and whole units of every tensor), so that the arena can be cut after any multiple
    of ``quantum`` tokens.
    """

    buffers: EncodedBlock
    tokens: int
    layout: _Layout
    memo: dict[str, Any] = attrs.field(
        factory=dict, eq=False, repr=False
    )  # per buffers: their kernel segment

    @classmethod
    def of(cls, block: EncodedBlock, unit: int = 1, capacity: int = 0) -> BlockArena:
        """An arena holding ``block`` (a multiple of ``unit`` tokens, the method's encode unit),
        room for ``capacity`` tokens or more."""
        tensors, quantum = [], unit
        for path, t, axis in _batched(block):
            ratio = Fraction(t.shape[axis], block.tokens)
            tensors.append((path, axis, ratio.numerator, ratio.denominator))
            quantum = math.lcm(quantum, ratio.denominator)
        empty = cls(block, 0, _Layout(tuple(tensors), quantum, _settings(block)))
        return empty._moved(max(capacity, _room(block.tokens, quantum))).append(block)

    @property
    def capacity(self) -> int:
        return self.buffers.tokens

    @property
    def quantum(self) -> int:
        return self.layout.quantum

    def fits(self, block: EncodedBlock) -> bool:
        layout = self.layout
        if block.tokens % layout.quantum or _settings(block) != layout.settings:
            return False
        return all(
            _get(block, path).shape[axis] * den == num * block.tokens
            for path, axis, num, den in layout.tensors
        )

    def append(self, block: EncodedBlock) -> BlockArena:
        """These tokens, then ``block``'s (which must :meth:`fit`), in place where there is room."""
        arena = self
        if self.tokens + block.tokens > self.capacity:
            arena = self._moved(_room(self.tokens + block.tokens, self.quantum))
        for i, (path, axis, _, _) in enumerate(self.layout.tensors):
            new = _get(block, path)
            start = self.layout.units(i, arena.tokens)
            _get(arena.buffers, path).narrow(axis, start, new.shape[axis]).copy_(new)
        return BlockArena(arena.buffers, arena.tokens + block.tokens, self.layout, arena.memo)

    def reserve(self, capacity: int) -> BlockArena:
        """These tokens in buffers with room for ``capacity`` tokens (rounded up to whole quanta):
        this record where its buffers have that room already."""
        capacity = -(-capacity // self.quantum) * self.quantum
        return self if capacity <= self.capacity else self._moved(capacity)

    def _moved(self, capacity: int) -> BlockArena:
        """The same tokens in new buffers of ``capacity`` tokens."""
        tensors = {}
        for i, (path, axis, _, _) in enumerate(self.layout.tensors):
            t = _get(self.buffers, path)
            shape = list(t.shape)
            shape[axis] = self.layout.units(i, capacity)
            buf = t.new_zeros(shape)  # spare rows decode to something valid (a reference decodes them)
            filled = self.layout.units(i, self.tokens)
            if filled:
                buf.narrow(axis, 0, filled).copy_(t.narrow(axis, 0, filled))
            tensors[path] = buf
        return BlockArena(_rebuilt(self.buffers, tensors, capacity), self.tokens, self.layout)

    def stored(self) -> EncodedBlock:
        """A block of the stored tokens: views of the buffers, no copy."""
        return self.slice(0, self.tokens)

    def slice(self, start: int, stop: int) -> EncodedBlock:
        """A block of the stored tokens ``[start, stop)`` (multiples of :attr:`quantum`): views of
        the buffers, no copy."""
        if start % self.quantum or stop % self.quantum or not 0 <= start <= stop <= self.tokens:
            raise ValueError(
                f"tokens [{start}, {stop}) of an arena of {self.tokens} cut in units of {self.quantum}"
            )
        tensors = {
            path: _get(self.buffers, path).narrow(
                axis, self.layout.units(i, start), self.layout.units(i, stop) - self.layout.units(i, start)
            )
            for i, (path, axis, _, _) in enumerate(self.layout.tensors)
        }
        return _rebuilt(self.buffers, tensors, stop - start)  # type: ignore[no-any-return]

    def keep(self, tokens: int) -> BlockArena:
        """Only the first ``tokens`` tokens, rounded down to whole units."""
        return BlockArena(self.buffers, tokens // self.quantum * self.quantum, self.layout, self.memo)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BlockArena:
        """``fn`` (a batch reorder or selection) applied to every batched buffer."""
        tensors = {path: fn(_get(self.buffers, path)) for path, _, _, _ in self.layout.tensors}
        return BlockArena(_rebuilt(self.buffers, tensors, self.capacity), self.tokens, self.layout)

    def kernel_segment(self, covered: int) -> Any:
        """The buffers as the fused kernel reads them (:meth:`EncodedBlock.kernel_segment`),
        attending the first ``covered`` tokens; described once per buffers, not per step."""
        segment = self.memo.get("segment")
        if segment is None:
            try:
                segment = self.buffers.kernel_segment(self.capacity)
            except NoKernelLayout as err:
                segment = err
            self.memo["segment"] = segment
        if isinstance(segment, NoKernelLayout):
            raise segment
        out = copy.copy(segment)
        out.covered = covered
        return out

    def nbytes(self) -> int:
        """Bytes the buffers take (stored tokens and spare room; shared state not included)."""
        return sum(t.numel() * t.element_size() for _, t, _ in _batched(self.buffers))


@attrs.frozen
class Stream:
    """Tokens of one kind (keys or values) of one layer: sinks, arenas of encoded tokens, the exact
    window. A frozen record, so that a copy kept from before a pass is a snapshot of the stream
    (its buffers are only written past their live rows)."""

    method: KeyQuantizer | ValuePolicy
    identity: bool  # the method stores tokens as they are: its encoded tokens stay in ``exact``
    sinks: torch.Tensor | None = None  # (b, h, s, d) exact
    arenas: tuple[BlockArena, ...] = ()
    exact: ExactTokens | None = None  # the window; for an identity method, every token after the sinks
    encoded: int = 0  # tokens encoded (dropped ones included)
    dropped: int = 0  # encoded tokens after the sinks no query can read any more (a sliding-window layer)

    def sink_len(self) -> int:
        return 0 if self.sinks is None else self.sinks.shape[-2]

    @property
    def blocks(self) -> list[EncodedBlock]:
        """The encoded tokens as blocks (views of the storage), in token order."""
        if not self.identity:
            return [arena.stored() for arena in self.arenas]
        if self.exact is None or self.encoded == self.dropped:
            return []
        first = self.sink_len() + self.dropped
        return [
            DenseBlock(
                tokens=self.encoded - self.dropped,
                data=self.exact.rows(first, first + self.encoded - self.dropped),
            )
        ]

    @property
    def window(self) -> torch.Tensor | None:
        """(b, h, w, d) the exact tokens after the encoded ones, or None."""
        if self.exact is None:
            return None
        if self.identity:
            first = self.sink_len() + self.encoded
            return self.exact.rows(first, self.exact.origin + self.exact.stop)
        return self.exact.view()

    def with_tokens(self, x: torch.Tensor, position: int, capacity: int) -> Stream:
        """``x`` (b, h, n, d) appended to the window, its first token at absolute ``position``."""
        if self.exact is None:
            exact = ExactTokens.of(x, position, capacity if self.identity else 0)
        else:
            exact = self.exact.append(x)
        return attrs.evolve(self, exact=exact)

    def compacted(self) -> Stream:
        """The stream with its window in a buffer sized for it (:meth:`ExactTokens.compacted`);
        an identity stream keeps its buffer, which holds every token, unless a sliding window
        dropped some."""
        if self.exact is None or (self.identity and not self.dropped):
            return self
        exact = self.exact.compacted()
        return self if exact is self.exact else attrs.evolve(self, exact=exact)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Stream:
        return attrs.evolve(
            self,
            sinks=None if self.sinks is None else fn(self.sinks),
            arenas=tuple(arena.map(fn) for arena in self.arenas),
            exact=None if self.exact is None else self.exact.map(fn),
        )

    def decoded(self) -> torch.Tensor:
        """(b, h, tokens, d) float32: every token as the attention reads it (zeros for dropped ones)."""
        parts = [] if self.sinks is None else [self.sinks.float()]
        blocks = [b.dequantize(torch.float32) for b in self.blocks]
        if self.dropped:
            like = blocks[0] if blocks else self.window
            assert like is not None
            parts.append(like.new_zeros((*like.shape[:2], self.dropped, like.shape[-1]), dtype=torch.float32))
        parts += blocks
        if self.window is not None:
            parts.append(self.window.float())
        return torch.cat(parts, dim=-2)
