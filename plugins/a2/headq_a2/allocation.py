"""Choosing per-token bit widths that minimize ``sum_j s_j (2^b_j - 1)^-2`` in each allocation row.

``s_j = w_j * range_j^2`` is a token's score: its attention weight times its squared value range
(summed over its channel groups). The error of min-max affine codes of ``b`` bits is proportional
to ``range^2 (2^b - 1)^-2``, so the score times that factor is the token's expected share of the
attention-output error. Both allocators work on many rows at once: ``scores`` is ``(rows, tokens)``
and the result holds the index of each token's width in ``widths`` (narrowest first).
"""

from __future__ import annotations

import torch

from headq_a2.config import token_words


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

    Every token starts at the narrowest width; steps up to the next width are taken in order of
    weighted error removed per word spent, each one that the row can still afford. For a token with
    a positive score the gain per word falls at every step ((2^b - 1)^-2 is convex in the words
    spent), so the order of all steps already respects each token's own order: the steps before the
    first one the budget cannot cover are a prefix of the sorted steps, and a short loop spends
    what is left on the best steps that still fit.

    scores: (rows, tokens) float, > 0; widths: narrowest first. Returns (rows, tokens) int64
    indices into ``widths``, with at most ``row_words`` words of codes per row.
    """
    rows, tokens = scores.shape
    device = scores.device
    levels = torch.zeros((rows, tokens), dtype=torch.int64, device=device)
    top = len(widths) - 1
    words = torch.tensor(token_words(head_dim, widths), device=device)
    left = torch.full((rows,), row_words - tokens * int(words[0]), device=device)
    if top == 0:
        return levels
    errors = torch.tensor([level_error(b) for b in widths], dtype=torch.float64, device=device)
    step_cost = words[1:] - words[:-1]  # (top,) words to go from level l to l + 1
    step_gain = (errors[:-1] - errors[1:]) / step_cost
    # every step of every token, best first: (rows, tokens * top)
    gain = (scores.double().unsqueeze(-1) * step_gain).reshape(rows, -1)
    order = gain.argsort(dim=-1, descending=True, stable=True)
    cost = step_cost.repeat(tokens)[order]
    taken = cost.cumsum(dim=-1) <= left.unsqueeze(-1)  # the prefix before the first step that does not fit
    levels.scatter_add_(-1, order // top, taken.long())
    left -= (cost * taken).sum(dim=-1)
    return _fill(scores.double(), levels, left, step_cost, step_gain)


def _fill(
    weights: torch.Tensor,
    levels: torch.Tensor,
    left: torch.Tensor,
    step_cost: torch.Tensor,
    step_gain: torch.Tensor,
) -> torch.Tensor:
    """Spend each row's ``left`` words one best affordable step at a time (levels: in place)."""
    top = step_cost.shape[0]
    step_cost = torch.cat([step_cost, step_cost.new_zeros(1)])
    step_gain = torch.cat([step_gain, step_gain.new_zeros(1)])
    active = torch.arange(levels.shape[0], device=levels.device)
    while active.numel():
        lv = levels[active]
        cost = step_cost[lv]
        gain = (weights[active] * step_gain[lv]).masked_fill((lv == top) | (cost > left[active, None]), -1.0)
        best, pick = gain.max(dim=-1)  # the first of equal gains: deterministic
        go = best >= 0
        active, pick = active[go], pick[go]
        if active.numel():
            left[active] -= step_cost[levels[active, pick]]
            levels[active, pick] += 1
    return levels
