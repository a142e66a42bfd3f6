"""``torchrun --nproc-per-node 2 -m dmde train-experts``: experts spread over two gloo ranks
write every checkpoint, identical to those of a single process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dmde.core.checkpoint import load_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # starts torchrun ranks

CONFIG = {
    "data": {"dataset": "synthetic", "image_size": 12, "synthetic_per_class": 20, "holdout_per_class": 4},
    "ontology": {"categories": 3},
    "groups": {"size": 4, "overlap": 0.5},
    "experts": {"backbone": "small_cnn", "backbone_kwargs": {"width": 8}, "epochs": 1, "batch_size": 32,
                "similarity_per_class": 4},
    "progress": False,
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process in both runs: the same arithmetic, hence bit-identical weights.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _torchrun() -> str:
    torchrun = Path(sys.executable).with_name("torchrun")
    found = str(torchrun) if torchrun.exists() else shutil.which("torchrun")
    if found is None:
        pytest.skip("torchrun not found")
    return found


def test_two_gloo_ranks_write_the_same_experts_as_one_process(tmp_path, real_wordnet_dir):
    torchrun = _torchrun()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    one = subprocess.run([sys.executable, "-m", "dmde", "train-experts", "--config", str(cfg),
                          "--out", str(tmp_path / "one")], env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "dmde", "train-experts",
                          "--config", str(cfg), "--out", str(tmp_path / "two")],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = sorted(p.name for p in (tmp_path / "one" / "experts").glob("expert_*.pt"))
    b = sorted(p.name for p in (tmp_path / "two" / "experts").glob("expert_*.pt"))
    assert a == b == [f"expert_{j:03d}.pt" for j in range(5)]
    # each rank wrote its own share (round-robin: rank 0 → 0, 2, 4; rank 1 → 1, 3)
    assert (tmp_path / "two" / "experts" / "metrics_rank0.json").exists()
    assert (tmp_path / "two" / "experts" / "metrics_rank1.json").exists()
    for name in a:
        sa = load_checkpoint(tmp_path / "one" / "experts" / name)["model"]
        sb = load_checkpoint(tmp_path / "two" / "experts" / name)["model"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_whole_pipeline_under_torchrun(tmp_path, real_wordnet_dir):
    """``dmde train`` on 2 ranks: experts spread, fine-tuning and flat data-parallel, the rest on
    rank 0; every stage finishes and the metrics are written once."""
    cfg = dict(CONFIG)
    cfg["fusion"] = {"epochs": 3, "finetune": {"epochs": 1, "batch_size": 16}}
    cfg["baselines"] = {"flat": True, "epochs": 1}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "dmde", "train",
                          "--config", str(path), "--out", str(tmp_path / "run")],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert all(stages[s]["done"] for s in ("ontology", "groups", "experts", "fusion", "finetune", "flat", "evaluate"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"mixture", "mixture_nway", "mixture_upsilon", "flat"} <= set(metrics)
    # one table printed, by rank 0 only
    assert out.stdout.count("| model |") == 1
