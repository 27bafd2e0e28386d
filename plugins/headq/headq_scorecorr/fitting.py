"""HeadQ calibration: what ``fit`` computes per layer and how ``bind`` reads it back.

Saved tensors per layer ``l`` (``h`` KV heads, ``d`` head_dim, ``r_l`` the layer's rank), float16:

- ``decode.l``: (h, d, r_l) the basis ``U`` (unit columns) the query is projected on at decode;
- ``encode.l``: (h, d, r_l) the encode basis ``W``, only where it is not ``U``'s own dual
  (``basis="joint"``: the dual in the query metric);
- ``steps.l``: (h, r_l) static side-code steps (``scale="static"``) or step multipliers of the
  predicted coordinate std (``scale="base"``), fitted on the base quantizer's residual of the
  calibration keys (``key_samples``; consecutive tokens, so the base's token groups are real).

Ranks are ``rank`` in every layer, or with ``alloc="energy"`` [ours] spread over layers (same
total) by the logit-error energy each direction captures on calibration data.

From the float16 tensors, ``bind`` derives the float32 encoder ``W (U^T W)^-1`` (``W = U`` when
not stored), so that ``U W^T`` is an exact projector: with ``r = d`` the correction is exact.
"""

from __future__ import annotations

from typing import Any

import torch

from headq_core.errors import CalibrationError
from headq_scorecorr.basis import allocate_ranks, basis_of, dual_basis, fit_steps, ranked_directions
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
    needs_residual = cfg.basis == "joint" or integer_side or cfg.alloc == "energy"
    layers = []
    for layer_idx in range(stats.shape["layers"]):
        block, residual, moment = None, None, None
        if needs_residual:
            block, residual = _residual(method, stats.key_samples[layer_idx], layer_idx)
            flat = residual[0].double()  # (h, n, d)
            moment = flat.transpose(-1, -2) @ flat / flat.shape[1]
        directions, energy = ranked_directions(
            cfg.basis,
            stats.query_moments[layer_idx],
            stats.key_moments[layer_idx] if cfg.basis == "key" else None,
            moment,
            seed=cfg.seed * 100003 + layer_idx,
        )
        layers.append((block, residual, directions, energy))
    ranks = [cfg.rank] * len(layers)
    if cfg.alloc == "energy":
        ranks = allocate_ranks([energy for *_, energy in layers], cfg.rank)
    out: dict[str, torch.Tensor] = {}
    for layer_idx, ((block, residual, directions, _), rank) in enumerate(zip(layers, ranks, strict=True)):
        u16 = basis_of(directions, rank).to(torch.float16)
        w16 = None
        if cfg.basis == "joint":
            w16 = dual_basis(u16, stats.query_moments[layer_idx]).to(torch.float16)
            out[f"encode.{layer_idx}"] = w16
        out[f"decode.{layer_idx}"] = u16
        if integer_side:
            assert residual is not None and block is not None
            out[f"steps.{layer_idx}"] = _fit_steps(cfg, block, residual, layer_basis(u16, w16, None))
    return out


def _fit_steps(cfg: Any, block: Any, residual: torch.Tensor, basis: LayerBasis) -> torch.Tensor:
    """Static steps (h, r), or multipliers of the base-predicted std, float16; ``lead`` at 2 zbits."""
    coords = torch.einsum("bhtd,hdr->htr", residual, basis.encode)  # (h, n, r)
    weight = None
    if cfg.scale == "base":
        h, r = basis.decode.shape[0], basis.decode.shape[-1]
        unit = LayerBasis(basis.decode, basis.encode, steps=torch.ones(h, r, dtype=torch.float16))
        dev = shared_step("base", block, unit)[0].float().transpose(1, 2)  # (h, n, r) predicted std
        coords = torch.where(dev > 0, coords / dev.clamp_min(1e-30), 0.0)
        weight = dev.square()
    lead = cfg.lead
    parts = [fit_steps(coords[..., lead:], cfg.zbits, None if weight is None else weight[..., lead:])]
    if lead:
        parts.insert(
            0, fit_steps(coords[..., :lead], 2 * cfg.zbits, None if weight is None else weight[..., :lead])
        )
    return torch.cat(parts, dim=-1).to(torch.float16)


def load_layers(method: Any, tensors: dict[str, torch.Tensor]) -> list[LayerBasis]:
    """Per-layer state from the tensors :func:`fit_layers` saved; clear errors if they do not fit."""
    cfg = method.config
    count = sum(1 for name in tensors if name.startswith("decode."))
    if count == 0:
        raise CalibrationError(f"the calibration entry of {method.spec} has no basis; recalibrate")
    layers = []
    for i in range(count):
        decode = tensors.get(f"decode.{i}")
        encode = tensors.get(f"encode.{i}")
        steps = tensors.get(f"steps.{i}")
        if decode is None or decode.dim() != 3:
            raise CalibrationError(f"{method.spec}: layer {i} has no (heads, head_dim, rank) basis")
        if (encode is None) != (cfg.basis != "joint"):
            raise CalibrationError(
                f"{method.spec}: layer {i}'s encode basis does not match basis={cfg.basis}"
            )
        if steps is None and cfg.zbits not in FLOAT_BITS and cfg.scale != "token":
            raise CalibrationError(f"{method.spec}: layer {i} holds no side-code steps; recalibrate")
        layers.append(
            layer_basis(
                decode.to(torch.float16),
                None if encode is None else encode.to(torch.float16),
                None if steps is None else steps.to(torch.float16),
            )
        )
    if cfg.alloc == "uniform" and any(b.decode.shape[-1] != cfg.rank for b in layers):
        raise CalibrationError(f"{method.spec}: calibrated ranks differ from rank={cfg.rank}")
    return layers
