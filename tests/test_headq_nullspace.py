"""The null-space control (``nullspace``, plugin headq-scorecorr): large key MSE, invisible to attention."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from headq_core import get_registry
from headq_core.testing import (
    check_key_quantizer,
    model_config,
    outlier_data,
    synthetic_calibration,
    synthetic_stats,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("headq_scorecorr") is None, reason="headq-scorecorr not installed"
)

D = 64


def _bound(spec: str) -> object:
    method = get_registry().key_quantizer(spec)
    method.bind(model_config(), synthetic_calibration([("key", method)], model_config()))
    return method


def _calibrated_queries(layer: int, n: int = 64) -> torch.Tensor:
    """Queries from the synthetic calibration's distribution: (1, h, n, d)."""
    moment = synthetic_stats(model_config(), {"query_moments"}).query_moments[layer]
    chol = torch.linalg.cholesky(moment + 1e-12 * torch.eye(D, dtype=moment.dtype))
    gen = torch.Generator().manual_seed(layer)
    return (
        torch.randn(1, moment.shape[0], n, D, generator=gen, dtype=torch.float64) @ chol.transpose(-1, -2)
    ).float()


@pytest.mark.parametrize("mode", ["shift", "orthogonal"])
def test_injected_key_mse_is_the_one_asked_for(mode: str) -> None:
    method = _bound(f"nullspace:mode={mode},mse=2.5")
    keys = outlier_data((2, 2, 40, D), seed=1)
    block = method.encode(keys, 0)  # type: ignore[attr-defined]
    mse = (block.dequantize() - keys).square().mean(dim=-1)
    torch.testing.assert_close(mse, torch.full_like(mse, 2.5), rtol=1e-4, atol=1e-4)


def test_shift_moves_every_logit_of_a_query_by_one_constant() -> None:
    method = _bound("nullspace:mode=shift,mse=4,energy=1")
    keys = outlier_data((2, 2, 48, D), seed=2)
    query = torch.randn(2, 2, 5, D)
    got = method.logits(query, method.encode(keys, 1), 1)  # type: ignore[attr-defined]
    exact = query @ keys.transpose(-1, -2)
    delta = got - exact
    assert delta.abs().mean() > 1.0  # a large logit error ...
    torch.testing.assert_close(delta, delta[..., :1].expand_as(delta), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.softmax(got, -1), torch.softmax(exact, -1), rtol=0, atol=1e-5)


def test_orthogonal_error_is_invisible_to_calibrated_queries() -> None:
    method = _bound("nullspace:mode=orthogonal,mse=4,energy=0.999")
    keys = outlier_data((1, 2, 64, D), seed=3)
    block = method.encode(keys, 0)  # type: ignore[attr-defined]
    error = block.dequantize() - keys
    query = _calibrated_queries(0)
    logit_error = (query @ error.transpose(-1, -2)).square().mean()
    # the same error energy in a random direction, for scale
    visible = (query @ torch.randn_like(error).mul(2.0).transpose(-1, -2)).square().mean()
    assert logit_error < 1e-2 * visible
    tokens = error / error.norm(dim=-1, keepdim=True)
    assert (tokens @ tokens.transpose(-1, -2)).triu(1).abs().mean() < 0.5  # a different error per token


def test_a_constrained_shift_is_invisible_to_calibrated_queries() -> None:
    free, anywhere = _bound("nullspace:mode=shift,mse=4"), _bound("nullspace:mode=shift,mse=4,energy=1")
    query = _calibrated_queries(1)
    keys = outlier_data((1, 2, 8, D), seed=5)
    seen = [
        (query @ (m.encode(keys, 1).dequantize() - keys).transpose(-1, -2)).square().mean()  # type: ignore[attr-defined]
        for m in (free, anywhere)
    ]
    assert seen[0] < 1e-2 * seen[1]


def test_no_injection_by_default() -> None:
    method = _bound("nullspace")
    keys = outlier_data((1, 2, 16, D), seed=4)
    assert torch.equal(method.encode(keys, 0).dequantize(), keys)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "spec",
    ["nullspace:mse=1", "nullspace:mode=orthogonal,mse=1", "nullspace:mode=orthogonal,mse=1,base=kivi"],
)
def test_injecting_configurations_conform(spec: str) -> None:
    # the kit's SNR floor assumes a codec; a control injects error on purpose
    check_key_quantizer(spec, snr_floor=-100.0)
