"""Deep multi-task learning inside a task group (§IV-B, Eqs. 2–6).

The head of expert j has one weight row per class of its group, W_k = W_0 + V_k (k = 1..M_j), with
W_0 shared by the group and V_k class-specific, plus a free row for "not in group" and a bias.
Its loss (Eq. 6):

    loss = μ · CE(softmax(W x + b), y) + δ1 · Σ_k ‖W_k‖² + (δ2 / 2) · Tr(W L Wᵀ)

with L = diag(S·1) − S the Laplacian of the visual similarity S (Eq. 3, :mod:`dmde.experts.similarity`)
and Tr(W L Wᵀ) = ½ Σ_kl S_kl ‖W_k − W_l‖² (Eq. 5) over the M_j real classes only. Since
W_k − W_l = V_k − V_l, the Laplacian term pulls the V's of visually similar classes together and
never acts on W_0.

Defaults (the paper leaves them open): μ = 1, δ1 = 1e-4, δ2 = 1e-3; small, so that with
S ∈ [0, 1] the regularisers shape the head without dominating the cross-entropy.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dmde.core.errors import DmdeValueError

__all__ = ["laplacian", "laplacian_trace", "multitask_penalty", "multitask_loss", "MultiTaskHead", "MU", "DELTA1", "DELTA2"]

MU = 1.0  # weight of the cross-entropy
DELTA1 = 1e-4  # weight of Σ_k ‖W_k‖² (Eq. 4)
DELTA2 = 1e-3  # weight of Tr(W L Wᵀ) (Eq. 5), halved in the loss


def laplacian(S: torch.Tensor) -> torch.Tensor:
    """Graph Laplacian L = diag(S·1) − S of a similarity matrix S (M, M)."""
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise DmdeValueError(f"similarity must be a square matrix, got shape {tuple(S.shape)}")
    return torch.diag(S.sum(dim=1)) - S


def laplacian_trace(W: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Tr(W L Wᵀ) = ½ Σ_kl S_kl ‖W_k − W_l‖² (Eq. 5) for class weights W (M, d) as rows.

    Computed as Σ_kl L_kl ⟨W_k, W_l⟩ with the symmetrised S (equal to S for a similarity matrix),
    in O(M² d) time without forming the (M, M, d) differences. Gradient: 2 L W.
    """
    if W.dim() != 2 or S.shape != (W.shape[0], W.shape[0]):
        raise DmdeValueError(
            f"class weights (M, d) and similarity (M, M) do not match: {tuple(W.shape)} vs {tuple(S.shape)}"
        )
    S = 0.5 * (S + S.transpose(0, 1)).to(W.dtype)
    L = laplacian(S)  # (M, M)
    return (W * (L @ W)).sum()


def multitask_penalty(
    class_weights: torch.Tensor,
    S: torch.Tensor | None = None,
    delta1: float = DELTA1,
    delta2: float = DELTA2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The regularisers of Eq. 6: δ1·Σ_k ‖W_k‖² + (δ2/2)·Tr(W L Wᵀ), for class weights (M, d) and
    S (M, M) or None (no Laplacian term). Returns (penalty, Σ_k ‖W_k‖², Tr(W L Wᵀ)): the parts
    unweighted, zero where their δ is 0. Used by the expert loss and by end-to-end fine-tuning."""
    zero = class_weights.new_zeros(())
    norm = class_weights.pow(2).sum() if delta1 else zero
    lap = laplacian_trace(class_weights, S) if (S is not None and delta2) else zero
    return delta1 * norm + 0.5 * delta2 * lap, norm, lap


def multitask_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor,
    S: torch.Tensor | None = None,
    mu: float = MU,
    delta1: float = DELTA1,
    delta2: float = DELTA2,
    label_smoothing: float = 0.0,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Multi-task loss of Eq. 6: μ·CE + δ1·Σ_k ‖W_k‖² + (δ2/2)·Tr(W L Wᵀ).

    ``logits`` (B, M(+1)), ``target`` (B,) in 0..M (M = not in group), ``class_weights`` (M, d) the
    rows W_k of the real classes (``MultiTaskHead.class_weights``), ``S`` (M, M) or None (no
    Laplacian term). The cross-entropy is the batch mean. With ``return_parts`` also returns
    ``{"ce", "norm", "laplacian"}`` (unweighted).
    """
    ce = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    penalty, norm, lap = multitask_penalty(class_weights, S, delta1, delta2)
    total = mu * ce + penalty
    if return_parts:
        return total, {"ce": ce.detach(), "norm": norm.detach(), "laplacian": lap.detach()}
    return total


class MultiTaskHead(nn.Module):
    """The expert's last layer: logits = W x + b with W = [W_0 + V_1; …; W_0 + V_M; w_nig].

    Parameters: ``w0`` (d,) shared row, zero at start; ``v`` (M, d) class rows, initialised like
    ``nn.Linear``; ``not_in_group_weight`` (d,) the free "not in group" row (when
    ``not_in_group``); ``bias`` (M + 1,) or (M,). ``multitask=False`` gives a plain linear layer
    (one ``plain_weight`` (M(+1), d)), the "without multi-task learning" ablation (use δ1 = δ2 = 0).
    """

    def __init__(self, in_features: int, n_classes: int, not_in_group: bool = True, multitask: bool = True) -> None:
        super().__init__()
        if n_classes < 1 or in_features < 1:
            raise DmdeValueError(f"head needs n_classes >= 1 and in_features >= 1, got {n_classes}, {in_features}")
        self.in_features = int(in_features)
        self.n_classes = int(n_classes)
        self.not_in_group = bool(not_in_group)
        self.multitask = bool(multitask)
        self.n_outputs = self.n_classes + int(self.not_in_group)
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default range
        d, M = self.in_features, self.n_classes

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        if self.multitask:
            self.w0 = nn.Parameter(torch.zeros(d))
            self.v = uniform(M, d)
            self.not_in_group_weight = uniform(d) if self.not_in_group else None
        else:
            self.plain_weight = uniform(self.n_outputs, d)
        self.bias = uniform(self.n_outputs)

    @property
    def class_weights(self) -> torch.Tensor:
        """Rows W_k of the M real classes, (M, d): W_0 + V_k (the plain head's first M rows)."""
        if self.multitask:
            return self.w0.unsqueeze(0) + self.v  # (M, d)
        return self.plain_weight[: self.n_classes]

    @property
    def weight(self) -> torch.Tensor:
        """The full weight matrix (M(+1), d): the class rows, then the not-in-group row."""
        if not self.multitask:
            return self.plain_weight
        if self.not_in_group:
            return torch.cat([self.class_weights, self.not_in_group_weight.unsqueeze(0)])  # (M + 1, d)
        return self.class_weights

    @torch.no_grad()
    def set_class_rows(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set the M class rows W_k (M, d) and their biases (M,): W_0 = 0 and V_k = W_k (or the
        plain head's first M rows); the not-in-group row and bias are left as they are."""
        m, d = self.n_classes, self.in_features
        if tuple(weight.shape) != (m, d) or tuple(bias.shape) != (m,):
            raise DmdeValueError(f"class rows must be ({m}, {d}) and ({m},), got {tuple(weight.shape)}, "
                                 f"{tuple(bias.shape)}")
        if self.multitask:
            self.w0.zero_()
            self.v.copy_(weight)
        else:
            self.plain_weight[:m].copy_(weight)
        self.bias[:m].copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (B, M(+1))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, n_classes={self.n_classes}, "
            f"not_in_group={self.not_in_group}, multitask={self.multitask}"
        )
