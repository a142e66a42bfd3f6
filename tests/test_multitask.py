"""Multi-task head and loss (Eqs. 2–6) against explicit formulas."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dmde.core.errors import DmdeValueError
from dmde.experts.multitask import (
    MultiTaskHead,
    laplacian,
    laplacian_trace,
    multitask_loss,
)


def _sym_similarity(M: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    S = torch.rand(M, M, generator=gen, dtype=dtype)
    S = 0.5 * (S + S.T)
    S.fill_diagonal_(0)
    return S


def _explicit_trace(W: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    M = W.shape[0]
    total = W.new_zeros(())
    for k in range(M):
        for l in range(M):
            total = total + S[k, l] * (W[k] - W[l]).pow(2).sum()
    return 0.5 * total


def test_laplacian_known_answer():
    S = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]])
    L = laplacian(S)
    assert torch.equal(L, torch.tensor([[3.0, -1.0, -2.0], [-1.0, 4.0, -3.0], [-2.0, -3.0, 5.0]]))
    assert torch.allclose(L.sum(1), torch.zeros(3))


def test_laplacian_rejects_non_square():
    with pytest.raises(DmdeValueError):
        laplacian(torch.zeros(2, 3))


def test_laplacian_trace_equals_double_loop_and_acts_on_v_only():
    gen = torch.Generator().manual_seed(0)
    M, d = 6, 5
    W0 = torch.randn(d, generator=gen, dtype=torch.float64)
    V = torch.randn(M, d, generator=gen, dtype=torch.float64)
    S = _sym_similarity(M, gen)
    W = W0 + V  # every class row shares W0
    t = laplacian_trace(W, S)
    # the shared W0 never enters the term: laplacian_trace on the V's alone gives the same value
    assert torch.allclose(t, laplacian_trace(V, S))
    assert torch.allclose(t, _explicit_trace(W, S))
    assert torch.allclose(t, _explicit_trace(V, S))
    assert torch.allclose(t, torch.trace(W.T @ laplacian(S) @ W))


def test_laplacian_trace_gradient_matches_analytic_and_gradcheck():
    gen = torch.Generator().manual_seed(1)
    M, d = 5, 4
    S = _sym_similarity(M, gen)
    W = torch.randn(M, d, generator=gen, dtype=torch.float64, requires_grad=True)
    laplacian_trace(W, S).backward()
    L = laplacian(S)
    # Rows layout: d/dW Σ_kl L_kl <W_k, W_l> = (L + Lᵀ) W.
    assert torch.allclose(W.grad, (L + L.T) @ W.detach())
    assert torch.autograd.gradcheck(lambda w: laplacian_trace(w, S), (W.detach().clone().requires_grad_(),))


def test_laplacian_term_gives_no_gradient_to_w0():
    gen = torch.Generator().manual_seed(2)
    head = MultiTaskHead(4, 5).double()
    S = _sym_similarity(5, gen)
    laplacian_trace(head.class_weights, S).backward()
    assert torch.allclose(head.w0.grad, torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert head.v.grad.abs().sum() > 0


def test_multitask_loss_without_regularisers_is_scaled_ce():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 6, generator=gen)
    y = torch.randint(0, 6, (8,), generator=gen)
    W = torch.randn(5, 3, generator=gen)
    S = _sym_similarity(5, gen, torch.float32)
    loss = multitask_loss(logits, y, W, S, mu=0.7, delta1=0.0, delta2=0.0)
    assert torch.allclose(loss, 0.7 * F.cross_entropy(logits, y))


def test_multitask_loss_parts_add_up():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 6, (8,), generator=gen)
    W = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    S = _sym_similarity(5, gen)
    total, parts = multitask_loss(logits, y, W, S, mu=2.0, delta1=0.1, delta2=0.3, return_parts=True)
    assert torch.allclose(parts["norm"], W.pow(2).sum())
    assert torch.allclose(parts["laplacian"], _explicit_trace(W, S))
    assert torch.allclose(total, 2.0 * parts["ce"] + 0.1 * parts["norm"] + 0.15 * parts["laplacian"])
    # No S: the Laplacian term is absent.
    no_s = multitask_loss(logits, y, W, None, mu=2.0, delta1=0.1, delta2=0.3)
    assert torch.allclose(no_s, 2.0 * parts["ce"] + 0.1 * parts["norm"])


def test_multitask_loss_shape_mismatch_is_an_error():
    with pytest.raises(DmdeValueError):
        multitask_loss(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(3, 5), torch.zeros(4, 4))


@pytest.mark.parametrize("not_in_group", [True, False])
@pytest.mark.parametrize("multitask", [True, False])
def test_head_shapes_and_weights(not_in_group, multitask):
    head = MultiTaskHead(7, 50, not_in_group=not_in_group, multitask=multitask)
    x = torch.randn(3, 7)
    out = head(x)
    n_out = 51 if not_in_group else 50
    assert out.shape == (3, n_out) and head.n_outputs == n_out
    assert head.class_weights.shape == (50, 7)
    assert head.weight.shape == (n_out, 7)
    assert torch.allclose(out, x @ head.weight.T + head.bias)
    if multitask:
        assert torch.allclose(head.class_weights, head.w0 + head.v)
        assert torch.equal(head.w0, torch.zeros(7))  # W_0 starts at zero
        n_params = 7 + 50 * 7 + (7 if not_in_group else 0) + n_out
    else:
        n_params = n_out * 7 + n_out  # a plain linear layer
    assert sum(p.numel() for p in head.parameters()) == n_params


def test_head_trains_with_the_loss():
    torch.manual_seed(0)
    head = MultiTaskHead(4, 3)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # classes 0..2; never not-in-group
    S = torch.tensor([[0.0, 0.5, 0.1], [0.5, 0.0, 0.5], [0.1, 0.5, 0.0]])
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        loss = multitask_loss(head(x), y, head.class_weights, S)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
