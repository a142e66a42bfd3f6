"""The N-way softmax on the stacked scores Υ and the whole mixture of experts (§IV-C, Eqs. 10–11).

* :class:`NWaySoftmax` — logits = A·(τ z) + b with z = Υ or log(Υ + ε) (Eq. 10). A starts as the
  identity, so before training the prediction is argmax Υ; τ (1 unless fitted on the fusion split,
  ``fusion.pool_temperature=fit``) is a fixed scale. ``kind='dense'`` stores A (N×N, the
  paper's layer; 477 M parameters at N = 21,841); ``kind='lowrank'`` stores A = diag(a) + U·Vᵀ
  (a = 1, U small random, V = 0 at init): 2·r·N + 2·N parameters, linear in N.
* :class:`Mixture` — experts → padded probabilities → Υ (:mod:`dmde.fusion.stacking`) → N-way logits.
* :func:`mixture_loss` — end-to-end fine-tuning (Eq. 11): N-way cross-entropy plus each expert's
  multi-task regulariser, so gradients reach A, every expert's head and every expert's CNN.

Batched experts (``batched``, see :meth:`Mixture.batch_mode`): ``'wide'`` runs the experts'
backbones as one G-times-wider network (:mod:`dmde.fusion.batched`; checked against the loop on its
first batch); ``'vmap'`` runs them in one ``torch.func.vmap`` pass over their stacked parameters —
whole experts when every tensor has the same shape, else the backbones, then each ``expert.head``
(this assumes ``expert(x) == expert.head(expert.backbone(x))``, as ``'wide'`` does). Either way a
tensor that needs a gradient is joined afresh on every call, so gradients flow back to each
expert's own parameter; everything else (inference, frozen layers, BatchNorm statistics in eval
mode) is joined once and cached until one of the experts' tensors is replaced or modified in place
(tracked by tensor identity and autograd's version counter; an update through ``.data`` is not
seen: call :meth:`Mixture.clear_stack_cache`). BatchNorm in training mode is batched too: the
running statistics are joined, updated by the pass and copied back into each expert (equal to the
loop's). BatchNorm with ``momentum=None`` (a cumulative average) runs in the loop.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from dmde.core.errors import DmdeValueError, MismatchError
from dmde.experts.multitask import DELTA1, DELTA2, multitask_penalty
from dmde.fusion.batched import (
    StackCache,
    WideBackbones,
    training_norms,
    updated_buffers,
    wide_support,
)
from dmde.fusion.calibration import calibrate_logits
from dmde.fusion.stacking import (
    DEFAULT_EPS,
    LOG_VARIANTS,
    VARIANTS,
    GroupLayout,
    stack,
)

NWAY_KINDS = ("dense", "lowrank")
NWAY_INPUTS = ("upsilon", "log")
BATCH_MODES = ("loop", "auto", "wide", "vmap")


class NWaySoftmax(nn.Module):
    """Eq. 10's N-way layer on Υ: logits = A·z + b, A = I at init (argmax-preserving).

    ``input='log'`` feeds z = log(Υ/ΣΥ + ``log_eps``): Υ normalised per image, then its log with a
    floor (monotone, so argmax is still kept at init). The unbounded Eq. 7 scores span many orders
    of magnitude; measured on Tiny-ImageNet (200 classes), training A on the raw log(Υ + 1e-6)
    lost 10 points of top-1 against argmax Υ, while the normalised, floored input gained 2–3. ``rank`` and ``init_std`` apply to ``'lowrank'`` only.
    """

    def __init__(
        self,
        n_classes: int,
        kind: str = "dense",
        rank: int = 32,
        input: str = "upsilon",
        log_eps: float = 1e-4,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if kind not in NWAY_KINDS:
            raise DmdeValueError(f"unknown N-way kind {kind!r}; known: {', '.join(NWAY_KINDS)}")
        if input not in NWAY_INPUTS:
            raise DmdeValueError(f"unknown N-way input {input!r}; known: {', '.join(NWAY_INPUTS)}")
        if n_classes < 1:
            raise DmdeValueError(f"n_classes must be positive, got {n_classes}")
        self.n_classes, self.kind, self.input, self.log_eps = n_classes, kind, input, log_eps
        # τ of the pooled scores (calibration.fit_pool_temperature), fixed while A and b train
        self.register_buffer("scale", torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(n_classes))
        if kind == "dense":
            self.A = nn.Parameter(torch.eye(n_classes))
        else:
            if rank < 1:
                raise DmdeValueError(f"lowrank N-way layer needs rank ≥ 1, got {rank}")
            self.rank = rank
            self.diag = nn.Parameter(torch.ones(n_classes))
            self.U = nn.Parameter(torch.randn(n_classes, rank) * init_std)
            self.V = nn.Parameter(torch.zeros(n_classes, rank))

    def inputs(self, upsilon: Tensor) -> Tensor:
        """z (B, N), what A sees before the scale τ: log(Υ/ΣΥ + ε) (``input='log'``) or Υ."""
        if self.input == "log":
            share = upsilon / upsilon.sum(-1, keepdim=True).clamp_min(torch.finfo(upsilon.dtype).tiny)
            return torch.log(share + self.log_eps)  # (B, N), in [log ε, log(1 + ε)]
        return upsilon

    def forward(self, upsilon: Tensor) -> Tensor:
        """Υ (B, N) → logits (B, N) = A·(τ z) + b."""
        z = self.inputs(upsilon) * self.scale
        if self.kind == "dense":
            return F.linear(z, self.A, self.bias)
        # A z = a ⊙ z + U (Vᵀ z): O(N·r) per image.
        return z * self.diag + (z @ self.V) @ self.U.T + self.bias  # (B, r) → (B, N)

    _version = 2  # 2: the buffer ``scale`` (τ)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs) -> None:
        # a layer saved before τ existed (version 1, or a file without metadata: fusion.pt,
        # mixture.pt, exports of older runs) loads with τ = 1, which is what it computed
        if local_metadata.get("version", 1) < 2 and prefix + "scale" not in state_dict:
            state_dict[prefix + "scale"] = torch.ones_like(self.scale)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def weight(self) -> Tensor:
        """A as a dense (N, N) matrix (materialises N² values: for small N and tests)."""
        if self.kind == "dense":
            return self.A
        return torch.diag(self.diag) + self.U @ self.V.T

    def extra_repr(self) -> str:
        extra = f", rank={self.rank}" if self.kind == "lowrank" else ""
        return f"n_classes={self.n_classes}, kind={self.kind!r}{extra}, input={self.input!r}"


def _same_shapes(modules: Sequence[nn.Module]) -> bool:
    def sig(m: nn.Module) -> list[tuple]:
        # vmap runs expert 0's modules: every expert's layers must also be in the same mode
        return [(n, tuple(t.shape), t.dtype) for n, t in
                [*m.named_parameters(), *m.named_buffers()]] + [(n, s.training) for n, s in m.named_modules()]

    first = sig(modules[0])
    return all(type(m) is type(modules[0]) and sig(m) == first for m in modules[1:])


def _vmap_call(modules: Sequence[nn.Module], x: Tensor, cache: StackCache | None = None,
               prefix: str = "") -> Tensor:
    """Run identical-shaped modules on the same x in one vmapped pass → (G, B, ...).

    Parameters that need a gradient are stacked afresh (the stack is part of the graph); the rest
    come from ``cache``. Running statistics of BatchNorm in training mode are stacked afresh,
    updated in place by the vmapped pass and copied back into each module.
    """
    base = modules[0]
    grad = torch.is_grad_enabled()
    per = [dict(m.named_parameters()) for m in modules]
    perb = [dict(m.named_buffers()) for m in modules]
    mutated = updated_buffers(base)

    def stacked(name: str, tensors: list[Tensor], fresh: bool) -> Tensor:
        if fresh or cache is None:
            return torch.stack(tensors)  # (G, ...), keeps grad
        return cache.get(prefix + name, tensors)

    params = {n: stacked(n, ts, grad and any(t.requires_grad for t in ts))
              for n in per[0] for ts in [[p[n] for p in per]]}
    buffers = {n: stacked(n, ts, n in mutated) for n in perb[0] for ts in [[b[n] for b in perb]]}

    def one(p: dict[str, Tensor], b: dict[str, Tensor], inp: Tensor) -> Tensor:
        return functional_call(base, (p, b), (inp,))

    out = vmap(one, in_dims=(0, 0, None), randomness="different")(params, buffers, x)
    if mutated:
        with torch.no_grad():  # the updated running statistics back into each expert
            for n in mutated:
                for j, b in enumerate(perb):
                    b[n].copy_(buffers[n][j])
    return out


class Mixture(nn.Module):
    """Experts + stacking function + optional N-way softmax (Eqs. 7–12).

    ``experts[j]`` maps images (B, 3, H, W) to logits (B, M_j+1) over ``groups[j]`` then
    not-in-group (or (B, M_j) without it, for ``stacking='sum'``). ``forward`` returns N-way
    logits (B, N), or Υ itself when ``nway`` is None.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        groups: Sequence[Sequence[int]],
        n_classes: int,
        stacking: str = "eq7",
        eps: float = DEFAULT_EPS,
        lam: float = 0.5,
        nway: NWaySoftmax | None = None,
        batched: bool | str = False,
    ) -> None:
        super().__init__()
        if len(experts) != len(groups):
            raise MismatchError(f"{len(experts)} experts for {len(groups)} task groups")
        if stacking not in VARIANTS:
            raise DmdeValueError(f"unknown stacking variant {stacking!r}; known: {', '.join(VARIANTS)}")
        if nway is not None and nway.n_classes != n_classes:
            raise MismatchError(f"N-way layer has {nway.n_classes} classes, mixture {n_classes}")
        if nway is not None and nway.input == "log" and stacking in LOG_VARIANTS:
            raise DmdeValueError(f"stacking {stacking!r} is already a log score: use input='upsilon'")
        self.experts = nn.ModuleList(experts)
        self.layout = GroupLayout.from_groups(groups, n_classes)
        for name in ("class_index", "flat_slot", "flat_class", "pad_dest", "pad_dest_nig", "sizes"):
            # buffers so .to(device) moves the layout; not saved in state_dict (rebuilt from groups)
            self.register_buffer(f"_layout_{name}", getattr(self.layout, name), persistent=False)
        self.n_classes, self.stacking, self.eps, self.lam = n_classes, stacking, eps, lam
        self.nway = nway
        self.batched = batched
        # Per-expert calibration before Eq. 9's softmax (fusion.calibrate): T_j = 1, b_j = 0 is none.
        self.register_buffer("temperature", torch.ones(len(experts)))
        self.register_buffer("nig_bias", torch.zeros(len(experts)))
        self._stack_cache = StackCache()
        self._wide: WideBackbones | None = None
        self._wide_checked: bool | str = False
        self._wide_key: tuple | None = None
        self._wide_why: str | None = None
        self._wide_failure = ""

    def clear_stack_cache(self) -> None:
        """Drop the cached joined expert weights and the wide network (after changing the experts'
        weights through ``.data``, or their layers' settings)."""
        self._stack_cache.clear()
        self._wide, self._wide_checked, self._wide_key = None, False, None  # rebuilt and rechecked

    def _apply(self, fn, *args, **kwargs):  # .to(), .double(), ...: the cached copies are stale
        self.clear_stack_cache()  # the wide network follows the new dtype/device
        return super()._apply(fn, *args, **kwargs)

    def _current_layout(self) -> GroupLayout:
        if self._layout_class_index.device != self.layout.class_index.device:
            self.layout = self.layout.to(self._layout_class_index.device)
        return self.layout

    def batch_mode(self) -> str:
        """How ``expert_logits`` will run now: ``'loop'``, ``'wide'``, ``'vmap'`` or ``'vmap_backbone'``.

        ``batched``: False or ``'loop'`` — a loop over the experts; True or ``'auto'`` — the wide
        network when the backbones allow it (:mod:`dmde.fusion.batched`), else vmap, else the loop;
        ``'wide'`` or ``'vmap'`` — that implementation only (an error when it does not apply).
        """
        mode = {False: "loop", True: "auto"}.get(self.batched, self.batched)
        if mode not in BATCH_MODES:
            raise DmdeValueError(f"batched must be one of {', '.join(map(str, BATCH_MODES))}, got {self.batched!r}")
        experts = list(self.experts)
        if mode == "loop" or len(experts) < 2:
            return "loop"
        if mode in ("auto", "wide"):
            reason = self._wide_reason()
            if reason is None and self._wide_checked != "failed":
                return "wide"
            if mode == "wide":
                raise DmdeValueError(f"batched='wide' does not apply: {reason or self._wide_failure}")
        if any(m.momentum is None for e in experts for _, m in training_norms(e)):
            if mode == "vmap":
                raise DmdeValueError("batched='vmap' cannot run cumulative-average BatchNorm (momentum=None)")
            return "loop"  # cumulative average: reads num_batches_tracked as a number, not vmappable
        if _same_shapes(experts):
            return "vmap"
        if all(hasattr(e, "backbone") and hasattr(e, "head") for e in experts) and _same_shapes(
            [e.backbone for e in experts]
        ):
            return "vmap_backbone"
        if mode == "vmap":
            raise DmdeValueError("batched='vmap' needs experts (or backbones) of identical shapes")
        return "loop"

    def _wide_parts(self) -> list[nn.Module]:
        """What the wide network replaces: each expert's backbone, or only its body when the
        backbone takes cached trunk outputs (the frozen trunk's tensors are then never touched)."""
        return [e.backbone.body if getattr(e.backbone, "from_trunk", False) else e.backbone
                for e in self.experts]

    def _wide_reason(self) -> str | None:
        """Why the experts cannot run as one wide network (None: they can). The structural check
        runs again whenever the parts, a train/eval flag, a dtype or a device changed; other
        changes to the experts' layers (a BatchNorm's momentum, a dropout rate) after the first
        batch need :meth:`clear_stack_cache`."""
        experts = list(self.experts)
        if not all(hasattr(e, "backbone") and hasattr(e, "head") for e in experts):
            return "the experts have no backbone/head split"
        parts = self._wide_parts()
        state = tuple(m.training for p in parts for m in p.modules()) + tuple(
            (t.dtype, t.device) for p in parts for t in list(p.parameters())[:1])
        seen = self._wide_key
        same_parts = seen is not None and len(seen[0]) == len(parts) and all(a is b for a, b in zip(seen[0], parts))
        if not same_parts or seen[1] != state:
            if seen is not None and not same_parts:
                self._wide, self._wide_checked = None, False  # other modules: a new wide network
            self._wide_key, self._wide_why = (parts, state), wide_support(parts)  # holds the parts alive
        return self._wide_why

    def expert_logits(self, x: Tensor) -> list[Tensor]:
        """Each expert's logits, a list of (B, M_j+1)."""
        out = self._expert_outputs(x)
        return list(out.unbind(0)) if isinstance(out, Tensor) else out  # G × (B, M+1)

    def _wide_backbones(self, x: Tensor) -> WideBackbones | None:
        """The wide network, built and checked against the loop on the first batch it sees."""
        backbones = self._wide_parts()
        if self._wide is None:
            self._wide = WideBackbones(backbones)
        if not self._wide_checked:
            # A forward that reshapes channels by hand would widen silently wrong: compare once,
            # in eval mode (no statistics updated), on two images.
            modes = [m.training for m in self.experts.modules()]
            failure = ""
            try:
                self.experts.eval()
                with torch.no_grad():
                    probe = x[:2]
                    loop = torch.stack([b(probe) for b in backbones])
                    try:
                        wide = self._wide(backbones, probe)
                    except Exception as exc:  # a layer the template could not run: not widenable
                        failure = f"it failed on the first batch ({type(exc).__name__}: {exc})"
                    else:
                        err = (wide - loop).abs().max().item() if wide.shape == loop.shape else math.inf
                        tol = 1e-3 * (1.0 + loop.abs().max().item())
                        if not err <= tol:
                            failure = f"its output differs from the loop's by {err:.3g} (tolerance {tol:.3g})"
            finally:
                for m, t in zip(self.experts.modules(), modes):
                    m.training = t
            if failure:
                self._wide_checked = "failed"
                self._wide_failure = failure
                if self.batched == "wide":
                    raise DmdeValueError(f"batched='wide' does not apply: {self._wide_failure}")
                return None
            self._wide_checked = True
        return self._wide

    def _expert_outputs(self, x: Tensor) -> Tensor | list[Tensor]:
        """(G, B, M+1) from one batched pass over whole experts, else a list of (B, M_j+1)."""
        mode = self.batch_mode()
        if mode == "wide":
            wide = self._wide_backbones(x)
            if wide is None:
                return self._expert_outputs(x)  # the check failed: batch_mode now skips 'wide'
            feats = wide(self._wide_parts(), x)  # (G, B, d)
            return [e.head(f) for e, f in zip(self.experts, feats.unbind(0))]
        if mode == "vmap":
            return _vmap_call(list(self.experts), x, self._stack_cache, "expert.")  # (G, B, M+1)
        if mode == "vmap_backbone":
            feats = _vmap_call([e.backbone for e in self.experts], x, self._stack_cache, "backbone.")  # (G, B, d)
            return [e.head(f) for e, f in zip(self.experts, feats.unbind(0))]
        return [e(x) for e in self.experts]

    def expert_probs(self, x: Tensor) -> Tensor:
        """Padded expert probabilities P (B, G, Mmax+1), φ in the last column (Eq. 9's p_j)."""
        return torch.softmax(self.calibrate(self.padded_logits(x)), dim=-1)

    def padded_logits(self, x: Tensor) -> Tensor:
        """The experts' raw logits in the padded layout (B, G, Mmax+1), −inf in empty slots."""
        layout = self._current_layout()
        out = self._expert_outputs(x)
        if isinstance(out, Tensor) and out.shape[-1] in (layout.max_size, layout.max_size + 1) \
                and layout.equal_sizes:
            return out.transpose(0, 1)  # every M_j = Mmax: already the padded layout (B, G, W)
        return layout.pad(list(out), fill=-math.inf)  # (B, G, Mmax[+1])

    def calibrate(self, logits: Tensor) -> Tensor:
        """Padded logits (B, G, W) / T_j, + b_j on the not-in-group column (identity by default)."""
        has_nig = logits.shape[-1] == self._current_layout().max_size + 1
        return calibrate_logits(logits, self.temperature, self.nig_bias if has_nig else None)

    def upsilon(self, x: Tensor) -> Tensor:
        """Υ (B, N), Eq. 7 or the chosen variant."""
        return stack(self.expert_probs(x), self._current_layout(), self.stacking, self.eps, self.lam)

    def forward(self, x: Tensor) -> Tensor:
        u = self.upsilon(x)
        return u if self.nway is None else self.nway(u)


def mixture_loss(
    mixture: Mixture,
    x: Tensor,
    y: Tensor,
    expert_terms: bool = True,
    delta1: float = DELTA1,
    delta2: float = DELTA2,
    similarities: Sequence[Tensor | None] | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """End-to-end fine-tuning loss (Eqs. 10–11 with the experts' Eq. 2 regularisers).

    loss = CE(mixture(x), y) + Σ_j [δ1·Σ_k ‖W_{j,k}‖² + δ2/2·Tr(W_j L_j W_jᵀ)], where W_j is expert
    j's ``head.class_weights`` (M_j, d) and L_j the Laplacian of ``similarities[j]`` (M_j, M_j); the
    trace term is skipped for an expert whose S is None, and experts without ``class_weights``
    or with ``head.multitask`` False (plain linear heads) add nothing. With ``nway=None`` the CE is taken on log Υ. Returns the loss
    and its parts as floats.
    """
    out = mixture(x)
    if mixture.nway is None:  # Υ is a score, not logits: use its log (finite for every variant)
        out = out if mixture.stacking in LOG_VARIANTS else torch.log(out + 1e-12)
    ce = F.cross_entropy(out, y, label_smoothing=label_smoothing)
    parts: dict[str, Any] = {"ce": float(ce.detach())}
    loss = ce
    if expert_terms:
        if similarities is not None and len(similarities) != len(mixture.experts):
            raise MismatchError(
                f"{len(similarities)} similarity matrices for {len(mixture.experts)} experts"
            )
        norm = x.new_zeros(())
        trace = x.new_zeros(())
        for j, expert in enumerate(mixture.experts):
            head = getattr(expert, "head", None)
            W = getattr(head, "class_weights", None)
            if W is None or not getattr(head, "multitask", True):
                continue  # plain linear head: the "w/o multi-task" ablation has δ1 = δ2 = 0
            S = None if similarities is None else similarities[j]
            penalty, n_j, t_j = multitask_penalty(W, S, delta1, delta2)
            loss, norm, trace = loss + penalty, norm + n_j, trace + t_j
        parts.update(weight_norm=float(norm.detach()), laplacian_trace=float(trace.detach()))
    parts["loss"] = float(loss.detach())
    return loss, parts
