"""The whole pipeline on synthetic images: stages, caching, resume, evaluate, predict."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import dmde
from dmde.cli.main import main
from dmde.core.checkpoint import load_checkpoint
from dmde.core.config import load_config
from dmde.run.config import RunConfig
from dmde.run.pipeline import train

pytestmark = pytest.mark.slow  # trains whole runs

TINY = {
    "data": {"dataset": "synthetic", "image_size": 12, "synthetic_per_class": 30, "holdout_per_class": 6,
             "fusion_per_class": 4, "seed": 0},
    "ontology": {"categories": 3},
    "groups": {"size": 4, "overlap": 0.5},
    "experts": {"backbone": "small_cnn", "backbone_kwargs": {"width": 8}, "epochs": 5, "batch_size": 16,
                "lr": 0.02, "similarity_per_class": 4},
    "fusion": {"epochs": 5, "finetune": {"epochs": 1, "batch_size": 32, "lr": 0.002}},
    "baselines": {"flat": True, "early_fusion": True, "early_fusion_epochs": 5, "width_matched_flat": True},
    "progress": False,
}


def tiny_config(tmp_path: Path, **over) -> tuple[RunConfig, Path]:
    data = json.loads(json.dumps(TINY))
    for k, v in over.items():
        data[k].update(v) if isinstance(v, dict) else data.__setitem__(k, v)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(RunConfig, path), path


def checkpoints(run: Path) -> dict[str, dict]:
    return {p.relative_to(run).as_posix(): load_checkpoint(p) for p in sorted(run.rglob("*.pt"))}


def same_models(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        ma, mb = a[name]["model"], b[name]["model"]
        if ma.keys() != mb.keys() or not all(torch.equal(ma[k], mb[k]) for k in ma):
            return False
    return True


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, real_wordnet_dir):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg, path = tiny_config(tmp)
    metrics = train(tmp / "run", cfg)
    return tmp / "run", metrics, path


def test_pipeline_trains_every_model(finished_run):
    run, metrics, _ = finished_run
    assert set(metrics) == {"mixture_oracle", "mixture_upsilon", "mixture_upsilon_poe", "mixture_nway", "mixture_finetuned_oracle",
                            "mixture", "flat", "flat_wide", "early_fusion", "accounting"}
    metrics = dict(metrics)  # the fixture's dict is shared with the other tests
    accounting = metrics.pop("accounting")["experts"]
    assert [r["expert"] for r in accounting] == list(range(5)) and all("flat_group_top1" in r for r in accounting)
    assert metrics["mixture_oracle"]["top1"] >= metrics["mixture_upsilon"]["top1"]  # a perfect gate only helps
    for m in metrics.values():
        assert 0.0 <= m["top1"] <= m["top2"] <= m["top5"] <= m["top10"] == 1.0  # N = 10
        assert m["n_images"] == 60
    # synthetic classes are easy: every model is far above chance (10%)
    assert metrics["mixture"]["top1"] > 0.5 and metrics["flat"]["top1"] > 0.5
    for name in ("config.yaml", "stages.json", "data.json", "ontology.json", "groups.json", "fusion.pt",
                 "mixture.pt", "flat.pt", "early_fusion.pt", "metrics.json", "per_class.csv", "per_class.png"):
        assert (run / name).exists(), name
    groups = json.loads((run / "groups.json").read_text())
    assert len(list((run / "experts").glob("expert_*.pt"))) == 5  # N=10, M=4, λ=0.5 → 5 groups
    stages = json.loads((run / "stages.json").read_text())
    assert all(stages[s]["done"] for s in ("ontology", "groups", "experts", "fusion", "finetune", "flat",
                                           "flat_wide", "early_fusion", "evaluate"))
    # the width-matched flat model costs what the whole mixture costs, within 10%
    assert abs(stages["flat_wide"]["macs"] / stages["flat_wide"]["mixture_macs"] - 1) < 0.1
    assert stages["flat_wide"]["width"] > 8
    # N = 10 on a circle, M = 4, λ = 0.5: stride 2, five groups of four, every class in exactly two
    positions = [g["positions"] for g in groups["groups"]]
    assert sorted(len(g) for g in positions) == [4] * 5
    assert sorted(sum(c in g for g in positions) for c in range(10)) == [2] * 10


def test_rerun_of_a_finished_run_trains_nothing(finished_run):
    run, metrics, path = finished_run
    stages = json.loads((run / "stages.json").read_text())
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    again = train(run, load_config(RunConfig, path))
    assert again == metrics
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    changed = sorted(p.name for p in after if after[p] != before.get(p))
    assert changed == [".lock"]  # only the lock's pid; not a checkpoint, a log or a summary rewritten
    assert json.loads((run / "stages.json").read_text()) == stages


def test_a_changed_setting_redoes_only_dependent_stages(finished_run, tmp_path):
    run, _, path = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.rglob("*.pt")}
    cfg = load_config(RunConfig, path, ["fusion.epochs=2"])
    train(copy, cfg)
    after = {p.name: p.stat().st_mtime_ns for p in copy.rglob("*.pt")}
    assert after["expert_000.pt"] == before["expert_000.pt"]
    assert after["flat.pt"] == before["flat.pt"]
    assert after["fusion.pt"] != before["fusion.pt"]
    assert after["mixture.pt"] != before["mixture.pt"]


def test_finetuning_on_the_fusion_split_sees_only_it_and_redoes_only_itself(finished_run, tmp_path):
    run, _, path = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    log = lambda: [json.loads(line)["images"] for line in (copy / "mixture.jsonl").read_text().splitlines()]
    assert log() == [10 * (30 - 6)]  # default (all): the experts' training images and the fusion split
    before = {p.name: p.stat().st_mtime_ns for p in copy.rglob("*.pt")}
    train(copy, load_config(RunConfig, path, ["fusion.finetune_data=fusion", "fusion.finetune.epochs=2"]))
    after = {p.name: p.stat().st_mtime_ns for p in copy.rglob("*.pt")}
    assert log() == [10 * 4, 10 * 4]  # the fusion split alone: 4 images per class, each epoch
    assert {k for k in after if after[k] != before.get(k)} == {"mixture.pt"}


def test_interrupted_run_resumes_to_the_same_result(finished_run, tmp_path, monkeypatch):
    run, metrics, path = finished_run
    import dmde.core.training as training

    real = training.save_checkpoint
    calls = {"n": 0}

    def crash_after_three(p, state):
        real(p, state)
        calls["n"] += 1
        if calls["n"] == 3:  # expert 1's first epoch is on disk, the rest is not
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run", load_config(RunConfig, path))
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert not stages["experts"]["done"]
    monkeypatch.setattr(training, "save_checkpoint", real)
    resumed = train(tmp_path / "run", load_config(RunConfig, path))
    assert resumed == metrics
    assert same_models(checkpoints(run), checkpoints(tmp_path / "run"))


def test_experts_of_another_ontology_are_refused(finished_run, tmp_path, capsys):
    run, _, path = finished_run
    other = tmp_path / "other"
    cfg = load_config(RunConfig, path, ["ontology.seed=5", "ontology.categories=2"])
    train(other, cfg, until="groups")
    shutil.copytree(run / "experts", other / "experts")
    assert main(["evaluate", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmde: error:") and "ontology" in err and "\n" not in err


@pytest.mark.parametrize("case", ["other width", "other seed", "weights only"])
def test_an_expert_checkpoint_of_another_run_is_refused_before_loading(finished_run, tmp_path, capsys, case):
    """Same ontology and groups, but another width or seed, or a bare state dict: one line naming
    the checkpoint, exit 2, and no stale metrics printed as if valid."""
    run, _, path = finished_run
    over = {"other width": ["experts.backbone_kwargs={width: 4}"], "other seed": ["experts.seed=7"],
            "weights only": []}[case]
    other = tmp_path / "other"
    train(other, load_config(RunConfig, path, over), until="experts")
    if case == "weights only":
        state = load_checkpoint(other / "experts" / "expert_000.pt")
        torch.save({"model": state["model"]}, other / "experts" / "expert_000.pt")
    target = tmp_path / "target"  # the finished run, with the other run's experts
    shutil.copytree(run, target)
    shutil.rmtree(target / "experts")
    shutil.copytree(other / "experts", target / "experts")
    assert main(["evaluate", str(target), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dmde: error: ") and err.count("\n") == 1, err
    assert "expert_000.pt" in err and ("other expert settings" in err or "not a dmde" in err), err
    assert not (tmp_path / "ev").exists()


def test_evaluate_refuses_a_bad_out_and_foreign_classes(finished_run, tmp_path, capsys):
    run, _, _ = finished_run
    (tmp_path / "afile").write_text("x")
    assert main(["evaluate", str(run), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and err.count("\n") == 1
    folder = tmp_path / "folder" / "n02084071"  # dog: not one of the run's classes
    folder.mkdir(parents=True)
    Image.new("RGB", (12, 12)).save(folder / "0.png")
    assert main(["evaluate", str(run), "--data", str(tmp_path / "folder"), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 classes" in err and "run's ontology" in err and err.count("\n") == 1
    assert not (tmp_path / "ev").exists()


def test_evaluation_in_chunks_of_images_gives_the_figures_of_one_pass(finished_run, tmp_path, monkeypatch):
    import dmde.run.evaluate as evaluate

    run, metrics, _ = finished_run
    # at N = 10,450 without mixtures: 512 MiB of six score matrices per image, in whole batches of 512
    assert evaluate.chunk_images({}, 10_450) == 2048
    monkeypatch.setattr(evaluate, "EVAL_BATCH", 8)  # 60 hold-out images: several chunks of whole batches
    one = evaluate.evaluate_run(run, device="cpu", out_dir=tmp_path / "one", chunk=64)
    for chunk in (8, 16, 24):
        parts = evaluate.evaluate_run(run, device="cpu", out_dir=tmp_path / f"c{chunk}", chunk=chunk)
        assert parts == one
        assert (tmp_path / f"c{chunk}" / "per_class.csv").read_text() == (tmp_path / "one" / "per_class.csv").read_text()
    # and the run's own evaluation (batches of 512, one chunk) gives the same figures again
    assert json.loads(json.dumps(one)) == json.loads((run / "metrics.json").read_text())


def test_evaluate_command(finished_run, capsys):
    run, metrics, _ = finished_run
    assert main(["evaluate", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mixture"]["top1"] == pytest.approx(metrics["mixture"]["top1"])
    csv = (run / "per_class.csv").read_text().splitlines()
    assert csv[0].startswith("position,wnid,lemma,") and len(csv) == 11


def test_evaluate_on_an_image_folder(finished_run, tmp_path, capsys):
    run, _, _ = finished_run
    from dmde.data.synthetic import synthetic_images

    wnids = json.loads((run / "data.json").read_text())["classes"]
    x, y = synthetic_images(10, 3, size=12, seed=99)
    for i, (img, t) in enumerate(zip(x, y)):
        d = tmp_path / "folder" / wnids[int(t)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    assert main(["evaluate", str(run), "--data", str(tmp_path / "folder"), "--json",
                 "--out", str(tmp_path / "ev")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mixture"]["n_images"] == 30
    assert (tmp_path / "ev" / "metrics.json").exists()


def test_evaluate_on_tiny_imagenets_val_alone_and_fashion_mnists_test_files(finished_run, tmp_path, capsys):
    """What users hold: the official val/ directory without wnids.txt (the run knows its classes;
    images of other classes are left out and counted), and Fashion-MNIST's own t10k files."""
    import gzip
    import struct

    import numpy as np

    from dmde.data.synthetic import synthetic_images

    run, _, _ = finished_run
    wnids = json.loads((run / "data.json").read_text())["classes"]
    x, y = synthetic_images(10, 2, size=12, seed=7)
    val = tmp_path / "val"
    (val / "images").mkdir(parents=True)
    lines = []
    for i, (img, t) in enumerate(zip(x, y)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(val / "images" / f"val_{i}.png")
        lines.append(f"val_{i}.png\t{wnids[int(t)]}\t0\t0\t11\t11")
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(val / "images" / "val_x.png")
    lines.append("val_x.png\tn09999999\t0\t0\t11\t11")  # a class the run does not have
    (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    assert main(["evaluate", str(run), "--data", str(val), "--json", "--out", str(tmp_path / "ev1")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["mixture"]["n_images"] == 20 and "1 images of classes outside" in err + out

    def idx(path, arr):
        header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        with gzip.open(path, "wb") as fh:
            fh.write(header + arr.astype(np.uint8).tobytes())

    fm = tmp_path / "fashion"
    fm.mkdir()
    idx(fm / "t10k-images-idx3-ubyte.gz", x[:, 0].numpy())  # 28×28 in the real files; any size reads
    idx(fm / "t10k-labels-idx1-ubyte.gz", y.numpy())
    assert main(["evaluate", str(run), "--data", str(fm), "--json", "--out", str(tmp_path / "ev2")]) == 0
    assert json.loads(capsys.readouterr().out)["mixture"]["n_images"] == 20


def test_predict_api_and_command(finished_run, tmp_path, capsys):
    run, _, _ = finished_run
    from dmde.data.synthetic import synthetic_images

    x, y = synthetic_images(10, 1, size=12, seed=5)
    files = []
    for i, img in enumerate(x[:3]):
        f = tmp_path / f"img{i}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).convert("L").save(f)  # greyscale input works too
        files.append(str(f))
    pred = dmde.load(run)
    assert pred.model_name == "mixture"
    res = pred.predict(files, top_k=3)
    assert len(res) == 3 and all(len(r) == 3 for r in res)
    assert all(r[0].score >= r[1].score >= r[2].score for r in res)
    assert main(["predict", str(run), *files, "--top-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["image"] == files[0] and len(out[0]["top"]) == 2
    assert set(out[0]["top"][0]) == {"wnid", "lemma", "score"}
    # tensors, PIL images and numpy arrays score exactly as a (lossless) file of the same pixels
    rgb = tmp_path / "rgb.png"
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(rgb)
    from_file = pred.scores([str(rgb)])
    assert torch.allclose(pred.scores([x[0]]), from_file, atol=1e-6)
    assert torch.allclose(pred.scores([Image.open(rgb)]), from_file, atol=1e-6)
    assert torch.allclose(pred.scores([x[0].permute(1, 2, 0).numpy()]), from_file, atol=1e-6)


def test_export_predicts_like_the_run(finished_run, tmp_path, capsys):
    run, _, _ = finished_run
    from dmde.data.synthetic import synthetic_images

    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "export.json", "config.yaml", "ontology.json",
                                               "groups.json", "MODEL_CARD.md"}
    meta = json.loads((out / "export.json").read_text())
    assert meta["model"] == "mixture" and meta["torch_version"] == torch.__version__
    assert meta["trained_on"] == "cpu" and "top1" in meta["metrics"]
    assert "top-1" in (out / "MODEL_CARD.md").read_text()
    x, _ = synthetic_images(10, 1, size=12, seed=9)
    images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x[:4]]
    a, b = dmde.load(run), dmde.load(out)
    assert [[p.wnid for p in r] for r in a.predict(images, top_k=5)] == \
        [[p.wnid for p in r] for r in b.predict(images, top_k=5)]
    assert torch.allclose(a.scores(images), b.scores(images), atol=1e-6)
    # the flat model exports too; an existing, non-empty target is one line, exit 2
    assert main(["export", str(run), str(tmp_path / "flat"), "--model", "flat"]) == 0
    assert torch.allclose(dmde.load(tmp_path / "flat").scores(images),
                          dmde.load(run, model="flat").scores(images), atol=1e-6)
    capsys.readouterr()
    assert main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    # predict reads an export
    f = tmp_path / "one.png"
    images[0].save(f)
    assert main(["predict", str(out), str(f), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["wnid"] == a.predict([images[0]], top_k=1)[0][0].wnid


def test_predict_names_a_missing_or_corrupt_file(finished_run, tmp_path, capsys):
    run, _, _ = finished_run
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main(["predict", str(run), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and err.count("\n") == 1
    assert main(["predict", str(run), str(tmp_path / "nope.png")]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_predict_on_directories_and_globs_skipping_a_corrupt_file(finished_run, tmp_path, capsys):
    run, _, _ = finished_run
    from dmde.data.synthetic import synthetic_images

    x, _ = synthetic_images(10, 1, size=12, seed=5)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")  # not an image file: not listed
    pred = dmde.load(run)
    direct = pred.predict([str(folder / f"{i}.png") for i in range(3)], top_k=2)
    assert pred.predict([str(folder)], top_k=2) == direct
    assert pred.predict([str(folder / "*.png")], top_k=2) == direct
    (folder / "1.png").write_bytes(b"\x89PNG broken")
    got = pred.predict([str(folder)], top_k=2, on_corrupt="skip")
    assert got[0] == direct[0] and got[1] is None and got[2] == direct[2]
    assert len(pred.skipped) == 1 and "1.png" in pred.skipped[0][0]
    assert main(["predict", str(run), str(folder), "--skip-corrupt", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["image"] for r in json.loads(out)] == [str(folder / "0.png"), str(folder / "2.png")]
    assert "skipped" in err and "1.png" in err
    assert main(["predict", str(run), str(tmp_path / "none-*.png")]) == 2
    assert "no file matches" in capsys.readouterr().err


def test_bad_config_is_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "groups.overlap=1.5", "data.dataset=synthetic",
                 "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "1.5" in err and err.count("\n") == 1
    assert main(["train", "--out", str(tmp_path / "r"), "experts.nope=1"]) == 2
    assert "experts.nope" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("groups.size=abc", "groups.size='abc' must be an integer"),
    ("experts.epochs=abc", "experts.epochs='abc' must be an integer"),
    ("experts.epochs=2.5", "experts.epochs=2.5 must be an integer"),
    ("groups.overlap=abc", "groups.overlap='abc' must be a number"),
    ("progress=maybe", "progress='maybe' must be true or false"),
    ("data.classes=abc", "data.classes='abc' must be a list or null"),
    ("experts.backbone_kwargs=3", "experts.backbone_kwargs=3 must be a mapping"),
    ("experts.init=scratch", "experts.init='scratch' is not one of backbone, flat"),
    ("fusion.calibrate=platt", "fusion.calibrate='platt' is not one of none, temperature, temperature_bias"),
])
def test_override_of_the_wrong_type_is_one_line(tmp_path, capsys, override, message):
    assert main(["train", "--out", str(tmp_path / "r"), "data.dataset=synthetic", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_overrides_of_the_right_type_pass():
    cfg = load_config(RunConfig, None, ["fusion.finetune.lr=1e-3", "groups.overlap=0", "data.max_per_class=null",
                                        "fusion.batched=wide", "fusion.batched=true", "data.classes=[n1, n2]"])
    assert cfg.fusion.finetune.lr == 1e-3 and isinstance(cfg.groups.overlap, float)
    assert cfg.data.max_per_class is None and cfg.fusion.batched is True and cfg.data.classes == ["n1", "n2"]


def test_image_folder_with_a_corrupt_file(tmp_path, real_wordnet_dir):
    """data.on_corrupt: raise names the file; skip drops it and counts it."""
    from dmde.core.errors import CorruptImageError
    from dmde.data.synthetic import synthetic_images
    from dmde.hierarchy.wordnet import WordNet
    from dmde.run.config import DataConfig
    from dmde.run.prepare import load_splits

    x, y = synthetic_images(2, 5, size=8, seed=0)
    for i, (img, t) in enumerate(zip(x, y)):
        d = tmp_path / ("dog.n.01" if int(t) == 0 else "n02121808")  # a sense and a WNID as class names
        d.mkdir(exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    (tmp_path / "dog.n.01" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    wn = WordNet.load()
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), holdout_per_class=1)
    with pytest.raises(CorruptImageError, match="zz_broken.png"):
        load_splits(cfg, wn, progress=False)
    cfg.on_corrupt = "skip"
    with pytest.warns(UserWarning, match="1 corrupt"):
        splits = load_splits(cfg, wn, progress=False)
    assert splits.skipped == 1
    assert splits.classes == ["n02084071", "n02121808"]  # 'dog.n.01' resolved to its WNID
    assert len(splits.train) + len(splits.holdout) == 10


def test_train_prints_one_line_per_epoch_without_progress_bars(tmp_path, capsys, real_wordnet_dir):
    _, path = tiny_config(tmp_path, experts={"epochs": 2})
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r"), "--no-progress", "--until", "experts"]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = [ln for ln in err if " epoch " in ln]
    assert len(lines) == 5 * 2  # five experts, two epochs each, one line per epoch
    assert lines[0].startswith("expert 0 epoch 1/2: loss ") and "img/s" in lines[0]
    import logging

    assert logging.getLogger("dmde").handlers == []  # the command's handler is gone after it
