"""One forward pass of one layer, as data: what the attention function reads and what it gives back.

:meth:`QuantizedLayer.begin_step <headq_core.layer.QuantizedLayer.begin_step>` hands the attention
function a :class:`Step`: the flush rule, the in-flight tokens (``start`` to ``length``), and per
stream a :class:`StreamView` of the sinks, the encoded tokens (as blocks for the reference path, as
arenas for the kernel) and the exact tokens. The attention function computes from it alone and
returns what the pass produced through
:meth:`QuantizedLayer.end_step <headq_core.layer.QuantizedLayer.end_step>` (the attention
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
from headq_core.layouts import EncodedBlock
from headq_core.storage import BlockArena, ExactTokens, Stream

DECODE_PASS_TOKENS = 64  # a serving pass up to this long reads the cache as one-by-one decoding would


def encoded_end(n_tokens: int, sinks: int, window: int, block_tokens: int) -> int:
    """The flush rule: the absolute end of a stream's encoded tokens once ``n_tokens`` have
    arrived (the first ``sinks`` stay exact, then whole units of ``block_tokens`` leave the window
    once ``window`` newer tokens follow them)."""
    free = max(0, n_tokens - sinks - window)
    return min(n_tokens, sinks) + (free // block_tokens) * block_tokens


@attrs.frozen
class StreamView:
    """Keys or values of one layer as one pass reads them, positions ``[0, length)`` in order:
    the ``stream`` (sinks, encoded tokens as blocks for the reference path and as arenas for the
    kernel, the exact buffer), and where this pass's exact tokens start (``exact_first``: the
    window as it was when the pass began; rows of a buffer that may hold more, see
    :meth:`exact_tokens`)."""

    stream: Stream
    exact_first: int
    length: int

    @property
    def method(self) -> KeyQuantizer | ValuePolicy:
        return self.stream.method

    @property
    def sinks(self) -> torch.Tensor | None:
        return self.stream.sinks

    @property
    def sink_len(self) -> int:
        return self.stream.sink_len()

    @property
    def arenas(self) -> tuple[BlockArena, ...]:
        return self.stream.arenas

    @property
    def exact(self) -> ExactTokens | None:
        return self.stream.exact

    @property
    def identity(self) -> bool:
        return self.stream.identity

    @property
    def encoded_end(self) -> int:
        return self.stream.sink_len() + self.stream.encoded

    @property
    def dropped(self) -> int:
        """Tokens after the sinks that are no longer stored (outside a sliding window)."""
        return self.stream.dropped

    @property
    def stored_from(self) -> int:
        """Position of the first stored token after the sinks."""
        return self.stream.sink_len() + self.stream.dropped

    @property
    def stored(self) -> list[EncodedBlock]:
        """The encoded tokens as blocks (views of the storage, made when asked for)."""
        return self.stream.blocks

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

    def encoded_limit(self, view: StreamView, device: torch.device) -> torch.Tensor:
        """(queries,) int64: in-flight query ``i`` reads the tokens from the sinks up to this
        position encoded, and later ones exact.

        Emulating streaming, a query reads every earlier token in the state the flush rule left
        it when that query was decoded. In serving, a query reads the tokens before the pass the
        same way, where the pass is short (at most DECODE_PASS_TOKENS tokens: speculative
        candidates, a few tokens of continuation), so that it sees what decoding its tokens one
        by one would; a longer pass (a prompt, a chunk of one) reads them as the pass leaves them
        stored. In-flight tokens are read exact in serving, as an engine attends to a prompt it is
        storing.
        """
        g = view.method.block_tokens
        shared = self.shared_limit(view)
        if shared is not None:
            return torch.full((self.queries,), shared, device=device)
        q = torch.arange(self.start, self.length, device=device)
        free = (q + 1 - self.sinks - self.window).clamp(min=0)
        end = (q + 1).clamp(max=self.sinks) + free // g * g  # the flush rule at each query's own length
        return torch.minimum(end, q if self.emulate_streaming else torch.full_like(q, self.start))

    def shared_limit(self, view: StreamView) -> int | None:
        """The :meth:`encoded_limit` every in-flight query shares, known on the host; None where
        the queries' limits differ."""
        if self.emulate_streaming:
            return None
        g = view.method.block_tokens
        last = min(encoded_end(self.length, self.sinks, self.window, g), self.start)
        if self.queries > DECODE_PASS_TOKENS:
            return last
        first = min(encoded_end(self.start + 1, self.sinks, self.window, g), self.start)
        return last if first == last else None

    def read_encoded(
        self, view: StreamView, first: int, device: torch.device, stop: int | None = None
    ) -> torch.Tensor:
        """(queries, stop - first) bool: whether in-flight query ``i`` reads token ``first + j``
        encoded (``stop`` defaults to the pass's length)."""
        k = torch.arange(first, self.length if stop is None else stop, device=device)
        return (k >= self.sinks) & (k < self.encoded_limit(view, device)[:, None])
