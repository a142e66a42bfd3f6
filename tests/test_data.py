"""Readers on tiny fixtures written here, splits, materialize, tensor transforms."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmde.core import transforms as T
from dmde.core.errors import CorruptImageError, DmdeFileError, DmdeValueError
from dmde.data.datasets import (
    FashionMNIST,
    ImageFolder,
    TinyImageNet,
    fashion_mnist_wnids,
)
from dmde.data.memory import InMemoryImages, holdout_split, materialize

WNIDS = ["n02124075", "n01443537", "n04067472"]  # deliberately not sorted: wnids.txt order wins
PER_CLASS = 3


def _jpeg(color: tuple[int, int, int], size: int = 8, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).convert(mode).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _color(c: int, k: int) -> tuple[int, int, int]:
    return (40 * c + 20, 10 * k + 30, 200)


def _tiny_files(prefix: str = "tiny-imagenet-200/") -> dict[str, bytes]:
    """Official Tiny-ImageNet layout: train/<wnid>/images/<wnid>_<k>.JPEG, val/, wnids.txt."""
    files: dict[str, bytes] = {prefix + "wnids.txt": ("\n".join(WNIDS) + "\n").encode()}
    for c, w in enumerate(WNIDS):
        files[f"{prefix}train/{w}/{w}_boxes.txt"] = b""
        for k in range(PER_CLASS):
            files[f"{prefix}train/{w}/images/{w}_{k}.JPEG"] = _jpeg(_color(c, k))
    ann = []
    for v, c in enumerate([2, 0, 1, 0]):
        files[f"{prefix}val/images/val_{v}.JPEG"] = _jpeg(_color(c, 9))
        ann.append(f"val_{v}.JPEG\t{WNIDS[c]}\t0\t0\t7\t7")
    files[prefix + "val/val_annotations.txt"] = ("\n".join(ann) + "\n").encode()
    return files


def _write_dir(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    _write_dir(tmp_path, _tiny_files())
    return tmp_path / "tiny-imagenet-200"


@pytest.fixture
def tiny_zip(tmp_path: Path) -> Path:
    return _write_zip(tmp_path / "tiny.zip", _tiny_files())


# --------------------------------------------------------------------------- Tiny-ImageNet


@pytest.mark.parametrize("kind", ["dir", "zip"])
def test_tiny_imagenet_train_layout(kind, tiny_dir, tiny_zip):
    ds = TinyImageNet(tiny_dir if kind == "dir" else tiny_zip, split="train")
    assert ds.classes == WNIDS
    assert len(ds) == 3 * PER_CLASS
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    img, target = ds[4]  # class 1, k = 1
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and target == 1
    raw = ds.load_image(4)
    assert raw.dtype == torch.uint8
    mean = raw.float().mean(dim=(1, 2))
    assert torch.allclose(mean, torch.tensor(_color(1, 1), dtype=torch.float), atol=4)


@pytest.mark.parametrize("kind", ["dir", "zip"])
def test_tiny_imagenet_val_annotations(kind, tiny_dir, tiny_zip):
    ds = TinyImageNet(tiny_dir if kind == "dir" else tiny_zip, split="val")
    assert ds.classes == WNIDS
    assert ds.targets.tolist() == [2, 0, 1, 0]
    assert ds.describe(0).endswith("val/images/val_0.JPEG")
    assert ds[0][0].shape == (3, 8, 8)


def test_tiny_imagenet_zip_without_prefix_and_wnids(tmp_path):
    # Like the shared train.zip: members start at train/, no wnids.txt inside.
    files = {k.removeprefix("tiny-imagenet-200/"): v for k, v in _tiny_files().items()
             if "/val/" not in k and not k.endswith("wnids.txt")}
    (tmp_path / "sub").mkdir()
    ds = TinyImageNet(_write_zip(tmp_path / "sub" / "train.zip", files))
    assert ds.classes == sorted(WNIDS)  # no wnids.txt anywhere: sorted train directories
    assert len(ds) == 3 * PER_CLASS
    (tmp_path / "sub" / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    ds2 = TinyImageNet(tmp_path / "sub" / "train.zip")  # wnids.txt beside the zip
    assert ds2.classes == WNIDS
    with pytest.raises(DmdeFileError, match="val_annotations"):
        TinyImageNet(tmp_path / "sub" / "train.zip", split="val")


def test_tiny_imagenet_natural_order(tmp_path):
    files = {f"train/n01443537/images/n01443537_{k}.JPEG": _jpeg((0, 0, 0)) for k in (10, 2, 1, 0)}
    ds = TinyImageNet(_write_zip(tmp_path / "t.zip", files))
    assert [f.rsplit("_", 1)[1] for f in ds.files] == ["0.JPEG", "1.JPEG", "2.JPEG", "10.JPEG"]


def test_tiny_imagenet_bad_inputs(tmp_path, tiny_dir):
    with pytest.raises(DmdeFileError, match="does-not-exist"):
        TinyImageNet(tmp_path / "does-not-exist")
    with pytest.raises(DmdeValueError, match="split"):
        TinyImageNet(tiny_dir, split="test")
    (tiny_dir / "wnids.txt").write_text(WNIDS[0] + "\n")
    with pytest.raises(DmdeValueError, match="n01443537"):  # a train dir not in wnids.txt
        TinyImageNet(tiny_dir)


def test_zip_dataset_pickles_without_handle(tiny_zip):
    ds = TinyImageNet(tiny_zip)
    ds[0]  # opens the handle
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.source._zf is None
    assert torch.equal(clone.load_image(5), ds.load_image(5))


@pytest.mark.parametrize("kind", ["dir", "zip"])
def test_corrupt_image_raises_naming_file_or_is_skipped(kind, tmp_path):
    files = _tiny_files()
    bad = f"tiny-imagenet-200/train/{WNIDS[1]}/images/{WNIDS[1]}_1.JPEG"
    files[bad] = files[bad][: len(files[bad]) // 2]  # truncated JPEG
    if kind == "dir":
        _write_dir(tmp_path, files)
        root = tmp_path / "tiny-imagenet-200"
    else:
        root = _write_zip(tmp_path / "t.zip", files)
    ds = TinyImageNet(root)
    with pytest.raises(CorruptImageError) as err:
        ds[4]
    msg = str(err.value)
    assert "\n" not in msg and f"{WNIDS[1]}_1.JPEG" in msg
    if kind == "zip":
        assert str(root) in msg  # zip file and member both named

    skip = TinyImageNet(root, on_corrupt="skip")
    img, target = skip[4]  # deterministic substitute: the next readable sample
    assert torch.equal(img, skip[5][0]) and target == 1
    assert skip.skipped == 1
    assert skip.scan(progress=False) == 1
    assert len(skip) == 3 * PER_CLASS - 1 and skip.skipped == 1
    mem = materialize(TinyImageNet(root, on_corrupt="skip"), progress=False)
    assert len(mem) == 3 * PER_CLASS - 1 and mem.skipped == 1
    with pytest.raises(CorruptImageError, match=f"{WNIDS[1]}_1.JPEG"):
        materialize(TinyImageNet(root), progress=False)


# --------------------------------------------------------------------------- image modes, ImageFolder


def _save(path: Path, im: Image.Image, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt)


def test_image_folder_modes_become_rgb(tmp_path):
    grey = Image.new("L", (6, 5), 77)
    pal = Image.new("RGB", (6, 5), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    rgba = Image.new("RGBA", (6, 5), (1, 2, 3, 128))
    cmyk = Image.new("CMYK", (6, 5), (0, 0, 0, 0))  # no ink: white
    _save(tmp_path / "n1" / "a.png", grey, "PNG")
    _save(tmp_path / "n1" / "sub" / "b.png", pal, "PNG")
    _save(tmp_path / "n2" / "c.png", rgba, "PNG")
    _save(tmp_path / "n2" / "d.jpg", cmyk, "JPEG")
    (tmp_path / "n2" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["n1", "n2"] and ds.targets.tolist() == [0, 0, 1, 1]
    imgs = [ds.load_image(i) for i in range(4)]
    assert all(x.shape == (3, 5, 6) and x.dtype == torch.uint8 for x in imgs)
    g = imgs[0]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2]) and int(g[0, 0, 0]) == 77
    assert imgs[1][:, 0, 0].tolist() == [10, 200, 30]
    assert imgs[2][:, 0, 0].tolist() == [1, 2, 3]
    assert imgs[3].min() >= 250


def test_image_folder_errors(tmp_path):
    with pytest.raises(DmdeFileError):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DmdeValueError):
        ImageFolder(tmp_path)
    with pytest.raises(DmdeValueError, match="on_corrupt"):
        (tmp_path / "empty" / "x.png").write_bytes(b"garbage")
        ImageFolder(tmp_path, on_corrupt="ignore")
    with pytest.raises(CorruptImageError, match="x.png"):
        ImageFolder(tmp_path)[0]


# --------------------------------------------------------------------------- Fashion-MNIST


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_tiny_idx(tmp_path):
    imgs = np.arange(4 * 28 * 28, dtype=np.int64).reshape(4, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 3, 3]))
    ds = FashionMNIST(tmp_path, split="test")
    assert len(ds) == 4 and ds.targets.tolist() == [9, 0, 3, 3]
    assert ds.classes == fashion_mnist_wnids() and len(ds.classes) == 10
    assert ds.classes[0] == "n03595614" and ds.classes[9] == "n02872752"
    raw = ds.load_image(2)
    assert raw.shape == (3, 28, 28) and torch.equal(raw[0], torch.from_numpy(imgs[2].astype(np.uint8)))
    assert torch.equal(raw[0], raw[2])
    x, y = ds[2]
    assert x.shape == (3, 28, 28) and y == 3 and x.max() <= 1.0


def test_fashion_mnist_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DMDE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DmdeFileError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST()
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(DmdeValueError, match="train-labels"):
        FashionMNIST()
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DmdeValueError, match="train-labels"):
        FashionMNIST()


def _real_fashion_dir() -> Path | None:
    for cand in (os.environ.get("DMDE_FASHION_MNIST"), "/usr/share/datasets/fashion-mnist"):
        if cand and (Path(cand) / "train-labels-idx1-ubyte.gz").is_file():
            return Path(cand)
    return None


@pytest.mark.skipif(_real_fashion_dir() is None, reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real():
    ds = FashionMNIST(_real_fashion_dir())
    assert len(ds) == 60_000 and len(set(ds.targets.tolist())) == 10
    assert np.bincount(ds.targets).tolist() == [6000] * 10
    assert ds[0][0].shape == (3, 28, 28)
    assert len(FashionMNIST(_real_fashion_dir(), split="test")) == 10_000


# --------------------------------------------------------------------------- materialize, cache


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_materialize_and_cache(tmp_path, tiny_zip, suffix):
    ds = TinyImageNet(tiny_zip)
    cache = tmp_path / f"cache{suffix}"
    mem = materialize(ds, cache=cache, progress=False)
    assert isinstance(mem, InMemoryImages) and mem.images.shape == (9, 3, 8, 8)
    assert mem.classes == WNIDS and mem.targets.tolist() == ds.targets.tolist()
    assert torch.equal(mem.images[7], ds.load_image(7))
    assert torch.allclose(mem[7][0], ds[7][0])
    assert cache.is_file() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    stamp = cache.stat().st_mtime_ns
    again = materialize(ds, cache=cache, progress=False)  # reused, not rewritten
    assert cache.stat().st_mtime_ns == stamp and torch.equal(again.images, mem.images)
    assert again.classes == WNIDS and again.targets.tolist() == mem.targets.tolist()
    resized = materialize(ds, size=4, cache=cache, progress=False)  # different size: rebuilt
    assert resized.images.shape == (9, 3, 4, 4)
    imgs, tg = mem.get_batch([8, 0])
    assert imgs.shape == (2, 3, 8, 8) and tg.tolist() == [2, 0]


def test_materialize_with_workers_matches(tiny_zip):
    ds = TinyImageNet(tiny_zip)
    a = materialize(ds, progress=False)
    b = materialize(ds, num_workers=2, batch_size=4, progress=False)
    assert torch.equal(a.images, b.images)


def test_materialize_needs_size_for_mixed_sizes(tmp_path):
    _save(tmp_path / "a" / "1.png", Image.new("RGB", (4, 4)), "PNG")
    _save(tmp_path / "a" / "2.png", Image.new("RGB", (6, 4)), "PNG")
    with pytest.raises(DmdeValueError, match="2.png"):
        materialize(ImageFolder(tmp_path), progress=False)
    assert materialize(ImageFolder(tmp_path), size=(4, 5), progress=False).images.shape == (2, 3, 4, 5)


# --------------------------------------------------------------------------- splits, relabel


def test_holdout_split_per_class_and_determinism():
    targets = np.repeat(np.arange(5), [10, 10, 10, 12, 20])
    tr, ho = holdout_split(targets, per_class=3, seed=7)
    assert np.bincount(targets[ho]).tolist() == [3] * 5
    assert len(tr) + len(ho) == len(targets) and not set(tr) & set(ho)
    tr2, ho2 = holdout_split(targets, per_class=3, seed=7)
    assert np.array_equal(ho, ho2) and np.array_equal(tr, tr2)
    assert not np.array_equal(ho, holdout_split(targets, per_class=3, seed=8)[1])
    _, hof = holdout_split(targets, fraction=0.2)
    assert np.bincount(targets[hof]).tolist() == [2, 2, 2, 2, 4]
    with pytest.raises(DmdeValueError):
        holdout_split(targets, per_class=10)  # class 0 would keep nothing
    with pytest.raises(DmdeValueError):
        holdout_split(targets)


# --------------------------------------------------------------------------- transforms


def test_flip_twice_is_identity_and_random_flip_mixes():
    x = torch.rand(16, 3, 5, 7)
    assert torch.equal(T.hflip(T.hflip(x)), x)
    assert torch.equal(T.random_horizontal_flip(T.random_horizontal_flip(x, p=1.0), p=1.0), x)
    g = torch.Generator().manual_seed(0)
    y = T.random_horizontal_flip(x, g)
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(16)]
    kept = [torch.equal(y[i], x[i]) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(T.random_horizontal_flip(x, g1), T.random_horizontal_flip(x, g2))


def test_random_crop_with_padding_shape_and_content():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1
    g = torch.Generator().manual_seed(1)
    y = T.random_crop_with_padding(x, 2, g)
    assert y.shape == x.shape
    for i in range(2):  # every crop is a shifted window of the zero-padded image
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        assert any(torch.equal(padded[:, a:a + 6, b:b + 6], y[i]) for a in range(5) for b in range(5))
    assert T.random_crop_with_padding(x[0], 2, g).shape == (3, 6, 6)
    assert torch.equal(T.random_crop_with_padding(x, 0), x)
    u8 = (x % 256).to(torch.uint8)
    assert T.random_crop_with_padding(u8, 1, g, mode="reflect").dtype == torch.uint8


def test_center_crop_resize_keeps_the_aspect_ratio():
    x = torch.zeros(3, 20, 40)
    x[:, :, 10:30] = 1.0  # the centred 20×20 window is all ones, the sides zeros
    y = T.center_crop_resize(x, 10)
    assert y.shape == (3, 10, 10) and torch.allclose(y, torch.ones(3, 10, 10))
    tall = T.center_crop_resize(x.transpose(1, 2), (10, 10))  # 40×20: crops rows instead
    assert torch.allclose(tall, torch.ones(3, 10, 10))
    assert torch.equal(T.center_crop_resize(x[:, :, :20], 20), x[:, :, :20])  # already the shape: as is


def test_normalize_and_resize():
    x = torch.full((2, 3, 4, 4), 0.5)
    z = T.normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 0.5))
    assert torch.allclose(z[:, 0], torch.zeros(2, 4, 4)) and torch.allclose(z[:, 1], torch.ones(2, 4, 4))
    assert torch.allclose(z[:, 2], torch.ones(2, 4, 4))
    u8 = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    assert torch.allclose(T.normalize(u8, (1, 1, 1), (1, 1, 1)), torch.zeros(3, 8, 8))
    r = T.resize(u8, 4)
    assert r.shape == (3, 4, 4) and r.dtype == torch.uint8 and int(r.min()) == 255
    assert T.resize(torch.rand(2, 3, 8, 8), (4, 6)).shape == (2, 3, 4, 6)


@pytest.mark.shared
def test_real_tiny_imagenet_zip(shared_dir):
    path = shared_dir / "data" / "tiny-imagenet-200" / "train.zip"
    if not path.is_file():
        pytest.skip(f"{path.name} is absent")
    ds = TinyImageNet(path)
    wnids = (path.parent / "wnids.txt").read_text().split()
    assert ds.classes == wnids and len(ds.classes) == 200
    assert len(ds) == 100_000 and np.bincount(ds.targets).tolist() == [500] * 200
    for i in (0, 499, 500, 99_999):  # a few, not all 100k
        x, y = ds[i]
        assert x.shape == (3, 64, 64) and y == i // 500
        assert ds.describe(i).split(":")[-1].startswith(f"train/{wnids[y]}/images/{wnids[y]}_")
    tr, ho = holdout_split(ds.targets, per_class=50)
    assert len(ho) == 10_000 and len(tr) == 90_000
