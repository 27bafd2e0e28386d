"""The symmetric (mid-rise) side-code quantizer of headq_kernels, against its own contract."""

from __future__ import annotations

import pytest
import torch

from headq_kernels import (
    codes_per_word,
    dequantize_symmetric,
    quantize_symmetric,
    symmetric_step,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 32, 45])
def test_round_trip_error_is_at_most_half_a_step(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + n)
    x = torch.randn(3, 5, n, generator=gen)
    step = symmetric_step(x.abs().amax(dim=-1, keepdim=True), bits)  # one step per row
    codes = quantize_symmetric(x, step, bits)
    assert codes.dtype == torch.int32
    assert codes.shape == (3, 5, -(-n * bits // 32))
    x_hat = dequantize_symmetric(codes, step, bits, n)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    # fp16 rounding of the step may push the extreme levels by a hair past half a step
    assert ((x - x_hat).abs() <= step.float() * 0.5 * (1 + 1e-2) + 1e-6).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_extremes_are_levels_and_codes_fill_the_range(bits: int) -> None:
    x = torch.tensor([[-3.0, 3.0, 0.25, -0.5]])
    step = symmetric_step(torch.tensor([[3.0]]), bits)
    codes = unpack_codes(quantize_symmetric(x, step, bits), bits, 4)
    assert codes[0, 0] == 0 and codes[0, 1] == (1 << bits) - 1
    x_hat = dequantize_symmetric(quantize_symmetric(x, step, bits), step, bits, 4)
    assert torch.allclose(x_hat[0, :2], x[0, :2], rtol=2e-3)


def test_levels_are_symmetric_and_skip_zero() -> None:
    bits = 2
    step = torch.tensor([1.0], dtype=torch.float16)
    codes = quantize_symmetric(torch.tensor([-9.0, -0.9, 0.2, 9.0]), step, bits)
    x_hat = dequantize_symmetric(codes, step, bits, 4)
    assert x_hat.tolist() == [-1.5, -0.5, 0.5, 1.5]  # clipped to the outermost levels


def test_per_coordinate_steps_broadcast() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, generator=gen) * torch.tensor([1.0, 10.0, 0.1, 3.0])[:, None]
    step = symmetric_step(x.abs().amax(dim=(0, 2))[None, :, None], 4)  # (1, 4, 1)
    x_hat = dequantize_symmetric(quantize_symmetric(x, step, 4), step, 4, 64)
    rel = (x - x_hat).square().mean(dim=(0, 2)) / x.square().mean(dim=(0, 2))
    assert (rel < 0.04).all()  # a wrong broadcast would give the 0.1-scaled row a 100x step


def test_zero_step_decodes_to_zero() -> None:
    x = torch.zeros(2, 16)
    step = symmetric_step(torch.zeros(2, 1), 4)
    assert torch.equal(dequantize_symmetric(quantize_symmetric(x, step, 4), step, 4, 16), x)


def test_codes_share_the_affine_packing() -> None:
    bits = 4
    x = torch.linspace(-1, 1, 16)
    step = symmetric_step(torch.tensor(1.0), bits)
    words = quantize_symmetric(x, step, bits)
    assert words.shape == (16 // codes_per_word(bits),)
    lanes = unpack_codes(words, bits, 16)
    assert lanes.tolist() == sorted(lanes.tolist())  # monotone input, monotone codes
