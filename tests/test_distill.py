"""Distillation of the flat model into the experts (experts.distill, issue #10): the soft targets
fold the N classes onto the expert's outputs, the loss is zero exactly at the target, an expert
trained on them alone moves towards them, and the experts' stage then reads the flat model."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dmde.core.checkpoint import load_checkpoint
from dmde.core.errors import DmdeValueError
from dmde.core.training import ImageTensors, predict_logits
from dmde.data.synthetic import synthetic_images
from dmde.experts.distill import distillation_loss, fold_to_group, soft_targets
from dmde.experts.train import ExpertsConfig, expert_identity, expert_logits, expert_path, load_expert, train_expert
from dmde.run.config import RunConfig, validate
from dmde.run.stages import BY_NAME, stage_hashes


def test_fold_keeps_the_group_columns_and_sums_the_rest_into_not_in_group():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.25, 0.25]])
    folded = fold_to_group(probs, [2, 0])
    assert torch.allclose(folded, torch.tensor([[0.3, 0.1, 0.6], [0.25, 0.5, 0.25]]))
    assert torch.allclose(fold_to_group(probs, [2, 0], not_in_group=False),
                          torch.tensor([[0.75, 0.25], [1 / 3, 2 / 3]]))
    with pytest.raises(DmdeValueError, match="0..3"):
        fold_to_group(probs, [4])


def test_soft_targets_are_the_tempered_softmax_folded():
    z = torch.tensor([[0.0, 2.0, 4.0]])
    q = soft_targets(z, [1], temperature=2.0)
    e = torch.exp(torch.tensor([0.0, 1.0, 2.0]))
    assert torch.allclose(q, torch.tensor([[e[1] / e.sum(), (e[0] + e[2]) / e.sum()]]))
    with pytest.raises(DmdeValueError, match="> 0"):
        soft_targets(z, [1], temperature=0.0)


def test_membership_from_the_label_moves_an_in_group_images_not_in_group_mass_onto_the_group():
    z = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]))  # T = 1: q is these rows
    q = soft_targets(z, [2, 0], temperature=1.0, in_group=torch.tensor([True, False]))
    assert torch.allclose(q, torch.tensor([[0.75, 0.25, 0.0], [0.3, 0.1, 0.6]]))  # row 1 as folded
    with pytest.raises(DmdeValueError, match=r"\(2,\)"):
        soft_targets(z, [2, 0], temperature=1.0, in_group=torch.tensor([True]))


def test_distillation_loss_is_zero_at_the_target_and_t2_kl_elsewhere():
    q = torch.tensor([[0.7, 0.2, 0.1]])
    T = 3.0
    assert float(distillation_loss(T * q.log(), q, T)) == pytest.approx(0.0, abs=1e-6)
    logits = torch.tensor([[0.0, 0.0, 0.0]])  # softmax(0) = uniform: KL(q || u) = Σ q log(3 q)
    want = T ** 2 * float((q * (3 * q).log()).sum())
    assert float(distillation_loss(logits, q, T)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(DmdeValueError, match="differ"):
        distillation_loss(torch.zeros(1, 2), q, T)


def _data() -> ImageTensors:
    x, y = synthetic_images(4, 24, size=12, seed=0)
    return ImageTensors(x, y)


def _cfg(**kw) -> ExpertsConfig:
    base = dict(backbone="small_cnn", backbone_kwargs={"width": 8}, epochs=4, batch_size=16, lr=0.05,
                similarity_per_class=4, seed=3, augment=False)
    return ExpertsConfig(**{**base, **kw})


def _kl_to(expert, data, q):
    logits = predict_logits(lambda x: expert_logits(expert, x), data)
    return float(distillation_loss(logits, q, 1.0))


def test_an_expert_trained_on_the_soft_targets_alone_moves_towards_them(tmp_path):
    data, group = _data(), [1, 2]
    g = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(len(data), 4, generator=g)  # a teacher unrelated to the labels
    q = soft_targets(teacher, group, 1.0)
    train_expert(0, group, ["a", "b"], data, _cfg(), tmp_path / "hard", "h", progress=False)
    train_expert(0, group, ["a", "b"], data, _cfg(distill=1.0, distill_temperature=1.0), tmp_path / "soft", "h",
                 progress=False, teacher_logits=teacher)
    hard, _ = load_expert(expert_path(tmp_path / "hard", 0))
    soft, _ = load_expert(expert_path(tmp_path / "soft", 0))
    assert _kl_to(soft, data, q) < 0.8 * _kl_to(hard, data, q)
    with pytest.raises(DmdeValueError, match="flat model's logits"):
        train_expert(0, group, ["a", "b"], data, _cfg(distill=0.5), tmp_path / "none", "h", progress=False)


def test_distillation_settings_at_their_default_leave_an_experts_identity_alone():
    cfg = _cfg()
    for same in (dict(distill_temperature=2.0), dict(distill_membership="teacher")):
        assert expert_identity(cfg, "h", ["a"]) == expert_identity(dataclasses.replace(cfg, **same), "h", ["a"])
    assert expert_identity(cfg, "h", ["a"]) != expert_identity(dataclasses.replace(cfg, distill=0.5), "h", ["a"])


def test_distillation_ties_the_experts_to_the_flat_model_and_leaves_the_flat_model_alone():
    base = RunConfig()
    kd = dataclasses.replace(base, experts=dataclasses.replace(base.experts, distill=0.5))
    a, b = stage_hashes(base), stage_hashes(kd)
    assert a["flat"] == b["flat"] and a["experts"] != b["experts"]  # the same teacher, other experts
    longer = dataclasses.replace(kd, baselines=dataclasses.replace(kd.baselines, epochs=3))
    assert stage_hashes(longer)["experts"] != b["experts"]  # another teacher → the experts redo
    no_flat = dataclasses.replace(kd, baselines=dataclasses.replace(kd.baselines, flat=False))
    assert BY_NAME["flat"].enabled(no_flat)
    for bad, match in ((1.5, "experts.distill=1.5 must lie in"), (-0.1, "experts.distill=-0.1 must lie in")):
        with pytest.raises(DmdeValueError, match=match):
            validate(dataclasses.replace(base, experts=dataclasses.replace(base.experts, distill=bad)))
    with pytest.raises(DmdeValueError, match="distill_temperature=0.0 must be > 0"):
        validate(dataclasses.replace(base, experts=dataclasses.replace(base.experts, distill_temperature=0.0)))
    with pytest.raises(DmdeValueError, match="distill_membership='both' is not one of teacher, label"):
        validate(dataclasses.replace(base, experts=dataclasses.replace(base.experts, distill_membership="both")))
    label = dataclasses.replace(kd, experts=dataclasses.replace(kd.experts, distill_membership="label"))
    assert stage_hashes(label)["flat"] == a["flat"] and stage_hashes(label)["experts"] != b["experts"]


@pytest.mark.slow
def test_pipeline_with_distillation_trains_the_flat_model_first(tmp_path, real_wordnet_dir):
    from test_pipeline import tiny_config

    from dmde.run.pipeline import train

    cfg, _ = tiny_config(tmp_path, experts={"distill": 0.5},
                         baselines={"width_matched_flat": False, "early_fusion": False})
    metrics = train(tmp_path / "run", cfg)
    stages = list(json.loads((tmp_path / "run" / "stages.json").read_text()))
    assert stages.index("flat") < stages.index("experts")
    assert "mixture" in metrics and "flat" in metrics
    assert load_checkpoint(tmp_path / "run" / "experts" / "expert_000.pt")["config"]["distill"] == 0.5
