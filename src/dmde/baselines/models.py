"""Baselines the paper compares the mixture with (§V; docs/METHOD.md, "Baselines"), and a MAC counter to size them.

* :class:`FlatClassifier` — "AlexNet Extension": one backbone with an N-way linear softmax.
* :class:`FlatEnsemble` — G flat models with their probabilities averaged (equal compute).
* :class:`EarlyFusion` — the experts' penultimate features concatenated, one N-way layer on top
  (Table IV's "early fusion"); experts frozen by default.
* :func:`width_matched_flat` — a flat model as wide as it takes to cost as many multiply-adds per
  image as the whole mixture (G experts + heads + N-way layer), within a tolerance.
* :func:`count_flops` — multiply-accumulates of every ``nn.Conv*`` and ``nn.Linear`` call,
  counted with forward hooks (runs on the ``meta`` device, so huge models cost no memory).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dmde.core.errors import DmdeValueError
from dmde.experts.backbones import _REGISTRY, create_backbone
from dmde.experts.train import ExpertsConfig, uses_cached_trunk


class FlatClassifier(nn.Module):
    """"AlexNet Extension" (§V): ``backbone`` (B, 3, H, W) → (B, d), then Linear(d, N) → logits."""

    def __init__(self, backbone: nn.Module, n_classes: int) -> None:
        super().__init__()
        if n_classes < 1:
            raise DmdeValueError(f"n_classes must be positive, got {n_classes}")
        self.backbone = backbone
        self.classifier = nn.Linear(int(backbone.num_features), n_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)  # (B, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.backbone(x))  # (B, N)


def flat_model(e: ExpertsConfig, n: int, width: dict[str, Any] | None = None) -> nn.Module:
    """The flat network of a run: the experts' backbone (its cached trunk too) with one N-way
    softmax; ``width`` (a width-matched flat model's record) widens the backbone."""
    kw = dict(e.backbone_kwargs)
    if width is not None:
        kw[width["width_arg"]] = width["width"]
    backbone = create_backbone(e.backbone, **kw)
    if uses_cached_trunk(e):
        backbone.use_cached_trunk()
    return FlatClassifier(backbone, n)


class FlatEnsemble(nn.Module):
    """G flat models, their softmax probabilities averaged: logits = log((1/G) Σ_g softmax(f_g(x))).
    The equal-compute reference for a mixture of G experts (the same backbone G times)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) == 0:
            raise DmdeValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.stack([torch.softmax(m(x), dim=-1) for m in self.members]).mean(0)  # (B, N)
        return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))


class EarlyFusion(nn.Module):
    """Early fusion (Table IV): concat_j ``expert.features(x)`` (B, Σ d_j) → Linear → (B, N).

    With ``train_experts=False`` (default) the experts get no gradients, run under ``no_grad`` and
    stay in eval mode whatever ``.train()`` says; only the N-way layer learns.
    """

    def __init__(self, experts: Sequence[nn.Module], n_classes: int, train_experts: bool = False) -> None:
        super().__init__()
        if len(experts) == 0:
            raise DmdeValueError("early fusion needs at least one expert")
        self.experts = nn.ModuleList(experts)
        self.train_experts = train_experts
        dims = [_feature_dim(e) for e in experts]
        self.classifier = nn.Linear(sum(dims), n_classes)
        if not train_experts:
            for p in self.experts.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "EarlyFusion":
        super().train(mode)
        if not self.train_experts:
            self.experts.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.train_experts and torch.is_grad_enabled()):
            return torch.cat([e.features(x) for e in self.experts], dim=1)  # (B, Σ d_j)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, N)


def _feature_dim(expert: nn.Module) -> int:
    for obj in (expert, getattr(expert, "backbone", None)):
        if obj is not None and hasattr(obj, "num_features"):
            return int(obj.num_features)
    raise DmdeValueError(f"{type(expert).__name__} has no num_features (nor .backbone.num_features)")


def count_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates (MACs, the "FLOPs" of vision papers) of one forward pass.

    ``input_shape`` is (C, H, W) for one image or (B, C, H, W). Counts every ``nn.Conv1d/2d/3d``
    (output elements × in_channels/groups × kernel volume) and ``nn.Linear`` (output elements ×
    in_features) call; functional ops and element-wise work are not counted. The input is made on
    the module's device, so a module built under ``torch.device("meta")`` is counted for free.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    total = 0

    def conv_hook(m: nn.modules.conv._ConvNd, _inp: Any, out: Tensor) -> None:
        nonlocal total
        kernel = 1
        for k in m.kernel_size:
            kernel *= int(k)
        total += out.numel() * (m.in_channels // m.groups) * kernel

    def linear_hook(m: nn.Linear, _inp: Any, out: Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(shape, device=device))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return int(total)


#: The keyword that sets each registered backbone's width (used by :func:`width_matched_flat`).
WIDTH_ARGS = {"small_cnn": "width", "alexnet": "width_mult"}


@dataclass
class WidthMatch:
    """A width-matched flat model and how closely its MACs per image meet the mixture's."""

    model: FlatClassifier
    width_arg: str
    width: float
    macs: int
    target_macs: int

    @property
    def ratio(self) -> float:
        return self.macs / self.target_macs


def mixture_macs(
    backbone_macs: int,
    num_features: int,
    group_sizes: Sequence[int],
    n_classes: int,
    nway_kind: str = "lowrank",
    rank: int = 32,
    not_in_group: bool = True,
) -> int:
    """MACs per image of a mixture: Σ_j (backbone + head d·(M_j+1)) + the N-way layer (Eq. 10)."""
    heads = sum(num_features * (m + int(not_in_group)) for m in group_sizes)
    if nway_kind == "dense":
        nway = n_classes * n_classes
    elif nway_kind == "lowrank":
        nway = 2 * rank * n_classes + n_classes
    elif nway_kind == "none":
        nway = 0
    else:
        raise DmdeValueError(f"unknown N-way kind {nway_kind!r}; known: dense, lowrank, none")
    return len(group_sizes) * backbone_macs + heads + nway


def width_matched_flat(
    backbone_name: str,
    n_experts: int,
    n_classes: int,
    group_size: int,
    input_shape: Sequence[int] = (3, 64, 64),
    nway_kind: str = "lowrank",
    rank: int = 32,
    tol: float = 0.1,
    width_arg: str | None = None,
    **backbone_kw: Any,
) -> WidthMatch:
    """A :class:`FlatClassifier` whose MACs per image match the mixture's within ``tol``.

    The mixture: ``n_experts`` copies of ``backbone_name`` (built with ``backbone_kw``), each with
    a (``group_size`` + 1)-way head, plus the N-way layer. The flat model's width knob
    (:data:`WIDTH_ARGS`, or ``width_arg``) is searched by bisection — roughly √G times wider for
    conv-dominated backbones. Raises :class:`DmdeValueError` when no width lands within ``tol``.
    """
    if n_experts < 1 or group_size < 1:
        raise DmdeValueError("n_experts and group_size must be positive")
    arg = width_arg or WIDTH_ARGS.get(backbone_name)
    if arg is None:
        raise DmdeValueError(
            f"backbone {backbone_name!r} has no known width option; pass width_arg= "
            f"(known: {', '.join(f'{k}.{v}' for k, v in WIDTH_ARGS.items())})"
        )
    kw = {k: v for k, v in backbone_kw.items() if k != arg}

    def build(width: float | None) -> nn.Module:
        extra = {} if width is None else {arg: width}
        with torch.device("meta"):
            return create_backbone(backbone_name, **kw, **extra)

    def macs(width: float | None) -> tuple[int, int]:
        b = build(width)
        return count_flops(b, input_shape), int(b.num_features)

    base_width = backbone_kw.get(arg)
    if base_width is None:
        base_width = inspect.signature(_REGISTRY[backbone_name]).parameters[arg].default
    integer = isinstance(base_width, int)
    b_macs, d = macs(base_width)
    target = mixture_macs(b_macs, d, [group_size] * n_experts, n_classes, nway_kind, rank)

    def flat_macs(width: float) -> int:
        m, dw = macs(width)
        return m + dw * n_classes

    lo, hi = float(base_width), float(base_width) * 2
    while flat_macs(int(round(hi)) if integer else hi) < target:
        lo, hi = hi, hi * 2
        if hi > 1e4 * float(base_width):
            raise DmdeValueError("no width of the flat model reaches the mixture's MACs")
    for _ in range(40):
        if (integer and hi - lo <= 1) or (not integer and hi - lo <= 1e-3 * hi):
            break
        mid = (lo + hi) / 2
        mid = float(int(mid)) if integer else mid
        if flat_macs(mid) < target:
            lo = mid
        else:
            hi = mid
    candidates = [int(lo), int(hi)] if integer else [lo, hi]
    width = min(candidates, key=lambda w: abs(flat_macs(w) - target))
    got = flat_macs(width)
    if abs(got / target - 1) > tol:
        raise DmdeValueError(
            f"closest flat width {arg}={width} costs {got} MACs, {got / target:.2f}× the mixture's"
        )
    model = FlatClassifier(create_backbone(backbone_name, **kw, **{arg: width}), n_classes)
    return WidthMatch(model=model, width_arg=arg, width=width, macs=got, target_macs=target)
