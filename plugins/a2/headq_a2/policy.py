"""The A² value policy: each token's bit width from its squared attention and its value range.

With attention held fixed, the output error from value errors is about ``sum_j p_j^2 |dv_j|^2 / d``
(HeadQ, arXiv 2605.03562), so a token matters by its squared attention. The cache keeps, for each
token in the full-precision window, ``w_j = sum p_{t,j}^2`` over the queries that saw it there
(summed over the query heads of its KV group); when the token is encoded its width is chosen so
that ``sum_j w_j range_j^2 (2^b_j - 1)^-2`` is smallest at the requested bits (see
:mod:`headq_a2.allocation`). ``weight=abs`` uses accumulated attention ``sum p`` instead, the
H2O-style control; ``weight=none`` allocates by value range alone (least storage MSE).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from headq_a2.allocation import greedy, two_tiers
from headq_a2.block import MixedAffineBlock, from_rows, rung_offsets, split_code, to_rows
from headq_a2.config import A2Config, RowPlan, rungs, token_words
from headq_core import ValuePolicy
from headq_core.interfaces import AttentionStatistic
from headq_kernels import pack_codes, quantize_affine, unpack_codes

_STATISTIC: dict[str, AttentionStatistic | None] = {"sq": "sq_attention", "abs": "attention", "none": None}


class A2Values(ValuePolicy):
    """Per-token values at mixed widths chosen by ``w * range^2``; see the module docstring.

    Codes, scales and zeros are per-token KIVI's at each token's width; the block layout is
    :class:`~headq_a2.block.MixedAffineBlock`.
    """

    name = "a2"
    config_class = A2Config
    summary = "per-token int codes at widths chosen by sum p^2 x range^2, fp16 scale/min per group"
    wants_attention_stats: ClassVar[bool] = True
    config: A2Config

    @property
    def attention_statistic(self) -> AttentionStatistic | None:
        return _STATISTIC[self.config.weight]

    @property
    def block_tokens(self) -> int:
        return self.config.chunk

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        return self.config.nominal_bits(head_dim)

    def stores(self) -> str:
        widths = "/".join(map(str, self.config.widths))
        return (
            f"per-token codes at {widths} bits packed row by row ({self.config.chunk} tokens per "
            f"{self.config.scope}: every token's top {self.config.widths[0]} bits, then the wider "
            "tokens' lower bits), a packed width index per token, fp16 scale and minimum per group"
        )

    def encode(
        self, values: torch.Tensor, layer_idx: int, sq_attention: torch.Tensor | None = None
    ) -> MixedAffineBlock:
        """values: (batch, kv_heads, tokens, head_dim), tokens a multiple of ``chunk``;
        sq_attention: (batch, kv_heads, tokens), the running attention statistic (or None: every
        token weighs the same)."""
        cfg = self.config
        b, h, t, d = values.shape
        if t % cfg.chunk:
            raise ValueError(f"a2 encodes whole chunks of {cfg.chunk} tokens, was given {t}")
        group = min(cfg.group, d)
        plan = cfg.plan(d, h)
        rows = h if cfg.scope == "head" else 1
        quantized = [quantize_affine(values, bits, group) for bits in plan.widths]

        scores = to_rows(self._weights(sq_attention, values) * _squared_range(values, group), rows, cfg.chunk)
        if cfg.mode == "tiers":
            levels = two_tiers(scores, plan.hi_count)
        else:
            levels = greedy(scores, plan.widths, plan.row_words, d)

        codes = _pack_rows(levels, [to_rows(q[0], rows, cfg.chunk) for q in quantized], plan, d)
        token_levels = from_rows(levels, b, h, rows, cfg.chunk)  # (b, h, t)
        pick = token_levels.unsqueeze(-1).expand(-1, -1, -1, d // group).unsqueeze(0)
        scale = torch.stack([q[1] for q in quantized]).gather(0, pick).squeeze(0)
        zero = torch.stack([q[2] for q in quantized]).gather(0, pick).squeeze(0)
        index = None
        if plan.index_bits:
            packed = pack_codes(token_levels.reshape(b, h, t // cfg.chunk, cfg.chunk), plan.index_bits)
            index = packed.reshape(b, h, -1)
        return MixedAffineBlock(
            tokens=t,
            codes=codes.reshape(b, rows, -1),
            width_index=index,
            scale=scale,
            zero=zero,
            widths=plan.widths,
            group=group,
            chunk=cfg.chunk,
            row_words=plan.row_words,
            index_bits=plan.index_bits,
        )

    def _weights(self, statistic: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
        """(b, h, t) float32 token weights; a small floor lets range decide among unseen tokens."""
        if statistic is None or self.config.weight == "none":
            return torch.ones(values.shape[:-1], device=values.device)
        w = statistic.float().clamp_min(0)
        return w + 1e-6 * w.mean(dim=-1, keepdim=True) + torch.finfo(torch.float32).tiny


def _squared_range(values: torch.Tensor, group: int) -> torch.Tensor:
    """Sum over a token's channel groups of ``(max - min)^2``: (b, h, t, d) -> (b, h, t) float32."""
    grouped = values.float().reshape(*values.shape[:-1], -1, group)
    return (grouped.amax(dim=-1) - grouped.amin(dim=-1)).square().sum(dim=-1)


def _pack_rows(levels: torch.Tensor, codes: list[torch.Tensor], plan: RowPlan, head_dim: int) -> torch.Tensor:
    """Each row's bases, then its wider tokens' rungs, then zeros (see :mod:`headq_a2.block`).

    levels: (R, n) indices into ``plan.widths``; codes[i]: (R, n, words at width i) int32.
    Returns (R, row_words) int32. Device work only (no host sync): every rung scatters all tokens,
    those narrower than it into one spare word past the rows.
    """
    rows, n = levels.shape
    lo, ladder = plan.widths[0], rungs(plan.widths)
    widths = torch.zeros_like(levels)
    code = torch.zeros((rows, n, head_dim), dtype=torch.uint8, device=levels.device)
    for level, bits in enumerate(plan.widths):
        at = levels == level
        widths += bits * at
        code = torch.where(at.unsqueeze(-1), unpack_codes(codes[level], bits, head_dim), code)
    if not levels.is_cuda:  # the plan's row size rules this out; checked where it costs no sync
        used = torch.tensor(token_words(head_dim, plan.widths))[levels].sum(dim=-1)
        if bool((used > plan.row_words).any()):
            raise RuntimeError(f"an allocation row needs {int(used.max())} words, more than {plan.row_words}")
    spare = rows * plan.row_words
    stream = torch.zeros(spare + 1, dtype=torch.int32, device=levels.device)
    width = widths.unsqueeze(-1)
    bases = pack_codes(split_code(code, width, lo), lo).reshape(rows, -1)
    stream[:spare].view(rows, plan.row_words)[:, : bases.shape[-1]] = bases
    at = torch.arange(rows, device=levels.device).unsqueeze(-1) * plan.row_words
    at = at + rung_offsets(widths, plan.widths, head_dim)  # (R, n)
    for rung in ladder:
        words = pack_codes(split_code(code, width, lo, rung), rung // 2)
        span = torch.arange(words.shape[-1], device=levels.device)
        where = torch.where(width >= rung, at.unsqueeze(-1) + span, spare)
        stream.scatter_(0, where.reshape(-1), words.reshape(-1))
        at = at + span.numel()
    return stream[:spare].view(rows, plan.row_words)
