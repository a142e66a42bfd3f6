"""Mixed precision (``precision: 32 | bf16 | fp16``) and the device of a rank (issue #11): bf16 and
fp16 autocast train and resume exactly on the CPU, the key is checked in one line, a default
precision leaves the stage hashes alone, and under torchrun each rank takes the GPU LOCAL_RANK."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.distributed as dist

from dmde.core import distributed, precision as precision_mod
from dmde.core.checkpoint import load_checkpoint
from dmde.core.errors import DmdeValueError, MismatchError
from dmde.core.precision import check_precision
from dmde.core.training import ImageTensors, predict_logits
from dmde.data.synthetic import synthetic_images
from dmde.experts.train import ExpertsConfig, expert_path, train_expert
from dmde.run.config import RunConfig, resolve_device, validate
from dmde.run.stages import stage_hashes

GROUP, WNIDS = [1, 2], ["n00000001", "n00000002"]


def tiny_data() -> ImageTensors:
    x, y = synthetic_images(4, 24, size=12, seed=0)
    return ImageTensors(x, y)


def tiny_cfg(**kw) -> ExpertsConfig:
    base = dict(backbone="small_cnn", backbone_kwargs={"width": 8}, epochs=3, batch_size=16, lr=0.05,
                similarity_per_class=4, seed=3)
    return ExpertsConfig(**{**base, **kw})


def _losses(out_dir) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out_dir / "expert_000.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_the_cpu_trains_and_resumes_identically(precision, tmp_path):
    data, cfg = tiny_data(), tiny_cfg()
    full = train_expert(0, GROUP, WNIDS, data, cfg, tmp_path / "a", "h", progress=False, precision=precision)
    train_expert(0, GROUP, WNIDS, data, cfg, tmp_path / "b", "h", progress=False, stop_after_epoch=1,
                 precision=precision)
    resumed = train_expert(0, GROUP, WNIDS, data, cfg, tmp_path / "b", "h", progress=False, precision=precision)
    assert full["epoch"] == resumed["epoch"] == 3
    losses = _losses(tmp_path / "a")
    assert losses[-1] < losses[0]  # it learns
    assert _losses(tmp_path / "b") == losses
    a, b = (load_checkpoint(expert_path(tmp_path / d, 0)) for d in "ab")
    assert a["precision"] == precision and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert ("scaler" in a) == (precision == "fp16")
    if precision == "fp16":
        assert a["scaler"] == b["scaler"]


def test_precision_32_checkpoints_carry_no_new_keys_and_a_resume_at_another_precision_is_refused(tmp_path):
    data, cfg = tiny_data(), tiny_cfg(epochs=2)
    train_expert(0, GROUP, WNIDS, data, cfg, tmp_path, "h", progress=False, stop_after_epoch=1)
    state = load_checkpoint(expert_path(tmp_path, 0))
    assert "precision" not in state and "scaler" not in state
    with pytest.raises(MismatchError, match="trained at precision 32, not bf16"):
        train_expert(0, GROUP, WNIDS, data, cfg, tmp_path, "h", progress=False, precision="bf16")


def test_predict_logits_under_bf16_is_float32_and_close():
    data = tiny_data()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 5)).eval()
    a = predict_logits(net, data, batch_size=32)
    b = predict_logits(net, data, batch_size=32, precision="bf16")
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert torch.allclose(a, b, atol=0.1)


def test_the_precision_key_is_checked_in_one_line():
    for ok in ("32", 32, "bf16", "fp16"):
        validate(RunConfig(precision=ok))
    with pytest.raises(DmdeValueError, match=r"^precision='16' is not one of 32, bf16, fp16$"):
        validate(RunConfig(precision=16))


def test_fp16_where_this_torch_cannot_autocast_to_it_is_one_line(monkeypatch):
    check_precision("bf16", "cpu")  # this torch autocasts both on the CPU
    check_precision("32", "cpu")
    monkeypatch.setattr(precision_mod, "autocast", lambda precision, device: contextlib.nullcontext())
    with pytest.raises(DmdeValueError, match=r"^precision='fp16' does not run on cpu .*: fp16 needs CUDA; use bf16 on CPU$"):
        check_precision("fp16", "cpu")


def test_a_default_precision_leaves_the_stage_hashes_alone():
    base = stage_hashes(RunConfig())
    assert stage_hashes(RunConfig(precision=32)) == base  # YAML's `precision: 32` is an integer
    moved = {k for k, v in stage_hashes(RunConfig(precision="bf16")).items() if v != base[k]}
    assert moved == set(base) - {"ontology", "groups"}  # every trained stage, and evaluate


def _torchrun_env(monkeypatch, local_rank: int, gpus: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


def test_under_torchrun_auto_and_cuda_are_the_ranks_own_gpu(monkeypatch):
    _torchrun_env(monkeypatch, 1, 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # named: as given
    _torchrun_env(monkeypatch, 2, 2)
    with pytest.raises(DmdeValueError, match="LOCAL_RANK=2 but this machine has 2 CUDA GPU"):
        resolve_device("auto")
    _torchrun_env(monkeypatch, 1, 0)
    assert resolve_device("auto") == torch.device("cpu")


def test_nccl_ranks_set_their_gpu_before_the_process_group(monkeypatch):
    _torchrun_env(monkeypatch, 1, 2)
    monkeypatch.setenv("DMDE_THREADS", "1")
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    assert distributed.dist_context() == (1, 4)
    assert calls == [("set_device", "cuda:1"), ("init", "nccl")]


@pytest.mark.slow
def test_the_whole_pipeline_trains_at_bf16(tmp_path, real_wordnet_dir):
    """Every trained stage takes the run's precision: its checkpoints say so, and the models learn."""
    from dmde.core.config import load_config
    from dmde.run.pipeline import train

    cfg = load_config(RunConfig, overrides=[
        "data.dataset=synthetic", "data.image_size=12", "data.synthetic_per_class=30", "data.holdout_per_class=6",
        "data.fusion_per_class=4", "ontology.categories=3", "experts.backbone=small_cnn",
        "experts.backbone_kwargs={width: 8}", "experts.epochs=4", "experts.batch_size=16", "experts.lr=0.02",
        "experts.similarity_per_class=4", "fusion.epochs=3", "fusion.finetune.epochs=1",
        "fusion.finetune.batch_size=32", "fusion.finetune.lr=0.002", "baselines.early_fusion=true",
        "baselines.early_fusion_epochs=3", "progress=false", "tensorboard=false", "precision=bf16"])
    metrics = train(tmp_path / "run", cfg)
    for name in ("experts/expert_000.pt", "mixture.pt", "flat.pt"):
        assert load_checkpoint(tmp_path / "run" / name)["precision"] == "bf16", name
    assert {"mixture", "mixture_nway", "flat", "early_fusion"} <= set(metrics)
    assert metrics["mixture"]["top1"] > 0.3 and metrics["flat"]["top1"] > 0.3  # N = 10: chance is 0.1
