"""Choosing per-token bit widths that minimize ``sum_j s_j (2^b_j - 1)^-2`` in each allocation row.

``s_j = w_j * range_j^2`` is a token's score: its attention weight times its squared value range
(summed over its channel groups). The error of min-max affine codes of ``b`` bits is proportional
to ``range^2 (2^b - 1)^-2``, so the score times that factor is the token's expected share of the
attention-output error. Both allocators work on many rows at once: ``scores`` is ``(rows, tokens)``
and the result holds the index of each token's width in ``widths`` (narrowest first).
"""

from __future__ import annotations

import torch

from headq_a2.config import words_per_token


def level_error(bits: int) -> float:
    """Relative squared error of ``bits``-bit min-max codes: ``(2^bits - 1)^-2``."""
    return float((1 << bits) - 1) ** -2


def two_tiers(scores: torch.Tensor, hi_count: int) -> torch.Tensor:
    """The ``hi_count`` highest-scoring tokens of each row at the wider width (index 1).

    scores: (rows, tokens) float. Returns (rows, tokens) int64 width indices in {0, 1}.
    """
    levels = torch.zeros(scores.shape, dtype=torch.int64, device=scores.device)
    if hi_count > 0:
        top = scores.topk(hi_count, dim=-1, sorted=False).indices
        levels.scatter_(-1, top, 1)
    return levels


def greedy(scores: torch.Tensor, widths: tuple[int, ...], row_words: int, head_dim: int) -> torch.Tensor:
    """Greedy marginal-gain allocation at a budget of ``row_words`` code words per row.

    Every token starts at the narrowest width; each round, every row widens the one token whose next
    width removes the most weighted error per word spent, among the steps it can still afford,
    until no step fits. The error falls by less per word at each step up ((2^b-1)^-2 is convex in
    the words spent), so this is the classic greedy for separable convex allocation.

    scores: (rows, tokens) float, >= 0; widths: narrowest first. Returns (rows, tokens) int64
    indices into ``widths``, with at most ``row_words`` words of codes per row.
    """
    rows, tokens = scores.shape
    words = torch.tensor([words_per_token(head_dim, b) for b in widths], device=scores.device)
    errors = torch.tensor([level_error(b) for b in widths], dtype=torch.float64, device=scores.device)
    top = len(widths) - 1
    step_cost = torch.cat([words[1:] - words[:-1], words.new_tensor([0])])  # cost to leave level l
    step_gain = torch.cat([(errors[:-1] - errors[1:]), errors.new_tensor([0.0])]) / step_cost.clamp_min(1)
    levels = torch.zeros((rows, tokens), dtype=torch.int64, device=scores.device)
    left = torch.full((rows,), row_words - tokens * int(words[0]), device=scores.device)
    if top == 0:
        return levels
    weights = scores.double()
    active = torch.arange(rows, device=scores.device)
    while active.numel():
        lv = levels[active]
        cost = step_cost[lv]
        gain = weights[active] * step_gain[lv]
        gain = gain.masked_fill((lv == top) | (cost > left[active, None]), -1.0)
        best, pick = gain.max(dim=-1)  # the first of equal gains: deterministic
        go = best >= 0
        active, pick = active[go], pick[go]
        if not active.numel():
            break
        left[active] -= step_cost[levels[active, pick]]
        levels[active, pick] += 1
    return levels
