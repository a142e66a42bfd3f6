"""The fidelity work: the experts' warm start from the flat model, the stage-by-stage accounting,
the calibration before Eq. 7, the equal-steps budget and the flat ensemble, on known answers."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from dmde.baselines.models import FlatClassifier, FlatEnsemble
from dmde.core.errors import DmdeValueError
from dmde.experts.backbones import create_backbone
from dmde.experts.expert import Expert, init_from_flat
from dmde.experts.train import ExpertsConfig, budget_epochs, expert_config_hash
from dmde.fusion.calibration import calibrate_logits, expected_calibration_error, fit_calibration
from dmde.fusion.stacking import GroupLayout, group_slots, restrict_to_true_groups, stack
from dmde.run.config import RunConfig, validate
from dmde.run.evaluate import expert_accounting, restricted_top1
from dmde.run.stages import stage_hashes


def _flat(n: int = 6, seed: int = 0) -> FlatClassifier:
    torch.manual_seed(seed)
    return FlatClassifier(create_backbone("small_cnn", width=4), n)


@pytest.mark.parametrize("multitask", [True, False])
def test_warm_start_copies_the_flat_models_body_and_group_rows(multitask):
    flat = _flat()
    torch.manual_seed(1)
    expert = Expert(create_backbone("small_cnn", width=4), 3, multitask=multitask)
    nig_before = expert.head.weight[-1].detach().clone(), expert.head.bias[-1].detach().clone()
    group = [4, 0, 2]
    init_from_flat(expert, flat.state_dict(), group)
    fb, eb = flat.backbone.state_dict(), expert.backbone.state_dict()
    assert fb.keys() == eb.keys() and all(torch.equal(fb[k], eb[k]) for k in fb)
    assert torch.equal(expert.head.class_weights, flat.classifier.weight[group])
    assert torch.equal(expert.head.bias[:3], flat.classifier.bias[group])
    assert torch.equal(expert.head.weight[-1], nig_before[0]) and torch.equal(expert.head.bias[-1], nig_before[1])
    # the known answer: the expert's class logits are the flat model's logits of those classes
    flat.eval(), expert.eval()
    x = torch.rand(5, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(expert(x)[:, :3], flat(x)[:, group], atol=1e-6)


def test_warm_start_refuses_another_architecture():
    torch.manual_seed(0)
    flat = FlatClassifier(create_backbone("small_cnn", width=8), 6)
    expert = Expert(create_backbone("small_cnn", width=4), 2)
    with pytest.raises(RuntimeError):
        init_from_flat(expert, flat.state_dict(), [0, 1])


def test_restricted_top1_on_a_hand_made_score_matrix():
    # classes 0..3; the group is {1, 3}
    scores = torch.tensor([[9.0, 1.0, 0.0, 2.0],   # y=1: class 0 wins overall, but among {1,3}: 3 → wrong
                           [0.0, 5.0, 9.0, 1.0],   # y=1: among {1,3}: 1 → right (class 2 would win overall)
                           [0.0, 0.0, 0.0, 1.0],   # y=3: right
                           [5.0, 5.0, 5.0, 5.0]])  # y=0: not a group class, ignored
    targets = torch.tensor([1, 1, 3, 0])
    assert restricted_top1(scores, targets, [1, 3]) == pytest.approx(2 / 3)
    assert math.isnan(restricted_top1(scores, targets, [2]))


def test_flat_ensemble_averages_probabilities():
    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor(logits)

        def forward(self, x):
            return self.logits.expand(x.shape[0], -1)

    a, b = [math.log(0.7), math.log(0.2), math.log(0.1)], [math.log(0.1), math.log(0.3), math.log(0.6)]
    out = FlatEnsemble([Fixed(a), Fixed(b)])(torch.zeros(2, 1))
    assert torch.allclose(out.exp(), torch.tensor([[0.4, 0.25, 0.35]]).expand(2, -1), atol=1e-6)
    assert out.argmax(1).tolist() == [0, 0]


def _layout() -> GroupLayout:
    return GroupLayout.from_groups([[0, 1], [1, 2]], 3)  # class 1 in both groups


def test_group_slots_and_the_oracle_restriction():
    layout = _layout()
    y = torch.tensor([0, 1, 2])
    assert group_slots(layout, y).tolist() == [[0, 2], [1, 0], [2, 1]]  # 2 = Mmax: not in the group
    # one image of class 0: expert 0 hesitates, expert 1 (which lacks class 0) is sure of class 2
    P = torch.tensor([[[0.3, 0.2, 0.5], [0.0, 0.9, 0.1]]])
    full = stack(P, layout, "eq7")
    assert full.argmax(1).item() == 2  # the wrong group wins argmax Υ
    oracle = stack(restrict_to_true_groups(P, layout, torch.tensor([0])), layout, "eq7")
    assert torch.allclose(oracle, torch.tensor([[0.3 * 1.0, 0.2 * 1.0, 0.0]]))  # odds (1-φ)/φ = 1 for expert 0
    assert oracle.argmax(1).item() == 0


def test_expert_accounting_on_hand_made_probabilities():
    layout = _layout()
    # P (B=4, G=2, 3): columns [slot 0, slot 1, not-in-group]
    P = torch.tensor([
        [[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]],  # y=0: expert 0 right; expert 1 says not-in-group (right)
        [[0.2, 0.5, 0.3], [0.7, 0.2, 0.1]],  # y=1: expert 0 right (slot 1); expert 1 right (slot 0)
        [[0.1, 0.2, 0.7], [0.2, 0.3, 0.5]],  # y=2: expert 0 not-in-group (right); expert 1 says NIG (false NIG)
        [[0.5, 0.4, 0.1], [0.3, 0.6, 0.1]],  # y=2: expert 0 misses NIG; expert 1 right (slot 1)
    ])
    y = torch.tensor([0, 1, 2, 2])
    flat = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    rows = expert_accounting(P, layout, y, flat)
    assert rows[0]["group_top1"] == pytest.approx(1.0) and rows[0]["flat_group_top1"] == pytest.approx(0.5)
    assert rows[0]["nig_recall"] == pytest.approx(0.5) and rows[0]["false_nig_rate"] == pytest.approx(0.0)
    # expert 1's top-1 ignores the not-in-group column: all three of its images right; flat: only row 2
    assert rows[1]["group_top1"] == pytest.approx(1.0) and rows[1]["flat_group_top1"] == pytest.approx(1 / 3)
    assert rows[1]["nig_recall"] == pytest.approx(1.0) and rows[1]["false_nig_rate"] == pytest.approx(1 / 3)
    assert rows[0]["images_in"] == 2 and rows[1]["images_in"] == 3
    # experts without a not-in-group output (the ablation): the group top-1 only
    bare = expert_accounting(P[..., :2], layout, y, flat)
    assert bare[1]["group_top1"] == pytest.approx(1.0) and "nig_recall" not in bare[1] and "phi_ece" not in bare[1]


def test_expected_calibration_error_known_answer():
    p = torch.tensor([0.05, 0.05, 0.95, 0.95, 0.55, 0.55])
    o = torch.tensor([False, False, True, True, True, False])
    assert expected_calibration_error(p, o, bins=10) == pytest.approx((0.05 * 2 + 0.05 * 2 + 0.05 * 2) / 6)
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([True, False])) == 0.0


def test_calibration_recovers_a_known_temperature_and_bias():
    g = torch.Generator().manual_seed(0)
    n, w = 20000, 4
    z = torch.randn(n, 2, w, generator=g) * 3
    t_true, b_true = torch.tensor([2.0, 0.5]), torch.tensor([1.0, -0.5])
    probs = torch.softmax(calibrate_logits(z, t_true, b_true), -1)
    labels = torch.multinomial(probs.reshape(-1, w), 1, generator=g).view(n, 2)
    t, b = fit_calibration(z, labels, bias=True)
    assert torch.allclose(t, t_true, rtol=0.05) and torch.allclose(b, b_true, atol=0.1)
    t_only, b0 = fit_calibration(z, labels, bias=False)
    assert torch.equal(b0, torch.zeros(2)) and (t_only > 0).all()
    # padding slots (−inf) stay −inf and get no probability
    zp = z.clone()
    zp[:, :, 2] = -math.inf
    assert torch.softmax(calibrate_logits(zp, t_true, b_true), -1)[:, :, 2].max() == 0


def test_budget_equal_steps():
    cfg = ExpertsConfig(epochs=4, batch_size=100, budget="flat_steps")
    # the flat model: 4 epochs of ceil(1000/100) = 10 steps; the expert's view of 450 images: 5 steps an epoch
    assert budget_epochs(cfg, view_samples=450, flat_samples=1000).epochs == 8
    assert budget_epochs(ExpertsConfig(epochs=4, batch_size=100), 450, 1000).epochs == 4  # budget=epochs
    assert budget_epochs(ExpertsConfig(epochs=0, budget="flat_steps"), 450, 1000).epochs == 0


def test_budget_share_scales_the_flat_steps_to_whole_passes():
    half = ExpertsConfig(epochs=4, batch_size=100, budget="flat_steps", budget_share=0.5)
    # half of 40 flat steps = 20 steps over a view of 5 steps an epoch: 4 passes
    assert budget_epochs(half, view_samples=450, flat_samples=1000).epochs == 4
    # 0.3 · 40 = 12 steps → 2.4 passes → 2; a tiny share still runs one pass
    assert budget_epochs(dataclasses.replace(half, budget_share=0.3), 450, 1000).epochs == 2
    assert budget_epochs(dataclasses.replace(half, budget_share=0.01), 450, 1000).epochs == 1


def test_budget_share_is_the_experts_alone_and_checked():
    base = RunConfig()
    steps = dataclasses.replace(base, experts=dataclasses.replace(base.experts, budget="flat_steps"))
    half = dataclasses.replace(steps, experts=dataclasses.replace(steps.experts, budget_share=0.5))
    a, b = stage_hashes(steps), stage_hashes(half)
    assert a["flat"] == b["flat"] and a["experts"] != b["experts"]  # the flat model is not retrained
    same = dataclasses.replace(steps, experts=dataclasses.replace(steps.experts, budget_share=1.0))
    assert stage_hashes(same) == a  # at its default the setting stays out of every hash
    assert expert_config_hash(steps.experts) == expert_config_hash(same.experts)
    assert expert_config_hash(steps.experts) != expert_config_hash(half.experts)
    with pytest.raises(DmdeValueError, match="budget_share=0.0 must be > 0"):
        validate(dataclasses.replace(steps, experts=dataclasses.replace(steps.experts, budget_share=0.0)))
    with pytest.raises(DmdeValueError, match="budget_share=0.5 is read only with experts.budget=flat_steps"):
        validate(dataclasses.replace(base, experts=dataclasses.replace(base.experts, budget_share=0.5)))


@pytest.mark.slow
def test_pipeline_warm_start_ensemble_and_accounting(tmp_path, real_wordnet_dir):
    """The whole pipeline with the warm start, equal steps, calibration, the product of the experts
    (its N-way layer on the log score, its fine-tuning) and the ensemble."""
    import json

    from test_pipeline import tiny_config

    from dmde.core.checkpoint import load_checkpoint
    from dmde.run.pipeline import train

    cfg, _ = tiny_config(tmp_path, experts={"init": "flat", "budget": "flat_steps", "epochs": 2},
                         fusion={"calibrate": "temperature_bias", "stacking": "poe"},
                         baselines={"ensemble": True, "width_matched_flat": False, "early_fusion": False})
    metrics = train(tmp_path / "run", cfg)
    stages = list(json.loads((tmp_path / "run" / "stages.json").read_text()))
    assert stages.index("flat") < stages.index("experts")  # the warm start needs the flat model first
    for name in ("mixture_oracle", "mixture_upsilon", "mixture_upsilon_calibrated", "mixture_upsilon_eq7",
                 "mixture_nway", "mixture", "mixture_finetuned_oracle", "flat", "flat_ensemble"):
        assert name in metrics, name
    n_groups = len(json.loads((tmp_path / "run" / "groups.json").read_text())["groups"])
    assert len(list((tmp_path / "run" / "ensemble").glob("flat_*.pt"))) == n_groups - 1
    table = metrics["accounting"]["experts"]
    assert len(table) == n_groups and all("flat_group_top1" in r and "phi_ece_calibrated" in r for r in table)
    fusion = load_checkpoint(tmp_path / "run" / "fusion.pt")
    assert fusion["temperature"].shape == (n_groups,) and (fusion["temperature"] > 0).all()
    # equal steps: the experts ran more epochs over their (smaller) group views than configured
    exp0 = load_checkpoint(tmp_path / "run" / "experts" / "expert_000.pt")
    assert exp0["config"]["epochs"] > 2
    # the oracle is never below argmax Υ: it only removes the wrong groups' votes
    assert metrics["mixture_oracle"]["top1"] >= metrics["mixture_upsilon"]["top1"]


def test_accounting_of_a_product_of_experts_run():
    """A run that stacks with the product of the experts: its oracle rules out the classes outside
    the true groups (a log score cannot zero a group), and the accounting adds argmax Υ under
    Eq. 7 on the same experts, paired."""
    from types import SimpleNamespace

    from dmde.run.evaluate import mixture_accounting

    layout = _layout()
    P = torch.tensor([[[0.3, 0.2, 0.5], [0.0, 0.9, 0.1]],  # y = 0: expert 1 (no class 0) is sure of 2
                      [[0.1, 0.1, 0.8], [0.2, 0.7, 0.1]]])  # y = 2: both experts right
    y = torch.tensor([0, 2])
    base = SimpleNamespace(layout=layout, stacking="poe", eps=1e-4, lam=0.5)
    rows, table = mixture_accounting({"mixture_upsilon": base}, {"mixture_upsilon": P}, y, None)
    assert stack(P, layout, "poe").argmax(1).tolist() == [2, 2]  # poe: log(0.9/0.1) beats log(0.3/0.5)
    assert rows["mixture_oracle"]["top1"] == pytest.approx(1.0)  # classes {0, 1} only for image 0
    assert rows["mixture_upsilon_eq7"]["top1"] == pytest.approx(0.5)  # Eq. 7 also picks 2 for image 0
    assert "mixture_upsilon_poe" not in rows and len(table["experts"]) == 2


def _nan_equal(a, b) -> bool:
    return (a != a and b != b) or a == b


def test_tallies_added_in_chunks_equal_the_single_pass_formulas():
    """ScoreTally and ExpertTally over chunks of 7 images against the figures written out on the
    whole matrices, with a class and a group that no image belongs to (NaN entries)."""
    from dmde.run.tally import ExpertTally, ScoreTally

    g = torch.Generator().manual_seed(0)
    n, b = 12, 50
    y = torch.randint(0, n - 1, (b,), generator=g)  # class 11 has no image
    scores = torch.randn(b, n, generator=g)
    dist = torch.randint(1, 6, (n, n), generator=g).numpy()
    tally = ScoreTally(n, dist)
    for s in range(0, b, 7):
        tally.add(scores[s : s + 7], y[s : s + 7])
    m, per_class = tally.metrics(), tally.per_class()
    rank = (scores > scores.gather(1, y[:, None])).sum(1)  # classes scored above the true one
    for k in (1, 2, 5, 10):
        assert m[f"top{k}"] == float((rank < k).float().mean())
    pred = scores.argmax(1)
    wrong = pred != y
    assert m["mistake_distance"] == pytest.approx(float((dist[y[wrong], pred[wrong]] + 1).mean()), abs=0)
    for c in range(n):
        want = float((pred[y == c] == c).double().mean()) if (y == c).any() else float("nan")
        assert _nan_equal(float(per_class[c]), want), c
    assert math.isnan(per_class[n - 1]) and m["n_images"] == b

    groups = [[0, 1, 2, 3], [3, 4, 5, 6], [11]]  # no image of group 2's class
    layout = GroupLayout.from_groups(groups, n)
    P = torch.softmax(torch.randn(b, 3, 5, generator=g), -1)
    Pc = torch.softmax(torch.randn(b, 3, 5, generator=g), -1)
    et = ExpertTally(layout)
    for s in range(0, b, 7):
        et.add(P[s : s + 7], y[s : s + 7], scores[s : s + 7], Pc[s : s + 7])
    rows = et.rows()
    for j, classes in enumerate(groups):
        m_j = len(classes)
        inside = torch.isin(y, torch.tensor(classes))
        slot = torch.tensor([classes.index(int(c)) if int(c) in classes else -1 for c in y])
        p = P[:, j]
        says_nig = p[:, 4] > p[:, :m_j].max(1).values
        cols = torch.tensor(classes)
        want = {
            "group_top1": float((p[inside, :m_j].argmax(1) == slot[inside]).float().mean()) if inside.any() else math.nan,
            "flat_group_top1": restricted_top1(scores, y, classes),
            "nig_recall": float(says_nig[~inside].float().mean()),
            "false_nig_rate": float(says_nig[inside].float().mean()) if inside.any() else math.nan,
            "phi_ece": expected_calibration_error(1 - p[:, 4], inside),
            "phi_ece_calibrated": expected_calibration_error(1 - Pc[:, j, 4], inside),
        }
        assert rows[j]["images_in"] == int(inside.sum()) and cols.numel() == rows[j]["classes"]
        for key, value in want.items():
            assert _nan_equal(rows[j][key], value), (j, key, rows[j][key], value)
    assert math.isnan(rows[2]["group_top1"]) and math.isnan(rows[2]["flat_group_top1"])
