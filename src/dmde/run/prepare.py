"""A run's data as its models consume it: the dataset opened, split per class into hold-out, fusion
and training parts, normalised for the backbone, and passed through a frozen trunk once (cached)."""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dmde.core.checkpoint import load_checkpoint, save_checkpoint
from dmde.core.config import config_hash, from_dict, load_config
from dmde.core.errors import DmdeFileError, DmdeValueError
from dmde.core.io import read_json
from dmde.core.training import (
    ImageTensors,
    StreamedImages,
    load_batches,
    predict_logits,
)
from dmde.data import datasets as D
from dmde.data.memory import InMemoryImages, holdout_split, materialize
from dmde.data.shards import SPLITS, DatasetReader, ShardReader, write_shards
from dmde.data.synthetic import synthetic_images
from dmde.experts.backbones import create_backbone
from dmde.experts.train import ExpertsConfig, uses_cached_trunk
from dmde.hierarchy.ontology import Ontology
from dmde.hierarchy.wordnet import WordNet
from dmde.run.config import DataConfig, RunConfig
from dmde.run.stages import data_key


@dataclass
class Splits:
    classes: list[str]  # dataset classes as WNIDs (dataset order)
    train: ImageTensors | StreamedImages  # targets: dataset class ids until aligned to the ontology
    fusion: ImageTensors | StreamedImages
    holdout: ImageTensors | StreamedImages
    skipped: int = 0  # corrupt images dropped (data.on_corrupt=skip)

    def align(self, positions: np.ndarray) -> Splits:
        """Dataset class ids → ontology positions (−1: class dropped from the ontology)."""
        lut = torch.as_tensor(positions, dtype=torch.long)

        def one(t: ImageTensors | StreamedImages) -> ImageTensors | StreamedImages:
            y = lut[t.targets]
            keep = torch.nonzero(y >= 0).flatten()
            sub = t.subset(keep)
            sub.targets = y[keep]
            return sub

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


def run_wordnet(cfg: RunConfig) -> WordNet | None:
    """The WordNet a run reads: only with ``ontology.source=wordnet`` (visual trees and taxonomies
    take the class names as they are, and need none)."""
    return WordNet.load(cfg.ontology.wordnet) if cfg.ontology.source == "wordnet" else None


def class_wnids(classes: Sequence[str], wn: Any) -> list[str]:
    """Dataset class names → WNIDs (ImageFolder may name its classes by lemma, or as ``crane.n.02``;
    a lemma with several noun senses is an error listing them); without ``wn`` the names as they are."""
    if wn is None:
        return list(classes)
    out = []
    for c in classes:
        out.append(c if re.fullmatch(r"n\d{8}", c) else wn.wnid(wn.resolve_unambiguous(c)))
    return out


def load_splits(cfg: DataConfig, wn: Any = None, progress: bool = True) -> Splits:
    """Decode the training split once and cut it into train / fusion / hold-out, per class. An
    ImageFolder's class names become WNIDs through ``wn``; without it they stay as they are."""
    if cfg.dataset == "shards":
        return _shard_splits(cfg, progress)
    ds = open_dataset(cfg, "train", wn)
    stream = not isinstance(ds, InMemoryImages) and choose_storage(cfg, ds) == "stream"
    if stream:
        if getattr(ds, "on_corrupt", "raise") == "skip":
            ds.scan(progress=progress)  # drop the corrupt files first: the split is over readable ones
        source: Any = ds
    else:
        source = ds if isinstance(ds, InMemoryImages) else materialize(
            ds, size=cfg.image_size, cache=cfg.cache, progress=progress)
    classes = class_wnids(source.classes, wn) if cfg.dataset == "imagefolder" else list(source.classes)
    classes, parts = split_indices(cfg, classes, np.asarray(source.targets, dtype=np.int64))
    if stream:
        reader = DatasetReader(ds, cfg.image_size)

        def part(rows: np.ndarray, y: np.ndarray) -> ImageTensors | StreamedImages:
            return StreamedImages(reader, torch.as_tensor(rows), torch.as_tensor(y), workers=cfg.workers)
    else:
        images = source.images

        def part(rows: np.ndarray, y: np.ndarray) -> ImageTensors | StreamedImages:
            return ImageTensors(images[torch.as_tensor(rows)], torch.as_tensor(y))

    skipped = int(getattr(source, "skipped", 0))
    if skipped:
        warnings.warn(f"{skipped} corrupt image(s) skipped (data.on_corrupt=skip)", stacklevel=2)
    train, fusion, hold = (part(*parts[n]) for n in SPLITS)
    return Splits(classes, train, fusion, hold, skipped)


def split_indices(cfg: DataConfig, classes: list[str], targets: np.ndarray
                  ) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The kept classes, and per split (train, fusion, hold-out) the dataset indices and their
    class ids among the kept classes: the seeded per-class split every storage shares."""
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
    return classes, {n: (idx[sel], y[sel]) for n, sel in zip(SPLITS, (rest, fusion, hold))}


#: The data settings that fix the split: shards record them, a run reading shards must match them.
SPLIT_SETTINGS = ("dataset", "classes", "max_classes", "image_size", "max_per_class", "holdout_per_class",
                  "fusion_per_class", "synthetic_per_class", "on_corrupt", "seed")


def choose_storage(cfg: DataConfig, ds: Any) -> str:
    """``data.storage``, with ``auto`` resolved: stream when the decoded images would take more
    than a quarter of this machine's memory."""
    if cfg.storage != "auto":
        return cfg.storage
    if cfg.image_size is not None:
        h = w = cfg.image_size
    else:
        h, w = (ds.load_image(0) if hasattr(ds, "load_image") else ds[0][0]).shape[-2:]
    return auto_storage(len(ds), (3, h, w))


def auto_storage(n_images: int, shape: Sequence[int]) -> str:
    """``data.storage=auto``: stream when ``n_images`` uint8 images of ``shape`` would take more
    than a quarter of this machine's memory, else decode them into memory."""
    return "stream" if n_images * int(np.prod(shape)) > memory_bytes() // 4 else "memory"


def memory_bytes() -> int:
    """This machine's physical memory."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _shard_splits(cfg: DataConfig, progress: bool) -> Splits:
    """A shard directory's splits, as written; streamed, or read into memory when small."""
    if cfg.root is None:
        raise DmdeValueError("data.root must point at a shard directory (written by `dmde shards`)")
    reader = ShardReader(cfg.root)
    written = reader.index.get("settings", {})
    for key in SPLIT_SETTINGS:
        if key in ("dataset", "on_corrupt") or key not in written:
            continue
        if getattr(cfg, key) != written[key]:
            raise DmdeValueError(f"shards in {cfg.root} were split with data.{key}={written[key]!r} (this run: "
                                 f"{getattr(cfg, key)!r}); set data.{key}={written[key]!r} or write new shards")
    storage = auto_storage(len(reader), reader.shape) if cfg.storage == "auto" else cfg.storage
    parts = []
    for name in SPLITS:
        rows = torch.as_tensor(reader.rows(name))
        part = StreamedImages(reader, rows, torch.as_tensor(reader.labels[rows.numpy()]), workers=cfg.workers)
        if storage == "memory":
            raws = load_batches(part, [torch.arange(s, min(len(part), s + 512)) for s in range(0, len(part), 512)])
            inputs = torch.cat(list(raws)) if len(part) else torch.empty((0, *reader.shape), dtype=torch.uint8)
            part = ImageTensors(inputs, part.targets)
        parts.append(part)
    return Splits(list(reader.classes), *parts)


def write_run_shards(cfg: DataConfig, out: str | os.PathLike, shard_size: int = 5000, wn: Any = None,
                     progress: bool = True) -> dict[str, Any]:
    """Write the configured dataset into shards, split as a run with ``cfg`` splits it."""
    if cfg.dataset == "shards":
        raise DmdeValueError("data.dataset=shards: these are shards already")
    if Path(out).exists():  # before any reading: say it at once
        raise DmdeFileError(f"{out} already exists; remove it or choose another --out")
    ds = open_dataset(cfg, "train", wn)
    if getattr(ds, "on_corrupt", "raise") == "skip":
        ds.scan(progress=progress)
    classes = class_wnids(ds.classes, wn) if cfg.dataset == "imagefolder" else list(ds.classes)
    kept, parts = split_indices(cfg, classes, np.asarray(ds.targets, dtype=np.int64))
    labels = np.full(len(ds), -1, dtype=np.int64)
    for rows, y in parts.values():
        labels[rows] = y
    settings = {k: getattr(cfg, k) for k in SPLIT_SETTINGS}
    return write_shards(ds, out, {n: parts[n][0] for n in SPLITS}, kept, labels, size=cfg.image_size,
                        shard_size=shard_size, settings=settings, progress=progress)


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
    key = config_hash([data_key(cfg), cfg.experts.backbone, cfg.experts.backbone_kwargs])
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


def cat_data(a: ImageTensors | StreamedImages, b: ImageTensors | StreamedImages) -> ImageTensors | StreamedImages:
    if len(b) == 0:
        return a
    if isinstance(a, StreamedImages):  # two splits of one reader: their rows, joined
        if not isinstance(b, StreamedImages) or b.reader is not a.reader:
            raise DmdeValueError("cannot join splits of different sources")
        return StreamedImages(a.reader, torch.cat([a.rows, b.rows]), torch.cat([a.targets, b.targets]),
                              a.mean, a.std, a.workers)
    return ImageTensors(torch.cat([a.inputs, b.inputs]), torch.cat([a.targets, b.targets]), a.kind, a.mean, a.std)


def data_summary(cfg: RunConfig, splits: Splits, device: torch.device | str = "cpu") -> dict[str, Any]:
    """What prediction needs to know about the inputs (size, normalisation, cached trunk), and the
    device the run trains on (for an export's model card)."""
    if uses_cached_trunk(cfg.experts):
        size = list(load_splits_shape(cfg))
    else:
        size = list(splits.train.sample_shape[-2:])
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
    if cfg.data.dataset == "shards":
        return tuple(ShardReader(cfg.data.root).shape[-2:])
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
        classes = class_wnids(classes, run_wordnet(cfg))
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
