"""The static decode mode (headq_core/graphs.py) on the CPU: the same steps as the eager mode, on
``attend_torch`` in the kernel's place (the CUDA-graph replays are tested in test_graphs_gpu.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from headq_core import CacheStateError, QuantizedKVCache, StaticDecode, cache_kwargs, greedy
from headq_core.testing.calibration import calibration_for

PAIRS = [
    ("kivi:bits=2", "kivi:bits=2"),
    ("kivi:bits=4", "kivi:bits=2"),
    ("fp16", "fp16"),
    ("kivi:bits=2", "fp16"),
    ("fp16", "kivi:bits=2"),
    ("headq:rank=4", "kivi:bits=2"),
    ("gsrq", "fp16"),
]


def _cache(model, keys: str, values: str, **kwargs) -> QuantizedKVCache:
    calibration = calibration_for(keys, values, model.config, tokens=256)
    return QuantizedKVCache(keys, values, window=4, config=model.config, calibration=calibration, **kwargs)


def _prompt(make_ids, padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = make_ids(3, 40, seed=1)
    if not padded:
        return ids, None
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :17] = 0
    return ids, mask


@pytest.mark.parametrize(("keys", "values"), PAIRS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_steps_give_the_eager_greedy_tokens(make_model, make_ids, arch, keys, values, padded) -> None:
    """70 greedy tokens with a 4-token window: KIVI's key groups leave it twice, the ring wraps
    many times; the static steps give generate's tokens, left-padded rows included."""
    model = make_model(arch, attn="headq")
    ids, mask = _prompt(make_ids, padded)
    with torch.no_grad():
        eager = model.generate(
            ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
            **cache_kwargs(model, _cache(model, keys, values)), max_new_tokens=70, do_sample=False,
        )  # fmt: skip
        static = greedy(model, _cache(model, keys, values), ids, 70, attention_mask=mask, graphs=False)
    assert torch.equal(eager, static)


@pytest.mark.parametrize(("keys", "values"), [("kivi:bits=2", "kivi:bits=2"), ("headq:rank=4", "fp16")])
def test_static_logits_match_eager_and_close_hands_the_tokens_back(
    make_model, make_ids, keys, values
) -> None:
    """Teacher-forced: the static steps' logits are the eager steps' (float32 on both sides); after
    close() the cache goes on in eager mode exactly as one that never left it."""
    model = make_model("llama", attn="headq")
    ids, mask = _prompt(make_ids, True)
    follow = make_ids(3, 60, seed=2)
    eager, static = _cache(model, keys, values), _cache(model, keys, values)
    full = torch.ones((3, 100), dtype=torch.long)
    full[:, :40] = mask
    with torch.no_grad():
        for cache in (eager, static):
            model(ids, attention_mask=mask, **cache_kwargs(model, cache))
        real = mask.sum(-1, keepdim=True)  # the next position of each row, as generate counts it
        with StaticDecode(model, static, capacity=100, attention_mask=mask, graphs=False) as run:
            for i in range(40):
                got = run.step(follow[:, i : i + 1])
                want = model(
                    follow[:, i : i + 1], attention_mask=full[:, : 41 + i], position_ids=real + i,
                    **cache_kwargs(model, eager),
                ).logits[:, -1]  # fmt: skip
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert static.get_seq_length() == eager.get_seq_length() == 80
        for i in range(40, 60):
            got, want = (
                model(
                    follow[:, i : i + 1], attention_mask=full[:, : 41 + i], position_ids=real + i,
                    **cache_kwargs(model, c),
                ).logits
                for c in (static, eager)
            )  # fmt: skip
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert static.bits_per_element() == eager.bits_per_element()


def test_every_step_splits_each_stored_token_exactly_once(make_model, make_ids) -> None:
    """The split table of any step: real rows cover positions [0, n) once, each in a split slot of
    its own; the empty rows that fill each launch to its fixed size take the remaining slots."""
    model = make_model("llama", attn="headq")
    cache = _cache(model, "kivi:bits=2", "kivi:bits=2")
    ids, _ = _prompt(make_ids, False)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    run = StaticDecode(model, cache, capacity=400, graphs=False)
    for n in range(41, 400, 7):
        table = run._splits_table(n).reshape(-1, 7)
        live = table[table[:, 4] > 0]
        covered = np.concatenate([np.arange(p, p + length) for p, length in live[:, 5:3:-1]])
        assert np.array_equal(np.sort(covered), np.arange(n))
        assert np.array_equal(np.sort(table[:, 6]), np.arange(table.shape[0]))


def test_the_static_mode_says_what_it_cannot_take(make_model, make_ids) -> None:
    model = make_model("llama", attn="headq")
    ids, _ = _prompt(make_ids, False)

    def prefilled(**kwargs):
        cache = _cache(
            model, kwargs.pop("keys", "kivi:bits=2"), kwargs.pop("values", "kivi:bits=2"), **kwargs
        )
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
        return cache

    cases = [
        (_cache(model, "kivi:bits=2", "kivi:bits=2"), "holds no tokens"),
        (prefilled(sinks=2), "keeps sinks"),
        (prefilled(values="a2"), "keeps an attention statistic"),
        (prefilled(emulate_streaming=True), "emulates streaming"),
    ]
    for cache, why in cases:
        with pytest.raises(CacheStateError, match=why):
            StaticDecode(model, cache, capacity=100, graphs=False)
    cache = prefilled()
    with pytest.raises(ValueError, match="must exceed"):
        StaticDecode(model, cache, capacity=40, graphs=False)
    with pytest.raises(ValueError, match="CUDA graphs need"):
        StaticDecode(model, cache, capacity=100, graphs=True)
    with pytest.raises(ValueError, match="attention_mask must be"):  # a mask of the prompt alone, say
        StaticDecode(model, cache, capacity=100, attention_mask=torch.ones((3, 12)), graphs=False)
    with StaticDecode(model, cache, capacity=100, graphs=False):
        with pytest.raises(CacheStateError, match="static mode already"):
            StaticDecode(model, cache, capacity=100, graphs=False)
    cropped = _cache(model, "kivi:bits=2", "kivi:bits=2")
    with torch.no_grad():
        model(make_ids(3, 100, seed=3), **cache_kwargs(model, cropped))  # longer than a crop remembers
    cropped.crop(-2)  # values stay encoded where the flush rule has the window
    with pytest.raises(CacheStateError, match="run one eager step first"):
        StaticDecode(model, cropped, capacity=100, graphs=False)
    model.set_attn_implementation("sdpa")
    with pytest.raises(CacheStateError, match="does not run the 'headq' attention"):
        StaticDecode(model, prefilled(), capacity=100, graphs=False)


def test_a_static_decode_refuses_past_its_capacity_and_after_close(make_model, make_ids) -> None:
    model = make_model("llama", attn="headq")
    ids, _ = _prompt(make_ids, False)
    cache = _cache(model, "kivi:bits=2", "kivi:bits=2")
    token = ids[:, -1:]
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
        run = StaticDecode(model, cache, capacity=50, graphs=False)  # rounded up to whole key groups: 64
        for _ in range(24):
            run.step(token)
        with pytest.raises(CacheStateError, match="set up for 64 tokens"):
            run.step(token)
        run.close()
        with pytest.raises(CacheStateError, match="closed"):
            run.step(token)
    assert cache.get_seq_length() == 64


def test_greedy_continues_a_cache_that_holds_a_first_turn(make_model, make_ids) -> None:
    """A second prompt after a first one: the static steps' capacity counts what the cache held,
    and the tokens are an eager loop's; one new token needs no static step at all."""
    model = make_model("llama", attn="headq")
    first, second = make_ids(2, 30, seed=1), make_ids(2, 12, seed=2)
    caches = [_cache(model, "kivi:bits=2", "kivi:bits=2") for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(first, **cache_kwargs(model, cache))
        mask = torch.ones((2, 42), dtype=torch.long)
        static = greedy(model, caches[0], second, 50, attention_mask=mask, graphs=False)
        token = model(second, attention_mask=mask, **cache_kwargs(model, caches[1])).logits[:, -1:].argmax(-1)
        eager = [second, token]
        for _ in range(49):
            token = model(token, **cache_kwargs(model, caches[1])).logits[:, -1:].argmax(-1)
            eager.append(token)
        assert torch.equal(static, torch.cat(eager, dim=1))
        assert caches[0].get_seq_length() == caches[1].get_seq_length() == 30 + 12 + 49
        one = _cache(model, "kivi:bits=2", "kivi:bits=2")
        assert greedy(model, one, first, 1, graphs=False).shape == (2, 31) and one.static is None


@pytest.mark.parametrize("padded", [False, True])
def test_generate_runs_its_decoding_loop_on_the_static_mode(make_model, make_ids, padded) -> None:
    """``generate(custom_generate=static_generate)``: generate's own input preparation, processors
    and stopping criteria, the static steps: the same ids as plain greedy generate, and an
    end-of-sequence token stops a row (padding after it) as generate does."""
    from headq_core import static_generate

    model = make_model("llama", attn="headq")
    ids, mask = _prompt(make_ids, padded)
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        runs = []
        for extra in ({}, {"custom_generate": static_generate}):
            cache = _cache(model, "kivi:bits=2", "kivi:bits=2")
            runs.append(
                model.generate(
                    ids,
                    attention_mask=mask,
                    **cache_kwargs(model, cache),
                    max_new_tokens=40,
                    do_sample=False,
                    **extra,
                )
            )
        assert torch.equal(runs[0], runs[1])
        eos = int(runs[0][0, 45])  # a token row 0 emits: generation of that row stops there
        stopped = []
        for extra in ({}, {"custom_generate": static_generate}):
            cache = _cache(model, "kivi:bits=2", "kivi:bits=2")
            stopped.append(
                model.generate(
                    ids,
                    attention_mask=mask,
                    **cache_kwargs(model, cache),
                    max_new_tokens=40,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=0,
                    **extra,
                )
            )
        assert torch.equal(stopped[0], stopped[1]) and int(stopped[1][0, -1]) in (0, eos)


@pytest.mark.parametrize(
    ("kind", "spec"),
    [("keys", "kivi:bits=2"), ("values", "kivi:bits=2")]
    + [(kind, spec) for spec in ("fp8", "int:bits=4", "int:bits=4,mode=affine", "rotation:bits=3.5") for kind in ("keys", "values")],
)  # fmt: skip
def test_a_warm_encode_copies_nothing_from_the_host(monkeypatch, kind: str, spec: str) -> None:
    """A step captured as a CUDA graph may encode a block, and the capture refuses a copy from the
    host: once a method has encoded a block on a device, its next encode there reads only what is
    already on that device (here the meta device, where a copy from the CPU shows up the same way)."""
    from transformers import LlamaConfig

    from headq_core import get_registry

    if spec.split(":")[0] in ("fp8", "int", "rotation"):
        pytest.importorskip("headq_baselines")
    registry = get_registry()
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         num_hidden_layers=1)  # fmt: skip
    method: Any = registry.key_quantizer(spec) if kind == "keys" else registry.value_policy(spec)
    method.bind(config, None)
    extra = () if kind == "keys" else (None,)  # a value policy's statistic
    copies: list[tuple[int, ...]] = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu":
            copies.append(tuple(self.shape))
        return out

    x = torch.randn(2, 2, 32, 64, device="meta")
    method.encode(x, 0, *extra)  # warm: what the method builds once per device
    monkeypatch.setattr(torch.Tensor, "to", to)
    method.encode(x, 0, *extra)
    monkeypatch.undo()
    assert not copies, f"copied from the host: {copies}"
