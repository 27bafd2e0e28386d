"""HeadQ calibration: what ``fit`` computes per layer and how ``bind`` reads it back.

Saved tensors (``L`` layers, ``h`` KV heads, ``d`` head_dim, ``r`` rank), all float16:

- ``decode``: (L, h, d, r) the basis ``U`` the query is projected on at decode;
- ``encode``: (L, h, d, r) the encode basis ``W``, only where it is not ``U``'s own dual
  (``basis="joint"``);
- ``steps``: (L, h, r) static side-code steps (``scale="static"``) or step multipliers of the
  predicted coordinate std (``scale="base"``), fitted on the base quantizer's residual of the
  calibration keys (``key_samples``; consecutive tokens, so the base's token groups are real).

From the float16 tensors, ``bind`` derives the float32 encoder ``W (U^T W)^-1`` (``W = U`` when
not stored), so that ``U W^T`` is an exact projector: with ``r = d`` the correction is exact.
"""

from __future__ import annotations

from typing import Any

import torch

from headq_core.errors import CalibrationError
from headq_scorecorr.basis import dual_basis, fit_steps, joint_basis, random_basis, top_eigenvectors
from headq_scorecorr.block import FLOAT_BITS, LayerBasis, shared_step


def layer_basis(
    decode: torch.Tensor, stored_encode: torch.Tensor | None, steps: torch.Tensor | None
) -> LayerBasis:
    """A layer's state from its stored float16 tensors (see the module docstring)."""
    u = decode.double()
    w = u if stored_encode is None else stored_encode.double()
    encode = w @ torch.linalg.inv(u.transpose(-1, -2) @ w)  # W (U^T W)^-1: U^T encode = I
    return LayerBasis(decode=decode, encode=encode.float(), stored_encode=stored_encode, steps=steps)


def _residual(method: Any, keys: torch.Tensor, layer_idx: int) -> tuple[Any, torch.Tensor]:
    """The base block of calibration keys (h, n, d) and its residual (1, h, n', d), n' whole blocks."""
    g = method.base.block_tokens
    n = (keys.shape[1] // g) * g
    if n == 0:
        raise CalibrationError(f"too few calibration keys ({keys.shape[1]}) for blocks of {g} tokens")
    x = keys[None, :, :n].float()
    block = method.base.encode(x, layer_idx)
    return block, x - block.dequantize(torch.float32)


def fit_layers(method: Any, stats: Any) -> dict[str, torch.Tensor]:
    """Every layer's bases and steps for ``method`` (a HeadQKeys) from ``CalibrationStats``."""
    cfg = method.config
    d = stats.shape["head_dim"]
    if cfg.rank > d:
        raise CalibrationError(f"rank {cfg.rank} exceeds head_dim {d}")
    integer_side = cfg.zbits not in FLOAT_BITS and cfg.scale != "token"
    needs_residual = cfg.basis == "joint" or integer_side
    decode, encode, steps = [], [], []
    for layer_idx in range(stats.shape["layers"]):
        moment = stats.query_moments[layer_idx]
        heads = moment.shape[0]
        if needs_residual:
            block, residual = _residual(method, stats.key_samples[layer_idx], layer_idx)
            flat = residual[0]  # (h, n, d)
        if cfg.basis == "query":
            u = top_eigenvectors(moment, cfg.rank)
        elif cfg.basis == "key":
            u = top_eigenvectors(stats.key_moments[layer_idx], cfg.rank)
        elif cfg.basis == "random":
            u = random_basis(heads, d, cfg.rank, cfg.seed * 100003 + layer_idx)
        else:
            u = joint_basis(moment, flat.transpose(-1, -2).double() @ flat.double() / flat.shape[1], cfg.rank)
        u16 = u.to(torch.float16)
        w16 = dual_basis(u16, moment).to(torch.float16) if cfg.basis == "joint" else None
        basis = layer_basis(u16, w16, None)
        if integer_side:
            coords = torch.einsum("bhtd,hdr->hrt", residual, basis.encode)  # (h, r, n)
            if cfg.scale == "static":
                fitted = fit_steps(coords.transpose(1, 2), cfg.zbits)
            else:
                unit = LayerBasis(basis.decode, basis.encode, steps=torch.ones(heads, cfg.rank).half())
                dev = shared_step("base", block, unit)[0].float()  # (h, r, n) predicted std
                unit_coords = torch.where(dev > 0, coords / dev.clamp_min(1e-30), 0.0)
                fitted = fit_steps(unit_coords.transpose(1, 2), cfg.zbits, dev.square().transpose(1, 2))
            steps.append(fitted.to(torch.float16))
        decode.append(u16)
        if w16 is not None:
            encode.append(w16)
    out = {"decode": torch.stack(decode)}
    if encode:
        out["encode"] = torch.stack(encode)
    if steps:
        out["steps"] = torch.stack(steps)
    return out


def load_layers(method: Any, tensors: dict[str, torch.Tensor]) -> list[LayerBasis]:
    """Per-layer state from the tensors :func:`fit_layers` saved; clear errors if they do not fit."""
    cfg = method.config
    if "decode" not in tensors:
        raise CalibrationError(f"the calibration entry of {method.spec} has no basis; recalibrate")
    decode = tensors["decode"]
    if decode.dim() != 4 or decode.shape[-1] != cfg.rank:
        raise CalibrationError(f"{method.spec}: calibrated basis has shape {tuple(decode.shape)}")
    encode = tensors.get("encode")
    if (encode is None) != (cfg.basis != "joint"):
        raise CalibrationError(
            f"{method.spec}: the calibration's encode basis does not match basis={cfg.basis}"
        )
    steps = tensors.get("steps")
    if steps is None and cfg.zbits not in FLOAT_BITS and cfg.scale != "token":
        raise CalibrationError(f"{method.spec}: the calibration holds no side-code steps; recalibrate")
    return [
        layer_basis(
            decode[i].to(torch.float16),
            None if encode is None else encode[i].to(torch.float16),
            None if steps is None else steps[i].to(torch.float16),
        )
        for i in range(decode.shape[0])
    ]
