"""Flat and early-fusion baselines (§V), MAC counting, width-matched flat model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dmde.baselines.models import (
    EarlyFusion,
    FlatClassifier,
    count_flops,
    mixture_macs,
    width_matched_flat,
)
from dmde.core.errors import DmdeValueError


class TinyBackbone(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))  # (B, width)


class TinyExpert(nn.Module):
    def __init__(self, m: int, width: int = 4) -> None:
        super().__init__()
        self.backbone = TinyBackbone(width)
        self.head = nn.Linear(width, m + 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def test_count_flops_known_conv_and_linear():
    # conv 3→8, 3×3, padding 1 on 10×10: 8·10·10 outputs × 3·9 = 21,600 MACs
    # linear 8→5: 40 MACs; grouped conv 8→8, groups 4, 1×1 on 10×10: 800 × 2 = 1,600
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1, groups=4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 5),
    )
    assert count_flops(net, (3, 10, 10)) == 21_600 + 1_600 + 40
    assert count_flops(net, (2, 3, 10, 10)) == 2 * (21_600 + 1_600 + 40)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Flatten(1), nn.Linear(300, 7))
    assert count_flops(meta, (3, 10, 10)) == 2_100


def test_flat_classifier_shape():
    model = FlatClassifier(TinyBackbone(6), 50)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 50)
    assert model.features(torch.randn(2, 3, 8, 8)).shape == (2, 6)


@pytest.mark.parametrize("train_experts", [False, True])
def test_early_fusion(train_experts):
    torch.manual_seed(0)
    experts = [TinyExpert(3, width=4), TinyExpert(2, width=5)]
    model = EarlyFusion(experts, 50, train_experts=train_experts).train()
    assert model.classifier.in_features == 9
    out = model(torch.randn(3, 3, 8, 8))
    assert out.shape == (3, 50)
    out.sum().backward()
    assert model.classifier.weight.grad is not None
    conv_grad = experts[0].backbone.conv.weight.grad
    assert (conv_grad is not None) == train_experts
    assert experts[0].training == train_experts


def test_mixture_macs_formula():
    # 2 experts × (100 + head 4·(3+1)) + lowrank N-way 2·r·N + N with N = 6, r = 2
    assert mixture_macs(100, 4, [3, 3], 6, "lowrank", rank=2) == 2 * 100 + 2 * 16 + 2 * 2 * 6 + 6
    assert mixture_macs(100, 4, [3, 3], 6, "dense") == 2 * 100 + 2 * 16 + 36


def test_width_matched_flat_small_cnn():
    match = width_matched_flat("small_cnn", n_experts=4, n_classes=40, group_size=20,
                               input_shape=(3, 16, 16), width=8, tol=0.1)
    assert match.width_arg == "width"
    assert abs(match.ratio - 1) <= 0.1
    assert 8 < match.width <= 24  # ≈ √4 × wider
    assert match.model(torch.randn(1, 3, 16, 16)).shape == (1, 40)
    assert count_flops(match.model, (3, 16, 16)) == match.macs


def test_width_matched_flat_unknown_width():
    with pytest.raises(DmdeValueError):
        width_matched_flat("efficientnet_lite0", 2, 10, 5)


def test_early_fusion_over_dmde_experts():
    from dmde.experts.expert import Expert

    torch.manual_seed(0)
    experts = [Expert.build("small_cnn", m, width=4) for m in (3, 5)]
    model = EarlyFusion(experts, 7)
    assert model.classifier.in_features == 2 * experts[0].backbone.num_features
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
