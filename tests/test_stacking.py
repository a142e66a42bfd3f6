"""Stacking functions Υ (Eqs. 7–9, 12–13) against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from dmde.core.errors import DmdeValueError, MismatchError
from dmde.fusion.stacking import GroupLayout, stack

# N = 3 classes, two experts: G_0 = {0, 1}, G_1 = {1, 2}.
# Expert 0: p(c0) = 0.5, p(c1) = 0.3, φ_0 = 0.2 → odds (1 − φ)/φ = 4
# Expert 1: p(c1) = 0.1, p(c2) = 0.4, φ_1 = 0.5 → odds 1
GROUPS = [[0, 1], [1, 2]]
PROBS = [torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[0.1, 0.4, 0.5]])]
EXPECTED = {
    # Υ(0) = 0.5·4; Υ(1) = 0.3·4 + 0.1·1; Υ(2) = 0.4·1
    "eq7": [2.0, 1.3, 0.4],
    # λ = 0.5: Υ(0) = 0.5·0.5·0.2; Υ(1) = 0.5·(0.3·0.2 + 0.1·0.5); Υ(2) = 0.5·0.4·0.5
    "stack2": [0.05, 0.055, 0.1],
    # in-group probabilities only
    "sum": [0.5, 0.4, 0.4],
    # log of Eq. 7
    "eq7_log": [math.log(2.0), math.log(1.3), math.log(0.4)],
    # product of the experts, log(N − M_j) = log 1 = 0: Υ(0) = log(0.5/0.2);
    # Υ(1) = log(0.3/0.2) + log(0.1/0.5); Υ(2) = log(0.4/0.5)
    "poe": [math.log(2.5), math.log(0.3), math.log(0.8)],
}


@pytest.fixture
def layout() -> GroupLayout:
    return GroupLayout.from_groups(GROUPS, 3)


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_hand_computed_two_experts(layout, variant):
    P = layout.pad_probs(PROBS)
    out = stack(P, layout, variant, lam=0.5)
    assert out.shape == (1, 3)
    torch.testing.assert_close(out, torch.tensor([EXPECTED[variant]]), rtol=1e-5, atol=1e-6)


def test_unequal_groups_padding_moves_not_in_group_last():
    # N = 4, G_0 = {2, 0, 1} (order kept), G_1 = {3, 2}: Mmax = 3, expert 1 is padded.
    layout = GroupLayout.from_groups([[2, 0, 1], [3, 2]], 4)
    probs = [torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([[0.6, 0.2, 0.2]])]
    P = layout.pad_probs(probs)
    assert P.shape == (1, 2, 4)
    torch.testing.assert_close(P[0, 1], torch.tensor([0.6, 0.2, 0.0, 0.2]))  # φ_1 moved to col 3
    torch.testing.assert_close(P[..., -1], torch.tensor([[0.4, 0.2]]))
    # odds: expert 0 → 0.6/0.4 = 1.5, expert 1 → 0.8/0.2 = 4
    # Υ(0) = 0.2·1.5, Υ(1) = 0.3·1.5, Υ(2) = 0.1·1.5 + 0.2·4, Υ(3) = 0.6·4
    torch.testing.assert_close(stack(P, layout, "eq7"), torch.tensor([[0.3, 0.45, 0.95, 2.4]]))
    assert layout.coverage().tolist() == [1, 1, 2, 1]
    assert layout.groups == [[2, 0, 1], [3, 2]]


def test_sum_accepts_experts_without_not_in_group(layout):
    P = layout.pad([p[:, :2] for p in PROBS])  # (B, G, Mmax): M_j outputs only
    assert P.shape == (1, 2, 2)
    torch.testing.assert_close(stack(P, layout, "sum"), torch.tensor([EXPECTED["sum"]]))
    with pytest.raises(MismatchError):
        stack(P, layout, "eq7")  # Eq. 7 needs φ


@pytest.mark.parametrize("variant", ["eq7", "eq7_log", "poe"])
def test_phi_zero_is_clamped_and_finite(layout, variant):
    probs = [torch.tensor([[0.7, 0.3, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])]  # φ = 0, p = 0
    out = stack(layout.pad_probs(probs), layout, variant, eps=1e-4)
    assert torch.isfinite(out).all()
    if variant == "eq7":
        odds = (1 - 1e-4) / 1e-4  # the clamp bounds the odds
        torch.testing.assert_close(out, torch.tensor([[0.7 * odds, 0.3 * odds, odds]]))


def test_eq7_log_keeps_order_when_phi_is_one():
    # φ_0 rounds to exactly 1 in float32 (as a saturated softmax does): Eq. 7 zeroes group 0,
    # the log variant still ranks c1 (p = 2e-9) above c0 (p = 1e-9).
    layout = GroupLayout.from_groups([[0, 1], [2]], 3)
    P = layout.pad_probs([torch.tensor([[1e-9, 2e-9, 1.0]]), torch.tensor([[0.5, 0.5]])])
    torch.testing.assert_close(stack(P, layout, "eq7"), torch.tensor([[0.0, 0.0, 0.5]]))
    out = stack(P, layout, "eq7_log")
    assert torch.isfinite(out).all() and out[0, 2] > out[0, 1] > out[0, 0]


def test_eq7_log_is_log_of_eq7_random():
    torch.manual_seed(0)
    groups = [[0, 1, 2, 3], [2, 3, 4], [4, 5, 0]]
    layout = GroupLayout.from_groups(groups, 6)
    probs = [torch.softmax(torch.randn(5, len(g) + 1), -1) for g in groups]
    P = layout.pad_probs(probs)
    torch.testing.assert_close(stack(P, layout, "eq7_log"), torch.log(stack(P, layout, "eq7")))


def test_uncovered_class_and_gradient():
    layout = GroupLayout.from_groups([[0, 1]], 3)  # class 2 in no group
    P = layout.pad_probs([torch.tensor([[0.5, 0.3, 0.2]], requires_grad=True)])
    assert stack(P, layout, "eq7")[0, 2] == 0
    for variant in ("eq7_log", "poe"):
        out = stack(P, layout, variant)
        assert torch.isfinite(out).all() and out[0, 2] < out[0, 1]
    out.sum().backward()


def test_pad_is_differentiable(layout):
    probs = [p.clone().requires_grad_(True) for p in PROBS]
    stack(layout.pad_probs(probs), layout, "eq7").sum().backward()
    # dΥ/dp_0(c0) = odds_0 = 4; dΣΥ/dφ_1 = −(0.1 + 0.4)/φ_1² = −2
    torch.testing.assert_close(probs[0].grad[0, 0], torch.tensor(4.0))
    torch.testing.assert_close(probs[1].grad[0, 2], torch.tensor(-2.0))


def test_bad_inputs(layout):
    with pytest.raises(DmdeValueError):
        GroupLayout.from_groups([[0, 3]], 3)
    with pytest.raises(DmdeValueError):
        GroupLayout.from_groups([[0, 0]], 3)
    with pytest.raises(DmdeValueError):
        GroupLayout.from_groups([[]], 3)
    with pytest.raises(MismatchError):
        layout.pad_probs(PROBS[:1])
    with pytest.raises(MismatchError):
        layout.pad_probs([PROBS[0], PROBS[1][:, :1]])
    with pytest.raises(DmdeValueError):
        stack(layout.pad_probs(PROBS), layout, "eq99")


def test_equal_sizes_padding_is_a_transpose():
    """Every M_j = Mmax: P is the experts' outputs side by side, the fast path of Mixture."""
    equal = GroupLayout.from_groups([[0, 1], [1, 2], [2, 0]], 3)
    unequal = GroupLayout.from_groups([[0, 1, 2], [2, 3]], 4)
    assert equal.equal_sizes and equal.sizes_list == [2, 2, 2]
    assert not unequal.equal_sizes and unequal.sizes_list == [3, 2]
    out = torch.randn(3, 4, 3)  # (G, B, M+1)
    torch.testing.assert_close(equal.pad(list(out.unbind(0))), out.transpose(0, 1))
    assert equal.to("cpu").equal_sizes


def test_poe_is_the_product_of_the_experts_full_distributions():
    """Υ_poe equals, up to one constant per image, Σ_j log q_j(i) with q_j the expert's
    distribution over all N classes: p_j on its group, φ_j/(N − M_j) on every other class."""
    g = torch.Generator().manual_seed(0)
    groups, n = [[0, 3, 5], [1, 2], [2, 4, 5, 6]], 7
    layout = GroupLayout.from_groups(groups, n)
    probs = [torch.softmax(torch.randn(4, len(grp) + 1, generator=g), -1) for grp in groups]
    out = stack(layout.pad_probs(probs), layout, "poe")
    full = torch.zeros(4, n)
    for grp, p in zip(groups, probs):
        q = (p[:, -1:] / (n - len(grp))).expand(4, n).clone()
        q[:, grp] = p[:, :-1]
        full += q.log()
    diff = out - full
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), rtol=0, atol=1e-5)


def test_poe_does_not_let_one_sure_expert_win():
    """The failure of Eq. 7 the accounting measured: expert 0, wrong and sure of its group
    (φ = 0.01), outvotes expert 1 (φ = 0.1). Expert 2 holds expert 0's class too and says "not
    mine"; expert 3 holds the true class and agrees. The product hears all four."""
    layout = GroupLayout.from_groups([[0, 1], [2, 3], [0, 4], [2, 5]], 6)
    probs = [torch.tensor([[0.9, 0.09, 0.01]]), torch.tensor([[0.85, 0.05, 0.1]]),
             torch.tensor([[0.01, 0.09, 0.9]]), torch.tensor([[0.5, 0.1, 0.4]])]
    P = layout.pad_probs(probs)
    assert int(stack(P, layout, "eq7").argmax()) == 0  # 0.9·99 = 89 against 0.85·9 + 0.5·1.5
    assert int(stack(P, layout, "poe").argmax()) == 2
