"""Per-layer codebook state shared by the GSRQ key and value methods: fit, bind, encode.

``fit`` learns, per layer, a stack of stage codebooks per sub-vector position (and, with
``scale=fisher``, a channel scale per KV head) from the calibration statistics; ``bind`` reads them
back from the artifact with every shape checked; ``encode`` turns a block of vectors into
bit-packed indices that refer to the layer's codebooks.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from headq_core.calibration import model_shape
from headq_core.errors import CalibrationError
from headq_gsrq.block import CodebookBlock, LayerCodebooks, RotatedCodebookBlock, pack_indices
from headq_gsrq.config import GsrqConfig
from headq_gsrq.fitting import channel_scale, encode_residual, fisher_weights, fit_layer
from headq_gsrq.rotary import inverse_frequencies, rotate

Kind = Literal["key", "value"]


class Codebooks:
    """What the key and value methods share: fitting, binding and encoding with per-layer codebooks."""

    def __init__(self, kind: Kind, config: GsrqConfig) -> None:
        self.kind, self.config = kind, config
        self.layers: list[LayerCodebooks] = []

    @property
    def needs(self) -> frozenset[str]:
        fisher = self.config.weighted or self.config.scale == "fisher"
        positions = ["key_positions"] if self.config.rope == "pre" else []
        return frozenset({f"{self.kind}_samples", *([f"{self.kind}_fisher"] if fisher else []), *positions})

    def fit(self, stats: Any) -> dict[str, torch.Tensor]:
        """Per layer, ``layer{i}.stage{m}``: (P, K_m, dim) float16 codebooks; ``layer{i}.scale``:
        (kv_heads, head_dim) float16 channel scales (``scale=fisher``). With ``rope=pre`` the samples
        are rotated back by their positions first (the Fisher statistic is used as it is)."""
        cfg = self.config
        if cfg.rope == "pre" and self.kind != "key":
            raise CalibrationError("gsrq rope=pre undoes the rotary embedding of keys; values have none")
        samples: list[torch.Tensor] = getattr(stats, f"{self.kind}_samples")
        fisher: list[torch.Tensor] = getattr(stats, f"{self.kind}_fisher", [])
        if f"{self.kind}_fisher" in self.needs and len(fisher) != len(samples):
            raise CalibrationError(f"gsrq needs the {self.kind}_fisher statistic for every layer")
        out = {}
        for layer, x in enumerate(samples):
            cfg.positions(x.shape[-1])
            weights = fisher_weights(fisher[layer].cpu(), cfg.dim) if cfg.weighted else None
            if cfg.rope == "pre":
                inv_freq = inverse_frequencies(stats.config, layer)
                x = rotate(x.cpu(), stats.key_positions[layer][..., 0].cpu(), inv_freq, back=True)
            if cfg.scale == "fisher":
                scale = channel_scale(fisher[layer].cpu()).half()
                out[f"layer{layer}.scale"] = scale
                x = x.cpu().float() * scale.float()[:, None]
            books = fit_layer(x, weights, cfg, seed=cfg.seed + 1009 * layer)
            for m, book in enumerate(books):
                out[f"layer{layer}.stage{m}"] = book.half()
        return out

    def bind(self, spec: str, model_config: Any, tensors: dict[str, torch.Tensor]) -> None:
        """Read the codebooks back, checking every stage's shape against the spec and the model."""
        sizes = self.config.sizes
        count = len({name.split(".")[0] for name in tensors})
        scaled = self.config.scale == "fisher"
        shape = model_shape(model_config) if model_config is not None else None
        if self.config.rope == "pre" and model_config is None:
            raise CalibrationError(f"{spec}: rope=pre needs the model config (its rotary embedding)")
        if shape is not None and count < shape["layers"]:
            raise CalibrationError(
                f"{spec}: the calibration has codebooks for {count} layers, the model {shape['layers']}"
            )
        layers = []
        for layer in range(count):
            stages = []
            for m, size in enumerate(sizes):
                book = tensors.get(f"layer{layer}.stage{m}")
                want_p = None if shape is None else self.config.positions(shape["head_dim"])
                if (
                    book is None
                    or book.shape[1:] != (size, self.config.dim)
                    or want_p not in (None, book.shape[0])
                ):
                    got = None if book is None else tuple(book.shape)
                    raise CalibrationError(
                        f"{spec}: layer {layer} stage {m} codebook is {got}, expected ({want_p or 'P'}, {size}, "
                        f"{self.config.dim}); recalibrate with `headq calibrate --{self.kind}s '{spec}'`"
                    )
                stages.append(book.to(torch.float16).contiguous())
            scale = tensors.get(f"layer{layer}.scale") if scaled else None
            if scaled and (scale is None or scale.shape[-1] != self.config.dim * stages[0].shape[0]):
                got = None if scale is None else tuple(scale.shape)
                raise CalibrationError(f"{spec}: layer {layer} channel scale is {got}; recalibrate")
            scale = None if scale is None else scale.half().contiguous()
            inv_freq = inverse_frequencies(model_config, layer) if self.config.rope == "pre" else None
            layers.append(LayerCodebooks(tuple(stages), scale, inv_freq))
        self.layers = layers

    def books(self, spec: str, layer_idx: int) -> LayerCodebooks:
        if not self.layers:
            raise CalibrationError(f"{spec} was used before bind(); give the cache a calibration")
        if layer_idx >= len(self.layers):
            raise CalibrationError(
                f"{spec}: the calibration has {len(self.layers)} layers; asked for {layer_idx}"
            )
        return self.layers[layer_idx]

    def encode(self, spec: str, x: torch.Tensor, layer_idx: int, start: int | None = None) -> CodebookBlock:
        """x: (batch, kv_heads, tokens, head_dim), its first token the layer's token ``start`` -> a
        block of bit-packed indices (with ``rope=pre``, of the keys rotated back by their positions)."""
        books = self.books(spec, layer_idx)
        books.place(x.device)
        if books.positions * books.dim != x.shape[-1]:
            raise CalibrationError(
                f"{spec}: codebooks cover {books.positions * books.dim} channels, keys have {x.shape[-1]}"
            )
        positions = None
        if books.inv_freq is not None:
            if start is None:
                raise CalibrationError(f"{spec}: rope=pre encodes keys at known positions (encode_at)")
            positions = torch.arange(start, start + x.shape[-2], device=x.device, dtype=torch.int32)
            x = rotate(x, positions, books.inv_freq, back=True)
        scale = books.channel_scale(x.device)
        scaled = x.float() if scale is None else x.float() * scale
        sub = scaled.unflatten(-1, (books.positions, books.dim))  # (b, h, T, P, dim)
        codes = encode_residual(sub, books.on(x.device))
        indices = pack_indices(codes, books.widths)
        if positions is None:
            return CodebookBlock(tokens=x.shape[-2], indices=indices, books=books)
        where = positions.expand(x.shape[0], 1, -1).contiguous()  # (b, 1, tokens)
        return RotatedCodebookBlock(tokens=x.shape[-2], indices=indices, books=books, positions=where)

    def state_nbytes(self, layer_idx: int) -> int:
        return self.layers[layer_idx].nbytes if layer_idx < len(self.layers) else 0
