"""Task groups (§IV-A, Fig. 3), pinned to docs/METHOD.md, "Groups"."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dmde.core.errors import DmdeValueError, MismatchError
from dmde.hierarchy.groups import TaskGroups, circular_groups, make_groups
from dmde.hierarchy.ontology import Category, Ontology


def flat_ontology(n: int, k: int = 10, prefix: int = 0) -> Ontology:
    return Ontology(
        classes=[f"n{prefix + i:08d}" for i in range(n)],
        lemmas=[f"c{i}" for i in range(n)],
        category=[i * k // n for i in range(n)],
        categories=[Category(f"cat{c}") for c in range(k)],
    )


def counts(groups, n):
    return np.bincount(np.concatenate(groups), minlength=n)


def test_paper_lambda_0_eight_groups():
    g = circular_groups(7756, 1000, 0.0)
    assert len(g) == 8
    assert {len(x) for x in g} == {969, 970}
    assert (counts(g, 7756) == 1).all()
    assert np.array_equal(np.sort(np.concatenate(g)), np.arange(7756))


def test_paper_lambda_half_sixteen_groups_each_class_twice():
    g = circular_groups(7756, 1000, 0.5)
    assert len(g) == 16
    assert (counts(g, 7756) == 2).all()
    assert max(len(x) for x in g) <= 1000
    # neighbours share half their classes
    assert len(set(g[0].tolist()) & set(g[1].tolist())) == pytest.approx(len(g[0]) / 2, abs=1)


@pytest.mark.parametrize("lam", [0.1, 0.2, 0.3, 0.4])
def test_fractional_overlap_floor_ceil(lam):
    g = circular_groups(7756, 1000, lam)
    c = counts(g, 7756)
    inv = 1 / (1 - lam)
    assert set(np.unique(c).tolist()) <= {math.floor(inv), math.ceil(inv)}
    assert max(len(x) for x in g) <= 1000
    assert len(g) == math.ceil(7756 / round(1000 * (1 - lam)))


@pytest.mark.parametrize("lam, c", [(2 / 3, 3), (0.75, 4)])
def test_whole_number_c(lam, c):
    g = circular_groups(7756, 1000, lam)
    assert (counts(g, 7756) == c).all() and max(len(x) for x in g) <= 1000


@pytest.mark.parametrize("n, m, lam", [(12, 11, 2 / 3), (10, 3, 0.5), (101, 10, 0.25), (50, 7, 0.0)])
def test_small_cases_bounded(n, m, lam):
    g = circular_groups(n, m, lam)
    assert max(len(x) for x in g) <= m
    assert counts(g, n).min() >= 1
    assert all(len(set(x.tolist())) == len(x) for x in g)


def test_n_at_most_m_is_one_group():
    g = circular_groups(10, 10, 0.5)
    assert len(g) == 1 and g[0].tolist() == list(range(10))


@pytest.mark.parametrize("lam", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_overlap(lam):
    with pytest.raises(DmdeValueError, match="overlap λ="):
        circular_groups(100, 10, lam)


@pytest.mark.parametrize("m", [0, -3])
def test_bad_size(m):
    with pytest.raises(DmdeValueError, match=f"M={m}"):
        circular_groups(100, m, 0.0)


def test_semantic_groups_follow_the_order_and_validate():
    onto = flat_ontology(100)
    tg = make_groups(onto, 30, 0.5)
    assert tg.ontology_hash == onto.hash() and tg.n_classes == 100
    assert tg.groups[0] == list(range(len(tg.groups[0])))
    for pos, ws in zip(tg.groups, tg.wnids):
        assert ws == [onto.classes[p] for p in pos]
    tg.validate(onto)
    cov = tg.coverage()
    assert cov["groups_per_class_min"] == cov["groups_per_class_max"] == 2
    assert cov["histogram"] == {2: 100}


def test_random_assignment_seeded():
    onto = flat_ontology(100)
    a = make_groups(onto, 30, 0.5, assignment="random", random_state=1)
    b = make_groups(onto, 30, 0.5, assignment="random", random_state=1)
    c = make_groups(onto, 30, 0.5, assignment="random", random_state=2)
    assert a.groups == b.groups and a.groups != c.groups
    assert (a.counts() == 2).all()
    assert a.groups != make_groups(onto, 30, 0.5).groups


def test_visual_assignment_walks_the_visual_order():
    onto = flat_ontology(20)
    rev = list(reversed(onto.classes))
    visual = Ontology(rev, list(reversed(onto.lemmas)), [0] * 20, [Category("v")], kind="visual")
    tg = make_groups(onto, 10, 0.0, assignment="visual", visual_ontology=visual)
    assert tg.groups[0] == list(range(19, 9, -1))
    assert tg.params["visual_ontology_hash"] == visual.hash()
    with pytest.raises(DmdeValueError, match="needs a visual ontology"):
        make_groups(onto, 10, 0.0, assignment="visual")
    other = flat_ontology(20, prefix=5)
    with pytest.raises(MismatchError, match="classes differ"):
        make_groups(onto, 10, 0.0, assignment="visual", visual_ontology=other)
    with pytest.raises(DmdeValueError, match="assignment 'tree'"):
        make_groups(onto, 10, 0.0, assignment="tree")


def test_json_round_trip_and_mismatch(tmp_path):
    onto = flat_ontology(50)
    tg = make_groups(onto, 20, 0.3, assignment="random", random_state=4)
    tg.to_json(tmp_path / "g.json")
    back = TaskGroups.from_json(tmp_path / "g.json")
    assert back == tg
    back.validate(onto)
    with pytest.raises(MismatchError, match="made for ontology"):
        back.validate(flat_ontology(50, k=5))
    forged = TaskGroups.from_dict({**tg.to_dict(), "ontology_hash": tg.ontology_hash})
    forged.wnids[0][0] = "n99999999"
    with pytest.raises(MismatchError, match="task group 0"):
        forged.validate(onto)
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(DmdeValueError, match="not a dmde task-groups file"):
        TaskGroups.from_json(tmp_path / "x.json")
