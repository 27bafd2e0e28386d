"""The core's own plugin: the exact (``fp16``) key and value methods and the standard metrics.

It registers through the same hooks as any outside plugin; the core imports no plugin by name.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from headq_core.hookspecs import hookimpl
from headq_core.interfaces import KeyQuantizer, Method, MethodConfig, ValuePolicy
from headq_core.layouts import DenseBlock
from headq_core.registry import Registry

_DTYPES = {"model": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@attrs.frozen
class ExactConfig(MethodConfig):
    dtype: Literal["model", "float16", "bfloat16", "float32"] = attrs.field(
        default="model",
        validator=attrs.validators.in_(tuple(_DTYPES)),
        metadata={"help": "storage dtype; 'model' keeps the model's own"},
    )


class _Exact(Method):
    config: ExactConfig
    name = "fp16"
    config_class = ExactConfig
    summary = "tokens as they are, in the storage dtype (the unquantized baseline)"

    def _store(self, x: torch.Tensor) -> DenseBlock:
        dtype = _DTYPES[self.config.dtype]
        return DenseBlock(tokens=x.shape[-2], data=x if dtype is None else x.to(dtype))

    def stores_exactly(self, dtype: torch.dtype) -> bool:
        # a subclass that encodes its own way is not the identity, whatever it inherits
        own = getattr(type(self), "encode", None) in (ExactKeys.encode, ExactValues.encode)
        return own and _DTYPES[self.config.dtype] in (None, dtype)

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        dtype = _DTYPES[self.config.dtype]
        return {} if dtype is None else {"payload": float(torch.finfo(dtype).bits)}

    def stores(self) -> str:
        if self.config.dtype == "model":
            return "tokens as they are, in the model's own dtype (32 bits for a float32 model, 16 for half)"
        return f"tokens as they are, in {self.config.dtype}"


class ExactKeys(_Exact, KeyQuantizer):
    """Keys kept unquantized: the exact cache, run through the same path as every method."""

    def encode(self, keys: torch.Tensor, layer_idx: int) -> DenseBlock:
        return self._store(keys)


class ExactValues(_Exact, ValuePolicy):
    """Values kept unquantized."""

    def encode(
        self, values: torch.Tensor, layer_idx: int, sq_attention: torch.Tensor | None = None
    ) -> DenseBlock:
        return self._store(values)


@hookimpl
def register_key_quantizers(registry: Registry) -> None:
    registry.add_key_quantizer(ExactKeys)


@hookimpl
def register_value_policies(registry: Registry) -> None:
    registry.add_value_policy(ExactValues)
