"""Lookup-table decode on the reference path: logits and readout without decoding any token.

Keys: once per step, a table ``LUT[p, m, k] = q_p . C_m[p, k]`` per query row (``P * sum K_m``
dot products of ``dim`` channels), then each token's logit is the sum of its ``P x M`` table
entries, a gather-add. Values: attention is added into a per-codeword histogram
``H[p, m, k] = sum_t p_t [idx_t[p, m] = k]`` (a scatter-add over indices), then one product with
each codebook gives the output. Both equal dequantize-then-attend up to float rounding. A channel
scale ``s`` moves to the query (``q / s``, once per step) and to the output (``o / s``).
"""

from __future__ import annotations

import torch

from headq_gsrq.block import CodebookBlock

_CHUNK = 1 << 22  # elements of one (b, h, rows, tokens * P) gather


def _row_chunks(rows: int, per_row: int, lead: int) -> list[slice]:
    step = max(1, _CHUNK // max(1, per_row * lead))
    return [slice(start, start + step) for start in range(0, rows, step)]


def _global_ids(codes: torch.Tensor, m: int, size: int) -> torch.Tensor:
    """Stage ``m`` indices as offsets into a (P * size) table: (b, h, T, P) -> (b, h, 1, T * P)."""
    offsets = torch.arange(codes.shape[-2], device=codes.device) * size
    return (codes[..., m] + offsets).flatten(-2).unsqueeze(2)


def lut_logits(query: torch.Tensor, block: CodebookBlock) -> torch.Tensor:
    """Raw dot products q . k_hat. query: (b, h, rows, d) float32 -> (b, h, rows, tokens)."""
    b, h, rows, _ = query.shape
    codes = block.codes()  # (b, h, T, P, M)
    t, positions = codes.shape[2], codes.shape[3]
    books = block.books.on(query.device)
    scale = block.books.channel_scale(query.device)
    q = (query if scale is None else query / scale).unflatten(-1, (positions, -1))  # (b, h, rows, P, dim)
    out = query.new_zeros((b, h, rows, t))
    for m, book in enumerate(books):
        size = book.shape[1]
        table = torch.einsum("bhrpc,pkc->bhrpk", q, book).flatten(-2)  # (b, h, rows, P * K_m)
        ids = _global_ids(codes, m, size)
        for part in _row_chunks(rows, t * positions, b * h):
            span = table[:, :, part]
            picked = span.gather(-1, ids.expand(-1, -1, span.shape[2], -1))
            out[:, :, part] += picked.unflatten(-1, (t, positions)).sum(-1)
    return out


def lut_readout(probs: torch.Tensor, block: CodebookBlock) -> torch.Tensor:
    """Attention-weighted sum of the stored values. probs: (b, h, rows, tokens) -> (b, h, rows, d)."""
    b, h, rows, t = probs.shape
    codes = block.codes()
    positions = codes.shape[3]
    books = block.books.on(probs.device)
    probs = probs.float()
    out = probs.new_zeros((b, h, rows, positions, books[0].shape[-1]))
    for m, book in enumerate(books):
        size = book.shape[1]
        ids = _global_ids(codes, m, size)
        for part in _row_chunks(rows, t * positions, b * h):
            weights = probs[:, :, part]
            n = weights.shape[2]
            hist = weights.new_zeros((b, h, n, positions * size))
            source = weights.unsqueeze(-1).expand(-1, -1, -1, -1, positions).flatten(-2)
            hist.scatter_add_(-1, ids.expand(-1, -1, n, -1), source)
            out[:, :, part] += torch.einsum("bhrpk,pkc->bhrpc", hist.unflatten(-1, (positions, size)), book)
    scale = block.books.channel_scale(probs.device)
    return out.flatten(-2) if scale is None else out.flatten(-2) / scale
