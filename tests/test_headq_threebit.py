"""3-bit KIVI keys (``kivi3``, plugin headq-scorecorr): real 3-bit storage in two packed bit planes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from headq_core import SpecError, get_registry
from headq_core.layouts import block_nbytes, concat_blocks
from headq_core.testing import check_key_quantizer, outlier_data

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("headq_scorecorr") is None or importlib.util.find_spec("headq_kivi") is None,
    reason="headq-scorecorr and headq-kivi not installed",
)


def _reference(keys: torch.Tensor, group: int) -> torch.Tensor:
    """Per-channel min/max 3-bit round trip in plain float arithmetic: (b, h, t, d)."""
    x = keys.transpose(-1, -2)
    g = x.reshape(*x.shape[:-1], -1, group)
    lo = g.amin(-1, keepdim=True).half().float()
    scale = ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 7).half().float()
    codes = torch.round((g - lo) / torch.where(scale > 0, scale, 1.0)).clamp(0, 7)
    return (codes * scale + lo).reshape(x.shape).transpose(-1, -2)


@pytest.mark.parametrize("group", [32, 64])
def test_three_bits_per_element_and_the_reference_reconstruction(group: int) -> None:
    method = get_registry().key_quantizer(f"kivi3:group={group}")
    keys = outlier_data((2, 3, 128, 64), seed=group)
    block = method.encode(keys, 0)
    parts = block_nbytes(block)
    assert 8 * parts["payload"] / keys.numel() == 3.0
    assert 8 * parts["scales"] / keys.numel() == 32 / group
    assert block.low.dtype == block.high.dtype == torch.int32
    torch.testing.assert_close(block.dequantize(), _reference(keys, group))


def test_error_sits_between_two_and_four_bits() -> None:
    keys = outlier_data((2, 2, 128, 64), seed=1)
    registry = get_registry()
    mse = {
        spec: (registry.key_quantizer(spec).encode(keys, 0).dequantize() - keys).square().mean().item()
        for spec in ("kivi:bits=2", "kivi3", "kivi:bits=4")
    }
    assert mse["kivi:bits=2"] > 3 * mse["kivi3"] > 3 * 3 * mse["kivi:bits=4"]


def test_blocks_merge() -> None:
    method = get_registry().key_quantizer("kivi3")
    keys = outlier_data((1, 2, 96, 64), seed=2)
    parts = [method.encode(keys[..., :32, :], 0), method.encode(keys[..., 32:, :], 0)]
    merged = concat_blocks(parts)
    assert merged is not None
    torch.testing.assert_close(merged.dequantize(), method.encode(keys, 0).dequantize())


def test_groups_must_fill_whole_words() -> None:
    with pytest.raises(SpecError, match="multiple of 32"):
        get_registry().key_quantizer("kivi3:group=16")


@pytest.mark.parametrize("spec", ["kivi3:group=64", "headq:base=kivi3,rank=8,scale=base,zbits=2"])
def test_conforms(spec: str) -> None:
    check_key_quantizer(spec)
