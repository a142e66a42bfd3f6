"""``dmde experiment``: the whole paper suite end to end on tiny synthetic data, its report,
reuse of finished runs and of shared stages."""
from __future__ import annotations

import json

import pytest

from dmde.cli.main import main
from dmde.report.results import verdict
from dmde.report.suite import load_suite, plan, row_config

pytestmark = pytest.mark.slow  # runs a suite

# On top of the suite's own --quick overrides: tiny synthetic images (10 classes), ~1 s per run.
TINY = ["data.dataset=synthetic", "data.image_size=12", "data.synthetic_per_class=20", "data.holdout_per_class=5",
        "data.fusion_per_class=3", "groups.size=4", "ontology.categories=3", "experts.backbone=small_cnn",
        "experts.backbone_kwargs={width: 8}", "experts.batch_size=32", "experts.similarity_per_class=4",
        "experts.epochs=1", "fusion.epochs=2", "fusion.finetune.epochs=0", "baselines.early_fusion_epochs=2",
        "groups.visual_per_class=4"]
TABLES = ("### Table I", "### Table II", "### Table III", "### Table IV", "### The paper's claims here",
          "### Figures", "### Wall time")


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory, real_wordnet_dir):
    out = tmp_path_factory.mktemp("suite")
    args = ["experiment", "--out", str(out / "runs"), "--report", str(out / "report"), "--regime", "scratch",
            "--quick", *TINY]
    assert main(args) == 0
    return out, args


def test_report_has_every_table_and_figure(suite_run):
    out, _ = suite_run
    text = (out / "report" / "REPORT.md").read_text()
    for heading in TABLES:
        assert heading in text, heading
    for claim in ("mixture > flat", "tree-guided > random", "semantic ≳ visual tree", "accuracy rises with λ",
                  "multi-task > without", "late > early fusion", "Stack 1 ≳ Stack 2"):
        assert f"| {claim}" in text, claim
    assert "not measured" not in text  # every row finished
    for fig in ("ontology", "per_class_mixture_flat", "per_class_variants", "accuracy_vs_lambda",
                "accuracy_vs_experts", "mistake_distance", "predictions"):
        assert (out / "report" / f"scratch_{fig}.png").stat().st_size > 1000, fig
        assert f"scratch_{fig}.png" in text
    assert "/tmp" not in text and str(out) not in text  # no machine paths in the report
    # Table III has all six λ and Table I the width-matched flat model (from-scratch regime)
    for lam in ("0.0", "0.1", "0.2", "0.3", "0.4", "0.5"):
        assert f"| {lam} |" in text
    assert "flat, width-matched" in text


def test_every_row_is_a_train_run_and_stages_are_shared(suite_run):
    out, _ = suite_run
    runs = out / "runs" / "scratch"
    names = sorted(p.name for p in runs.iterdir())
    assert names == sorted(f"{r.name}-s0" for r in load_suite("paper").rows)
    for d in runs.iterdir():
        assert (d / "config.yaml").exists() and (d / "metrics.json").exists()
    stack2 = json.loads((runs / "stack2-s0" / "stages.json").read_text())
    assert stack2["experts"]["shared_from"] == "mixture-s0"  # Stack 2 reuses the mixture's experts
    assert stack2["flat"]["shared_from"] == "mixture-s0"
    assert "shared_from" not in stack2["fusion"]
    a, b = runs / "mixture-s0" / "experts" / "expert_000.pt", runs / "stack2-s0" / "experts" / "expert_000.pt"
    assert a.stat().st_ino == b.stat().st_ino  # hard-linked, not trained again
    # the λ = 0 row: 10 classes, M = 4 → 3 groups; λ = 0.5: 5
    assert len(json.loads((runs / "lambda_0.0-s0" / "groups.json").read_text())["groups"]) == 3
    assert len(json.loads((runs / "mixture-s0" / "groups.json").read_text())["groups"]) == 5


def test_rerun_reuses_finished_runs(suite_run, capsys):
    out, args = suite_run
    runs = out / "runs"
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file() and p.name != "suite.json"}
    capsys.readouterr()
    assert main(args) == 0
    log = capsys.readouterr().out
    assert log.count("finished, reused") == len(load_suite("paper").rows)
    after = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file() and p.name != "suite.json"}
    assert after == before


def test_paper_suite_configs_are_valid(tmp_path):
    suite = load_suite("paper")
    assert suite.regimes == ["pretrained", "scratch"]
    for regime in suite.regimes:
        for r, row, seed in [(g, row, s) for g, row, s in plan(suite, [regime])]:
            cfg = row_config(suite, r, row, seed, tmp_path, data=str(tmp_path / "tiny.zip"))
            assert cfg.data.dataset == "tiny_imagenet" and cfg.experts.seed == seed
            assert cfg.data.cache.endswith(f"{regime}_images.pt")
    mix = row_config(suite, "pretrained", suite.row("mixture"), 0, tmp_path)
    assert mix.experts.backbone == "efficientnet_lite0" and mix.experts.backbone_kwargs["freeze_trunk"]
    assert mix.groups.size == 50 and mix.groups.overlap == 0.5
    assert len(suite.row("mixture").seeds) >= 3


def test_verdicts():
    assert verdict({0: 0.02, 1: 0.01, 2: 0.03}) == "holds"
    assert verdict({0: 0.02, 1: -0.01, 2: 0.03}).startswith("holds on average")
    assert verdict({0: -0.02, 1: -0.01}) == "does not hold"
    assert verdict({0: -0.001, 1: 0.0005}, weak=True).startswith("holds within noise")
    assert verdict({}) == "not measured"


def test_unknown_suite_or_row_is_one_line(tmp_path, capsys):
    assert main(["experiment", "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["experiment", "--out", str(tmp_path), "--rows", "nope", "--no-report"]) == 2
    assert "nope" in capsys.readouterr().err


def test_finetuned_row_is_reported_when_the_base_config_skips_fine_tuning(tmp_path, real_wordnet_dir):
    """The pretrained regime's case: the mixture row stops at the N-way layer, the `finetuned` row
    adds Eq. 11 on the same experts; Table I and the claims then compare it with the flat model."""
    import shutil

    import yaml

    from dmde.core.config import read_yaml

    suite_dir = tmp_path / "suite"
    suite_dir.mkdir()
    raw = read_yaml(load_suite("paper").dir / "suite.yaml")
    raw["regimes"] = ["scratch"]
    raw["quick"]["overrides"].pop("fusion.finetune.epochs")
    raw["rows"] = [r for r in raw["rows"] if r["name"] in ("mixture", "finetuned")]
    for r in raw["rows"]:
        r["seeds"] = [0]
        r["overrides"] = {k: v for k, v in r["overrides"].items() if "width_matched" not in k}
        r["overrides"]["baselines.width_matched_flat"] = False
    (suite_dir / "suite.yaml").write_text(yaml.safe_dump(raw))
    base = read_yaml(load_suite("paper").dir / "scratch.yaml")
    base["fusion"]["finetune"]["epochs"] = 0  # as pretrained.yaml
    (suite_dir / "scratch.yaml").write_text(yaml.safe_dump(base))
    tiny = [t for t in TINY if not t.startswith("fusion.finetune.epochs")]
    out = tmp_path / "out"
    assert main(["experiment", "--suite", str(suite_dir), "--out", str(out), "--report", str(tmp_path / "rep"),
                 "--regime", "scratch", "--quick", *tiny]) == 0
    text = (tmp_path / "rep" / "REPORT.md").read_text()
    assert "| ours, fine-tuned end to end (Eq. 11) | finetuned | mixture |" in text
    assert "| mixture, fine-tuned end to end > flat | finetuned:mixture | mixture:flat |" in text
    assert "| end-to-end fine-tuning helps (Eq. 11 > Eq. 10) | finetuned:mixture | mixture:mixture_nway |" in text
    ft = json.loads((out / "scratch" / "finetuned-s0" / "stages.json").read_text())
    assert ft["experts"]["shared_from"] == "mixture-s0" and ft["fusion"]["shared_from"] == "mixture-s0"
    shutil.rmtree(out)


def test_claims_of_the_recipe_steps_on_hand_made_results():
    from pathlib import Path

    from dmde.report.claims import claims
    from dmde.report.results import RowResult

    def rr(name, **models):  # top-1 per seed of each model
        seeds = {s for v in models.values() for s in v}
        return RowResult(name, {s: Path(name) for s in seeds},
                         {s: {m: {"top1": v[s]} for m, v in models.items() if s in v} for s in seeds})

    res = {"mixture": rr("mixture", mixture={0: 0.545, 1: 0.540}, mixture_nway={0: 0.540, 1: 0.541},
                         flat={0: 0.51, 1: 0.52}),
           "ensemble": rr("ensemble", flat_ensemble={0: 0.55}),  # its own row, one seed
           "finetune_all": rr("finetune_all", mixture={0: 0.535, 1: 0.534}),
           "no_pool_temperature": rr("no_pool_temperature", mixture={0: 0.55}, mixture_nway={0: 0.53}),
           "wider_groups": rr("wider_groups", mixture={0: 0.55}, flat={0: 0.51}),
           "wider_natural": rr("wider_natural", mixture={0: 0.54}, flat={0: 0.51}),
           "distill": rr("distill", mixture={0: 0.555, 1: 0.548}, flat={0: 0.51, 1: 0.52}),
           "distill_label": rr("distill_label", mixture={0: 0.56}, flat={0: 0.51}),
           "sixteen_experts": rr("sixteen_experts", mixture={0: 0.552}, flat={0: 0.51})}
    lines = {ln.split(" | ")[0][2:]: ln for ln in claims(res, "mixture", []) if ln.startswith("| ")}
    assert "| 2.75 ± 1.06 |" in lines["mixture > flat"]  # +3.5 and +2.0
    ens = lines["mixture > ensemble of G flat models (equal compute)"]
    assert "| mixture:mixture | ensemble:flat_ensemble | -0.50 |" in ens  # paired on seed 0, the one it has
    ft = lines["fine-tuning on the fusion split > on every training image (mixture > finetune_all)"]
    assert "| mixture:mixture | finetune_all:mixture | 0.80 ± 0.28 |" in ft and ft.endswith("| holds |")  # +1.0, +0.6
    assert lines["end-to-end fine-tuning helps (Eq. 11 > Eq. 10)"].endswith(
        "| holds on average (1/2 seeds) |")  # +0.5, −0.1
    wider = lines["each class in 4 of the 8 experts > in 6 (M = 150, not-in-group 1:1) (mixture > wider_groups)"]
    assert "| -0.50 |" in wider and wider.endswith("| does not hold |")  # only seed 0 is paired
    tau = lines["τ before the N-way layer helps (mixture > no_pool_temperature)"]
    assert "| -0.50 |" in tau and tau.endswith("| does not hold |")
    tau_nway = lines["τ before the N-way layer helps the N-way layer (mixture > no_pool_temperature)"]
    assert "| mixture:mixture_nway | no_pool_temperature:mixture_nway | 1.00 |" in tau_nway
    assert not any("eq7" in k for k in lines)  # a step without its row is left out
    natural = lines["not-in-group images at their natural share > 1:1 (wider_natural > wider_groups)"]
    assert "| -1.00 |" in natural and natural.endswith("| does not hold |")
    kd = lines["the flat model's soft targets help the experts (distill > mixture)"]  # the addition is a, not b
    assert "| distill:mixture | mixture:mixture | 0.90 ± 0.14 |" in kd and kd.endswith("| holds |")  # +1.0, +0.8
    assert "| distill:mixture | distill:flat | 3.65 ± 1.20 |" in lines["distilled mixture > flat"]  # +4.5, +2.8
    label = lines["an in-group image's soft target without not-in-group mass helps (distill_label > distill)"]
    assert "| distill_label:mixture | distill:mixture | 0.50 |" in label and label.endswith("| holds (one seed) |")
    wide = lines["16 experts at half the steps (each class in 8) > 8 at the flat model's steps (in 4) "
                 "(sixteen_experts > mixture)"]
    assert "| sixteen_experts:mixture | mixture:mixture | 0.70 |" in wide  # seed 0: 55.2 − 54.5
    assert "| sixteen_experts:mixture | sixteen_experts:flat | 4.20 |" in lines["16 experts' mixture > flat"]
