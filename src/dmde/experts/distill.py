"""The flat model's knowledge as soft targets for an expert (an addition to §IV-B, issue #10).

The paper trains each expert on hard labels alone (Eq. 6). With ``experts.distill = α > 0`` an
expert also learns the trained flat model's distribution over its own outputs (knowledge
distillation, Hinton, Vinyals & Dean 2015):

    loss = (1 − α) · μ · CE(p, y) + α · T² · KL(q_T ‖ p_T) + δ1 · Σ_k ‖W_k‖² + (δ2 / 2) · Tr(W L Wᵀ)

with p_T = softmax(z / T) of the expert's logits z (M_j + 1 outputs) and q_T the flat model's
softmax at the same temperature over the N classes, *folded* onto the expert's outputs: the
probabilities of the group's M_j classes as they are, and the rest summed into "not in group"
(:func:`fold_to_group`); with ``experts.distill_membership=label`` an image of the group's classes
puts all of it on them instead (:func:`soft_targets`). The T² keeps the gradient's scale
independent of T. The flat model is the teacher that the run trains anyway as its baseline, so the
experts then depend on it (``experts.init=flat`` does too).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from dmde.core.errors import DmdeValueError

__all__ = ["fold_to_group", "distillation_loss", "soft_targets"]


def fold_to_group(probs: torch.Tensor, group: Sequence[int], not_in_group: bool = True) -> torch.Tensor:
    """An N-class distribution (B, N) as one over an expert's outputs: the columns of ``group``
    (in its order), then the mass of every other class as "not in group" (B, M + 1). Without a
    not-in-group output the group's columns are renormalised to sum to 1 (B, M)."""
    if probs.dim() != 2:
        raise DmdeValueError(f"probabilities must be (B, N), got shape {tuple(probs.shape)}")
    idx = torch.as_tensor(list(group), dtype=torch.long, device=probs.device)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= probs.shape[1]:
        raise DmdeValueError(f"group classes must lie in 0..{probs.shape[1] - 1}, got {list(group)[:8]}")
    inside = probs.index_select(1, idx)
    if not not_in_group:
        return inside / inside.sum(dim=1, keepdim=True).clamp_min(1e-12)
    rest = (probs.sum(dim=1, keepdim=True) - inside.sum(dim=1, keepdim=True)).clamp_min(0.0)
    return torch.cat([inside, rest], dim=1)


def soft_targets(teacher_logits: torch.Tensor, group: Sequence[int], temperature: float,
                 not_in_group: bool = True, in_group: torch.Tensor | None = None) -> torch.Tensor:
    """q_T of the module docstring: softmax(teacher_logits / T) over the N classes, folded onto the
    expert's outputs (:func:`fold_to_group`).

    ``in_group`` (B,) bool, the rows whose label is one of the group's classes (membership from the
    label, ``experts.distill_membership=label``): those rows keep the teacher's distribution over the
    group's classes, renormalised, and put nothing on "not in group" — whether an image is in the
    group is known from its label, only the shape inside the group is the teacher's. The other rows
    keep the folded distribution."""
    if temperature <= 0:
        raise DmdeValueError(f"the distillation temperature must be > 0, got {temperature}")
    q = fold_to_group(torch.softmax(teacher_logits.float() / temperature, dim=1), group, not_in_group)
    if in_group is None or not not_in_group:
        return q
    if in_group.shape != (q.shape[0],):
        raise DmdeValueError(f"in_group must be ({q.shape[0]},), got shape {tuple(in_group.shape)}")
    inside = q[:, :-1] / q[:, :-1].sum(dim=1, keepdim=True).clamp_min(1e-12)
    member = torch.cat([inside, torch.zeros_like(q[:, -1:])], dim=1)
    return torch.where(in_group.to(q.device).unsqueeze(1), member, q)


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(q_T ‖ softmax(logits / T)), the batch mean; ``targets`` q_T (B, C) rows summing to 1,
    ``logits`` (B, C) the student's. Zero exactly when the student's tempered softmax is q_T."""
    if logits.shape != targets.shape:
        raise DmdeValueError(f"logits {tuple(logits.shape)} and soft targets {tuple(targets.shape)} differ")
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    return F.kl_div(log_p, targets.float(), reduction="batchmean") * temperature ** 2
