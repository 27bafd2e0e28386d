"""Fitting HeadQ's bases and side-code steps from calibration statistics (arXiv 2605.03562).

The logit error of a key error ``e`` under a query ``q`` is ``q . e``; over calibration queries its
expected square is ``e^T S e`` with ``S = E[q q^T]`` (uncentred, post-RoPE, pooled over the query
heads of a KV head). HeadQ corrects ``e`` inside an ``r``-dimensional subspace: it stores
``c = W^T e`` and adds ``(U^T q) . c`` to the logit, so the correction is ``M = U W^T``.

Bases offered (``d`` = head_dim, ``r`` = rank, per KV head):
- ``query``: ``U`` = top-r eigenvectors of ``S`` (the paper's method), ``W = U``;
- ``key``: top-r eigenvectors of ``E[k k^T]`` (a storage-MSE control);
- ``random``: a seeded orthonormal basis (a control);
- ``joint`` [ours]: the rank-r ``M`` that minimizes the expected squared logit error
  ``E[(q^T (I - M) e)^2]`` given the residual second moment ``R = E[e e^T]`` of the base quantizer
  as well: whiten queries with ``A = S^(1/2)``, take the top-r eigenvectors ``V`` of ``A R A``, then
  ``M = A^-1 V V^T A``: ``U = A^-1 V`` (columns scaled to unit norm) and ``W`` its dual in the
  metric ``S``. It equals ``query`` when ``R`` is isotropic.
"""

from __future__ import annotations

import torch

from headq_kernels import dequantize_symmetric, quantize_symmetric


def top_eigenvectors(moment: torch.Tensor, rank: int) -> torch.Tensor:
    """Eigenvectors of the ``rank`` largest eigenvalues. moment: (h, d, d) symmetric -> (h, d, rank)."""
    values, vectors = torch.linalg.eigh(moment.double())
    order = values.argsort(dim=-1, descending=True)[..., :rank]
    return torch.gather(vectors, -1, order.unsqueeze(-2).expand(*vectors.shape[:-1], rank))


def ranked_directions(
    kind: str,
    query_moment: torch.Tensor,
    key_moment: torch.Tensor | None = None,
    residual_moment: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate directions of a basis, best first, and the logit-error energy each would capture.

    Moments: (h, d, d). Returns directions (h, d, d) (the rank-r basis spans the first r) and
    energy (h, d): for ``joint`` the eigenvalues of ``A R A``; otherwise ``(u^T S u)(u^T R u)``,
    or ``u^T S u`` without ``R``.
    """
    s = query_moment.double()
    h, d, _ = s.shape
    if kind == "joint":
        if residual_moment is None:
            raise ValueError("the joint basis needs the residual moment")
        values, vectors = torch.linalg.eigh(s)
        values = values.clamp_min(
            values.amax(dim=-1, keepdim=True) * 1e-8
        )  # never invert an unseen direction
        sqrt = vectors @ torch.diag_embed(values.sqrt()) @ vectors.transpose(-1, -2)
        inv_sqrt = vectors @ torch.diag_embed(values.rsqrt()) @ vectors.transpose(-1, -2)
        energy, whitened = torch.linalg.eigh(sqrt @ residual_moment.double() @ sqrt)
        return (inv_sqrt @ whitened).flip(-1), energy.flip(-1)
    if kind == "query":
        u = top_eigenvectors(s, d)
    elif kind == "key":
        if key_moment is None:
            raise ValueError("the key basis needs the key moment")
        u = top_eigenvectors(key_moment, d)
    else:
        gen = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(h, d, d, generator=gen, dtype=torch.float64))
    energy = torch.einsum("hdi,hde,hei->hi", u, s, u)
    if residual_moment is not None:
        energy = energy * torch.einsum("hdi,hde,hei->hi", u, residual_moment.double(), u)
    return u, energy


def basis_of(directions: torch.Tensor, rank: int) -> torch.Tensor:
    """The first ``rank`` directions (h, d, d), each scaled to unit norm: (h, d, rank).

    Query, key and random directions are orthonormal already; joint ones are ``S``-orthogonal,
    so their side numbers are uncorrelated on calibration data and come best first (``lead``).
    Unit columns keep float16 storage safe; the encode side is the dual (:func:`dual_basis`).
    """
    u = directions[..., :rank].double()
    return u / u.norm(dim=-2, keepdim=True).clamp_min(1e-30)


def allocate_ranks(energy: list[torch.Tensor], mean_rank: int) -> list[int]:
    """Per-layer ranks summing to ``layers * mean_rank``, greedily by captured energy.

    energy: per layer (h, d), each head's directions best first. A layer's k-th direction is
    worth the sum over its heads (heads of a layer share a rank); every layer keeps at least one.
    """
    per_layer = [e.clamp_min(0).sum(0) for e in energy]  # (d,) each, non-increasing
    ranks = [1] * len(per_layer)
    for _ in range(len(per_layer) * (mean_rank - 1)):
        gains = [e[r] if r < e.numel() else -1.0 for e, r in zip(per_layer, ranks, strict=True)]
        best = max(range(len(gains)), key=lambda i: float(gains[i]))
        ranks[best] += 1
    return ranks


def dual_basis(decode: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
    """The encode basis ``W`` with ``W^T U = I`` that projects in the metric (default Euclidean).

    decode ``U``: (h, d, r); metric: (h, d, d) or None. ``c = W^T e`` is the ``c`` minimizing
    ``(e - U c)^T metric (e - U c)``; with ``r = d`` the correction ``U W^T`` is the identity.
    """
    u = decode.double()
    mu = u if metric is None else metric.double() @ u
    gram = u.transpose(-1, -2) @ mu  # (h, r, r)
    return mu @ torch.linalg.inv(gram)


def fit_steps(samples: torch.Tensor, bits: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mid-rise quantizer step per column with the least (weighted) squared error on ``samples``.

    samples: (h, n, r); weight: (h, n, r) or None. Candidate clip levels run from 0.5 to 6 standard
    deviations and the column maximum. Returns (h, r) float32 steps (float16-representable).
    """
    x = samples.float()
    w = torch.ones_like(x) if weight is None else weight.float()
    std = (x.square() * w).sum(1).div(w.sum(1).clamp_min(1e-30)).sqrt()  # (h, r)
    clips = [std * f for f in torch.linspace(0.5, 6.0, 23).tolist()] + [x.abs().amax(1)]
    levels = (1 << bits) - 1
    best, best_err = None, None
    for clip in clips:
        step = (2.0 * clip / levels).to(torch.float16).unsqueeze(1)  # (h, 1, r)
        n = x.shape[1]
        codes = quantize_symmetric(x.transpose(1, 2), step.transpose(1, 2), bits)
        x_hat = dequantize_symmetric(codes, step.transpose(1, 2), bits, n).transpose(1, 2)
        err = ((x - x_hat).square() * w).sum(1)
        if best is None or best_err is None:
            best, best_err = step.squeeze(1), err
        else:
            better = err < best_err
            best = torch.where(better, step.squeeze(1), best)
            best_err = torch.where(better, err, best_err)
    assert best is not None
    return best.float()
