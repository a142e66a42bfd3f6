"""``dmde ontology build|show`` and ``dmde groups``, run in-process."""
from __future__ import annotations

import numpy as np
import pytest
from wn_toy import make_toy_wordnet

from dmde.cli.main import main
from dmde.hierarchy.groups import TaskGroups
from dmde.hierarchy.ontology import Ontology

TOY = {
    "entity": [],
    "animal": ["entity"],
    "canine": ["animal"],
    "dog": ["canine"], "wolf": ["canine"], "fox": ["canine"],
    "feline": ["animal"],
    "cat": ["feline"], "lion": ["feline"], "tiger": ["feline"],
    "artifact": ["entity"],
    "vehicle": ["artifact"],
    "car": ["vehicle"], "bus": ["vehicle"], "truck": ["vehicle"],
}
LEAVES = ["dog", "wolf", "fox", "cat", "lion", "tiger", "car", "bus", "truck"]


@pytest.fixture()
def toy(tmp_path):
    ids = make_toy_wordnet(tmp_path / "wn", TOY)
    wnids = tmp_path / "classes.txt"
    wnids.write_text("# toy classes\n" + "".join(f"{ids[x]}  {x}\n" for x in LEAVES + ["canine"]))
    return tmp_path, ids, wnids


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmde: error: ") and "\n" not in err, err
    return err


def test_build_show_groups(toy, capsys):
    tmp, ids, wnids = toy
    out = tmp / "o.json"
    rc = main(["ontology", "build", "--wnids", str(wnids), "--out", str(out), "--categories", "3",
               "--seed", "1", "--wordnet", str(tmp / "wn")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "10 classes in 3 categories" in text
    assert "non-atomic classes: 1, kept" in text and ids["canine"] in text
    onto = Ontology.from_json(out)
    assert onto.params["random_state"] == 1 and onto.non_atomic == [ids["canine"]]

    assert main(["ontology", "show", str(out), "--plot", str(tmp / "o.png")]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("root (semantic, 10 classes, 3 categories")
    assert "vehicle" in shown and f"{ids['lion']}  lion" in shown
    assert (tmp / "o.png").read_bytes()[:4] == b"\x89PNG"

    g = tmp / "g.json"
    assert main(["groups", "--ontology", str(out), "--size", "4", "--overlap", "0.5", "--out", str(g)]) == 0
    printed = capsys.readouterr().out
    assert "groups per class: min 2, max 2" in printed
    tg = TaskGroups.from_json(g)
    tg.validate(onto)
    assert tg.size == 4 and tg.overlap == 0.5 and tg.assignment == "semantic"

    assert main(["groups", "--ontology", str(out), "--size", "4", "--overlap", "0.2", "--assignment",
                 "random", "--seed", "3", "--out", str(g)]) == 0
    assert TaskGroups.from_json(g).random_state == 3


def test_drop_non_atomic(toy, capsys):
    tmp, ids, wnids = toy
    out = tmp / "o.json"
    assert main(["ontology", "build", "--wnids", str(wnids), "--out", str(out), "--drop-non-atomic",
                 "--wordnet", str(tmp / "wn")]) == 0
    assert "dropped" in capsys.readouterr().out
    onto = Ontology.from_json(out)
    assert onto.dropped == [ids["canine"]] and onto.n_classes == 9


def test_visual_tree_and_visual_assignment(toy, capsys):
    tmp, ids, _ = toy
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(3), 3)
    feats = rng.normal(size=(3, 8))[truth] * 4 + rng.normal(size=(9, 8)) * 0.05
    npz = tmp / "f.npz"
    np.savez(npz, features=feats, wnids=np.array([ids[x] for x in LEAVES]))
    vis = tmp / "v.json"
    assert main(["ontology", "build", "--features", str(npz), "--out", str(vis), "--categories", "3",
                 "--kernel", "rbf", "--wordnet", str(tmp / "wn")]) == 0
    v = Ontology.from_json(vis)
    assert v.kind == "visual" and sorted(c.name for c in v.categories) == ["canine", "feline", "vehicle"]

    sem = tmp / "s.json"
    leaves = tmp / "leaves.txt"
    leaves.write_text("".join(f"{ids[x]}\n" for x in LEAVES))
    assert main(["ontology", "build", "--wnids", str(leaves), "--out", str(sem),
                 "--wordnet", str(tmp / "wn")]) == 0
    g = tmp / "g.json"
    assert main(["groups", "--ontology", str(sem), "--size", "3", "--overlap", "0", "--assignment", "visual",
                 "--visual-ontology", str(vis), "--out", str(g)]) == 0
    assert TaskGroups.from_json(g).assignment == "visual"
    capsys.readouterr()
    # visual assignment without the visual tree is a one-line error
    assert main(["groups", "--ontology", str(sem), "--size", "3", "--overlap", "0", "--assignment", "visual",
                 "--out", str(g)]) == 2
    assert "visual ontology" in one_line_error(capsys)


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["--categories", "50"], "K=50 must be between 1 and N=10"),
        (["--categories", "0"], "K=0"),
    ],
)
def test_build_errors(toy, capsys, argv, culprit):
    tmp, _, wnids = toy
    rc = main(["ontology", "build", "--wnids", str(wnids), "--out", str(tmp / "o.json"),
               "--wordnet", str(tmp / "wn"), *argv])
    assert rc == 2
    assert culprit in one_line_error(capsys)


def test_missing_and_bad_inputs(toy, capsys):
    tmp, _, wnids = toy
    assert main(["ontology", "show", str(tmp / "nope.json")]) == 2
    assert "nope.json" in one_line_error(capsys)
    bad = tmp / "bad.txt"
    bad.write_text("n0000x001\n")
    assert main(["ontology", "build", "--wnids", str(bad), "--out", str(tmp / "o.json"),
                 "--wordnet", str(tmp / "wn")]) == 2
    assert "n0000x001" in one_line_error(capsys)
    assert main(["ontology", "build", "--wnids", str(wnids), "--out", str(tmp / "o.json"),
                 "--wordnet", str(tmp / "no-wordnet")]) == 2
    assert "no-wordnet" in one_line_error(capsys)
    out = tmp / "o.json"
    assert main(["ontology", "build", "--wnids", str(wnids), "--out", str(out), "--wordnet", str(tmp / "wn")]) == 0
    for overlap, size, culprit in [("1.0", "4", "overlap λ=1.0"), ("0.5", "0", "M=0")]:
        assert main(["groups", "--ontology", str(out), "--size", size, "--overlap", overlap,
                     "--out", str(tmp / "g.json")]) == 2
        assert culprit in one_line_error(capsys)
    npz = tmp / "f.npz"
    np.savez(npz, feats=np.zeros((2, 2)))
    assert main(["ontology", "build", "--features", str(npz), "--out", str(out)]) == 2
    assert "'features' and 'wnids'" in one_line_error(capsys)


def test_mismatched_groups_refused(toy, capsys):
    tmp, ids, wnids = toy
    a, b = tmp / "a.json", tmp / "b.json"
    common = ["--wnids", str(wnids), "--wordnet", str(tmp / "wn")]
    assert main(["ontology", "build", *common, "--out", str(a), "--categories", "2"]) == 0
    assert main(["ontology", "build", *common, "--out", str(b), "--categories", "4"]) == 0
    assert main(["groups", "--ontology", str(a), "--size", "4", "--overlap", "0", "--out", str(tmp / "g.json")]) == 0
    from dmde.core.errors import MismatchError

    with pytest.raises(MismatchError):
        TaskGroups.from_json(tmp / "g.json").validate(Ontology.from_json(b))


@pytest.mark.parametrize("argv", [["ontology", "build", "--help"], ["ontology", "show", "--help"],
                                  ["groups", "--help"]])
def test_help_documents_options(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in {"build": ["--wnids", "--features", "--out", "--categories", "--seed", "--drop-non-atomic",
                          "--wordnet"],
                "show": ["--plot"],
                "groups": ["--ontology", "--size", "--overlap", "--assignment", "--visual-ontology", "--seed",
                           "--out"]}[argv[-2] if argv[0] == "ontology" else "groups"]:
        assert opt in text


def test_bundled_fashion_mnist(real_wordnet_dir, tmp_path, capsys):
    out = tmp_path / "fm.json"
    assert main(["ontology", "build", "--out", str(out), "--wordnet", str(real_wordnet_dir)]) == 0
    text = capsys.readouterr().out
    assert "10 classes in 3 categories" in text and "n04197391" in text
    onto = Ontology.from_json(out)
    assert onto.params["source"].startswith("bundled")
