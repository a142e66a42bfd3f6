"""``dmde train``: the whole method as one resumable run directory.

data → ontology (§III) → task groups (§IV-A) → experts (§IV-B) → fusion (Eqs. 7–10) →
end-to-end fine-tuning (Eq. 11) → baselines (§V) → evaluation.

Each stage records in ``stages.json`` the hash of everything it depends on (its own config
section and the hashes of the stages before it). Running again skips a stage whose hash is
unchanged and whose outputs exist; a changed setting redoes that stage and the ones after it.
A stage killed half-way resumes from its last checkpoint (experts and every trained model
write one per epoch).

Run directory::

    config.yaml      resolved configuration       stages.json   stage hashes and timings
    data.json        classes, split sizes         ontology.json / groups.json
    experts/expert_XXX.pt (+ .jsonl logs)         fusion.pt     the trained N-way layer
    mixture.pt       fine-tuned mixture           flat.pt, early_fusion.pt   baselines
    metrics.json, per_class.csv, per_class.png    evaluation
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmde.config import config_hash, from_dict, save_config, to_dict
from dmde.errors import DmdeFileError, DmdeValueError, MismatchError
from dmde.io import read_json, write_json
from dmde.stacking import LOG_VARIANTS, VARIANTS
from dmde.train_experts import ExpertsConfig
from dmde.training import ImageTensors, OptimConfig, fit, mix_seed, predict_logits


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


@dataclass
class OntologyConfig:
    categories: int | None = None  # K; None: about 20 classes per category
    seed: int = 0
    drop_non_atomic: bool = False
    wordnet: str | None = None  # WordNet 3.0 directory; None: found automatically


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
    batch_size: int = 256
    finetune: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=1, lr=0.005))
    # All experts in one pass (inference / fine-tuning): False/'loop', True/'auto' (the wide network
    # of dmde.batched when it applies, else vmap), 'wide', 'vmap'. On a 2-core CPU the loop was
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
    progress: bool = True


STAGES = ("ontology", "groups", "experts", "fusion", "finetune", "flat", "flat_wide", "ensemble", "early_fusion",
          "evaluate")
# What each stage leaves in the run directory (removed when the stage must be redone).
OUTPUTS = {
    "ontology": ["ontology.json"],
    "groups": ["groups.json", "visual_ontology.json"],
    "experts": ["experts"],
    "fusion": ["fusion.pt"],
    "finetune": ["mixture.pt", "mixture.jsonl"],
    "flat": ["flat.pt", "flat.jsonl"],
    "flat_wide": ["flat_wide.pt", "flat_wide.jsonl"],
    "ensemble": ["ensemble"],
    "early_fusion": ["early_fusion.pt"],
    "evaluate": ["metrics.json", "per_class.csv", "per_class.png"],
}


def validate(cfg: RunConfig) -> None:
    """Check every setting before any work starts, naming the offending key."""
    def bad(key: str, value: Any, want: str) -> None:
        raise DmdeValueError(f"{key}={value!r} {want}")

    choices = {
        "data.dataset": (cfg.data.dataset, ("fashion_mnist", "tiny_imagenet", "imagefolder", "synthetic")),
        "data.on_corrupt": (cfg.data.on_corrupt, ("raise", "skip")),
        "groups.assignment": (cfg.groups.assignment, ("semantic", "random", "visual")),
        "fusion.stacking": (cfg.fusion.stacking, VARIANTS),
        "fusion.nway": (cfg.fusion.nway, ("dense", "lowrank", "none")),
        "fusion.input": (cfg.fusion.input, ("log", "upsilon")),
        "fusion.calibrate": (cfg.fusion.calibrate, ("none", "temperature", "temperature_bias")),
        "experts.init": (cfg.experts.init, ("backbone", "flat")),
        "experts.budget": (cfg.experts.budget, ("epochs", "flat_steps")),
        "experts.optimizer": (cfg.experts.optimizer, ("sgd", "adamw")),
        "fusion.finetune.optimizer": (cfg.fusion.finetune.optimizer, ("sgd", "adamw")),
        "fusion.batched": (cfg.fusion.batched, (False, True, "loop", "auto", "wide", "vmap")),
        "fusion.batched_finetune": (cfg.fusion.batched_finetune, (False, True, "loop", "auto", "wide", "vmap")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            bad(key, value, f"is not one of {', '.join(map(str, allowed))}")
    if not 0.0 <= float(cfg.groups.overlap) < 1.0:
        bad("groups.overlap", cfg.groups.overlap, "must lie in [0, 1)")
    if int(cfg.groups.size) < 1:
        bad("groups.size", cfg.groups.size, "must be at least 1")
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
    if cfg.baselines.ensemble and not cfg.baselines.flat:
        bad("baselines.ensemble", cfg.baselines.ensemble, "takes the flat model as its first member: set baselines.flat=true")
    if cfg.experts.not_in_group is False and cfg.fusion.stacking != "sum":
        bad("fusion.stacking", cfg.fusion.stacking, "needs not-in-group outputs; use stacking=sum with "
            "experts.not_in_group=false")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- data


@dataclass
class Splits:
    classes: list[str]  # dataset classes as WNIDs (dataset order)
    train: ImageTensors  # targets: dataset class ids until aligned to the ontology
    fusion: ImageTensors
    holdout: ImageTensors
    skipped: int = 0  # corrupt images dropped (data.on_corrupt=skip)

    def align(self, positions: np.ndarray) -> "Splits":
        """Dataset class ids → ontology positions (−1: class dropped from the ontology)."""
        lut = torch.as_tensor(positions, dtype=torch.long)

        def one(t: ImageTensors) -> ImageTensors:
            y = lut[t.targets]
            keep = y >= 0
            return ImageTensors(t.inputs[keep], y[keep], t.kind, t.mean, t.std)

        return Splits(self.classes, one(self.train), one(self.fusion), one(self.holdout), self.skipped)


def open_dataset(cfg: DataConfig, split: str = "train", wn: Any = None):
    """The configured dataset (a :mod:`dmde.data` dataset, or synthetic images in memory)."""
    from dmde import data

    if cfg.dataset == "fashion_mnist":
        return data.FashionMNIST(cfg.root, split="train" if split == "train" else "test")
    if cfg.dataset == "tiny_imagenet":
        if cfg.root is None:
            raise DmdeValueError("data.root must point at the Tiny-ImageNet directory or its zip")
        return data.TinyImageNet(cfg.root, split=split, on_corrupt=cfg.on_corrupt)
    if cfg.dataset == "imagefolder":
        if cfg.root is None:
            raise DmdeValueError("data.root must point at an ImageFolder directory (<root>/<class>/<image>)")
        return data.ImageFolder(cfg.root, on_corrupt=cfg.on_corrupt)
    if cfg.dataset == "synthetic":
        from dmde.synthetic import synthetic_images

        classes = list(cfg.classes or data.fashion_mnist_wnids())
        images, targets = synthetic_images(len(classes), cfg.synthetic_per_class, size=cfg.image_size or 16,
                                           seed=cfg.seed + (0 if split == "train" else 7919))
        return data.InMemoryImages(images, targets.numpy(), classes)
    raise DmdeValueError(f"unknown dataset {cfg.dataset!r} (fashion_mnist, tiny_imagenet, imagefolder, synthetic)")


def class_wnids(classes: Sequence[str], wn: Any) -> list[str]:
    """Dataset class names → WNIDs (ImageFolder may name its classes by lemma)."""
    import re

    out = []
    for c in classes:
        out.append(c if re.fullmatch(r"n\d{8}", c) else wn.wnid(wn.resolve(c)))
    return out


def load_splits(cfg: DataConfig, wn: Any = None, progress: bool = True) -> Splits:
    """Decode the training split once and cut it into train / fusion / hold-out, per class."""
    from dmde import data

    ds = open_dataset(cfg, "train", wn)
    mem = ds if isinstance(ds, data.InMemoryImages) else data.materialize(
        ds, size=cfg.image_size, cache=cfg.cache, progress=progress)
    classes = class_wnids(mem.classes, wn) if cfg.dataset == "imagefolder" else list(mem.classes)
    targets = np.asarray(mem.targets, dtype=np.int64)
    keep_classes = list(range(len(classes)))
    if cfg.classes is not None and cfg.dataset != "synthetic":
        unknown = sorted(set(cfg.classes) - set(classes))
        if unknown:
            raise DmdeValueError(f"data.classes lists {unknown[0]}, which the dataset does not have")
        keep_classes = [classes.index(w) for w in cfg.classes]
    if cfg.max_classes is not None:
        keep_classes = keep_classes[: cfg.max_classes]
    lut = np.full(len(classes), -1, dtype=np.int64)
    lut[keep_classes] = np.arange(len(keep_classes))
    classes = [classes[i] for i in keep_classes]
    y = lut[targets]
    idx = np.flatnonzero(y >= 0)
    y = y[idx]
    rest, hold = data.holdout_split(y, per_class=cfg.holdout_per_class, seed=cfg.seed)
    fusion = np.zeros(0, dtype=np.int64)
    if cfg.fusion_per_class > 0:
        r_train, r_fusion = data.holdout_split(y[rest], per_class=cfg.fusion_per_class, seed=cfg.seed + 1)
        rest, fusion = rest[r_train], rest[r_fusion]
    if cfg.max_per_class is not None:
        r_keep = _first_per_class(y[rest], cfg.max_per_class, cfg.seed)
        rest = rest[r_keep]
    images = mem.images
    yt = torch.as_tensor(y)

    def part(sel: np.ndarray) -> ImageTensors:
        sel_t = torch.as_tensor(sel, dtype=torch.long)
        return ImageTensors(images[torch.as_tensor(idx)[sel_t]], yt[sel_t])

    skipped = int(getattr(mem, "skipped", 0))
    if skipped:
        import warnings

        warnings.warn(f"{skipped} corrupt image(s) skipped (data.on_corrupt=skip)", stacklevel=2)
    return Splits(classes, part(rest), part(fusion), part(hold), skipped)


def backbone_normalisation(cfg: ExpertsConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean/std the experts' backbone expects (0.5 for EfficientNet-Lite0)."""
    from dmde.backbones import create_backbone

    kw = {k: v for k, v in cfg.backbone_kwargs.items() if k != "pretrained"}  # no weights needed
    b = create_backbone(cfg.backbone, **kw)
    return tuple(b.input_mean), tuple(b.input_std)


def trunk_module(cfg: ExpertsConfig) -> nn.Module:
    """The experts' frozen trunk (pretrained weights when configured), images → feature maps."""
    from dmde.backbones import create_backbone

    return create_backbone(cfg.backbone, **cfg.backbone_kwargs).trunk.eval()


@torch.no_grad()
def to_trunk_features(data: ImageTensors, trunk: nn.Module, device: torch.device | str = "cpu",
                      progress: bool = False) -> ImageTensors:
    """Run the frozen trunk once over ``data``: later stages train only the backbone's body."""
    feats = predict_logits(trunk, data, device=device, progress=progress, desc="trunk")
    return ImageTensors(feats.to(torch.float16), data.targets, "features", data.mean, data.std)


def prepare_splits(cfg: RunConfig, wn: Any, progress: bool = True, cache_dir: Path | None = None,
                   device: torch.device | str = "cpu") -> Splits:
    """The run's splits as its models consume them: normalised for the experts' backbone, and
    passed through the frozen trunk once (cached in ``cache_dir``) when the trunk is cached."""
    from dmde.train_experts import uses_cached_trunk

    splits = load_splits(cfg.data, wn, progress=progress)
    mean, std = backbone_normalisation(cfg.experts)
    for part in (splits.train, splits.fusion, splits.holdout):
        part.mean, part.std = mean, std
    if not uses_cached_trunk(cfg.experts):
        return splits
    key = config_hash([to_dict(cfg.data), cfg.experts.backbone, cfg.experts.backbone_kwargs])
    path = cache_dir / f"trunk_{key}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        from dmde.checkpoint import load_checkpoint

        st = load_checkpoint(path)
        parts = [ImageTensors(st[f"{n}_inputs"], st[f"{n}_targets"], "features", mean, std)
                 for n in ("train", "fusion", "holdout")]
        return Splits(splits.classes, *parts, splits.skipped)
    trunk = trunk_module(cfg.experts).to(device)
    parts = [to_trunk_features(p, trunk, device, progress) for p in (splits.train, splits.fusion, splits.holdout)]
    if path is not None:
        from dmde.checkpoint import save_checkpoint

        save_checkpoint(path, {f"{n}_{k}": getattr(p, k) for n, p in zip(("train", "fusion", "holdout"), parts)
                               for k in ("inputs", "targets")})
    return Splits(splits.classes, *parts, splits.skipped)


def _first_per_class(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def cat_data(a: ImageTensors, b: ImageTensors) -> ImageTensors:
    if len(b) == 0:
        return a
    return ImageTensors(torch.cat([a.inputs, b.inputs]), torch.cat([a.targets, b.targets]), a.kind, a.mean, a.std)


# --------------------------------------------------------------------------- run directory


class Run:
    """A run directory and its stage bookkeeping."""

    def __init__(self, run_dir: str | os.PathLike, cfg: RunConfig) -> None:
        self.dir = Path(run_dir)
        self.cfg = cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stages_path = self.dir / "stages.json"
        self.stages: dict[str, dict[str, Any]] = read_json(self._stages_path) if self._stages_path.exists() else {}
        self.trained: list[str] = []  # stages that did work in this invocation

    def reload(self) -> None:
        """Re-read the bookkeeping (another rank may have finished a stage)."""
        if self._stages_path.exists():
            self.stages = read_json(self._stages_path)

    def is_done(self, name: str, h: str) -> bool:
        rec = self.stages.get(name)
        ok = rec is not None and rec.get("hash") == h and rec.get("done")
        return bool(ok) and all((self.dir / p).exists() for p in OUTPUTS[name][:1])

    def begin(self, name: str, h: str) -> None:
        """Start (or resume) a stage; outputs from a different configuration are removed."""
        rec = self.stages.get(name)
        if rec is not None and rec.get("hash") != h:
            for p in OUTPUTS[name]:
                path = self.dir / p
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.stages[name] = {"hash": h, "done": False, "started": time.time()}
        write_json(self._stages_path, self.stages)

    def finish(self, name: str, **extra: Any) -> None:
        rec = self.stages[name]
        rec.update(done=True, seconds=round(time.time() - rec.pop("started", time.time()), 2), **extra)
        write_json(self._stages_path, self.stages)
        self.trained.append(name)


def stage_hashes(cfg: RunConfig) -> dict[str, str]:
    """Hash of each stage's inputs: its own settings plus the hashes of the stages it uses."""
    h: dict[str, str] = {}
    data = config_hash(cfg.data)
    # Settings added after runs existed hash only when changed, so those runs stay finished.
    later = {"init": "backbone", "budget": "epochs", "calibrate": "none"}
    h["ontology"] = config_hash([data, to_dict(cfg.ontology)])
    h["groups"] = config_hash([h["ontology"], to_dict(cfg.groups)])
    exp = {k: v for k, v in to_dict(cfg.experts).items() if later.get(k, object()) != v}
    flat_exp = {k: v for k, v in exp.items() if k not in ("init", "budget")}  # how experts start/run
    h["flat"] = config_hash([h["ontology"], data, flat_exp, cfg.baselines.epochs])
    h["experts"] = config_hash([h["groups"], data, exp] + ([h["flat"]] if cfg.experts.init == "flat" else []))
    fusion = {k: v for k, v in to_dict(cfg.fusion).items() if later.get(k, object()) != v}
    finetune = fusion.pop("finetune")
    fusion.pop("batched")
    finetune["batched"] = fusion.pop("batched_finetune")
    h["fusion"] = config_hash([h["experts"], fusion])
    h["finetune"] = config_hash([h["fusion"], finetune])
    h["flat_wide"] = config_hash([h["flat"], h["groups"], cfg.fusion.nway, cfg.fusion.rank])
    h["ensemble"] = config_hash([h["flat"], h["groups"], "ensemble"])
    h["early_fusion"] = config_hash([h["experts"], cfg.baselines.early_fusion_epochs])
    h["evaluate"] = config_hash([h[s] for s in STAGES[:-1]] + [to_dict(cfg.baselines)])
    return h


# --------------------------------------------------------------------------- the pipeline


def train(run_dir: str | os.PathLike, cfg: RunConfig, until: str | None = None,
          only_experts: Sequence[int] | None = None,
          on_stage: Callable[[str, Path], None] | None = None) -> dict[str, Any]:
    """Run (or resume) every stage up to ``until`` (default: all); returns the metrics.
    ``on_stage(name, run_dir)`` is called on rank 0 once each stage is finished (or was already):
    :class:`dmde.narrate.Narrator` prints what it did."""
    from dmde.ontology import Ontology, build_semantic_ontology
    from dmde.distributed import barrier, dist_context
    from dmde.train_experts import train_all_experts
    from dmde.wordnet import WordNet

    if until is not None and until not in STAGES:
        raise DmdeValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    validate(cfg)
    run = Run(run_dir, cfg)
    rank, world = dist_context()
    device = resolve_device(cfg.device)

    def tell(name: str) -> None:
        if on_stage is not None and rank == 0:
            on_stage(name, run.dir)

    if rank == 0:
        save_config(cfg, run.dir / "config.yaml")
    hashes = stage_hashes(cfg)
    wn = WordNet.load(cfg.ontology.wordnet)
    progress = cfg.progress and rank == 0
    if rank != 0:
        barrier()  # rank 0 decodes (and caches the trunk outputs) first
    splits = prepare_splits(cfg, wn, progress=progress, cache_dir=run.dir, device=device)
    if rank == 0:
        barrier()
        write_json(run.dir / "data.json", data_summary(cfg, splits, device))

    def want(name: str) -> bool:
        return until is None or STAGES.index(name) <= STAGES.index(until)

    # ---- ontology (§III)
    if not run.is_done("ontology", hashes["ontology"]):
        if rank == 0:
            run.begin("ontology", hashes["ontology"])
            onto = build_semantic_ontology(wn, splits.classes, n_categories=_k(cfg, len(splits.classes)),
                                           random_state=cfg.ontology.seed,
                                           drop_non_atomic=cfg.ontology.drop_non_atomic, source="dataset classes")
            onto.to_json(run.dir / "ontology.json")
            run.finish("ontology")
        barrier()
    onto = Ontology.from_json(run.dir / "ontology.json")
    tell("ontology")
    positions = onto.positions_or(splits.classes)
    splits = splits.align(positions)
    n = onto.n_classes

    # ---- task groups (§IV-A)
    if not run.is_done("groups", hashes["groups"]):
        if rank == 0:
            run.begin("groups", hashes["groups"])
            groups = _make_groups(cfg, onto, splits, wn, run, device)
            groups.to_json(run.dir / "groups.json")
            run.finish("groups", n_groups=len(groups.groups))
        barrier()
    groups = load_groups(run.dir, onto)
    tell("groups")
    if not want("experts"):
        return {}

    def stage(name: str, enabled: bool, fn, parallel: bool = False, record=None) -> None:
        """Run a stage once: on rank 0, or on every rank (data-parallel) when ``parallel``;
        ``record()`` adds facts about the finished stage to stages.json."""
        barrier()
        run.reload()
        if not enabled:
            return
        if not run.is_done(name, hashes[name]):
            if rank == 0:
                run.begin(name, hashes[name])
            barrier()
            if parallel or rank == 0:
                fn()
            barrier()
            if rank == 0:
                run.finish(name, **(record() if record else {}))
        tell(name)

    everything = cat_data(splits.train, splits.fusion)

    def flat() -> None:
        train_flat(run.dir / "flat.pt", everything, n, cfg, onto.hash(), device, progress)

    warm = cfg.experts.init == "flat"
    if warm:  # the experts start from the flat model (HD-CNN's warm start): it trains first
        stage("flat", True, flat, parallel=True)

    # ---- experts (§IV-B)
    h = hashes["experts"]
    if not run.is_done("experts", h) or only_experts is not None:
        if rank == 0 and run.stages.get("experts", {}).get("hash") != h:
            run.begin("experts", h)
        barrier()
        results = train_all_experts(groups.groups, groups.wnids, splits.train, cfg.experts, run.dir / "experts",
                                    onto.hash(), holdout=splits.holdout, only=only_experts, device=device,
                                    progress=progress, init_from=load_flat_state(run.dir, onto) if warm else None,
                                    flat_samples=len(everything))
        write_json(run.dir / "experts" / f"metrics_rank{rank}.json", {str(k): v for k, v in results.items()})
        if rank == 0 and only_experts is None:
            run.finish("experts")
        barrier()
        if only_experts is not None:
            return {"experts": results}
    tell("experts")
    if not want("fusion"):
        return {}

    experts = load_experts(run.dir, onto, groups)
    # ---- fusion: the N-way softmax on Υ (Eqs. 7–10), experts frozen
    stage("fusion", cfg.fusion.nway != "none",
          lambda: train_fusion(run.dir / "fusion.pt", experts, groups.groups, n,
                               splits.fusion if len(splits.fusion) else splits.train, cfg.fusion, device, progress))
    # ---- end-to-end fine-tuning (Eq. 11), data-parallel under torchrun
    stage("finetune", want("finetune") and cfg.fusion.finetune.epochs > 0,
          lambda: finetune(run.dir / "mixture.pt", build_mixture(run.dir, cfg, experts, groups.groups, n, "fusion"),
                           everything, cfg, onto.hash(), device, progress), parallel=True)
    # ---- baselines (§V)
    stage("flat", want("flat") and cfg.baselines.flat, flat, parallel=True)

    def flat_wide() -> None:
        model, match = width_matched_model(cfg, n, groups, splits.train)
        train_flat(run.dir / "flat_wide.pt", everything, n, cfg, onto.hash(), device, progress, model=model,
                   extra={"width_match": match})

    from dmde.checkpoint import load_checkpoint

    stage("flat_wide", want("flat_wide") and cfg.baselines.width_matched_flat, flat_wide, parallel=True,
          record=lambda: load_checkpoint(run.dir / "flat_wide.pt")["width_match"])

    def ensemble() -> None:  # member 0 is the flat model itself
        for k in range(1, len(groups.groups)):
            train_flat(run.dir / "ensemble" / f"flat_{k:03d}.pt", everything, n, cfg, onto.hash(), device, progress,
                       member=k)

    stage("ensemble", want("ensemble") and cfg.baselines.ensemble and len(groups.groups) > 1, ensemble,
          parallel=True, record=lambda: {"members": len(groups.groups)})
    stage("early_fusion", want("early_fusion") and cfg.baselines.early_fusion,
          lambda: train_early_fusion(run.dir / "early_fusion.pt", experts, everything, n, cfg, device, progress))
    if rank != 0:
        return {}

    # ---- evaluation
    if want("evaluate") and not run.is_done("evaluate", hashes["evaluate"]):
        from dmde.evaluate import evaluate_run

        run.begin("evaluate", hashes["evaluate"])
        evaluate_run(run.dir, data=splits.holdout, device=device, progress=progress)
        run.finish("evaluate")
    if want("evaluate"):
        tell("evaluate")
    return read_json(run.dir / "metrics.json") if (run.dir / "metrics.json").exists() else {}


def data_summary(cfg: RunConfig, splits: Splits, device: torch.device | str = "cpu") -> dict[str, Any]:
    """What prediction needs to know about the inputs (size, normalisation, cached trunk), and the
    device the run trains on (for an export's model card)."""
    from dmde.train_experts import uses_cached_trunk

    if uses_cached_trunk(cfg.experts):
        size = list(load_splits_shape(cfg))
    else:
        size = list(splits.train.inputs.shape[-2:])
    return {"dataset": cfg.data.dataset, "classes": splits.classes, "image_size": size,
            "mean": list(splits.train.mean), "std": list(splits.train.std),
            "trunk": {"backbone": cfg.experts.backbone, "backbone_kwargs": cfg.experts.backbone_kwargs}
            if uses_cached_trunk(cfg.experts) else None,
            "n_train": len(splits.train), "n_fusion": len(splits.fusion), "n_holdout": len(splits.holdout),
            "skipped_corrupt": splits.skipped, "device": str(device)}


def load_splits_shape(cfg: RunConfig) -> tuple[int, int]:
    """The image size the run's models see (before any cached trunk)."""
    if cfg.data.image_size is not None:
        return (cfg.data.image_size, cfg.data.image_size)
    ds = open_dataset(cfg.data, "train")
    img = ds.load_image(0) if hasattr(ds, "load_image") else ds[0][0]
    return tuple(img.shape[-2:])


def _k(cfg: RunConfig, n: int) -> int | None:
    k = cfg.ontology.categories
    if k is not None and not 1 <= k <= n:
        raise DmdeValueError(f"ontology.categories={k} must lie in 1..{n} (the number of classes)")
    return k


def _make_groups(cfg: RunConfig, onto, splits: Splits, wn, run: Run, device: torch.device):
    from dmde.groups import make_groups

    g = cfg.groups
    visual = None
    if g.assignment == "visual":
        from dmde.ontology import build_visual_ontology

        if splits.train.kind == "features":  # the visual tree from the pretrained trunk + body
            feats = class_mean_features(splits.train, onto.n_classes, cfg.experts.backbone, g.visual_per_class,
                                        g.seed, device, cfg.experts.backbone_kwargs)
        else:
            feats = class_mean_features(splits.train, onto.n_classes, g.visual_backbone, g.visual_per_class,
                                        g.seed, device)
        visual = build_visual_ontology(feats.numpy(), onto.classes, onto.lemmas,
                                       n_categories=onto.n_categories, random_state=g.seed, wn=wn,
                                       source=f"class-mean {g.visual_backbone} features")
        visual.to_json(run.dir / "visual_ontology.json")
    return make_groups(onto, g.size, g.overlap, assignment=g.assignment, random_state=g.seed,
                       visual_ontology=visual)


@torch.no_grad()
def class_mean_features(data: ImageTensors, n_classes: int, backbone: str, per_class: int, seed: int,
                        device: torch.device, backbone_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Mean deep feature of each class (N, d) from a per-class sample: the visual tree's input."""
    from dmde.backbones import create_backbone

    torch.manual_seed(seed)
    if data.kind == "features":  # cached trunk outputs: the pretrained backbone's body on top
        net = create_backbone(backbone, **backbone_kwargs).use_cached_trunk().to(device).eval()
    else:
        kw = {"pretrained": True} if backbone == "efficientnet_lite0" else {}
        net = create_backbone(backbone, **kw).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([m[torch.randperm(m.numel(), generator=g)[:per_class]]
                     for m in (torch.nonzero(data.targets == c).flatten() for c in range(n_classes))])
    sub = data.subset(idx)
    feats = predict_logits(net, sub, device=device)
    sums = torch.zeros(n_classes, feats.shape[1]).index_add_(0, sub.targets, feats)
    counts = torch.bincount(sub.targets, minlength=n_classes).clamp_min(1).unsqueeze(1)
    return sums / counts


def load_groups(run_dir: Path, onto):
    from dmde.groups import TaskGroups

    groups = TaskGroups.from_json(run_dir / "groups.json")
    groups.validate(onto)
    return groups


def load_experts(run_dir: Path, onto, groups) -> list[nn.Module]:
    """Every expert of a run, checked against the run's ontology and groups."""
    from dmde.train_experts import expert_path, load_expert

    experts = []
    for j, wnids in enumerate(groups.wnids):
        path = expert_path(run_dir / "experts", j)
        if not path.exists():
            raise DmdeFileError(f"expert {j} of {run_dir} is missing ({path.name}); run `dmde train` to finish it")
        expert, state = load_expert(path, onto.hash(), wnids)
        if int(state["epoch"]) < int(state["config"]["epochs"]):
            raise DmdeValueError(f"expert {j} of {run_dir} is unfinished (epoch {state['epoch']}); resume training")
        experts.append(expert)
    return experts


def expert_similarities(run_dir: Path, n_experts: int) -> list[torch.Tensor | None]:
    from dmde.checkpoint import load_checkpoint
    from dmde.train_experts import expert_path

    return [load_checkpoint(expert_path(run_dir / "experts", j)).get("similarity") for j in range(n_experts)]


def build_mixture(run_dir: Path, cfg: RunConfig, experts: Sequence[nn.Module], groups: Sequence[Sequence[int]],
                  n: int, stage: str = "finetune") -> nn.Module:
    """The mixture as of a stage: ``upsilon`` (argmax Υ), ``fusion`` (+ N-way) or ``finetune``."""
    from dmde.checkpoint import load_checkpoint
    from dmde.fusion import Mixture, NWaySoftmax

    f = cfg.fusion
    nway = None
    if stage != "upsilon" and f.nway != "none":
        nway = NWaySoftmax(n, kind=f.nway, rank=f.rank, input=nway_input(f))
    fusion = load_checkpoint(run_dir / "fusion.pt") if stage != "upsilon" and (run_dir / "fusion.pt").exists() \
        else {}
    if nway is not None and fusion:
        nway.load_state_dict(fusion["model"])
    mixture = Mixture(list(experts), groups, n, stacking=f.stacking, eps=f.eps, lam=f.lam, nway=nway,
                      batched=f.batched)
    for name in ("temperature", "nig_bias"):  # the experts' calibration, fitted with the N-way layer
        if name in fusion:
            getattr(mixture, name).copy_(fusion[name])
    if stage == "finetune" and (run_dir / "mixture.pt").exists():
        mixture.load_state_dict(load_checkpoint(run_dir / "mixture.pt")["model"])
    mixture.eval()
    return mixture


def nway_input(f: FusionConfig) -> str:
    """The log-odds variant already yields log Υ: the N-way layer takes it as it is."""
    return "upsilon" if f.stacking in LOG_VARIANTS else f.input


def train_fusion(path: Path, experts: Sequence[nn.Module], groups: Sequence[Sequence[int]], n: int,
                 data: ImageTensors, f: FusionConfig, device: torch.device, progress: bool) -> dict[str, float]:
    """Train the N-way layer on Υ of the (frozen) experts, computed once (Eq. 10)."""
    from dmde.checkpoint import save_checkpoint
    from dmde.fusion import Mixture, NWaySoftmax

    mixture = Mixture(list(experts), groups, n, stacking=f.stacking, eps=f.eps, lam=f.lam, batched=f.batched)
    mixture.to(device).eval()
    calibration = {}
    if f.calibrate != "none":  # T_j (and b_j) on the fusion split, before Eq. 7
        calibration = calibrate_mixture(mixture, data, bias=f.calibrate == "temperature_bias", device=device,
                                        progress=progress)
    ups = predict_logits(mixture.upsilon, data, device=device, progress=progress, desc="Υ")  # (n_img, N)
    torch.manual_seed(mix_seed(0xF0, n))
    nway = NWaySoftmax(n, kind=f.nway, rank=f.rank, input=nway_input(f))
    init = {k: v.clone() for k, v in nway.state_dict().items()}
    opt = torch.optim.Adam(nway.parameters(), lr=f.lr)
    g = torch.Generator().manual_seed(mix_seed(0xF1, n))
    y = data.targets
    for _ in range(f.epochs):
        order = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), f.batch_size):
            b = order[s : s + f.batch_size]
            loss = F.cross_entropy(nway(ups[b]), y[b])
            if f.identity_l2 > 0:  # stay near the initial (identity) map
                loss = loss + f.identity_l2 * sum(((p - init[k]) ** 2).sum() for k, p in nway.named_parameters())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((nway(ups).argmax(1) == y).float().mean())
        acc0 = float((ups.argmax(1) == y).float().mean())
    metrics = {"fusion_train_acc": acc, "upsilon_train_acc": acc0}
    save_checkpoint(path, {"kind": "nway", "model": nway.state_dict(), "metrics": metrics, **calibration})
    return metrics


def calibrate_mixture(mixture: nn.Module, data: ImageTensors, bias: bool, device: torch.device | str = "cpu",
                      progress: bool = False) -> dict[str, torch.Tensor]:
    """Fit every expert's temperature (and not-in-group bias) on ``data`` and set them on the
    mixture (:func:`dmde.stacking.fit_calibration`); returns them for the fusion checkpoint."""
    from dmde.stacking import fit_calibration, group_slots

    g = len(mixture.experts)
    logits = predict_logits(lambda x: mixture.padded_logits(x).flatten(1), data, device=device,
                            progress=progress, desc="calibrate").view(len(data), g, -1)
    temperature, nig_bias = fit_calibration(logits, group_slots(mixture.layout.to("cpu"), data.targets), bias=bias)
    mixture.temperature.copy_(temperature)
    mixture.nig_bias.copy_(nig_bias)
    return {"temperature": temperature, "nig_bias": nig_bias}


def finetune(path: Path, mixture: nn.Module, data: ImageTensors, cfg: RunConfig, ontology_hash: str,
             device: torch.device, progress: bool) -> dict[str, Any]:
    """End-to-end fine-tuning (Eq. 11): the N-way loss into A, every head and every CNN,
    with each expert's own multi-task terms kept."""
    from dmde.fusion import mixture_loss

    sims = expert_similarities(Path(path).parent, len(mixture.experts))
    e = cfg.experts
    mixture.to(device)
    mixture.batched = cfg.fusion.batched_finetune

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, None]:
        loss, _ = mixture_loss(model, x, y, expert_terms=e.multitask, delta1=e.delta1, delta2=e.delta2,
                               similarities=sims_dev)
        return loss, None

    sims_dev = [None if s is None else s.to(device) for s in sims]
    return fit(mixture, data, cfg.fusion.finetune, loss_fn, path, identity={"ontology_hash": ontology_hash},
               seed_parts=(0xE2E,), device=device, desc="fine-tune", progress=progress, data_parallel=True)


def width_matched_model(cfg: RunConfig, n: int, groups, data: ImageTensors) -> tuple[nn.Module, dict[str, Any]]:
    """A flat model as costly per image as the whole mixture (experts, heads, N-way layer)."""
    from dmde.baselines import width_matched_flat
    from dmde.train_experts import uses_cached_trunk

    e = cfg.experts
    if uses_cached_trunk(e):
        raise DmdeValueError("baselines.width_matched_flat needs a backbone with a width option "
                             "(small_cnn, alexnet), not a cached pretrained trunk")
    sizes = [len(g) for g in groups.groups]
    torch.manual_seed(mix_seed(e.seed, 0xF1A8))
    m = width_matched_flat(e.backbone, len(sizes), n, int(round(sum(sizes) / len(sizes))),
                           input_shape=tuple(data.inputs.shape[1:]), nway_kind=cfg.fusion.nway, rank=cfg.fusion.rank,
                           **e.backbone_kwargs)
    return m.model, {"width_arg": m.width_arg, "width": m.width, "macs": m.macs, "mixture_macs": m.target_macs}


def _flat_model(cfg: RunConfig, n: int, width: dict[str, Any] | None = None) -> nn.Module:
    from dmde.backbones import create_backbone
    from dmde.baselines import FlatClassifier

    from dmde.train_experts import uses_cached_trunk

    e = cfg.experts
    kw = dict(e.backbone_kwargs)
    if width is not None:
        kw[width["width_arg"]] = width["width"]
    backbone = create_backbone(e.backbone, **kw)
    if uses_cached_trunk(e):
        backbone.use_cached_trunk()
    return FlatClassifier(backbone, n)


def train_flat(path: Path, data: ImageTensors, n: int, cfg: RunConfig, ontology_hash: str, device: torch.device,
               progress: bool, model: nn.Module | None = None, extra: dict[str, Any] | None = None,
               member: int = 0) -> dict[str, Any]:
    """The flat baseline ("AlexNet Extension"): the experts' backbone with one N-way softmax.
    ``member`` k > 0: the k-th flat model of the ensemble baseline (its own initial weights and
    data order; member 0 is the flat model itself)."""
    import dataclasses

    seeds = (0xF1A7,) if member == 0 else (0xF1A7, member)
    if model is None:
        torch.manual_seed(mix_seed(cfg.experts.seed, *seeds))
        model = _flat_model(cfg, n)
    model = model.to(device)
    ocfg = OptimConfig(**{f.name: getattr(cfg.experts, f.name) for f in dataclasses.fields(OptimConfig)})
    if cfg.baselines.epochs is not None:
        ocfg.epochs = cfg.baselines.epochs

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = m(x)
        return F.cross_entropy(logits, y), logits

    return fit(model, data, ocfg, loss_fn, path, identity={"ontology_hash": ontology_hash},
               extra_state=(lambda: dict(extra)) if extra else None,
               seed_parts=seeds, device=device, desc=path.stem, progress=progress, data_parallel=True)


def train_early_fusion(path: Path, experts: Sequence[nn.Module], data: ImageTensors, n: int, cfg: RunConfig,
                       device: torch.device, progress: bool) -> dict[str, float]:
    """Early fusion (Table IV): one N-way layer on the experts' concatenated features."""
    from dmde.baselines import EarlyFusion
    from dmde.checkpoint import save_checkpoint

    torch.manual_seed(mix_seed(0xEA, n))
    model = EarlyFusion(list(experts), n).to(device).eval()
    feats = predict_logits(lambda x: torch.cat([e.features(x) for e in model.experts], 1), data, device=device,
                           progress=progress, desc="features")
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd
    lin = nn.Linear(z.shape[1], n)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(mix_seed(0xEB, n))
    for _ in range(cfg.baselines.early_fusion_epochs):
        order = torch.randperm(len(z), generator=g)
        for s in range(0, len(z), 256):
            b = order[s : s + 256]
            loss = F.cross_entropy(lin(z[b]), data.targets[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():  # fold the standardisation into the layer
        w = lin.weight / sd
        model.classifier.weight.copy_(w)
        model.classifier.bias.copy_(lin.bias - w @ mu)
    save_checkpoint(path, {"kind": "early_fusion", "model": model.classifier.state_dict()})
    return {}


def external_eval_data(run_dir: str | os.PathLike, path: str | os.PathLike) -> tuple[ImageTensors, int]:
    """A dataset given by path (Tiny-ImageNet's official ``val/`` layout or zip, or an
    ImageFolder), decoded at the run's input size and labelled by the run's ontology positions.
    Returns the data and how many images belonged to classes the ontology does not have."""
    from dmde import data as D
    from dmde.ontology import Ontology
    from dmde.wordnet import WordNet

    run_dir, path = Path(run_dir), Path(path)
    info = read_json(run_dir / "data.json", "run data summary")
    onto = Ontology.from_json(run_dir / "ontology.json")
    if not path.exists():
        raise DmdeFileError(f"evaluation data {path} does not exist")
    is_tiny = path.suffix == ".zip" or any((path / p).exists() for p in ("val/val_annotations.txt",
                                                                         "tiny-imagenet-200/val"))
    ds = D.TinyImageNet(path, split="val") if is_tiny else D.ImageFolder(path)
    mem = D.materialize(ds, size=tuple(info["image_size"]), progress=False)
    classes = list(mem.classes)
    if not is_tiny:
        from dmde.config import load_config

        cfg = load_config(RunConfig, run_dir / "config.yaml")
        classes = class_wnids(classes, WordNet.load(cfg.ontology.wordnet))
    lut = torch.as_tensor(onto.positions_or(classes))
    y = lut[torch.as_tensor(mem.targets)]
    keep = y >= 0
    data = ImageTensors(mem.images[keep], y[keep], mean=tuple(info["mean"]), std=tuple(info["std"]))
    if info.get("trunk"):
        data = to_trunk_features(data, trunk_module(from_dict(ExpertsConfig, info["trunk"])))
    return data, int((~keep).sum())


def _load_flat(path: Path, cfg: RunConfig, onto) -> nn.Module:
    from dmde.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if state.get("ontology_hash") != onto.hash():
        raise MismatchError(f"{path} was trained for another ontology")
    flat = _flat_model(cfg, onto.n_classes, state.get("width_match"))
    flat.load_state_dict(state["model"])
    return flat


def load_flat_state(run_dir: Path, onto) -> dict[str, torch.Tensor]:
    """The trained flat model's weights, for the experts' warm start (experts.init=flat)."""
    from dmde.checkpoint import load_checkpoint

    path = Path(run_dir) / "flat.pt"
    if not path.exists():
        raise DmdeFileError(f"experts.init=flat needs {path}: the flat stage has not run")
    state = load_checkpoint(path)
    if state.get("ontology_hash") != onto.hash():
        raise MismatchError(f"{path} was trained for another ontology")
    return state["model"]


def _stage_done(run_dir: Path, name: str) -> bool:
    path = Path(run_dir) / "stages.json"
    return path.exists() and bool(read_json(path).get(name, {}).get("done"))


def load_models(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[dict[str, nn.Module], Any]:
    """Every trained model of a run, by name, for evaluation and prediction.

    ``mixture_upsilon`` (argmax Υ), ``mixture_nway`` (+ trained N-way layer), ``mixture``
    (fine-tuned end to end), ``flat`` and ``early_fusion`` when the run has them.
    """
    from dmde.checkpoint import load_checkpoint
    from dmde.config import load_config
    from dmde.ontology import Ontology

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise DmdeFileError(f"{run_dir} is not a dmde run directory (no config.yaml)")
    cfg = load_config(RunConfig, run_dir / "config.yaml")
    onto = Ontology.from_json(run_dir / "ontology.json")
    groups = load_groups(run_dir, onto)
    n = onto.n_classes
    models: dict[str, nn.Module] = {}
    if (run_dir / "experts").is_dir():
        experts = load_experts(run_dir, onto, groups)
        models["mixture_upsilon"] = build_mixture(run_dir, cfg, experts, groups.groups, n, stage="upsilon")
        if (run_dir / "fusion.pt").exists():
            models["mixture_nway"] = build_mixture(run_dir, cfg, experts, groups.groups, n, stage="fusion")
        if (run_dir / "mixture.pt").exists():
            fresh = load_experts(run_dir, onto, groups)  # fine-tuning changed the experts: own copies
            models["mixture"] = build_mixture(run_dir, cfg, fresh, groups.groups, n, stage="finetune")
        if (run_dir / "early_fusion.pt").exists():
            from dmde.baselines import EarlyFusion

            ef = EarlyFusion(experts, n)
            ef.classifier.load_state_dict(load_checkpoint(run_dir / "early_fusion.pt")["model"])
            models["early_fusion"] = ef
    for name in ("flat", "flat_wide"):
        if (run_dir / f"{name}.pt").exists():
            models[name] = _load_flat(run_dir / f"{name}.pt", cfg, onto)
    members = sorted((run_dir / "ensemble").glob("flat_*.pt")) if "flat" in models else []
    if members and _stage_done(run_dir, "ensemble"):
        from dmde.baselines import FlatEnsemble

        models["flat_ensemble"] = FlatEnsemble([models["flat"]] + [_load_flat(p, cfg, onto) for p in members])
    for m in models.values():
        m.to(device).eval()
    return models, cfg
