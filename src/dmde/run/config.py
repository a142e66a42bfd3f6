"""The run's configuration: one dataclass per stage, composed into :class:`RunConfig`, checked once
before any work starts (:func:`validate`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dmde.core.distributed import local_device
from dmde.core.errors import DmdeFileError, DmdeValueError
from dmde.core.precision import PRECISIONS
from dmde.core.training import OPTIMIZERS, OptimConfig
from dmde.data.datasets import DATASETS, ON_CORRUPT, STORAGES
from dmde.experts.train import BUDGETS, INITS, MEMBERSHIPS, ExpertsConfig
from dmde.fusion.calibration import CALIBRATIONS, POOL_TEMPERATURES
from dmde.fusion.mixture import BATCH_MODES, NWAY_INPUTS, NWAY_KINDS
from dmde.fusion.stacking import VARIANTS
from dmde.hierarchy.groups import ASSIGNMENTS

#: What ``ontology.source`` may name (:class:`OntologyConfig`).
ONTOLOGY_SOURCES = ("wordnet", "visual", "taxonomy")
FINETUNE_DATA = ("all", "fusion")  # fusion.finetune_data


@dataclass
class DataConfig:
    """Which images, at what size, and how they are split (seeded, per class)."""

    dataset: str = "fashion_mnist"  # fashion_mnist | tiny_imagenet | imagefolder | synthetic
    root: str | None = None  # dataset directory (or Tiny-ImageNet zip); None: the default location
    classes: list[str] | None = None  # keep only these WNIDs (synthetic: the class list)
    max_classes: int | None = None  # keep the first n classes of the dataset
    image_size: int | None = None  # resize to this many pixels (None: native size)
    max_per_class: int | None = None  # subsample the training split per class (speed)
    holdout_per_class: int = 100  # evaluation images per class, never trained on
    fusion_per_class: int = 0  # images per class kept from the experts for the N-way layer
    synthetic_per_class: int = 60
    cache: str | None = None  # decoded-image cache (.pt); None: decode every time
    on_corrupt: str = "raise"  # raise: a corrupt image stops with its name; skip: dropped and counted
    seed: int = 0
    # How images reach the models (never what they are: not in any stage hash). memory: decoded once
    # into RAM (fast for small data); stream: read per batch from shards or image files, memory
    # bounded by the batch; auto: stream when the decoded images would fill > 1/4 of the RAM.
    storage: str = "auto"
    workers: int = 2  # DataLoader processes that read and decode streamed batches (0: in this process)


@dataclass
class OntologyConfig:
    categories: int | None = None  # K; None: about 20 classes per category
    seed: int = 0
    drop_non_atomic: bool = False
    wordnet: str | None = None  # WordNet 3.0 directory; None: found automatically
    # What the two-layer tree is built from: wordnet (Ψ of Eq. 1: classes are WNIDs, lemmas or
    # senses), visual (the visual tree of class-mean features, groups.visual_*), taxonomy (the
    # `child<TAB>parent` file ontology.taxonomy). visual and taxonomy take class names as they are.
    source: str = "wordnet"  # wordnet | visual | taxonomy
    taxonomy: str | None = None


@dataclass
class GroupsConfig:
    size: int = 4  # M, classes per task group
    overlap: float = 0.5  # λ in [0, 1)
    assignment: str = "semantic"  # semantic | random | visual
    seed: int = 0
    visual_backbone: str = "efficientnet_lite0"  # features for the visual tree
    visual_per_class: int = 32


@dataclass
class FusionConfig:
    """Stacking (Eq. 7 and variants), the N-way layer (Eq. 10) and fine-tuning (Eq. 11)."""

    stacking: str = "eq7"  # eq7 | eq7_log | poe (product of the experts) | stack2 | sum
    eps: float = 1e-4  # φ is clamped to [eps, 1]
    lam: float = 0.5  # λ of Stack 2 (Eq. 12)
    nway: str = "lowrank"  # dense | lowrank (diagonal + rank-r, linear in N) | none
    rank: int = 32
    input: str = "log"  # the N-way layer sees log(Υ/ΣΥ + ε) (log) or Υ itself (upsilon)
    epochs: int = 10  # N-way layer on cached Υ
    lr: float = 1e-3
    identity_l2: float = 1e-2  # pull A towards I: a small fusion split must not undo argmax Υ
    # Calibrate each expert's outputs on the fusion split before Eq. 7: none | temperature (T_j) |
    # temperature_bias (T_j and a bias b_j on the not-in-group logit: the 1:1 training view's prior).
    calibrate: str = "none"
    # Temperature τ of the stacked scores before the N-way layer: none (τ = 1) | fit (τ on the fusion
    # split, calibration.fit_pool_temperature): the product of the experts counts shared evidence once per expert.
    pool_temperature: str = "none"
    batch_size: int = 256
    finetune: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=1, lr=0.005))
    # What Eq. 11 fine-tunes on: all (the experts' training images and the fusion split) | fusion (the
    # fusion split alone: images the experts never trained on, so their loss there is not yet near zero).
    finetune_data: str = "all"
    # All experts in one pass (inference / fine-tuning): False/'loop', True/'auto' (the wide network
    # of dmde.fusion.batched when it applies, else vmap), 'wide', 'vmap'. On a 2-core CPU the loop was
    # the fastest at batch ≥ 32 (benchmarks/RESULTS.md, "Throughput"): off by default.
    batched: bool | str = False
    batched_finetune: bool | str = False


@dataclass
class BaselinesConfig:
    flat: bool = True
    early_fusion: bool = False
    width_matched_flat: bool = False
    ensemble: bool = False  # G flat models (seeds), probabilities averaged: the mixture's equal-compute reference
    epochs: int | None = None  # None: as many as the experts
    early_fusion_epochs: int = 30


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    ontology: OntologyConfig = field(default_factory=OntologyConfig)
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    device: str = "auto"  # auto | cpu | cuda
    precision: str | int = "32"  # 32 | bf16 | fp16: the trained stages' forward passes (autocast)
    progress: bool = True
    tensorboard: bool = True  # TensorBoard event files beside the JSONL logs (when tensorboard is installed)


def validate(cfg: RunConfig) -> None:
    """Check every setting before any work starts, naming the offending key."""
    def bad(key: str, value: Any, want: str) -> None:
        raise DmdeValueError(f"{key}={value!r} {want}")

    choices = {
        "data.dataset": (cfg.data.dataset, DATASETS),
        "data.on_corrupt": (cfg.data.on_corrupt, ON_CORRUPT),
        "data.storage": (cfg.data.storage, STORAGES),
        "groups.assignment": (cfg.groups.assignment, ASSIGNMENTS),
        "ontology.source": (cfg.ontology.source, ONTOLOGY_SOURCES),
        "fusion.stacking": (cfg.fusion.stacking, VARIANTS),
        "fusion.nway": (cfg.fusion.nway, NWAY_KINDS + ("none",)),
        "fusion.input": (cfg.fusion.input, NWAY_INPUTS),
        "fusion.calibrate": (cfg.fusion.calibrate, CALIBRATIONS),
        "fusion.pool_temperature": (cfg.fusion.pool_temperature, POOL_TEMPERATURES),
        "fusion.finetune_data": (cfg.fusion.finetune_data, FINETUNE_DATA),
        "experts.init": (cfg.experts.init, INITS),
        "experts.budget": (cfg.experts.budget, BUDGETS),
        "experts.distill_membership": (cfg.experts.distill_membership, MEMBERSHIPS),
        "experts.optimizer": (cfg.experts.optimizer, OPTIMIZERS),
        "fusion.finetune.optimizer": (cfg.fusion.finetune.optimizer, OPTIMIZERS),
        "fusion.batched": (cfg.fusion.batched, (False, True) + BATCH_MODES),
        "fusion.batched_finetune": (cfg.fusion.batched_finetune, (False, True) + BATCH_MODES),
        "precision": (str(cfg.precision), PRECISIONS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            bad(key, value, f"is not one of {', '.join(map(str, allowed))}")
    if not 0.0 <= float(cfg.groups.overlap) < 1.0:
        bad("groups.overlap", cfg.groups.overlap, "must lie in [0, 1)")
    if int(cfg.data.workers) < 0:
        bad("data.workers", cfg.data.workers, "must be at least 0")
    if float(cfg.experts.not_in_group_ratio) < 0:
        bad("experts.not_in_group_ratio", cfg.experts.not_in_group_ratio, "must be at least 0")
    if not 0.0 <= float(cfg.experts.distill) <= 1.0:
        bad("experts.distill", cfg.experts.distill, "must lie in [0, 1] (the weight of the flat model's soft targets)")
    if not float(cfg.experts.distill_temperature) > 0:
        bad("experts.distill_temperature", cfg.experts.distill_temperature, "must be > 0")
    if not float(cfg.experts.budget_share) > 0:
        bad("experts.budget_share", cfg.experts.budget_share, "must be > 0 (the share of the flat model's steps)")
    if float(cfg.experts.budget_share) != 1.0 and cfg.experts.budget != "flat_steps":
        bad("experts.budget_share", cfg.experts.budget_share,
            f"is read only with experts.budget=flat_steps, not {cfg.experts.budget}")
    if int(cfg.groups.size) < 1:
        bad("groups.size", cfg.groups.size, "must be at least 1")
    if cfg.ontology.source == "taxonomy" and cfg.ontology.taxonomy is None:
        bad("ontology.source", cfg.ontology.source, "needs ontology.taxonomy=FILE ('class<TAB>parent' lines)")
    if cfg.ontology.source != "taxonomy" and cfg.ontology.taxonomy is not None:
        bad("ontology.taxonomy", cfg.ontology.taxonomy, f"is read only with ontology.source=taxonomy, "
            f"not {cfg.ontology.source}")
    if cfg.ontology.taxonomy is not None and not os.path.isfile(cfg.ontology.taxonomy):
        raise DmdeFileError(f"ontology.taxonomy: taxonomy file {cfg.ontology.taxonomy} does not exist")
    if cfg.ontology.categories is not None and int(cfg.ontology.categories) < 1:
        bad("ontology.categories", cfg.ontology.categories, "must be at least 1")
    for key, value in (("experts.epochs", cfg.experts.epochs), ("data.holdout_per_class", cfg.data.holdout_per_class),
                       ("data.fusion_per_class", cfg.data.fusion_per_class), ("fusion.epochs", cfg.fusion.epochs),
                       ("fusion.finetune.epochs", cfg.fusion.finetune.epochs)):
        if int(value) < 0:
            bad(key, value, "must not be negative")
    for key, value in (("experts.batch_size", cfg.experts.batch_size), ("fusion.batch_size", cfg.fusion.batch_size)):
        if int(value) < 1:
            bad(key, value, "must be at least 1")
    if cfg.fusion.calibrate != "none" and (cfg.fusion.nway == "none" or not cfg.experts.not_in_group):
        bad("fusion.calibrate", cfg.fusion.calibrate, "is fitted in the fusion stage: it needs fusion.nway "
            "(dense or lowrank) and experts with a not-in-group output")
    if cfg.fusion.pool_temperature != "none" and cfg.fusion.nway == "none":
        bad("fusion.pool_temperature", cfg.fusion.pool_temperature, "scales the N-way layer's input: it needs "
            "fusion.nway (dense or lowrank)")
    if cfg.fusion.finetune_data == "fusion" and cfg.fusion.finetune.epochs > 0 and int(cfg.data.fusion_per_class) < 1:
        bad("fusion.finetune_data", cfg.fusion.finetune_data, "fine-tunes on the fusion split: it needs "
            "data.fusion_per_class ≥ 1")
    if cfg.baselines.ensemble and not cfg.baselines.flat:
        bad("baselines.ensemble", cfg.baselines.ensemble, "takes the flat model as its first member: set baselines.flat=true")
    if cfg.experts.not_in_group is False and cfg.fusion.stacking != "sum":
        bad("fusion.stacking", cfg.fusion.stacking, "needs not-in-group outputs; use stacking=sum with "
            "experts.not_in_group=false")


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``: checked
    against what this machine has, so a missing GPU is one line, not a traceback later. Under
    torchrun, ``auto`` and ``cuda`` are this rank's GPU, ``cuda:LOCAL_RANK``."""
    if str(name) == "auto":
        return local_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DmdeValueError(f"device {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DmdeValueError(f"device {name!r}: this machine has no CUDA GPU (torch {torch.__version__}); "
                                 "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DmdeValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        if device.index is None:
            device = local_device()
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DmdeValueError(f"device {name!r}: MPS is not available on this machine; use --device cpu")
    return device
