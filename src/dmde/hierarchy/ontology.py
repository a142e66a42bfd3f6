"""Two-layer ontology: spectral clustering of N classes into K categories, left-to-right (§III, §V(e)).

The paper builds "a two-layer ontology" (root → categories → atomic classes) by spectral clustering
of the semantic affinity Ψ (Eq. 1), and assigns task groups by walking its leaves "from left to
right" (§IV-A). It gives neither K nor the order; docs/METHOD.md ("Ontology") fixes them:

* **K** (:func:`default_n_categories`): ``max(round(N / 20), round(sqrt(N)))``, at least 1 and at
  most N. Large N gives categories of about 20 classes (ImageNet-10K's 7,756 → 388); small N
  (below 400) gives about √N categories of about √N classes (Tiny-ImageNet's 200 → 14,
  Fashion-MNIST's 10 → 3), so a tiny class list still gets more than one category.
* **Clustering** (:func:`spectral_categories`): the normalised affinity D^-1/2 Ψ D^-1/2 (diagonal
  ignored, as in a graph Laplacian), a spectral embedding of ``n_components`` dimensions
  (Ng–Jordan–Weiss: rows scaled to unit length), then k-means with K clusters. ``n_components``
  defaults to ``min(K, 128)``: K eigenvectors (the textbook choice) would be ~1,000 at
  N = 21,841, which no dense eigensolver delivers in minutes. With K ≤ 128 the embedding is the
  K leading eigenvectors (exact LAPACK up to :data:`EXACT_EIGH_MAX_N` classes); with K > 128 it
  is a seeded random projection of the leading eigenspace from 3 passes of block subspace
  iteration (BLAS-3 products on Ψ itself, no copy), which keeps small clusters apart where the
  128 leading eigenvectors would describe only the largest ones.
* **Order** (:func:`left_to_right_order`): categories ordered by the leaf order of an
  average-linkage dendrogram on their mean category-to-category affinities (optimal leaf order
  up to 1,000 categories; similar categories become neighbours), the classes inside each category the same way on their own affinities,
  each category flipped if that puts its first class nearer the previous category. Siblings
  are therefore contiguous and categories are numbered 0..K-1 from left to right.
* **Names**: a category of the semantic tree is named after the lowest common hypernym of its
  classes (WordNet); without WordNet after its most central class (highest summed affinity).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from dmde.core.errors import DmdeValueError
from dmde.core.io import check_format, read_json, sha256_of, write_json
from dmde.hierarchy import semantic
from dmde.hierarchy.spectral import (
    _check_affinity,
    _check_k,
    default_n_categories,
    default_n_components,
    left_to_right_order,
    spectral_categories,
    visual_affinity,
)

__all__ = ["Category", "Ontology", "OntologyBuilder", "build_semantic_ontology", "build_visual_ontology"]


ONTOLOGY_FORMAT = "dmde-ontology"


ONTOLOGY_VERSION = 1

#: What an ontology was built from: WordNet's Ψ (Eq. 1), class-mean features (the visual tree,
#: §V(e)), or a user's taxonomy file (:mod:`dmde.hierarchy.taxonomy`).
KINDS = ("semantic", "visual", "taxonomy")


@dataclass
class Category:
    """One category node: its name and, for the semantic tree, its WordNet synset."""

    name: str
    wnid: str | None = None


@dataclass
class Ontology:
    """Root → K categories → N classes, classes stored left to right (§III).

    ``classes[p]`` is the WNID at *position* p (also the label a dataset uses once aligned to
    this ontology); ``category[p]`` its category id; categories are numbered left to right, so
    ``category`` is non-decreasing and each category's classes are contiguous.
    """

    classes: list[str]
    lemmas: list[str]
    category: list[int]
    categories: list[Category]
    kind: str = "semantic"
    params: dict[str, Any] = field(default_factory=dict)
    non_atomic: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.categories = [c if isinstance(c, Category) else Category(**c) for c in self.categories]
        self.category = [int(c) for c in self.category]
        self._check()
        self._pos = {w: i for i, w in enumerate(self.classes)}

    def _check(self) -> None:
        n, k = len(self.classes), len(self.categories)
        if n < 1:
            raise DmdeValueError("ontology has no classes")
        if len(self.lemmas) != n or len(self.category) != n:
            raise DmdeValueError(
                f"ontology lists {n} classes but {len(self.lemmas)} lemmas and {len(self.category)} category ids"
            )
        if len(set(self.classes)) != n:
            dup = next(w for i, w in enumerate(self.classes) if w in self.classes[:i])
            raise DmdeValueError(f"ontology lists class {dup} more than once")
        if self.kind not in KINDS:
            raise DmdeValueError(f"ontology kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        cat = np.asarray(self.category)
        if cat.min() < 0 or cat.max() >= k or np.unique(cat).size != k:
            raise DmdeValueError(f"ontology category ids must use every id 0..{k - 1}")
        if (np.diff(cat) < 0).any():
            raise DmdeValueError("ontology classes are not in left-to-right order (category ids decrease)")

    # ---- look-ups
    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_categories(self) -> int:
        return len(self.categories)

    def position(self, wnid: str) -> int:
        """Position (0..N-1) of a class in the left-to-right order."""
        try:
            return self._pos[wnid]
        except KeyError:
            raise DmdeValueError(f"class {wnid} is not in the ontology") from None

    def positions_or(self, wnids: Sequence[str], missing: int = -1) -> np.ndarray:
        """Positions of several classes, ``missing`` for classes the ontology does not hold."""
        return np.asarray([self._pos.get(w, missing) for w in wnids], dtype=np.int64)

    def positions(self, wnids: Sequence[str]) -> np.ndarray:
        """Positions of several classes, (len(wnids),) int64."""
        return np.asarray([self.position(w) for w in wnids], dtype=np.int64)

    def members(self, category: int) -> np.ndarray:
        """Positions of the classes of one category (a contiguous range)."""
        if not 0 <= category < self.n_categories:
            raise DmdeValueError(f"category {category} out of range 0..{self.n_categories - 1}")
        return np.flatnonzero(np.asarray(self.category) == category)

    def category_sizes(self) -> np.ndarray:
        return np.bincount(np.asarray(self.category), minlength=self.n_categories)

    # ---- identity and files
    def hash(self) -> str:
        """Stable hash of what downstream artefacts depend on: classes, their order, categories."""
        return sha256_of(
            {
                "classes": self.classes,
                "category": self.category,
                "categories": [[c.name, c.wnid] for c in self.categories],
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ONTOLOGY_FORMAT,
            "version": ONTOLOGY_VERSION,
            "hash": self.hash(),
            "kind": self.kind,
            "n_classes": self.n_classes,
            "n_categories": self.n_categories,
            "params": self.params,
            "categories": [dataclasses.asdict(c) for c in self.categories],
            "classes": [
                {"wnid": w, "lemma": lem, "category": c}
                for w, lem, c in zip(self.classes, self.lemmas, self.category)
            ],
            "non_atomic": self.non_atomic,
            "dropped": self.dropped,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "ontology") -> "Ontology":
        check_format(data, ONTOLOGY_FORMAT, ONTOLOGY_VERSION, "ontology", where)
        try:
            rows = data["classes"]
            for r in rows:  # a hand edit must not pass as a float or a name
                c = r["category"]
                if not isinstance(c, int) or isinstance(c, bool):
                    raise DmdeValueError(f"class {r.get('wnid')} has category {c!r}: categories are integers 0..K-1")
            onto = cls(
                classes=[r["wnid"] for r in rows],
                lemmas=[r["lemma"] for r in rows],
                category=[r["category"] for r in rows],
                categories=[Category(name=c["name"], wnid=c.get("wnid")) for c in data["categories"]],
                kind=data.get("kind", "semantic"),
                params=dict(data.get("params", {})),
                non_atomic=list(data.get("non_atomic", [])),
                dropped=list(data.get("dropped", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DmdeValueError):
                raise DmdeValueError(f"{where}: {exc}") from None
            raise DmdeValueError(f"{where} is malformed (missing or bad field {exc})") from None
        except DmdeValueError as exc:
            raise DmdeValueError(f"{where}: {exc}") from None
        stored = data.get("hash")
        if stored is not None and stored != onto.hash():
            raise DmdeValueError(f"{where} was edited: its stored hash {stored} != content hash {onto.hash()}")
        return onto

    def to_json(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Ontology":
        return cls.from_dict(read_json(path, what="ontology file"), where=f"ontology file {os.fspath(path)}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ontology):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable dataclass; use .hash() for identity


Namer = Callable[[np.ndarray], "tuple[str, str | None]"]


class OntologyBuilder:
    """Estimator: affinity → two-layer ontology in left-to-right order (§III).

    Parameters are stored as given; ``fit`` learns ``n_categories_``, ``labels_`` (category of
    each *input* class, numbered left to right), ``order_`` (input indices left to right) and
    ``ontology_`` (:class:`Ontology`).
    """

    def __init__(
        self,
        n_categories: int | None = None,
        random_state: int | None = 0,
        n_components: int | None = None,
        kind: str = "semantic",
    ) -> None:
        self.n_categories = n_categories
        self.random_state = random_state
        self.n_components = n_components
        self.kind = kind

    def fit(
        self,
        affinity: Any,
        class_ids: Sequence[str],
        names: Sequence[str] | None = None,
        namer: Namer | None = None,
        params: dict[str, Any] | None = None,
    ) -> "OntologyBuilder":
        """Cluster, order and name. ``namer(member_indices) -> (name, wnid | None)`` names a
        category from the input indices of its classes; default: its most central class."""
        a = _check_affinity(affinity)
        n = a.shape[0]
        ids = [str(c) for c in class_ids]
        if len(ids) != n:
            raise DmdeValueError(f"{len(ids)} class ids for an affinity of {n} classes")
        lem = [str(s) for s in names] if names is not None else list(ids)
        if len(lem) != n:
            raise DmdeValueError(f"{len(lem)} names for {n} classes")
        k = default_n_categories(n) if self.n_categories is None else _check_k(self.n_categories, n)
        p = default_n_components(k) if self.n_components is None else int(self.n_components)
        raw = spectral_categories(a, k, random_state=self.random_state, n_components=p)
        order, labels = left_to_right_order(a, raw)
        if namer is None:
            namer = _central_namer(a, lem)
        cats = []
        for c in range(k):
            name, wnid = namer(np.flatnonzero(labels == c))
            cats.append(Category(name=str(name), wnid=None if wnid is None else str(wnid)))
        all_params = {
            "n_categories": k,
            "n_components": min(p, n),
            "random_state": self.random_state,
            "method": "spectral (normalised affinity, k-means) + average-linkage leaf order",
        }
        all_params.update(params or {})
        self.n_categories_ = k
        self.labels_ = labels
        self.order_ = order
        self.ontology_ = Ontology(
            classes=[ids[i] for i in order],
            lemmas=[lem[i] for i in order],
            category=[int(labels[i]) for i in order],
            categories=cats,
            kind=self.kind,
            params=_jsonable(all_params),
        )
        return self


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _central_namer(a: np.ndarray, names: Sequence[str]) -> Namer:
    """Name a category after its member with the largest summed affinity to the others."""
    def namer(idx: np.ndarray) -> tuple[str, None]:
        if idx.size <= 2:
            return names[int(idx[0])], None
        sub = a[np.ix_(idx, idx)].astype(np.float64)
        score = sub.sum(axis=1) - np.diagonal(sub)
        return names[int(idx[int(score.argmax())])], None

    return namer


def _wordnet_namer(wn: Any, synsets: Sequence[int], fallback: Namer) -> Namer:
    """Name after the lowest common hypernym of the members (§III's tree read as WordNet)."""
    def namer(idx: np.ndarray) -> tuple[str, str | None]:
        try:
            s = int(wn.lowest_common_hypernyms([int(synsets[int(i)]) for i in idx]))
        except DmdeValueError:  # no common hypernym (toy graphs with several roots)
            return fallback(idx)
        return str(wn.name(s)), str(wn.wnid(s))

    return namer


def build_semantic_ontology(
    wn: Any,
    wnids: Sequence[str],
    n_categories: int | None = None,
    random_state: int | None = 0,
    drop_non_atomic: bool = False,
    n_components: int | None = None,
    source: str | None = None,
) -> Ontology:
    """The semantic two-layer tree of §III: Ψ (Eq. 1) over WordNet, spectral clustering, order.

    Non-atomic classes (a listed class with a listed hyponym) are reported in
    ``Ontology.non_atomic``; with ``drop_non_atomic`` they are also removed (``Ontology.dropped``).
    """
    wnids = [str(w) for w in wnids]
    if not wnids:
        raise DmdeValueError("the class list is empty")
    seen: set[str] = set()
    for w in wnids:
        if w in seen:
            raise DmdeValueError(f"class {w} is listed more than once")
        seen.add(w)
    synsets = [int(i) for i in wn.indices(wnids)]
    non_atomic = [wnids[p] for p in semantic.non_atomic(wn, synsets)]  # positions into the list
    dropped: list[str] = []
    if drop_non_atomic and non_atomic:
        drop = set(non_atomic)
        dropped = [w for w in wnids if w in drop]
        keep = [i for i, w in enumerate(wnids) if w not in drop]
        wnids = [wnids[i] for i in keep]
        synsets = [synsets[i] for i in keep]
        if not wnids:
            raise DmdeValueError("every class is non-atomic; nothing left after --drop-non-atomic")
    psi = semantic.semantic_relationship(wn, synsets)  # (N, N) float32, Eq. 1
    names = [str(wn.name(s)) for s in synsets]
    builder = OntologyBuilder(n_categories, random_state=random_state, n_components=n_components, kind="semantic")
    builder.fit(
        psi,
        wnids,
        names,
        namer=_wordnet_namer(wn, synsets, _central_namer(np.asarray(psi), names)),
        params={"source": source, "drop_non_atomic": bool(drop_non_atomic), "affinity": "psi (Eq. 1)"},
    )
    onto = builder.ontology_
    onto.non_atomic = list(non_atomic)
    onto.dropped = dropped
    return onto


def build_visual_ontology(
    features: Any,
    wnids: Sequence[str],
    names: Sequence[str] | None = None,
    n_categories: int | None = None,
    random_state: int | None = 0,
    kernel: str = "cosine",
    n_components: int | None = None,
    wn: Any = None,
    source: str | None = None,
) -> Ontology:
    """The visual tree of §V(e): the same construction on class-mean deep features (N, d).

    Categories are named after the lowest common hypernym when a WordNet is given, else after
    their most central class.
    """
    x = np.asarray(features)
    wnids = [str(w) for w in wnids]
    if x.ndim != 2 or x.shape[0] != len(wnids):
        raise DmdeValueError(f"features must be (N, d) with N={len(wnids)} rows (one per WNID), got shape {x.shape}")
    if len(set(wnids)) != len(wnids):
        raise DmdeValueError("the WNID list of the features has duplicates")
    a = visual_affinity(x, kernel=kernel, random_state=random_state)
    lem = [str(s) for s in names] if names is not None else list(wnids)
    namer = None
    if wn is not None:
        synsets = [int(i) for i in wn.indices(wnids)]
        namer = _wordnet_namer(wn, synsets, _central_namer(a, lem))
    builder = OntologyBuilder(n_categories, random_state=random_state, n_components=n_components, kind="visual")
    builder.fit(a, wnids, lem, namer=namer, params={"source": source, "kernel": kernel})
    return builder.ontology_
