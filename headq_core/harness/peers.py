"""transformers' own quantized KV cache as a peer row of ``headq bench``.

A peer spec names a backend of ``transformers.QuantizedCache`` and its settings, in the
constructor's own parameter names (``bits`` is short for ``nbits``): ``quanto:bits=2``,
``hqq:bits=4,q_group_size=32``, ``fp8``. Settings left out keep transformers' defaults (4 bits,
``q_group_size=64``, ``residual_length=128``, axis 0). A peer row is measured on the same windows,
batches and prefill/scored split as the method rows, through the same perplexity and speed code,
with transformers' cache object where a method row has a :class:`~headq_core.QuantizedKVCache`.
That cache cannot emulate streaming in one pass, so its scored tokens are fed one at a time: true
streaming decode, which the one-pass scoring of the method rows reproduces (the bench's streaming
check says how closely).

Bits per element count what the cache holds at the end of the first batch of windows, as for the
method rows: the integer (or fp8) codes in the words they are packed into (payload), each group's
scale and zero point (scales), and the full-precision residual window (exact), in the dtypes they
are held in, over batch x KV heads x tokens x head_dim of keys and of values.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from typing import Any, ClassVar

import attrs
import torch

from headq_core.errors import HeadqError, SpecError, suggest
from headq_core.harness.bench import PROJECTIONS, project
from headq_core.harness.perplexity import Windowing, decode_speed, perplexity
from headq_core.layouts import PARTS
from headq_core.spec import Spec, parse_spec

# QuantizedCache's keyword arguments, in its order; the spec's short names for them
PARAMETERS = ("nbits", "q_group_size", "residual_length", "axis_key", "axis_value")
ALIASES = {"bits": "nbits"}
SHORT = {"nbits": "bits"}


@attrs.frozen
class PeerBackend:
    """One backend of ``transformers.QuantizedCache``: what it needs and what it accepts."""

    name: str
    distribution: str | None  # the package the backend imports; None for one that needs none
    allowed: Mapping[str, tuple[int, ...] | None]  # parameter -> accepted values (None: any int >= 1)
    stored: Callable[[Any], Iterator[tuple[str, torch.Tensor]]]  # (part, tensor) of one quantized record
    shape: Callable[[Any], tuple[int, ...]]  # the (batch, kv_heads, tokens, head_dim) it encodes
    prepare: Callable[[torch.device], str | None] = lambda device: None  # why it cannot run, or None


def _flattened(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors under a tensor subclass (torch's ``__tensor_flatten__`` protocol)."""
    if type(tensor) is torch.Tensor or not hasattr(tensor, "__tensor_flatten__"):
        yield tensor
        return
    names, _ = tensor.__tensor_flatten__()
    for name in names:
        yield from _flattened(getattr(tensor, name))


def _quanto_stored(qtensor: Any) -> Iterator[tuple[str, torch.Tensor]]:
    names, _ = qtensor.__tensor_flatten__()  # _data (a PackedTensor of bytes), _scale, _shift
    for name in names:
        part = "payload" if name == "_data" else "scales"
        for tensor in _flattened(getattr(qtensor, name)):
            yield part, tensor


def _hqq_stored(record: Any) -> Iterator[tuple[str, torch.Tensor]]:
    codes, meta = record  # packed codes, and a dict holding the per-group scale and zero
    yield "payload", codes
    for value in meta.values():
        if isinstance(value, torch.Tensor):
            yield "scales", value


def _fp8_stored(record: Any) -> Iterator[tuple[str, torch.Tensor]]:
    codes, scale = record  # float8 codes and one scale per layer and tensor
    yield "payload", codes
    yield "scales", scale


def _quanto_prepare(device: torch.device) -> str | None:
    """optimum-quanto unpacks its codes on the CPU with a C++ extension that torch compiles on first
    use (ninja and a C++ compiler, about half a minute once): build it now, not inside a row."""
    if device.type != "cpu":
        return None
    if shutil.which("ninja") is None:  # torch looks for ninja on PATH; the ninja package ships one
        try:
            import ninja
        except ImportError:
            return "optimum-quanto's CPU extension needs ninja (pip install ninja)"
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    try:
        from optimum.quanto.library.extensions import get_extension

        get_extension("quanto_cpp").lib  # noqa: B018  (reading it builds and loads the extension)
    except (ImportError, OSError, RuntimeError) as err:
        return f"optimum-quanto's CPU extension did not build (it needs a C++ compiler): {err}"
    return None


INTEGER = {"q_group_size": None, "residual_length": None}
BACKENDS = {
    backend.name: backend
    for backend in (
        PeerBackend(
            "quanto",
            "optimum-quanto",
            {"nbits": (2, 4), **INTEGER, "axis_key": (0, -1), "axis_value": (0, -1)},
            _quanto_stored,
            lambda qtensor: tuple(qtensor.shape),
            _quanto_prepare,
        ),
        PeerBackend(
            "hqq",
            "hqq",
            {"nbits": (1, 2, 3, 4, 8), **INTEGER, "axis_key": (0, 1), "axis_value": (0, 1)},
            _hqq_stored,
            lambda record: tuple(record[1]["shape"]),
        ),
        PeerBackend("fp8", None, {}, _fp8_stored, lambda record: tuple(record[0].shape)),
    )
}
DEFAULT_PEERS = ("quanto:bits=4", "quanto:bits=2")  # the default suite's, where optimum-quanto is installed


@attrs.frozen
class PeerSpec:
    """A backend of ``transformers.QuantizedCache`` and the settings given, in ``PARAMETERS`` order."""

    backend: str
    settings: tuple[tuple[str, int], ...] = ()

    def __str__(self) -> str:
        given = ",".join(f"{SHORT.get(k, k)}={v}" for k, v in self.settings)
        return f"{self.backend}:{given}" if given else self.backend

    @property
    def label(self) -> str:
        """How the row is named in the table (both the keys and the values column)."""
        return f"peer {self}"

    def kwargs(self) -> dict[str, int]:
        return dict(self.settings)


def parse_peer(text: str) -> PeerSpec:
    """``backend[:name=value,...]`` -> :class:`PeerSpec`; a clear :class:`SpecError` for anything else."""
    spec = parse_spec(text)
    backend = BACKENDS.get(spec.name)
    if backend is None:
        raise SpecError(
            f"unknown peer backend {spec.name!r} in {text!r}: transformers' QuantizedCache has "
            f"{', '.join(BACKENDS)}.{suggest(spec.name, BACKENDS)}"
        )
    settings: dict[str, int] = {}
    for key, raw in spec.params:
        name = ALIASES.get(key, key)
        if name not in backend.allowed:
            known = ", ".join(SHORT.get(k, k) for k in backend.allowed) or "none"
            raise SpecError(
                f"peer {backend.name} has no parameter {key!r} (its parameters: {known})."
                f"{suggest(key, [*backend.allowed, *ALIASES])}"
            )
        if name in settings:
            raise SpecError(f"peer spec {text!r} sets {SHORT.get(name, name)} twice")
        settings[name] = _value(backend, name, raw)
    return PeerSpec(backend.name, tuple((k, settings[k]) for k in PARAMETERS if k in settings))


def _value(backend: PeerBackend, name: str, raw: str | Spec) -> int:
    shown = SHORT.get(name, name)
    try:
        value = int(str(raw))
    except ValueError:
        raise SpecError(f"peer {backend.name}: {shown} must be an integer, got {raw!s}") from None
    accepted = backend.allowed[name]
    if accepted is None and value < 1:
        raise SpecError(f"peer {backend.name}: {shown} must be at least 1, got {value}")
    if accepted is not None and value not in accepted:
        raise SpecError(
            f"peer {backend.name}: {shown} must be one of {', '.join(map(str, accepted))}, got {value}"
        )
    return value


def prepare(backend: str, device: torch.device | str = "cpu") -> str | None:
    """Get ``backend`` ready to run on ``device`` (quanto on the CPU: build its extension); why it
    cannot, or None."""
    return BACKENDS[backend].prepare(torch.device(device))


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def missing(peer: PeerSpec) -> str | None:
    """Why ``peer``'s backend cannot be imported (its package is not installed), or None."""
    package = BACKENDS[peer.backend].distribution
    if package is None or installed_version(package) is not None:
        return None
    extra = " or pip install -e '.[peers]'" if package == "optimum-quanto" else ""
    return (
        f"transformers' {peer.backend} backend needs the {package} package, which is not installed "
        f"(pip install {package}{extra})"
    )


def default_peers() -> list[PeerSpec]:
    """The default suite's peer rows: quanto at 4 and 2 bits, where optimum-quanto is installed."""
    peers = [parse_peer(text) for text in DEFAULT_PEERS]
    return [peer for peer in peers if missing(peer) is None]


@attrs.frozen
class PeerSettings:
    """Builds a fresh ``transformers.QuantizedCache`` for one peer row (see CacheSettings)."""

    peer: PeerSpec
    streams_in_one_pass: ClassVar[bool] = False

    def build(self, config: Any, *, emulate_streaming: bool = False) -> Any:
        from transformers import QuantizedCache

        if emulate_streaming:
            raise HeadqError(f"{self.peer.label}: transformers' QuantizedCache cannot emulate streaming")
        return QuantizedCache(self.peer.backend, config, **self.peer.kwargs())


def check(peer: PeerSpec, config: Any, device: torch.device) -> str | None:
    """Why a row for ``peer`` cannot run on this model and machine, or None: its package is
    missing, its backend cannot be prepared, or transformers refuses the model or the settings."""
    reason = missing(peer) or BACKENDS[peer.backend].prepare(device)
    if reason is not None:
        return reason
    try:
        PeerSettings(peer).build(config)
    except (ImportError, ValueError) as err:
        return f"transformers' QuantizedCache refuses it: {err}"
    return None


def storage(cache: Any, backend: PeerBackend) -> dict[str, Any]:
    """Bytes and bits per element of what a ``QuantizedCache`` of ``backend`` holds, split as the
    method rows' (payload, scales, exact), with the element count and its first layer's residual
    tokens."""
    nbytes: dict[str, dict[str, int]] = {kind: dict.fromkeys(PARTS, 0) for kind in ("keys", "values")}
    elements = 0
    for layer in cache.layers:
        # transformers keeps a layer's quantized states in these attributes and exposes no reader
        records = {"keys": layer._quantized_keys, "values": layer._quantized_values}
        if records["keys"] is None:
            continue
        for kind, record in records.items():
            for part, tensor in backend.stored(record):
                nbytes[kind][part] += tensor.numel() * tensor.element_size()
            residual = layer.keys if kind == "keys" else layer.values
            nbytes[kind]["exact"] += residual.numel() * residual.element_size()
        batch, heads, _, head_dim = backend.shape(records["keys"])
        elements += batch * heads * layer.get_seq_length() * head_dim
    if elements == 0:
        raise HeadqError("the peer's cache is empty; run the model before asking for its bits")
    bits: dict[str, dict[str, float]] = {}
    for kind, by_part in nbytes.items():
        bits[kind] = {part: 8 * n / elements for part, n in by_part.items()}
        bits[kind]["total"] = sum(bits[kind][part] for part in PARTS)
    bits["all"] = {part: (bits["keys"][part] + bits["values"][part]) / 2 for part in [*PARTS, "total"]}
    first = next(layer for layer in cache.layers if layer._quantized_keys is not None)
    residual_tokens = first.keys.shape[-2] if first.keys.dim() == 4 else 0
    return {"bytes_by_part": nbytes, "bits": bits, "elements": elements, "residual_tokens": residual_tokens}


def measure_peer(
    model: Any,
    windows: list[torch.Tensor],
    peer: PeerSpec,
    windowing: Windowing,
    *,
    speed_steps: int = 32,
    skip: frozenset[str] = frozenset(),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One table row for ``peer``, with the same keys as ``measure`` gives a method row. Prefill
    perplexity, the streaming check and the distortion metrics need headq's own cache: None/empty."""
    settings = PeerSettings(peer)
    start = time.perf_counter()
    say = progress or (lambda _: None)
    say("decode perplexity, token by token")
    decode = perplexity(model, windows, settings, windowing, mode="stream")
    cache = decode.caches[0]
    held = storage(cache, BACKENDS[peer.backend])
    speed = None
    if "speed" not in skip:
        say("decode speed")
        speed = decode_speed(model, windows[0][None, : windowing.prefix], settings, steps=speed_steps)
    layer = next(layer for layer in cache.layers if layer._quantized_keys is not None)
    dtype_bytes = layer.keys.element_size()
    package = BACKENDS[peer.backend].distribution
    effective = {SHORT.get(k, k): getattr(layer, k) for k in PARAMETERS if hasattr(layer, k)}
    bits = held["bits"]
    return {
        "keys": peer.label,
        "values": peer.label,
        "peer": {
            "backend": peer.backend,
            "spec": str(peer),
            "settings": effective,
            "cache": f"{type(cache).__module__}.{type(cache).__name__}",
            "layer": type(layer).__name__,
            "package": None if package is None else f"{package}=={installed_version(package)}",
            "decode": "stream",
        },
        "decode_ppl": decode.ppl,
        "prefill_ppl": None,
        "stream_gap_pct": None,
        "scored_tokens": decode.tokens,
        "window_nll": list(decode.window_nll),
        "bits": bits,
        "cache_bytes": sum(sum(parts.values()) for parts in held["bytes_by_part"].values()),
        "cache_bytes_by_part": held["bytes_by_part"],
        "cache_tokens": cache.get_seq_length(),
        "cache_batch": min(windowing.batch, len(windows)),
        "fp16_bytes": 2 * 2 * held["elements"],
        "model_cache_bytes": 2 * dtype_bytes * held["elements"],  # QuantizedCache takes full attention only
        "projected_bytes": {
            name: project(bits, held["residual_tokens"], shape) for name, shape in PROJECTIONS.items()
        },
        "metrics": {},
        "metrics_per_layer_head": {},
        "decode_tokens_per_s": speed,
        "harness_tokens_per_s": decode.tokens_per_second,
        "seconds": time.perf_counter() - start,
    }
