"""Classes that are not WordNet nouns: ontology.source visual | taxonomy (a child<TAB>parent file)."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmde.cli.main import main
from dmde.core.errors import DmdeFileError, DmdeValueError
from dmde.hierarchy.ontology import Ontology, OntologyBuilder
from dmde.hierarchy.taxonomy import build_taxonomy_ontology, read_taxonomy, taxonomy_affinity, two_layer_distances
from dmde.run.config import OntologyConfig, RunConfig, validate
from dmde.run.stages import stage_hashes

#: Names no WordNet holds; two parents.
CLASSES = ["zorblax", "quibbit", "flarnish", "snorfle"]
TAXONOMY = "# made-up gadgets\nquibbit\tspinners\nzorblax\tclickers\n\nsnorfle clickers\nflarnish\tspinners\n"


def _taxonomy(tmp: Path, text: str = TAXONOMY) -> Path:
    p = tmp / "taxonomy.tsv"
    p.write_text(text)
    return p


def test_a_taxonomy_gives_one_category_per_parent_in_file_order(tmp_path):
    parents = read_taxonomy(_taxonomy(tmp_path), CLASSES)
    assert parents == {"quibbit": "spinners", "zorblax": "clickers", "snorfle": "clickers", "flarnish": "spinners"}
    onto = build_taxonomy_ontology(parents)
    assert onto.kind == "taxonomy"
    assert [c.name for c in onto.categories] == ["spinners", "clickers"]  # first appearance first
    assert onto.classes == ["quibbit", "flarnish", "zorblax", "snorfle"]  # siblings contiguous, file order
    assert onto.category == [0, 0, 1, 1] and onto.lemmas == onto.classes
    assert Ontology.from_dict(onto.to_dict()) == onto  # survives its JSON
    with pytest.raises(DmdeValueError, match="names 2 parents"):
        build_taxonomy_ontology(parents, n_categories=3)


@pytest.mark.parametrize("text, culprit", [
    ("quibbit\tspinners\nzorblax\tclickers\nsnorfle\tclickers\n", "class 'flarnish' is not in taxonomy"),
    (TAXONOMY + "gizmo\tclickers\n", "names class 'gizmo', which is not one of the run's 4 classes"),
    (TAXONOMY + "zorblax\tspinners\n", "class 'zorblax' is already given a parent on line 3"),
    ("quibbit\tspinners\tthird\n", "line 1 of taxonomy taxonomy.tsv: expected 'child<TAB>parent'"),
    (TAXONOMY.replace("snorfle clickers", "snorfle zorblax"), "parent 'zorblax' of 'snorfle' is itself a class"),
])
def test_a_bad_taxonomy_is_one_line_naming_the_culprit(tmp_path, text, culprit):
    with pytest.raises(DmdeValueError) as err:
        read_taxonomy(_taxonomy(tmp_path, text), CLASSES)
    assert culprit in str(err.value) and "\n" not in str(err.value)


def test_the_taxonomy_affinity_is_eq1_on_the_two_layer_tree():
    cat = [0, 0, 1, 1, 1]
    d = two_layer_distances(cat)
    assert d.tolist() == [[0, 2, 4, 4, 4], [2, 0, 4, 4, 4], [4, 4, 0, 2, 2], [4, 4, 2, 0, 2], [4, 4, 2, 2, 0]]
    psi = taxonomy_affinity(cat)  # H = 2: ψ = −log(D / 4), D = edges + 1, clamped at 0
    assert psi[0, 0] == pytest.approx(np.log(4)) and psi[0, 1] == pytest.approx(np.log(4 / 3)) and psi[0, 2] == 0
    # spectral clustering of that Ψ finds the parents again (a block-diagonal affinity)
    labels = OntologyBuilder(2, random_state=0).fit(psi, list("abcde")).labels_
    assert len(set(labels[:2])) == 1 and len(set(labels[2:])) == 1 and labels[0] != labels[2]


def test_the_default_source_leaves_every_stage_hash_alone_and_a_taxonomy_enters_by_content(tmp_path):
    base = stage_hashes(RunConfig())
    tax = _taxonomy(tmp_path)
    cfg = RunConfig(ontology=OntologyConfig(source="taxonomy", taxonomy=str(tax)))
    a = stage_hashes(cfg)
    assert a["ontology"] != base["ontology"] and a["groups"] != base["groups"]
    tax.write_text(TAXONOMY.replace("snorfle clickers", "snorfle spinners"))
    assert stage_hashes(cfg)["ontology"] != a["ontology"]  # an edited file redoes the ontology
    visual = stage_hashes(RunConfig(ontology=OntologyConfig(source="visual")))
    assert visual["ontology"] != base["ontology"]
    assert stage_hashes(replace(RunConfig(), ontology=OntologyConfig(source="wordnet"))) == base


@pytest.mark.parametrize("over, error, culprit", [
    ({"source": "taxonomy"}, DmdeValueError, "ontology.source='taxonomy' needs ontology.taxonomy=FILE"),
    ({"taxonomy": "t.tsv"}, DmdeValueError, "is read only with ontology.source=taxonomy"),
    ({"source": "taxonomy", "taxonomy": "nope.tsv"}, DmdeFileError, "taxonomy file nope.tsv does not exist"),
    ({"source": "synsets"}, DmdeValueError, "ontology.source='synsets' is not one of wordnet, visual, taxonomy"),
])
def test_ontology_source_settings_are_checked_before_any_work(over, error, culprit):
    with pytest.raises(error, match=culprit):
        validate(RunConfig(ontology=OntologyConfig(**over)))


def _image_folder(root: Path, classes, per_class: int = 10, size: int = 12) -> None:
    """One colour per class (easy to tell apart), a little noise per image."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        colour = np.array([(60 * c) % 256, 255 - 50 * c, (120 + 70 * c) % 256])
        for i in range(per_class):
            img = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")


#: The smallest whole run: 2 experts of 2 classes, one epoch each, no fine-tuning.
TINY_RUN = ["data.dataset=imagefolder", "data.image_size=12", "data.holdout_per_class=3", "data.fusion_per_class=2",
            "experts.backbone=small_cnn", "experts.backbone_kwargs={width: 4}", "experts.epochs=1",
            "experts.batch_size=8", "experts.similarity_per_class=2", "groups.size=2", "groups.overlap=0",
            "fusion.epochs=1", "fusion.finetune.epochs=0", "baselines.epochs=1", "progress=false"]


@pytest.mark.slow  # a whole run: about 15 s each on 2 busy cores
@pytest.mark.parametrize("source", ["taxonomy", "visual"])
def test_dmde_train_on_an_image_folder_of_names_no_wordnet_holds(tmp_path, source, capsys):
    _image_folder(tmp_path / "images", CLASSES)
    run = tmp_path / "run"
    extra = (["ontology.source=taxonomy", f"ontology.taxonomy={_taxonomy(tmp_path)}"] if source == "taxonomy"
             else ["ontology.source=visual", "ontology.categories=2", "groups.visual_backbone=small_cnn",
                   "groups.visual_per_class=4"])
    argv = ["train", "--device", "cpu", "--out", str(run), f"data.root={tmp_path / 'images'}", *TINY_RUN, *extra]
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "flat epoch 1/1:" in err and "eval flat: 12 images" in err  # a line per epoch, per model evaluated
    if importlib.util.find_spec("tensorboard") is not None:  # event files beside the JSONL logs, by default
        assert list((run / "flat.tb").glob("events.out.tfevents.*"))
        assert list((run / "experts" / "expert_000.tb").glob("events.out.tfevents.*"))
    onto = Ontology.from_json(run / "ontology.json")
    assert sorted(onto.classes) == sorted(CLASSES) and onto.n_categories == 2
    assert onto.kind == ("taxonomy" if source == "taxonomy" else "visual")
    if source == "taxonomy":
        assert onto.classes == ["quibbit", "flarnish", "zorblax", "snorfle"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mixture_nway"]["n_images"] == 12 and 0 <= metrics["mixture_nway"]["top1"] <= 1
    # mistakes are measured in the taxonomy (3: a sibling, 5: another parent); a visual tree has none
    assert ("mistake_distance" in metrics["flat"]) == (source == "taxonomy")
    assert json.loads((run / "data.json").read_text())["classes"] == sorted(CLASSES)


def test_a_taxonomy_that_misses_a_class_of_the_folder_stops_the_run_with_one_line(tmp_path, capsys):
    _image_folder(tmp_path / "images", CLASSES, per_class=4)
    tax = _taxonomy(tmp_path, "quibbit\tspinners\nzorblax\tclickers\nsnorfle\tclickers\n")
    argv = ["train", "--device", "cpu", "--out", str(tmp_path / "run"), f"data.root={tmp_path / 'images'}", *TINY_RUN,
            "data.holdout_per_class=1", "data.fusion_per_class=0", "ontology.source=taxonomy",
            f"ontology.taxonomy={tax}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "class 'flarnish' is not in taxonomy taxonomy.tsv" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "ontology.json").exists()

