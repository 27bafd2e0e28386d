"""GSRQ codebook learning time: one 256-codeword codebook of 8-channel sub-vectors from 100k weighted samples.

Run with ``OMP_NUM_THREADS=2 .venv/bin/pytest benchmarks/test_gsrq_codebook.py -s``; not part of
``make test``. The samples mimic key sub-vectors: a few hundred clusters of varied norm with
Gaussian spread, and log-smoothed heavy-tailed weights like the Fisher weights GSRQ uses.
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("headq_gsrq", reason="headq-gsrq not installed")

from headq_gsrq.learners import gskm, kmeans

SAMPLES, DIM, CODEWORDS = 100_000, 8, 256


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(1, 512, DIM, generator=gen) * torch.rand(1, 512, 1, generator=gen) * 4
    pick = torch.randint(0, 512, (1, SAMPLES), generator=gen)
    x = centers[0, pick] + 0.5 * torch.randn(1, SAMPLES, DIM, generator=gen)
    fisher = torch.distributions.Exponential(1.0).sample((1, SAMPLES)) ** 2
    return x, torch.log1p(fisher / fisher.median())


@pytest.mark.parametrize("learner", [gskm, kmeans], ids=["gskm", "kmeans"])
def test_codebook_256_on_100k(benchmark, data, learner) -> None:
    x, w = data
    threads = torch.get_num_threads()
    start = time.perf_counter()
    fit = benchmark.pedantic(learner, args=(x, CODEWORDS), kwargs={"weights": w}, rounds=1, iterations=1)
    seconds = time.perf_counter() - start
    benchmark.extra_info.update(passes=len(fit.objective), objective=fit.objective[-1], threads=threads)
    print(
        f"\n{learner.__name__}: {CODEWORDS} codewords x {DIM} channels on {SAMPLES} weighted samples "
        f"in {seconds:.2f} s ({len(fit.objective)} passes, {threads} threads, "
        f"weighted SSE {fit.objective[0]:.4g} -> {fit.objective[-1]:.4g})"
    )
    assert fit.codewords.shape == (1, CODEWORDS, DIM)
