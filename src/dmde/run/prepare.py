"""A run's data as its models consume it: the dataset opened, split per class into hold-out, fusion
and training parts, normalised for the backbone, and passed through a frozen trunk once (cached)."""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from dmde.core.checkpoint import load_checkpoint, save_checkpoint
from dmde.core.config import config_hash, from_dict, load_config, to_dict
from dmde.core.errors import DmdeFileError, DmdeValueError
from dmde.core.io import read_json
from dmde.core.training import ImageTensors, predict_logits
from dmde.data import datasets as D
from dmde.data.memory import InMemoryImages, holdout_split, materialize
from dmde.data.synthetic import synthetic_images
from dmde.experts.backbones import create_backbone
from dmde.experts.train import ExpertsConfig, uses_cached_trunk
from dmde.hierarchy.ontology import Ontology
from dmde.hierarchy.wordnet import WordNet
from dmde.run.config import DataConfig, RunConfig


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
    """The configured dataset (a :mod:`dmde.data.datasets` dataset, or synthetic images in memory)."""
    if cfg.dataset == "fashion_mnist":
        return D.FashionMNIST(cfg.root, split="train" if split == "train" else "test")
    if cfg.dataset == "tiny_imagenet":
        if cfg.root is None:
            raise DmdeValueError("data.root must point at the Tiny-ImageNet directory or its zip")
        return D.TinyImageNet(cfg.root, split=split, on_corrupt=cfg.on_corrupt)
    if cfg.dataset == "imagefolder":
        if cfg.root is None:
            raise DmdeValueError("data.root must point at an ImageFolder directory (<root>/<class>/<image>)")
        return D.ImageFolder(cfg.root, on_corrupt=cfg.on_corrupt)
    if cfg.dataset == "synthetic":
        classes = list(cfg.classes or D.fashion_mnist_wnids())
        images, targets = synthetic_images(len(classes), cfg.synthetic_per_class, size=cfg.image_size or 16,
                                           seed=cfg.seed + (0 if split == "train" else 7919))
        return InMemoryImages(images, targets.numpy(), classes)
    raise DmdeValueError(f"unknown dataset {cfg.dataset!r} (fashion_mnist, tiny_imagenet, imagefolder, synthetic)")


def class_wnids(classes: Sequence[str], wn: Any) -> list[str]:
    """Dataset class names → WNIDs (ImageFolder may name its classes by lemma, or as ``crane.n.02``;
    a lemma with several noun senses is an error listing them)."""
    out = []
    for c in classes:
        out.append(c if re.fullmatch(r"n\d{8}", c) else wn.wnid(wn.resolve_unambiguous(c)))
    return out


def load_splits(cfg: DataConfig, wn: Any = None, progress: bool = True) -> Splits:
    """Decode the training split once and cut it into train / fusion / hold-out, per class."""
    ds = open_dataset(cfg, "train", wn)
    mem = ds if isinstance(ds, InMemoryImages) else materialize(
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
    rest, hold = holdout_split(y, per_class=cfg.holdout_per_class, seed=cfg.seed)
    fusion = np.zeros(0, dtype=np.int64)
    if cfg.fusion_per_class > 0:
        r_train, r_fusion = holdout_split(y[rest], per_class=cfg.fusion_per_class, seed=cfg.seed + 1)
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
        warnings.warn(f"{skipped} corrupt image(s) skipped (data.on_corrupt=skip)", stacklevel=2)
    return Splits(classes, part(rest), part(fusion), part(hold), skipped)


def backbone_normalisation(cfg: ExpertsConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean/std the experts' backbone expects (0.5 for EfficientNet-Lite0)."""
    kw = {k: v for k, v in cfg.backbone_kwargs.items() if k != "pretrained"}  # no weights needed
    b = create_backbone(cfg.backbone, **kw)
    return tuple(b.input_mean), tuple(b.input_std)


def trunk_module(cfg: ExpertsConfig) -> nn.Module:
    """The experts' frozen trunk (pretrained weights when configured), images → feature maps."""
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
    splits = load_splits(cfg.data, wn, progress=progress)
    mean, std = backbone_normalisation(cfg.experts)
    for part in (splits.train, splits.fusion, splits.holdout):
        part.mean, part.std = mean, std
    if not uses_cached_trunk(cfg.experts):
        return splits
    key = config_hash([to_dict(cfg.data), cfg.experts.backbone, cfg.experts.backbone_kwargs])
    path = cache_dir / f"trunk_{key}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        st = load_checkpoint(path)
        parts = [ImageTensors(st[f"{n}_inputs"], st[f"{n}_targets"], "features", mean, std)
                 for n in ("train", "fusion", "holdout")]
        return Splits(splits.classes, *parts, splits.skipped)
    trunk = trunk_module(cfg.experts).to(device)
    parts = [to_trunk_features(p, trunk, device, progress) for p in (splits.train, splits.fusion, splits.holdout)]
    if path is not None:
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


def data_summary(cfg: RunConfig, splits: Splits, device: torch.device | str = "cpu") -> dict[str, Any]:
    """What prediction needs to know about the inputs (size, normalisation, cached trunk), and the
    device the run trains on (for an export's model card)."""
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


def external_eval_data(run_dir: str | os.PathLike, path: str | os.PathLike) -> tuple[ImageTensors, int]:
    """A dataset given by path, decoded at the run's input size and labelled by the run's ontology
    positions: Tiny-ImageNet's official validation split (its root, its zip, or the ``val/``
    directory alone: the run knows its classes, no ``wnids.txt`` needed), Fashion-MNIST's own test
    files (the directory holding ``t10k-*-ubyte[.gz]``), or an ImageFolder. Returns the data and
    how many images belonged to classes the ontology does not have."""
    run_dir, path = Path(run_dir), Path(path)
    info = read_json(run_dir / "data.json", "run data summary")
    onto = Ontology.from_json(run_dir / "ontology.json")
    if not path.exists():
        raise DmdeFileError(f"evaluation data {path} does not exist")
    is_tiny = path.suffix == ".zip" or any((path / p).exists() for p in (
        "val/val_annotations.txt", "tiny-imagenet-200/val", "val_annotations.txt"))
    is_fashion = any((path / f"t10k-images-idx3-ubyte{z}").is_file() for z in (".gz", ""))
    left_out = 0
    if is_tiny:
        ds = D.TinyImageNet(path, split="val", classes=info["classes"])
        left_out = ds.left_out
    elif is_fashion:
        ds = D.FashionMNIST(path, split="test")
    else:
        ds = D.ImageFolder(path)
    mem = materialize(ds, size=tuple(info["image_size"]), progress=False)
    classes = list(mem.classes)
    if not (is_tiny or is_fashion):
        cfg = load_config(RunConfig, run_dir / "config.yaml")
        classes = class_wnids(classes, WordNet.load(cfg.ontology.wordnet))
    lut = torch.as_tensor(onto.positions_or(classes))
    y = lut[torch.as_tensor(mem.targets)]
    keep = y >= 0
    if not bool(keep.any()):
        raise DmdeValueError(f"none of the {len(classes)} classes of {path} is in the run's ontology "
                             f"(first: {classes[0] if classes else 'none'}); evaluate on images of the run's classes")
    data = ImageTensors(mem.images[keep], y[keep], mean=tuple(info["mean"]), std=tuple(info["std"]))
    if info.get("trunk"):
        data = to_trunk_features(data, trunk_module(from_dict(ExpertsConfig, info["trunk"])))
    return data, int((~keep).sum()) + left_out
