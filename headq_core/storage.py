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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import attrs
import torch

from headq_core.layouts import _META, EncodedBlock

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
        n = x.shape[-2]
        data = x.new_empty((*x.shape[:2], max(capacity, _room(n)), x.shape[-1]))
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
            return attrs.evolve(self, stop=self.stop + n)
        # Compact the live rows to the front of a buffer sized for them (a window shrinks back
        # after a long prefill leaves it) or grow it: either way a quarter of spare room.
        grown = ExactTokens.of(self.view(), self.first, _room(self.tokens + n))
        return grown.append(x)

    def drop(self, n: int) -> ExactTokens:
        """Without the first ``n`` live tokens (their rows stay readable until the buffer moves)."""
        return attrs.evolve(self, start=self.start + n)

    def keep(self, n: int) -> ExactTokens:
        """Only the first ``n`` live tokens."""
        return attrs.evolve(self, stop=self.start + n)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ExactTokens:
        """``fn`` (a batch reorder or selection) applied to the whole buffer."""
        return attrs.evolve(self, data=fn(self.data))


# --- encoded blocks in arenas -----------------------------------------------------------------


def _batched(block: EncodedBlock, prefix: str = "") -> Iterator[tuple[str, torch.Tensor, int]]:
    """(path, tensor, token axis) of every batched stored tensor, nested blocks included."""
    for field in attrs.fields(type(block)):
        value = getattr(block, field.name)
        if isinstance(value, EncodedBlock):
            yield from _batched(value, f"{prefix}{field.name}.")
        elif _META in field.metadata and value is not None and field.metadata[_META][1]:
            yield f"{prefix}{field.name}", value, block.token_axis(field.name)


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


def _rebuilt(block: EncodedBlock, tensors: dict[str, torch.Tensor], tokens: int, prefix: str = "") -> Any:
    """``block`` with the batched tensors at ``tensors``' paths and ``tokens`` tokens (nested too)."""
    changes: dict[str, Any] = {"tokens": tokens}
    for field in attrs.fields(type(block)):
        value = getattr(block, field.name)
        path = f"{prefix}{field.name}"
        if isinstance(value, EncodedBlock):
            changes[field.name] = _rebuilt(value, tensors, tokens, f"{path}.")
        elif path in tensors:
            changes[field.name] = tensors[path]
    return attrs.evolve(block, **changes)


@attrs.frozen
class BlockArena:
    """Encoded blocks of one type and settings, merged: ``buffers`` is a block of ``capacity``
    tokens (its batched tensors sized for them), of which the first ``tokens`` are stored.

    ``units[path]``: length of that tensor's token axis per token (e.g. 1/16 of a word for 2-bit
    codes packed along tokens, 1/32 of a scale for groups of 32). Every block appended must have
    exactly these and a multiple of ``quantum`` tokens (the method's encode unit, and whole units
    of every tensor), so that the arena can be cut after any multiple of ``quantum`` tokens.
    """

    buffers: EncodedBlock
    tokens: int
    units: dict[str, Fraction]
    quantum: int
    settings: tuple[Any, ...]

    @classmethod
    def of(cls, block: EncodedBlock, unit: int = 1, capacity: int = 0) -> BlockArena:
        """An arena holding ``block`` (a multiple of ``unit`` tokens, the method's encode unit),
        room for ``capacity`` tokens or more."""
        units = {path: Fraction(t.shape[axis], block.tokens) for path, t, axis in _batched(block)}
        quantum = math.lcm(unit, *(u.denominator for u in units.values()))
        empty = cls(block, 0, units, quantum, _settings(block))
        return empty._moved(max(capacity, _room(block.tokens, quantum))).append(block)

    @property
    def capacity(self) -> int:
        return self.buffers.tokens

    def fits(self, block: EncodedBlock) -> bool:
        if _settings(block) != self.settings or block.tokens % self.quantum:
            return False
        return all(t.shape[axis] == self.units[path] * block.tokens for path, t, axis in _batched(block))

    def append(self, block: EncodedBlock) -> BlockArena:
        """These tokens, then ``block``'s (which must :meth:`fit`), in place where there is room."""
        arena = self
        if self.tokens + block.tokens > self.capacity:
            arena = self._moved(_room(self.tokens + block.tokens, self.quantum))
        targets = dict((path, (t, axis)) for path, t, axis in _batched(arena.buffers))
        for path, t, axis in _batched(block):
            buf, _ = targets[path]
            start = int(self.units[path] * arena.tokens)
            buf.narrow(axis, start, t.shape[axis]).copy_(t)
        return attrs.evolve(arena, tokens=arena.tokens + block.tokens)

    def _moved(self, capacity: int) -> BlockArena:
        """The same tokens in new buffers of ``capacity`` tokens."""
        tensors = {}
        for path, t, axis in _batched(self.buffers):
            shape = list(t.shape)
            shape[axis] = int(self.units[path] * capacity)
            buf = t.new_zeros(shape)  # spare rows decode to something valid (a reference decodes them)
            filled = int(self.units[path] * self.tokens)
            if filled:
                buf.narrow(axis, 0, filled).copy_(t.narrow(axis, 0, filled))
            tensors[path] = buf
        return attrs.evolve(self, buffers=_rebuilt(self.buffers, tensors, capacity))

    def stored(self) -> EncodedBlock:
        """A block of the stored tokens: views of the buffers, no copy."""
        tensors = {
            path: t.narrow(axis, 0, int(self.units[path] * self.tokens))
            for path, t, axis in _batched(self.buffers)
        }
        return _rebuilt(self.buffers, tensors, self.tokens)  # type: ignore[no-any-return]

    def keep(self, tokens: int) -> BlockArena:
        """Only the first ``tokens`` tokens, rounded down to whole units."""
        return attrs.evolve(self, tokens=tokens // self.quantum * self.quantum)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BlockArena:
        """``fn`` (a batch reorder or selection) applied to every batched buffer."""
        tensors = {path: fn(t) for path, t, _ in _batched(self.buffers)}
        return attrs.evolve(self, buffers=_rebuilt(self.buffers, tensors, self.capacity))

    def nbytes(self) -> int:
        """Bytes the buffers take (stored tokens and spare room; shared state not included)."""
        return sum(t.numel() * t.element_size() for _, t, _ in _batched(self.buffers))
