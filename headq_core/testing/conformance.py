"""Conformance checks every key quantizer and value policy must pass.

A plugin author calls :func:`check_key_quantizer` or :func:`check_value_policy` with a spec; each
check raises ``AssertionError`` naming the method, the property and the numbers that broke it.

What is checked, on random non-zero data with a few large outlier channels
(``(batch, kv_heads, tokens, head_dim)``, default ``(2, 2, 128, 64)``):

- round trip: ``dequantize(encode(x))`` and the method's own ``logits`` / ``readout`` have a
  signal-to-noise ratio above a floor set by the payload bits the block really stores
  (:func:`snr_floor_db`); exact methods must be near-lossless;
- storage: every tensor a block holds is declared with :func:`~headq_core.layouts.stored`; the
  payload bits the method reports (``nominal_bits``) are the bits it stores, so a 2-bit method
  holds packed codes rather than a float tensor of rounded values;
- the block operations the cache relies on: batch maps (beam reorder) commute with decoding, and
  merged blocks decode to the concatenation of their parts;
- determinism: the same input gives bitwise the same stored tensors;
- spec and config round trip through strings;
- a :class:`~headq_core.cache.QuantizedKVCache` driven through the ``headq`` attention function
  with the real flush rule: exact tokens where the window/sinks rule says, ``bits_per_element()``
  agrees with ``nbytes()``, and ``nbytes()`` counts every tensor the cache holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from headq_core.attention import headq_attention
from headq_core.cache import QuantizedKVCache
from headq_core.interfaces import KeyQuantizer, ValuePolicy
from headq_core.layer import QuantizedLayer
from headq_core.layouts import PARTS, EncodedBlock, block_nbytes, concat_blocks, iter_stored, map_batched
from headq_core.registry import Registry, get_registry
from headq_core.spec import Spec, parse_spec
from headq_core.testing.driving import (
    BATCH,
    HEAD_DIM,
    KV_HEADS,
    MIN_TOKENS,
    QUERY_GROUP,
    AttentionModule,
    Kind,
    Subject,
    fail,
    feed,
    held_bytes,
    held_tensors,
    model_config,
    outlier_data,
    snr_db,
    snr_floor_db,
)

# --- checks -----------------------------------------------------------------------------------


def check_block_storage(subject: Subject, block: EncodedBlock, x: torch.Tensor, method: Any) -> None:
    """Every tensor is declared and counted; the bits ``nominal_bits`` reports are the bits stored.

    ``block`` encodes ``x`` in float16, the dtype the nominal figures of exact storage assume.
    """
    declared = {name for name, *_ in iter_stored(block)}
    hidden = [name for name, _ in held_tensors(block, "") if name not in declared]
    if hidden:
        raise fail(
            subject,
            f"{type(block).__name__} holds tensors not declared with stored(): {', '.join(hidden)}; "
            "the cache cannot count, reorder or merge them",
        )
    counted = sum(block_nbytes(block).values())
    if counted != held_bytes(block):
        raise fail(subject, f"block_nbytes counts {counted} bytes, the block holds {held_bytes(block)}")
    parts = block_nbytes(block)
    if parts["payload"] == 0:
        raise fail(subject, "the block stores no payload (declare its codes with stored('payload'))")
    nominal = method.nominal_bits(x.shape[-1])
    for part, bits in nominal.items():
        if part in ("exact", "other"):
            continue
        measured = 8 * parts[part] / x.numel()
        if abs(measured - bits) > 0.01 * bits + 1e-6:
            raise fail(
                subject,
                f"reports {bits:.4g} {part} bits per element but stores {measured:.4g} "
                f"({parts[part]} bytes for {x.numel()} elements); storage must be real, e.g. packed codes",
            )


def check_round_trip(subject: Subject, x: torch.Tensor, *, floor_db: float | None = None) -> None:
    """Decoding, and the method's own logits or readout, reproduce the input above the SNR floor."""
    method = subject.build()
    original = x.clone()
    stats = _stats(x, method)
    block = subject.encode(method, x, stats)
    if not torch.equal(x, original):
        raise fail(subject, "encode() modified its input in place")
    if block.tokens != x.shape[-2]:
        raise fail(subject, f"encoded {block.tokens} tokens, was given {x.shape[-2]}")
    check_block_storage(subject, subject.encode(method, x.half(), stats), x, method)
    payload_bits = 8 * block_nbytes(block)["payload"] / x.numel()
    floor = snr_floor_db(payload_bits) if floor_db is None else floor_db
    x_hat = block.dequantize(torch.float32)
    if x_hat.shape != x.shape or x_hat.dtype != torch.float32:
        raise fail(
            subject, f"dequantize() gave {x_hat.dtype} {tuple(x_hat.shape)}, expected {tuple(x.shape)}"
        )
    if not torch.isfinite(x_hat).all():
        raise fail(subject, "dequantize() gave non-finite values")
    _above(subject, "dequantize() round-trip", snr_db(x, x_hat), floor, payload_bits)

    gen = torch.Generator().manual_seed(1)
    b, h, t, d = x.shape
    if subject.kind == "key":
        query = torch.randn(b, h, 8, d, generator=gen)
        got = method.logits(query, block, 0)
        want = query @ x.float().transpose(-1, -2)
        what = "logits()"
    else:
        probs = torch.softmax(3.0 * torch.randn(b, h, 8, t, generator=gen), dim=-1)
        got = method.readout(probs, block, 0)
        want = probs @ x.float()
        what = "readout()"
    if got.shape != want.shape:
        raise fail(subject, f"{what} gave shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    _above(subject, what, snr_db(want, got), floor, payload_bits)
    check_as_read(subject, method, block, query if subject.kind == "key" else probs, got)


def check_as_read(
    subject: Subject, method: Any, block: EncodedBlock, inputs: torch.Tensor, got: torch.Tensor
) -> None:
    """What ``keys_as_read`` / ``values_as_read`` give (SDPA reads them) is what ``logits`` /
    ``readout`` compute, to float rounding."""
    key = subject.kind == "key"
    name = "keys_as_read()" if key else "values_as_read()"
    read = method.keys_as_read(block, torch.float32) if key else method.values_as_read(block, torch.float32)
    if read is None:
        return
    if read.shape != block.dequantize(torch.float32).shape:
        raise fail(subject, f"{name} gave shape {tuple(read.shape)}, expected the block's (b, h, tokens, d)")
    again = inputs @ read.transpose(-1, -2) if key else inputs @ read
    err = (again - got).abs().max().item()
    if err > 1e-4 * max(1.0, got.abs().max().item()):
        raise fail(
            subject,
            f"{name} differs from what {'logits()' if key else 'readout()'} computes by up to {err:.3g}: "
            "a multi-token pass would read other tokens than a decode step",
        )


def _above(subject: Subject, what: str, got: float, floor: float, bits: float) -> None:
    if not got >= floor:
        raise fail(
            subject,
            f"{what} SNR is {got:.2f} dB, below the floor of {floor:.2f} dB for {bits:.3g} payload bits "
            "per element",
        )


def _stats(x: torch.Tensor, method: Any) -> torch.Tensor | None:
    if not getattr(method, "wants_attention_stats", False):
        return None
    gen = torch.Generator().manual_seed(2)
    return torch.rand(x.shape[:-1], generator=gen)


def check_deterministic(subject: Subject, x: torch.Tensor) -> None:
    """Two fresh instances encoding equal inputs store bitwise equal tensors."""
    first = subject.encode(subject.build(), x.clone(), _stats(x, subject.build()))
    second = subject.encode(subject.build(), x.clone(), _stats(x, subject.build()))
    a = {name: t for name, t, *_ in iter_stored(first)}
    b = {name: t for name, t, *_ in iter_stored(second)}
    if a.keys() != b.keys():
        raise fail(subject, f"two encodes stored different tensors: {sorted(a)} vs {sorted(b)}")
    for name in a:
        if (
            a[name].dtype != b[name].dtype
            or a[name].shape != b[name].shape
            or not torch.equal(a[name], b[name])
        ):
            raise fail(subject, f"the same input gave different stored {name!r} on a second encode")


def check_block_ops(subject: Subject, x: torch.Tensor) -> None:
    """Batch maps commute with decoding; merged blocks decode to the concatenation of their parts."""
    method = subject.build()
    block = subject.encode(method, x, _stats(x, method))
    flip = torch.arange(x.shape[0] - 1, -1, -1)
    mapped = map_batched(block, lambda t: t.index_select(0, flip)).dequantize(torch.float32)
    if not torch.equal(mapped, block.dequantize(torch.float32).index_select(0, flip)):
        raise fail(
            subject,
            "reordering the batch of a block (beam search) does not reorder its decoded tokens; "
            "check stored(batched=...) on its tensors",
        )
    g = method.block_tokens
    split = max(g, (x.shape[-2] // (2 * g)) * g)
    if split >= x.shape[-2]:
        return
    head, tail = x[..., :split, :], x[..., split:, :]
    stats = _stats(x, method)
    parts = [
        subject.encode(method, head, None if stats is None else stats[..., :split]),
        subject.encode(method, tail, None if stats is None else stats[..., split:]),
    ]
    problem = "check token_axis() for every stored tensor"
    try:
        merged = concat_blocks(parts)
        if merged is None:
            return  # blocks that cannot merge stay separate in the cache
        got = merged.dequantize(torch.float32)
    except (RuntimeError, ValueError) as err:  # tensors merged along the wrong axis may not even fit
        got, problem = None, f"{problem} ({type(err).__name__}: {err})"
    if got is not None:
        want = torch.cat([p.dequantize(torch.float32) for p in parts], dim=-2)
        if got.shape == want.shape and torch.equal(got, want):
            return
    raise fail(subject, f"two blocks merged by concat_blocks do not decode to their concatenation; {problem}")


def check_spec_round_trip(subject: Subject) -> None:
    """``parse_spec(str(spec)) == spec``; building from ``str(spec)`` gives an equal config."""
    method = subject.build()
    spec = method.spec
    text = str(spec)
    if parse_spec(text) != spec:
        raise fail(subject, f"parse_spec({text!r}) gives {parse_spec(text)!r}, not {spec!r}")
    again = attrs.evolve(subject, spec=parse_spec(text)).build()
    if again.config != method.config:
        raise fail(subject, f"building from {text!r} gives {again.config!r}, not {method.config!r}")
    full = dict(method.config.to_params(all_fields=True))
    rebuilt = method.config_class.from_params(full, method=spec.name)
    if rebuilt != method.config:
        raise fail(subject, f"config from all its parameters {full} is {rebuilt!r}, not {method.config!r}")
    resolved = subject.registry.resolve(subject.kind, text)
    if resolved != spec:
        raise fail(subject, f"registry.resolve({text!r}) is {resolved}, not {spec}")


def check_cache(
    subject: Subject,
    *,
    tokens: int,
    window: int,
    sinks: int,
    head_dim: int,
    chunks: Sequence[int] | None = None,
) -> QuantizedKVCache:
    """Drive a cache holding this method (fp16 on the other side) and audit what it holds."""
    method = subject.build()
    fp16 = "fp16"
    keys, values = (method, fp16) if subject.kind == "key" else (fp16, method)
    layers = 2
    cache = QuantizedKVCache(
        keys,
        values,
        window=window,
        sinks=sinks,
        config=subject.model_config,
        calibration=subject.calibration,
        registry=subject.registry,
    )
    shape = (BATCH, KV_HEADS, tokens, head_dim)
    # float16 data: the exact parts and fp16 methods then store 16 bits, as in a half-precision model
    k = outlier_data(shape, seed=3, dtype=torch.float16)
    v = outlier_data(shape, seed=4, dtype=torch.float16)
    q = outlier_data((BATCH, KV_HEADS * QUERY_GROUP, tokens, head_dim), seed=5, dtype=torch.float16)
    if chunks is None:
        chunks = _chunks(tokens)
    feed(cache, k, v, q, chunks, layers=layers)

    stream_of = {"key": "k", "value": "v"}
    for layer in cache.quantized_layers():
        if layer.get_seq_length() != tokens:
            raise fail(
                subject, f"layer {layer.layer_idx} holds {layer.get_seq_length()} tokens, fed {tokens}"
            )
        stream = getattr(layer, stream_of[subject.kind])
        _check_flush_rule(subject, layer, stream, tokens, window, sinks)
        decoded_k, decoded_v = layer.decoded()
        for name, got in (("keys", decoded_k), ("values", decoded_v)):
            if got.shape != shape:
                raise fail(subject, f"decoded {name} have shape {tuple(got.shape)}, expected {shape}")

    elements = 2 * layers * BATCH * KV_HEADS * tokens * head_dim  # keys and values
    held = sum(_layer_bytes(layer) for layer in cache.quantized_layers())
    nbytes = cache.nbytes()
    if nbytes != held:
        raise fail(subject, f"cache.nbytes() is {nbytes}, but the cache holds {held} bytes of tensors")
    bits = cache.bits_per_element()
    total_bits = bits["all"]["total"] * elements
    if abs(total_bits - 8 * nbytes) > 0.01 * 8 * nbytes:
        raise fail(
            subject,
            f"bits_per_element() says {bits['all']['total']:.4f} bits x {elements} elements = "
            f"{total_bits:.0f} bits, but nbytes() is {nbytes} bytes = {8 * nbytes} bits",
        )
    by_part = cache.nbytes_by_part()
    for kind in ("keys", "values"):
        want = 8 * sum(by_part[kind].values()) / (elements / 2)
        if abs(bits[kind]["total"] - want) > 0.01 * want:
            raise fail(
                subject, f"bits_per_element()[{kind!r}] is {bits[kind]['total']:.4f}, bytes give {want:.4f}"
            )
        split = sum(bits[kind][p] for p in PARTS)
        if abs(split - bits[kind]["total"]) > 1e-9 * max(1.0, split):
            raise fail(subject, f"the parts of bits_per_element()[{kind!r}] do not add up to its total")
    return cache


def _chunks(tokens: int) -> list[int]:
    """A prefill of half the tokens, then passes of 1, 3, 7 and 2 tokens in turn (decode and chunks)."""
    out, left = [tokens // 2], tokens - tokens // 2
    sizes = (1, 3, 7, 2)
    while left:
        out.append(min(left, sizes[len(out) % len(sizes)]))
        left -= out[-1]
    return out


def _check_flush_rule(
    subject: Subject, layer: QuantizedLayer, stream: Any, tokens: int, window: int, sinks: int
) -> None:
    g = stream.method.block_tokens
    exact_sinks = stream.sink_len()
    exact_window = 0 if stream.window is None else stream.window.shape[-2]
    if exact_sinks != min(tokens, sinks):
        raise fail(subject, f"holds {exact_sinks} sink tokens after {tokens} tokens with sinks={sinks}")
    if exact_sinks + stream.encoded + exact_window != tokens:
        raise fail(
            subject,
            f"sinks {exact_sinks} + encoded {stream.encoded} + window {exact_window} != {tokens} tokens",
        )
    if sum(block.tokens for block in stream.blocks) != stream.encoded:
        raise fail(subject, "the encoded blocks do not add up to the encoded token count")
    rest = tokens - exact_sinks
    lo, hi = min(rest, window), min(rest, window + g - 1)
    if not lo <= exact_window <= hi:
        raise fail(
            subject,
            f"keeps {exact_window} exact window tokens after {tokens} tokens (window={window}, sinks={sinks}, "
            f"block_tokens={g}); expected between {lo} and {hi}",
        )
    if stream.encoded % g:
        raise fail(subject, f"encoded {stream.encoded} tokens, not whole blocks of {g}")


def _layer_bytes(layer: QuantizedLayer) -> int:
    total = 0
    for stream in (layer.k, layer.v):
        for exact in (stream.sinks, stream.window):
            if exact is not None:
                total += exact.numel() * exact.element_size()
        total += sum(held_bytes(block) for block in stream.blocks)
        total += stream.method.state_nbytes(layer.layer_idx)
    if layer.sq_attention is not None:
        total += layer.sq_attention.numel() * layer.sq_attention.element_size()
    return total


def check_padding(subject: Subject, *, head_dim: int = HEAD_DIM) -> None:
    """A left-padded row's attention output does not depend on what its padding holds.

    Three rows with 0, 5 and ``block_tokens + 3`` padding tokens go through a cache (the method
    on its side, ``fp16`` on the other, a window of 4): a prompt, then decode steps; a second run
    differs only in the padding tokens' keys, values and queries (a hundred times larger). The real
    rows' outputs must be bit-identical: padding must not reach a method's statistics.
    """
    method = subject.build()
    g = method.block_tokens
    pads = torch.tensor([0, 5, g + 3])
    prompt, steps = 2 * g + 9, 3
    total = prompt + steps
    gen = torch.Generator().manual_seed(7)
    data = [
        torch.randn(3, h, total, head_dim, generator=gen)
        for h in (KV_HEADS, KV_HEADS, KV_HEADS * QUERY_GROUP)
    ]
    is_pad = torch.arange(total)[None, :] < pads[:, None]  # (b, total)
    outputs = []
    for scale in (1.0, 100.0):
        k, v, q = (torch.where(is_pad[:, None, :, None], scale * x.flip(-2), x) for x in data)
        keys, values = (method, "fp16") if subject.kind == "key" else ("fp16", method)
        cache = QuantizedKVCache(keys, values, window=4, config=subject.model_config,
                                 calibration=subject.calibration, registry=subject.registry)  # fmt: skip
        module, out, start = AttentionModule().eval(), [], 0
        for n in (prompt,) + (1,) * steps:
            stop = start + n
            pos = torch.arange(stop)
            mask = (pos[None, None, :] <= pos[start:stop, None]) & ~is_pad[:, None, :stop]
            for layer_idx in range(len(cache.layers) or 1):  # every layer of the config, the same data
                kk, vv = cache.update(k[..., start:stop, :], v[..., start:stop, :], layer_idx)
                got = headq_attention(module, q[..., start:stop, :], kk, vv, mask[:, None])[0]
                if layer_idx == 0:
                    out.append(got)
            start = stop
        outputs.append(torch.cat(out, dim=1))  # (b, tokens, q_heads, d)
    real = ~is_pad
    if not torch.equal(outputs[0][real], outputs[1][real]):
        diff = (outputs[0][real] - outputs[1][real]).abs().max().item()
        raise fail(
            subject,
            f"a left-padded row's output changes by up to {diff:.3g} when only its padding tokens change: "
            "padding reaches the method's statistics",
        )


# --- entry points for authors ---------------------------------------------------------------


def _check(
    kind: Kind,
    spec: str | Spec,
    *,
    registry: Registry | None,
    head_dim: int,
    snr_floor: float | None,
    model_config: Any,
    calibration: Any,
    windows: Sequence[tuple[int, int]],
) -> None:
    registry = registry or get_registry()
    config = model_config if model_config is not None else model_config_for(head_dim)
    if calibration is None:  # methods that learn from data are fitted on synthetic statistics
        unbound = registry.key_quantizer(spec) if kind == "key" else registry.value_policy(spec)
        if unbound.calibration_needs:
            from headq_core.testing.calibration import synthetic_calibration

            calibration = synthetic_calibration([(kind, unbound)], config)
    subject = Subject(kind, parse_spec(spec), registry, config, calibration)
    method = subject.build()
    expected = KeyQuantizer if kind == "key" else ValuePolicy
    if not isinstance(method, expected):
        raise fail(subject, f"built {type(method).__name__}, not a {expected.__name__}")
    g = method.block_tokens
    if not isinstance(g, int) or g <= 0:
        raise fail(subject, f"block_tokens must be a positive int, got {g!r}")
    tokens = g * max(2, math.ceil(MIN_TOKENS / g))
    x = outlier_data((BATCH, KV_HEADS, tokens, head_dim), seed=0)
    check_spec_round_trip(subject)
    check_round_trip(subject, x, floor_db=snr_floor)
    check_deterministic(subject, x)
    check_block_ops(subject, x)
    for window, sinks in windows:
        check_cache(subject, tokens=2 * g + window + sinks + 3, window=window, sinks=sinks, head_dim=head_dim)
    check_padding(subject, head_dim=head_dim)
    check_state_counted(subject)


def check_state_counted(subject: Subject) -> None:
    """A method that holds what it learned counts it: ``state_nbytes`` over the model's layers is
    at least its calibration tensors at two bytes per number (so that two authors of one method
    report the same bits per element, whichever precision they hold it in)."""
    if subject.calibration is None:
        return
    method = subject.build()
    if not method.calibration_needs:
        return
    fitted = subject.calibration.tensors_for(subject.kind, method)
    learned = sum(2 * t.numel() for t in fitted.values())
    layers = int(getattr(subject.model_config, "num_hidden_layers", 0) or 0)
    counted = sum(method.state_nbytes(layer) for layer in range(layers))
    if counted < learned:
        raise fail(
            subject,
            f"state_nbytes counts {counted} bytes over {layers} layers, but the method holds {learned} bytes of "
            "calibration tensors (at two bytes per number): count the per-layer state it keeps "
            "(docs/plugin-author-guide.md, 'Fixed state and its bits')",
        )


def model_config_for(head_dim: int) -> Any:
    return model_config(kv_heads=KV_HEADS, head_dim=head_dim)


_WINDOWS: tuple[tuple[int, int], ...] = ((0, 0), (5, 0), (3, 2))


def check_key_quantizer(
    spec: str | Spec,
    *,
    registry: Registry | None = None,
    head_dim: int = HEAD_DIM,
    snr_floor: float | None = None,
    model_config: Any = None,
    calibration: Any = None,
    windows: Sequence[tuple[int, int]] = _WINDOWS,
) -> None:
    """Run every conformance check on the key quantizer ``spec``; raise AssertionError on the first failure.

    registry: where to look the name up (default: the process registry). snr_floor: override the
    dB floor otherwise set from the payload bits stored. model_config / calibration: what the
    method binds to (default: a small Llama config with 2 KV heads of ``head_dim``; a method with
    ``calibration_needs`` is fitted on :func:`~headq_core.testing.calibration.synthetic_stats`). windows:
    (window, sinks) pairs to drive the cache with.
    """
    _check(
        "key",
        spec,
        registry=registry,
        head_dim=head_dim,
        snr_floor=snr_floor,
        model_config=model_config,
        calibration=calibration,
        windows=windows,
    )


def check_value_policy(
    spec: str | Spec,
    *,
    registry: Registry | None = None,
    head_dim: int = HEAD_DIM,
    snr_floor: float | None = None,
    model_config: Any = None,
    calibration: Any = None,
    windows: Sequence[tuple[int, int]] = _WINDOWS,
) -> None:
    """Run every conformance check on the value policy ``spec`` (see :func:`check_key_quantizer`)."""
    _check(
        "value",
        spec,
        registry=registry,
        head_dim=head_dim,
        snr_floor=snr_floor,
        model_config=model_config,
        calibration=calibration,
        windows=windows,
    )
