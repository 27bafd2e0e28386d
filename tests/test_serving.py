"""Serving patterns on real (tiny) models: left padding never reaches a row's output, and a
speculative pass's rejected tokens leave no trace."""

from __future__ import annotations

import pytest
import torch

from headq_core import QuantizedKVCache, cache_kwargs, get_registry
from headq_core.testing.calibration import calibration_for

_REGISTRY = get_registry()
PAIRS = (
    [(k, "fp16") for k in _REGISTRY.names("key") if k != "fp16"]
    + [("fp16", v) for v in _REGISTRY.names("value") if v != "fp16"]
    + [("kivi:bits=2", "kivi:bits=2"), ("fp16", "fp16")]
)


def _generate(model, ids, mask, keys, values, calibration, **kwargs):
    cache = QuantizedKVCache(keys, values, window=4, config=model.config, calibration=calibration)
    out = model.generate(
        ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize(("keys", "values"), PAIRS)
def test_what_padding_holds_never_changes_a_row(make_model, make_ids, keys: str, values: str) -> None:
    """Left-padded greedy generation: only the ids at padding positions differ between two runs;
    every row's logits are bit-identical (KIVI-2 keys moved them by several units before)."""
    model = make_model("llama", attn="headq")
    calibration = calibration_for(keys, values, model.config, tokens=256)
    ids = make_ids(3, 48, seed=3)
    mask = torch.ones_like(ids)
    for row, pads in ((1, 7), (2, 37)):
        mask[row, :pads] = 0
    other = torch.where(mask.bool(), ids, make_ids(3, 48, seed=4))
    assert not torch.equal(other, ids)
    with torch.no_grad():
        first = _generate(model, ids, mask, keys, values, calibration)
        second = _generate(model, other, mask, keys, values, calibration)
    assert torch.equal(first[1], second[1])
    assert torch.equal(first[0][:, 48:], second[0][:, 48:])
