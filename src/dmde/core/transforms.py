"""Image transforms on torch tensors (no torchvision), for one image (3, H, W) or a batch (B, 3, H, W).

Written for whole batches so a training loop can collate uint8 images first and augment per batch:
with 2 CPU cores, per-sample Python transforms would cost more than the small CNNs they feed.
Random transforms take a ``torch.Generator`` so augmentation is reproducible.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from dmde.core.errors import DmdeValueError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Size = int | tuple[int, int]


def _as_batch(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(3, H, W) → (1, 3, H, W); returns whether a batch dim was added."""
    if x.dim() == 3:
        return x.unsqueeze(0), True
    if x.dim() == 4:
        return x, False
    raise DmdeValueError(f"expected an image (C, H, W) or a batch (B, C, H, W), got shape {tuple(x.shape)}")


def _pair(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] → float32 in [0, 1]; float tensors pass through unchanged."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left–right (last dimension)."""
    return x.flip(-1)


def random_horizontal_flip(
    x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Flip each image of the batch independently with probability ``p``."""
    xb, squeezed = _as_batch(x)
    flip = torch.rand(xb.shape[0], generator=generator) < p  # (B,)
    out = torch.where(flip.view(-1, 1, 1, 1).to(xb.device), xb.flip(-1), xb)
    return out[0] if squeezed else out


def random_crop_with_padding(
    x: torch.Tensor,
    padding: int,
    generator: torch.Generator | None = None,
    mode: str = "constant",
) -> torch.Tensor:
    """Pad by ``padding`` on every side, then crop back to (H, W) at a random offset per image.

    ``mode`` is ``F.pad``'s: ``"constant"`` (zeros, the CIFAR recipe) or ``"reflect"``.
    """
    if padding < 0:
        raise DmdeValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    xb, squeezed = _as_batch(x)
    b, c, h, w = xb.shape
    padded = F.pad(xb if mode == "constant" else xb.float(), (padding,) * 4, mode=mode).to(xb.dtype)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)  # (B,)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h)).to(xb.device)  # (B, H)
    cols = (ox[:, None] + torch.arange(w)).to(xb.device)  # (B, W)
    bi = torch.arange(b, device=xb.device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: (B, H, W, C) → (B, C, H, W).
    out = padded[bi, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    return out[0] if squeezed else out


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x − mean) / std per channel (channel dim −3); uint8 input is scaled to [0, 1] first."""
    x = to_float(x)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    if torch.any(s <= 0):
        raise DmdeValueError(f"std must be positive, got {list(std)}")
    return (x - m) / s


def center_crop_resize(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Keep the aspect ratio: crop the largest centred window of the target's shape, then
    :func:`resize` it to ``size`` (a 20×40 image for 16×16 loses 10 columns each side, not its shape)."""
    h, w = _pair(size)
    H, W = int(x.shape[-2]), int(x.shape[-1])
    if H * w > W * h:  # too tall for the target's shape
        ch, cw = max(1, round(W * h / w)), W
    else:
        ch, cw = H, max(1, round(H * w / h))
    top, left = (H - ch) // 2, (W - cw) // 2
    return resize(x[..., top : top + ch, left : left + cw], (h, w))


def resize(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear resize with antialiasing (for shrinking) to ``size``; keeps the dtype (uint8 is rounded)."""
    h, w = _pair(size)
    xb, squeezed = _as_batch(x)
    if xb.shape[-2:] == (h, w):
        return x
    y = F.interpolate(xb.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    if x.dtype == torch.uint8:
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    else:
        y = y.to(x.dtype)
    return y[0] if squeezed else y


