"""Training the base experts (§IV-B) with deep multi-task learning (Eqs. 2–6).

Expert j sees its group's images (labels 0..M_j−1) plus a fresh not-in-group sample every
epoch (label M_j, :mod:`dmde.data.group_view`), and minimises the multi-task loss of
:mod:`dmde.experts.multitask` with the visual similarity S of :mod:`dmde.experts.similarity` recomputed from
its own features every ``similarity_every`` epochs.

Every random draw of expert j's epoch e comes from a generator seeded by (seed, j, e), so a
run resumed at an epoch boundary equals an uninterrupted one, and an expert trained on rank r
of a torchrun job equals the same expert trained by a single process.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmde.core.checkpoint import check_expert_checkpoint, load_checkpoint
from dmde.core.config import config_hash, from_dict, to_dict, without_defaults
from dmde.core.distributed import barrier, dist_context, my_share
from dmde.core.errors import DmdeValueError, MismatchError
from dmde.core.training import (
    ImageTensors,
    OptimConfig,
    Salt,
    fit,
    mix_seed,
    predict_logits,
)
from dmde.data.group_view import GroupView, group_labels
from dmde.experts.distill import distillation_loss, soft_targets
from dmde.experts.expert import Expert, init_from_flat
from dmde.experts.multitask import DELTA1, DELTA2, MU, multitask_loss
from dmde.experts.similarity import visual_similarity

#: Where an expert starts, and what one of its epochs means (:class:`ExpertsConfig`).
INITS = ("backbone", "flat")
BUDGETS = ("epochs", "flat_steps")
MEMBERSHIPS = ("teacher", "label")
#: Expert settings added after checkpoints existed, with their defaults: they enter an expert's
#: identity hash only when changed, so that checkpoints trained before them still load.
ADDED_SETTINGS = {"distill": 0.0, "distill_temperature": 2.0, "distill_membership": "teacher", "budget_share": 1.0}


@dataclass
class ExpertsConfig(OptimConfig):
    """One expert's model and training (shared by all experts of a run)."""

    backbone: str = "small_cnn"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    multitask: bool = True  # False: plain linear head and delta1 = delta2 = 0 (ablation)
    not_in_group: bool = True  # False: M_j outputs only (ablation "w/o not-in-group")
    mu: float = MU  # weight of the cross-entropy (Eq. 6)
    delta1: float = DELTA1  # weight of sum_k ||W_k||^2 (Eq. 4)
    delta2: float = DELTA2  # weight of Tr(W L W^T) (Eq. 5)
    similarity_every: int = 1  # recompute S from the expert's own features every k epochs (0: never)
    similarity_per_class: int = 32  # images per class used to estimate S (Eq. 3)
    not_in_group_ratio: float = 1.0  # not-in-group images per in-group image, redrawn each epoch
    cache_trunk: bool = True  # with backbone_kwargs.freeze_trunk: compute the frozen trunk once, cache it
    # Where an expert starts: 'backbone' (the backbone's own weights: pretrained where backbone_kwargs
    # says so, else random) or 'flat' (the run's trained flat model: its body and the rows of the
    # group's classes, the not-in-group row fresh; HD-CNN's initialisation of its fine components).
    init: str = "backbone"
    # What one of `epochs` means for an expert: 'epochs' (a pass over its group view: its group plus
    # an equal not-in-group sample, about 2·M/N of the images) or 'flat_steps' (as many optimiser
    # steps as the flat model's epoch over every training image: equal steps per trained model).
    budget: str = "epochs"
    # Under 'flat_steps': the share of the flat model's steps each expert takes (1: equal steps per
    # trained model; 1/2 with 2G experts: the mixture's total steps stay those of G flat models).
    budget_share: float = 1.0
    # Knowledge distillation from the run's trained flat model (dmde.experts.distill): the weight α
    # of its soft targets beside the hard labels' cross-entropy (0: the paper's Eq. 6 alone), and
    # their temperature T; where the soft targets' not-in-group mass of an in-group image comes from:
    # 'teacher' (the flat model's mass outside the group) or 'label' (none: the label says the image
    # is in the group; the teacher only shapes the distribution over the group's classes).
    distill: float = 0.0
    distill_temperature: float = 2.0
    distill_membership: str = "teacher"


def expert_features(expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features (from images, or from cached trunk outputs when the backbone uses them)."""
    return expert.backbone(x)


def expert_logits(expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return expert.head(expert.backbone(x))


def build_expert(cfg: ExpertsConfig, n_classes: int) -> nn.Module:
    """The one way a run builds an expert of ``n_classes`` classes: its backbone (taking cached
    trunk outputs when the trunk is frozen and cached) and its multi-task head."""
    expert = Expert.build(cfg.backbone, n_classes, not_in_group=cfg.not_in_group, multitask=cfg.multitask,
                          **cfg.backbone_kwargs)
    if uses_cached_trunk(cfg):
        expert.backbone.use_cached_trunk()
    return expert


def uses_cached_trunk(cfg: ExpertsConfig) -> bool:
    """Whether the models of this configuration take cached trunk outputs instead of images."""
    return bool(cfg.cache_trunk and cfg.backbone_kwargs.get("freeze_trunk"))


@torch.no_grad()
def compute_similarity(
    expert: nn.Module,
    data: ImageTensors,
    group: Sequence[int],
    per_class: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """S (M_j, M_j) of Eq. 3 from the expert's current features on a per-class subsample."""
    chosen, labels = [], []
    for k, p in enumerate(group):
        members = torch.nonzero(data.targets == int(p), as_tuple=False).flatten()
        take = members[torch.randperm(members.numel(), generator=generator)[:per_class]]
        chosen.append(take)
        labels.append(torch.full((take.numel(),), k, dtype=torch.long))
    idx = torch.cat(chosen)
    if idx.numel() == 0:
        return torch.zeros(len(group), len(group))
    was_training = expert.training
    expert.eval()
    feats = predict_logits(lambda x: expert_features(expert, x), data.subset(idx), device=device)
    expert.train(was_training)
    return visual_similarity(feats, torch.cat(labels), len(group), per_class=per_class, generator=generator)


@torch.no_grad()
def evaluate_expert(expert: nn.Module, data: ImageTensors, group: Sequence[int],
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1 on the in-group images among the M_j classes (Table II), and how often an
    image from outside the group is called "not in group"."""
    expert.eval()

    logits = predict_logits(lambda x: expert_logits(expert, x), data, device=device)
    m = len(group)
    y = torch.as_tensor(group_labels(data.targets.numpy(), group))  # m = outside the group
    inside = y < m
    out: dict[str, float] = {"group_top1": float((logits[inside, :m].argmax(1) == y[inside]).float().mean())
                             if inside.any() else 0.0}
    if logits.shape[1] > m and (~inside).any():
        out["not_in_group_recall"] = float((logits[~inside].argmax(1) == m).float().mean())
    return out


def budget_epochs(cfg: ExpertsConfig, view_samples: int, flat_samples: int) -> ExpertsConfig:
    """``cfg`` with the epochs an expert runs under ``cfg.budget``: as configured ('epochs'), or
    scaled by flat_samples / view_samples so that it takes the flat model's optimiser steps
    ('flat_steps'; same batch size), times ``cfg.budget_share``, rounded to whole passes (at least
    one). The result is what the expert's checkpoint records."""
    if cfg.budget == "epochs" or cfg.epochs == 0:
        return cfg
    if cfg.budget != "flat_steps":
        raise DmdeValueError(f"experts.budget={cfg.budget!r} is not one of epochs, flat_steps")
    steps = cfg.budget_share * cfg.epochs * math.ceil(flat_samples / cfg.batch_size)
    return dataclasses.replace(cfg, epochs=max(1, round(steps / math.ceil(max(1, view_samples) / cfg.batch_size))))


def expert_identity(cfg: ExpertsConfig, ontology_hash: str, group_wnids: Sequence[str]) -> dict[str, Any]:
    """What binds an expert checkpoint to its run: the ontology, the group's classes, and the hash
    of every expert setting (backbone, width, seed, …), checked before any state is loaded."""
    return {"ontology_hash": ontology_hash, "group_wnids": list(group_wnids), "config_hash": expert_config_hash(cfg)}


def expert_config_hash(cfg: ExpertsConfig) -> str:
    """The hash of an expert's settings, without those of :data:`ADDED_SETTINGS` left at their default."""
    return config_hash(without_defaults(to_dict(cfg), ADDED_SETTINGS))


def expert_path(out_dir: str | os.PathLike, j: int) -> Path:
    return Path(out_dir) / f"expert_{j:03d}.pt"


def train_expert(
    j: int,
    group: Sequence[int],
    group_wnids: Sequence[str],
    train: ImageTensors,
    cfg: ExpertsConfig,
    out_dir: str | os.PathLike,
    ontology_hash: str,
    holdout: ImageTensors | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    stop_after_epoch: int | None = None,
    init_similarity: torch.Tensor | None = None,
    init_from: dict[str, torch.Tensor] | None = None,
    flat_samples: int | None = None,
    precision: str | int = "32",
    teacher_logits: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Train (or resume, or skip when finished) expert ``j``; returns its last metrics.

    Writes ``expert_{j}.pt`` after every epoch and a line per epoch to ``expert_{j}.jsonl``.
    ``init_from``: a flat model's state dict to start from (``cfg.init == 'flat'``);
    ``flat_samples``: the images of the flat model's epoch (``cfg.budget == 'flat_steps'``);
    ``precision``: of the training steps (:data:`dmde.core.precision.PRECISIONS`);
    ``teacher_logits``: the flat model's logits (len(train), N) on ``train`` (``cfg.distill > 0``).
    """
    if len(group) < 1:
        raise DmdeValueError(f"task group {j} is empty")
    alpha = float(cfg.distill)
    soft = None
    if alpha > 0:
        if teacher_logits is None or teacher_logits.shape[0] != len(train):
            raise DmdeValueError("experts.distill > 0 needs the flat model's logits on every training image "
                                 "(baselines stage 'flat')")
        members = torch.isin(train.targets.long(), torch.as_tensor(list(group), dtype=torch.long)) \
            if cfg.distill_membership == "label" else None
        soft = soft_targets(teacher_logits, group, cfg.distill_temperature, cfg.not_in_group, in_group=members)
    batch: dict[str, torch.Tensor] = {}
    path = expert_path(out_dir, j)
    identity = expert_identity(cfg, ontology_hash, group_wnids)
    state = load_checkpoint(path) if path.exists() else None  # read once: checked here, resumed by fit
    if state is not None:  # refuse another run's checkpoint before building anything
        check_expert_checkpoint(state, ontology_hash, group_wnids, where=str(path),
                                config_hash=identity["config_hash"])
    torch.manual_seed(mix_seed(cfg.seed, j, Salt.EXPERT_INIT))  # initial weights depend on (seed, j) only
    expert = build_expert(cfg, len(group))
    if cfg.init == "flat":
        if init_from is None:
            raise DmdeValueError("experts.init=flat needs the trained flat model (baselines stage 'flat')")
        init_from_flat(expert, init_from, group)
    expert = expert.to(device)
    ratio = cfg.not_in_group_ratio if cfg.not_in_group else 0.0
    view = GroupView(train.targets.tolist(), list(group), ratio=ratio, seed=mix_seed(cfg.seed, j))
    cfg = budget_epochs(cfg, len(view.indices), flat_samples if flat_samples is not None else len(train))
    sim: dict[str, torch.Tensor | None] = {"S": None}
    use_s = cfg.multitask and cfg.delta2 > 0

    def epoch_samples(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        view.set_epoch(e)
        return torch.as_tensor(view.indices, dtype=torch.long), torch.as_tensor(view.labels, dtype=torch.long)

    def on_epoch_start(e: int, gen: torch.Generator) -> None:
        if not use_s:
            return
        if sim["S"] is None or (cfg.similarity_every > 0 and e % cfg.similarity_every == 0):
            if e == 0 and init_similarity is not None:
                sim["S"] = init_similarity.clone()
            else:
                sim["S"] = compute_similarity(expert, train, group, cfg.similarity_per_class, gen, device)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = expert_logits(model, x)
        kd = alpha * distillation_loss(logits, batch["soft"].to(logits.device), cfg.distill_temperature) \
            if soft is not None else 0.0
        if not cfg.multitask:
            return (1.0 - alpha) * F.cross_entropy(logits, y) + kd, logits
        S = sim["S"].to(logits.device) if sim["S"] is not None else None
        loss = multitask_loss(logits, y, model.head.class_weights, S, mu=cfg.mu * (1.0 - alpha), delta1=cfg.delta1,
                              delta2=cfg.delta2 if S is not None else 0.0)
        return loss + kd, logits

    def on_batch(idx: torch.Tensor) -> None:
        batch["soft"] = soft[idx]

    def restore(state: dict[str, Any]) -> None:
        sim["S"] = state.get("similarity")

    metrics = fit(
        expert, train, cfg, loss_fn, path,
        epoch_samples=epoch_samples,
        on_epoch_start=on_epoch_start,
        extra_state=lambda: {"similarity": sim["S"], "config": to_dict(cfg), "kind": "expert", "expert": j,
                             "group": [int(p) for p in group]},
        restore_extra=restore,
        evaluate=(lambda m: {f"holdout_{k}": v for k, v in evaluate_expert(m, holdout, group, device).items()})
        if holdout is not None and len(holdout) else None,
        identity=identity,
        seed_parts=(j,),
        device=device,
        desc=f"expert {j}",
        progress=progress,
        stop_after_epoch=stop_after_epoch,
        precision=precision,
        resume_state=state,
        on_batch=on_batch if soft is not None else None,
    )
    return {"expert": j, **metrics}


def load_expert(path: str | os.PathLike, ontology_hash: str | None = None,
                group_wnids: Sequence[str] | None = None,
                expected: ExpertsConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained expert from its checkpoint, refusing one for another ontology or group,
    or (``expected``: the run's expert settings) one trained with other settings."""
    state = load_checkpoint(path)
    if ontology_hash is not None:
        check_expert_checkpoint(state, ontology_hash, group_wnids, where=str(path),
                                config_hash=expert_config_hash(expected) if expected is not None else None)
    missing = [k for k in ("config", "group", "model") if k not in state]
    if missing:
        raise MismatchError(f"{path} is not a dmde expert checkpoint (no {', '.join(missing)})")
    cfg = from_dict(ExpertsConfig, state["config"])
    expert = build_expert(cfg, len(state["group"]))
    try:
        expert.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise MismatchError(f"{path} does not fit its own settings: {first}") from None
    expert.eval()
    return expert, state


# --------------------------------------------------------------------------- distributed


def train_all_experts(
    groups: Sequence[Sequence[int]],
    groups_wnids: Sequence[Sequence[str]],
    train: ImageTensors,
    cfg: ExpertsConfig,
    out_dir: str | os.PathLike,
    ontology_hash: str,
    holdout: ImageTensors | None = None,
    only: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_expert_done: Callable[[int, dict], None] | None = None,
    init_from: dict[str, torch.Tensor] | None = None,
    flat_samples: int | None = None,
    precision: str | int = "32",
    teacher_logits: torch.Tensor | None = None,
) -> dict[int, dict[str, Any]]:
    """Train every group's expert (or those in ``only``), this rank's share under torchrun."""
    selected = list(range(len(groups))) if only is None else list(only)
    for j in selected:
        if not 0 <= j < len(groups):
            raise DmdeValueError(f"group {j} does not exist (the run has {len(groups)} groups)")
    rank, world = dist_context()
    results = {}
    for j in my_share(selected, rank, world):
        results[j] = train_expert(j, groups[j], groups_wnids[j], train, cfg, out_dir, ontology_hash,
                                  holdout=holdout, device=device, progress=progress, init_from=init_from,
                                  flat_samples=flat_samples, precision=precision,
                                  teacher_logits=teacher_logits)
        if on_expert_done:
            on_expert_done(j, results[j])
    barrier()
    return results
