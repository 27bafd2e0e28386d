"""pytest-benchmark rows of the fused decode kernel (GPU only); the full sweep is decode_kernels.py.

Each round runs 20 decode steps of one layer and synchronizes, so pytest-benchmark's host timer
sees whole GPU work; the printed ratio compares the kernel with fp16 SDPA in the same run.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("triton")

from decode_kernels import HKV, HQ, OURS, Cache, D, bench_graph, sdpa  # noqa: E402

STEPS = 20


def _steps(fn):
    def run():
        for _ in range(STEPS):
            fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("provider", [*OURS, "fp16-sdpa"])
@pytest.mark.parametrize(("batch", "context"), [(8, 32768)])
def test_decode_step(benchmark, provider: str, batch: int, context: int) -> None:
    q = torch.randn((batch, HKV, HQ // HKV, D), device="cuda", dtype=torch.float16)
    if provider == "fp16-sdpa":
        k = torch.randn((batch, HKV, context, D), device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        fn = lambda: sdpa(q, k, v)  # noqa: E731
    else:
        cache = Cache(*OURS[provider], batch, context)
        fn = lambda: cache.attend(q)  # noqa: E731
        k = torch.randn((batch, HKV, context, D), device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        ratio = bench_graph(lambda: sdpa(q, k, v)) / bench_graph(fn)
        del k, v
        benchmark.extra_info["speedup_vs_fp16_sdpa"] = ratio
        print(f"\n{provider} batch {batch} context {context}: {ratio:.2f}x fp16-sdpa")
    benchmark.pedantic(_steps(fn), rounds=10, warmup_rounds=2)
