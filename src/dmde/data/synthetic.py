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


class HierarchicalSynthetic:
    """Synthetic images whose classes follow a two-layer hierarchy: a category sets the hue and
    the stripe direction family, a class its own offset within them, so siblings look closer than
    cousins (for simulating the paper's scale). Images are made on demand from (class, index):
    nothing is held in memory, and any image can be written into shards lazily.

    ``category_of[c]``: the category of class ``c``; ``classes``: their names.
    """

    def __init__(self, category_of, classes, per_class: int, size: int = 16, seed: int = 0, noise: float = 0.1):
        self.category_of = [int(k) for k in category_of]
        self.classes = list(classes)
        self.per_class, self.size, self.seed, self.noise = int(per_class), int(size), int(seed), float(noise)
        n = len(self.classes) * self.per_class
        self.targets = torch.arange(n) // self.per_class
        self.targets = self.targets.numpy()
        self.n_categories = max(self.category_of) + 1 if self.category_of else 0
        siblings: dict[int, list[int]] = {}
        for c, k in enumerate(self.category_of):
            siblings.setdefault(k, []).append(c)
        self._rank = {c: (i, len(members)) for members in siblings.values() for i, c in enumerate(members)}
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        self._grid = (xx, yy)

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> torch.Tensor:
        c = int(self.targets[index])
        k = self.category_of[c]
        i, m = self._rank[c]
        look = torch.rand(4, generator=torch.Generator().manual_seed(7919 * k + 1))  # the category's
        hue = look[:3] * 0.8 + 0.1
        angle = math.pi * (look[3] + 0.25 * i / max(1, m))  # siblings within a 45° sector
        freq = 2.0 + (i % 3)
        xx, yy = self._grid
        stripes = torch.sin(freq * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)))
        base = 0.5 + 0.35 * stripes.unsqueeze(0) * hue.view(3, 1, 1)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x = base + self.noise * torch.randn(3, self.size, self.size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)

    def __repr__(self) -> str:
        return f"HierarchicalSynthetic(classes={len(self.classes)}, per_class={self.per_class}, size={self.size})"
