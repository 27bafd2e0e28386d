"""GSRQ codebook learners: gain-shape k-means and plain k-means, weighted and seeded."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("headq_gsrq", reason="headq-gsrq not installed")

from headq_gsrq.learners import assign, gskm, kmeans, reseed


def _data(b: int = 2, n: int = 2000, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered samples (b, n, d) of varied norms, and positive weights (b, n)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, 16, d, generator=gen) * 3
    pick = torch.randint(0, 16, (b, n), generator=gen)
    x = centers.gather(1, pick.unsqueeze(-1).expand(-1, -1, d)) + torch.randn(b, n, d, generator=gen)
    return x, torch.rand(b, n, generator=gen) + 0.1


def _objective(x: torch.Tensor, w: torch.Tensor, codewords: torch.Tensor) -> float:
    _, err = assign(x, codewords)
    return float((w * err).sum())


def test_gskm_shapes_are_unit_and_gains_positive() -> None:
    x, w = _data()
    fit = gskm(x, 32, weights=w, seed=1)
    assert fit.shapes is not None and fit.gains is not None
    assert fit.codewords.shape == (2, 32, 8)
    torch.testing.assert_close(fit.shapes.norm(dim=-1), torch.ones(2, 32))
    assert bool((fit.gains > 0).all())
    torch.testing.assert_close(fit.codewords, fit.gains.unsqueeze(-1) * fit.shapes)


@pytest.mark.parametrize("learner", [gskm, kmeans])
def test_weighted_objective_never_increases(learner) -> None:
    x, w = _data(seed=3)
    fit = learner(x, 24, weights=w, iters=30, seed=0)
    steps = torch.tensor(fit.objective, dtype=torch.float64)
    assert len(steps) >= 2
    assert bool((steps[1:] <= steps[:-1] * (1 + 1e-5)).all()), fit.objective
    # the reported objective is the weighted squared error of the returned codebook's assignment
    assert _objective(x, w, fit.codewords) <= fit.objective[-1] * (1 + 1e-5)


@pytest.mark.parametrize("learner", [gskm, kmeans])
def test_same_seed_same_codebook_other_seed_another(learner) -> None:
    x, w = _data(seed=4)
    a = learner(x, 16, weights=w, seed=5)
    b = learner(x, 16, weights=w, seed=5)
    c = learner(x, 16, weights=w, seed=6)
    assert torch.equal(a.codewords, b.codewords) and torch.equal(a.assignment, b.assignment)
    assert not torch.equal(a.codewords, c.codewords)


@pytest.mark.parametrize("learner", [gskm, kmeans])
def test_weights_pull_codewords(learner) -> None:
    """Two groups, one codeword: the codeword sides with the heavier group."""
    x = torch.cat([torch.full((1, 50, 4), 1.0), torch.full((1, 50, 4), 3.0)], dim=1)
    heavy_low = torch.cat([torch.full((1, 50), 10.0), torch.full((1, 50), 0.1)], dim=1)
    heavy_high = heavy_low.flip(-1)
    low = learner(x, 1, weights=heavy_low).codewords
    high = learner(x, 1, weights=heavy_high).codewords
    assert float(low.mean()) < 1.1 < 2.9 < float(high.mean())


@pytest.mark.parametrize("learner", [gskm, kmeans])
def test_more_codewords_than_points(learner) -> None:
    """Duplicate seeds die and are re-seeded; every distinct point ends on its own codeword."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 6, 3, generator=gen) * 5).repeat(1, 50, 1)  # 6 distinct points, 300 samples
    fit = learner(x, 8, iters=20, seed=2)
    assert fit.reseeded > 0
    assert _objective(x, torch.ones(1, 300), fit.codewords) < 1e-6 * float(x.square().sum())


def test_reseed_moves_a_dead_codeword_onto_the_worst_sample() -> None:
    x = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.2]]])
    w = torch.tensor([[1.0, 1.0, 1.0, 3.0]])
    codewords = torch.tensor([[[0.0, 0.0], [100.0, 100.0]]])  # the second wins no sample
    ids, err = assign(x, codewords)
    assert ids.tolist() == [[0, 0, 0, 0]]
    assert reseed(codewords, torch.tensor([[False, True]]), x, w, err) == 1
    torch.testing.assert_close(codewords[0, 1], x[0, 3])  # largest weighted error: weight 3
    fit = kmeans(x, 2, weights=w)
    assert _objective(x, w, fit.codewords) < 0.1


def test_gskm_codeword_is_the_weighted_mean_of_its_members() -> None:
    """With shape = normalized member sum and gain = mean projection, g s is the members' weighted mean."""
    x, w = _data(seed=5)
    fit = gskm(x, 12, weights=w, iters=50)
    ids = fit.assignment
    for k in range(12):
        members = ids[0] == k
        if members.any():
            mean = (w[0, members, None] * x[0, members]).sum(0) / w[0, members].sum()
            torch.testing.assert_close(fit.codewords[0, k], mean, rtol=1e-4, atol=1e-4)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="B, n, d"):
        gskm(torch.randn(10, 4), 2)
    with pytest.raises(ValueError, match="weights"):
        kmeans(torch.randn(1, 10, 4), 2, weights=torch.ones(1, 9))
