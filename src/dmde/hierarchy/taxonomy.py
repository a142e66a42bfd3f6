"""A user's taxonomy as the two-layer ontology, for classes that are not WordNet nouns
(``ontology.source: taxonomy``; docs/METHOD.md, "Classes that are not WordNet nouns").

The file holds one ``child<TAB>parent`` line per class (whitespace separates them when the line
has no tab; ``#`` comments and blank lines are skipped). Every class of the run appears exactly
once as a child; the parents are the categories. The tree is root → parents → classes, so the
path between two classes has 0 edges (the same class), 2 (siblings) or 4 (different parents), and
Eq. 1 on that tree (H = 2) gives ψ = log 4, log 4/3 and 0: siblings are closer than cousins and
every other distinction is absent. Every order that keeps siblings together is then equally
"left to right"; the file's order breaks the tie (categories in the order of their first line,
classes in the order of their lines).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dmde.core.errors import DmdeFileError, DmdeValueError
from dmde.hierarchy.ontology import Category, Ontology
from dmde.hierarchy.semantic import psi_from_distances

__all__ = ["read_taxonomy", "build_taxonomy_ontology", "two_layer_distances", "taxonomy_affinity"]

#: Depth H of the tree root → parent → class (Eq. 1).
TAXONOMY_DEPTH = 2


def read_taxonomy(path: str | os.PathLike, classes: Sequence[str]) -> dict[str, str]:
    """class → parent, in the file's order, for exactly ``classes``: a line naming a class the run
    does not have, a class given twice, a class the file leaves out, or a parent that is itself a
    class is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise DmdeFileError(f"taxonomy file {p} does not exist")
    known = set(classes)
    parent: dict[str, str] = {}
    line_of: dict[str, int] = {}
    with open(p, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.rstrip("\r\n")
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            fields = [f.strip() for f in (text.split("\t") if "\t" in text else text.split())]
            fields = [f for f in fields if f]
            where = f"line {lineno} of taxonomy {p.name}"
            if len(fields) != 2:
                raise DmdeValueError(f"{where}: expected 'child<TAB>parent', got {text.strip()!r}")
            child, par = fields
            if child not in known:
                raise DmdeValueError(f"{where} names class {child!r}, which is not one of the run's "
                                     f"{len(known)} classes")
            if child in parent:
                raise DmdeValueError(f"{where}: class {child!r} is already given a parent on line {line_of[child]}")
            parent[child] = par
            line_of[child] = lineno
    missing = [c for c in classes if c not in parent]
    if missing:
        raise DmdeValueError(f"class {missing[0]!r} is not in taxonomy {p.name} "
                             f"({len(missing)} class(es) without a 'class<TAB>parent' line)")
    both = next((c for c, q in parent.items() if q in known), None)
    if both is not None:
        raise DmdeValueError(f"taxonomy {p.name} (line {line_of[both]}): parent {parent[both]!r} of {both!r} is "
                             "itself a class; the ontology has two layers (class → category)")
    return parent


def build_taxonomy_ontology(parents: Mapping[str, str], n_categories: int | None = None,
                            source: str | None = None) -> Ontology:
    """The two-layer ontology of a taxonomy (class → parent, in file order): one category per
    parent, in the order of first appearance, its classes contiguous in file order."""
    if not parents:
        raise DmdeValueError("the taxonomy holds no classes")
    names = list(dict.fromkeys(parents.values()))  # categories, first appearance first
    if n_categories is not None and int(n_categories) != len(names):
        raise DmdeValueError(f"ontology.categories={n_categories}, but the taxonomy names {len(names)} parents "
                             "(its categories); leave ontology.categories unset")
    cat_of = {name: k for k, name in enumerate(names)}
    order = sorted(parents, key=lambda c: cat_of[parents[c]])  # stable: file order inside a category
    return Ontology(classes=order, lemmas=list(order), category=[cat_of[parents[c]] for c in order],
                    categories=[Category(name=n) for n in names], kind="taxonomy",
                    params={"source": source, "n_categories": len(names),
                            "affinity": "taxonomy (Eq. 1 on root → parent → class, H = 2)"})


def two_layer_distances(category: Sequence[int]) -> np.ndarray:
    """Path lengths (edges) between the classes of a two-layer tree (N, N) uint8: 0 on the
    diagonal, 2 between siblings, 4 between classes of different categories."""
    c = np.asarray(category)
    d = np.where(c[:, None] == c[None, :], 2, 4).astype(np.uint8)
    np.fill_diagonal(d, 0)
    return d


def taxonomy_affinity(category: Sequence[int]) -> np.ndarray:
    """Ψ of the taxonomy (Eq. 1 on the two-layer tree, H = 2), (N, N) float32."""
    return psi_from_distances(two_layer_distances(category), TAXONOMY_DEPTH)
