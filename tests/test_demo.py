"""`dmde demo` on a tiny configuration: every stage tells what it did, then the table and the next steps."""
from __future__ import annotations

import pytest

from dmde.cli.main import main

pytestmark = pytest.mark.slow  # runs the demo's pipeline

TINY = ["data.dataset=synthetic", "data.image_size=12", "data.synthetic_per_class=30", "data.max_per_class=null",
        "data.holdout_per_class=6", "data.fusion_per_class=4", "experts.epochs=2", "experts.batch_size=16",
        "experts.backbone_kwargs={width: 8}", "experts.similarity_per_class=4", "fusion.epochs=3",
        "fusion.finetune.epochs=1", "fusion.finetune.batch_size=32"]


def test_demo_prints_every_stage(tmp_path, capsys, real_wordnet_dir):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress", "--threads", "1", *TINY]) == 0
    text = capsys.readouterr().out
    for tag in ("[ontology]", "[groups]", "[experts]", "[fusion]", "[mixture]", "[flat]", "[evaluate]", "[result]"):
        assert tag in text, tag
    # the ontology names its categories' classes (Fashion-MNIST's WordNet lemmas), every expert has a line
    assert "sandal" in text or "sneaker" in text
    groups = text[text.index("[groups]"):text.index("[experts]")]
    experts = text[text.index("[experts]"):text.index("[fusion]")]
    n = sum(line.strip().startswith("expert ") for line in groups.splitlines())
    assert n >= 2 and sum(line.strip().startswith("expert ") for line in experts.splitlines()) == n
    assert "flat on its classes" in text  # the accounting: each expert beside the restricted flat model
    assert "| mixture |" in text and "| flat |" in text and "mixture − flat top-1" in text
    assert "thousands of classes" in text  # the honest sentence
    assert f"dmde evaluate {out}" in text and f"dmde predict {out}" in text
    assert (out / "metrics.json").is_file()  # --out keeps the run
    # a second run over the finished directory trains nothing and tells the same stages again
    assert main(["demo", "--out", str(out), "--no-progress", "--threads", "1", *TINY]) == 0
    again = capsys.readouterr().out
    assert all(tag in again for tag in ("[ontology]", "[experts]", "[evaluate]"))
