"""Task groups: overlapping windows round the ontology's left-to-right leaf order (§IV-A, Fig. 3).

The paper walks the leaves "from left to right" and gives each base expert M classes, neighbouring
groups sharing a fraction λ. docs/METHOD.md ("Groups") makes that exact, treating the order as a circle:

* stride s = max(1, round(M(1 − λ))), ϑ = ⌈N / s⌉ groups; N ≤ M gives one group of every class;
* boundaries spread evenly, b_k = round(k N / ϑ), extended circularly (b_{k+ϑ} = b_k + N);
* c = 1/(1 − λ) a whole number (λ = 0, 1/2, 2/3, …): group j = [b_j, b_{j+c}) mod N, every class
  in exactly c groups;
* otherwise: group j = [b_j, b_j + L) mod N, L = min(M, round((N/ϑ)/(1 − λ))), every class in
  ⌊1/(1−λ)⌋ or ⌈1/(1−λ)⌉ groups.

``round`` is half-up here (not Python's half-to-even) so positions never depend on float parity.
Random assignment (baseline) applies the same windows to a seeded permutation of the classes;
visual-tree assignment to the visual ontology's order.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dmde.core.errors import DmdeValueError, MismatchError
from dmde.core.io import check_format, read_json, write_json
from dmde.hierarchy.ontology import Ontology

__all__ = ["ASSIGNMENTS", "TaskGroups", "circular_groups", "make_groups"]

ASSIGNMENTS = ("semantic", "random", "visual")
GROUPS_FORMAT = "dmde-groups"
GROUPS_VERSION = 1


def _round(x: float) -> int:
    """Half-up rounding, with a small tolerance so 1000·(1−0.7) = 299.99999999999994 → 300."""
    return int(math.floor(x + 0.5 + 1e-9))


def _check_size_overlap(size: Any, overlap: Any) -> tuple[int, float]:
    if isinstance(size, bool) or not float(size).is_integer():
        raise DmdeValueError(f"group size M must be a whole number, got {size!r}")
    m = int(size)
    if m < 1:
        raise DmdeValueError(f"group size M={m} must be at least 1")
    lam = float(overlap)
    if not (0.0 <= lam < 1.0) or math.isnan(lam):
        raise DmdeValueError(f"overlap λ={overlap!r} must lie in [0, 1)")
    return m, lam


def circular_groups(n: int, size: int, overlap: float) -> list[np.ndarray]:
    """Positions 0..n-1 (a circle) in ϑ overlapping groups of at most ``size`` (docs/METHOD.md "Groups", Fig. 3).

    Each group is an int64 array in walking order (from its start b_j, wrapping past n-1).
    """
    m, lam = _check_size_overlap(size, overlap)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise DmdeValueError(f"number of classes N={n!r} must be a positive whole number")
    n = int(n)
    if n <= m:
        return [np.arange(n, dtype=np.int64)]
    s = max(1, _round(m * (1.0 - lam)))
    theta = math.ceil(n / s)
    c_float = 1.0 / (1.0 - lam)
    c = _round(c_float)
    whole = abs(c_float - c) < 1e-9
    if whole:
        # Rounding of s can make c·N/ϑ exceed M by a class or two for tiny M; one more group
        # (closer boundaries) restores |group| ≤ M while keeping exactly-c coverage.
        while True:
            b = _boundaries(n, theta, extra=c)
            if int((b[c : c + theta] - b[:theta]).max()) <= m:
                break
            theta += 1
        return [np.arange(b[j], b[j + c], dtype=np.int64) % n for j in range(theta)]
    b = _boundaries(n, theta, extra=0)
    length = max(1, min(m, _round((n / theta) / (1.0 - lam))))
    return [np.arange(b[j], b[j] + length, dtype=np.int64) % n for j in range(theta)]


def _boundaries(n: int, theta: int, extra: int) -> np.ndarray:
    """b_0..b_{ϑ+extra}: b_k = round(kN/ϑ) for k ≤ ϑ, then b_{k+ϑ} = b_k + N."""
    base = np.array([_round(k * n / theta) for k in range(theta)], dtype=np.int64)
    wraps = (theta + extra) // theta + 1
    ext = np.concatenate([base + r * n for r in range(wraps)] + [[wraps * n]])
    return ext[: theta + extra + 1]


@dataclass
class TaskGroups:
    """ϑ task groups over an ontology: class positions and their WNIDs (one list per expert).

    Expert j's label k < M_j is the class at position ``groups[j][k]``; label M_j is
    "not in group". ``ontology_hash`` ties the file to the ontology it was made from.
    """

    groups: list[list[int]]
    wnids: list[list[str]]
    size: int
    overlap: float
    assignment: str = "semantic"
    random_state: int | None = 0
    ontology_hash: str = ""
    n_classes: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.groups = [[int(p) for p in g] for g in self.groups]
        self.wnids = [[str(w) for w in g] for g in self.wnids]
        if self.assignment not in ASSIGNMENTS:
            raise DmdeValueError(f"assignment {self.assignment!r} is not one of {', '.join(ASSIGNMENTS)}")
        if len(self.groups) != len(self.wnids) or any(len(a) != len(b) for a, b in zip(self.groups, self.wnids)):
            raise DmdeValueError("task groups: positions and WNIDs disagree in shape")
        if not self.groups or any(len(g) == 0 for g in self.groups):
            raise DmdeValueError("task groups: every group must hold at least one class")

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def counts(self) -> np.ndarray:
        """(N,) how many groups each class position is in."""
        n = self.n_classes or (max(max(g) for g in self.groups) + 1)
        return np.bincount(np.concatenate([np.asarray(g) for g in self.groups]), minlength=n)

    def coverage(self) -> dict[str, Any]:
        """Groups per class (min / max / mean, histogram) and group sizes."""
        cnt = self.counts()
        hist = np.bincount(cnt)
        sizes = [len(g) for g in self.groups]
        return {
            "n_groups": self.n_groups,
            "n_classes": int(cnt.size),
            "groups_per_class_min": int(cnt.min()),
            "groups_per_class_max": int(cnt.max()),
            "groups_per_class_mean": float(cnt.mean()),
            "histogram": {int(k): int(v) for k, v in enumerate(hist) if v},
            "group_size_min": int(min(sizes)),
            "group_size_max": int(max(sizes)),
        }

    def validate(self, ontology: Ontology) -> None:
        """Refuse (``MismatchError``) groups that were not made from ``ontology``."""
        if self.ontology_hash != ontology.hash():
            raise MismatchError(
                f"task groups were made for ontology {self.ontology_hash}, not {ontology.hash()}"
            )
        if self.n_classes and self.n_classes != ontology.n_classes:
            raise MismatchError(f"task groups cover {self.n_classes} classes, the ontology {ontology.n_classes}")
        for j, (pos, ws) in enumerate(zip(self.groups, self.wnids)):
            for p, w in zip(pos, ws):
                if not 0 <= p < ontology.n_classes or ontology.classes[p] != w:
                    raise MismatchError(f"task group {j}: position {p} is not class {w} in the ontology")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": GROUPS_FORMAT,
            "version": GROUPS_VERSION,
            "ontology_hash": self.ontology_hash,
            "n_classes": self.n_classes,
            "size": self.size,
            "overlap": self.overlap,
            "assignment": self.assignment,
            "random_state": self.random_state,
            "params": self.params,
            "coverage": self.coverage(),
            "groups": [{"positions": g, "wnids": w} for g, w in zip(self.groups, self.wnids)],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "groups") -> "TaskGroups":
        check_format(data, GROUPS_FORMAT, GROUPS_VERSION, "task-groups", where)
        try:
            return cls(
                groups=[g["positions"] for g in data["groups"]],
                wnids=[g["wnids"] for g in data["groups"]],
                size=int(data["size"]),
                overlap=float(data["overlap"]),
                assignment=data["assignment"],
                random_state=data.get("random_state"),
                ontology_hash=data["ontology_hash"],
                n_classes=int(data.get("n_classes", 0)),
                params=dict(data.get("params", {})),
            )
        except (KeyError, TypeError) as exc:
            raise DmdeValueError(f"{where} is malformed (missing or bad field {exc})") from None
        except DmdeValueError as exc:
            raise DmdeValueError(f"{where}: {exc}") from None

    def to_json(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TaskGroups":
        return cls.from_dict(read_json(path, what="groups file"), where=f"groups file {os.fspath(path)}")


def make_groups(
    ontology: Ontology,
    size: int,
    overlap: float,
    assignment: str = "semantic",
    random_state: int | None = 0,
    visual_ontology: Ontology | None = None,
) -> TaskGroups:
    """Task groups of at most ``size`` classes overlapping by ``overlap`` (§IV-A, Fig. 3).

    ``assignment``: ``semantic`` walks ``ontology``'s own order; ``random`` a seeded permutation
    of it (the paper's random-assignment baseline); ``visual`` the order of ``visual_ontology``
    (the visual tree, §V(e)), which must hold the same classes. Positions always index
    ``ontology``, whose hash the result carries.
    """
    m, lam = _check_size_overlap(size, overlap)
    n = ontology.n_classes
    if assignment == "semantic":
        walk = np.arange(n, dtype=np.int64)
    elif assignment == "random":
        walk = np.random.default_rng(random_state).permutation(n).astype(np.int64)
    elif assignment == "visual":
        if visual_ontology is None:
            raise DmdeValueError("assignment 'visual' needs a visual ontology (--visual-ontology)")
        if set(visual_ontology.classes) != set(ontology.classes):
            missing = sorted(set(ontology.classes) ^ set(visual_ontology.classes))
            raise MismatchError(
                f"the visual ontology's classes differ from the ontology's ({len(missing)} differ, e.g. {missing[0]})"
            )
        walk = ontology.positions(visual_ontology.classes)
    else:
        raise DmdeValueError(f"assignment {assignment!r} is not one of {', '.join(ASSIGNMENTS)}")
    groups = [walk[g] for g in circular_groups(n, m, lam)]
    params: dict[str, Any] = {}
    if visual_ontology is not None and assignment == "visual":
        params["visual_ontology_hash"] = visual_ontology.hash()
    return TaskGroups(
        groups=[g.tolist() for g in groups],
        wnids=[[ontology.classes[p] for p in g] for g in groups],
        size=m,
        overlap=lam,
        assignment=assignment,
        random_state=None if random_state is None else int(random_state),
        ontology_hash=ontology.hash(),
        n_classes=n,
        params=params,
    )
