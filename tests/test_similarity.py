"""Visual similarity S (Eq. 3) with known answers."""
from __future__ import annotations

import math

import pytest
import torch

from dmde.core.errors import DmdeValueError
from dmde.experts.similarity import median_sq_distance, visual_similarity


def _point_classes(points: torch.Tensor, reps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k = ``reps`` copies of points[k]."""
    feats = points.repeat_interleave(reps, dim=0)  # (M * reps, d)
    labels = torch.arange(points.shape[0]).repeat_interleave(reps)
    return feats, labels


def test_single_point_classes_known_answer():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    feats, labels = _point_classes(points, reps=5)
    S = visual_similarity(feats, labels, 3, per_class=4, bandwidth=2.0)
    d2 = torch.cdist(points, points).pow(2)
    expected = torch.exp(-d2 / 2.0)
    expected.fill_diagonal_(0)
    assert torch.allclose(S, expected, atol=1e-12)


def test_median_bandwidth_known_answer():
    # Three classes, one point each repeated 4 times: 66 pairs, 18 within a class (d² = 0), 16 at
    # d² = 1, 16 at d² = 4, 16 at d² = 5; the 33rd and 34th smallest are both 1, so h = 1.
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    feats, labels = _point_classes(points, reps=4)
    assert median_sq_distance(feats) == 1.0
    S = visual_similarity(feats, labels, 3)
    assert math.isclose(float(S[0, 1]), math.exp(-1.0), rel_tol=1e-9)
    assert math.isclose(float(S[0, 2]), math.exp(-4.0), rel_tol=1e-9)
    assert math.isclose(float(S[1, 2]), math.exp(-5.0), rel_tol=1e-9)
    # All points equal: the median and the mean are 0, so h falls back to 1.
    assert median_sq_distance(torch.ones(5, 3)) == 1.0


def test_identical_classes_are_most_similar():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(20, 8, generator=gen)
    feats = torch.cat([base, base, base + 3.0, torch.randn(20, 8, generator=gen) - 3.0])  # classes 0 == 1
    labels = torch.arange(4).repeat_interleave(20)
    S = visual_similarity(feats, labels, 4, per_class=20)
    off = S + torch.diag(torch.full((4,), -1.0))
    assert torch.equal(torch.tensor(divmod(int(off.argmax()), 4)), torch.tensor((0, 1)))


def test_symmetric_zero_diagonal_range_and_empty_class():
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(200, 16, generator=gen)
    labels = torch.randint(0, 6, (200,), generator=gen)
    labels[labels == 4] = 5  # class 4 empty
    S = visual_similarity(feats, labels, 7, per_class=8, generator=torch.Generator().manual_seed(2))
    assert S.shape == (7, 7) and S.dtype == torch.float32
    assert torch.equal(S, S.T)
    assert torch.equal(torch.diag(S), torch.zeros(7))
    assert (S >= 0).all() and (S <= 1).all()
    assert torch.equal(S[4], torch.zeros(7)) and torch.equal(S[6], torch.zeros(7))  # empty classes
    assert (S[0, 1:4] > 0).all()


def test_subsample_is_seeded_and_blocks_do_not_change_the_result():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (300,), generator=gen)

    def run(block: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(7)
        return visual_similarity(feats, labels, 5, per_class=10, generator=g, block_size=block)

    a, b = run(4096), run(7)
    assert torch.allclose(a, b, atol=1e-12)
    # With every sample kept, the result matches the explicit double sum.
    S = visual_similarity(feats, labels, 5, per_class=1000, bandwidth=3.0)
    k = torch.exp(-torch.cdist(feats, feats).pow(2) / 3.0)
    for i in range(5):
        for j in range(5):
            if i != j:
                expected = k[labels == i][:, labels == j].mean()
                assert torch.allclose(S[i, j], expected, atol=1e-10)


@pytest.mark.parametrize("bad", [0.0, -1.0, "mean"])
def test_bad_bandwidth(bad):
    with pytest.raises(DmdeValueError):
        visual_similarity(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), 2, bandwidth=bad)


def test_bad_labels_and_shapes():
    with pytest.raises(DmdeValueError):
        visual_similarity(torch.zeros(4, 2), torch.tensor([0, 0, 1, 2]), 2)
    with pytest.raises(DmdeValueError):
        visual_similarity(torch.zeros(4, 2), torch.tensor([0, 0, 1]), 2)
