"""dmde.hierarchy.semantic: D, ψ (Eq. 1), non-atomic classes, WNID list files (docs/METHOD.md, "Semantic relationship").

Known answers: hand-computed distances on a toy hierarchy, a brute force on random DAGs, and NLTK's
``lch_similarity`` on real WordNet 3.0.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
from wn_toy import ANIMALS, make_toy_wordnet

from dmde.core.errors import DmdeFileError, DmdeValueError
from dmde.hierarchy.semantic import (
    non_atomic,
    psi_from_distances,
    read_wnid_list,
    semantic_relationship,
    shortest_path_distances,
)
from dmde.hierarchy.wordnet import WordNet, nltk_reader


@pytest.fixture()
def toy(tmp_path):
    ids = make_toy_wordnet(tmp_path / "dict", ANIMALS)
    return WordNet.load(tmp_path / "dict"), ids


# ---------------------------------------------------------------------- toy hierarchy
# (a, b, shortest edges) worked out by hand on wn_toy.ANIMALS
TOY_PAIRS = [
    ("dog", "cat", 4),  # dog→canine→carnivore←feline←cat
    ("dog", "goldfish", 2),  # via both second parents: dog→companion←goldfish (not 4 via animal)
    ("fido", "goldfish", 3),  # instance edge fido→dog, then as above
    ("fido", "cat", 5),
    ("fido", "dog", 1),
    ("dog", "idea", 3),  # dog→companion→abstraction←idea
    ("cat", "idea", 10),  # cat has no shortcut: up 8 to entity, down 2
    ("animal", "fido", 4),
    ("entity", "entity", 0),
]


def test_toy_distances_by_hand(toy):
    wn, ids = toy
    names = list(ANIMALS)
    D = shortest_path_distances(wn, [ids[n] for n in names], block_rows=3)
    assert D.dtype == np.uint8 and (D == D.T).all() and (np.diag(D) == 0).all()
    for a, b, d in TOY_PAIRS:
        assert D[names.index(a), names.index(b)] == d, (a, b)


def test_toy_psi(toy):
    wn, ids = toy
    names = ["dog", "cat", "goldfish", "fido", "idea"]
    psi = semantic_relationship(wn, [ids[n] for n in names])
    assert psi.dtype == np.float32 and psi.shape == (5, 5)
    H = wn.max_depth
    assert H == 9
    np.testing.assert_allclose(np.diag(psi), math.log(2 * H), rtol=0, atol=1e-6)  # D(c,c) = 1
    assert psi[0, 1] == pytest.approx(-math.log(5 / 18), abs=1e-6)
    assert psi[0, 2] == pytest.approx(-math.log(3 / 18), abs=1e-6)
    # Indices give the same as WNIDs; blocking does not change anything.
    idx = [wn.index(ids[n]) for n in names]
    np.testing.assert_array_equal(semantic_relationship(wn, idx, block_rows=1), psi)


def _brute_force(parents: dict[int, list[int]], a: int, b: int) -> int | None:
    def up(s):
        dist, q = {s: 0}, deque([s])
        while q:
            x = q.popleft()
            for p in parents[x]:
                if p not in dist:
                    dist[p] = dist[x] + 1
                    q.append(p)
        return dist

    da, db = up(a), up(b)
    common = da.keys() & db.keys()
    return min(da[c] + db[c] for c in common) if common else None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_dag_matches_brute_force(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n = 120
    n_roots = 1 if seed < 2 else 3  # seed 2: a forest, so some pairs have no path
    spec: dict[str, list[str]] = {}
    parents: dict[int, list[int]] = {}
    for k in range(n):
        if k < n_roots:
            parents[k] = []
        else:
            m = int(rng.integers(1, 4))
            # Parents among the recent nodes make long chains, among all nodes shortcuts.
            lo = max(0, k - 10) if rng.random() < 0.7 else 0
            parents[k] = sorted({int(p) for p in rng.integers(lo, k, size=m)})
        spec[f"s{k}"] = [("@i:" if rng.random() < 0.2 else "") + f"s{p}" for p in parents[k]]
    ids = make_toy_wordnet(tmp_path, spec)
    wn = WordNet.load(tmp_path)
    chosen = sorted(rng.choice(n, size=60, replace=False).tolist())
    D = shortest_path_distances(wn, [ids[f"s{k}"] for k in chosen], block_rows=7)
    no_path = np.iinfo(D.dtype).max
    for i, a in enumerate(chosen):
        for j, b in enumerate(chosen):
            want = _brute_force(parents, a, b)
            assert D[i, j] == (no_path if want is None else want), (a, b)
    psi = psi_from_distances(D, wn.max_depth)
    assert (psi[D == no_path] == 0).all() and (psi >= 0).all()
    if seed == 2:
        assert (D == no_path).any()


def test_psi_from_distances_values_and_clamp():
    H = 19
    d = np.array([[0, 4], [37, 38]], dtype=np.uint8)
    psi = psi_from_distances(d, H)
    assert psi.dtype == np.float32
    assert psi[0, 0] == pytest.approx(math.log(38), abs=1e-6)  # 3.6376
    assert psi[0, 1] == pytest.approx(2.0281, abs=1e-4)  # dog–cat
    assert psi[1, 0] == pytest.approx(0.0, abs=1e-6)  # D = 2H exactly
    assert psi[1, 1] == 0.0  # D > 2H: clamped
    for dt in (np.uint8, np.uint16, np.int32):  # the dtype's maximum means "no path"
        assert psi_from_distances(np.array([4, np.iinfo(dt).max], dtype=dt), H)[1] == 0.0
    f = psi_from_distances(np.array([4.0, np.inf]), H)
    assert f[0] == pytest.approx(2.0281, abs=1e-4) and f[1] == 0.0
    with pytest.raises(DmdeValueError):
        psi_from_distances(d, 0)


def test_non_atomic(toy):
    wn, ids = toy
    listed = ["dog", "animal", "cat", "fido", "idea", "companion"]
    # animal (dog, cat below), dog (fido below by an instance edge), companion (dog below).
    assert non_atomic(wn, [ids[n] for n in listed]) == [0, 1, 5]
    assert non_atomic(wn, [ids["cat"], ids["idea"]]) == []


def test_class_list_errors(toy):
    wn, ids = toy
    with pytest.raises(DmdeValueError, match="empty"):
        semantic_relationship(wn, [])
    with pytest.raises(DmdeValueError, match=r"duplicate WNID '%s'" % ids["cat"]):
        semantic_relationship(wn, [ids["cat"], ids["dog"], ids["cat"]])
    with pytest.raises(DmdeValueError, match=r"unknown WNID 'n99999999'"):
        shortest_path_distances(wn, [ids["cat"], "n99999999"])
    with pytest.raises(DmdeValueError, match=r"duplicate class '%s'" % ids["dog"]):
        non_atomic(wn, [wn.index(ids["dog"])] * 2)
    with pytest.raises(DmdeValueError, match="out of range"):
        semantic_relationship(wn, [0, 10_000])


# ---------------------------------------------------------------------- WNID list files
def test_read_wnid_list(tmp_path, toy):
    wn, ids = toy
    p = tmp_path / "wnids.txt"
    p.write_text(f"# classes\n\n{ids['cat']} cat, moggy\n  {ids['dog']}\t# a dog\n# end\n")
    assert read_wnid_list(p) == [ids["cat"], ids["dog"]]
    assert read_wnid_list(p, wn) == [ids["cat"], ids["dog"]]


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("{cat}\nn0144\n", r"malformed WNID 'n0144' \(line 2 of wnids.txt\)"),
        ("{cat}\n\nn99999999\n", r"unknown WNID 'n99999999' \(line 3 of wnids.txt\)"),
        ("{cat}\n{dog}\n{cat}\n", r"duplicate WNID '{cat}' \(line 3 of wnids.txt; first on line 1\)"),
        ("# nothing\n\n", r"holds no WNIDs"),
    ],
)
def test_read_wnid_list_errors(tmp_path, toy, text, pattern):
    wn, ids = toy
    p = tmp_path / "wnids.txt"
    p.write_text(text.format(**ids))
    with pytest.raises(DmdeValueError, match=pattern.format(**ids)):
        read_wnid_list(p, wn)


def test_read_wnid_list_missing(tmp_path):
    with pytest.raises(DmdeFileError, match="nope.txt"):
        read_wnid_list(tmp_path / "nope.txt")


# ---------------------------------------------------------------------- NLTK on real WordNet
@pytest.fixture(scope="module")
def real(real_wordnet_dir) -> WordNet:
    return WordNet.load(real_wordnet_dir)


@pytest.fixture(scope="module")
def nltk_wn(real_wordnet_dir, tmp_path_factory):
    pytest.importorskip("nltk")
    reader = nltk_reader(real_wordnet_dir, tmp_path_factory.mktemp("nltk_data"))
    # NLTK's own H (_compute_max_depth) walks all 82,115 synsets in ~15 s; pin the documented 19
    # here and check NLTK's computation in the slow test below.
    reader._max_depth[("n", False)] = 19
    return reader


def test_dog_cat_matches_nltk(real, nltk_wn):
    dog, cat = nltk_wn.synset("dog.n.01"), nltk_wn.synset("cat.n.01")
    psi = semantic_relationship(real, ["n02084071", "n02121620"])
    D = shortest_path_distances(real, ["n02084071", "n02121620"])
    assert D[0, 1] == dog.shortest_path_distance(cat) == 4
    assert psi[0, 1] == pytest.approx(dog.lch_similarity(cat), abs=1e-6)
    assert psi[0, 1] == pytest.approx(2.0281, abs=1e-4)
    assert psi[0, 0] == pytest.approx(dog.lch_similarity(dog), abs=1e-6)  # log 38


def test_random_pairs_match_nltk(real, nltk_wn):
    rng = np.random.default_rng(2024)
    chosen = rng.choice(real.n, size=400, replace=False)
    psi = semantic_relationship(real, chosen, block_rows=128)
    D = shortest_path_distances(real, chosen)
    synsets = [nltk_wn.synset_from_pos_and_offset("n", int(real.offsets[i])) for i in chosen]
    for a, b in rng.integers(0, chosen.size, size=(200, 2)):
        want = synsets[a].lch_similarity(synsets[b])
        assert D[a, b] == synsets[a].shortest_path_distance(synsets[b])
        pair = (real.wnid(chosen[a]), real.wnid(chosen[b]))
        assert psi[a, b] == pytest.approx(max(0.0, want), abs=1e-6), pair


@pytest.mark.slow
def test_max_depth_matches_nltk(real, nltk_wn):
    nltk_wn._max_depth.clear()
    assert nltk_wn._compute_max_depth("n", False) == real.max_depth == 19


@pytest.mark.shared
def test_imagenet_1k(real, shared_dir):
    wnids = read_wnid_list(shared_dir / "data" / "imagenet-wnids" / "imagenet_synsets.txt", real)
    assert len(wnids) == 1000
    psi = semantic_relationship(real, wnids)
    assert psi.shape == (1000, 1000) and (psi == psi.T).all()
    np.testing.assert_allclose(np.diag(psi), math.log(38), atol=1e-6)
    assert non_atomic(real, wnids) == []  # ImageNet-1K's classes are all leaves of one another
