"""A model split over two GPUs by a device_map: the one-GPU run's greedy tokens, each layer's cache
on its own GPU (skipped without two CUDA devices; the CPU simulation is tests/test_devices.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]
pytest.importorskip("triton")
pytest.importorskip("accelerate")

from accelerate import dispatch_model  # noqa: E402
from test_devices import layer_devices  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from headq_core import QuantizedKVCache, cache_kwargs  # noqa: E402
from headq_core.testing.calibration import calibration_for  # noqa: E402

LAYERS = 4
PAIRS = [("kivi:bits=2", "kivi:bits=2"), ("headq:rank=8", "kivi:bits=2")]
# the first half of the layers on cuda:1 and the rest on cuda:0, so that cuda:0, the current
# device, is not the first layer's: a launch or a copy that went to the current device shows
SPLIT = {
    "model.embed_tokens": 1,
    "model.rotary_emb": 1,
    **{f"model.layers.{i}": 1 if i < LAYERS // 2 else 0 for i in range(LAYERS)},
    "model.norm": 0,
    "lm_head": 0,
}


def _model(split: bool) -> LlamaForCausalLM:
    """A random-weight Llama of Llama-3 head shapes (4 query heads per KV head, head_dim 128),
    float16, on cuda:0 or split over both GPUs by ``SPLIT``."""
    config = LlamaConfig(
        hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        num_hidden_layers=LAYERS, vocab_size=512, max_position_embeddings=4096, attn_implementation="headq",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float16).eval()
    if split:
        return dispatch_model(model, device_map=SPLIT)  # type: ignore[no-any-return]
    return model.to("cuda:0")


@pytest.mark.parametrize(("keys", "values"), PAIRS)
def test_a_model_over_two_gpus_generates_the_one_gpu_tokens(keys: str, values: str) -> None:
    """100 greedy tokens after a left-padded prompt of 300 (key groups and values leave the window
    on the fused kernel): the split model gives the one-GPU tokens, and each layer's cache and its
    calibrated basis stay on that layer's GPU."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (3, 300), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    out, caches = [], []
    for split in (False, True):
        model = _model(split)
        calibration = calibration_for(keys, values, model.config, tokens=512)
        cache = QuantizedKVCache(keys, values, window=128, config=model.config, calibration=calibration)
        with torch.no_grad():
            tokens = model.generate(
                ids.to(model.device), attention_mask=mask.to(model.device), **cache_kwargs(model, cache),
                max_new_tokens=100, do_sample=False,
            )  # fmt: skip
        cache.check_finite()
        out.append(tokens.cpu())
        caches.append(cache)
    assert torch.cuda.current_device() == 0
    same = (out[0] == out[1]).all(dim=1)
    assert same.all(), f"rows {(~same).nonzero().flatten().tolist()} differ from the one-GPU run"
    for layer in caches[1].quantized_layers():
        want = torch.device("cuda", SPLIT[f"model.layers.{layer.layer_idx}"])
        assert layer.k.arenas and layer_devices(layer) == {want}, f"layer {layer.layer_idx}"
    if keys.startswith("headq"):
        bases = caches[1].key_method.layers
        assert [b.decode.device.index for b in bases] == [SPLIT[f"model.layers.{i}"] for i in range(LAYERS)]
