"""The not-in-group sampler (docs/METHOD.md, "Experts"): counts, spread over outside classes, per-epoch redraws."""
from __future__ import annotations

import numpy as np
import pytest

from dmde.core.errors import DmdeValueError
from dmde.data.group_view import GroupView, group_labels

# 7 classes of uneven size; class c has 10 + c images, interleaved in the dataset.
SIZES = [10 + c for c in range(7)]
TARGETS = np.random.default_rng(0).permutation(np.repeat(np.arange(7), SIZES))


def _outside_counts(view: GroupView) -> dict[int, int]:
    out = view.indices[view.labels == view.not_in_group_label]
    return {int(c): int((TARGETS[out] == c).sum()) for c in view.outside_classes}


def test_in_group_labels_follow_group_order():
    view = GroupView(TARGETS, [4, 1], ratio=1.0, seed=0)
    assert view.num_classes == 3 and view.not_in_group_label == 2
    inside = view.labels < 2
    assert set(TARGETS[view.indices[inside & (view.labels == 0)]]) == {4}
    assert set(TARGETS[view.indices[inside & (view.labels == 1)]]) == {1}
    assert inside.sum() == SIZES[4] + SIZES[1]  # every in-group image, once
    assert len(set(view.indices[inside].tolist())) == inside.sum()


@pytest.mark.parametrize("ratio", [1.0, 0.5, 2.0, 0.37])
def test_not_in_group_count_and_floor_ceil_spread(ratio):
    group = [0, 3]
    n_in = SIZES[0] + SIZES[3]  # 23
    view = GroupView(TARGETS, group, ratio=ratio, seed=1)
    count = round(ratio * n_in)
    assert view.not_in_group_count == count
    for epoch in range(3):
        view.set_epoch(epoch)
        counts = _outside_counts(view)
        assert set(counts) == {1, 2, 4, 5, 6}
        assert sum(counts.values()) == count
        lo, hi = count // 5, -(-count // 5)
        assert all(v in (lo, hi) for v in counts.values())
        assert sum(v == hi for v in counts.values()) == (count % 5 if hi != lo else 5)


def test_without_replacement_when_possible_and_with_it_otherwise():
    view = GroupView(TARGETS, [6], ratio=1.0, seed=0)  # 16 in-group → 16 outside over 6 classes
    out = view.indices[view.labels == 1]
    assert len(out) == len(set(out.tolist())) == 16
    # Ratio 10: 160 outside images over 6 classes of 10..15 images → quotas 26/27 exceed them.
    big = GroupView(TARGETS, [6], ratio=10.0, seed=0)
    counts = _outside_counts(big)
    assert sorted(set(counts.values())) == [26, 27] and sum(counts.values()) == 160
    out = big.indices[big.labels == 1]
    for c in big.outside_classes:  # every image of a too-small class appears at least once
        assert set(np.flatnonzero(TARGETS == c)) <= set(out.tolist())


def test_epoch_redraw_is_deterministic():
    a = GroupView(TARGETS, [2, 5], seed=3)
    b = GroupView(TARGETS, [2, 5], seed=3)
    e1 = a.set_epoch(1)
    assert e1 == b.set_epoch(1)
    assert e1 != a.set_epoch(2)
    assert a.set_epoch(1) == e1  # back to epoch 1: same draw
    assert GroupView(TARGETS, [2, 5], seed=4).set_epoch(1) != e1
    assert all(isinstance(i, int) and isinstance(l, int) for i, l in e1)


def test_ratio_zero_and_no_outside_classes():
    assert len(GroupView(TARGETS, [0], ratio=0.0)) == SIZES[0]
    everything = GroupView(TARGETS, list(range(7)))
    assert everything.not_in_group_count == 0 and len(everything) == len(TARGETS)
    with pytest.raises(DmdeValueError):
        GroupView(TARGETS, [1, 1])
    with pytest.raises(DmdeValueError):
        GroupView(TARGETS, [1], ratio=-1)


def test_group_labels_for_evaluation():
    labels = group_labels([0, 1, 2, 3, 2, 9], [2, 0])
    assert labels.tolist() == [1, 2, 0, 2, 0, 2]


