"""``QuantizedKVCache``: a transformers ``Cache`` that stores keys and values with any pair of methods.

Per layer, tokens live in three places, in order: up to ``sinks`` exact tokens at the start, the
encoded blocks, and a full-precision window of the latest tokens. A token leaves the window when
``window`` newer tokens follow it, in whole multiples of the method's ``block_tokens`` (keys in
groups, KIVI-style; values usually one by one). Keys are encoded in ``update``; values after the
attention of that step, so a policy can see the squared attention its tokens received in the window.

``update`` returns only the tokens of the current forward pass (the "in-flight" tokens), tagged
with their layer; the ``headq`` attention function (:mod:`headq_core.attention`) reads everything
older from the encoded storage. Nothing older than the window is ever kept unquantized, and a
model whose attention bypasses the ``headq`` function is caught at the next ``update``.

In-flight tokens are attended at full precision, as a serving engine attends to the prefill it
is storing. With ``emulate_streaming=True`` each query of a multi-token pass instead sees every
earlier token in the state it would have had if the tokens had been fed one at a time, which is
what lets the harness score many decode steps in one pass and still equal true streaming.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from headq_core.errors import CacheStateError
from headq_core.interfaces import KeyQuantizer, ValuePolicy
from headq_core.layouts import (
    PARTS,
    EncodedBlock,
    Part,
    block_nbytes,
    concat_blocks,
    iter_stored,
    map_batched,
)
from headq_core.registry import Registry, get_registry
from headq_core.spec import Spec

LAYER_ATTR = "_headq_layer"
MAX_BLOCK_TOKENS = 1024  # consecutive blocks merge up to this size, so attention loops stay short


@attrs.define
class _Stream:
    """Tokens of one kind (keys or values) of one layer."""

    method: KeyQuantizer | ValuePolicy
    sinks: torch.Tensor | None = None  # (b, h, s, d) exact
    blocks: list[EncodedBlock] = attrs.Factory(list)
    window: torch.Tensor | None = None  # (b, h, w, d) exact
    encoded: int = 0  # tokens in blocks

    def sink_len(self) -> int:
        return 0 if self.sinks is None else self.sinks.shape[-2]

    def append_block(self, block: EncodedBlock) -> None:
        if self.blocks and self.blocks[-1].tokens + block.tokens <= MAX_BLOCK_TOKENS:
            merged = concat_blocks([self.blocks[-1], block])
            if merged is not None:
                self.blocks[-1] = merged
                return
        self.blocks.append(block)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.sinks = None if self.sinks is None else fn(self.sinks)
        self.window = None if self.window is None else fn(self.window)
        self.blocks = [map_batched(b, fn) for b in self.blocks]

    def copy(self) -> _Stream:
        """A snapshot: the same tensors (never written in place), its own list of blocks."""
        return attrs.evolve(self, blocks=list(self.blocks))

    def exact_reference(self) -> torch.Tensor | None:
        """An exact tensor of this stream, (b, h, *, d), to compare new tokens' geometry with."""
        return self.window if self.window is not None else self.sinks


@attrs.frozen
class _LayerState:
    """What a failed update or value flush restores: the layer as it was before the pass."""

    length: int
    k: _Stream
    v: _Stream
    sq_attention: torch.Tensor | None
    initialized: bool


@attrs.define
class _InFlight:
    start: int  # absolute position of the first in-flight token
    key_first: int  # absolute position of the first key-window token before this pass's flush
    key_window: torch.Tensor | None  # (b, h, length - key_first, d): those keys, exact


class QuantizedLayer(CacheLayerMixin):
    """One layer of a :class:`QuantizedKVCache`."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, cache: QuantizedKVCache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.length = 0
        self.k = _Stream(cache.key_method)
        self.v = _Stream(cache.value_method)
        # (b, h, value window) running sum of p^2 (or of p: the policy's attention_statistic)
        self.sq_attention: torch.Tensor | None = None
        self.pending: _InFlight | None = None
        self.before_pass: _LayerState | None = None  # until the values of the pass are flushed

    # --- the flush rule ----------------------------------------------------------------------

    def encoded_end(self, stream: _Stream, n_tokens: int) -> int:
        """Absolute end of the encoded region once ``n_tokens`` tokens have arrived."""
        s, r, g = self.cache.sinks, self.cache.window, stream.method.block_tokens
        free = max(0, n_tokens - s - r)
        return min(n_tokens, s) + (free // g) * g

    def quantized_state(
        self, stream: _Stream, queries: torch.Tensor, tokens: torch.Tensor, inflight_start: int
    ) -> torch.Tensor:
        """(n, m) bool: token ``tokens[i]`` is read encoded by query ``queries[j]`` (absolute positions)."""
        q, k = queries[:, None], tokens[None, :]
        if self.cache.emulate_streaming:
            end = torch.tensor(
                [self.encoded_end(stream, int(j) + 1) for j in queries.tolist()], device=queries.device
            )[:, None]
            return (k >= self.cache.sinks) & (k < end) & (k < q)
        end_now = self.encoded_end(stream, self.length)
        return ((k >= self.cache.sinks) & (k < end_now) & (k < inflight_start)).expand(q.shape[0], -1)

    # --- transformers layer API --------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
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
            for stream, new in ((self.k, key_states), (self.v, value_states)):
                if take:
                    stream.sinks = _cat(stream.sinks, new[..., :take, :])
                if n > take:
                    stream.window = _cat(stream.window, new[..., take:, :])
            if self.cache.value_statistic is not None and n > take:
                zeros = value_states.new_zeros((*value_states.shape[:2], n - take), dtype=torch.float32)
                self.sq_attention = _cat(self.sq_attention, zeros, dim=-1)
            self.length += n
            self.pending = _InFlight(start, self.k.sink_len() + self.k.encoded, self.k.window)
            self._flush(self.k)
        except BaseException:
            self._restore(before)
            raise
        self.before_pass = before
        tagged = key_states.view_as(key_states)
        setattr(tagged, LAYER_ATTR, self)
        return tagged, value_states

    # --- validation and roll-back --------------------------------------------------------------

    def _check_input(self, keys: Any, values: Any) -> None:
        """Refuse what would corrupt the stored state, before anything is stored.

        One ``isfinite`` reduction per update: a NaN or Inf token would otherwise spoil the
        scale and minimum of every token in its quantization group without a trace.
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
                ref = stream.exact_reference()
                if ref is not None and (ref.shape[:2] != new.shape[:2] or ref.shape[-1] != new.shape[-1]):
                    raise CacheStateError(
                        f"{where}: holds {name} of batch {ref.shape[0]}, {ref.shape[1]} heads of "
                        f"{ref.shape[-1]} channels; was given {tuple(new.shape)} (batch, kv_heads, tokens, head_dim)"
                    )
        if keys.device.type != "meta" and not bool(torch.isfinite(keys).all() & torch.isfinite(values).all()):
            name, bad = ("keys", keys) if not bool(torch.isfinite(keys).all()) else ("values", values)
            b, h, t, c = (~torch.isfinite(bad)).nonzero()[0].tolist()
            raise CacheStateError(
                f"{where}: {name} hold {bad[b, h, t, c].item()} at batch {b}, kv head {h}, position "
                f"{self.length + t} (token {t} of the {bad.shape[-2]} of this pass), channel {c}; nothing "
                "of this pass was stored (a non-finite token would spoil the scales of its whole group)"
            )

    def _snapshot(self) -> _LayerState:
        return _LayerState(self.length, self.k.copy(), self.v.copy(), self.sq_attention, self.is_initialized)

    def _restore(self, state: _LayerState) -> None:
        self.length, self.k, self.v = state.length, state.k.copy(), state.v.copy()
        self.sq_attention, self.is_initialized = state.sq_attention, state.initialized
        self.pending = self.before_pass = None

    def _flush(self, stream: _Stream, sq_attention: torch.Tensor | None = None) -> None:
        """Encode the tokens that leave the window; on failure leave the layer as before the pass."""
        try:
            self._flush_stream(stream)
        except Exception as err:
            if stream is self.v and self.before_pass is not None:
                self._restore(self.before_pass)  # the value flush runs in attention, after update
            if hasattr(err, "add_note"):
                err.add_note(
                    f"while layer {self.layer_idx} encoded with {stream.method!r}; nothing was stored"
                )
            raise
        if stream is self.v:
            self.before_pass = None  # the pass is complete

    def _flush_stream(self, stream: _Stream) -> None:
        end = self.encoded_end(stream, self.length)
        count = end - stream.sink_len() - stream.encoded
        if count <= 0:
            return
        assert stream.window is not None
        chunk = stream.window[..., :count, :]
        stats = None
        if isinstance(stream.method, KeyQuantizer):
            block = stream.method.encode(chunk, self.layer_idx)
        else:
            if self.sq_attention is not None:
                stats = self.sq_attention[..., :count]
            block = stream.method.encode(chunk, self.layer_idx, stats)
        if block.tokens != count:
            raise CacheStateError(f"{stream.method!r} encoded {block.tokens} tokens, was given {count}")
        _check_block(block, stream, self.layer_idx, stream.sink_len() + stream.encoded)
        stream.window = stream.window[..., count:, :]
        if stats is not None and self.sq_attention is not None:
            self.sq_attention = self.sq_attention[..., count:]
        stream.append_block(block)
        stream.encoded += count

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
        self.k.map(fn)
        self.v.map(fn)
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

        Tokens that stay but sat in an encoded block the cut runs through come back into the
        window in their decoded (lossy) form: the exact ones are gone, and nothing exact is invented.
        """
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        new_length = self.length + tokens_to_remove
        if tokens_to_remove == 0 or self.length == 0:
            return
        new_length = max(0, new_length)
        for stream in (self.k, self.v):
            decoded = self._decoded_stream(stream)
            ends = self._block_ends(stream)
            stream.blocks = [b for b, stop in zip(stream.blocks, ends, strict=False) if stop <= new_length]
            stream.encoded = sum(b.tokens for b in stream.blocks)
            s = min(new_length, stream.sink_len())
            stream.sinks = stream.sinks[..., :s, :] if stream.sinks is not None and s else None
            stream.window = decoded[..., s + stream.encoded : new_length, :].to(self.dtype)
        if self.sq_attention is not None:
            assert self.v.window is not None
            self.sq_attention = self.sq_attention.new_zeros(self.v.window.shape[:3])
        self.length = new_length
        self.pending = self.before_pass = None

    def _block_ends(self, stream: _Stream) -> list[int]:
        ends, pos = [], stream.sink_len()
        for block in stream.blocks:
            pos += block.tokens
            ends.append(pos)
        return ends

    def _decoded_stream(self, stream: _Stream) -> torch.Tensor:
        parts = [] if stream.sinks is None else [stream.sinks.float()]
        parts += [b.dequantize(torch.float32) for b in stream.blocks]
        if stream.window is not None:
            parts.append(stream.window.float())
        return torch.cat(parts, dim=-2)

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as the attention reads them, (b, h, length, d) float32, for diagnostics."""
        return self._decoded_stream(self.k), self._decoded_stream(self.v)

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

    def elements(self) -> int:
        """Elements of one of K or V at this length: batch * kv_heads * tokens * head_dim."""
        ref = next((t for t in (self.k.window, self.k.sinks) if t is not None and t.numel()), None)
        if ref is None and self.k.blocks:
            ref = self.k.blocks[0].dequantize()
        if ref is None:
            return 0
        b, h, _, d = ref.shape
        return b * h * self.length * d


def _check_block(block: EncodedBlock, stream: _Stream, layer_idx: int, first: int) -> None:
    """A block whose float tensors are not finite would decode to NaN: refuse it, with where and why."""
    floats = [(name, t) for name, t, *_ in iter_stored(block) if t.is_floating_point() and t.numel()]
    if not floats or floats[0][1].device.type == "meta":
        return
    if bool(torch.stack([torch.isfinite(t).all() for _, t in floats]).all()):
        return
    name = next(name for name, t in floats if not bool(torch.isfinite(t).all()))
    raise CacheStateError(
        f"layer {layer_idx}: {stream.method!r} stored non-finite {name!r} for positions {first} to "
        f"{first + block.tokens - 1}; their values exceed what its storage holds (float16 scales and "
        "minima stop at 65504)"
    )


def _ranges(lengths: dict[int, int]) -> str:
    """'layers 0-3: 15 tokens, layers 4-29: 10 tokens' from {layer: length}."""
    runs: list[list[int]] = []  # [first, last, length]
    for idx, n in sorted(lengths.items()):
        if runs and runs[-1][2] == n and runs[-1][1] == idx - 1:
            runs[-1][1] = idx
        else:
            runs.append([idx, idx, n])
    return ", ".join(
        f"layer{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}: {n} tokens" for a, b, n in runs
    )


def _cat(old: torch.Tensor | None, new: torch.Tensor, dim: int = -2) -> torch.Tensor:
    return new if old is None or old.shape[dim] == 0 else torch.cat([old, new], dim=dim)


class QuantizedKVCache(Cache):
    """A transformers cache whose keys and values are stored by named methods.

    Parameters
    ----------
    keys, values:
        Method specs (``"kivi:bits=2,group=32"``), parsed specs, or method instances.
    window:
        Tokens kept at full precision after the newest (R). Keys leave it in whole groups.
    sinks:
        Tokens at the start of the sequence kept exact for good.
    config:
        The model config; gives the layer count up front and is handed to methods that bind to
        the model (calibrated bases, codebooks). Without it, layers are created as first used.
    calibration:
        A calibration artifact for methods that need one.
    emulate_streaming:
        Multi-token passes see earlier tokens as token-by-token streaming would (see module doc).
    """

    def __init__(
        self,
        keys: str | Spec | KeyQuantizer = "fp16",
        values: str | Spec | ValuePolicy = "fp16",
        *,
        window: int = 0,
        sinks: int = 0,
        config: Any = None,
        calibration: Any = None,
        emulate_streaming: bool = False,
        registry: Registry | None = None,
    ) -> None:
        registry = registry or get_registry()
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be a non-negative int, got {window!r}")
        if not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks must be a non-negative int, got {sinks!r}")
        self.key_method = registry.key_quantizer(keys)
        self.value_method = registry.value_policy(values)
        self.value_statistic = self.value_method.attention_statistic
        self.window, self.sinks = window, sinks
        self.emulate_streaming = emulate_streaming
        text_config = config.get_text_config(decoder=True) if config is not None else None
        for method in (self.key_method, self.value_method):
            method.bind(text_config, calibration)
        n_layers = getattr(text_config, "num_hidden_layers", None)
        layers = [QuantizedLayer(self, i) for i in range(n_layers)] if n_layers else []
        super().__init__(layers=layers)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"QuantizedKVCache(keys={self.key_method.spec}, values={self.value_method.spec}, "
            f"window={self.window}, sinks={self.sinks}, layers={len(self.layers)})"
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise CacheStateError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
        if layer_idx == 0:  # a new forward pass: every layer must hold what the others hold
            lengths = {
                layer.layer_idx: layer.length for layer in self.quantized_layers() if layer.is_initialized
            }
            if len(set(lengths.values())) > 1:
                raise CacheStateError(
                    f"the layers hold different numbers of tokens ({_ranges(lengths)}): an earlier forward "
                    "pass failed part-way through the model; this cache cannot continue, start a new one"
                )
        while len(self.layers) <= layer_idx:
            self.layers.append(QuantizedLayer(self, len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def quantized_layers(self) -> list[QuantizedLayer]:
        return [layer for layer in self.layers if isinstance(layer, QuantizedLayer)]

    def nbytes(self) -> int:
        """Every byte the cache holds: codes, scales, side codes, windows, sinks, method state."""
        return sum(n for parts in self.nbytes_by_part().values() for n in parts.values())

    def nbytes_by_part(self) -> dict[str, dict[Part, int]]:
        total: dict[str, dict[Part, int]] = {k: dict.fromkeys(PARTS, 0) for k in ("keys", "values")}
        for layer in self.quantized_layers():
            for kind, parts in layer.nbytes_by_part().items():
                for part, n in parts.items():
                    total[kind][part] += n
        return total

    def bits_per_element(self) -> dict[str, dict[str, float]]:
        """Bits per cached element for keys, values and both, split into parts plus ``total``."""
        elements = sum(layer.elements() for layer in self.quantized_layers())
        if elements == 0:
            raise CacheStateError("the cache is empty; run the model before asking for its bits")
        by_part = self.nbytes_by_part()
        out: dict[str, dict[str, float]] = {}
        for kind, parts in by_part.items():
            out[kind] = {p: 8 * n / elements for p, n in parts.items()}
            out[kind]["total"] = sum(out[kind][p] for p in PARTS)
        out["all"] = {p: (out["keys"][p] + out["values"][p]) / 2 for p in [*PARTS, "total"]}
        return out
