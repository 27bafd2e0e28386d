"""``QuantizedLayer``: one layer of a :class:`~headq_core.cache.QuantizedKVCache`.

Per layer, tokens live in three places, in order: up to ``sinks`` exact tokens at the start, the
encoded tokens, and a full-precision window of the latest tokens. A token leaves the window when
``window`` newer tokens follow it, in whole multiples of the method's ``block_tokens`` (keys in
groups, KIVI-style; values usually one by one). ``update`` stores a pass's tokens; keys are
encoded when the attention takes the pass (:meth:`QuantizedLayer.begin_step`, once padding is
known), values then or after the attention of that pass (after it when a policy wants the
attention its tokens received in this pass). Encoded tokens live in one
:class:`~headq_core.storage.BlockArena` per stream and the window in an
:class:`~headq_core.storage.ExactTokens` buffer, both with room to grow in place; a method that
keeps tokens as they are (``fp16`` in the model's dtype) keeps them in that buffer.

The layer also remembers its last passes, so that a crop within them is exact (speculative
decoding), and a sliding-window layer drops the tokens no later query can see.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import torch
from transformers.cache_utils import CacheLayerMixin

from headq_core.errors import CacheStateError
from headq_core.finite import checkable
from headq_core.interfaces import KeyQuantizer
from headq_core.layouts import PARTS, EncodedBlock, Part, block_nbytes, iter_stored
from headq_core.step import Step, StreamView, encoded_end
from headq_core.storage import BlockArena, ExactTokens, Stream

if TYPE_CHECKING:
    from headq_core.cache import QuantizedKVCache

LAYER_ATTR = "_headq_layer"


@attrs.frozen
class _LayerState:
    """What a failed update or value flush restores: the layer as it was before the pass."""

    length: int
    k: Stream
    v: Stream
    sq_attention: torch.Tensor | None
    initialized: bool


@attrs.frozen
class _InFlight:
    start: int  # absolute position of the first in-flight token
    key_first: int  # absolute position of the first key-window token before this pass's flush
    keys: torch.Tensor  # the pass's tokens, (b, h, n, d)
    values: torch.Tensor


CROP_TOKENS = 64  # the last passes of up to this many tokens in all can be taken back exactly


@attrs.frozen
class _Undo:
    """A recent pass: the layer before it and its tokens as stored (padding filled)."""

    before: _LayerState
    keys: torch.Tensor
    values: torch.Tensor


def _moved(now: Any, before: _LayerState) -> bool:
    """Whether an arena ``before`` held has moved to new buffers since (its old ones are kept
    alive by every record of it)."""
    pairs = ((now.k, before.k), (now.v, before.v))
    return any(
        a.buffers is not b.buffers for new, old in pairs for a, b in zip(new.arenas, old.arenas, strict=False)
    )


def _refuse_assignment(name: str, value: torch.Tensor | None) -> None:
    if value is not None:  # the base class's __init__ assigns None
        raise AttributeError(
            f"a quantized layer's {name} are decoded from its encoded storage and cannot be assigned; "
            "write through update()"
        )


class QuantizedLayer(CacheLayerMixin):
    """One layer of a :class:`QuantizedKVCache`."""

    is_compileable = False

    def __init__(self, cache: QuantizedKVCache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        windows = cache.sliding_windows
        # a sliding-window layer's queries see this many tokens, their own included
        self.sliding_window: int | None = windows[layer_idx] if layer_idx < len(windows) else None
        self.length = 0
        self.k = Stream(cache.key_method, identity=False)
        self.v = Stream(cache.value_method, identity=False)
        # (b, h, value window) running sum of p^2 (or of p: the policy's attention_statistic)
        self.sq_attention: torch.Tensor | None = None
        self.pending: _InFlight | None = None
        self.before_pass: _LayerState | None = None  # until the values of the pass are flushed
        self.passed: tuple[torch.Tensor, torch.Tensor] | None = None  # the pass's tokens as stored
        self.undo: list[_Undo] = []  # recent passes, for an exact crop

    # --- the flush rule ----------------------------------------------------------------------

    def encoded_end(self, stream: Stream, n_tokens: int) -> int:
        """Absolute end of the encoded region once ``n_tokens`` tokens have arrived."""
        return encoded_end(n_tokens, self.cache.sinks, self.cache.window, stream.method.block_tokens)

    # --- transformers layer API --------------------------------------------------------------

    # ``keys`` and ``values``: the base class's attributes, here every stored token decoded on
    # access (the attention never reads them); None before the first update.
    @property
    def keys(self) -> torch.Tensor | None:
        """Every stored key as the attention reads it, (b, kv_heads, length, d) in the model's
        dtype, decoded on each access; None before the first update."""
        return self.k.decoded().to(self.dtype) if self.is_initialized else None

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        _refuse_assignment("keys", value)

    @property
    def values(self) -> torch.Tensor | None:
        """Every stored value, as :attr:`keys`."""
        return self.v.decoded().to(self.dtype) if self.is_initialized else None

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        _refuse_assignment("values", value)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.k = Stream(self.cache.key_method, identity=self.cache.key_method.stores_exactly(self.dtype))
        self.v = Stream(self.cache.value_method, identity=self.cache.value_method.stores_exactly(self.dtype))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending is not None:
            self.pending = self.before_pass = None
            raise CacheStateError(
                f"layer {self.layer_idx}: the attention of the previous forward pass did not go through "
                "the 'headq' attention function, so it never saw the quantized past. Load the model "
                "with attn_implementation='headq' or call headq_core.use_headq_attention(model)."
            )
        self._check_input(key_states, value_states)
        before = self._snapshot()
        try:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.length
            n = key_states.shape[-2]
            take = max(0, min(n, self.cache.sinks - start))
            streams = []
            for stream, new in ((self.k, key_states), (self.v, value_states)):
                if take:
                    stream = attrs.evolve(stream, sinks=_cat(stream.sinks, new[..., :take, :]))
                if n > take:
                    stream = stream.with_tokens(new[..., take:, :], start + take, self.cache.capacity)
                streams.append(stream)
            self.k, self.v = streams
            if self.cache.value_statistic is not None and n > take:
                zeros = value_states.new_zeros((*value_states.shape[:2], n - take), dtype=torch.float32)
                self.sq_attention = _cat(self.sq_attention, zeros, dim=-1)
            self.length += n
            self.pending = _InFlight(start, self.k.sink_len() + self.k.encoded, key_states, value_states)
        except BaseException:
            self._restore(before)
            raise
        self.before_pass = before
        tagged = key_states.view_as(key_states)
        setattr(tagged, LAYER_ATTR, self)
        return tagged, value_states

    # --- the pass as data ----------------------------------------------------------------------

    def begin_step(self, mask: torch.Tensor | None = None) -> Step:
        """The pass ``update`` just stored, for the attention function (exactly once per pass).

        mask: the pass's attention mask as transformers gives it ((b, 1, n, T), True or 0 =
        attend), from which the layer learns which of the pass's tokens are padding: an in-flight
        token that does not attend to itself. Their stored keys and values are replaced by the
        row's first real token of the pass (zeros if it has none) before anything is encoded, so
        that no method's statistics (KIVI's per-channel ranges over a group of tokens) see what
        padding holds: a row's output never depends on it.

        The keys that leave the window are encoded here. A value policy that wants attention
        statistics has its values encoded in :meth:`end_step`, after this pass's statistic, where
        the pass's flush reaches a token this pass attends exactly (an in-flight token, or any
        token when emulating streaming); otherwise this pass's values are encoded here, before
        the attention, which then reads them encoded.
        """
        inflight = self.pending
        if inflight is None:
            raise CacheStateError(f"layer {self.layer_idx}: attention called without a pending update")
        self.pending = None
        keys, values = inflight.keys, inflight.values
        if mask is not None and self.length - inflight.start > 1:
            keys, values = self._fill_padding(mask, inflight.start, keys, values)
        self.passed = (keys, values)
        self.k = self._flushed(self.k)
        statistic = self.cache.value_statistic
        v_first = self.v.sink_len() + self.v.encoded
        early = statistic is None or (
            not self.cache.emulate_streaming and self.encoded_end(self.v, self.length) <= inflight.start
        )
        if early:
            self.v = self._flushed(self.v)
        return Step(
            layer_idx=self.layer_idx,
            start=inflight.start,
            length=self.length,
            keys=StreamView(self.k, inflight.key_first, self.length),
            values=StreamView(self.v, v_first, self.length),
            sinks=self.cache.sinks,
            window=self.cache.window,
            emulate_streaming=self.cache.emulate_streaming,
            statistic=statistic,
            values_flushed=early,
        )

    def end_step(self, step: Step, statistic: torch.Tensor | None = None) -> StreamView:
        """Take back what the pass produced; returns the values as stored after it.

        statistic: (b, h, T) float32, the attention (or squared attention, per ``step.statistic``)
        the pass gave its last T value tokens, summed over queries, zero where a query read the
        token encoded; only the part for tokens still in the window counts.
        """
        if statistic is not None and self.sq_attention is not None and self.sq_attention.shape[-1]:
            self.sq_attention = self.sq_attention + statistic[..., -self.sq_attention.shape[-1] :]
        if not step.values_flushed:
            self.v = self._flushed(self.v)
        # A long prompt leaves a window in a buffer sized for the prompt: free it now (the step
        # keeps the old buffers for whoever still reads the pass's exact tokens).
        if self.sliding_window is not None:
            self._slide()
        self.k, self.v = self.k.compacted(), self.v.compacted()
        if self.before_pass is not None and self.passed is not None:
            self._remember(_Undo(self.before_pass, *self.passed))
        self.before_pass = self.passed = None  # the pass is complete
        if self.layer_idx == len(self.cache.layers) - 1:
            self.cache._end_pass()
        return StreamView(self.v, step.values.exact_first, self.length)

    # --- validation and roll-back --------------------------------------------------------------

    def _check_input(self, keys: Any, values: Any) -> None:
        """Refuse what would corrupt the stored state, before anything is stored.

        A NaN or Inf token would spoil the scale and minimum of every token in its quantization
        group without a trace: on the CPU it is refused here, on a GPU the cache's device flag
        catches it without a sync (:mod:`headq_core.finite`).
        """
        where = f"layer {self.layer_idx}"
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor):
                raise CacheStateError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
            if t.ndim != 4:
                raise CacheStateError(
                    f"{where}: {name} must be (batch, kv_heads, tokens, head_dim), got shape {tuple(t.shape)}"
                )
            if not t.is_floating_point():
                raise CacheStateError(f"{where}: {name} must be floating point, got {t.dtype}")
        if keys.shape[:3] != values.shape[:3] or keys.dtype != values.dtype or keys.device != values.device:
            raise CacheStateError(
                f"{where}: keys {keys.dtype} {tuple(keys.shape)} on {keys.device} and values {values.dtype} "
                f"{tuple(values.shape)} on {values.device} must share dtype, device, batch, heads and tokens"
            )
        if self.is_initialized:
            if keys.dtype != self.dtype or keys.device != self.device:
                raise CacheStateError(
                    f"{where}: holds {self.dtype} tokens on {self.device}, was given {keys.dtype} on "
                    f"{keys.device}; one cache serves one model dtype and device"
                )
            for name, new, stream in (("keys", keys, self.k), ("values", values, self.v)):
                ref = stream.window if stream.window is not None else stream.sinks
                if ref is not None and (ref.shape[:2] != new.shape[:2] or ref.shape[-1] != new.shape[-1]):
                    raise CacheStateError(
                        f"{where}: holds {name} of batch {ref.shape[0]}, {ref.shape[1]} heads of "
                        f"{ref.shape[-1]} channels; was given {tuple(new.shape)} (batch, kv_heads, tokens, head_dim)"
                    )
        flag = self.cache._flag(keys.device)
        if flag is not None:
            flag.watch((keys, values))
            return
        # the CPU from here on: reading the check back costs no sync
        if keys.device.type == "meta" or bool(torch.isfinite(keys).all() & torch.isfinite(values).all()):
            return
        name, bad = ("keys", keys) if not bool(torch.isfinite(keys).all()) else ("values", values)
        b, h, t, c = (~torch.isfinite(bad)).nonzero()[0].tolist()
        raise CacheStateError(
            f"{where}: {name} hold {bad[b, h, t, c].item()} at batch {b}, kv head {h}, position "
            f"{self.length + t} (token {t} of the {bad.shape[-2]} of this pass), channel {c}; nothing "
            "of this pass was stored (a non-finite token would spoil the scales of its whole group)"
        )

    def _fill_padding(
        self, mask: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass's keys and values with padding overwritten, also in the stored window of every
        quantized stream (see :meth:`begin_step`)."""
        n = self.length - start
        if mask.dim() != 4 or mask.shape[-2] != n or mask.shape[-1] < self.length:
            return keys, values  # not a per-query mask of this pass: nothing to learn from it
        offset = mask.shape[-1] - self.length
        rows = torch.arange(n, device=mask.device)
        diagonal = mask[:, 0, rows, offset + start + rows]  # (b or 1, n): does token i attend to itself
        valid = diagonal if diagonal.dtype == torch.bool else diagonal > torch.finfo(diagonal.dtype).min / 2
        valid = valid.to(keys.device).expand(keys.shape[0], -1)
        pick = valid.int().argmax(dim=-1)[:, None, None, None]  # the row's first real token (0 if none)
        real = valid.any(dim=-1)[:, None, None, None]
        filled = []
        for x in (keys, values):
            filler = x.gather(2, pick.expand(-1, x.shape[1], 1, x.shape[-1])) * real.to(x.dtype)
            filled.append(torch.where(valid[:, None, :, None], x, filler))
        for stream, x in zip((self.k, self.v), filled, strict=True):
            first = max(start, stream.sink_len())  # in-flight tokens past the sinks (which stay exact)
            if not stream.identity and stream.exact is not None and first < self.length:
                stream.exact.rows(first, self.length).copy_(x[..., first - start :, :])
        return filled[0], filled[1]

    # --- sliding-window layers -------------------------------------------------------------------

    @property
    def is_sliding(self) -> bool:  # type: ignore[override]
        return self.sliding_window is not None

    def _slide(self) -> None:
        """Drop the encoded tokens no later query can see (every query sees its last
        ``sliding_window`` tokens), keeping CROP_TOKENS more for a crop: once they are as many as
        the window, in whole encode units of both streams, so that a layer holds at most about
        twice its window (its arenas are that small, so the records kept for a crop may hold the
        ones it replaced)."""
        assert self.sliding_window is not None
        # positions before it are outside every later window, even after a crop of CROP_TOKENS
        unseen = self.length - self.sliding_window + 1 - CROP_TOKENS
        streams = [s for s in (self.k, self.v) if not s.identity]
        unit = math.lcm(*(a.quantum for s in streams for a in s.arenas)) if streams else 1
        first = max(self.k.sink_len() + self.k.dropped, self.v.sink_len() + self.v.dropped)
        end = min(s.sink_len() + s.encoded for s in (self.k, self.v))
        count = (min(unseen, end) - first) // unit * unit
        if count < max(self.sliding_window, unit) or any(len(s.arenas) > 1 for s in streams):
            return
        self.k, self.v = (self._dropped(s, count) for s in (self.k, self.v))

    def _dropped(self, stream: Stream, count: int) -> Stream:
        """The stream without its first ``count`` stored encoded tokens (a whole multiple of the
        arena's quantum), moved into buffers sized for the rest."""
        if stream.identity:  # the tokens are the exact buffer's rows, which compacts after the pass
            assert stream.exact is not None
            return attrs.evolve(stream, exact=stream.exact.drop(count), dropped=stream.dropped + count)
        arenas = []
        for arena in stream.arenas:
            kept = arena.slice(count, arena.tokens)
            arenas.append(BlockArena.of(kept, stream.method.block_tokens))
        return attrs.evolve(stream, arenas=tuple(arenas), dropped=stream.dropped + count)

    # --- taking passes back (speculative decoding) ---------------------------------------------

    def _remember(self, entry: _Undo) -> None:
        """Keep the pass for :meth:`crop` while the last passes hold at most CROP_TOKENS tokens."""
        if entry.keys.shape[-2] > CROP_TOKENS:
            self.undo = []
            return
        if self.sliding_window is None and _moved(self, entry.before):
            self.undo = []  # the encoded tokens moved: older records would keep the old buffers alive
        self.undo.append(entry)
        while self.length - self.undo[0].before.length > CROP_TOKENS:  # the passes are contiguous
            self.undo.pop(0)

    def _undone(self, new_length: int) -> bool:
        """Put the layer back to ``new_length`` tokens exactly as if it had never seen the rest,
        where the passes since are remembered: the state before them, and the kept tokens stored
        again. False where they are not."""
        for i in range(len(self.undo) - 1, -1, -1):
            if self.undo[i].before.length <= new_length:
                break
        else:
            return False
        entries, self.undo = self.undo[i:], self.undo[:i]
        keep = new_length - entries[0].before.length
        keys = torch.cat([u.keys for u in entries], dim=-2)[..., :keep, :]
        values = torch.cat([u.values for u in entries], dim=-2)[..., :keep, :]
        self._restore(entries[0].before)
        if keep:
            self.update(keys, values)
            self.end_step(self.begin_step())
        return True

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        """Whether :meth:`crop` puts the layer back as it was: where no value policy keeps an
        attention statistic (the queries a crop takes back added to it), for crops within the
        passes of the last CROP_TOKENS tokens."""
        return self.cache.value_statistic is None

    def _snapshot(self) -> _LayerState:
        return _LayerState(self.length, self.k, self.v, self.sq_attention, self.is_initialized)

    def _restore(self, state: _LayerState) -> None:
        self.length, self.k, self.v = state.length, state.k, state.v
        self.sq_attention, self.is_initialized = state.sq_attention, state.initialized
        self.pending = self.before_pass = None

    def _flushed(self, stream: Stream) -> Stream:
        """The stream with the tokens that leave the window encoded; on failure the layer is left as
        before the pass."""
        try:
            return self._flush_stream(stream)
        except Exception as err:
            if self.before_pass is not None:
                self._restore(self.before_pass)  # the flushes run in attention, after update
            if hasattr(err, "add_note"):
                err.add_note(
                    f"while layer {self.layer_idx} encoded with {stream.method!r}; nothing was stored"
                )
            raise

    def _flush_stream(self, stream: Stream) -> Stream:
        first = stream.sink_len() + stream.encoded
        count = self.encoded_end(stream, self.length) - first
        if count <= 0:
            return stream
        assert stream.exact is not None
        if stream.identity:  # its encoded form is the exact one, already in place
            return attrs.evolve(stream, encoded=stream.encoded + count)
        chunk = stream.exact.view()[..., :count, :]
        if isinstance(stream.method, KeyQuantizer):
            block = stream.method.encode_at(chunk, self.layer_idx, first)
        else:
            stats = None if self.sq_attention is None else self.sq_attention[..., :count]
            block = stream.method.encode(chunk, self.layer_idx, stats)
        if block.tokens != count:
            raise CacheStateError(f"{stream.method!r} encoded {block.tokens} tokens, was given {count}")
        self._check_block(block, stream, first)
        if stream is self.v and self.sq_attention is not None:
            self.sq_attention = self.sq_attention[..., count:]
        arenas = list(stream.arenas)
        if arenas and arenas[-1].fits(block):
            arenas[-1] = arenas[-1].append(block)
        else:
            arenas.append(BlockArena.of(block, stream.method.block_tokens, self.cache.capacity))
        exact = stream.exact.drop(count)
        return attrs.evolve(stream, arenas=tuple(arenas), exact=exact, encoded=stream.encoded + count)

    def _check_block(self, block: EncodedBlock, stream: Stream, first: int) -> None:
        """A block whose float tensors are not finite would decode to NaN: refuse it, with where and why."""
        floats = [(name, t) for name, t, *_ in iter_stored(block) if t.is_floating_point() and t.numel()]
        if not floats or floats[0][1].device.type == "meta":
            return
        flag = self.cache._flag(floats[0][1].device)
        if flag is not None:
            flag.watch(t for _, t in floats)
            return
        # the CPU from here on: reading the check back costs no sync
        if bool(torch.stack([torch.isfinite(checkable(t)).all() for _, t in floats]).all()):
            return
        name = next(name for name, t in floats if not bool(torch.isfinite(checkable(t)).all()))
        raise CacheStateError(
            f"layer {self.layer_idx}: {stream.method!r} stored non-finite {name!r} for positions {first} to "
            f"{first + block.tokens - 1}; their values exceed what its storage holds (float16 scales and "
            "minima stop at 65504)"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.cache, self.layer_idx)  # type: ignore[misc]

    def offload(self) -> None:
        raise CacheStateError("QuantizedKVCache does not support offloading")

    def prefetch(self) -> None:
        raise CacheStateError("QuantizedKVCache does not support offloading")

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.undo = []  # a crop after a batch change goes through the stored tokens
        self.k = self.k.map(fn)
        self.v = self.v.map(fn)
        if self.sq_attention is not None:
            self.sq_attention = fn(self.sq_attention)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count).

        Within the passes of the last CROP_TOKENS tokens (a speculative pass's candidates, a few
        decode steps), the layer goes back exactly to what it held before them and stores the
        kept tokens again, as a cache that never saw the others (no value policy statistic may
        be involved: see :attr:`is_croppable`). Further back, encoded tokens are kept in whole
        encode units; tokens that stay but sat in a unit the cut runs through come back into the
        window in their decoded (lossy) form: the exact ones are gone, and nothing exact is
        invented.
        """
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or self.length == 0:
            return
        new_length = max(0, self.length + tokens_to_remove)
        if self.cache.value_statistic is None and self._undone(new_length):
            return
        self.undo = []
        self.k, self.v = (self._cropped(stream, new_length) for stream in (self.k, self.v))
        if self.sq_attention is not None:
            window = self.v.window
            shape = (*self.sq_attention.shape[:2], 0 if window is None else window.shape[-2])
            self.sq_attention = self.sq_attention.new_zeros(shape)
        self.length = new_length
        self.pending = self.before_pass = None

    def _cropped(self, stream: Stream, new_length: int) -> Stream:
        s = min(new_length, stream.sink_len())
        sinks = stream.sinks[..., :s, :] if stream.sinks is not None and s else None
        if stream.identity:  # every token is still exact
            exact = None if stream.exact is None else stream.exact.keep(new_length - s)
            encoded = min(stream.encoded, new_length - s)
            return attrs.evolve(stream, sinks=sinks, exact=exact, encoded=encoded)
        decoded = stream.decoded()
        arenas, pos = [], s
        for arena in stream.arenas:
            kept = arena.keep(new_length - pos) if pos + arena.tokens > new_length else arena
            if kept.tokens:
                arenas.append(kept)
            pos += kept.tokens
            if kept.tokens < arena.tokens:
                break
        window = decoded[..., pos:new_length, :].to(self.dtype)
        exact = ExactTokens.of(window, pos) if window.shape[-2] else None
        return attrs.evolve(stream, sinks=sinks, arenas=tuple(arenas), exact=exact, encoded=pos - s)

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as the attention reads them, (b, h, length, d) float32, for diagnostics."""
        return self.k.decoded(), self.v.decoded()

    # --- accounting -----------------------------------------------------------------------

    def nbytes_by_part(self) -> dict[str, dict[Part, int]]:
        out: dict[str, dict[Part, int]] = {}
        for kind, stream in (("keys", self.k), ("values", self.v)):
            parts: dict[Part, int] = dict.fromkeys(PARTS, 0)
            for block in stream.blocks:
                for part, n in block_nbytes(block).items():
                    parts[part] += n
            for exact in (stream.sinks, stream.window):
                if exact is not None:
                    parts["exact"] += exact.numel() * exact.element_size()
            parts["other"] += stream.method.state_nbytes(self.layer_idx)
            out[kind] = parts
        if self.sq_attention is not None:
            out["values"]["other"] += self.sq_attention.numel() * self.sq_attention.element_size()
        return out

    def reserved_nbytes(self) -> int:
        """Bytes of the buffers this layer's tokens live in, spare room included."""
        total = 0
        for stream in (self.k, self.v):
            total += sum(arena.nbytes() for arena in stream.arenas)
            for t in (stream.sinks, None if stream.exact is None else stream.exact.data):
                total += 0 if t is None else t.numel() * t.element_size()
        return total

    def elements(self) -> int:
        """Elements of one of K or V at this length: batch * kv_heads * tokens * head_dim."""
        ref = next((t for t in (self.k.window, self.k.sinks) if t is not None and t.numel()), None)
        if ref is None and self.k.blocks:
            ref = self.k.blocks[0].dequantize()
        if ref is None:
            return 0
        b, h, _, d = ref.shape
        return b * h * (self.length - self.k.dropped) * d  # the tokens it holds


def _cat(old: torch.Tensor | None, new: torch.Tensor, dim: int = -2) -> torch.Tensor:
    return new if old is None or old.shape[dim] == 0 else torch.cat([old, new], dim=dim)
