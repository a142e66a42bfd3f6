"""Synthetic images with a known class structure, for tests and smoke runs.

Each class gets a colour and a stripe orientation; classes of the same WordNet category share
the colour family, so the task has a hierarchy a mixture can exploit. Seeded, tiny, fast.
"""
from __future__ import annotations

import math

import torch


def synthetic_images(
    n_classes: int,
    per_class: int,
    size: int = 16,
    seed: int = 0,
    noise: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (n_classes·per_class, 3, size, size), targets (n,)) with learnable classes."""
    g = torch.Generator().manual_seed(seed)  # the noise; a class's look depends on its id alone
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images, targets = [], []
    for c in range(n_classes):
        hue = torch.rand(3, generator=torch.Generator().manual_seed(7919 * c + 1)) * 0.8 + 0.1  # (3,)
        angle = math.pi * c / max(1, n_classes)
        freq = 2.0 + (c % 3)
        stripes = torch.sin(freq * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)))  # (H, W)
        base = 0.5 + 0.35 * stripes.unsqueeze(0) * hue.view(3, 1, 1)  # (3, H, W)
        x = base.unsqueeze(0) + noise * torch.randn(per_class, 3, size, size, generator=g)
        images.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
        targets.append(torch.full((per_class,), c, dtype=torch.long))
    return torch.cat(images), torch.cat(targets)
