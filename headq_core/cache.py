"""``QuantizedKVCache``: a transformers ``Cache`` that stores keys and values with any pair of methods.

Each layer is a :class:`~headq_core.layer.QuantizedLayer` (where tokens live, the flush rule,
crop, sliding windows). ``update`` returns only the tokens of the current forward pass (the
"in-flight" tokens), tagged with their layer; the ``headq`` attention function
(:mod:`headq_core.attention`) takes the pass as a :class:`~headq_core.step.Step` from
``QuantizedLayer.begin_step`` and gives back what it produced through ``end_step``. Nothing older
than the window is ever kept unquantized, and a model whose attention bypasses the ``headq``
function is caught at the next ``update``.

In-flight tokens are attended at full precision, as a serving engine attends to the prefill it
is storing. With ``emulate_streaming=True`` each query of a multi-token pass instead sees every
earlier token in the state it would have had if the tokens had been fed one at a time, which is
what lets the harness score many decode steps in one pass and still equal true streaming.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from headq_core.devices import on_device
from headq_core.errors import CacheStateError
from headq_core.finite import DeviceFlag, locate_non_finite
from headq_core.interfaces import KeyQuantizer, ValuePolicy
from headq_core.layer import LAYER_ATTR, QuantizedLayer
from headq_core.layouts import PARTS, Part
from headq_core.registry import Registry, get_registry
from headq_core.spec import Spec

__all__ = ["LAYER_ATTR", "QuantizedKVCache", "QuantizedLayer"]


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


def _sliding_windows(config: Any) -> list[int | None]:
    """Per layer of ``config``, the sliding window its queries see, or None for full attention."""
    n = getattr(config, "num_hidden_layers", None)
    if not n:
        return []
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * n
    return [window if kind == "sliding_attention" and window else None for kind in types]


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
    capacity:
        Tokens per layer to make room for when a stream's storage is first allocated, so that a
        sequence up to that length never moves its buffers (they grow past it as needed).
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
        capacity: int = 0,
        registry: Registry | None = None,
    ) -> None:
        registry = registry or get_registry()
        for name, value in (("window", window), ("sinks", sinks), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.key_method = registry.key_quantizer(keys)
        self.value_method = registry.value_policy(values)
        self.value_statistic = self.value_method.attention_statistic
        self.window, self.sinks, self.capacity = window, sinks, capacity
        self.emulate_streaming = emulate_streaming
        text_config = config.get_text_config(decoder=True) if config is not None else None
        for method in (self.key_method, self.value_method):
            method.bind(text_config, calibration)
        self.sliding_windows = _sliding_windows(text_config)
        self._flags: dict[torch.device, DeviceFlag] = {}
        self._failed: str | None = None
        self.static: Any = None  # the StaticDecode (headq_core.graphs) that holds the tokens now, if any
        n_layers = getattr(text_config, "num_hidden_layers", None)
        # layers of the config that keep their own tokens (the last ones may share another's)
        self.config_layers: int | None = None
        if n_layers:
            self.config_layers = n_layers - (getattr(text_config, "num_kv_shared_layers", 0) or 0)
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
        if self.static is not None:
            return self.static.layers[layer_idx].update(key_states, value_states)  # type: ignore[no-any-return]
        if layer_idx == 0:  # a new forward pass: every layer must hold what the others hold
            self._check_finite(sync=False)
            lengths = {
                layer.layer_idx: layer.length for layer in self.quantized_layers() if layer.is_initialized
            }
            if len(set(lengths.values())) > 1:
                raise CacheStateError(
                    f"the layers hold different numbers of tokens ({_ranges(lengths)}): an earlier forward "
                    "pass failed part-way through the model; this cache cannot continue, start a new one"
                )
            if lengths and self.config_layers is not None and len(lengths) < self.config_layers:
                raise CacheStateError(
                    f"the cache was built for a config of {self.config_layers} layers, and the model's last "
                    f"forward pass stored tokens in {len(lengths)}: build the cache with this model's config"
                )
        self._layer(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def store(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store tokens whose attention was computed elsewhere (a prefill through another attention
        function, or a benchmark's tokens): as ``update`` and the attention would store them, with
        no attention statistic for a value policy. keys, values: (batch, kv_heads, tokens, head_dim).

        Layers may be filled in any order and in several calls each (a forward pass's checks, that
        every layer holds as many tokens as the others, do not apply)."""
        layer = self._layer(layer_idx)
        with on_device(keys.device):
            layer.update(keys, values)
            layer.end_step(layer.begin_step())

    def _layer(self, layer_idx: int) -> QuantizedLayer:
        """Layer ``layer_idx``, created on first use where no config fixed the layers up front."""
        if self.config_layers is not None and layer_idx >= len(self.layers):
            raise CacheStateError(
                f"layer {layer_idx} of the model has no place in a cache built for a config of "
                f"{len(self.layers)} layers: build the cache with this model's config"
            )
        while len(self.layers) <= layer_idx:
            self.layers.append(QuantizedLayer(self, len(self.layers)))
        layer = self.layers[layer_idx]
        assert isinstance(layer, QuantizedLayer)
        return layer

    def quantized_layers(self) -> list[QuantizedLayer]:
        return [layer for layer in self.layers if isinstance(layer, QuantizedLayer)]

    # --- non-finite tokens on a GPU ------------------------------------------------------------

    def _flag(self, device: torch.device) -> DeviceFlag | None:
        """The device flag that checks tokens on ``device`` without a sync (None on the CPU)."""
        if device.type != "cuda":
            return None
        if device not in self._flags:
            self._flags[device] = DeviceFlag(device)
        return self._flags[device]

    def _end_pass(self) -> None:
        for flag in self._flags.values():
            flag.publish()

    def check_finite(self) -> None:
        """Raise :class:`CacheStateError` if anything non-finite was stored (synchronizes the device)."""
        self._check_finite(sync=True)

    def _check_finite(self, *, sync: bool) -> None:
        if self._failed is None:
            bad = any((not flag.check()) if sync else flag.tripped() for flag in self._flags.values())
            if not bad:
                return
            self._failed = locate_non_finite(self.quantized_layers())
        raise CacheStateError(self._failed)

    # --- accounting ------------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Every byte the cache's tokens take: codes, scales, side codes, windows, sinks, method
        state (the buffers' spare room is in :meth:`reserved_nbytes`)."""
        return sum(n for parts in self.nbytes_by_part().values() for n in parts.values())

    def reserved_nbytes(self) -> int:
        """Bytes of the buffers the tokens live in, spare room for more tokens included."""
        return sum(layer.reserved_nbytes() for layer in self.quantized_layers())

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
