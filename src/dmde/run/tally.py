"""Evaluation as running counts, chunk by chunk of images: a model's top-k hits, per-class
accuracy and mistake distance (:class:`ScoreTally`), and the per-expert accounting
(:class:`ExpertTally`). Memory is then bounded by the chunk, not the split: at N = 10⁴ one score
matrix is 40 KB per image, a mixture's expert probabilities 84 KB per image at 21 experts of 1,000
classes (benchmarks/paper_scale.py). Chunks added in order give exactly the figures of one pass
over every image (a share is the float32 mean a 0/1 tensor gives; float sums are accumulated in
image order), which ``tests/test_pipeline.py`` checks.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dmde.core.errors import DmdeValueError
from dmde.fusion.calibration import calibration_error, calibration_sums
from dmde.fusion.stacking import group_slots

#: The k of the top-k accuracies every evaluation reports.
TOPK = (1, 2, 5, 10)
#: Bins of the φ calibration error.
ECE_BINS = 15


def share(count: int, n: int) -> float:
    """``count / n`` as the mean of a float32 0/1 tensor of ``n`` values gives it (NaN for n = 0)."""
    return float(torch.tensor(float(count)) / n) if n else float("nan")


def restricted_hits(scores: torch.Tensor, targets: torch.Tensor, cols: torch.Tensor, inside: torch.Tensor) -> int:
    """Images among ``inside`` whose argmax over the columns ``cols`` is their true class."""
    return int((cols[scores[inside][:, cols].argmax(1)] == targets[inside]).sum())


class ScoreTally:
    """Top-k hits, per-class correct and total counts, and the WordNet distance D (edges + 1) of the
    top-1 mistakes, of one model's score matrices (B, N) added chunk by chunk."""

    def __init__(self, n_classes: int, dist: np.ndarray | None = None, ks: Sequence[int] = TOPK) -> None:
        self.n_classes, self.dist, self.ks = n_classes, dist, tuple(ks)
        self.hits = [0] * len(self.ks)
        self.n = 0
        self.correct = torch.zeros(n_classes, dtype=torch.float64)
        self.total = torch.zeros(n_classes, dtype=torch.float64)
        self.distance_sum, self.mistakes = 0.0, 0

    def add(self, scores: torch.Tensor, targets: torch.Tensor) -> ScoreTally:
        if scores.shape[0] != targets.shape[0]:
            raise DmdeValueError(f"{scores.shape[0]} score rows for {targets.shape[0]} targets")
        n = scores.shape[1]
        top = scores.topk(min(max(self.ks), n), dim=1).indices  # (B, kmax)
        hit = top == targets.unsqueeze(1)
        for i, k in enumerate(self.ks):
            self.hits[i] += int(hit[:, : min(k, n)].any(1).sum())
        pred = scores.argmax(1)
        right = pred == targets
        self.correct += torch.bincount(targets[right], minlength=self.n_classes).double()
        self.total += torch.bincount(targets, minlength=self.n_classes).double()
        if self.dist is not None and not bool(right.all()):
            d = self.dist[targets[~right].numpy(), pred[~right].numpy()]
            self.distance_sum += float(np.sum(d + 1, dtype=np.float64))
            self.mistakes += int((~right).sum())
        self.n += int(targets.numel())
        return self

    def topk(self) -> dict[str, float]:
        return {f"top{k}": share(h, self.n) for k, h in zip(self.ks, self.hits)}

    def metrics(self) -> dict[str, float | int]:
        """Top-k accuracies, the mean mistake distance (with a distance matrix) and the image count."""
        m: dict[str, float | int] = dict(self.topk())
        if self.dist is not None:
            m["mistake_distance"] = self.distance_sum / self.mistakes if self.mistakes else float("nan")
        m["n_images"] = self.n
        return m

    def per_class(self) -> np.ndarray:
        """Top-1 accuracy of every class (NaN for a class without images)."""
        acc = (self.correct / self.total).numpy()
        acc[self.total.numpy() == 0] = np.nan
        return acc


class ExpertTally:
    """The per-expert accounting (:func:`dmde.run.evaluate.expert_accounting`) from padded expert
    probabilities P (B, G, Mmax+1) added chunk by chunk, with the flat model's scores (restricted to
    each group's classes) and the calibrated probabilities when the run has them."""

    def __init__(self, layout) -> None:
        self.layout = layout
        g = layout.n_groups
        self.inside = torch.zeros(g, dtype=torch.long)  # images of the group's classes
        self.group_correct = torch.zeros(g, dtype=torch.long)
        self.flat_correct = torch.zeros(g, dtype=torch.long)
        self.nig_outside = torch.zeros(g, dtype=torch.long)  # outside images called not-in-group
        self.nig_inside = torch.zeros(g, dtype=torch.long)
        self.ece = torch.zeros(g, 2, ECE_BINS, dtype=torch.float64)
        self.ece_calibrated = torch.zeros(g, 2, ECE_BINS, dtype=torch.float64)
        self.n = 0
        self.has_nig: bool | None = None
        self.flat = self.calibrated = False

    def add(self, P: torch.Tensor, targets: torch.Tensor, flat_scores: torch.Tensor | None = None,
            calibrated: torch.Tensor | None = None) -> ExpertTally:
        layout, mmax = self.layout, self.layout.max_size
        slots = group_slots(layout, targets)  # (B, G), Mmax outside
        self.has_nig = P.shape[-1] == mmax + 1  # False for the "w/o not-in-group" ablation
        self.flat |= flat_scores is not None
        self.calibrated |= calibrated is not None
        for j, classes in enumerate(layout.groups):
            m = len(classes)
            inside = slots[:, j] < mmax
            p = P[:, j]
            self.inside[j] += int(inside.sum())
            self.group_correct[j] += int((p[inside, :m].argmax(1) == slots[inside, j]).sum())
            if flat_scores is not None:
                cols = torch.as_tensor(list(classes), dtype=torch.long)
                self.flat_correct[j] += restricted_hits(flat_scores, targets, cols, inside)
            if self.has_nig:
                says_nig = p[:, mmax] > p[:, :m].max(1).values
                self.nig_outside[j] += int(says_nig[~inside].sum())
                self.nig_inside[j] += int(says_nig[inside].sum())
                calibration_sums(1.0 - p[:, mmax], inside, self.ece[j])
            if calibrated is not None:
                calibration_sums(1.0 - calibrated[:, j, -1], inside, self.ece_calibrated[j])
        self.n += int(targets.numel())
        return self

    def rows(self) -> list[dict[str, float]]:
        rows = []
        for j, classes in enumerate(self.layout.groups):
            n_in = int(self.inside[j])
            row: dict[str, float] = {"expert": j, "classes": len(classes), "images_in": n_in,
                                     "group_top1": share(int(self.group_correct[j]), n_in)}
            if self.flat:
                row["flat_group_top1"] = share(int(self.flat_correct[j]), n_in)
            if self.has_nig:
                row["nig_recall"] = share(int(self.nig_outside[j]), self.n - n_in)
                row["false_nig_rate"] = share(int(self.nig_inside[j]), n_in)
                row["phi_ece"] = calibration_error(self.ece[j], self.n)
            if self.calibrated:
                row["phi_ece_calibrated"] = calibration_error(self.ece_calibrated[j], self.n)
            rows.append(row)
        return rows
