"""Datasets, splits and in-memory decoding for training the experts.

Readers: :class:`TinyImageNet` (extracted directory or the zip itself), :class:`ImageFolder`
(``<root>/<class>/<image>``) and :class:`FashionMNIST` (gzip IDX files). Every dataset exposes
``classes`` (WNIDs, or directory names), ``targets`` (int64 array), ``load_image(i)`` (raw uint8
(3, H, W)) and ``__getitem__(i) -> (float image in [0, 1] after the optional transform, target)``.

:func:`materialize` decodes a dataset once into an :class:`InMemoryImages` (uint8 tensor), so that
training on two CPU cores never waits on JPEG decoding. :func:`holdout_split` carves a seeded
per-class validation set out of the training split (Tiny-ImageNet's own validation split is often
absent). Bytes and image files: :mod:`dmde.data.files`; decoding into memory:
:mod:`dmde.data.memory`; tensor transforms: :mod:`dmde.core.transforms`.
"""
from __future__ import annotations

import gzip
import importlib.resources
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dmde.core.errors import CorruptImageError, DmdeFileError, DmdeValueError
from dmde.core.io import sha256_of
from dmde.data.files import (
    IMAGE_EXTENSIONS,
    _DirSource,
    _natural_key,
    _one_line,
    _ZipSource,
    decode_image,
)

Transform = Callable[[torch.Tensor], torch.Tensor]


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


ON_CORRUPT = ("raise", "skip")
#: The datasets a run reads (``data.dataset``); ``synthetic`` comes from :mod:`dmde.data.synthetic`.
DATASETS = ("fashion_mnist", "tiny_imagenet", "imagefolder", "synthetic", "shards")
#: How a run holds its images (``data.storage``): see :mod:`dmde.data.shards` and ``run.prepare``.
STORAGES = ("auto", "memory", "stream")


class ImageDataset(torch.utils.data.Dataset):
    """Common interface: ``classes``, ``targets``, ``load_image(i)``, ``__getitem__``.

    Subclasses implement :meth:`load_image`. ``__getitem__`` converts to float in [0, 1] and
    applies ``transform`` (a callable on (3, H, W) tensors, e.g. :func:`dmde.core.transforms.normalize`).
    """

    classes: list[str]
    targets: np.ndarray
    transform: Transform | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> torch.Tensor:
        """The decoded image as uint8 (3, H, W)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.load_image(index).float().div_(255.0)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def fingerprint(self) -> str:
        """Identifies the dataset's content for caches (type, classes, targets)."""
        return sha256_of([type(self).__name__, self.classes, np.asarray(self.targets).tolist()])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, classes={len(self.classes)})"


class _FileDataset(ImageDataset):
    """Images stored one per file (directory or zip); handles corrupt files.

    ``on_corrupt='raise'`` raises :class:`CorruptImageError` naming the file. ``'skip'`` keeps
    ``__getitem__`` deterministic: a corrupt sample is replaced by the next readable one (in index
    order, wrapping), which depends only on the files. :meth:`scan` instead checks every file once
    and drops the corrupt ones; ``skipped`` counts the corrupt files met so far in this process.
    """

    def __init__(
        self,
        source: _DirSource | _ZipSource,
        files: list[str],
        targets: Sequence[int],
        classes: list[str],
        transform: Transform | None,
        on_corrupt: str,
    ) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise DmdeValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.source = source
        self.files = files
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = classes
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.bad_files: set[str] = set()

    @property
    def skipped(self) -> int:
        return len(self.bad_files)

    def describe(self, index: int) -> str:
        """Where sample ``index`` lives: a path, or ``zip:member``."""
        return self.source.describe(self.files[index])

    def _decode(self, index: int) -> torch.Tensor:
        name = self.files[index]
        return decode_image(self.source.read(name), self.source.describe(name))

    def _decode_or_substitute(self, index: int) -> tuple[torch.Tensor, int]:
        """(image, index it came from): ``index`` itself, or in skip mode the next readable one."""
        try:
            return self._decode(index), index
        except CorruptImageError:
            if self.on_corrupt == "raise":
                raise
            self.bad_files.add(self.files[index])
        j = self._next_readable(index)
        return self._decode(j), j

    def _next_readable(self, index: int) -> int:
        n = len(self.files)
        for step in range(1, n):
            j = (index + step) % n
            if self.files[j] in self.bad_files:
                continue
            try:
                self._decode(j)
                return j
            except CorruptImageError:
                self.bad_files.add(self.files[j])
        raise CorruptImageError(f"no readable image in {self.source}")

    def load_image(self, index: int) -> torch.Tensor:
        return self._decode_or_substitute(index)[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, j = self._decode_or_substitute(index)  # a substitute brings its own target
        img = img.float().div_(255.0)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[j])

    def scan(self, progress: bool = True) -> int:
        """Decode every file once; drop the corrupt ones (``on_corrupt='skip'``) or raise.

        Returns the number of files dropped by this call.
        """
        keep = []
        for i in tqdm(range(len(self.files)), desc="scan", unit="img", disable=not progress):
            try:
                self._decode(i)
                keep.append(i)
            except CorruptImageError:
                if self.on_corrupt == "raise":
                    raise
                self.bad_files.add(self.files[i])
        dropped = len(self.files) - len(keep)
        self.files = [self.files[i] for i in keep]
        self.targets = self.targets[keep]
        return dropped

    def fingerprint(self) -> str:
        return sha256_of([type(self).__name__, repr(self.source), self.classes, self.files,
                          self.targets.tolist()])


def _check_class_dirs(classes: list[str], found: Iterable[str], listing: str, where: str) -> None:
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DmdeValueError(
            f"{where}: class(es) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
            f"are not listed in {listing}"
        )


class TinyImageNet(_FileDataset):
    """Tiny-ImageNet-200 in its official layout, from the extracted directory or the zip file.

    ``root`` is the ``tiny-imagenet-200`` directory (or its parent), or a ``.zip`` whose members sit
    under ``tiny-imagenet-200/`` or directly under ``train/`` and ``val/``. Classes come from
    ``wnids.txt`` (inside the root; for a zip also beside it), else the sorted train directories.
    ``split='val'`` reads ``val/images`` labelled by ``val/val_annotations.txt``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Transform | None = None,
        on_corrupt: str = "raise",
        classes: Sequence[str] | None = None,
    ) -> None:
        """``classes``: the class list to label by (a trained run's), instead of ``wnids.txt``;
        validation images of other classes are then left out (``self.left_out`` counts them)."""
        if split not in ("train", "val"):
            raise DmdeValueError(f"Tiny-ImageNet split must be 'train' or 'val', got {split!r}")
        self.root, self.split = Path(root), split
        self.left_out = 0
        if self.root.is_file():
            source, names, prefix = self._zip_layout(self.root)
        elif self.root.is_dir():
            source, names, prefix = self._dir_layout(self.root)
        else:
            raise DmdeFileError(f"Tiny-ImageNet root {self.root} does not exist")
        self._skip_unknown = classes is not None and split == "val"
        if classes is not None:
            self.classes_file, classes = None, list(classes)
        else:
            classes = self._classes(source, names, prefix)
        if split == "train":
            files, targets = self._train_samples(source, names, prefix, classes)
        else:
            files, targets = self._val_samples(source, names, prefix, classes)
        super().__init__(source, files, targets, classes, transform, on_corrupt)

    # layout discovery -------------------------------------------------------------------

    @staticmethod
    def _zip_layout(path: Path) -> tuple[_ZipSource, list[str], str]:
        if not zipfile.is_zipfile(path):
            raise DmdeFileError(f"Tiny-ImageNet root {path} is neither a directory nor a zip file")
        source = _ZipSource(path)
        # The prefix is whatever precedes train/ or val/ (e.g. 'tiny-imagenet-200/' or '').
        pat = re.compile(r"^(.*?)(?:train/[^/]+/images/|val/images/)[^/]+$")
        for name in source.names:
            m = pat.match(name)
            if m:
                return source, source.names, m.group(1)
        raise DmdeValueError(f"zip file {path} holds no train/<wnid>/images/ or val/images/ members")

    @staticmethod
    def _dir_layout(root: Path) -> tuple[_DirSource, list[str], str]:
        if root.name == "val" and (root / "val_annotations.txt").is_file():  # the val/ directory itself
            return _DirSource(root.parent), [], ""
        if not (root / "train").is_dir() and not (root / "val").is_dir():
            if (root / "tiny-imagenet-200").is_dir():
                root = root / "tiny-imagenet-200"
            else:
                raise DmdeFileError(f"Tiny-ImageNet root {root} has neither train/ nor val/")
        return _DirSource(root), [], ""  # directories are listed on demand, not up front

    def _classes(self, source: Any, names: list[str], prefix: str) -> list[str]:
        wnids_rel = prefix + "wnids.txt"
        text: str | None = None
        where = ""
        if source.has(wnids_rel):
            text, where = source.read(wnids_rel).decode(), source.describe(wnids_rel)
        elif isinstance(source, _ZipSource) and (source.path.parent / "wnids.txt").is_file():
            where = str(source.path.parent / "wnids.txt")
            text = Path(where).read_text()
        if text is not None:
            classes = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if len(set(classes)) != len(classes):
                raise DmdeValueError(f"{where} lists a WNID twice")
            self.classes_file = where
            return classes
        self.classes_file = None
        found = sorted(self._train_dirs(source, names, prefix))
        if not found:
            raise DmdeValueError(f"{source}: no wnids.txt and no train/<wnid>/ directories")
        return found

    @staticmethod
    def _train_dirs(source: Any, names: list[str], prefix: str) -> set[str]:
        if isinstance(source, _ZipSource):
            head = prefix + "train/"
            return {n[len(head):].split("/", 1)[0] for n in names if n.startswith(head) and
                    n.count("/", len(head)) >= 1}
        train = source.root / "train"
        return {d.name for d in train.iterdir() if d.is_dir()} if train.is_dir() else set()

    def _train_samples(self, source: Any, names: list[str], prefix: str,
                       classes: list[str]) -> tuple[list[str], list[int]]:
        per_class: dict[str, list[str]] = {}
        if isinstance(source, _ZipSource):
            pat = re.compile(re.escape(prefix) + r"train/([^/]+)/images/([^/]+)$")
            for n in names:
                m = pat.match(n)
                if m and m.group(2).lower().endswith(IMAGE_EXTENSIONS):
                    per_class.setdefault(m.group(1), []).append(n)
        else:
            train = source.root / "train"
            if not train.is_dir():
                raise DmdeFileError(f"{train} does not exist")
            for d in sorted(p for p in train.iterdir() if p.is_dir()):
                img_dir = d / "images"
                if img_dir.is_dir():
                    per_class[d.name] = [f"train/{d.name}/images/{f.name}" for f in img_dir.iterdir()
                                         if f.name.lower().endswith(IMAGE_EXTENSIONS)]
        if not per_class:
            raise DmdeValueError(f"{source}: no images under train/<wnid>/images/")
        _check_class_dirs(classes, per_class, self.classes_file or "the class list", str(source))
        files: list[str] = []
        targets: list[int] = []
        for c, wnid in enumerate(classes):
            imgs = sorted(per_class.get(wnid, []), key=_natural_key)
            files += imgs
            targets += [c] * len(imgs)
        return files, targets

    def _val_samples(self, source: Any, names: list[str], prefix: str,
                     classes: list[str]) -> tuple[list[str], list[int]]:
        ann_rel = prefix + "val/val_annotations.txt"
        if not source.has(ann_rel):
            raise DmdeFileError(f"{source.describe(ann_rel)} does not exist (no validation split)")
        where = source.describe(ann_rel)
        index = {w: i for i, w in enumerate(classes)}
        files, targets = [], []
        for lineno, line in enumerate(source.read(ann_rel).decode().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise DmdeValueError(f"{where}:{lineno}: expected 'file<TAB>wnid<TAB>x0 y0 x1 y1'")
            fname, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in index and self._skip_unknown:
                self.left_out += 1
                continue
            if wnid not in index:
                raise DmdeValueError(
                    f"{where}:{lineno}: WNID {wnid} is not one of the {len(classes)} classes"
                )
            files.append(f"{prefix}val/images/{fname}")
            targets.append(index[wnid])
        if not files:
            raise DmdeValueError(f"{where} lists no images")
        return files, targets

    def __repr__(self) -> str:
        return (f"TinyImageNet({str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"classes={len(self.classes)})")


class ImageFolder(_FileDataset):
    """``<root>/<class>/**/<image>``: class = directory name (a WNID or a lemma), sorted."""

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None = None,
        on_corrupt: str = "raise",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DmdeFileError(f"image folder {self.root} does not exist")
        exts = tuple(e.lower() for e in extensions)
        classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise DmdeValueError(f"image folder {self.root} has no class sub-directories")
        files: list[str] = []
        targets: list[int] = []
        for c, name in enumerate(classes):
            found = []
            for dirpath, dirnames, fnames in os.walk(self.root / name):
                dirnames.sort()
                rel = Path(dirpath).relative_to(self.root).as_posix()
                found += [f"{rel}/{f}" for f in fnames if f.lower().endswith(exts)]
            found.sort(key=_natural_key)
            if not found:  # a class with no image would silently score 0 and skew every mean
                raise DmdeValueError(f"image folder {self.root}: class folder {name!r} holds no images "
                                     f"({', '.join(exts)}); remove it or add its images")
            files += found
            targets += [c] * len(found)
        if not files:
            raise DmdeValueError(f"image folder {self.root} holds no images ({', '.join(exts)})")
        super().__init__(_DirSource(self.root), files, targets, classes, transform, on_corrupt)


def fashion_mnist_wnids() -> list[str]:
    """Fashion-MNIST's 10 classes as WordNet 3.0 WNIDs, in label order 0..9 (bundled resource)."""
    text = importlib.resources.files("dmde").joinpath("resources/fashion_mnist_wnids.txt").read_text()
    return [ln.split("\t")[0].strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes with ``ndim`` dimensions."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DmdeValueError(f"cannot read IDX file {path}: {_one_line(exc)}") from None
    if len(data) < 4 + 4 * ndim:
        raise DmdeValueError(f"IDX file {path} is too short")
    zero, dtype_code, nd = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or nd != ndim:
        raise DmdeValueError(
            f"IDX file {path}: expected {ndim}-d unsigned bytes, got header {data[:4].hex()}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DmdeValueError(f"IDX file {path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims).copy()  # writable: torch.from_numpy warns on read-only arrays


class FashionMNIST(ImageDataset):
    """Fashion-MNIST from its IDX files; 28×28 greyscale returned as 3 equal channels.

    ``root`` defaults to ``$DMDE_FASHION_MNIST`` or Debian's ``/usr/share/datasets/fashion-mnist``.
    Classes are the bundled WNIDs (:func:`fashion_mnist_wnids`).
    """

    _FILES = {"train": "train", "test": "t10k"}

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        transform: Transform | None = None,
    ) -> None:
        if split not in self._FILES:
            raise DmdeValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        self.root = Path(root or os.environ.get("DMDE_FASHION_MNIST") or FASHION_MNIST_DIR)
        self.split = split
        stem = self._FILES[split]
        img_path = self._find(f"{stem}-images-idx3-ubyte")
        lbl_path = self._find(f"{stem}-labels-idx1-ubyte")
        self.images = _read_idx(img_path, 3)  # (n, 28, 28) uint8
        labels = _read_idx(lbl_path, 1)
        if len(labels) != len(self.images):
            raise DmdeValueError(
                f"{lbl_path} has {len(labels)} labels but {img_path} has {len(self.images)} images"
            )
        self.classes = fashion_mnist_wnids()
        if labels.size and labels.max() >= len(self.classes):
            raise DmdeValueError(f"{lbl_path} has label {labels.max()} (expected 0..{len(self.classes) - 1})")
        self.targets = labels.astype(np.int64)
        self.transform = transform

    def _find(self, base: str) -> Path:
        for name in (base + ".gz", base):
            if (self.root / name).is_file():
                return self.root / name
        raise DmdeFileError(
            f"Fashion-MNIST file {self.root / (base + '.gz')} not found "
            f"(apt-get install dataset-fashion-mnist, or set DMDE_FASHION_MNIST)"
        )

    def load_image(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index]).unsqueeze(0).expand(3, -1, -1).contiguous()

    def fingerprint(self) -> str:
        return sha256_of(["FashionMNIST", str(self.root), self.split, len(self)])

    def __repr__(self) -> str:
        return f"FashionMNIST({str(self.root)!r}, split={self.split!r}, n={len(self)})"
