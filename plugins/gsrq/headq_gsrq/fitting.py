"""Residual codebooks from calibration samples, and greedy stage-by-stage encoding.

Per layer and kind (keys or values), every sub-vector position ``p`` gets its own stack of stage
codebooks, learned on the sub-vectors at ``p`` of every KV head's calibration samples: stage 1 on
the samples, stage ``m`` on what the earlier stages left (greedy residuals). Samples may be
weighted by a log-smoothed Fisher weight ``log(1 + F / median F)``, ``F`` the squared gradient
norm of the LM loss with respect to the sub-vector. With ``scale=fisher`` the codebooks are learned
on ``s * x``, ``s`` the root of each channel's mean Fisher per KV head (normalized to mean 1), so
that squared error counts each channel by its effect on the loss (a diagonal Fisher metric).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from headq_gsrq.config import GsrqConfig
from headq_gsrq.learners import Fitted, assign, gskm, kmeans


def by_position(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(heads, n, d) -> (P, heads * n, dim): the sub-vectors at each position, heads pooled."""
    heads, n, d = x.shape
    return x.reshape(heads, n, d // dim, dim).permute(2, 0, 1, 3).reshape(d // dim, heads * n, dim)


def fisher_weights(fisher: torch.Tensor, dim: int) -> torch.Tensor:
    """log(1 + F / median F) per sub-vector, F summed over its channels.

    fisher: (heads, n, d) squared gradients per channel -> (P, heads * n) float32 weights. A
    position whose median F is zero falls back to its mean; one with no signal at all to ones.
    """
    f = by_position(fisher.float(), dim).sum(-1)  # (P, heads * n)
    scale = f.median(dim=-1, keepdim=True).values
    scale = torch.where(scale > 0, scale, f.mean(dim=-1, keepdim=True))
    weights = torch.log1p(f / scale.clamp_min(torch.finfo(torch.float32).tiny))
    return torch.where(scale > 0, weights, torch.ones_like(weights))


def channel_scale(fisher: torch.Tensor) -> torch.Tensor:
    """Root mean Fisher per channel, (heads, n, d) -> (heads, d), mean 1 per head, floored at 1e-2."""
    root = fisher.float().mean(dim=1).sqrt()
    root = root / root.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(root.mean(dim=-1, keepdim=True) > 0, root.clamp_min(1e-2), torch.ones_like(root))


def nearest(residual: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Nearest codeword per position: residual (..., P, dim), book (P, K, dim) -> (..., P) int64."""
    lead = residual.shape[:-2]
    flat = residual.reshape(-1, *residual.shape[-2:]).transpose(0, 1)  # (P, N, dim)
    ids, _ = assign(flat.contiguous(), book)
    return ids.transpose(0, 1).reshape(*lead, -1)


def encode_residual(x: torch.Tensor, books: list[torch.Tensor]) -> torch.Tensor:
    """Greedy stage-by-stage indices: x (..., P, dim) float32, books [(P, K_m, dim)] -> (..., P, M)."""
    positions = torch.arange(x.shape[-2], device=x.device)
    residual, codes = x, []
    for book in books:
        ids = nearest(residual, book)
        residual = residual - book[positions, ids]
        codes.append(ids)
    return torch.stack(codes, dim=-1)


def _learner(config: GsrqConfig) -> Callable[..., Fitted]:
    return gskm if config.learner == "gskm" else kmeans


def fit_layer(
    samples: torch.Tensor, weights: torch.Tensor | None, config: GsrqConfig, *, seed: int
) -> list[torch.Tensor]:
    """Stage codebooks [(P, K_m, dim) float32] for one layer and kind.

    samples: (heads, n, d); weights: (P, heads * n) from :func:`fisher_weights`, or None.
    """
    learn = _learner(config)
    residual = by_position(samples.float().cpu(), config.dim)  # (P, N, dim)
    books = []
    for m, size in enumerate(config.sizes):
        fitted = learn(residual, size, weights=weights, iters=config.iters, seed=seed + 7919 * m)
        book = fitted.codewords
        ids, _ = assign(residual, book)
        residual = residual - book.gather(1, ids.unsqueeze(-1).expand(-1, -1, config.dim))
        books.append(book)
    return books
