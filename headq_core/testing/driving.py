"""What the conformance checks run on: random data with outlier channels, a small model config,
a cache driven through the ``headq`` attention function without a model, and the method under
test (:class:`Subject`), with the SNR floors the round trips are held to."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import attrs
import torch

from headq_core.attention import headq_attention
from headq_core.cache import QuantizedKVCache
from headq_core.errors import CalibrationError
from headq_core.interfaces import Method
from headq_core.layouts import EncodedBlock
from headq_core.registry import Registry
from headq_core.spec import Spec

Kind = Literal["key", "value"]

BATCH = 2
KV_HEADS = 2
QUERY_GROUP = 2  # query heads per KV head when driving a cache (GQA)
HEAD_DIM = 64
MIN_TOKENS = 128

# SNR floors in dB by payload bits per element. Correct min/max affine quantization of the
# outlier data below reaches about 6 dB per bit minus 6 to 12 dB (per-token groups that span an
# outlier channel lose the most); 1-bit min/max codes are below 0 dB by nature. Sixteen bits or
# more (fp16, bf16) must be near-lossless.
_FLOORS: tuple[tuple[float, float], ...] = ((1.0, -12.0), (2.0, -2.0), (4.0, 10.0), (8.0, 34.0), (16.0, 50.0))


def snr_floor_db(bits: float) -> float:
    """The lowest round-trip SNR (dB) a correct method storing ``bits`` payload bits may reach."""
    if bits <= _FLOORS[0][0]:
        return _FLOORS[0][1]
    for (b0, f0), (b1, f1) in itertools.pairwise(_FLOORS):
        if bits <= b1:
            return f0 + (f1 - f0) * (bits - b0) / (b1 - b0)
    return _FLOORS[-1][1]


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio ``10 log10(|x|^2 / |x - x_hat|^2)`` in dB (inf when equal)."""
    ref = reference.double()
    noise = (ref - approx.double()).square().sum().item()
    signal = ref.square().sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def outlier_data(
    shape: Sequence[int], *, seed: int = 0, outliers: int = 4, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Random non-zero ``(batch, heads, tokens, head_dim)`` data shaped like real keys.

    Gaussian entries, a per-(batch, head) channel offset, and ``outliers`` channels five times
    larger with a shift, as pre-RoPE keys of real models have.
    """
    gen = torch.Generator().manual_seed(seed)
    *lead, dim = shape
    x = torch.randn(*lead, dim, generator=gen)
    channels = torch.randperm(dim, generator=gen)[: min(outliers, dim)]
    x[..., channels] = x[..., channels] * 5.0 + 2.0
    x = x + 0.5 * torch.randn(*lead[:-1], 1, dim, generator=gen)
    return x.to(dtype)


def model_config(*, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM, layers: int = 2) -> Any:
    """A small Llama config with the given KV geometry, for methods that bind to a model."""
    from transformers import LlamaConfig

    heads = kv_heads * QUERY_GROUP
    return LlamaConfig(
        vocab_size=128,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
    )


# --- driving a cache without a model ---------------------------------------------------------


class AttentionModule(torch.nn.Module):
    """Stands in for a model's attention module (the function reads only ``training``)."""


def feed(
    cache: QuantizedKVCache,
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    chunks: Sequence[int],
    *,
    layers: int = 1,
) -> torch.Tensor:
    """Run tokens through ``cache`` in passes of ``chunks`` tokens, as a model's layers would.

    keys, values: (batch, kv_heads, tokens, head_dim); queries: (batch, q_heads, tokens,
    head_dim). Each pass updates every layer (all layers get the same data) and runs the
    ``headq`` attention function with a causal mask, so values flush and statistics flow exactly
    as in a model. Returns layer 0's attention output, (batch, tokens, q_heads, head_dim).
    """
    if sum(chunks) > keys.shape[-2]:
        raise ValueError(f"chunks {list(chunks)} ask for more than {keys.shape[-2]} tokens")
    module = AttentionModule().eval()
    outputs, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        total = start + n
        positions = torch.arange(total, device=keys.device)
        allowed = positions[None, :] <= positions[start:total, None]  # (n, total)
        mask = allowed.expand(keys.shape[0], 1, n, total)
        for layer_idx in range(layers):
            k, v = cache.update(keys[..., sl, :], values[..., sl, :], layer_idx)
            out, _ = headq_attention(module, queries[..., sl, :], k, v, mask)
            if layer_idx == 0:
                outputs.append(out)
        start = total
    return torch.cat(outputs, dim=1)


@attrs.frozen
class Subject:
    """A method under test and how to build fresh copies of it."""

    kind: Kind
    spec: Spec
    registry: Registry
    model_config: Any
    calibration: Any

    @property
    def label(self) -> str:
        return f"{self.spec} ({'key quantizer' if self.kind == 'key' else 'value policy'})"

    def build(self) -> Any:
        method: Method
        if self.kind == "key":
            method = self.registry.key_quantizer(self.spec)
        else:
            method = self.registry.value_policy(self.spec)
        try:
            method.bind(self.model_config, self.calibration)
        except CalibrationError as err:
            raise AssertionError(
                f"{self.label}: bind() needs calibration; pass calibration= to the check ({err})"
            ) from err
        return method

    def encode(self, method: Any, x: torch.Tensor, stats: torch.Tensor | None = None) -> EncodedBlock:
        block: EncodedBlock
        if self.kind == "key":
            block = method.encode(x, 0)
        else:
            block = method.encode(x, 0, stats)
        return block


def fail(subject: Subject, message: str) -> AssertionError:
    return AssertionError(f"{subject.label}: {message}")


def held_tensors(value: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor reachable from an attribute value (nested blocks, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, EncodedBlock):
        for field in attrs.fields(type(value)):
            yield from held_tensors(
                getattr(value, field.name), f"{name}.{field.name}" if name else field.name
            )
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from held_tensors(item, f"{name}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from held_tensors(item, f"{name}[{key!r}]")


def held_bytes(block: EncodedBlock) -> int:
    """Bytes of every tensor ``block`` holds, found by walking its fields (declared or not)."""
    return sum(t.numel() * t.element_size() for _, t in held_tensors(block, ""))
