"""Decode steps replayed as CUDA graphs (headq_core/graphs.py) on a real model: the eager path's
greedy tokens, no device-to-host sync and no compilation in a step (skipped without CUDA)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
pytest.importorskip("triton")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from headq_core import QuantizedKVCache, StaticDecode, cache_kwargs, greedy  # noqa: E402  # noqa: E402
from headq_core.testing.calibration import calibration_for  # noqa: E402
from headq_kernels import compiled_kernels  # noqa: E402

CUDA = torch.device("cuda")
PAIRS = [
    ("kivi:bits=2", "kivi:bits=2"),
    ("kivi:bits=4", "kivi:bits=4"),
    ("fp16", "fp16"),
    ("kivi:bits=2", "fp16"),
    ("headq:rank=8,zbits=4", "kivi:bits=2"),
    ("gsrq", "fp16"),
    ("rotation:bits=3.5", "fp8"),  # headq-baselines: rotated keys, scaled values
    ("int:bits=4", "rotation:bits=2.5"),
]


def _model() -> LlamaForCausalLM:
    """A random-weight Llama of Llama-3 head shapes (4 query heads per KV head, head_dim 128), float16."""
    config = LlamaConfig(
        hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        num_hidden_layers=2, vocab_size=512, max_position_embeddings=4096, attn_implementation="headq",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(CUDA, torch.float16).eval()


def _prompt(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (3, 300), generator=gen).to(CUDA)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :7] = 0
        mask[2, :90] = 0
    return ids, mask


def _cache(model, keys: str, values: str) -> QuantizedKVCache:
    calibration = calibration_for(keys, values, model.config, tokens=512)
    return QuantizedKVCache(keys, values, window=128, config=model.config, calibration=calibration)


@pytest.mark.parametrize(("keys", "values"), PAIRS)
@pytest.mark.parametrize("padded", [False, True])
def test_graph_decode_gives_the_eager_greedy_tokens(keys: str, values: str, padded: bool) -> None:
    """100 greedy tokens (key groups and values leave the window, the ring wraps): CUDA-graph
    replays give generate's eager tokens, with and without left padding.

    The static step splits the tokens for its capacity, not for each step, so its float16 sums
    run in another order than the eager step's: a row may part from the eager tokens only where
    the eager step's two best logits were a near tie (within 0.02), and the test says where."""
    model = _model()
    ids, mask = _prompt(padded)
    with torch.no_grad():
        eager = model.generate(
            ids, attention_mask=mask, **cache_kwargs(model, _cache(model, keys, values)), max_new_tokens=100,
            do_sample=False, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        static = greedy(model, _cache(model, keys, values), ids, 100, attention_mask=mask if padded else None)
    _parts_only_at_near_ties(eager, static, ids.shape[1])


def _parts_only_at_near_ties(eager: Any, static: torch.Tensor, prompt: int) -> None:
    """Static greedy tokens may part from generate's eager ones only where the eager step's two best
    logits were a near tie (within 0.02); the test says where."""
    differ = eager.sequences[:, prompt:] != static[:, prompt:]
    for row in differ.any(dim=1).nonzero().flatten().tolist():
        step = int(differ[row].int().argmax())
        top2 = eager.logits[step][row].float().topk(2).values
        margin = float(top2[0] - top2[1])
        print(f"row {row} parts from the eager tokens at step {step}, eager margin {margin:.4f}")
        assert margin < 0.02, f"row {row} differs from step {step}, where the eager margin was {margin:.4f}"
    assert torch.equal(eager.sequences[:, :prompt], static[:, :prompt])


def test_graph_steps_replay_without_sync_or_compilation() -> None:
    """After one eager run and one capture per flush pattern, 300 steps replay graphs: no sync
    (sync debug mode raises on one), no Triton compilation, and the cache goes on eagerly after."""
    model = _model()
    ids, mask = _prompt(True)
    cache = _cache(model, "kivi:bits=2", "kivi:bits=2")
    with torch.no_grad():
        token = model(ids, attention_mask=mask, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        run = StaticDecode(model, cache, capacity=1000, attention_mask=mask)
        for _ in range(80):  # warm-up: every pattern seen twice
            token = run.step(token).argmax(-1, keepdim=True)
        assert len(run._graphs) == 2  # keys and values flushed, values only
        before = compiled_kernels()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(300):
                token = run.step(token).argmax(-1, keepdim=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert compiled_kernels() == before
        run.close()
        assert cache.get_seq_length() == 300 + 380
        cache.check_finite()
        full = torch.cat([mask, torch.ones((3, 381), dtype=mask.dtype, device=CUDA)], dim=1)
        logits = model(token, attention_mask=full, **cache_kwargs(model, cache)).logits
    assert torch.isfinite(logits).all()


def test_a_graph_step_refuses_past_its_capacity() -> None:
    """The capacity is rounded up to whole key groups (320 for 302); the step past it is refused."""
    model = _model()
    ids, _ = _prompt(False)
    cache = _cache(model, "kivi:bits=2", "kivi:bits=2")
    with torch.no_grad():
        token = model(ids, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        with StaticDecode(model, cache, capacity=302) as run:
            for _ in range(20):
                token = run.step(token).argmax(-1, keepdim=True)
            with pytest.raises(Exception, match="set up for 320 tokens"):
                run.step(token)


@pytest.mark.parametrize(
    ("keys", "values"), [("kivi:bits=2", "kivi:bits=2"), ("headq:rank=8,zbits=4", "kivi:bits=2")]
)
def test_generate_with_static_generate_replays_graphs(keys: str, values: str) -> None:
    """``generate(custom_generate=static_generate)`` on CUDA: its decode steps are graph replays,
    and its tokens are plain eager generate's (left-padded batch, 100 new tokens) but where the
    eager step had a near tie (the static step sums its splits in another order)."""
    from headq_core import static_generate

    model = _model()
    ids, mask = _prompt(True)
    with torch.no_grad():
        eager = model.generate(
            ids, attention_mask=mask, **cache_kwargs(model, _cache(model, keys, values)), max_new_tokens=100,
            do_sample=False, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        static = model.generate(
            ids, attention_mask=mask, **cache_kwargs(model, _cache(model, keys, values)), max_new_tokens=100,
            do_sample=False, custom_generate=static_generate,
        )  # fmt: skip
    _parts_only_at_near_ties(eager, static, ids.shape[1])
