"""Tar shards for data that does not fit in memory: written once, read batch by batch.

A shard directory holds

- ``{split}-{k:06d}.tar``: the images of one split (``train``, ``fusion``, ``holdout``), in the
  `webdataset <https://github.com/webdataset/webdataset>`_ format (one ``{key}.{ext}`` member per
  image plus ``{key}.cls`` and ``{key}.json``), so any webdataset pipeline reads them too;
- ``index.json``: the class list (WNIDs or names), the image size, the settings that fixed the
  split, and the per-class index: which shards hold how many images of each class;
- ``rows.npz``: one row per image (split, label, shard, byte offset and length of its image
  member), so a reader seeks straight to the images it needs.

The split is fixed when the shards are written: a run reading them gets exactly the hold-out,
fusion and training images the writer chose, whatever else it changes.

Why random access and not webdataset's sequential reader: an expert of a mixture trains on its own
group (about 1/10 of the classes at 10⁴ classes) plus a not-in-group sample drawn per epoch. A
sequential stream would read the whole dataset for every expert epoch; with the row index an
expert reads only its images (:attr:`ShardReader.bytes_read` measures it). Shards are written in
class order, so an expert's reads stay within few shards.

Images are stored as their original file bytes when they already have the shards' size (JPEG stays
JPEG), else resized once and stored as PNG (lossless): a shard-fed run sees the same pixels as an
in-memory one, bit for bit.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from dmde.core.errors import CorruptImageError, DmdeFileError, DmdeValueError
from dmde.core.io import atomic_write, check_format
from dmde.core.transforms import resize as _resize_tensor
from dmde.data.datasets import _FileDataset
from dmde.data.files import decode_image
from dmde.data.memory import load_resized

FORMAT = "dmde-shards"
VERSION = 1
SPLITS = ("train", "fusion", "holdout")
INDEX = "index.json"
ROWS = "rows.npz"


def is_shard_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX).is_file()


def _encode_png(img: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _sample_bytes(dataset: Any, i: int, size: tuple[int, int] | None) -> tuple[bytes, str, tuple[int, ...]]:
    """(encoded image, extension, decoded shape) of sample ``i``, at ``size`` when given."""
    if isinstance(dataset, _FileDataset):
        name = dataset.files[i]
        raw = dataset.source.read(name)
        img = decode_image(raw, dataset.source.describe(name))
        ext = name.rsplit(".", 1)[-1].lower()
        if (size is None or tuple(img.shape[-2:]) == size) and ext in ("jpg", "jpeg", "png"):
            return raw, "jpg" if ext == "jpeg" else ext, tuple(img.shape)
        img = img if size is None else _resize_tensor(img, size)  # decoded above: not again
    else:
        img = load_resized(dataset, i, size)
    return _encode_png(img), "png", tuple(img.shape)


def write_shards(
    dataset: Any,
    out: str | os.PathLike,
    splits: dict[str, np.ndarray],
    classes: Sequence[str],
    labels: np.ndarray,
    size: int | tuple[int, int] | None = None,
    shard_size: int = 5000,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``dataset``'s images into shards under ``out`` (created; must not exist).

    ``splits[name]``: the dataset indices of each split, in the order to write them; ``labels``:
    each dataset index's class id in ``classes`` (−1: not written). ``settings`` are stored as
    what fixed the split. The directory appears complete or not at all (written beside, renamed).
    Returns the index.
    """


    out = Path(out)
    if out.exists():
        raise DmdeFileError(f"{out} already exists; remove it or choose another --out")
    if shard_size < 1:
        raise DmdeValueError(f"shard size must be >= 1, got {shard_size}")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise DmdeValueError(f"unknown split {unknown[0]!r} (use {', '.join(SPLITS)})")
    if isinstance(size, int):
        size = (size, size)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # the leftover of a killed writer
    tmp.mkdir(parents=True)
    rows: dict[str, list] = {k: [] for k in ("split", "label", "shard", "offset", "nbytes")}
    index: dict[str, Any] = {"format": FORMAT, "version": VERSION, "classes": list(classes),
                             "image_size": None, "settings": settings or {}, "splits": {}}
    shape: tuple[int, ...] | None = None
    total = sum(len(v) for v in splits.values())
    bar = tqdm(total=total, desc="shards", unit="img", disable=not progress)
    try:
        for s_no, name in enumerate(SPLITS):
            sel = np.asarray(splits.get(name, np.zeros(0, dtype=np.int64)), dtype=np.int64)
            pattern = str(tmp / f"{name}-%06d.tar")
            keys: list[str] = []
            if len(sel):
                with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0.0) as sink:
                    for k, i in enumerate(sel.tolist()):
                        data, ext, shp = _sample_bytes(dataset, i, size)
                        if shape is None:
                            shape = shp
                        elif shp != shape:
                            where = dataset.describe(i) if hasattr(dataset, "describe") else f"sample {i}"
                            raise DmdeValueError(f"{where} is {shp[1:]} but earlier images are {shape[1:]}; "
                                                 "pass --image-size")
                        key = f"{k:09d}"
                        label = int(labels[i])
                        sink.write({"__key__": key, ext: data, "cls": str(label).encode(),
                                    "json": json.dumps({"class": classes[label], "split": name,
                                                        "source_index": i}).encode()})
                        keys.append(f"{key}.{ext}")
                        rows["split"].append(s_no)
                        rows["label"].append(label)
                        bar.update(1)
            n_shards = (len(sel) + shard_size - 1) // shard_size
            shard_names = [f"{name}-{j:06d}.tar" for j in range(n_shards)]
            offsets = _member_offsets(tmp, shard_names)
            per_class: dict[str, list[list[int]]] = {}
            base = sum(len(v["shards"]) for v in index["splits"].values())  # earlier splits' shards
            for k, member in enumerate(keys):
                j, off, nb = offsets[member]
                rows["shard"].append(base + j)
                rows["offset"].append(off)
                rows["nbytes"].append(nb)
                lab = str(int(labels[sel[k]]))
                counts = per_class.setdefault(lab, [])
                if counts and counts[-1][0] == j:
                    counts[-1][1] += 1
                else:
                    counts.append([j, 1])
            index["splits"][name] = {"shards": shard_names, "count": len(sel), "per_class": per_class}
    finally:
        bar.close()
    if shape is None:
        shutil.rmtree(tmp)
        raise DmdeValueError("no image to write: every split is empty")
    index["image_size"] = list(shape[-2:])
    index["channels"] = int(shape[0])
    index["shard_files"] = [f"{n}-{j:06d}.tar" for n in SPLITS for j in
                            range(len(index["splits"].get(n, {}).get("shards", [])))]
    np.savez(tmp / ROWS, **{k: np.asarray(v, dtype=np.int64) for k, v in rows.items()})
    atomic_write(tmp / INDEX, lambda t: Path(t).write_text(json.dumps(index, indent=1)))
    os.replace(tmp, out)
    return index


def _member_offsets(root: Path, shard_names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """member name → (shard number in ``shard_names``, byte offset of its data, its length)."""
    out: dict[str, tuple[int, int, int]] = {}
    for j, name in enumerate(shard_names):
        with tarfile.open(root / name) as tar:
            for m in tar.getmembers():
                if m.name.endswith((".jpg", ".png")):
                    out[m.name] = (j, m.offset_data, m.size)
    return out


class ShardReader:
    """Random access to the images of a shard directory: ``read(row)`` seeks to the row's image
    member and decodes it (uint8 (3, H, W)). Picklable: each worker process opens its own files.
    ``bytes_read`` counts the image bytes this process has read."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not is_shard_dir(self.root):
            raise DmdeFileError(f"{self.root} is not a dmde shard directory (no {INDEX}); write one with `dmde shards`")
        try:
            self.index = json.loads((self.root / INDEX).read_text())
        except (OSError, ValueError) as exc:
            raise DmdeFileError(f"{self.root / INDEX} is not readable JSON: {exc}") from None
        check_format(self.index, FORMAT, VERSION, "shard index", str(self.root / INDEX))
        with np.load(self.root / ROWS) as z:
            self.split = z["split"].astype(np.int8)
            self.labels = z["label"].astype(np.int64)
            self.shard = z["shard"].astype(np.int32)
            self.offset = z["offset"].astype(np.int64)
            self.nbytes = z["nbytes"].astype(np.int64)
        self.files = list(self.index["shard_files"])
        missing = [f for f in self.files if not (self.root / f).is_file()]
        if missing:
            raise DmdeFileError(f"shard {self.root / missing[0]} is missing ({len(missing)} of {len(self.files)})")
        self.classes: list[str] = list(self.index["classes"])
        self.shape = (int(self.index.get("channels", 3)), *map(int, self.index["image_size"]))
        self.bytes_read = 0
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.labels.size)

    def rows(self, split: str) -> np.ndarray:
        """The rows of one split, in written order."""
        if split not in SPLITS:
            raise DmdeValueError(f"unknown split {split!r} (use {', '.join(SPLITS)})")
        return np.flatnonzero(self.split == SPLITS.index(split))

    def _file(self, shard: int):
        if os.getpid() != self._pid:  # a forked worker: never share a parent's file offsets
            self._handles, self._pid = {}, os.getpid()
        fh = self._handles.get(shard)
        if fh is None:
            fh = self._handles[shard] = open(self.root / self.files[shard], "rb")  # noqa: SIM115 (kept open: read row after row)
        return fh

    def read_bytes(self, row: int) -> bytes:
        fh = self._file(int(self.shard[row]))
        fh.seek(int(self.offset[row]))
        data = fh.read(int(self.nbytes[row]))
        self.bytes_read += len(data)
        return data

    def read(self, row: int) -> torch.Tensor:
        where = f"{self.files[int(self.shard[row])]} row {row}"
        img = decode_image(self.read_bytes(row), where)
        if tuple(img.shape) != self.shape:
            raise CorruptImageError(f"{self.root / where} is {tuple(img.shape)}, not the index's {self.shape}")
        return img

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __repr__(self) -> str:
        return f"ShardReader({self.root.name}, n={len(self)}, shards={len(self.files)})"


class DatasetReader:
    """Lazy reads from any dmde dataset (image files in a directory or zip, read per batch in
    worker processes): ``read(row)`` decodes sample ``row`` at ``size``."""

    def __init__(self, dataset: Any, size: int | tuple[int, int] | None = None) -> None:
        self.dataset = dataset
        self.size = (size, size) if isinstance(size, int) else size
        first = load_resized(dataset, 0, self.size)
        self.shape = tuple(first.shape)

    def read(self, row: int) -> torch.Tensor:
        img = load_resized(self.dataset, row, self.size)
        if tuple(img.shape) != self.shape:
            where = self.dataset.describe(row) if hasattr(self.dataset, "describe") else f"sample {row}"
            raise DmdeValueError(f"{where} is {tuple(img.shape)[1:]} but earlier images are {self.shape[1:]}; "
                                 "set data.image_size")
        return img

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"DatasetReader({self.dataset!r})"
