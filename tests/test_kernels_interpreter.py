"""The Triton kernels on the CPU, under Triton's interpreter, against their torch references.

Without a GPU, ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports Triton,
and the kernels of ``headq_kernels`` run on NumPy: slowly and at small shapes, but the same code a
GPU compiles, so that a change to a kernel's logic fails here before it reaches a GPU. Speed,
register use and what the interpreter does not model are for ``tests/test_kernels_gpu.py``, which
runs these and more on a GPU: the matrix units' rounding, bfloat16 (the interpreter computes on
NumPy, which has none) and quantize-and-pack (its rounding comes from CUDA's libdevice). On a GPU
these tests skip; without one they need Triton (Linux only), and fail without it.

Every layout pair runs through ``triton_decode.attend`` (the folded kernel where it applies, the
generic kernel otherwise) over encoded tokens followed by an exact window, with several splits, a
partial last tile and left padding, and must match ``decode_plan.attend_torch`` within the GPU
tests' float16 tolerance.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

from headq_core import get_registry
from headq_core.fused import side_query
from headq_core.testing.calibration import calibration_for
from headq_kernels import decode_plan

TOLERANCE = 4e-3  # float16, as tests/test_kernels_gpu.py


@pytest.fixture(scope="module", autouse=True)
def interpreter() -> Iterator[None]:
    """Triton's interpreter, with a scalar read from a one-element array as NumPy 2.4 allows it.

    Triton 3.6 reads a loaded scalar used as a loop bound with ``int(array)``, which NumPy 2.4
    refuses for an array of one element and one dimension (fixed upstream after 3.6, in
    triton-lang/triton#9171); the fix is applied for these tests only.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("on a GPU, tests/test_kernels_gpu.py runs the kernels compiled")
    try:
        import triton.language as tl
        from triton.runtime import interpreter as triton_interpreter
    except ImportError:
        if not sys.platform.startswith("linux"):
            pytest.skip("Triton ships for Linux only")
        pytest.fail(
            "the CPU suite runs the kernels under Triton's interpreter: install triton (make setup does)"
        )
    if not isinstance(tl.zeros, triton_interpreter.InterpretedFunction):
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set: set it in the environment")
    original = triton_interpreter._patch_lang_tensor

    def patch(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_interpreter, "_patch_lang_tensor", patch)
        yield


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def outliers(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Float16 Gaussian data with a few large channels, as keys have."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    x[..., :: max(1, shape[-1] // 5)] *= 6.0
    return x.half()


def _run(
    monkeypatch: pytest.MonkeyPatch,
    keys: str,
    values: str,
    *,
    hq: int = 8,
    hkv: int = 2,
    d: int = 64,
    tokens: int = 288,
    window: int = 5,
    split: int = 128,
    tail: int = 0,
    **launch: bool,
) -> tuple[float, int]:
    """Attention of two sequences over ``tokens`` encoded tokens and ``window`` exact ones (the second
    sequence left-padded by 7), kernel against reference: (relative error, folded launches).
    ``launch``: ``attend``'s ``fold`` and ``hilo``."""
    b = 2
    config = LlamaConfig(
        hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
        num_hidden_layers=1, intermediate_size=64, vocab_size=64,
    )  # fmt: skip
    calibration = calibration_for(keys, values, config, tokens=512)
    registry = get_registry()
    km, vm = registry.key_quantizer(keys), registry.value_policy(values)
    km.bind(config, calibration)
    vm.bind(config, calibration)
    k = outliers((b, hkv, tokens + window, d), 1)
    v = outliers((b, hkv, tokens + window, d), 2)
    q = outliers((b, hkv, hq // hkv, d), 3)
    key_segments = [km.encode(k[:, :, :tokens], 0).kernel_segment(tokens), decode_plan.Dense(k, start=tokens)]
    value_segments = [
        vm.encode(v[:, :, :tokens], 0).kernel_segment(tokens),
        decode_plan.Dense(v, start=tokens),
    ]
    key_group = next((s.group for s in key_segments if isinstance(s, decode_plan.AffineTokens)), 1)
    chunk = max((s.chunk for s in value_segments if isinstance(s, decode_plan.MixedChannels)), default=0)
    plan = decode_plan.plan(
        key_segments,
        value_segments,
        batch_heads=b * hkv,
        block_n=decode_plan.tile_tokens(d, key_group, chunk),
        split=split,
    )
    mask = torch.ones(b, tokens + window, dtype=torch.bool)
    mask[1, :7] = False
    side = side_query(key_segments, q)
    probs = [torch.zeros((b, hkv, hq // hkv, tail)) for _ in range(2)] if tail else [None, None]

    from headq_kernels import triton_decode

    folded: list[int] = []
    real = triton_decode._attend_folded
    monkeypatch.setattr(triton_decode, "_attend_folded", lambda *a: folded.append(1) or real(*a))
    want = decode_plan.attend_torch(q, plan, scale=d**-0.5, mask=mask, side_query=side, tail_probs=probs[0])
    got = triton_decode.attend(
        q, plan, scale=d**-0.5, mask=mask, side_query=side, tail_probs=probs[1], **launch
    )
    assert torch.isfinite(got).all()
    if tail:
        assert rel(probs[1], probs[0]) < TOLERANCE
    return rel(got, want), len(folded)


# KIVI keys and values of 2 or 4 bits (HeadQ's base included, A² values of those widths) in float16
# run on the folded kernel; the rest on the generic one.
FOLDED = [
    ("kivi:bits=2", "kivi:bits=2"),
    ("kivi:bits=4", "kivi:bits=4"),
    ("kivi:bits=4", "kivi:bits=2"),
    ("headq:rank=8,zbits=4", "kivi:bits=2"),
    ("headq:rank=5,zbits=8", "kivi:bits=2"),
    ("headq:rank=8,zbits=1", "kivi:bits=2"),
    ("headq:base=(kivi:bits=4,group=32),rank=16,zbits=2", "kivi:bits=4"),
    ("kivi:bits=2", "a2"),
]
GENERIC = [
    ("kivi:bits=1", "kivi:bits=8,group=64"),
    ("kivi:bits=8", "kivi:bits=1"),
    ("headq:rank=16,zbits=2", "fp16"),
    ("kivi:bits=2", "a2:mode=greedy,avg=3,bits=1,hi=8,weight=abs"),
    ("gsrq", "gsrq"),
    ("gsrq:bits=2", "gsrq:bits=2"),  # two stages
    ("gsrq:bits=0.75", "gsrq:bits=0.75,scale=fisher"),  # 6-bit indices, a byte or two at a time
    ("gsrq:bits=2,scale=fisher", "kivi:bits=2"),
]
BASELINES = [("fp8", "int:bits=4"), ("int", "rotation:bits=2.5"), ("rotation:bits=3.5", "fp8:format=e5m2")]


@pytest.mark.parametrize(("keys", "values"), FOLDED)
def test_the_folded_kernel_matches_the_reference(monkeypatch, keys: str, values: str) -> None:
    error, folded = _run(monkeypatch, keys, values)
    assert folded == 1 and error < TOLERANCE, (folded, error)


@pytest.mark.parametrize(("keys", "values"), FOLDED[:4])
def test_the_generic_kernel_matches_the_reference_where_the_folded_one_would_run(
    monkeypatch, keys: str, values: str
) -> None:
    error, folded = _run(monkeypatch, keys, values, fold=False)
    assert folded == 0 and error < TOLERANCE, error


@pytest.mark.parametrize(("keys", "values"), [FOLDED[0], FOLDED[3]])
def test_the_folded_kernel_in_two_float16_parts_matches_the_reference(
    monkeypatch, keys: str, values: str
) -> None:
    error, folded = _run(monkeypatch, keys, values, hilo=True)
    assert folded == 1 and error < TOLERANCE, error


@pytest.mark.parametrize(("keys", "values"), GENERIC)
def test_the_generic_kernel_matches_the_reference(monkeypatch, keys: str, values: str) -> None:
    error, folded = _run(monkeypatch, keys, values)
    assert folded == 0 and error < TOLERANCE, error


@pytest.mark.parametrize(("keys", "values"), BASELINES)
def test_engine_formats_match_the_reference(monkeypatch, keys: str, values: str) -> None:
    pytest.importorskip("headq_baselines")
    error, _ = _run(monkeypatch, keys, values)
    assert error < TOLERANCE, error


@pytest.mark.parametrize(
    ("hq", "hkv", "d", "tokens", "split"),
    [(12, 3, 64, 320, 256), (8, 1, 128, 160, 64), (4, 4, 32, 96, 512)],
    ids=["g4-of-3", "mqa-d128", "mha-d32"],
)
@pytest.mark.parametrize(
    ("keys", "values"), [FOLDED[0], FOLDED[3], GENERIC[4]], ids=["kivi2", "headq", "gsrq"]
)
def test_odd_head_counts_widths_and_splits(monkeypatch, keys, values, hq, hkv, d, tokens, split) -> None:
    error, _ = _run(monkeypatch, keys, values, hq=hq, hkv=hkv, d=d, tokens=tokens, split=split)
    assert error < TOLERANCE, error


@pytest.mark.parametrize(("keys", "values"), [("kivi:bits=2", "a2"), ("kivi:bits=1", "kivi:bits=2")])
def test_the_statistics_tail_matches_the_reference(monkeypatch, keys: str, values: str) -> None:
    """The attention probabilities of the last tokens, for a value policy's statistics."""
    error, _ = _run(monkeypatch, keys, values, tail=40)
    assert error < TOLERANCE, error


@pytest.mark.parametrize(
    ("keys", "values"), [("kivi:bits=2", "kivi:bits=2"), ("headq:rank=4", "kivi:bits=2")]
)
def test_static_decode_steps_on_the_kernel_match_the_reference(make_model, make_ids, keys, values) -> None:
    """The static decode mode's launches (split tables sized for the capacity, rows past a step's own
    empty, the window a ring) on the kernel give the logits they give on ``attend_torch``: a float16
    Llama of two layers, a left-padded row, 6 steps (the logits carry both layers' rounding, hence
    the wider tolerance)."""
    from headq_core import QuantizedKVCache, StaticDecode, cache_kwargs
    from headq_kernels import triton_decode

    model = make_model("llama", dtype=torch.float16, attn="headq")
    ids = make_ids(2, 40, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    follow = make_ids(2, 6, seed=2)
    calibration = calibration_for(keys, values, model.config, tokens=256)
    logits = []
    for attend in (decode_plan.attend_torch, triton_decode.attend):
        cache = QuantizedKVCache(keys, values, window=4, config=model.config, calibration=calibration)
        steps = []
        with torch.no_grad():
            model(ids, attention_mask=mask, **cache_kwargs(model, cache))
            with StaticDecode(model, cache, capacity=48, attention_mask=mask, graphs=False) as run:
                run.attend = attend
                for i in range(follow.shape[1]):
                    steps.append(run.step(follow[:, i : i + 1]).float())
        logits.append(torch.stack(steps))
    assert rel(logits[1], logits[0]) < 2e-2, rel(logits[1], logits[0])
