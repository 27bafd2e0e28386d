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
  ``M = A^-1 V V^T A``: ``U`` an orthonormal basis of ``span(A^-1 V)`` and ``W`` its dual in the
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


def random_basis(heads: int, dim: int, rank: int, seed: int) -> torch.Tensor:
    """A seeded orthonormal (heads, dim, rank) basis."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(heads, dim, rank, generator=gen, dtype=torch.float64))
    return q


def joint_basis(query_moment: torch.Tensor, residual_moment: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal decode basis ``U`` (h, d, r) spanning the logit-error-optimal rank-r correction.

    query_moment ``S`` and residual_moment ``R``: (h, d, d). The dual encode basis follows from
    ``U`` and ``S`` by :func:`dual_basis`.
    """
    s = query_moment.double()
    values, vectors = torch.linalg.eigh(s)
    floor = values.amax(dim=-1, keepdim=True) * 1e-8  # a query direction never seen is not inverted
    values = values.clamp_min(floor)
    sqrt = vectors @ torch.diag_embed(values.sqrt()) @ vectors.transpose(-1, -2)
    inv_sqrt = vectors @ torch.diag_embed(values.rsqrt()) @ vectors.transpose(-1, -2)
    whitened = sqrt @ residual_moment.double() @ sqrt
    q, _ = torch.linalg.qr(inv_sqrt @ top_eigenvectors(whitened, rank))
    return q  # an orthonormal basis of the optimal span: float16-safe and well conditioned


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
