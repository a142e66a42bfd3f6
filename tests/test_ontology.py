"""Two-layer ontology (§III): spectral clustering, left-to-right order, names, JSON."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score
from wn_toy import make_toy_wordnet

from dmde.core.errors import DmdeValueError
from dmde.hierarchy.ontology import (
    Category,
    Ontology,
    OntologyBuilder,
    build_semantic_ontology,
    build_visual_ontology,
)
from dmde.hierarchy.spectral import (
    EXACT_EIGH_MAX_N,
    default_n_categories,
    left_to_right_order,
    spectral_categories,
    visual_affinity,
)
from dmde.hierarchy.wordnet import WordNet


def block_affinity(sizes, noise=0.05, seed=0, shuffle=True):
    """Block-diagonal affinity (1 inside a block, small noise outside), rows shuffled."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    if shuffle:
        truth = truth[rng.permutation(truth.size)]
    a = noise * rng.random((truth.size, truth.size))
    a = (a + a.T) / 2
    a[truth[:, None] == truth[None, :]] = 1.0
    return a.astype(np.float32), truth


def is_contiguous(labels_in_order) -> bool:
    lab = np.asarray(labels_in_order)
    changes = np.flatnonzero(np.diff(lab)) + 1
    starts = np.concatenate([[0], changes])
    return np.unique(lab[starts]).size == starts.size


@pytest.mark.parametrize(
    "n, expected", [(1, 1), (2, 1), (10, 3), (200, 14), (7756, 388), (21841, 1092)]
)
def test_default_k(n, expected):
    assert default_n_categories(n) == expected
    assert 1 <= default_n_categories(n) <= n


@pytest.mark.parametrize(
    "sizes, n_components",
    [
        ([5, 7, 9, 4], None),  # exact eigh, p = K
        ([20] * 12 + [7, 3], 6),  # p < K: random projection of the leading eigenspace
        ([40] * 35 + [60, 100, 13], None),  # N > EXACT_EIGH_MAX_N: subspace iteration, p = K
    ],
)
def test_block_diagonal_recovered_and_contiguous(sizes, n_components):
    a, truth = block_affinity(sizes)
    k = len(sizes)
    if sum(sizes) > 1000:
        assert sum(sizes) > EXACT_EIGH_MAX_N
    labels = spectral_categories(a, k, random_state=0, n_components=n_components)
    assert adjusted_rand_score(truth, labels) == 1.0
    order, new = left_to_right_order(a, labels)
    assert sorted(order.tolist()) == list(range(a.shape[0]))
    assert is_contiguous(truth[order])
    assert np.all(np.diff(new[order]) >= 0)  # categories numbered left to right


def test_deterministic_for_a_seed():
    a, _ = block_affinity([8] * 10, noise=0.6)
    l1 = spectral_categories(a, 10, random_state=3)
    l2 = spectral_categories(a, 10, random_state=3)
    assert np.array_equal(l1, l2)
    b1 = OntologyBuilder(4, random_state=1).fit(a, [f"c{i}" for i in range(80)])
    b2 = OntologyBuilder(4, random_state=1).fit(a, [f"c{i}" for i in range(80)])
    assert b1.ontology_ == b2.ontology_


def test_k_edge_cases():
    a, _ = block_affinity([3, 3])
    assert spectral_categories(a, 1).tolist() == [0] * 6
    assert sorted(spectral_categories(a, 6).tolist()) == list(range(6))
    # K larger than the number of distinct embedding rows still yields K non-empty categories.
    labels = spectral_categories(block_affinity([3, 3], noise=0.0)[0], 4)
    assert np.unique(labels).size == 4


@pytest.mark.parametrize("k", [0, -1, 7])
def test_bad_k(k):
    a, _ = block_affinity([3, 3])
    with pytest.raises(DmdeValueError, match=rf"K={k} must be between 1 and N=6"):
        spectral_categories(a, k)


def test_bad_affinity():
    with pytest.raises(DmdeValueError, match="square"):
        spectral_categories(np.ones((3, 4)), 2)
    neg = np.ones((4, 4))
    neg[2, 1] = -0.5
    with pytest.raises(DmdeValueError, match="non-negative.*row 2"):
        spectral_categories(neg, 2)
    nan = np.ones((4, 4))
    nan[1, 1] = np.nan
    with pytest.raises(DmdeValueError, match="non-finite"):
        spectral_categories(nan, 2)


def test_similar_categories_are_neighbours():
    # Four blocks; 0~2 and 1~3 are related, so the left-to-right order pairs them up.
    sizes = [6, 6, 6, 6]
    a, truth = block_affinity(sizes, noise=0.01, shuffle=False)
    related = {(0, 2), (2, 0), (1, 3), (3, 1)}
    for i in range(24):
        for j in range(24):
            if (truth[i], truth[j]) in related:
                a[i, j] = 0.5
    order, new = left_to_right_order(a, truth)
    seq = [truth[order][0]] + [t for p, t in zip(truth[order], truth[order][1:]) if t != p]
    assert len(seq) == 4
    assert {frozenset(seq[:2]), frozenset(seq[2:])} == {frozenset({0, 2}), frozenset({1, 3})}


def test_builder_and_json_round_trip(tmp_path):
    a, truth = block_affinity([4, 5, 6])
    ids = [f"n{i:08d}" for i in range(15)]
    names = [f"class{i}" for i in range(15)]
    b = OntologyBuilder(n_categories=3, random_state=0).fit(a, ids, names)
    assert b.n_categories_ == 3 and b.labels_.shape == (15,) and sorted(b.order_) == list(range(15))
    onto = b.ontology_
    assert onto.classes == [ids[i] for i in b.order_]
    assert onto.lemmas == [names[i] for i in b.order_]
    assert all(np.diff(onto.category) >= 0)
    assert onto.params["n_categories"] == 3 and onto.params["random_state"] == 0
    # every category's name is one of its own members (the most central one)
    for c in range(3):
        assert onto.categories[c].name in [onto.lemmas[p] for p in onto.members(c)]
    path = tmp_path / "o.json"
    onto.to_json(path)
    back = Ontology.from_json(path)
    assert back == onto and back.hash() == onto.hash()
    assert back.position(ids[4]) == onto.classes.index(ids[4])
    assert back.positions(ids[:3]).tolist() == [onto.classes.index(w) for w in ids[:3]]
    with pytest.raises(DmdeValueError, match="n99999999 is not in the ontology"):
        back.position("n99999999")


def test_hash_tracks_classes_and_categories():
    base = Ontology(["n1", "n2", "n3"], ["a", "b", "c"], [0, 0, 1], [Category("x"), Category("y")])
    same = Ontology(["n1", "n2", "n3"], ["a", "b", "c"], [0, 0, 1], [Category("x"), Category("y")],
                    params={"source": "elsewhere"})
    assert base.hash() == same.hash()
    assert base.hash() != Ontology(["n2", "n1", "n3"], ["b", "a", "c"], [0, 0, 1],
                                   [Category("x"), Category("y")]).hash()
    assert base.hash() != Ontology(["n1", "n2", "n3"], ["a", "b", "c"], [0, 1, 1],
                                   [Category("x"), Category("y")]).hash()


def test_ontology_refuses_bad_content(tmp_path):
    with pytest.raises(DmdeValueError, match="more than once"):
        Ontology(["n1", "n1"], ["a", "a"], [0, 0], [Category("x")])
    with pytest.raises(DmdeValueError, match="left-to-right"):
        Ontology(["n1", "n2", "n3"], ["a", "b", "c"], [1, 0, 1], [Category("x"), Category("y")])
    onto = Ontology(["n1", "n2"], ["a", "b"], [0, 1], [Category("x"), Category("y")])
    d = onto.to_dict()
    d["classes"][0]["wnid"] = "n7"
    with pytest.raises(DmdeValueError, match="edited"):
        Ontology.from_dict(d)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(DmdeValueError, match="not a dmde ontology"):
        Ontology.from_json(tmp_path / "bad.json")


def test_visual_ontology_recovers_feature_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    truth = np.repeat(np.arange(3), [4, 5, 6])
    feats = centres[truth] + rng.normal(size=(15, 16)) * 0.1
    wnids = [f"n{i:08d}" for i in range(15)]
    for kernel in ("cosine", "rbf"):
        onto = build_visual_ontology(feats, wnids, [f"c{i}" for i in range(15)], n_categories=3, kernel=kernel)
        assert onto.kind == "visual" and onto.params["kernel"] == kernel
        got = np.asarray(onto.category)[np.argsort([wnids.index(w) for w in onto.classes])]
        assert adjusted_rand_score(truth, got) == 1.0
    a = visual_affinity(feats, "rbf")
    assert a.dtype == np.float32 and np.allclose(np.diagonal(a), 1) and (a >= 0).all()
    with pytest.raises(DmdeValueError, match="unknown kernel 'poly'"):
        visual_affinity(feats, "poly")
    with pytest.raises(DmdeValueError, match="N=3 rows"):
        build_visual_ontology(feats, wnids[:3])


TOY = {
    "entity": [],
    "animal": ["entity"],
    "canine": ["animal"],
    "dog": ["canine"], "wolf": ["canine"], "fox": ["canine"], "jackal": ["canine"],
    "feline": ["animal"],
    "cat": ["feline"], "lion": ["feline"], "tiger": ["feline"],
    "artifact": ["entity"],
    "vehicle": ["artifact"],
    "car": ["vehicle"], "bus": ["vehicle"], "truck": ["vehicle"], "tram": ["vehicle"],
}


@pytest.fixture()
def toy_wn(tmp_path):
    ids = make_toy_wordnet(tmp_path / "wn", TOY)
    return WordNet.load(tmp_path / "wn"), ids


def test_semantic_ontology_on_toy_wordnet(toy_wn):
    wn, ids = toy_wn
    leaves = ["dog", "wolf", "fox", "jackal", "cat", "lion", "tiger", "car", "bus", "truck", "tram"]
    onto = build_semantic_ontology(wn, [ids[x] for x in leaves], n_categories=3, random_state=0)
    assert sorted(c.name for c in onto.categories) == ["canine", "feline", "vehicle"]
    for c in onto.categories:
        assert c.wnid == ids[c.name]
    by_cat = {onto.categories[c].name: {onto.lemmas[p] for p in onto.members(c)} for c in range(3)}
    assert by_cat == {"canine": set(leaves[:4]), "feline": set(leaves[4:7]), "vehicle": set(leaves[7:])}
    # the two animal categories sit next to each other, the vehicles at one end
    names = [c.name for c in onto.categories]
    assert names.index("vehicle") in (0, 2)
    assert onto.non_atomic == [] and onto.dropped == []


def test_non_atomic_reported_and_dropped(toy_wn):
    wn, ids = toy_wn
    listed = [ids[x] for x in ["dog", "wolf", "canine", "cat", "lion", "car", "bus"]]
    kept = build_semantic_ontology(wn, listed, n_categories=2)
    assert kept.non_atomic == [ids["canine"]] and kept.dropped == []
    assert ids["canine"] in kept.classes
    dropped = build_semantic_ontology(wn, listed, n_categories=2, drop_non_atomic=True)
    assert dropped.dropped == [ids["canine"]] and ids["canine"] not in dropped.classes
    assert dropped.n_classes == 6


def test_semantic_errors(toy_wn):
    wn, ids = toy_wn
    with pytest.raises(DmdeValueError, match="K=5 must be between 1 and N=2"):
        build_semantic_ontology(wn, [ids["dog"], ids["cat"]], n_categories=5)
    with pytest.raises(DmdeValueError, match="n00000001"):
        build_semantic_ontology(wn, [ids["dog"], "n00000001"])


def test_fashion_mnist_on_real_wordnet(real_wordnet_dir):
    from importlib.resources import as_file, files

    from dmde.hierarchy.semantic import read_wnid_list

    with as_file(files("dmde").joinpath("resources/fashion_mnist_wnids.txt")) as p:
        wnids = read_wnid_list(p)
    onto = build_semantic_ontology(WordNet.load(real_wordnet_dir), wnids)
    assert onto.n_classes == 10 and onto.n_categories == 3
    assert sorted(onto.classes) == sorted(wnids)
    assert onto.non_atomic == ["n04197391"]  # shirt: the T-shirt is one
    footwear = {"n04133789", "n03472535", "n02872752"}  # sandal, sneaker, boot
    cats = {onto.category[onto.position(w)] for w in footwear}
    assert len(cats) == 1
