"""Expert = backbone + multi-task head: logits of shape (B, M_j + 1)."""
from __future__ import annotations

import pytest
import torch

from dmde.core.config import from_dict
from dmde.core.errors import DmdeValueError
from dmde.experts.backbones import create_backbone
from dmde.experts.expert import Expert
from dmde.experts.multitask import MultiTaskHead, multitask_loss
from dmde.experts.train import ExpertsConfig, build_expert


@pytest.mark.parametrize("not_in_group,n_out", [(True, 51), (False, 50)])
def test_expert_logits_shape(not_in_group, n_out):
    e = Expert(create_backbone("small_cnn", width=8), 50, not_in_group=not_in_group)
    x = torch.randn(3, 3, 32, 32)
    assert e(x).shape == (3, n_out)
    assert e.n_outputs == n_out and e.n_classes == 50
    assert e.features(x).shape == (3, 32)
    assert isinstance(e.head, MultiTaskHead)


def test_forward_from_trunk_matches_forward():
    e = Expert.build("small_cnn", 7, width=8, trainable_stages=1, freeze_trunk=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = e.backbone.trunk(x)  # what a cache stores
        assert torch.allclose(e.forward_from_trunk(t), e(x), atol=1e-6)


def test_build_expert_from_the_stage_config():
    cfg = ExpertsConfig(backbone="alexnet", backbone_kwargs=dict(width_mult=0.125, fc_dim=32), multitask=False)
    e = build_expert(cfg, 50)
    assert e.backbone.num_features == 32 and not e.head.multitask
    assert e(torch.randn(2, 3, 64, 64)).shape == (2, 51)
    e2 = build_expert(ExpertsConfig(backbone="small_cnn", backbone_kwargs={"width": 4}, not_in_group=False), 5)
    assert e2(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(DmdeValueError, match="unknown config key"):
        from_dict(ExpertsConfig, {"backbone": "small_cnn", "depth": 3})


def test_expert_trains_end_to_end():
    torch.manual_seed(0)
    e = Expert.build("small_cnn", 3, width=4)
    x = torch.randn(16, 3, 16, 16)
    y = torch.arange(16) % 4  # label 3 = not in group
    S = torch.tensor([[0.0, 0.2, 0.1], [0.2, 0.0, 0.3], [0.1, 0.3, 0.0]])
    opt = torch.optim.AdamW(e.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = multitask_loss(e(x), y, e.head.class_weights, S)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in e.backbone.parameters())  # gradients reach the CNN
