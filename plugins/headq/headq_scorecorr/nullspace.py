"""Null-space injection, the control of HeadQ (arXiv 2605.03562) that falsifies storage-MSE thinking.

It adds to every encoded key an error the attention cannot see, at a chosen key MSE ``mse`` (per
element, ``|e|^2 / d``), then stores the result with its base method (default ``fp16``), so key
MSE is large while perplexity barely moves:

- ``shift``: one random vector ``mu`` per (layer, KV head) added to every encoded key. Logits of a
  query move by the one constant ``q . mu``, which softmax ignores when every key moves; the cache
  keeps the in-flight token and the window exact, so the shift shows against those. With
  ``energy=1`` ``mu`` is unconstrained; below 1 it is drawn in the free space below.
- ``orthogonal``: per token a random direction in the free space: the orthogonal complement of
  the calibrated query subspace (the eigenvectors of ``E[q q^T]`` beyond those that carry the
  fraction ``energy`` of the query energy; at least the weakest one), scaled to norm
  ``sqrt(mse * d)``. The direction is ``P G k / |P G k|`` for a seeded Gaussian ``G``:
  deterministic, and different for every key.

How invisible the injection can be depends on the model: the visible part of an error ``e`` is
``e^T S e``, at least ``|e|^2`` times the smallest query eigenvalue.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import attrs
import torch

from headq_core import KeyQuantizer, MethodConfig
from headq_core.errors import CalibrationError
from headq_core.layouts import EncodedBlock
from headq_core.registry import get_registry
from headq_core.spec import Spec


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


@attrs.frozen
class NullSpaceConfig(MethodConfig):
    base: Spec = attrs.field(default=Spec("fp16"), metadata={"help": "method that stores the keys"})
    mode: Literal["shift", "orthogonal"] = attrs.field(
        default="shift",
        validator=attrs.validators.in_(("shift", "orthogonal")),
        metadata={"help": "one shared vector, or per-token error outside the query subspace"},
    )
    mse: float = attrs.field(
        default=0.0, validator=_non_negative, metadata={"help": "key MSE per element to inject (0: none)"}
    )
    energy: float = attrs.field(
        default=0.999,
        validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)],
        metadata={"help": "query energy fraction kept clear of the error (1: no constraint)"},
    )
    seed: int = attrs.field(default=0, metadata={"help": "seed of the random error"})


class NullSpaceKeys(KeyQuantizer):
    """Keys plus an error invisible to attention, stored by the base method (a control, not a codec)."""

    name = "nullspace"
    config_class = NullSpaceConfig
    summary = "control: injects key error attention cannot see (shared shift or query null space)"
    calibration_needs: ClassVar[frozenset[str]] = frozenset({"query_moments"})
    # KIVI-2's key MSE on the default model (docs/results-headq.md), put where the queries do not look
    suite_rows = (("nullspace:mode=orthogonal,mse=0.19", "fp16"),)
    config: NullSpaceConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self.base = get_registry().key_quantizer(self.config.base)
        self.error: list[torch.Tensor] = []  # per layer: mu (h, d) or projector (h, d, d)

    @property
    def block_tokens(self) -> int:
        return self.base.block_tokens

    def stores(self) -> str:
        return f"{self.base.stores()}, after injecting {self.config.mode} error of MSE {self.config.mse}"

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        return self.base.nominal_bits(head_dim)

    def state_nbytes(self, layer_idx: int) -> int:
        """The base's state and the shift or projector held to encode (memory the cache holds,
        though no reader needs it: the injected error is not information)."""
        held = self.error[layer_idx] if layer_idx < len(self.error) else None
        own = 0 if held is None else held.numel() * held.element_size()
        return self.base.state_nbytes(layer_idx) + own

    def fit(self, stats: Any) -> dict[str, torch.Tensor]:
        """``shift``: mu (L, h, d), norm ``sqrt(mse * d)``; ``orthogonal``: projectors (L, h, d, d)."""
        gen = torch.Generator().manual_seed(self.config.seed)
        d = stats.shape["head_dim"]
        out = []
        for moment in stats.query_moments:
            projector = self._free_space(moment.double())
            if self.config.mode == "shift":
                mu = projector @ torch.randn(moment.shape[0], d, 1, generator=gen, dtype=torch.float64)
                mu = mu[..., 0] / mu[..., 0].norm(dim=-1, keepdim=True).clamp_min(1e-30)
                out.append(mu * (self.config.mse * d) ** 0.5)
            else:
                out.append(projector)
        return {self.config.mode: torch.stack(out).float()}

    def _free_space(self, moment: torch.Tensor) -> torch.Tensor:
        """Projector (h, d, d) on the directions left once ``energy`` of the query energy is kept clear.

        ``energy=1`` sets no constraint (the identity); otherwise at least the weakest direction.
        """
        h, d, _ = moment.shape
        if self.config.energy >= 1.0:
            return torch.eye(d, dtype=moment.dtype).expand(h, d, d).clone()
        values, vectors = torch.linalg.eigh(moment)  # ascending
        share = values.flip(-1).clamp_min(0).cumsum(-1) / values.clamp_min(0).sum(-1, keepdim=True)
        keep = ((share < self.config.energy).sum(-1) + 1).clamp_max(d - 1)  # strongest to avoid
        free = vectors * (torch.arange(d)[None, :] < (d - keep)[:, None])[:, None, :]
        return free @ free.transpose(-1, -2)

    def bind(self, model_config: Any, calibration: Any = None) -> None:
        if calibration is None:
            raise CalibrationError(
                f"{self.spec} needs a calibration: run `headq calibrate --keys '{self.spec}' --out FILE`"
            )
        if model_config is not None:
            calibration.check_model(model_config)
        self.base.bind(model_config, calibration)
        stacked = calibration.tensors_for("key", self).get(self.config.mode)
        if stacked is None:
            raise CalibrationError(f"the calibration of {self.spec} holds no {self.config.mode!r} tensor")
        self.error = list(stacked.float())

    def inject(self, keys: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """keys (b, h, t, d) plus the invisible error, float32."""
        if layer_idx >= len(self.error):
            raise CalibrationError(f"{self.spec}: no calibration for layer {layer_idx}; was bind() called?")
        x = keys.float()
        if self.config.mse == 0:
            return x
        err = self.error[layer_idx].to(x.device)
        if self.config.mode == "shift":
            return x + err[None, :, None, :]
        d = x.shape[-1]
        gen = torch.Generator().manual_seed(self.config.seed * 100003 + layer_idx)
        mix = torch.randn(d, d, generator=gen).to(x.device)
        direction = torch.einsum("hde,bhte->bhtd", err, x @ mix.T)
        norm = direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return x + direction / norm * (self.config.mse * d) ** 0.5

    def encode(self, keys: torch.Tensor, layer_idx: int) -> EncodedBlock:
        """keys: (b, h, t, d) -> the base method's block of the keys with the error added."""
        return self.base.encode(self.inject(keys, layer_idx).to(keys.dtype), layer_idx)

    def logits(self, query: torch.Tensor, block: EncodedBlock, layer_idx: int) -> torch.Tensor:
        return self.base.logits(query, block, layer_idx)

    def keys_as_read(self, block: EncodedBlock, dtype: torch.dtype) -> torch.Tensor | None:
        return self.base.keys_as_read(block, dtype)
