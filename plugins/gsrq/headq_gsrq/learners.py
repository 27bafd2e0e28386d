"""Codebook learners: gain-shape k-means (GSKM) and plain Euclidean k-means, weighted and batched.

Both solve ``B`` independent problems at once: samples ``x (B, n, d)`` with non-negative weights
``w (B, n)``, ``k`` codewords each, minimizing the weighted squared error
``sum_i w_i min_k |x_i - c_k|^2``. Every step uses the weights, and a seeded generator makes the
result deterministic.

GSKM (GSRQ, arXiv 2607.01065) writes each codeword as ``c_k = g_k s_k``, a unit shape times one
gain. Plain k-means averages the members of a cluster, and in high dimension that average
shrinks toward the origin (directions cancel); GSKM keeps the norm in the gain and the direction
in the shape. Shapes start from spherical k-means on the normalized samples, gains from the mean
member norm; then each pass assigns by ``argmin |x - g_k s_k|^2``, sets the shape to the normalized
weighted sum of its members and the gain to their weighted mean projection on it. Each of the
three steps is optimal with the others held, so the objective never increases. (Given an
assignment, ``g_k s_k`` is then the members' weighted mean, as in k-means: the two learners differ
in where they start, angular seeds with norm-preserving gains against k-means++ seeds, and so in
the optimum they reach.)

A codeword whose members carry no weight is dead: it takes the sample of largest weighted error
instead (which can only lower the objective at the next assignment).
"""

from __future__ import annotations

import attrs
import torch

_CHUNK = 1 << 18  # elements of one (B, rows, k) distance chunk
SEED_SAMPLES = 16  # k-means++ draws from a subsample of this many samples per codeword
INIT_SAMPLES = 64  # spherical k-means initializes GSKM on a subsample of this many per codeword
TOL = 1e-3  # stop when a pass lowers the objective by less than this fraction


@attrs.frozen
class Fitted:
    """A learned codebook per problem.

    codewords: (B, k, d) float32; assignment: (B, n) int64 of the last pass; objective: the
    weighted squared error summed over the batch after each assignment; gains (B, k) and unit
    shapes (B, k, d) for GSKM (None for plain k-means); reseeded: dead codewords re-seeded.
    """

    codewords: torch.Tensor
    assignment: torch.Tensor
    objective: list[float]
    shapes: torch.Tensor | None = None
    gains: torch.Tensor | None = None
    reseeded: int = 0


def assign(x: torch.Tensor, codewords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword of every sample: x (B, n, d), codewords (B, k, d) -> (B, n) ids, (B, n) sq. errors."""
    b, n, _ = x.shape
    k = codewords.shape[1]
    c_sq = codewords.square().sum(-1).unsqueeze(1)  # (B, 1, k)
    ids = torch.empty((b, n), dtype=torch.int64, device=x.device)
    err = torch.empty((b, n), dtype=x.dtype, device=x.device)
    step = max(1, _CHUNK // max(1, b * k))
    for start in range(0, n, step):
        part = x[:, start : start + step]
        score = torch.baddbmm(c_sq, part, codewords.transpose(1, 2), alpha=-2.0)  # |c|^2 - 2 x.c
        best, idx = score.min(dim=-1)
        ids[:, start : start + step] = idx
        err[:, start : start + step] = (best + part.square().sum(-1)).clamp_min(0.0)
    return ids, err


def cluster_sums(
    x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted member sums (B, k, d) and member weights (B, k) of an assignment ids (B, n)."""
    b, _, d = x.shape
    sums = x.new_zeros((b, k, d)).scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, d), x * w.unsqueeze(-1))
    mass = w.new_zeros((b, k)).scatter_add_(1, ids, w)
    return sums, mass


def subsample(
    x: torch.Tensor, w: torch.Tensor, m: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``m`` samples of x (B, n, d) and w (B, n), drawn uniformly without replacement."""
    if x.shape[1] <= m:
        return x, w
    keep = torch.randperm(x.shape[1], generator=generator, device=x.device)[:m]
    return x[:, keep], w[:, keep]


def kmeans_pp(x: torch.Tensor, w: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with weights: each next seed drawn with probability ∝ w·D². Returns (B, k, d).

    Seeds come from a subsample of ``SEED_SAMPLES * k`` samples (the sequential draws are the cost).
    """
    x, w = subsample(x, w, SEED_SAMPLES * k, generator)
    b, _, d = x.shape
    rows = torch.arange(b, device=x.device)
    seeds = x.new_empty((b, k, d))
    first = torch.multinomial(w + 1e-30, 1, generator=generator).squeeze(-1)
    seeds[:, 0] = x[rows, first]
    d2 = (x - seeds[:, :1]).square().sum(-1)
    for j in range(1, k):
        pick = torch.multinomial(w * d2 + 1e-30, 1, generator=generator).squeeze(-1)
        seeds[:, j] = x[rows, pick]
        d2 = torch.minimum(d2, (x - seeds[:, j : j + 1]).square().sum(-1))
    return seeds


def reseed(
    codewords: torch.Tensor, dead: torch.Tensor, x: torch.Tensor, w: torch.Tensor, err: torch.Tensor
) -> int:
    """Put each dead codeword (dead: (B, k) bool) on a non-zero sample of largest weighted error, in place."""
    counts = dead.sum(-1)
    most = int(counts.max())
    if most == 0:
        return 0
    score = w * err * (x.abs().amax(dim=-1) > 0)
    worst = score.topk(min(most, x.shape[1]), dim=-1).indices  # (B, most)
    for i in torch.nonzero(counts).flatten().tolist():
        slots = torch.nonzero(dead[i]).flatten()[: worst.shape[1]]
        codewords[i, slots] = x[i, worst[i, : slots.numel()]]
    return int(counts.sum())


def _prepare(x: torch.Tensor, weights: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 3:
        raise ValueError(f"samples must be (B, n, d), got shape {tuple(x.shape)}")
    if not 1 <= k:
        raise ValueError(f"need at least one codeword, got k={k}")
    x = x.float()
    w = torch.ones(x.shape[:2], device=x.device) if weights is None else weights.float().clamp_min(0.0)
    if w.shape != x.shape[:2]:
        raise ValueError(f"weights must be {tuple(x.shape[:2])}, got {tuple(w.shape)}")
    return x, w


def kmeans(
    x: torch.Tensor, k: int, *, weights: torch.Tensor | None = None, iters: int = 25, seed: int = 0
) -> Fitted:
    """Weighted Lloyd k-means from k-means++ seeds. x: (B, n, d); weights: (B, n) or None."""
    x, w = _prepare(x, weights, k)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    codewords = kmeans_pp(x, w, k, gen)
    objective: list[float] = []
    reseeded, previous = 0, None
    for _ in range(max(1, iters)):
        ids, err = assign(x, codewords)
        objective.append(float((w * err).sum()))
        if previous is not None and (torch.equal(ids, previous) or _settled(objective)):
            break
        previous = ids
        sums, mass = cluster_sums(x, w, ids, k)
        live = mass > 0
        codewords = torch.where(live.unsqueeze(-1), sums / mass.clamp_min(1e-30).unsqueeze(-1), codewords)
        reseeded += reseed(codewords, ~live, x, w, err)
    return Fitted(codewords, ids, objective, reseeded=reseeded)


def _settled(objective: list[float]) -> bool:
    return objective[-2] - objective[-1] <= TOL * abs(objective[-2])


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def spherical_kmeans(
    u: torch.Tensor, w: torch.Tensor, k: int, generator: torch.Generator, iters: int
) -> torch.Tensor:
    """Unit shapes (B, k, d) by k-means on unit vectors u (B, n, d) with renormalized centroids."""
    shapes = _unit(kmeans_pp(u, w, k, generator))
    for _ in range(iters):
        ids, err = assign(u, shapes)
        sums, mass = cluster_sums(u, w, ids, k)
        live = (mass > 0) & (sums.norm(dim=-1) > 0)
        shapes = torch.where(live.unsqueeze(-1), _unit(sums), shapes)
        reseed(shapes, ~live, u, w, err)
        shapes = _unit(shapes)
    return shapes


def gskm(
    x: torch.Tensor,
    k: int,
    *,
    weights: torch.Tensor | None = None,
    iters: int = 25,
    init_iters: int = 8,
    seed: int = 0,
) -> Fitted:
    """Weighted gain-shape k-means (see the module doc). x: (B, n, d); weights: (B, n) or None."""
    x, w = _prepare(x, weights, k)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    norms = x.norm(dim=-1)
    shapes = spherical_kmeans(*subsample(_unit(x), w, INIT_SAMPLES * k, gen), k, gen, init_iters)
    ids, _ = assign(_unit(x), shapes)
    _, mass = cluster_sums(x, w, ids, k)
    member_norm = w.new_zeros(mass.shape).scatter_add_(1, ids, w * norms) / mass.clamp_min(1e-30)
    fallback = (w * norms).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1e-30)
    gains = torch.where(mass > 0, member_norm, fallback.expand_as(member_norm)).clamp_min(1e-12)

    objective: list[float] = []
    reseeded, previous = 0, None
    for _ in range(max(1, iters)):
        ids, err = assign(x, gains.unsqueeze(-1) * shapes)
        objective.append(float((w * err).sum()))
        if previous is not None and (torch.equal(ids, previous) or _settled(objective)):
            break
        previous = ids
        sums, mass = cluster_sums(x, w, ids, k)
        length = sums.norm(dim=-1)  # shape = sums/|sums|; gain = s.sums / mass = |sums| / mass
        live = (mass > 0) & (length > 0)
        shapes = torch.where(live.unsqueeze(-1), _unit(sums), shapes)
        gains = torch.where(live, (length / mass.clamp_min(1e-30)).clamp_min(1e-12), gains)
        seeds = gains.unsqueeze(-1) * shapes
        count = reseed(seeds, ~live, x, w, err)
        if count:
            reseeded += count
            gains = seeds.norm(dim=-1).clamp_min(1e-12)
            shapes = torch.where((~live).unsqueeze(-1), _unit(seeds), shapes)
    return Fitted(gains.unsqueeze(-1) * shapes, ids, objective, shapes=shapes, gains=gains, reseeded=reseeded)
