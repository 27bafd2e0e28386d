"""Decode perplexity with the quantized cache in the loop, exactly as streaming generation sees it.

For each window of ``prefix + scored`` tokens: prefill the prefix (attending to it at full
precision, as a serving engine does, and storing it quantized), then score the next ``scored``
tokens by teacher forcing. Token-by-token decoding is the definition; the fast path feeds all the
scored tokens in one pass with ``emulate_streaming`` set, so that every query reads every earlier
token in the state it would have had when decoding one token at a time. The two compute the same
thing in another order: on float64 models they agree to about 1e-8 (tested); in float32 a few codes
of later layers can round the other way, which moves the total log-likelihood by more than
rounding. Windows are batched: quantization never mixes batch rows.

Prefill perplexity is the secondary figure: one pass over the whole window with the streaming rule
from the first token, so the prefix too is processed against its quantized past; it scores the
same tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal, Protocol

import attrs
import torch

from headq_core.cache import QuantizedKVCache
from headq_core.chunked import prefill
from headq_core.compat import cache_kwargs

Mode = Literal["decode", "stream", "prefill"]


@attrs.frozen
class Windowing:
    """How text is cut for perplexity: ``windows`` windows of ``prefix`` + ``scored`` tokens."""

    prefix: int = attrs.field(default=512, validator=attrs.validators.ge(1))
    scored: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    windows: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    batch: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    # feed the prefix (and a prefill-mode window) in chunks of this many tokens (headq_core.prefill)
    prefill_chunk: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )

    @property
    def length(self) -> int:
        return self.prefix + self.scored


class CacheBuilder(Protocol):
    """What the measurements need of a row: a fresh cache per batch of windows. A builder whose
    caches cannot emulate streaming (transformers' own, see ``harness.peers``) is scored only in
    "stream" mode, one token per pass."""

    @property
    def streams_in_one_pass(self) -> bool: ...

    def build(self, config: Any, *, emulate_streaming: bool = False) -> Any: ...


@attrs.frozen
class CacheSettings:
    """Everything that builds a cache for one (keys, values) combination."""

    keys: str
    values: str
    window: int = 0
    sinks: int = 0
    calibration: Any = None
    streams_in_one_pass: ClassVar[bool] = True

    def build(self, config: Any, *, emulate_streaming: bool = False) -> QuantizedKVCache:
        return QuantizedKVCache(
            self.keys,
            self.values,
            window=self.window,
            sinks=self.sinks,
            config=config,
            calibration=self.calibration,
            emulate_streaming=emulate_streaming,
        )


@attrs.frozen
class PerplexityResult:
    ppl: float
    nll_sum: float
    tokens: int
    seconds: float
    mode: str
    caches: list[Any] = attrs.field(eq=False, repr=False)  # QuantizedKVCache, or a peer's cache
    window_nll: tuple[float, ...] = ()  # each window's summed NLL over its scored tokens, in order

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.inf


def _batches(windows: list[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(windows), size):
        yield torch.stack(windows[start : start + size])


@torch.no_grad()
def window_nll(
    model: Any,
    ids: torch.Tensor,
    prefix: int,
    settings: CacheBuilder,
    mode: Mode = "decode",
    prefill_chunk: int | None = None,
) -> tuple[torch.Tensor, Any]:
    """Summed negative log-likelihood of ``ids[:, prefix:]`` for a batch of windows.

    ids: (batch, prefix + scored). prefill_chunk: feed the prompt in pieces of this many tokens.
    Returns ((batch,) float64 NLL sums, the cache at the end).
    """
    if mode != "stream" and not settings.streams_in_one_pass:
        raise ValueError(f"{mode} mode needs a cache that emulates streaming; score this one in stream mode")
    ids = ids.to(model.device)
    if mode == "prefill":
        cache = settings.build(model.config, emulate_streaming=True)
        scored: list[torch.Tensor] = []

        def keep(start: int, logits: torch.Tensor) -> None:  # the logits that predict a scored token
            scored.append(logits[:, max(0, prefix - 1 - start) :])

        prefill(model, ids, cache, chunk=prefill_chunk or ids.shape[1], on_logits=keep)
        return _nll(torch.cat(scored, dim=1)[:, :-1], ids[:, prefix:]), cache
    cache = settings.build(model.config)
    first = prefill(model, ids[:, :prefix], cache, chunk=prefill_chunk or prefix)[:, None]
    rest = ids[:, prefix:-1]
    if mode == "stream":
        steps = [
            model(rest[:, i : i + 1], **cache_kwargs(model, cache), use_cache=True).logits
            for i in range(rest.shape[1])
        ]
    else:
        cache.emulate_streaming = True
        steps = [model(rest, **cache_kwargs(model, cache), use_cache=True).logits] if rest.shape[1] else []
    logits = torch.cat([first, *steps], dim=1)
    return _nll(logits, ids[:, prefix:]), cache


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    targets = targets.to(logits.device)  # the last layer's device, where a device_map puts the head
    return -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)


def perplexity(
    model: Any,
    windows: list[torch.Tensor],
    settings: CacheBuilder,
    windowing: Windowing,
    *,
    mode: Mode = "decode",
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity over ``windows`` (each (prefix + scored,) token ids) in the given mode."""
    per_window: list[float] = []
    count, caches = 0, []
    start = time.perf_counter()
    for batch in _batches(windows, windowing.batch):
        nll, cache = window_nll(model, batch, windowing.prefix, settings, mode, windowing.prefill_chunk)
        per_window += nll.tolist()
        count += batch.shape[0] * windowing.scored
        caches.append(cache)
        if progress is not None:
            progress(batch.shape[0])
    seconds = time.perf_counter() - start
    total = sum(per_window)
    return PerplexityResult(math.exp(total / count), total, count, seconds, mode, caches, tuple(per_window))


@torch.no_grad()
def decode_speed(model: Any, ids: torch.Tensor, settings: CacheBuilder, steps: int = 32) -> float:
    """Decode tokens per second of true one-token steps after prefilling ``ids`` (1, n)."""
    cache = settings.build(model.config)
    ids = ids.to(model.device)
    out = model(ids, **cache_kwargs(model, cache), use_cache=True).logits[:, -1:]
    token = out.argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, **cache_kwargs(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
    if token.is_cuda:  # the last layer's device: every layer's work feeds the token made there
        torch.cuda.synchronize(token.device)
    return steps / (time.perf_counter() - start)
