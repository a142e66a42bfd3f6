"""A dataset decoded once into one uint8 tensor (:class:`InMemoryImages`, the fast path for small
data), with an on-disk cache keyed by what it was decoded from, and the seeded per-class hold-out
split."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dmde.core.errors import CorruptImageError, DmdeValueError
from dmde.core.io import atomic_write, sha256_of
from dmde.core.transforms import resize as _resize_tensor
from dmde.data.datasets import ImageDataset, Transform, _FileDataset
from dmde.data.files import _one_line


class InMemoryImages(ImageDataset):
    """Decoded images held as one uint8 tensor (n, 3, H, W); ``get_batch`` serves whole batches."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: Sequence[int] | np.ndarray | torch.Tensor,
        classes: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise DmdeValueError(
                f"images must be uint8 (n, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        t = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
        if t.shape != (images.shape[0],):
            raise DmdeValueError(f"{images.shape[0]} images but {t.shape[0] if t.ndim else 0} targets")
        if t.size and (t.min() < 0 or t.max() >= len(classes)):
            raise DmdeValueError(f"targets must lie in 0..{len(classes) - 1}")
        self.images = images
        self.targets = t
        self.classes = list(classes)
        self.transform = transform
        self.skipped = 0

    def load_image(self, index: int) -> torch.Tensor:
        return self.images[index]

    def get_batch(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (B, 3, H, W) and int64 targets (B,) for ``indices``, without per-item calls."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return self.images[idx], torch.from_numpy(self.targets[idx.numpy()])

    def fingerprint(self) -> str:
        return sha256_of(["InMemoryImages", tuple(self.images.shape), self.classes, self.targets.tolist()])


class _Decoded(torch.utils.data.Dataset):
    """Wraps a dataset for :func:`materialize`: yields (index, uint8 image or None, error)."""

    def __init__(self, dataset: Any, size: Any) -> None:
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, load_resized(self.dataset, i, self.size), None
        except CorruptImageError as exc:
            return i, None, str(exc)  # errors travel as values: worker tracebacks are multi-line


def load_resized(dataset: Any, index: int, size: Any = None) -> torch.Tensor:
    """Sample ``index`` of any dmde dataset as uint8 (3, H, W), resized to ``size`` when given
    (a no-op for an image of that size). A corrupt file raises, never substituted: the readers
    that call this (decoding into memory, shards, lazy reads) drop or report it themselves."""
    if isinstance(dataset, _FileDataset):
        img = dataset._decode(index)
    elif hasattr(dataset, "load_image"):
        img = dataset.load_image(index)
    else:
        x = dataset[index][0]
        img = x if x.dtype == torch.uint8 else (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return img if size is None else _resize_tensor(img, size)


def _collate_stacked(batch: list) -> tuple[list, Any, list]:
    """Stack a worker's images into one tensor: one shared-memory transfer per batch, not per image."""
    idx, imgs, errs = zip(*batch)
    good = [im for im in imgs if im is not None]
    if good and len(good) == len(imgs) and all(im.shape == good[0].shape for im in good):
        return list(idx), torch.stack(good), list(errs)
    return list(idx), list(imgs), list(errs)


def _unbatch(loader: Iterable) -> Iterable[tuple[int, torch.Tensor | None, str | None]]:
    for idx, imgs, errs in loader:
        yield from zip(idx, imgs, errs)  # iterating a stacked tensor yields views


def materialize(
    dataset: Any,
    size: int | tuple[int, int] | None = None,
    num_workers: int = 0,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    batch_size: int = 256,
) -> InMemoryImages:
    """Decode every image of ``dataset`` once into an :class:`InMemoryImages`.

    ``size`` resizes (antialiased bilinear) images whose size differs; without it all images must
    share one size. ``cache`` (``.pt`` or ``.npz``) is reused when it matches the dataset and
    ``size``, else (re)written atomically. Corrupt files raise, or are dropped when the dataset
    has ``on_corrupt='skip'`` (counted in the result's ``skipped``).
    """
    fp = {"dataset": dataset.fingerprint() if hasattr(dataset, "fingerprint") else
          sha256_of([len(dataset), list(dataset.classes), np.asarray(dataset.targets).tolist()]),
          "size": list(size) if isinstance(size, tuple) else size}
    if cache is not None:
        cached = _load_cache(Path(cache), fp)
        if cached is not None:
            return cached


    n = len(dataset)
    if n == 0:
        raise DmdeValueError(f"{dataset!r} is empty")
    skip = getattr(dataset, "on_corrupt", "raise") == "skip"
    wrapped = _Decoded(dataset, size)
    if num_workers > 0:
        items: Iterable = _unbatch(torch.utils.data.DataLoader(
            wrapped, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_stacked
        ))
    else:
        items = (wrapped[i] for i in range(n))

    images: torch.Tensor | None = None
    keep = np.zeros(n, dtype=bool)
    first_shape: tuple[int, ...] | None = None
    bad: list[int] = []
    for i, img, err in tqdm(items, total=n, desc="decode", unit="img", disable=not progress):
        if img is None:
            if not skip:
                raise CorruptImageError(err)
            bad.append(i)
            continue
        if images is None:
            first_shape = tuple(img.shape)
            images = torch.empty((n, *first_shape), dtype=torch.uint8)
        elif tuple(img.shape) != first_shape:
            where = dataset.describe(i) if hasattr(dataset, "describe") else f"sample {i}"
            raise DmdeValueError(
                f"{where} is {tuple(img.shape)[1:]} but earlier images are {first_shape[1:]}; pass size="
            )
        images[i] = img
        keep[i] = True
    if images is None:
        raise CorruptImageError(f"no readable image in {dataset!r}")
    if bad:
        if isinstance(dataset, _FileDataset):
            dataset.bad_files.update(dataset.files[i] for i in bad)
        images = images[torch.from_numpy(keep)]  # drop the never-filled rows
    out = InMemoryImages(images, np.asarray(dataset.targets)[keep], list(dataset.classes))
    out.skipped = len(bad)
    if cache is not None:
        _save_cache(Path(cache), out, fp)
    return out


def _load_cache(path: Path, fp: dict[str, Any]) -> InMemoryImages | None:
    """The cached decode when ``path`` exists and matches ``fp``; ``None`` means rebuild."""
    if not path.is_file():
        return None
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if json.loads(str(z["meta"])).get("fingerprint") != fp:
                    return None
                obj = {k: z[k] for k in ("images", "targets", "classes", "skipped")}
            obj["images"] = torch.from_numpy(obj["images"])
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if obj.get("meta", {}).get("fingerprint") != fp:
                return None
        out = InMemoryImages(obj["images"], obj["targets"], [str(c) for c in obj["classes"]])
        out.skipped = int(obj["skipped"])
    except Exception as exc:  # unreadable or foreign cache: rebuild rather than fail
        warnings.warn(f"ignoring unreadable cache {path}: {_one_line(exc)}", stacklevel=3)
        return None
    return out


def _save_cache(path: Path, ds: InMemoryImages, fp: dict[str, Any]) -> None:
    meta = {"fingerprint": fp, "format": 1}
    if path.suffix == ".npz":
        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append '.npz' to a name
                np.savez(fh, images=ds.images.numpy(), targets=ds.targets,
                         classes=np.asarray(ds.classes, dtype=str), skipped=np.asarray(ds.skipped),
                         meta=np.asarray(json.dumps(meta)))
    elif path.suffix == ".pt":
        def write(tmp: str) -> None:
            torch.save({"images": ds.images, "targets": torch.from_numpy(ds.targets), "classes": ds.classes,
                        "meta": meta, "skipped": ds.skipped}, tmp)
    else:
        raise DmdeValueError(f"cache file {path} must end in .pt or .npz")
    atomic_write(path, write)


def holdout_split(
    targets: Sequence[int] | np.ndarray,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class hold-out: ``per_class`` images (or ``fraction`` of them) of every class.

    Returns sorted (train_indices, holdout_indices). Each class draws from its own generator
    (seeded by ``(seed, class)``), so a class's hold-out does not depend on the other classes.
    """
    if (per_class is None) == (fraction is None):
        raise DmdeValueError("give exactly one of per_class or fraction")
    if per_class is not None and per_class < 0:
        raise DmdeValueError(f"per_class must be >= 0, got {per_class}")
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise DmdeValueError(f"fraction must lie in [0, 1), got {fraction}")
    t = np.asarray(targets, dtype=np.int64)
    held: list[np.ndarray] = []
    for c in np.unique(t):
        idx = np.flatnonzero(t == c)
        k = per_class if per_class is not None else int(round(fraction * len(idx)))
        if k >= len(idx) and k > 0:
            raise DmdeValueError(f"class {c} has {len(idx)} images; cannot hold out {k} and keep any")
        rng = np.random.default_rng([seed, int(c)])
        held.append(np.sort(rng.choice(idx, size=k, replace=False)))
    hold = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(len(t), dtype=bool)
    mask[hold] = False
    return np.flatnonzero(mask), hold
