"""Streaming data: tar shards written once and read batch by batch, lazy image files, and the
training loop over them giving exactly what the in-memory path gives."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dmde.cli.main import main
from dmde.core.errors import DmdeFileError, DmdeValueError
from dmde.core.training import (
    ImageTensors,
    OptimConfig,
    StreamedImages,
    fit,
    load_batches,
)
from dmde.data.group_view import GroupView
from dmde.data.shards import ShardReader, is_shard_dir
from dmde.run.config import DataConfig
from dmde.run.prepare import SPLITS, choose_storage, load_splits, write_run_shards

CLASSES = ["n01443537", "n01629819", "n01641577", "n01644900"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder of 4 WNID-named classes, 14 images each: JPEG and PNG, three heights."""
    root = tmp_path_factory.mktemp("folder") / "images"
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(14):
            a = rng.integers(0, 256, (10 + i % 3, 12, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


def data_cfg(folder: Path, **over) -> DataConfig:
    return replace(DataConfig(dataset="imagefolder", root=str(folder), image_size=8, holdout_per_class=3,
                              fusion_per_class=2, storage="memory"), **over)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "sh"
    write_run_shards(data_cfg(folder), out, shard_size=10, progress=False)
    return out


def everything(part) -> torch.Tensor:
    return part.gather(torch.arange(len(part)))


def test_shards_round_trip_the_in_memory_splits_bit_for_bit(folder, shards):
    memory = load_splits(data_cfg(folder), progress=False)
    streamed = load_splits(data_cfg(folder, dataset="shards", root=str(shards), storage="stream", workers=0),
                           progress=False)
    lazy = load_splits(data_cfg(folder, storage="stream", workers=0), progress=False)  # the files, read per batch
    assert memory.classes == streamed.classes == lazy.classes == CLASSES
    for name in SPLITS:
        m, s, z = getattr(memory, name), getattr(streamed, name), getattr(lazy, name)
        assert isinstance(m, ImageTensors) and isinstance(s, StreamedImages) and isinstance(z, StreamedImages)
        assert len(m) == len(s) == {"train": 4 * 9, "fusion": 4 * 2, "holdout": 4 * 3}[name]
        assert torch.equal(m.inputs, everything(s)) and torch.equal(m.inputs, everything(z))
        assert torch.equal(m.targets, s.targets) and torch.equal(m.targets, z.targets)
    # read back into memory (storage=memory on shards): the same tensors again
    again = load_splits(data_cfg(folder, dataset="shards", root=str(shards)), progress=False)
    assert torch.equal(again.train.inputs, memory.train.inputs)


def test_the_index_says_which_shards_hold_each_class_and_webdataset_reads_them(shards):
    import webdataset as wds

    index = json.loads((shards / "index.json").read_text())
    assert index["classes"] == CLASSES and index["image_size"] == [8, 8]
    assert index["settings"]["holdout_per_class"] == 3 and index["settings"]["fusion_per_class"] == 2
    train = index["splits"]["train"]
    assert train["count"] == 36 and train["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                                        "train-000003.tar"]
    # written in class order: 9 images per class, 10 per shard
    assert train["per_class"]["0"] == [[0, 9]] and train["per_class"]["1"] == [[0, 1], [1, 8]]
    reader = ShardReader(shards)
    for name in SPLITS:
        urls = [str(shards / f) for f in index["splits"][name]["shards"]]
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
        assert len(samples) == index["splits"][name]["count"]
        meta = [json.loads(s["json"]) for s in samples]
        assert {m["split"] for m in meta} == {name}
        labels = [int(s["cls"]) for s in samples]
        assert labels == reader.labels[reader.rows(name)].tolist()
        assert [m["class"] for m in meta] == [CLASSES[y] for y in labels]


def test_an_expert_reads_only_its_group_and_its_not_in_group_sample(shards):
    reader = ShardReader(shards)
    rows = torch.as_tensor(reader.rows("train"))
    train = StreamedImages(reader, rows, torch.as_tensor(reader.labels[rows.numpy()]))
    view = GroupView(train.targets.numpy(), [1, 2], ratio=0.5, seed=0)  # classes 1 and 2, half as many outside
    picked = view.set_epoch(0)
    idx = torch.as_tensor([i for i, _ in picked])
    reader.bytes_read = 0
    got = train.subset(idx).gather(torch.arange(idx.numel()))
    assert got.shape == (len(picked), 3, 8, 8)
    read_rows = rows[idx].numpy()
    assert reader.bytes_read == int(reader.nbytes[read_rows].sum())  # those images' bytes and no others
    assert reader.bytes_read < reader.nbytes[rows.numpy()].sum()
    labels = train.targets[idx]
    inside = (labels == 1) | (labels == 2)
    assert int(inside.sum()) == 18 and int((~inside).sum()) == 9  # 2 × 9 in the group, round(0.5 × 18) outside


def tiny_fit(data, path: Path, stop: int | None = None) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    cfg = OptimConfig(epochs=3, batch_size=8, lr=0.05, crop_padding=1)
    fit(model, data, cfg, lambda m, x, y: (nn.functional.cross_entropy(m(x), y), m(x)), path,
        progress=False, stop_after_epoch=stop)
    return model.state_dict()


def test_training_on_streamed_batches_equals_memory_and_resumes_identically(folder, shards, tmp_path):
    memory = load_splits(data_cfg(folder), progress=False).train
    reader = ShardReader(shards)
    rows = torch.as_tensor(reader.rows("train"))
    streamed = StreamedImages(reader, rows, torch.as_tensor(reader.labels[rows.numpy()]), workers=2)
    a = tiny_fit(memory, tmp_path / "a.pt")
    b = tiny_fit(streamed, tmp_path / "b.pt")
    tiny_fit(streamed, tmp_path / "c.pt", stop=1)  # killed after its first epoch …
    c = tiny_fit(streamed, tmp_path / "c.pt")  # … and resumed
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])


def test_workers_give_the_same_batches_in_the_same_order(shards):
    reader = ShardReader(shards)
    rows = torch.as_tensor(reader.rows("train"))
    batches = [torch.randperm(len(rows), generator=torch.Generator().manual_seed(s))[:7] for s in range(5)]
    one = [StreamedImages(reader, rows, torch.zeros(len(rows)), workers=w) for w in (0, 2)]
    for x, y in zip(load_batches(one[0], batches), load_batches(one[1], batches)):
        assert torch.equal(x, y)


def test_ranks_split_every_global_batch_so_each_image_is_read_once_per_epoch():
    """The slicing fit does under torchrun: rank r takes b[r::world] of each global batch."""
    from dmde.core.training import rank_slices

    idx, labels = torch.randperm(103), torch.arange(103)
    seen = torch.cat([b for r in range(2) for b, _ in rank_slices(idx, labels, 16, r, 2)])
    assert sorted(seen.tolist()) == list(range(103))
    assert len(rank_slices(idx, labels, 16, 0, 2)) == len(rank_slices(idx, labels, 16, 1, 2)) == 7  # ceil(103 / 16)


def test_storage_auto_keeps_small_data_in_memory(folder):
    from dmde.data.datasets import ImageFolder

    assert choose_storage(data_cfg(folder, storage="auto"), ImageFolder(folder)) == "memory"
    assert choose_storage(data_cfg(folder, storage="stream"), ImageFolder(folder)) == "stream"


def test_shard_errors_are_one_line(folder, shards, tmp_path):
    with pytest.raises(DmdeFileError, match="already exists"):
        write_run_shards(data_cfg(folder), shards, progress=False)
    with pytest.raises(DmdeValueError, match="holdout_per_class=3"):  # the split is fixed when written
        load_splits(data_cfg(folder, dataset="shards", root=str(shards), holdout_per_class=5), progress=False)
    with pytest.raises(DmdeFileError, match="not a dmde shard directory"):
        ShardReader(tmp_path)
    broken = tmp_path / "broken"
    write_run_shards(data_cfg(folder), broken, shard_size=20, progress=False)
    (broken / "train-000001.tar").unlink()
    with pytest.raises(DmdeFileError, match="train-000001.tar is missing"):
        ShardReader(broken)


def test_shards_command(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["shards", str(folder), "--out", str(out), "--shard-size", "16", "--no-progress",
                 "data.image_size=8", "data.holdout_per_class=2"]) == 0
    said = capsys.readouterr().out
    assert "wrote" in said and "data.holdout_per_class=2" in said and "data.image_size=8" in said
    assert is_shard_dir(out) and not (tmp_path / "cli.partial").exists()
    assert ShardReader(out).index["splits"]["holdout"]["count"] == 8
    assert main(["shards", str(folder), "--out", str(out)]) == 2  # exists: one line, exit 2
    assert "already exists" in capsys.readouterr().err
    assert main(["shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert not os.path.exists(tmp_path / "x")


class _RecordingReader(ShardReader):
    """Writes each row it reads to its rank's log (one line per row, an ``epoch`` line per epoch)."""

    log: str = ""

    def read(self, row: int) -> torch.Tensor:
        with open(self.log, "a") as fh:
            fh.write(f"{row}\n")
        return super().read(row)


def _rank_main(rank: int, shards: str, logdir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", DMDE_THREADS="1")
    torch.set_num_threads(1)
    reader = _RecordingReader(shards)
    reader.log = os.path.join(logdir, f"rank{rank}.txt")
    rows = torch.as_tensor(reader.rows("train"))
    data = StreamedImages(reader, rows, torch.as_tensor(reader.labels[rows.numpy()]))

    def mark(epoch: int, _gen) -> None:
        with open(reader.log, "a") as fh:
            fh.write(f"epoch {epoch}\n")

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    fit(model, data, OptimConfig(epochs=2, batch_size=5), lambda m, x, y: (nn.functional.cross_entropy(m(x), y), None),
        os.path.join(logdir, "m.pt"), on_epoch_start=mark, progress=False, data_parallel=True)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_over_shards_read_every_image_once_per_epoch(shards, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(str(shards), str(tmp_path), port), nprocs=2, join=True)
    n = len(ShardReader(shards).rows("train"))
    per_epoch: dict[int, list[int]] = {0: [], 1: []}
    for r in range(2):
        epoch = -1
        mine = []
        for line in (tmp_path / f"rank{r}.txt").read_text().splitlines():
            if line.startswith("epoch"):
                epoch = int(line.split()[1])
            else:
                per_epoch[epoch].append(int(line))
                mine.append(int(line))
        assert 0 < len(mine) < 2 * n  # both ranks did part of the work
    rows = sorted(ShardReader(shards).rows("train").tolist())
    for e in (0, 1):
        assert sorted(per_epoch[e]) == rows  # every image exactly once per epoch, over the two ranks


@pytest.mark.slow
def test_a_run_on_streamed_shards_equals_the_in_memory_run(tmp_path, real_wordnet_dir):
    """The whole pipeline (ontology, groups, experts, fusion, fine-tuning, flat, evaluation) on
    shards read by two workers gives the in-memory run's numbers exactly."""
    from dmde.core.config import load_config
    from dmde.run.config import RunConfig
    from dmde.run.pipeline import train

    over = ["data.dataset=synthetic", "data.image_size=12", "data.synthetic_per_class=24",
            "data.holdout_per_class=6", "data.fusion_per_class=4", "ontology.categories=3", "groups.size=4",
            "experts.backbone=small_cnn", "experts.backbone_kwargs={width: 8}", "experts.epochs=2",
            "experts.batch_size=16", "experts.similarity_per_class=4", "fusion.epochs=2",
            "fusion.finetune.epochs=1", "fusion.finetune.batch_size=32", "progress=false", "tensorboard=false"]
    memory = train(tmp_path / "memory", load_config(RunConfig, None, over))
    cfg = load_config(RunConfig, None, over)
    write_run_shards(cfg.data, tmp_path / "shards", shard_size=50, progress=False)
    streamed_cfg = load_config(RunConfig, None, [*over, "data.dataset=shards", f"data.root={tmp_path / 'shards'}",
                                                 "data.storage=stream", "data.workers=2"])
    streamed = train(tmp_path / "streamed", streamed_cfg)
    for model in ("mixture", "flat"):
        assert memory[model] == streamed[model]


def test_hierarchical_synthetic_images_make_siblings_closer_than_cousins():
    from dmde.data.synthetic import HierarchicalSynthetic

    ds = HierarchicalSynthetic([0, 0, 1, 1, 2, 2], list("abcdef"), per_class=10, size=8)
    assert ds.targets.tolist() == [c for c in range(6) for _ in range(10)]
    assert torch.equal(ds.load_image(13), ds.load_image(13))  # made on demand, the same every time
    x = torch.stack([ds.load_image(i).float() for i in range(len(ds))])
    look = x.view(6, 10, 3, -1).std(3).mean(1)  # each class's per-channel contrast: set by its category's hue
    d = torch.cdist(look, look)
    for a in range(6):
        for b in range(6):
            if a != b and a // 2 != b // 2:
                assert d[a, a ^ 1] < d[a, b]  # the sibling (a ^ 1) is closer than every cousin
