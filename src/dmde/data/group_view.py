"""A task group's view of a dataset: the training set of expert j (paper §IV-B; docs/METHOD.md, "Experts").

Expert j sees every image of its M_j classes, labelled 0..M_j−1 in the group's order, plus a
sample of images from the other classes labelled M_j ("not in group"). The paper gives no
ratio; by default there are as many not-in-group images as in-group ones, spread evenly over
the outside classes and drawn afresh each epoch from (seed, epoch), so every run is reproducible.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dmde.core.errors import DmdeValueError

__all__ = ["GroupView", "group_labels"]


def _check_group(group_classes: Sequence[int]) -> np.ndarray:
    g = np.asarray(list(group_classes), dtype=np.int64)
    if g.ndim != 1 or g.size == 0:
        raise DmdeValueError("a task group needs at least one class")
    if len(np.unique(g)) != len(g):
        raise DmdeValueError(f"task group lists a class twice: {g.tolist()}")
    if g.min() < 0:
        raise DmdeValueError(f"class ids must be >= 0, got {g.min()}")
    return g


def group_labels(targets: Sequence[int] | np.ndarray, group_classes: Sequence[int]) -> np.ndarray:
    """Every sample's group label: its class's position in the group, or M_j when outside it.

    For evaluating expert j on a whole dataset.
    """
    g = _check_group(group_classes)
    t = np.asarray(targets, dtype=np.int64)
    if t.size and t.min() < 0:
        raise DmdeValueError(f"targets must be class ids >= 0, got {t.min()}")
    lut = np.full(max(int(t.max(initial=-1)), int(g.max())) + 1, len(g), dtype=np.int64)
    lut[g] = np.arange(len(g))
    return lut[t]


class GroupView:
    """Per-epoch (dataset index, group label) pairs for one task group.

    ``group_classes``: class ids of the dataset (labels 0..M_j−1 in that order). The not-in-group
    count is ``round(ratio × in-group count)``; each outside class contributes floor or ceil of
    count / #outside (which classes get the extra one is drawn per epoch), without replacement
    within a class while it has enough images.
    """

    def __init__(
        self,
        dataset_targets: Sequence[int] | np.ndarray,
        group_classes: Sequence[int],
        ratio: float = 1.0,
        seed: int = 0,
    ) -> None:
        if ratio < 0:
            raise DmdeValueError(f"not-in-group ratio must be >= 0, got {ratio}")
        self.targets = np.asarray(dataset_targets, dtype=np.int64)
        self.group_classes = _check_group(group_classes)
        self.ratio, self.seed = float(ratio), int(seed)
        self.labels_all = group_labels(self.targets, self.group_classes)  # (n,)
        self.not_in_group_label = len(self.group_classes)  # M_j
        self.in_group = np.flatnonzero(self.labels_all < self.not_in_group_label)
        outside = self.labels_all == self.not_in_group_label
        self.outside_classes = np.unique(self.targets[outside])
        # Indices of each outside class, in dataset order.
        self._outside_by_class = [np.flatnonzero(self.targets == c) for c in self.outside_classes]
        n_out = int(round(self.ratio * len(self.in_group)))
        self.not_in_group_count = n_out if len(self.outside_classes) else 0
        self.epoch = -1
        self.indices = np.zeros(0, np.int64)
        self.labels = np.zeros(0, np.int64)
        self.set_epoch(0)

    @property
    def num_classes(self) -> int:
        """Outputs of expert j: M_j + 1."""
        return len(self.group_classes) + 1

    def quotas(self, epoch: int) -> np.ndarray:
        """Not-in-group images drawn from each outside class at ``epoch`` (floor or ceil)."""
        k = len(self.outside_classes)
        if k == 0:
            return np.zeros(0, np.int64)
        base, extra = divmod(self.not_in_group_count, k)
        q = np.full(k, base, dtype=np.int64)
        rng = np.random.default_rng([self.seed, int(epoch), 0])
        q[rng.choice(k, size=extra, replace=False)] += 1
        return q

    def set_epoch(self, epoch: int) -> list[tuple[int, int]]:
        """Redraw the not-in-group sample for ``epoch``; returns the epoch's (index, label) pairs.

        In-group samples come first in dataset order, then the not-in-group ones sorted by index.
        ``self.indices`` / ``self.labels`` hold the same as arrays.
        """
        rng = np.random.default_rng([self.seed, int(epoch), 1])
        picks = []
        for members, q in zip(self._outside_by_class, self.quotas(epoch)):
            if q <= len(members):
                picks.append(rng.choice(members, size=q, replace=False))
            else:  # a small class: take all of it, then repeat some
                picks.append(members)
                picks.append(rng.choice(members, size=q - len(members), replace=True))
        out = np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)
        self.epoch = int(epoch)
        self.indices = np.concatenate([self.in_group, out]).astype(np.int64)
        self.labels = np.concatenate(
            [self.labels_all[self.in_group], np.full(len(out), self.not_in_group_label, np.int64)]
        )
        return list(zip(self.indices.tolist(), self.labels.tolist()))

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return (f"GroupView(M={len(self.group_classes)}, in_group={len(self.in_group)}, "
                f"not_in_group={self.not_in_group_count}, epoch={self.epoch})")


