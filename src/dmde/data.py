"""Datasets, splits and in-memory decoding for training the experts.

Readers: :class:`TinyImageNet` (extracted directory or the zip itself), :class:`ImageFolder`
(``<root>/<class>/<image>``) and :class:`FashionMNIST` (gzip IDX files). Every dataset exposes
``classes`` (WNIDs, or directory names), ``targets`` (int64 array), ``load_image(i)`` (raw uint8
(3, H, W)) and ``__getitem__(i) -> (float image in [0, 1] after the optional transform, target)``.

:func:`materialize` decodes a dataset once into an :class:`InMemoryImages` (uint8 tensor), so that
training on two CPU cores never waits on JPEG decoding. :func:`holdout_split` carves a seeded
per-class validation set out of the training split (Tiny-ImageNet's own validation split is often
absent), and :func:`relabel` maps a dataset's classes to an ontology's class positions.
Tensor transforms live in :mod:`dmde.transforms`.
"""
from __future__ import annotations

import gzip
import importlib.resources
import io
import json
import os
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from dmde.errors import CorruptImageError, DmdeFileError, DmdeValueError
from dmde.io import atomic_write, sha256_of
from dmde.transforms import resize as _resize_tensor

__all__ = [
    "FASHION_MNIST_DIR",
    "FashionMNIST",
    "ImageDataset",
    "ImageFolder",
    "InMemoryImages",
    "Subset",
    "TinyImageNet",
    "decode_image",
    "fashion_mnist_wnids",
    "holdout_split",
    "materialize",
    "relabel",
]

Transform = Callable[[torch.Tensor], torch.Tensor]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
_ON_CORRUPT = ("raise", "skip")


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes, name: str) -> torch.Tensor:
    """Encoded image bytes → uint8 tensor (3, H, W); any mode (L, P, RGBA, CMYK, ...) becomes RGB.

    Raises :class:`CorruptImageError` naming ``name`` when Pillow cannot decode it fully.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode now: a truncated file fails here, not later
            return pil_to_tensor(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(f"cannot decode image {name}: {_one_line(exc)}") from None


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """A PIL image of any mode → uint8 tensor (3, H, W) in RGB (alpha dropped, 16-bit scaled)."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow's advice for palettes with transparency
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float greyscale: scale to 8 bits instead of clipping.
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() if arr.size and arr.max() > 255 else 255.0
        im = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8), mode="L")
    if im.mode != "RGB":
        im = im.convert("RGB")  # alpha is dropped
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (H, W, 3) → (3, H, W)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _natural_key(name: str) -> list[Any]:
    """Sort ``img_2`` before ``img_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------- file sources


class _DirSource:
    """Files under a directory, addressed by '/'-separated relative names."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as exc:
            raise DmdeFileError(f"cannot read {self.describe(name)}: {_one_line(exc)}") from None

    def describe(self, name: str) -> str:
        return str(self.root / name)

    def __repr__(self) -> str:
        return str(self.root)


class _ZipSource:
    """Members of a zip file, read without extracting.

    The ``ZipFile`` handle is opened lazily and owned by one process: after a fork (DataLoader
    workers) the child opens its own, because a shared file offset would corrupt reads.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zf: zipfile.ZipFile | None = None
        self._pid = -1
        self.names: list[str] = self._zip().namelist()
        self._name_set: set[str] | None = None

    def has(self, name: str) -> bool:
        if self._name_set is None:
            self._name_set = set(self.names)
        return name in self._name_set

    def _zip(self) -> zipfile.ZipFile:
        if self._zf is None or self._pid != os.getpid():
            try:
                self._zf = zipfile.ZipFile(self.path)
            except (OSError, zipfile.BadZipFile) as exc:
                raise DmdeFileError(f"cannot open zip file {self.path}: {_one_line(exc)}") from None
            self._pid = os.getpid()
        return self._zf

    def read(self, name: str) -> bytes:
        try:
            return self._zip().read(name)
        except KeyError:
            raise DmdeFileError(f"{self.describe(name)} is not in the zip file") from None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:  # bad CRC, truncated member
            raise CorruptImageError(f"cannot read {self.describe(name)}: {_one_line(exc)}") from None

    def describe(self, name: str) -> str:
        return f"{self.path}:{name}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_zf"], state["_pid"] = None, -1  # never pickle an open handle
        return state

    def __repr__(self) -> str:
        return str(self.path)


# --------------------------------------------------------------------------- base dataset


class ImageDataset(torch.utils.data.Dataset):
    """Common interface: ``classes``, ``targets``, ``load_image(i)``, ``__getitem__``.

    Subclasses implement :meth:`load_image`. ``__getitem__`` converts to float in [0, 1] and
    applies ``transform`` (a callable on (3, H, W) tensors, e.g. :func:`dmde.transforms.eval_transform`).
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
        if on_corrupt not in _ON_CORRUPT:
            raise DmdeValueError(f"on_corrupt must be one of {_ON_CORRUPT}, got {on_corrupt!r}")
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
        from tqdm.auto import tqdm

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


# --------------------------------------------------------------------------- Tiny-ImageNet


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
    ) -> None:
        if split not in ("train", "val"):
            raise DmdeValueError(f"Tiny-ImageNet split must be 'train' or 'val', got {split!r}")
        self.root, self.split = Path(root), split
        if self.root.is_file():
            source, names, prefix = self._zip_layout(self.root)
        elif self.root.is_dir():
            source, names, prefix = self._dir_layout(self.root)
        else:
            raise DmdeFileError(f"Tiny-ImageNet root {self.root} does not exist")
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


# --------------------------------------------------------------------------- ImageFolder


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
            files += found
            targets += [c] * len(found)
        if not files:
            raise DmdeValueError(f"image folder {self.root} holds no images ({', '.join(exts)})")
        super().__init__(_DirSource(self.root), files, targets, classes, transform, on_corrupt)


# --------------------------------------------------------------------------- Fashion-MNIST


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


# --------------------------------------------------------------------------- in memory


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
        ds = self.dataset
        try:
            if isinstance(ds, _FileDataset):
                img = ds._decode(i)  # no substitution: materialize drops corrupt files itself
            elif hasattr(ds, "load_image"):
                img = ds.load_image(i)
            else:
                x = ds[i][0]
                img = x if x.dtype == torch.uint8 else (x.clamp(0, 1) * 255).round().to(torch.uint8)
        except CorruptImageError as exc:
            return i, None, str(exc)  # errors travel as values: worker tracebacks are multi-line
        if self.size is not None:
            img = _resize_tensor(img, self.size)
        return i, img, None


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

    from tqdm.auto import tqdm

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


# --------------------------------------------------------------------------- splits, relabelling


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


class Subset(ImageDataset):
    """Some samples of a dataset, optionally with targets remapped and a new class list."""

    def __init__(
        self,
        dataset: Any,
        indices: Sequence[int] | np.ndarray,
        target_map: np.ndarray | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        base_t = np.asarray(dataset.targets, dtype=np.int64)[self.indices]
        self.target_map = target_map
        self.targets = target_map[base_t] if target_map is not None else base_t
        self.classes = list(classes) if classes is not None else list(dataset.classes)

    def load_image(self, index: int) -> torch.Tensor:
        return self.dataset.load_image(int(self.indices[index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, t = self.dataset[int(self.indices[index])]  # the base's target: it may substitute
        return img, int(self.target_map[t]) if self.target_map is not None else int(t)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch access when the base dataset has it (e.g. :class:`InMemoryImages`)."""
        pos = np.asarray(indices, dtype=np.int64)
        imgs, _ = self.dataset.get_batch(self.indices[pos])
        return imgs, torch.from_numpy(self.targets[pos])

    def fingerprint(self) -> str:
        base = self.dataset.fingerprint() if hasattr(self.dataset, "fingerprint") else repr(self.dataset)
        return sha256_of(["Subset", base, self.indices.tolist(), self.classes, self.targets.tolist()])


def relabel(dataset: Any, class_order: Sequence[str]) -> Subset:
    """The dataset with targets = positions of its classes in ``class_order`` (an ontology's WNIDs).

    Classes of the dataset absent from ``class_order`` raise :class:`DmdeValueError` naming them;
    ``class_order`` may hold classes the dataset lacks.
    """
    pos = {c: i for i, c in enumerate(class_order)}
    if len(pos) != len(class_order):
        raise DmdeValueError("class_order lists a class twice")
    missing = [c for c in dataset.classes if c not in pos]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DmdeValueError(
            f"class(es) {', '.join(missing[:5])}{more} of {type(dataset).__name__} are not in the ontology"
        )
    target_map = np.asarray([pos[c] for c in dataset.classes], dtype=np.int64)
    return Subset(dataset, np.arange(len(dataset)), target_map, class_order)
