"""All experts in one pass: G same-shaped backbones run as one G-times-wider network (issue #6).

The experts of a mixture see the same images (Eq. 7 stacks their outputs for one image). Placing
their channels side by side turns G copies of a CNN into one wide CNN whose layers are
block-diagonal over the experts:

* a convolution on the shared input concatenates the G weights along the output channels — one
  ordinary convolution instead of G;
* every later convolution takes G× the groups (a depthwise one stays depthwise, G× wider);
* BatchNorm concatenates the G weight, bias and running-statistics vectors: one call normalises
  every expert's channels with that expert's own statistics, in training mode too;
* a Linear layer applies the G weights (G, out, in) to the (B, G, in) view of its input;
* element-wise layers, pooling, Flatten and residual additions run unchanged on the wide tensor.

The wide network is a copy of one backbone on the ``meta`` device whose tensors are supplied at
call time (``torch.func.functional_call``) as the concatenation of the experts' own tensors, so
gradients flow back into each expert and updated running statistics are copied back. Tensors that
need no gradient (inference, frozen layers) are concatenated once and cached.

This is exact only for layers it knows (``Conv2d``, ``BatchNorm``, ``Linear`` and parameter-free
modules that act per channel or element-wise); :func:`wide_support` refuses other parametrised
modules, and :class:`WideBackbones` checks once, on the first batch, that its output equals the
loop's (a forward that reshapes channels by hand would fail the check) — see ``Mixture``.
"""
from __future__ import annotations

import copy
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["WideBackbones", "wide_support", "StackCache", "training_norms", "updated_buffers"]


def training_norms(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm-like submodules that will update running statistics in this forward pass."""
    return [
        (n, m) for n, m in module.named_modules()
        if isinstance(m, _NormBase) and m.training and m.track_running_stats
    ]


def updated_buffers(module: nn.Module) -> set[str]:
    """Names of the buffers a forward pass of ``module`` updates in place (running statistics)."""
    return {f"{n}.{b}" if n else b for n, m in training_norms(module) for b, _ in m.named_buffers()}


class StackCache:
    """Joined copies of the experts' tensors that need no gradient, reused across calls.

    An entry is valid while its G source tensors are the same objects, at the same version (every
    in-place change — ``optimizer.step()``, ``load_state_dict`` — bumps it) and on the same
    storage (``.to()`` and ``param.data = ...`` change it). Holds one extra copy of the cached
    weights.
    """

    def __init__(self) -> None:
        self.entries: dict[str, tuple[list[Tensor], list, Tensor]] = {}
        self.hits = self.misses = 0

    def get(self, key: str, tensors: list[Tensor], join=torch.stack) -> Tensor:
        versions = [(t._version, t.data_ptr(), t.dtype, t.device) for t in tensors]
        hit = self.entries.get(key)
        if hit is not None and versions == hit[1] and all(a is b for a, b in zip(tensors, hit[0])):
            self.hits += 1
            return hit[2]
        self.misses += 1
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside no_grad
            joined = join([t.detach() for t in tensors])
        self.entries[key] = (tensors, versions, joined)
        return joined

    def clear(self) -> None:
        self.entries.clear()


class _WideLinear(nn.Module):
    """G Linear layers at once: weight (G, out, in), bias (G, out); input (B, in) or (B, G·in)."""

    def __init__(self, src: nn.Linear, n: int) -> None:
        super().__init__()
        self.n, self.in_features = n, src.in_features
        self.weight = nn.Parameter(torch.empty(0, device="meta"))
        self.bias = None if src.bias is None else nn.Parameter(torch.empty(0, device="meta"))

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        if x.shape[-1] == self.in_features:  # the shared input: every expert reads all of it
            y = torch.einsum("...i,goi->...go", x, self.weight)
        else:
            y = torch.einsum("...gi,goi->...go", x.reshape(*lead, self.n, self.in_features), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, -1)


class _WidePointwise(nn.Module):
    """G 1×1 convolutions (stride 1, no padding, one group) at once as one batched matrix product:
    CPU grouped-convolution kernels are slow for these (measured 5–10× the loop on Lite0's body)."""

    def __init__(self, src: nn.Conv2d, n: int) -> None:
        super().__init__()
        self.n, self.in_channels, self.out_channels = n, src.in_channels, src.out_channels
        self.weight = nn.Parameter(torch.empty(0, device="meta"))
        self.bias = None if src.bias is None else nn.Parameter(torch.empty(0, device="meta"))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if c == self.in_channels:  # shared input: one ordinary 1×1 convolution
            return F.conv2d(x, self.weight, self.bias)
        wt = self.weight.reshape(self.n, self.out_channels, self.in_channels)
        y = torch.einsum("bgip,goi->bgop", x.reshape(b, self.n, self.in_channels, h * w), wt)
        if self.bias is not None:
            y = y + self.bias.reshape(1, self.n, self.out_channels, 1)
        return y.reshape(b, self.n * self.out_channels, h, w)


def _is_pointwise(m: nn.Conv2d) -> bool:
    return (m.kernel_size == (1, 1) and m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1
            and (m.padding in ((0, 0), "valid")))


def _conv_pre_hook(module: nn.Conv2d, args: tuple, *, n: int, cin: int, groups: int):
    """Set the groups of the wide convolution from what it receives: the shared input or G experts' channels."""
    x = args[0]
    if x.shape[1] == cin:  # shared input (the images, or the frozen trunk's outputs)
        if groups == 1:
            module.groups = 1  # weight (G·out, in, k, k): one ordinary convolution
            return None
        module.groups = groups * n
        return (x.repeat(1, n, 1, 1), *args[1:])
    module.groups = groups * n
    return None


def _unsupported(module: nn.Module) -> list[str]:
    known = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
    bad = []
    widened = False  # a layer with weights seen yet (registration order ≈ execution order)
    for name, m in module.named_modules():
        own = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 and not widened:
            # on the shared input every expert would get the same mask (the loop draws one each)
            bad.append(f"{name} (dropout on the shared input)")
        widened = widened or bool(own)
        if own and not isinstance(m, known):
            bad.append(f"{name or '<root>'} ({type(m).__name__})")
        elif isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or m.transposed):
            bad.append(f"{name} (padding_mode={m.padding_mode})")
        elif isinstance(m, _NormBase) and m.training and m.track_running_stats and m.momentum is None:
            bad.append(f"{name} (cumulative-average BatchNorm)")
        elif isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.Conv2d):
            bad.append(f"{name} ({type(m).__name__})")
    return bad


def wide_support(modules: Sequence[nn.Module]) -> str | None:
    """``None`` when ``modules`` can run as one wide network, else the reason they cannot."""
    if len(modules) < 2:
        return "fewer than two modules"
    base = modules[0]

    def sig(m: nn.Module) -> list:
        # shapes, and what the pass reads from expert 0 only: dtypes, devices, which tensors
        # train, which submodules are in training mode, and every module's settings
        return ([(n, tuple(t.shape), t.dtype, t.device, t.requires_grad)
                 for n, t in [*m.named_parameters(remove_duplicate=False), *m.named_buffers()]]
                + [(n, type(s).__name__, s.training, s.extra_repr()) for n, s in m.named_modules()])

    first = sig(base)
    if not all(type(m) is type(base) and sig(m) == first for m in modules[1:]):
        return "the modules differ in structure, shapes, settings or train/eval mode"
    if not first or not any(True for _ in base.parameters()):
        return "no layers with weights to widen"
    if len(list(base.named_parameters(remove_duplicate=False))) != len(list(base.parameters())):
        return "tied (shared) weights"
    bad = _unsupported(base)
    return f"layers it cannot widen: {', '.join(bad)}" if bad else None


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    if not child:
        raise ValueError("the module itself is a single layer, not a network")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


class WideBackbones:
    """Run G same-shaped modules on the same input as one wide network → (G, B, ...) outputs.

    Not an ``nn.Module`` (the experts stay the owners of their tensors): call it with the modules
    each time, so it follows ``.train()``/``.eval()``, ``.to()`` and optimiser steps.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        reason = wide_support(modules)
        if reason is not None:
            raise ValueError(f"cannot widen these modules: {reason}")
        self.n = len(modules)
        self.template = self._template(modules[0], self.n)
        self.cache = StackCache()
        # How to join each tensor: concatenate along channels, or stack (Linear weights); scalars
        # (num_batches_tracked) are per expert and handled apart.
        self.kind: dict[str, str] = {}
        for mname, m in modules[0].named_modules():
            for tname, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                full = f"{mname}.{tname}" if mname else tname
                self.kind[full] = "scalar" if t.dim() == 0 else ("stack" if isinstance(m, nn.Linear) else "cat")

    @staticmethod
    def _template(base: nn.Module, n: int) -> nn.Module:
        tmpl = copy.deepcopy(base).to("meta")  # structure only: every tensor is supplied per call
        for name, m in list(tmpl.named_modules()):
            if isinstance(m, nn.Conv2d) and _is_pointwise(m):
                _replace(tmpl, name, _WidePointwise(m, n))
            elif isinstance(m, nn.Conv2d):
                m.register_forward_pre_hook(partial(_conv_pre_hook, n=n, cin=m.in_channels, groups=m.groups))
            elif isinstance(m, nn.Linear):
                _replace(tmpl, name, _WideLinear(m, n))
        return tmpl

    def clear_cache(self) -> None:
        self.cache.clear()

    def __call__(self, modules: Sequence[nn.Module], x: Tensor) -> Tensor:
        grad = torch.is_grad_enabled()
        tensors = [dict([*m.named_parameters(), *m.named_buffers()]) for m in modules]
        mutated = updated_buffers(modules[0])
        joined: dict[str, Tensor] = {}
        for name, kind in self.kind.items():
            ts = [t[name] for t in tensors]
            if kind == "scalar":
                joined[name] = ts[0].clone()  # read only by cumulative-average BatchNorm (refused)
                continue
            join = partial(torch.cat, dim=0) if kind == "cat" else torch.stack
            fresh = name in mutated or (grad and any(t.requires_grad for t in ts))
            joined[name] = join(ts) if fresh else self.cache.get(f"{kind}:{name}", ts, join)
        for tm, bm in zip(self.template.modules(), modules[0].modules()):
            tm.training = bm.training  # per submodule: a frozen trunk stays in eval mode
        out = torch.func.functional_call(self.template, joined, (x,), tie_weights=False, strict=True)
        if mutated:
            with torch.no_grad():  # the updated running statistics back into each expert
                for name in mutated:
                    if self.kind[name] == "scalar":
                        step = joined[name] - tensors[0][name]
                        for t in tensors:
                            t[name].add_(step)
                    else:
                        for t, part in zip(tensors, joined[name].chunk(self.n, 0)):
                            t[name].copy_(part)
        return out.reshape(out.shape[0], self.n, -1, *out.shape[2:]).transpose(0, 1)  # (G, B, d…)
