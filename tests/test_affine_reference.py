"""The torch reference of the affine layout: packing is bit-exact and documented, quantization
uses the whole code range, reconstructs constant groups exactly and errs by at most half a step."""

from __future__ import annotations

import pytest
import torch

from headq_kernels import (
    SUPPORTED_BITS,
    bytes_along_tokens,
    codes_per_word,
    dequantize_affine,
    pack_codes,
    quantize_affine,
    unpack_codes,
    words_along_tokens,
)

BITS = list(SUPPORTED_BITS)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_codes(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1 << bits, shape, generator=_gen(seed), dtype=torch.int64)


# --- packing --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 64, 100])
def test_pack_unpack_round_trip(bits: int, n: int) -> None:
    codes = _random_codes((3, 2, n), bits, seed=n)
    words = pack_codes(codes, bits)
    per_word = 32 // bits
    assert words.dtype == torch.int32
    assert words.shape == (3, 2, -(-n // per_word))
    assert torch.equal(unpack_codes(words, bits, n).long(), codes)
    lanes = unpack_codes(words, bits)
    assert lanes.dtype == torch.uint8 and lanes.shape[-1] == words.shape[-1] * per_word
    assert not lanes[..., n:].any()  # the last word is zero-filled


@pytest.mark.parametrize("bits", BITS)
def test_packed_layout_puts_the_first_code_in_the_lowest_bits(bits: int) -> None:
    per_word = 32 // bits
    codes = _random_codes((5, 2 * per_word), bits, seed=bits)
    words = pack_codes(codes, bits)
    for row in range(codes.shape[0]):
        for w in range(2):
            value = sum(
                int(c) << (bits * i) for i, c in enumerate(codes[row, w * per_word : (w + 1) * per_word])
            )
            signed = value - (1 << 32) if value >= 1 << 31 else value  # int32 two's complement
            assert int(words[row, w]) == signed


@pytest.mark.parametrize("bits", BITS)
def test_the_top_lane_survives_the_sign_bit(bits: int) -> None:
    per_word = 32 // bits
    top = (1 << bits) - 1
    codes = torch.full((per_word,), top)
    words = pack_codes(codes, bits)
    assert int(words[0]) == -1  # every bit set
    assert torch.equal(unpack_codes(words, bits, per_word).long(), codes)
    only_top = torch.zeros(per_word, dtype=torch.long)
    only_top[-1] = top
    assert torch.equal(unpack_codes(pack_codes(only_top, bits), bits, per_word).long(), only_top)


@pytest.mark.parametrize("bits", BITS)
def test_key_bytes_hold_consecutive_tokens_of_one_channel_with_channels_adjacent(bits: int) -> None:
    """Byte j of channel c is at [..., j, c] and holds tokens j * 8 / bits onwards, first lowest."""
    tokens, d = 64, 24
    codes = _random_codes((2, 3, tokens, d), bits, seed=bits)
    data = bytes_along_tokens(pack_codes(codes.transpose(-1, -2), bits))
    per_byte = 8 // bits
    assert data.dtype == torch.uint8 and data.shape == (2, 3, tokens // per_byte, d) and data.is_contiguous()
    lanes = [(data.long() >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)]
    assert torch.equal(torch.stack(lanes, dim=-2).reshape(2, 3, tokens, d), codes)
    assert torch.equal(unpack_codes(words_along_tokens(data), bits, tokens).long(), codes.transpose(-1, -2))


def test_key_bytes_must_be_whole_words() -> None:
    with pytest.raises(ValueError, match="whole words"):
        words_along_tokens(torch.zeros(1, 6, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="whole words"):
        words_along_tokens(torch.zeros(1, 8, 8, dtype=torch.int32))


def test_codes_per_word_rejects_unsupported_widths() -> None:
    assert [codes_per_word(b) for b in BITS] == [32, 16, 8, 4]
    for bits in (0, 3, 5, 16):
        with pytest.raises(ValueError, match="bits must be one of"):
            codes_per_word(bits)


# --- quantization ---------------------------------------------------------------------------


def _data(seed: int, shape: tuple[int, ...] = (2, 3, 4, 64), scale: float = 1.0) -> torch.Tensor:
    g = _gen(seed)
    x = torch.randn(shape, generator=g) * scale
    return x + 3 * scale * torch.randn(*shape[:-1], 1, generator=g)  # groups far from zero too


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [8, 32, 64])
@pytest.mark.parametrize("scale", [0.01, 1.0, 300.0])
def test_quantize_error_is_at_most_half_a_step(bits: int, group: int, scale: float) -> None:
    x = _data(bits * group, scale=scale)
    codes, step, zero = quantize_affine(x, bits, group)
    assert step.dtype == zero.dtype == torch.float16
    assert step.shape == zero.shape == (*x.shape[:-1], x.shape[-1] // group)
    assert codes.shape == (*x.shape[:-1], x.shape[-1] * bits // 32)
    x_hat = dequantize_affine(codes, step, zero, bits, group)
    assert x_hat.dtype == torch.float32 and x_hat.shape == x.shape

    levels = (1 << bits) - 1
    grouped = x.reshape(*x.shape[:-1], -1, group)
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    s, z = step.float(), zero.float()
    # half a step, plus what rounding the step and minimum to float16 can add at the range ends
    bound = s / 2 + (lo - z).abs() + levels * ((hi - lo) / levels - s).abs() + 1e-6 * hi.abs().clamp(min=1)
    err = (x_hat - x).abs().reshape(grouped.shape)
    assert (err <= bound.unsqueeze(-1)).all()
    # and the bound is tight: a uniform quantizer's mean error is about a quarter step
    assert err.mean() <= (s / 2).mean()
    assert err.mean() >= (s / 8).mean()


@pytest.mark.parametrize("bits", BITS)
def test_codes_span_the_range(bits: int) -> None:
    x = _data(bits, scale=2.0)
    group = 16
    codes, _, _ = quantize_affine(x, bits, group)
    c = unpack_codes(codes, bits, x.shape[-1]).long().reshape(*x.shape[:-1], -1, group)
    levels = (1 << bits) - 1
    assert (c.amin(-1) == 0).all()  # the group minimum takes code 0
    assert (c.amax(-1) >= levels - 1).all()  # the maximum the top code (or one below, after fp16 rounding)
    grouped = x.reshape(c.shape)
    assert torch.equal(c.gather(-1, grouped.argmin(-1, keepdim=True)), torch.zeros_like(c[..., :1]))


@pytest.mark.parametrize("bits", BITS)
def test_codes_are_monotonic_in_the_input(bits: int) -> None:
    x = _data(7 + bits, shape=(4, 128)).sort(dim=-1).values
    codes, _, _ = quantize_affine(x, bits, 32)
    c = unpack_codes(codes, bits, 128).long().reshape(4, 4, 32)
    assert (c.diff(dim=-1) >= 0).all()


@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_reconstruct_exactly(bits: int) -> None:
    x = _data(3, shape=(3, 64))
    constants = torch.tensor([0.0, -2.5, 1234.0, 3.140625]).to(torch.float16).float()  # fp16-exact
    for i, c in enumerate(constants):
        x[i % 3, 16 * i : 16 * (i + 1)] = c
    codes, step, zero = quantize_affine(x, bits, 16)
    x_hat = dequantize_affine(codes, step, zero, bits, 16)
    for i, c in enumerate(constants):
        group = slice(16 * i, 16 * (i + 1))
        assert step[i % 3, i] == 0
        assert not unpack_codes(codes, bits, 64)[i % 3, group].any()
        assert torch.equal(x_hat[i % 3, group], torch.full((16,), float(c)))
    assert (step > 0).sum() == step.numel() - len(constants)


@pytest.mark.parametrize("bits", BITS)
def test_requantizing_the_reconstruction_is_bit_exact(bits: int) -> None:
    x = _data(11 * bits, scale=5.0)
    first = quantize_affine(x, bits, 32)
    x_hat = dequantize_affine(*first, bits, 32)
    second = quantize_affine(x_hat, bits, 32)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_input_dtype_does_not_change_the_codes() -> None:
    x = _data(5).to(torch.float16)
    for got, want in zip(quantize_affine(x, 4, 32), quantize_affine(x.float(), 4, 32), strict=True):
        assert torch.equal(got, want)
    codes, step, zero = quantize_affine(x, 4, 32)
    assert dequantize_affine(codes, step, zero, 4, 32, torch.float64).dtype == torch.float64


def test_more_bits_less_error() -> None:
    x = _data(9)
    errors = [(dequantize_affine(*quantize_affine(x, b, 32), b, 32) - x).square().mean().item() for b in BITS]
    assert errors == sorted(errors, reverse=True)
    # each doubling of the bits multiplies the levels; 4 -> 8 bits cuts the error by over 100x
    assert errors[2] / errors[3] > 100


@pytest.mark.parametrize(("n", "group"), [(64, 0), (64, -8), (60, 16), (64, 48)])
def test_groups_must_tile_the_axis(n: int, group: int) -> None:
    with pytest.raises(ValueError, match="whole number of groups"):
        quantize_affine(torch.randn(2, n), 4, group)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [32, 96, 37])
def test_bit_planes_pack_any_width_and_round_trip(bits: int, n: int) -> None:
    """3, 5, 6 and 7 bits as planes of packable widths: exact round trip, n * bits / 32 words."""
    from headq_kernels import pack_planes, plane_widths, unpack_planes

    codes = torch.randint(0, 1 << bits, (2, 3, n), generator=torch.Generator().manual_seed(bits))
    words = pack_planes(codes, bits)
    assert words.dtype == torch.int32
    assert sum(plane_widths(bits)) == bits
    if n % 32 == 0:
        assert words.shape[-1] == n * bits // 32
    assert torch.equal(unpack_planes(words, bits, n).long(), codes)
    if bits in SUPPORTED_BITS:  # one plane: exactly pack_codes
        assert torch.equal(words, pack_codes(codes, bits))
    with pytest.raises(ValueError, match="do not hold"):
        unpack_planes(words[..., :-1], bits, n)


def test_three_bit_planes_are_kivi3s_layout() -> None:
    """kivi3 (headq-scorecorr) stores the low two bits, then the high bit: the same words."""
    from headq_core import get_registry
    from headq_kernels import pack_planes, unpack_codes

    if "kivi3" not in get_registry().names("key"):
        pytest.skip("headq-scorecorr not installed")
    block = get_registry().key_quantizer("kivi3").encode(torch.randn(2, 2, 64, 16), 0)
    codes = unpack_codes(block.low, 2, 64).long() + 4 * unpack_codes(block.high, 1, 64).long()
    assert torch.equal(pack_planes(codes, 3), torch.cat([block.low, block.high], dim=-1))
