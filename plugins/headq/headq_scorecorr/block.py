"""HeadQ's encoded block: a base key block plus a low-rank side code (arXiv 2605.03562).

Shapes: ``b`` batch, ``h`` KV heads, ``t`` tokens, ``d`` head_dim, ``r`` rank.

- ``base``: the base quantizer's own block (nested; its tensors keep their own parts);
- ``codes``: the side code ``z`` of ``c = W^T (k - k_hat)``: packed mid-rise integer codes
  (b, h, r - lead, t * zbits / 32) int32 along tokens, or (b, h, r, t) float16 / float32 for
  ``zbits`` 16 / 32 (a test and ablation mode, unquantized);
- ``lead_codes``: the first ``lead`` coordinates (the ones that carry the most logit-error energy)
  at twice the bits, (b, h, lead, t * 2 * zbits / 32) int32, or None;
- ``step``: (b, h, t) float16 per-token step when ``scale="token"``, else None.

The per-layer basis and static steps live in :class:`LayerBasis`, shared by every block of a
layer and counted once per layer by the method's ``state_nbytes``; a block holds a reference
to it, not a copy.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from headq_core.layouts import KERNEL_BITS, AffineBlock, EncodedBlock, LowRankLogit, NoKernelLayout, stored
from headq_kernels import decode_plan, dequantize_symmetric, quantize_symmetric
from headq_scorecorr.threebit import ThreeBitBlock

Scale = Literal["token", "static", "base"]
FLOAT_BITS = {16: torch.float16, 32: torch.float32}


@attrs.define(eq=False)
class LayerBasis:
    """One layer's fitted state. decode ``U`` and encode ``W``: (h, d, r); steps: (h, r) or None.

    ``decode`` and ``steps`` are stored float16 (counted); ``encode`` is float32, derived at bind
    from the stored bases (``W (U^T W)^-1``) so that ``U W^T`` is an exact projector.
    """

    decode: torch.Tensor
    encode: torch.Tensor
    stored_encode: torch.Tensor | None = None  # (h, d, r) float16 where W is not U's own dual
    steps: torch.Tensor | None = None

    def nbytes(self) -> int:
        held = [self.decode, self.stored_encode, self.steps]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def to(self, device: torch.device) -> LayerBasis:
        if self.decode.device == device:
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return LayerBasis(
            decode=self.decode.to(device),
            encode=self.encode.to(device),
            stored_encode=move(self.stored_encode),
            steps=move(self.steps),
        )


def base_deviation(block: EncodedBlock) -> torch.Tensor | None:
    """Predicted std of the base residual per channel and token: (b, h, d, t), or None if unknown.

    A min/max affine code with step ``s`` leaves an error of about ``U(-s/2, s/2)``, variance
    ``s^2 / 12``; the decoder reads ``s`` from the base block, so this costs no bits.
    """
    if not isinstance(block, (AffineBlock, ThreeBitBlock)):
        return None
    scale = block.scale.float()
    per = scale.repeat_interleave(block.group, dim=-1)
    if isinstance(block, AffineBlock) and block.axis == "channels":  # (b, h, t, d) -> (b, h, d, t)
        per = per.transpose(-1, -2)
    return per * (12.0**-0.5)


def shared_step(scale: Scale, base: EncodedBlock, basis: LayerBasis) -> torch.Tensor:
    """The float16 step of a static or base-derived side code, broadcastable to (b, h, r, t).

    ``static``: the calibrated step per (head, coordinate), (1, h, r, 1). ``base``: the calibrated
    multiplier times the std each coordinate is predicted to have from the base block's scales,
    ``sqrt(sum_d W_dr^2 dev_dt^2)``, (b, h, r, t). Encoder and decoder both call this.
    """
    if basis.steps is None:
        raise ValueError(f"scale={scale!r} needs calibrated steps, and this basis has none")
    steps = basis.steps[None, :, :, None]
    if scale == "static":
        return steps
    dev = base_deviation(base)
    if dev is None:
        raise TypeError(
            f"scale='base' needs a base whose blocks carry affine scales (kivi, kivi3); got {type(base).__name__}"
        )
    var = torch.einsum("hdr,bhdt->bhrt", basis.encode.square(), dev.square())
    return (steps.float() * var.sqrt()).to(torch.float16)


def encode_side(
    coords: torch.Tensor, step: torch.Tensor, zbits: int, lead: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed codes of coords (b, h, r, t) at ``step`` (broadcastable); the first ``lead`` at 2 zbits."""
    rest = quantize_symmetric(coords[:, :, lead:], _rows(step, lead, None), zbits)
    if not lead:
        return rest, None
    return rest, quantize_symmetric(coords[:, :, :lead], _rows(step, 0, lead), 2 * zbits)


def decode_side(
    codes: torch.Tensor, lead_codes: torch.Tensor | None, step: torch.Tensor, zbits: int, n: int
) -> torch.Tensor:
    """Inverse of :func:`encode_side`: (b, h, r, n) float32."""
    lead = 0 if lead_codes is None else lead_codes.shape[2]
    rest = dequantize_symmetric(codes, _rows(step, lead, None), zbits, n)
    if lead_codes is None:
        return rest
    return torch.cat([dequantize_symmetric(lead_codes, _rows(step, 0, lead), 2 * zbits, n), rest], dim=2)


def _rows(step: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
    return step if step.shape[2] == 1 else step[:, :, start:stop]


@attrs.define(kw_only=True)
class LowRankBlock(EncodedBlock):
    """A base key block with HeadQ's side code; see the module docstring for shapes."""

    base: EncodedBlock
    codes: torch.Tensor = stored("side")
    lead_codes: torch.Tensor | None = stored("side")
    step: torch.Tensor | None = stored("side")
    rank: int
    zbits: int
    scale: Scale
    sign: int
    basis: LayerBasis = attrs.field(repr=False)

    @property
    def layout(self) -> LowRankLogit:
        return LowRankLogit(self.rank, self.zbits)

    def token_axis(self, name: str) -> int:
        return 2 if name == "step" else 3

    def side(self) -> torch.Tensor:
        """The decoded side code ``z_hat``: (b, h, r, t) float32."""
        if self.zbits in FLOAT_BITS:
            return self.codes.float()
        if self.scale == "token":
            assert self.step is not None
            step = self.step.unsqueeze(-2)  # (b, h, 1, t)
        else:
            step = shared_step(self.scale, self.base, self.basis)
        return decode_side(self.codes, self.lead_codes, step, self.zbits, self.tokens)

    def correction(self) -> torch.Tensor:
        """``sign * U z_hat`` per token: (b, h, t, d) float32, the key the logits effectively read."""
        decode = self.basis.decode.float()
        return self.sign * torch.einsum("hdr,bhrt->bhtd", decode, self.side())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.base.dequantize(torch.float32) + self.correction()).to(dtype)

    def kernel_segment(self, covered: int) -> decode_plan.Segment:
        """The base's affine keys with the side code: the kernel adds ``(sign U^T q) . z_hat``."""
        if self.scale != "token" or self.lead_codes is not None or self.zbits not in KERNEL_BITS:
            raise NoKernelLayout(
                f"HeadQ side codes with scale={self.scale!r}, zbits={self.zbits}"
                f"{', lead coordinates' if self.lead_codes is not None else ''}: the kernel reads "
                "per-token steps at 1, 2, 4 or 8 bits, no lead coordinates"
            )
        if self.rank > 64:
            raise NoKernelLayout(f"a side code of rank {self.rank}: the kernel reads up to 64")
        base = self.base.kernel_segment(covered)
        if not isinstance(base, decode_plan.AffineTokens):
            raise NoKernelLayout(f"HeadQ on a {type(self.base).__name__} base: the kernel reads affine keys")
        base.side_codes, base.side_step, base.side_bits = self.codes, self.step, self.zbits
        base.side_basis, base.side_sign = self.basis.decode, float(self.sign)
        return base
