"""One forward pass of one layer, as data: what the attention function reads and what it gives back.

:meth:`QuantizedLayer.begin_step <headq_core.cache.QuantizedLayer.begin_step>` hands the attention
function a :class:`Step`: the flush rule, the in-flight tokens (``start`` to ``length``), and per
stream a :class:`StreamView` of the sinks, the encoded tokens (as blocks for the reference path, as
arenas for the kernel) and the exact tokens. The attention function computes from it alone and
returns what the pass produced through
:meth:`QuantizedLayer.end_step <headq_core.cache.QuantizedLayer.end_step>` (the attention
statistic a value policy asked for); nothing outside the cache writes the cache's state.

Who reads what encoded: a token at or past ``StreamView.exact_first`` was exact when the pass
began. In serving, a query reads it encoded if the pass's flush encoded it and it is not one of
the in-flight tokens (those are attended at full precision, as a serving engine attends to the
prefill it is storing). With ``emulate_streaming`` each query reads every earlier token in the
state token-by-token streaming would have left it in (:meth:`Step.read_encoded`).
"""

from __future__ import annotations

import attrs
import torch

from headq_core.interfaces import AttentionStatistic, KeyQuantizer, ValuePolicy
from headq_core.layouts import DenseBlock, EncodedBlock
from headq_core.storage import BlockArena, ExactTokens


@attrs.frozen
class StreamView:
    """Keys or values of one layer as one pass reads them, positions ``[0, length)`` in order.

    sinks: (b, h, s, d) exact, positions ``[0, s)``, or None;
    stored / arenas: the encoded tokens, positions ``[s, encoded_end)``: blocks (views, for the
    reference path) and the arenas they live in (for the kernel; empty for an identity method,
    whose encoded tokens are its exact ones);
    exact: the exact tokens from ``exact_first`` to the end of the pass (rows of a buffer that may
    hold more: see :meth:`exact_tokens`).
    """

    method: KeyQuantizer | ValuePolicy
    sinks: torch.Tensor | None
    arenas: tuple[BlockArena, ...]
    exact: ExactTokens | None
    exact_first: int
    encoded_end: int
    length: int
    identity: bool

    @property
    def sink_len(self) -> int:
        return 0 if self.sinks is None else self.sinks.shape[-2]

    @property
    def stored(self) -> tuple[EncodedBlock, ...]:
        """The encoded tokens as blocks (views of the storage, made when asked for)."""
        if not self.identity:
            return tuple(arena.stored() for arena in self.arenas)
        if self.exact is None or self.encoded_end <= self.sink_len:
            return ()
        return (
            DenseBlock(
                tokens=self.encoded_end - self.sink_len, data=self.exact.rows(self.sink_len, self.encoded_end)
            ),
        )

    def exact_tokens(self, first: int | None = None) -> torch.Tensor | None:
        """(b, h, length - first, d) exact tokens from position ``first`` (default ``exact_first``)."""
        first = self.exact_first if first is None else first
        if self.exact is None or first >= self.length:
            return None
        return self.exact.rows(first, self.length)


@attrs.frozen
class Step:
    """One pass of one layer over ``[0, length)``, whose tokens ``[start, length)`` are in flight."""

    layer_idx: int
    start: int
    length: int
    keys: StreamView
    values: StreamView
    sinks: int  # the flush rule: sinks, window, and each stream's encode unit
    window: int
    emulate_streaming: bool
    statistic: AttentionStatistic | None
    values_flushed: bool  # this pass's values were encoded before the attention (no statistic needs them)

    @property
    def queries(self) -> int:
        return self.length - self.start

    def encoded_end(self, block_tokens: int, n_tokens: int) -> int:
        """Absolute end of a stream's encoded region once ``n_tokens`` tokens have arrived."""
        free = max(0, n_tokens - self.sinks - self.window)
        return min(n_tokens, self.sinks) + (free // block_tokens) * block_tokens

    def read_encoded(self, view: StreamView, first: int, device: torch.device) -> torch.Tensor:
        """(queries, length - first) bool: whether in-flight query ``i`` reads token ``first + j`` encoded."""
        q = torch.arange(self.start, self.length, device=device)[:, None]
        k = torch.arange(first, self.length, device=device)[None, :]
        g = view.method.block_tokens
        if self.emulate_streaming:
            ends = [self.encoded_end(g, j + 1) for j in range(self.start, self.length)]
            end = torch.tensor(ends, device=device)[:, None]
            return (k >= self.sinks) & (k < end) & (k < q)
        end_now = self.encoded_end(g, self.length)
        return ((k >= self.sinks) & (k < end_now) & (k < self.start)).expand(q.shape[0], -1)
