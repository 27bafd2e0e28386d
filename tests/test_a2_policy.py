"""The A² value policy on its own: uniform allocation is KIVI bit for bit, the widest codes go to
the highest ``w * range^2``, each width keeps its SNR, and specs are validated."""

from __future__ import annotations

import pytest
import torch

from headq_core import SpecError, get_registry
from headq_core.layouts import AffineBlock
from headq_core.testing import outlier_data, snr_db, snr_floor_db

a2 = pytest.importorskip("headq_a2")
from headq_a2.allocation import greedy, level_error, two_tiers  # noqa: E402
from headq_a2.block import MixedAffineBlock, from_rows, to_rows  # noqa: E402
from headq_a2.config import rungs, token_words, words_per_token  # noqa: E402

from headq_kernels import pack_codes, quantize_affine, unpack_codes  # noqa: E402

SHAPE = (2, 3, 128, 64)  # (batch, kv_heads, tokens, head_dim)


def _policy(spec: str) -> object:
    return get_registry().value_policy(spec)


def _encode(spec: str, values: torch.Tensor, stats: torch.Tensor | None) -> MixedAffineBlock:
    block = _policy(spec).encode(values, 0, stats)  # type: ignore[attr-defined]
    assert isinstance(block, MixedAffineBlock)
    return block


def _stats(shape: tuple[int, ...], seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape[:-1], generator=gen).pow(4)  # heavy-tailed, like real sum p^2


def _scores(values: torch.Tensor, stats: torch.Tensor, group: int = 32) -> torch.Tensor:
    grouped = values.float().reshape(*values.shape[:-1], -1, group)
    return stats * (grouped.amax(-1) - grouped.amin(-1)).square().sum(-1)


@pytest.mark.parametrize(
    ("spec", "kivi"),
    [
        ("a2:frac=0", "kivi:bits=2"),
        ("a2:bits=2,hi=2,frac=0.3", "kivi:bits=2"),
        ("a2:bits=4,hi=4", "kivi:bits=4"),
        ("a2:bits=1,hi=1,frac=0", "kivi:bits=1"),
        ("a2:mode=greedy,bits=2,hi=2,avg=2", "kivi:bits=2"),
        ("a2:frac=0,group=16", "kivi:bits=2,group=16"),
        ("a2:frac=0,scope=layer", "kivi:bits=2"),
    ],
)
def test_uniform_allocation_stores_what_kivi_stores(spec: str, kivi: str) -> None:
    values = outlier_data(SHAPE, seed=1, dtype=torch.float16)
    block = _encode(spec, values, _stats(SHAPE))
    ref = get_registry().value_policy(kivi).encode(values, 0)
    assert isinstance(ref, AffineBlock)
    b, h, t, _ = SHAPE
    rows = block.codes.shape[1]
    # the row stream is the tokens' KIVI words one after the other (head by head for scope=layer)
    stream = block.codes.reshape(b * rows * (t // block.chunk), -1)
    codes = from_rows(stream.reshape(stream.shape[0], -1, ref.codes.shape[-1]), b, h, rows, block.chunk)
    assert block.width_index is None
    assert torch.equal(codes, ref.codes)
    assert torch.equal(block.scale, ref.scale) and torch.equal(block.zero, ref.zero)
    assert torch.equal(block.dequantize(), ref.dequantize())


@pytest.mark.parametrize(
    "spec", ["a2", "a2:bits=2,hi=8,frac=0.25", "a2:mode=greedy,avg=3,bits=1,hi=8", "a2:chunk=64,scope=layer"]
)
def test_rows_hold_every_base_then_the_wider_tokens_rungs(spec: str) -> None:
    """Each token's code is the quantizer's own at its width; a row starts with every token's top
    bits at fixed places, then each wider token's lower bits rung by rung, then zeros."""
    values = outlier_data(SHAPE, seed=9, dtype=torch.float16)
    block = _encode(spec, values, _stats(SHAPE))
    d = SHAPE[-1]
    codes, widths = block.integer_codes(), block.token_widths()
    assert len(block.widths) > 1 and set(widths.unique().tolist()) == set(block.widths)
    for bits in block.widths:
        own = unpack_codes(quantize_affine(values, bits, block.group)[0], bits, d)
        assert torch.equal(codes[widths == bits], own[widths == bits])
    rows = block.codes.shape[1]
    lo, row_codes = block.widths[0], to_rows(codes.long(), rows, block.chunk)  # (R, n, d)
    row_widths = to_rows(widths, rows, block.chunk)
    stream = block.codes.reshape(row_codes.shape[0], block.row_words)
    n = row_codes.shape[1]
    at = n * words_per_token(d, lo)
    assert torch.equal(
        stream[:, :at], pack_codes(row_codes >> (row_widths - lo).unsqueeze(-1), lo).reshape(-1, at)
    )
    for r in range(row_codes.shape[0]):
        pos = at
        for j in range(n):
            width = int(row_widths[r, j])
            for rung in (x for x in rungs(block.widths) if x <= width):
                step = rung // 2
                words = stream[r, pos : pos + words_per_token(d, step)]
                expected = pack_codes((row_codes[r, j] >> (width - rung)) & ((1 << step) - 1), step)
                assert torch.equal(words, expected), (r, j, rung)
                pos += words.numel()
        assert (stream[r, pos:] == 0).all()
        used = sum(token_words(d, block.widths)[block.widths.index(int(w))] for w in row_widths[r])
        assert pos == used <= block.row_words


@pytest.mark.parametrize("d", [64, 80, 96, 128])
@pytest.mark.parametrize("widths", [(2, 4), (2, 8), (1, 4), (4, 8), (1, 2, 4, 8), (2,)])
def test_rungs_add_up_to_each_width(widths: tuple[int, ...], d: int) -> None:
    """Each rung doubles the width, so the rungs up to a width add its bits above the base; a token's
    words are at least its codes' words packed in one run, and the same where every part fills
    whole words."""
    ladder = rungs(widths)
    assert all(r == 2 * lower for r, lower in zip(ladder, (widths[0], *ladder), strict=False))
    whole = all(d * b % 32 == 0 for b in (widths[0], *(r // 2 for r in ladder)))
    for w, words in zip(widths, token_words(d, widths), strict=True):
        assert widths[0] + sum(r // 2 for r in ladder if r <= w) == w
        assert words >= words_per_token(d, w)
        assert words == words_per_token(d, w) or not whole


def test_tiers_give_the_top_scores_the_high_width() -> None:
    values = outlier_data(SHAPE, seed=2)
    stats = _stats(SHAPE)
    block = _encode("a2:bits=2,hi=8,frac=0.25", values, stats)
    widths = to_rows(block.token_widths(), SHAPE[1], 32)
    scores = to_rows(_scores(values, stats), SHAPE[1], 32)
    top = scores.topk(8, dim=-1).indices
    assert (widths.gather(-1, top) == 8).all()
    assert ((widths == 8).sum(-1) == 8).all() and ((widths == 2).sum(-1) == 24).all()


@pytest.mark.parametrize("scope", ["head", "layer"])
def test_greedy_widths_follow_the_scores(scope: str) -> None:
    values = outlier_data(SHAPE, seed=3)
    stats = _stats(SHAPE)
    block = _encode(f"a2:mode=greedy,avg=2.5,bits=1,hi=8,scope={scope}", values, stats)
    rows = SHAPE[1] if scope == "head" else 1
    widths = to_rows(block.token_widths(), rows, 32).float()
    scores = to_rows(_scores(values, stats), rows, 32)
    # within a row, a higher score never gets a narrower code
    higher = scores.unsqueeze(-1) > scores.unsqueeze(-2)
    narrower = widths.unsqueeze(-1) < widths.unsqueeze(-2)
    assert not (higher & narrower).any()
    assert set(widths.unique().tolist()) >= {1.0, 2.0, 4.0}
    top = scores.argmax(dim=-1, keepdim=True)
    assert torch.equal(widths.gather(-1, top).squeeze(-1), widths.amax(dim=-1))


def test_greedy_spends_its_budget() -> None:
    gen = torch.Generator().manual_seed(4)
    scores = torch.rand(50, 32, generator=gen).pow(6)
    widths, d = (1, 2, 4, 8), 64
    budget = 79 * 2  # words: 2.47 bits per element over 32 tokens of 64 channels
    levels = greedy(scores, widths, budget, d)
    words = torch.tensor([words_per_token(d, b) for b in widths])[levels].sum(-1)
    assert (words <= budget).all()
    assert (budget - words < 2).all()  # a 1->2 step costs 2 words; nothing affordable is left
    # no single move of a step from one token to another lowers the weighted error
    err = torch.tensor([level_error(b) for b in widths], dtype=torch.float64)
    total = (scores.double() * err[levels]).sum(-1)
    flat = (scores.double() * err[levels.clamp(max=0)]).sum(-1)
    assert (total < flat).all()


def test_two_tiers_handles_ties_deterministically() -> None:
    scores = torch.zeros(4, 32)
    a, b = two_tiers(scores, 3), two_tiers(scores, 3)
    assert torch.equal(a, b) and (a.sum(-1) == 3).all()


def test_every_width_keeps_its_snr() -> None:
    values = outlier_data((2, 2, 256, 64), seed=5)
    stats = _stats(values.shape)
    block = _encode("a2:mode=greedy,avg=3,bits=1,hi=8", values, stats)
    decoded = block.dequantize()
    widths = block.token_widths()
    previous = -float("inf")
    for bits in (1, 2, 4, 8):
        chosen = widths == bits
        assert chosen.any(), f"no token got {bits} bits"
        snr = snr_db(values[chosen], decoded[chosen])
        assert snr >= snr_floor_db(bits), f"{bits}-bit tokens: {snr:.1f} dB"
        assert snr > previous
        previous = snr


def test_readout_is_p_times_decoded_values() -> None:
    values = outlier_data(SHAPE, seed=6)
    policy = _policy("a2:mode=greedy,avg=2.5,bits=1,hi=8")
    block = policy.encode(values, 0, _stats(SHAPE))  # type: ignore[attr-defined]
    probs = torch.softmax(torch.randn(2, 3, 5, SHAPE[2]), dim=-1)
    got = policy.readout(probs, block, 0)  # type: ignore[attr-defined]
    assert torch.allclose(got, probs @ block.dequantize(), atol=1e-6)
    assert snr_db(probs @ values, got) > snr_floor_db(2.5)


def test_no_statistic_allocates_by_range() -> None:
    values = outlier_data(SHAPE, seed=8)
    with_none = _encode("a2:weight=none", values, _stats(SHAPE))
    without = _encode("a2", values, None)
    assert torch.equal(with_none.token_widths(), without.token_widths())
    ranges = to_rows(_scores(values, torch.ones(SHAPE[:-1])), SHAPE[1], 32)
    widths = to_rows(without.token_widths(), SHAPE[1], 32)
    assert (widths.gather(-1, ranges.topk(3, dim=-1).indices) == 4).all()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("a2:avg=3", "avg applies to mode=greedy"),
        ("a2:mode=greedy,avg=2.5,frac=0.2", "frac applies to mode=tiers"),
        ("a2:mode=greedy", "needs avg"),
        ("a2:bits=4,hi=2", "narrower"),
        ("a2:mode=greedy,bits=2,hi=8,avg=9", "between"),
        ("a2:bits=3", "bits"),
        ("a2:frac=1.5", "frac"),
        ("a2:weight=p3", "weight"),
        ("a2:bits=2,hi=8,frac=0.05", "multiple of 1/32"),
    ],
)
def test_bad_specs_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _policy(spec)


def test_greedy_budget_below_the_narrowest_width_is_refused() -> None:
    policy = _policy("a2:mode=greedy,bits=2,hi=8,avg=2")
    with pytest.raises(ValueError, match="raise avg"):
        policy.encode(outlier_data(SHAPE), 0, None)  # type: ignore[attr-defined]


def test_statistic_follows_the_weight() -> None:
    assert _policy("a2").attention_statistic == "sq_attention"  # type: ignore[attr-defined]
    assert _policy("a2:weight=abs").attention_statistic == "attention"  # type: ignore[attr-defined]
    assert _policy("a2:weight=none").attention_statistic is None  # type: ignore[attr-defined]
    assert _policy("a2").block_tokens == 32 and _policy("a2:chunk=16").block_tokens == 16  # type: ignore[attr-defined]
