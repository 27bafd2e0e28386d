"""A key quantizer and a value policy from one per-token codec: every method of this package
encodes keys and values alike, one token of one KV head at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from headq_core import KeyQuantizer, ValuePolicy
from headq_core.layouts import EncodedBlock

Codec = Callable[[torch.Tensor, Any], EncodedBlock]


class PerTokenKeys(KeyQuantizer):
    codec: ClassVar[Codec]

    def encode(self, keys: torch.Tensor, layer_idx: int) -> EncodedBlock:
        return type(self).codec(keys, self.config)

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        return self.config.bits_per_element(head_dim)  # type: ignore[attr-defined, no-any-return]


class PerTokenValues(ValuePolicy):
    codec: ClassVar[Codec]

    def encode(
        self, values: torch.Tensor, layer_idx: int, sq_attention: torch.Tensor | None = None
    ) -> EncodedBlock:
        return type(self).codec(values, self.config)

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        return self.config.bits_per_element(head_dim)  # type: ignore[attr-defined, no-any-return]


def key_and_value(
    stem: str,
    name: str,
    config_class: type,
    codec: Codec,
    summary: str,
    suite_rows: tuple[tuple[str, str], ...],
) -> tuple[type[PerTokenKeys], type[PerTokenValues]]:
    """``{stem}Keys`` and ``{stem}Values``, both named ``name`` in specs and encoding with ``codec``
    (``(tokens (b, h, n, d), config) -> block``); ``config_class`` gives ``bits_per_element(head_dim)``."""
    shared = {
        "name": name,
        "config_class": config_class,
        "codec": staticmethod(codec),
        "summary": summary,
        "suite_rows": suite_rows,
        "__module__": codec.__module__,
    }
    return type(f"{stem}Keys", (PerTokenKeys,), shared), type(f"{stem}Values", (PerTokenValues,), shared)
