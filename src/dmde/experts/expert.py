"""A base expert (§IV-B): a backbone CNN plus the multi-task head of its task group.

Expert j maps an image to M_j + 1 logits: its group's classes 0..M_j−1, then "not in group" last
(or M_j logits in the "without not-in-group" ablation). The head's weights follow Eqs. 2–6
(:class:`dmde.experts.multitask.MultiTaskHead`); the loss lives in :func:`dmde.experts.multitask.multitask_loss`,
never in the model.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from dmde.experts.backbones import create_backbone
from dmde.experts.multitask import MultiTaskHead

__all__ = ["Expert", "init_from_flat"]


class Expert(nn.Module):
    """``backbone`` (images → (B, d) features) followed by ``head`` (features → (B, M_j(+1)) logits)."""

    def __init__(self, backbone: nn.Module, n_classes: int, not_in_group: bool = True, multitask: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = MultiTaskHead(backbone.num_features, n_classes, not_in_group=not_in_group, multitask=multitask)

    @property
    def n_classes(self) -> int:
        """M_j, the number of the group's classes (without the not-in-group output)."""
        return self.head.n_classes

    @property
    def n_outputs(self) -> int:
        """M_j + 1 with a not-in-group output, else M_j."""
        return self.head.n_outputs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, d) of images (B, 3, H, W)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (B, M_j(+1))

    def forward_from_trunk(self, t: torch.Tensor) -> torch.Tensor:
        """Logits from the backbone's cached trunk outputs: ``head(backbone.body(t))``."""
        return self.head(self.backbone.body(t))

    @classmethod
    def build(
        cls,
        backbone: str,
        n_classes: int,
        not_in_group: bool = True,
        multitask: bool = True,
        **backbone_kwargs: Any,
    ) -> "Expert":
        """An expert over a registered backbone: ``create_backbone(backbone, **backbone_kwargs)``."""
        return cls(create_backbone(backbone, **backbone_kwargs), n_classes, not_in_group, multitask)


@torch.no_grad()
def init_from_flat(expert: Expert, flat_state: Mapping[str, torch.Tensor], group: Sequence[int]) -> Expert:
    """Start ``expert`` where a trained flat model is (HD-CNN's warm start of its fine components):
    its backbone takes the flat model's body (``backbone.*``, the same architecture), the class rows
    W_k of its head the flat classifier's rows of the group's classes (W_0 = 0, V_k = those rows)
    with their biases; the not-in-group row keeps its fresh initialisation. ``flat_state`` is a
    :class:`dmde.baselines.models.FlatClassifier` state dict, ``group`` the classes' positions."""
    prefix = "backbone."
    body = {k[len(prefix):]: v for k, v in flat_state.items() if k.startswith(prefix)}
    expert.backbone.load_state_dict(body)  # strict: another architecture is an error
    idx = torch.as_tensor(list(group), dtype=torch.long)
    expert.head.set_class_rows(flat_state["classifier.weight"][idx], flat_state["classifier.bias"][idx])
    return expert
