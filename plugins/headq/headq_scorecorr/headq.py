"""HeadQ (arXiv 2605.03562): correct key quantization error where the model sees it, in the logits.

A base quantizer stores the keys; HeadQ stores, per token, an ``r``-number side code of the
residual ``e = k - k_hat`` in a basis learned from calibration queries, and adds it back as a
logit correction on encoded tokens only (the full-precision window is never touched)::

    c = W^T e                      (b, h, t, r)   W: (h, d, r) per layer
    z = Q_side(c)                  zbits per number; per-token, static or base-derived step
    s_j = q . k_hat_j + sign * (U^T q) . z_hat_j   (unscaled; the attention scales)

Bits per element: the base's, plus ``r * zbits / d`` (and ``16 / d`` for a per-token step), plus
the float16 basis per layer, amortized. See :mod:`headq_scorecorr.basis` for the bases.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import attrs
import torch

from headq_core import KeyQuantizer, MethodConfig
from headq_core.errors import CalibrationError, SpecError
from headq_core.registry import get_registry
from headq_core.spec import Spec
from headq_kernels import codes_per_word, quantize_symmetric, symmetric_step
from headq_scorecorr.block import FLOAT_BITS, LayerBasis, LowRankBlock, Scale, encode_side, shared_step
from headq_scorecorr.fitting import fit_layers, load_layers

Basis = Literal["query", "key", "random", "joint"]
ZBITS = (1, 2, 4, 8, 16, 32)


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


@attrs.frozen
class HeadQConfig(MethodConfig):
    base: Spec = attrs.field(default=Spec("kivi"), metadata={"help": "base key quantizer spec"})
    rank: int = attrs.field(default=8, validator=_positive, metadata={"help": "side-code rank r"})
    zbits: int = attrs.field(
        default=4,
        validator=attrs.validators.in_(ZBITS),
        metadata={"help": "bits per side number; 16/32 keep unquantized floats"},
    )
    lead: int = attrs.field(
        default=0,
        validator=attrs.validators.ge(0),
        metadata={"help": "leading (most energetic) side numbers coded at 2*zbits [ours]"},
    )
    scale: Scale = attrs.field(
        default="token",
        validator=attrs.validators.in_(("token", "static", "base")),
        metadata={"help": "side step: per-token fp16, static calibrated, or derived from the base's scales"},
    )
    basis: Basis = attrs.field(
        default="query",
        validator=attrs.validators.in_(("query", "key", "random", "joint")),
        metadata={"help": "query (the method), key or random (controls), joint (query-whitened residual)"},
    )
    alloc: Literal["uniform", "energy"] = attrs.field(
        default="uniform",
        validator=attrs.validators.in_(("uniform", "energy")),
        metadata={"help": "rank in every layer, or spread over layers by captured logit-error energy"},
    )
    sign: int = attrs.field(
        default=1, validator=attrs.validators.in_((1, -1)), metadata={"help": "-1: wrong-sign control"}
    )
    seed: int = attrs.field(default=0, metadata={"help": "seed of the random basis"})

    def __attrs_post_init__(self) -> None:
        if self.lead and (self.lead >= self.rank or self.zbits > 4 or self.scale == "token"):
            raise ValueError(
                "lead needs lead < rank, zbits <= 4 (its numbers take 2*zbits) and a static or "
                f"base-derived scale; got lead={self.lead}, rank={self.rank}, zbits={self.zbits}, "
                f"scale={self.scale}"
            )


HALF_BIT = "headq:rank=15,zbits=2,lead=1,scale=base,basis=joint"


class HeadQKeys(KeyQuantizer):
    """Base key block plus a low-rank side code read as a logit correction (LowRankLogit layout)."""

    name = "headq"
    # +0.5 bits per element on KIVI-2 keys at head_dim 64 (docs/methods/headq.md), K-only and with A² values
    suite_rows = tuple((HALF_BIT, values) for values in ("fp16", "a2"))
    config_class = HeadQConfig
    summary = "any base key quantizer + r-number side code of its residual in a calibrated query basis"
    calibration_needs: ClassVar[frozenset[str]] = frozenset({"query_moments", "key_moments", "key_samples"})
    config: HeadQConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self.base = get_registry().key_quantizer(self.config.base)
        if self.base.calibration_needs:
            raise SpecError(f"headq's base must need no calibration; {self.base.spec} does")
        self.layers: list[LayerBasis] = []

    @property
    def block_tokens(self) -> int:
        g = self.base.block_tokens
        if self.config.zbits in FLOAT_BITS:
            return g
        units = [g, codes_per_word(self.config.zbits)]
        if self.config.lead:
            units.append(codes_per_word(2 * self.config.zbits))
        return math.lcm(*units)  # side codes fill whole words

    def stores(self) -> str:
        cfg = self.config
        step = {
            "token": "an fp16 step per token",
            "static": "static steps",
            "base": "steps from the base's scales",
        }
        lead = f", the first {cfg.lead} at {2 * cfg.zbits}" if cfg.lead else ""
        width = "float" if cfg.zbits in FLOAT_BITS else "bit"
        return (
            f"{self.base.stores()}; side code: {cfg.rank} numbers per token at {cfg.zbits} {width}s{lead}, "
            f"{step[cfg.scale]}, {cfg.basis} basis"
        )

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        bits = dict(self.base.nominal_bits(head_dim))
        side = (self.config.rank + self.config.lead) * self.config.zbits / head_dim
        if self.config.scale == "token" and self.config.zbits not in FLOAT_BITS:
            side += 16 / head_dim
        bits["side"] = bits.get("side", 0.0) + side
        return bits

    def state_nbytes(self, layer_idx: int) -> int:
        own = self.layers[layer_idx].nbytes() if layer_idx < len(self.layers) else 0
        return own + self.base.state_nbytes(layer_idx)

    # --- calibration -------------------------------------------------------------------------

    def fit(self, stats: Any) -> dict[str, torch.Tensor]:
        """Bases (and steps) per layer from calibration statistics; see :mod:`headq_scorecorr.fitting`."""
        return fit_layers(self, stats)

    def bind(self, model_config: Any, calibration: Any = None) -> None:
        if calibration is None:
            raise CalibrationError(
                f"{self.spec} needs a calibrated basis: run `headq calibrate --keys '{self.spec}' "
                "--out FILE` and pass FILE (headq bench --calibration FILE, or "
                "QuantizedKVCache(calibration=Calibration.load(FILE)))"
            )
        if model_config is not None:
            calibration.check_model(model_config)
        self.base.bind(model_config, calibration)
        self.layers = load_layers(self, calibration.tensors_for("key", self))

    # --- encode and logits -------------------------------------------------------------------

    def _basis(self, layer_idx: int, keys: torch.Tensor) -> LayerBasis:
        if not self.layers:
            raise CalibrationError(f"{self.spec} was used before bind(); give the cache a calibration")
        if layer_idx >= len(self.layers):
            raise CalibrationError(f"the calibration has {len(self.layers)} layers; asked for {layer_idx}")
        basis = self.layers[layer_idx]
        h, d, _ = basis.decode.shape
        if keys.shape[1] != h or keys.shape[-1] != d:
            raise CalibrationError(
                f"keys have {keys.shape[1]} heads of {keys.shape[-1]}; the calibration has {h} of {d}"
            )
        if basis.decode.device != keys.device:
            self.layers[layer_idx] = basis = basis.to(keys.device)
        return basis

    def encode(self, keys: torch.Tensor, layer_idx: int) -> LowRankBlock:
        """keys: (b, h, t, d) -> base block + side codes (b, h, r, t*zbits/32)."""
        basis = self._basis(layer_idx, keys)
        base = self.base.encode(keys, layer_idx)
        residual = keys.float() - base.dequantize(torch.float32)
        coords = torch.einsum("bhtd,hdr->bhrt", residual, basis.encode)  # (b, h, r, t)
        zbits, step, lead_codes = self.config.zbits, None, None
        if zbits in FLOAT_BITS:
            codes = coords.to(FLOAT_BITS[zbits])
        elif self.config.scale == "token":
            step = symmetric_step(coords.abs().amax(dim=-2), zbits)  # (b, h, t)
            codes = quantize_symmetric(coords, step.unsqueeze(-2), zbits)
        else:
            shared = shared_step(self.config.scale, base, basis)
            codes, lead_codes = encode_side(coords, shared, zbits, self.config.lead)
        return LowRankBlock(
            tokens=keys.shape[-2],
            base=base,
            codes=codes,
            lead_codes=lead_codes,
            step=step,
            rank=basis.decode.shape[-1],
            zbits=zbits,
            scale=self.config.scale,
            sign=self.config.sign,
            basis=basis,
        )

    def logits(self, query: torch.Tensor, block: Any, layer_idx: int) -> torch.Tensor:
        """Base logits plus ``sign * (U^T q) . z_hat``: query (b, h, rows, d) -> (b, h, rows, t)."""
        base = self.base.logits(query, block.base, layer_idx)
        q_r = torch.einsum("bhnd,hdr->bhnr", query.float(), block.basis.decode.float())
        return base + block.sign * (q_r @ block.side())

    def keys_as_read(self, block: Any, dtype: torch.dtype) -> torch.Tensor | None:
        """The base's keys plus the correction ``sign * U z_hat`` (the block's ``dequantize``)."""
        if self.base.keys_as_read(block.base, dtype) is None:
            return None
        return block.dequantize(dtype)
