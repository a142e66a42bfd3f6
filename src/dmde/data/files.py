"""Image files and their bytes: decoding (Pillow) to uint8 (3, H, W) tensors, and the two places
images live, a directory tree or a zip archive, listed in a natural order."""
from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dmde.core.errors import CorruptImageError, DmdeFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


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
