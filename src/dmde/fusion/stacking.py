"""Stacking functions Υ that fuse the experts' outputs into N class scores (§IV-C, Eqs. 7–9, 12–13).

Expert j covers the task group G_j (M_j class positions) and outputs probabilities
p_j ∈ Δ^{M_j+1}; its last output φ_j is the "not-in-group" probability. The experts' outputs are
held in one padded tensor so every variant is a handful of vectorised ops (no loop over experts):

* ``P`` (B, G, Mmax+1): ``P[:, j, k]`` = p_j(groups[j][k]) for k < M_j, zero for M_j ≤ k < Mmax,
  and ``P[:, j, Mmax]`` = φ_j. The not-in-group column is *moved* to the last padded column, so
  φ = ``P[..., -1]`` for every expert whatever its M_j. Experts without a not-in-group output
  (the "w/o not-in-group" ablation) give P of width Mmax.
* :class:`GroupLayout` holds ``class_index`` (G, Mmax), the class position of each padded slot
  (−1 for padding), and the flat indices used to scatter the per-slot contributions into the
  N classes with one ``index_add``.

Variants (all return Υ of shape (B, N); a class in no group gets 0, or the floor for ``eq7_log``):

``eq7``     Υ(i) = Σ_j Λ_j(c_i) · PS(i, j) · (1 − φ_j)/φ_j  (Eqs. 7–9), φ_j clamped to [ε, 1].
            PS(i, j) = 0 when c_i ∉ G_j, so the λ of Λ_j (Eq. 8) always multiplies zero and the sum
            runs over the groups that contain c_i only; the formula is kept literal.
``eq7_log`` Υ(i) = log Σ_{j ∋ i} exp(log p_j(i) + ℓ_j), ℓ_j = log((1 − φ_j)/φ_j) with φ_j clamped
            to [ε, 1 − ε]: the log of Eq. 7, computed with a scattered log-sum-exp. It is bounded
            (|ℓ_j| ≤ log((1 − ε)/ε)) and finite for any φ, so it suits a linear layer on top; unlike
            Eq. 7 it keeps the ranking inside a group whose φ_j = 1 (Eq. 7 zeroes the whole group).
``poe``     Υ(i) = Σ_{j ∋ i} [log p_j(i) − log φ_j + log(N − M_j)]: the log of the product of the
            experts' distributions over all N classes, each expert's not-in-group mass φ_j spread
            evenly over the N − M_j classes outside its group (log-linear pooling; up to a constant
            per image). A class is scored by *every* expert: the experts that hold it by their
            in-group odds, the others by "it is in my group, not yours". Eq. 7 adds the odds of
            the groups that hold a class, so one wrong expert that is sure of its group wins
            (docs/METHOD.md, "The gate"). Like ``eq7_log`` it is a log score.
``stack2``  Υ(i) = Σ_j λ · Λ'_j(c_i) · PS(i, j) · φ_j  (Eqs. 12–13, "Stack 2", as printed).
``sum``     Υ(i) = Σ_{j ∋ i} p_j(i): the in-group probabilities only ("w/o not-in-group").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch
from torch import Tensor

from dmde.core.errors import DmdeValueError, MismatchError

VARIANTS = ("eq7", "eq7_log", "poe", "stack2", "sum")
#: Variants whose Υ is already a log score (fed to the N-way layer and the loss as it is).
LOG_VARIANTS = ("eq7_log", "poe")

#: Default clamp of φ for the odds (1 − φ)/φ: the odds never exceed (1 − ε)/ε ≈ 10⁴.
DEFAULT_EPS = 1e-4
#: Smallest probability whose log ``eq7_log`` takes (float32-safe): log p ≥ −69.
LOG_P_FLOOR = 1e-30


@dataclass(frozen=True, eq=False)
class GroupLayout:
    """The padded layout of G task groups over N classes.

    ``class_index`` (G, Mmax) long: class position of slot (j, k), −1 for padding.
    ``mask`` (G, Mmax) bool: slot holds a class. ``sizes`` (G,) long: M_j.
    ``flat_slot`` (T,) long: indices into the flattened (G·Mmax) slots that hold a class, T = Σ M_j.
    ``flat_class`` (T,) long: the class position of each of those slots.
    ``pad_dest`` / ``pad_dest_nig`` (T,) / (T+G,) long: where each column of the experts'
    concatenated outputs lands in the flattened padded tensor, without / with not-in-group.
    """

    n_classes: int
    class_index: Tensor
    mask: Tensor
    sizes: Tensor
    flat_slot: Tensor
    flat_class: Tensor
    pad_dest: Tensor
    pad_dest_nig: Tensor

    @classmethod
    def from_groups(cls, groups: Sequence[Sequence[int]], n_classes: int) -> "GroupLayout":
        """Build the layout from task groups given as lists of class positions 0..N−1."""
        if n_classes < 1:
            raise DmdeValueError(f"n_classes must be positive, got {n_classes}")
        if len(groups) == 0:
            raise DmdeValueError("at least one task group is needed")
        sizes = [len(g) for g in groups]
        for j, g in enumerate(groups):
            if len(g) == 0:
                raise DmdeValueError(f"task group {j} is empty")
            if len(set(int(c) for c in g)) != len(g):
                raise DmdeValueError(f"task group {j} lists a class twice")
            bad = [int(c) for c in g if not 0 <= int(c) < n_classes]
            if bad:
                raise DmdeValueError(
                    f"task group {j} has class position {bad[0]} outside 0..{n_classes - 1}"
                )
        g_count, m_max = len(groups), max(sizes)
        class_index = torch.full((g_count, m_max), -1, dtype=torch.long)
        for j, g in enumerate(groups):
            class_index[j, : len(g)] = torch.as_tensor([int(c) for c in g], dtype=torch.long)
        mask = class_index >= 0
        flat = class_index.reshape(-1)  # (G*Mmax,)
        flat_slot = torch.nonzero(flat >= 0).reshape(-1)
        dest, dest_nig = [], []
        for j, m in enumerate(sizes):
            dest.append(j * m_max + torch.arange(m))
            dest_nig.append(j * (m_max + 1) + torch.arange(m + 1))
            dest_nig[-1][-1] = j * (m_max + 1) + m_max  # φ_j moves to the last column
        return cls(
            n_classes=int(n_classes),
            class_index=class_index,
            mask=mask,
            sizes=torch.as_tensor(sizes, dtype=torch.long),
            flat_slot=flat_slot,
            flat_class=flat[flat_slot],
            pad_dest=torch.cat(dest),
            pad_dest_nig=torch.cat(dest_nig),
        )

    @property
    def n_groups(self) -> int:
        return int(self.class_index.shape[0])

    @property
    def max_size(self) -> int:
        return int(self.class_index.shape[1])

    @cached_property
    def sizes_list(self) -> list[int]:
        """M_j as Python integers (read by every :meth:`pad`; no device sync)."""
        return [int(m) for m in self.sizes.tolist()]

    @cached_property
    def equal_sizes(self) -> bool:
        """Every group has Mmax classes: padding is the identity (up to moving nothing)."""
        return all(m == self.max_size for m in self.sizes_list)

    @property
    def groups(self) -> list[list[int]]:
        """The task groups back as lists of class positions."""
        return [row[: int(m)].tolist() for row, m in zip(self.class_index, self.sizes)]

    def coverage(self) -> Tensor:
        """(N,) long: the number of groups that contain each class."""
        return torch.bincount(self.flat_class, minlength=self.n_classes)

    def to(self, device: torch.device | str) -> "GroupLayout":
        return GroupLayout(
            self.n_classes,
            *(t.to(device) for t in (self.class_index, self.mask, self.sizes, self.flat_slot,
                                     self.flat_class, self.pad_dest, self.pad_dest_nig)),
        )

    def pad(self, outputs: Sequence[Tensor], fill: float = 0.0) -> Tensor:
        """Pad per-expert outputs (B, M_j+1) — or (B, M_j), all alike — into (B, G, width).

        With a not-in-group column (width M_j + 1) it is moved to the last column Mmax, so the
        result is (B, G, Mmax+1); without one the result is (B, G, Mmax). Empty slots get ``fill``
        (0 for probabilities, −inf for logits before a softmax). Differentiable.
        """
        if len(outputs) != self.n_groups:
            raise MismatchError(f"{len(outputs)} expert outputs for {self.n_groups} task groups")
        widths = [int(o.shape[-1]) for o in outputs]
        sizes = self.sizes_list
        if widths == [m + 1 for m in sizes]:
            not_in_group = True
        elif widths == sizes:
            not_in_group = False
        else:
            bad = [j for j, (w, m) in enumerate(zip(widths, sizes)) if w not in (m, m + 1)]
            if not bad:
                raise MismatchError("some experts have a not-in-group output and some do not")
            j = bad[0]
            raise MismatchError(
                f"expert {j} outputs {widths[j]} columns; its group holds {sizes[j]} classes "
                f"(expected {sizes[j] + 1} with not-in-group, or {sizes[j]})"
            )
        cat = torch.cat(list(outputs), dim=-1)  # (B, Σ M_j [+ G])
        batch = cat.shape[0]
        width = self.max_size + int(not_in_group)
        out = cat.new_full((batch, self.n_groups * width), fill)
        out = out.index_copy(1, self.pad_dest_nig if not_in_group else self.pad_dest, cat)
        return out.reshape(batch, self.n_groups, width)  # (B, G, width)

    def pad_probs(self, probs: Sequence[Tensor]) -> Tensor:
        """Per-expert probabilities (B, M_j+1) → P (B, G, Mmax+1), φ in the last column."""
        return self.pad(probs, fill=0.0)


def _split(P: Tensor, layout: GroupLayout, need_phi: bool) -> tuple[Tensor, Tensor | None]:
    """P (B, G, Mmax[+1]) → in-group probabilities (B, G, Mmax) and φ (B, G) or None."""
    if P.dim() != 3 or P.shape[1] != layout.n_groups:
        raise MismatchError(
            f"expert probabilities must be (B, {layout.n_groups}, {layout.max_size}+1), "
            f"got {tuple(P.shape)}"
        )
    m = layout.max_size
    if P.shape[2] == m + 1:
        return P[..., :m], P[..., m]
    if P.shape[2] == m and not need_phi:
        return P, None
    raise MismatchError(
        f"expert probabilities have {P.shape[2]} columns; the layout needs {m + 1}"
        + ("" if need_phi else f" or {m}")
    )


def _scatter_sum(contrib: Tensor, layout: GroupLayout) -> Tensor:
    """Σ over slots of the same class: contrib (B, G, Mmax) → (B, N), one index_add."""
    batch = contrib.shape[0]
    flat = contrib.reshape(batch, -1)[:, layout.flat_slot]  # (B, T)
    out = contrib.new_zeros(batch, layout.n_classes)
    return out.index_add(1, layout.flat_class, flat)


def clamp_phi(phi: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """φ clamped to [ε, 1] so the odds (1 − φ)/φ stay ≤ (1 − ε)/ε."""
    return phi.clamp(min=eps, max=1.0)


def stack_eq7(P: Tensor, layout: GroupLayout, eps: float = DEFAULT_EPS) -> Tensor:
    """Eq. 7: Υ(i) = Σ_j Λ_j(c_i) · PS(i, j) · (1 − φ_j)/φ_j, φ clamped to [ε, 1]. → (B, N)."""
    p_in, phi = _split(P, layout, need_phi=True)
    phi = clamp_phi(phi, eps)
    odds = (1.0 - phi) / phi  # (B, G)
    # Λ_j(c_i) = λ for c_i ∉ G_j multiplies PS(i, j) = 0 (Eq. 9): those terms vanish, so only the
    # groups holding c_i contribute (Λ = 1). Padding slots hold p = 0 and are never scattered.
    return _scatter_sum(p_in * odds.unsqueeze(-1), layout)  # (B, G, Mmax) → (B, N)


def stack_eq7_log(P: Tensor, layout: GroupLayout, eps: float = DEFAULT_EPS) -> Tensor:
    """log of Eq. 7, bounded: Υ(i) = logsumexp_{j ∋ i}(log p_j(i) + log((1 − φ_j)/φ_j)).

    φ is clamped to [ε, 1 − ε] and p to ≥ 1e-30, so Υ is finite for any input; a class in no
    group gets the floor log(1e-30) − log((1 − ε)/ε). → (B, N).
    """
    p_in, phi = _split(P, layout, need_phi=True)
    phi = phi.clamp(min=eps, max=1.0 - eps)
    log_odds = torch.log1p(-phi) - torch.log(phi)  # (B, G), |·| ≤ log((1-ε)/ε)
    term = torch.log(p_in.clamp(min=LOG_P_FLOOR)) + log_odds.unsqueeze(-1)  # (B, G, Mmax)
    batch = term.shape[0]
    flat = term.reshape(batch, -1)[:, layout.flat_slot]  # (B, T)
    idx = layout.flat_class.unsqueeze(0).expand(batch, -1)  # (B, T)
    floor = math.log(LOG_P_FLOOR) - math.log((1.0 - eps) / eps)
    # Scattered log-sum-exp: subtract the per-class max (no gradient needed through it).
    cmax = term.new_full((batch, layout.n_classes), floor)
    cmax = cmax.scatter_reduce(1, idx, flat.detach(), reduce="amax", include_self=True)
    summed = term.new_zeros(batch, layout.n_classes).scatter_add(
        1, idx, torch.exp(flat - cmax.gather(1, idx))
    )
    covered = layout.coverage() > 0  # (N,)
    out = cmax + torch.log(summed.clamp(min=torch.finfo(summed.dtype).tiny))
    return torch.where(covered.unsqueeze(0), out, out.new_full((), floor))


def stack_poe(P: Tensor, layout: GroupLayout) -> Tensor:
    """Product of the experts' N-class distributions, in log space (docs/METHOD.md, "The gate"):
    Υ(i) = Σ_{j ∋ i} [log p_j(i) − log φ_j + log(N − M_j)]. Expert j read as a distribution over
    all N classes gives p_j(i) to its own classes and φ_j/(N − M_j) to each other class; the sum
    over all j of those logs is Υ plus Σ_j log(φ_j/(N − M_j)), the same for every class. p and φ
    are floored at 1e-30; a class in no group gets the floor log(1e-30) − log N. → (B, N)."""
    p_in, phi = _split(P, layout, need_phi=True)
    rest = torch.log((layout.n_classes - layout.sizes).clamp(min=1).to(P.dtype))  # (G,) log(N − M_j)
    term = torch.log(p_in.clamp(min=LOG_P_FLOOR)) - torch.log(phi.clamp(min=LOG_P_FLOOR)).unsqueeze(-1) \
        + rest.view(1, -1, 1)  # (B, G, Mmax)
    out = _scatter_sum(term, layout)
    floor = math.log(LOG_P_FLOOR) - math.log(layout.n_classes)
    covered = layout.coverage() > 0
    return torch.where(covered.unsqueeze(0), out, out.new_full((), floor))


def stack_stack2(P: Tensor, layout: GroupLayout, lam: float = 0.5) -> Tensor:
    """Eq. 12 ("Stack 2") as printed: Υ(i) = Σ_j λ · Λ'_j(c_i) · PS(i, j) · φ_j. → (B, N)."""
    p_in, phi = _split(P, layout, need_phi=True)
    return _scatter_sum(lam * p_in * phi.unsqueeze(-1), layout)  # (B, G, Mmax) → (B, N)


def stack_sum(P: Tensor, layout: GroupLayout) -> Tensor:
    """"w/o not-in-group": Υ(i) = Σ_{j ∋ i} p_j(i). P may carry a φ column; it is ignored."""
    p_in, _ = _split(P, layout, need_phi=False)
    return _scatter_sum(p_in, layout)


def stack(
    P: Tensor,
    layout: GroupLayout,
    variant: str = "eq7",
    eps: float = DEFAULT_EPS,
    lam: float = 0.5,
) -> Tensor:
    """Υ (B, N) from padded expert probabilities P (B, G, Mmax+1) with the chosen variant."""
    if variant == "eq7":
        return stack_eq7(P, layout, eps)
    if variant == "eq7_log":
        return stack_eq7_log(P, layout, eps)
    if variant == "poe":
        return stack_poe(P, layout)
    if variant == "stack2":
        return stack_stack2(P, layout, lam)
    if variant == "sum":
        return stack_sum(P, layout)
    raise DmdeValueError(f"unknown stacking variant {variant!r}; known: {', '.join(VARIANTS)}")


# --------------------------------------------------------------------------- accounting (calibration: dmde.fusion.calibration)


def group_slots(layout: GroupLayout, targets: Tensor) -> Tensor:
    """(B, G) long: the slot of each image's class in every group, Mmax where the group lacks it
    (the padded not-in-group column: each expert's own target in the group view)."""
    hit = layout.class_index.unsqueeze(0) == targets.view(-1, 1, 1)  # (B, G, Mmax)
    slot = hit.float().argmax(-1)
    return torch.where(hit.any(-1), slot, torch.full_like(slot, layout.max_size))


def restrict_to_true_groups(P: Tensor, layout: GroupLayout, targets: Tensor) -> Tensor:
    """The oracle's P (B, G, Mmax+1): the in-group probabilities of every expert whose group lacks
    the image's true class set to 0, so stacking (any variant) sees only the groups that hold it.
    argmax of Υ on this P is the best that the experts' in-group rankings and φ allow once a
    perfect gate has chosen the groups: the gap to argmax Υ is what the gating loses."""
    m = layout.max_size
    holds = (layout.class_index.unsqueeze(0) == targets.view(-1, 1, 1)).any(-1)  # (B, G)
    out = P.clone()
    out[..., :m] = P[..., :m] * holds.unsqueeze(-1).to(P.dtype)
    return out
