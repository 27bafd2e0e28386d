"""Decode steps with every buffer in place, replayed as CUDA graphs: the static mode of a cache.

A decode step of :class:`~headq_core.cache.QuantizedKVCache` in its usual (eager) mode is cheap on
the GPU and costs the host about a millisecond per layer: Python decides per step where tokens go,
which tokens leave the window, and how the kernel splits the stored tokens. :class:`StaticDecode`
moves all of that out of the step. Over a fixed ``capacity`` of tokens, set up once after the
prompt:

- each layer's encoded tokens live in one arena sized for the capacity, and its window in a ring
  of ``window`` + one encode unit rows (an ``fp16`` stream keeps every token at its position);
- every number that changes from step to step (the ring slot of the new token, the ring slots of
  the tokens that leave the window, where their codes go, the positions, the kernel's split table)
  is written by the host into one small device buffer before the step: one copy, read by every
  layer through index tensors and by fixed-grid kernels (a launch has as many split rows as the
  capacity can need; rows past the step's own are empty);
- whether a step encodes keys, values or neither (KIVI keys leave the window 32 at a time, values
  one by one) picks one of a few graphs, each captured the second time its pattern comes up (the
  first run compiles the kernels and fills lazy state) and replayed after.

So a step costs the host one copy, one graph launch and the bookkeeping of a few integers, and the
GPU what the kernels cost: the step the eager mode computes, with the same kernels, the same flush
rule and the same splits (a split's length is fixed for the capacity rather than for the length).
``graphs=False`` runs the same static steps without capture: on the CPU, where tests compare them
with the eager mode, ``decode_plan.attend_torch`` stands in for the kernel.

What it takes: no sinks, no sliding-window layers, no value policy that keeps an attention
statistic (A²), no emulated streaming, no softcapped logits, blocks that describe a kernel segment;
it says which one is missing. :meth:`StaticDecode.close` hands the tokens back to the cache's
layers, which then go on in eager mode (a crop, a longer prompt, beams).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import torch

from headq_core import fused
from headq_core.compat import cache_kwargs
from headq_core.devices import on_device
from headq_core.errors import CacheStateError
from headq_core.finite import checkable
from headq_core.interfaces import KeyQuantizer
from headq_core.layer import LAYER_ATTR, QuantizedLayer
from headq_core.layouts import NoKernelLayout
from headq_core.step import encoded_end
from headq_core.storage import BlockArena, ExactTokens, Stream, _get
from headq_kernels import decode_plan

Variant = tuple[bool, bool]  # (keys encode a unit this step, values encode a unit this step)


@attrs.define(eq=False)
class _StaticStream:
    """One layer's keys or values in static buffers.

    ``data``: an identity stream's tokens by position, (b, h, capacity, d); otherwise the window
    ring, (b, h, ring, d), token ``p`` in row ``p % ring``. ``arena``: the encoded tokens, buffers
    for the capacity (None for an identity stream). How many tokens are encoded is the flush rule's
    count at the stream's length (:meth:`encoded`): no step keeps it.
    """

    method: Any
    identity: bool
    unit: int
    data: torch.Tensor
    arena: BlockArena | None
    window: int

    def encoded(self, n_tokens: int) -> int:
        return encoded_end(n_tokens, 0, self.window, self.unit)

    def store(self, new: torch.Tensor, row: torch.Tensor) -> None:
        self.data.index_copy_(2, row, new)

    def flush(self, layer_idx: int, gather: torch.Tensor, dest: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encode the unit of ring rows ``gather`` into the arena at ``dest`` (per arena tensor,
        the indices along its token axis); returns the block's float tensors (to be checked)."""
        assert self.arena is not None
        chunk = self.data.index_select(2, gather)
        if isinstance(self.method, KeyQuantizer):
            block = self.method.encode(chunk, layer_idx)
        else:
            block = self.method.encode(chunk, layer_idx, None)
        if not self.arena.fits(block):
            raise CacheStateError(
                f"layer {layer_idx}: {self.method!r} encoded a block unlike the ones stored"
            )
        floats = []
        for index, (path, axis, _, _) in zip(dest, self.arena.layout.tensors, strict=True):
            new = _get(block, path)
            _bytes_of(_get(self.arena.buffers, path)).index_copy_(axis, index, _bytes_of(new))
            if new.is_floating_point():
                floats.append(new)
        return floats

    def layout(self, n_tokens: int, ring: int) -> tuple[tuple[int, int, int, int], ...]:
        """The kernel's segments of this stream at ``n_tokens`` (kind, covered, first row, chunk)."""
        if self.identity:
            return ((decode_plan.DENSE, n_tokens, 0, 0),)
        assert self.arena is not None
        seg = self.arena.kernel_segment(0)
        encoded = self.encoded(n_tokens)
        first, count = encoded % ring, n_tokens - encoded
        piece = min(count, ring - first)
        return (
            (decode_plan.kind(seg), encoded, 0, getattr(seg, "chunk", 0)),
            (decode_plan.DENSE, piece, first, 0),
            (decode_plan.DENSE, count - piece, 0, 0),
        )

    def segments(self) -> list[Any]:
        """The kernel segments the table describes (the ring twice: its two pieces)."""
        if self.identity:
            return [decode_plan.Dense(self.data)]
        assert self.arena is not None
        return [self.arena.kernel_segment(0), decode_plan.Dense(self.data), decode_plan.Dense(self.data)]

    def handed_back(self, n_tokens: int, ring: int) -> Stream:
        """The eager stream holding the same tokens."""
        encoded = self.encoded(n_tokens)
        if self.identity:
            exact = ExactTokens(self.data, 0, n_tokens, 0)
            return Stream(self.method, identity=True, exact=exact, encoded=encoded)
        assert self.arena is not None
        rows = torch.arange(encoded, n_tokens, device=self.data.device) % ring
        exact = ExactTokens.of(self.data.index_select(2, rows), encoded)
        arenas = (BlockArena(self.arena.buffers, encoded, self.arena.layout),) if encoded else ()
        return Stream(self.method, identity=False, arenas=arenas, exact=exact, encoded=encoded)


class StaticLayer:
    """One layer in static mode: ``update`` keeps the step's tokens, the ``headq`` attention
    function calls :meth:`attend` (the layer tags the keys it returns, as an eager layer does)."""

    def __init__(self, run: StaticDecode, layer_idx: int, k: _StaticStream, v: _StaticStream) -> None:
        self.run, self.layer_idx, self.k, self.v = run, layer_idx, k, v
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.plan: decode_plan.Plan | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if keys.shape[-2] != 1:
            raise CacheStateError(
                f"layer {self.layer_idx}: a static decode step takes one token per sequence, got "
                f"{keys.shape[-2]}; close() the StaticDecode to run longer passes"
            )
        self.pending = (keys, values)
        tagged = keys.view_as(keys)
        setattr(tagged, LAYER_ATTR, self)
        return tagged, values

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query (b, hq, 1, d) -> (b, hq, 1, d): store, encode what leaves the window, attend."""
        if self.pending is None:
            raise CacheStateError(f"layer {self.layer_idx}: attention called without a pending update")
        (keys, values), self.pending = self.pending, None
        run = self.run
        checked = [keys, values]
        for stream, new, name, flushing in (
            (self.k, keys, "keys", run.variant[0]),
            (self.v, values, "values", run.variant[1]),
        ):
            stream.store(new, run.index["row" if stream.identity else "slot"])
            if flushing:
                checked += stream.flush(self.layer_idx, run.index[f"{name} from"], run.dest[name])
        run.check(self.layer_idx, checked)
        b, hq, _, d = query.shape
        hkv = self.k.data.shape[1]
        q = query.reshape(b, hkv, hq // hkv, d)
        plan = run.plan_for(self)
        side_query = fused.side_query(plan.parts[: len(plan.parts) - plan.value_segments], q)
        out = run.attend(q, plan, scale=scaling, mask=run.mask, side_query=side_query)
        return out.reshape(query.shape)


@attrs.frozen
class _Tables:
    """The step's numbers: ``index`` views of one int64 buffer, the split rows of each launch."""

    host: torch.Tensor  # int64, pinned on CUDA
    device: torch.Tensor
    splits_host: torch.Tensor  # (launches * rows, 7) int32
    splits: torch.Tensor


class StaticDecode:
    """Greedy-ready decode steps over ``cache`` with every buffer fixed for ``capacity`` tokens.

    model: the model the cache serves (``attn_implementation="headq"``), its prompt already run
    through the cache in eager mode. attention_mask: the prompt's (b, length) mask (1 = token,
    0 = padding), or None. graphs: capture CUDA graphs (default: on CUDA); False runs the same
    steps eagerly. Use as a context manager, or call :meth:`close` to hand the tokens back.
    """

    def __init__(
        self,
        model: Any,
        cache: Any,
        *,
        capacity: int,
        attention_mask: torch.Tensor | None = None,
        graphs: bool | None = None,
    ) -> None:
        layers = cache.quantized_layers()
        _refuse(model, cache, layers)
        first = layers[0]
        self.model, self.cache, self.length = model, cache, first.length
        self.start = self.length  # tokens held when the static mode began
        if capacity <= self.length:
            raise ValueError(f"capacity {capacity} must exceed the {self.length} tokens the cache holds")
        self.device, self.dtype = first.device, first.dtype
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device (graphs=False runs eagerly)")
        if self.device.type == "cuda" and not fused.available():
            raise CacheStateError(
                "static decode on CUDA runs the fused kernel: Triton is missing or HEADQ_KERNELS=0"
            )
        self.window = cache.window
        units = (cache.key_method.block_tokens, cache.value_method.block_tokens)
        self.ring = self.window + max(units)
        self.layers = [self._convert(layer) for layer in layers]
        self.capacity = -(-capacity // math.lcm(*units)) * math.lcm(*units)
        self._reserve()
        ref = self.layers[0].k.data
        batch, hkv, d = ref.shape[0], ref.shape[1], ref.shape[-1]
        self.batch = batch
        self.mask, self.next_position = self._mask(attention_mask, batch)
        self.attend: Callable[..., torch.Tensor] = (
            fused._triton().attend if self.device.type == "cuda" else decode_plan.attend_torch
        )
        # as the eager decode step tiles tokens (fused.decode_step)
        seg = self.layers[0].k.segments()[0]
        key_group = seg.group if isinstance(seg, decode_plan.AffineTokens) else 1
        chunk = getattr(self.layers[0].v.segments()[0], "chunk", 0)
        self.block_n = decode_plan.tile_tokens(d, key_group, chunk)
        self.key_group = key_group if isinstance(seg, decode_plan.AffineTokens) else 0
        self.split = decode_plan.split_length(self.capacity, batch * hkv, self.block_n)
        self.rows = self.capacity // self.split + 4  # split rows a launch may need at any length
        self.pairs = self._pairs()
        self.index, self.dest, self.tables = self._index_tables()
        self.variant: Variant = (False, False)
        self._ids = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self._graphs: dict[Variant, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[Variant, torch.Tensor] = {}
        self._seen: set[Variant] = set()
        self._pool: Any = None
        self._stream = torch.cuda.Stream(self.device) if self.graphs else None
        self._kwargs = cache_kwargs(model, cache)
        self._copied: torch.cuda.Event | None = None
        self.closed = False
        cache.static = self

    # --- set-up -----------------------------------------------------------------------------------

    def _convert(self, layer: QuantizedLayer) -> StaticLayer:
        streams = []
        for stream in (layer.k, layer.v):
            assert stream.exact is not None
            unit = stream.method.block_tokens
            if stream.identity:
                data = stream.exact.data
                if stream.exact.origin != 0 or stream.exact.start != 0:
                    data = stream.exact.rows(0, layer.length)
                streams.append(_StaticStream(stream.method, True, unit, data, None, self.window))
                continue
            arena = stream.arenas[0] if stream.arenas else self._empty_arena(layer, stream)
            try:
                arena.kernel_segment(0)
            except NoKernelLayout as err:
                raise CacheStateError(
                    f"static decode reads every encoded token on the kernel: {err}"
                ) from err
            x = stream.exact.view()
            ring = x.new_zeros((*x.shape[:2], self.ring, x.shape[-1]))
            rows = torch.arange(stream.encoded, layer.length, device=x.device) % self.ring
            ring.index_copy_(2, rows, x)
            streams.append(_StaticStream(stream.method, False, unit, ring, arena, self.window))
        return StaticLayer(self, layer.layer_idx, *streams)

    def _empty_arena(self, layer: QuantizedLayer, stream: Stream) -> BlockArena:
        """An arena of no tokens for a stream that encoded none yet (its layout from a unit of zeros)."""
        assert stream.exact is not None
        x = stream.exact.view()
        zeros = x.new_zeros((*x.shape[:2], stream.method.block_tokens, x.shape[-1]))
        if isinstance(stream.method, KeyQuantizer):
            block = stream.method.encode(zeros, layer.layer_idx)
        else:
            block = stream.method.encode(zeros, layer.layer_idx, None)
        return BlockArena.of(block, stream.method.block_tokens).keep(0)

    def _reserve(self) -> None:
        for layer in self.layers:
            for stream in (layer.k, layer.v):
                if stream.identity and stream.data.shape[-2] < self.capacity:
                    data = stream.data.new_zeros(
                        (*stream.data.shape[:2], self.capacity, stream.data.shape[-1])
                    )
                    data[..., : self.length, :].copy_(stream.data[..., : self.length, :])
                    stream.data = data
                elif stream.arena is not None:
                    stream.arena = stream.arena.reserve(self.capacity)

    def _mask(self, attention_mask: torch.Tensor | None, batch: int) -> tuple[torch.Tensor | None, list[int]]:
        """The kernel's (b, capacity) uint8 mask (None where nothing is padded) and each row's next position."""
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, self.length):
            raise ValueError(
                f"attention_mask must be (batch, tokens held) = ({batch}, {self.length}), got {tuple(attention_mask.shape)}"
            )
        if attention_mask is None or bool(attention_mask.all()):
            return None, [self.length] * batch
        mask = torch.ones((batch, self.capacity), dtype=torch.uint8, device=self.device)
        mask[:, : self.length] = attention_mask.to(device=self.device, dtype=torch.uint8)
        return mask, [int(n) for n in attention_mask.sum(-1).tolist()]

    def _layouts(self, n_tokens: int) -> tuple[Any, ...]:
        layer = self.layers[0]
        return (layer.k.layout(n_tokens, self.ring), layer.v.layout(n_tokens, self.ring))

    def _pairs(self) -> list[tuple[int, int]]:
        """The pairs of segment kinds any step can launch: those of the steps of two periods of
        both encode units past the window (the flush rule repeats from there)."""
        pairs: set[tuple[int, int]] = set()
        k, v = self.layers[0].k, self.layers[0].v
        span = self.window + 2 * math.lcm(k.unit, v.unit) + 2
        for n in range(self.length + 1, min(self.capacity, self.length + span) + 1):
            rows, _, _ = decode_plan._splits(self._layouts(n), self.key_group, self.block_n, self.split, True)
            pairs |= set(rows)
        return sorted(pairs)

    def _index_tables(self) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]], _Tables]:
        """The step's index tensors, views of one int64 device buffer, and the split tables."""
        sizes: list[tuple[str, int]] = [
            ("slot", 1),
            ("row", 1),
            ("cache position", 1),
            ("positions", self.batch),
        ]
        dest_names: dict[str, list[str]] = {}
        for name, stream in (("keys", self.layers[0].k), ("values", self.layers[0].v)):
            if stream.arena is None:
                continue
            sizes.append((f"{name} from", stream.unit))
            dest_names[name] = []
            for i in range(len(stream.arena.layout.tensors)):
                sizes.append((f"{name} to {i}", stream.arena.layout.units(i, stream.unit)))
                dest_names[name].append(f"{name} to {i}")
        total = sum(n for _, n in sizes)
        pin = self.device.type == "cuda"
        host = torch.zeros(total, dtype=torch.long, pin_memory=pin)
        device = torch.zeros(total, dtype=torch.long, device=self.device)
        index, at = {}, 0
        for name, n in sizes:
            index[name] = device[at : at + n]
            at += n
        self._slices = {name: (view.storage_offset(), view.numel()) for name, view in index.items()}
        dest = {name: [index[key] for key in keys] for name, keys in dest_names.items()}
        shape = (len(self.pairs) * self.rows, 7)
        splits_host = torch.zeros(shape, dtype=torch.int32, pin_memory=pin)
        splits = torch.zeros(shape, dtype=torch.int32, device=self.device)
        return index, dest, _Tables(host, device, splits_host, splits)

    def plan_for(self, layer: StaticLayer) -> decode_plan.Plan:
        """The layer's plan: its segment table (fixed), the shared split tables (rewritten each step)."""
        if layer.plan is None:
            keys, values = layer.k.segments(), layer.v.segments()
            covered = [dataclasses.replace(s, covered=0) for s in keys + values]
            base = decode_plan.plan(
                covered[: len(keys)], covered[len(keys) :], batch_heads=1, split=self.split
            )
            launches = [
                (k, v, self.tables.splits[i * self.rows : (i + 1) * self.rows])
                for i, (k, v) in enumerate(self.pairs)
            ]
            n_splits = len(self.pairs) * self.rows
            layer.plan = dataclasses.replace(
                base, launches=launches, n_splits=n_splits, length=self.capacity, block_n=self.block_n,
                split=self.split, parts=keys + values,
            )  # fmt: skip
        return layer.plan

    # --- a step ---------------------------------------------------------------------------------------

    def _prepare(self, n_tokens: int) -> Variant:
        """Write the step's numbers for ``n_tokens`` tokens held after it; returns its variant."""
        k, v = self.layers[0].k, self.layers[0].v
        values = np.zeros(self.tables.host.numel(), dtype=np.int64)

        def put(name: str, numbers: Any) -> None:
            at, n = self._slices[name]
            values[at : at + n] = numbers

        pos = n_tokens - 1
        put("slot", pos % self.ring)
        put("row", pos)
        put("cache position", pos)
        put("positions", [p + n_tokens - 1 - self.start for p in self.next_position])
        variant = []
        for name, stream in (("keys", k), ("values", v)):  # the rule is the same in every layer
            before, arena = stream.encoded(n_tokens - 1), stream.arena
            flushing = arena is not None and stream.encoded(n_tokens) > before  # one unit leaves
            if arena is not None and flushing:
                put(f"{name} from", (before + np.arange(stream.unit)) % self.ring)
                for i in range(len(arena.layout.tensors)):
                    start = arena.layout.units(i, before)
                    put(f"{name} to {i}", start + np.arange(arena.layout.units(i, stream.unit)))
            variant.append(flushing)
        self.tables.host.numpy()[:] = values
        self.tables.splits_host.numpy()[:] = self._splits_table(n_tokens).reshape(-1, 7)
        return bool(variant[0]), bool(variant[1])

    def _splits_table(self, n_tokens: int) -> np.ndarray:
        """(launches, rows, 7) split rows for ``n_tokens`` tokens; a launch's rows past its own are
        empty (no tokens, a split slot of their own, segments of the launch's kinds)."""
        layouts = self._layouts(n_tokens)
        by_pair, used, _ = decode_plan._splits(layouts, self.key_group, self.block_n, self.split, True)
        table = np.zeros((len(self.pairs), self.rows, 7), dtype=np.int32)
        spare = iter(range(used, len(self.pairs) * self.rows))
        for pair in by_pair:
            if pair not in self.pairs or len(by_pair[pair]) > self.rows:
                raise CacheStateError(f"static decode: no room for the splits {pair} at {n_tokens} tokens")
        for i, (k_kind, v_kind) in enumerate(self.pairs):
            rows = by_pair.get((k_kind, v_kind), [])
            if rows:
                table[i, : len(rows)] = rows
            k_seg = next(j for j, seg in enumerate(layouts[0]) if seg[0] == k_kind)
            v_seg = len(layouts[0]) + next(j for j, seg in enumerate(layouts[1]) if seg[0] == v_kind)
            for j in range(len(rows), self.rows):
                table[i, j] = (k_seg, 0, v_seg, 0, 0, 0, next(spare))
        return table

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One decode step: input_ids (b, 1) or (b,) -> the next token's logits (b, vocab).

        On CUDA graphs the logits are the graph's output buffer, overwritten by the next step of
        the same pattern: read (or copy) them before that."""
        if self.closed:
            raise CacheStateError("this StaticDecode was closed; its tokens are back in the cache")
        n_tokens = self.length + 1
        if n_tokens > self.capacity:
            raise CacheStateError(
                f"the static decode was set up for {self.capacity} tokens and holds them all: close() it "
                "and start another with a larger capacity"
            )
        self._check_flags()
        if self._copied is not None:
            self._copied.synchronize()  # the last step's numbers have left the host buffers
        self.variant = self._prepare(n_tokens)
        self.tables.device.copy_(self.tables.host, non_blocking=True)
        self.tables.splits.copy_(self.tables.splits_host, non_blocking=True)
        self._ids.copy_(input_ids.reshape(self.batch, 1), non_blocking=True)
        if self.graphs:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device))
        with on_device(self.device):  # graphs, pools and Triton launches go to the current device
            logits = self._run(self.variant)  # a step that fails counts nothing: the tokens held stay
        self.length = n_tokens
        for flag in self.cache._flags.values():
            flag.publish()
        return logits

    def _run(self, variant: Variant) -> torch.Tensor:
        if not self.graphs:
            return self._forward()
        graph = self._graphs.get(variant)
        if graph is None and variant in self._seen:
            graph = self._graphs[variant] = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                self._outputs[variant] = self._forward()
        if graph is not None:
            graph.replay()
            return self._outputs[variant]
        # The first step of a pattern runs eagerly, on the stream graphs are captured on: its
        # kernels compile and lazy state is made before any capture.
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            logits = self._forward()
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        self._seen.add(variant)
        return logits

    def _forward(self) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(
                input_ids=self._ids,
                position_ids=self.index["positions"].view(self.batch, 1),
                cache_position=self.index["cache position"],
                use_cache=True,
                **self._kwargs,
            )
            for flag in self.cache._flags.values():
                flag.fold()
        return out.logits[:, -1]  # type: ignore[no-any-return]

    def check(self, layer_idx: int, tensors: list[torch.Tensor]) -> None:
        """No NaN or Inf stored: folded into the device flag on a GPU, checked at once on the CPU."""
        flag = self.cache._flag(self.device)
        if flag is not None:
            flag.watch(tensors)
            return
        if all(bool(torch.isfinite(checkable(t)).all()) for t in tensors):
            return
        raise CacheStateError(
            f"layer {layer_idx}: the token at position {self.length} holds (or encodes to) a NaN or Inf; "
            "nothing of this step is kept (a non-finite token would spoil the scales of its whole group)"
        )

    def _check_flags(self) -> None:
        if any(flag.tripped() for flag in self.cache._flags.values()):
            self.close()
            self.cache._check_finite(sync=False)

    def close(self) -> None:
        """Hand the tokens back to the cache's layers (eager mode from here on); idempotent."""
        if self.closed:
            return
        self.closed = True
        self.cache.static = None
        for static, layer in zip(self.layers, self.cache.quantized_layers(), strict=True):
            layer.k = static.k.handed_back(self.length, self.ring)
            layer.v = static.v.handed_back(self.length, self.ring)
            layer.length = self.length
            layer.undo = []
            layer.pending = layer.before_pass = layer.passed = None
        self._graphs.clear()
        self._outputs.clear()

    def __enter__(self) -> StaticDecode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bytes_of(x: torch.Tensor) -> torch.Tensor:
    """Float8 tensors as their bytes: CUDA's ``index_copy_`` has no float8 kernel."""
    return x.view(torch.uint8) if x.is_floating_point() and x.element_size() == 1 else x


def _refuse(model: Any, cache: Any, layers: list[QuantizedLayer]) -> None:
    """Raise where the static mode cannot hold this cache, saying why."""
    why = None
    config = model.config.get_text_config(decoder=True)
    lengths = {layer.length for layer in layers}
    if getattr(cache, "static", None) is not None:
        why = "it is in static mode already"
    elif model.config._attn_implementation != "headq":
        why = "the model does not run the 'headq' attention function"
    elif not layers or not all(layer.is_initialized for layer in layers) or lengths == {0}:
        why = "it holds no tokens: run the prompt through it first"
    elif len(lengths) > 1 or any(layer.pending is not None for layer in layers):
        why = "a forward pass through it did not complete"
    elif len({layer.device for layer in layers}) > 1:
        why = "its layers live on several devices (a device_map): a static step holds one device's buffers"
    elif cache.sinks:
        why = "it keeps sinks"
    elif cache.value_statistic is not None:
        why = f"{cache.value_method!r} keeps an attention statistic"
    elif cache.emulate_streaming:
        why = "it emulates streaming"
    elif any(layer.sliding_window is not None for layer in layers):
        why = "the model has sliding-window layers"
    elif getattr(config, "attn_logit_softcapping", None):
        why = "the model softcaps its attention logits"
    elif any(s.dropped or len(s.arenas) > 1 for layer in layers for s in (layer.k, layer.v)):
        why = "a layer's encoded tokens are not in one arena"
    elif any(
        s.encoded != encoded_end(layer.length, 0, cache.window, s.method.block_tokens)
        for layer in layers
        for s in (layer.k, layer.v)
    ):
        why = (
            "its window holds more than the flush rule leaves there (after a crop): run one eager step first"
        )
    else:
        d = layers[0].k.window.shape[-1] if layers[0].k.window is not None else 0
        if layers[0].device.type == "cuda" and (
            layers[0].dtype not in (torch.float16, torch.bfloat16) or d & (d - 1) or not 16 <= d <= 256
        ):
            why = "the kernel takes float16 or bfloat16 heads of 16 to 256 channels, a power of two"
    if why is not None:
        raise CacheStateError(f"static decode cannot take this cache: {why}")
