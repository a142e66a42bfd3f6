"""Two-layer ontology: spectral clustering of N classes into K categories, left-to-right (§III, §V(e)).

The paper builds "a two-layer ontology" (root → categories → atomic classes) by spectral clustering
of the semantic affinity Ψ (Eq. 1), and assigns task groups by walking its leaves "from left to
right" (§IV-A). It gives neither K nor the order; SPEC §2 fixes them:

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
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from dmde.errors import DmdeValueError
from dmde.io import read_json, sha256_of, write_json

__all__ = [
    "EXACT_EIGH_MAX_N",
    "Category",
    "Ontology",
    "OntologyBuilder",
    "build_semantic_ontology",
    "build_visual_ontology",
    "default_n_categories",
    "default_n_components",
    "left_to_right_order",
    "spectral_categories",
    "spectral_embedding",
    "visual_affinity",
]

#: Up to this many classes the eigenvectors come from a dense LAPACK solver (exact, < 1 s).
EXACT_EIGH_MAX_N = 1500
#: Default cap on the spectral embedding's dimension (see the module docstring).
MAX_DEFAULT_COMPONENTS = 128

ONTOLOGY_FORMAT = "dmde-ontology"
ONTOLOGY_VERSION = 1


# --------------------------------------------------------------------------------------------
# pure functions


def default_n_categories(n: int) -> int:
    """Documented default K for N classes: ``max(round(N/20), round(√N))`` clipped to [1, N]."""
    if n < 1:
        raise DmdeValueError(f"need at least one class to build an ontology, got N={n}")
    return int(min(n, max(1, round(n / 20), round(math.sqrt(n)))))


def default_n_components(n_categories: int) -> int:
    """Default embedding dimension: ``min(K, 128)`` (see the module docstring)."""
    return int(max(1, min(n_categories, MAX_DEFAULT_COMPONENTS)))


def _check_affinity(affinity: Any) -> np.ndarray:
    """Square, finite, non-negative float matrix; float32/float64 kept as is (no copy of a big Ψ)."""
    a = np.asarray(affinity)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise DmdeValueError(f"affinity must be a square (N, N) matrix, got shape {a.shape}")
    if a.shape[0] < 1:
        raise DmdeValueError("affinity is empty (N=0)")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    # Row-block checks keep the peak memory flat for N = 21,841 (a full a < 0 mask is 477 MB).
    step = max(1, (1 << 24) // a.shape[0])
    for i in range(0, a.shape[0], step):
        blk = a[i : i + step]
        if not np.isfinite(blk).all():
            raise DmdeValueError(f"affinity has non-finite entries (row {i + int(np.argwhere(~np.isfinite(blk))[0, 0])})")
        if (blk < 0).any():
            r = i + int(np.argwhere(blk < 0)[0, 0])
            raise DmdeValueError(f"affinity must be non-negative (row {r} has {blk[r - i].min():.4g})")
    return a


def _check_k(n_categories: int, n: int) -> int:
    if isinstance(n_categories, bool) or int(n_categories) != n_categories:
        raise DmdeValueError(f"number of categories K must be an integer, got {n_categories!r}")
    k = int(n_categories)
    if k < 1 or k > n:
        raise DmdeValueError(f"number of categories K={k} must be between 1 and N={n}")
    return k


def _degrees(a: np.ndarray) -> np.ndarray:
    """Row sums without the diagonal, in float64, in row blocks (no N×N temporary)."""
    n = a.shape[0]
    deg = np.empty(n, dtype=np.float64)
    step = max(1, (1 << 24) // n)
    for i in range(0, n, step):
        deg[i : i + step] = a[i : i + step].sum(axis=1, dtype=np.float64)
    return deg - np.diagonal(a).astype(np.float64)


def _sign_flip(u: np.ndarray) -> np.ndarray:
    """Make each column's largest-magnitude entry positive: eigenvectors become deterministic."""
    idx = np.abs(u).argmax(axis=0)
    signs = np.sign(u[idx, np.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs


def spectral_embedding(
    affinity: Any,
    n_components: int,
    random_state: int | np.random.RandomState | None = 0,
    n_iter: int | None = None,
    exact: bool | None = None,
) -> np.ndarray:
    """Spectral embedding of the normalised affinity M = D^-1/2 Ψ D^-1/2 (diagonal ignored).

    Returns (N, n_components) float64 with rows scaled to unit length (Ng–Jordan–Weiss).

    * ``exact`` (default when N ≤ :data:`EXACT_EIGH_MAX_N`): M's ``n_components`` leading
      eigenvectors from LAPACK ``eigh``.
    * otherwise a seeded randomised subspace iteration Q ← orth(M' Q), ``n_iter`` passes, on M
      with its trivial eigenvector (∝ √degree) deflated. Each pass is one BLAS-3 product with Ψ
      in its own dtype, scaled on the fly, so the only N × N array in memory is the caller's Ψ.

    When ``n_components`` is below the number of clusters wanted, a *few* passes are better
    than converged eigenvectors: the top few eigenvectors describe only the largest clusters,
    while Q after 2–3 passes is a random projection of the whole leading eigenspace (noise
    directions damped by λ^n_iter), which keeps small clusters apart. :func:`spectral_categories`
    therefore uses ``n_iter=3`` in that case and converged eigenvectors (exact or ``n_iter=8``
    plus Rayleigh–Ritz) when ``n_components`` ≥ K.
    """
    from scipy import linalg
    from sklearn.utils import check_random_state

    a = _check_affinity(affinity)
    n = a.shape[0]
    p = int(n_components)
    if p < 1:
        raise DmdeValueError(f"n_components must be at least 1, got {p}")
    p = min(p, n)
    deg = _degrees(a)
    # An isolated class (zero degree) gets a zero row; k-means still places it somewhere.
    dinv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-300)), 0.0)
    if exact is None:
        exact = n <= EXACT_EIGH_MAX_N and n_iter is None

    if exact:
        m = a.astype(np.float64)
        np.fill_diagonal(m, 0.0)
        m *= dinv[:, None]
        m *= dinv[None, :]
        _, u = linalg.eigh(m, subset_by_index=[n - p, n - 1])  # ascending
        u = u[:, ::-1]
    else:
        dt = a.dtype
        dinv_t = dinv.astype(dt)[:, None]
        diag_t = np.diagonal(a).astype(dt)[:, None]
        v0 = np.sqrt(np.maximum(deg, 0.0))
        v0 = (v0 / max(np.linalg.norm(v0), 1e-300)).astype(dt)[:, None]  # trivial eigenvector, λ = 1

        def matmul(q: np.ndarray) -> np.ndarray:  # M' q with M' = M − v0 v0ᵀ; (N, b) -> (N, b)
            x = dinv_t * q
            y = dinv_t * (a @ x - diag_t * x)
            return y - v0 @ (v0.T @ q)

        rng = check_random_state(random_state)
        q = rng.standard_normal((n, p)).astype(dt)
        for _ in range(max(1, 8 if n_iter is None else int(n_iter))):
            q = _orthonormalise(matmul(q)).astype(dt)
        # Rayleigh–Ritz: a rotation of span(Q) (row distances unchanged) that makes the columns
        # approximate eigenvectors, ordered by eigenvalue, so they are comparable with eigh's.
        h = (q.T @ matmul(q)).astype(np.float64)
        w, v = np.linalg.eigh((h + h.T) / 2)
        u = q.astype(np.float64) @ v[:, np.argsort(w)[::-1]]
    u = _sign_flip(np.ascontiguousarray(u))
    norms = np.linalg.norm(u, axis=1, keepdims=True)
    return u / np.where(norms > 0, norms, 1.0)


def _orthonormalise(y: np.ndarray) -> np.ndarray:
    """Orthonormal basis of span(y) (N, b), float64: Cholesky-QR twice (two BLAS-3 products,
    several times faster than Householder QR on a tall matrix), Householder if y is rank-deficient."""
    q = y.astype(np.float64)
    try:
        for _ in range(2):  # the second pass restores orthogonality lost to rounding
            r = np.linalg.cholesky(q.T @ q)  # (b, b) lower
            q = _solve_lower(r, q)
    except np.linalg.LinAlgError:
        q, _ = np.linalg.qr(y.astype(np.float64))
    return q


def _solve_lower(r: np.ndarray, q: np.ndarray) -> np.ndarray:
    """q r^-T for lower-triangular r: (N, b)."""
    from scipy.linalg import solve_triangular

    return solve_triangular(r, q.T, lower=True, check_finite=False).T


def _ensure_k_labels(labels: np.ndarray, k: int) -> np.ndarray:
    """Renumber labels 0..K-1 by first appearance; if k-means left clusters empty (duplicate
    embedding rows), split the largest categories so exactly K are non-empty."""
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    out = rank[inv].astype(np.int64)
    nxt = int(out.max()) + 1
    while nxt < k:
        counts = np.bincount(out, minlength=nxt)
        big = int(counts.argmax())
        members = np.flatnonzero(out == big)
        out[members[len(members) // 2 :]] = nxt
        nxt += 1
    return out


def spectral_categories(
    affinity: Any,
    n_categories: int,
    random_state: int | None = 0,
    n_components: int | None = None,
    n_init: int | None = None,
) -> np.ndarray:
    """Spectral clustering of a precomputed affinity into K categories (§III).

    ``affinity``: (N, N) non-negative, symmetric (Ψ of Eq. 1, or a visual kernel). Returns
    (N,) int64 labels in 0..K-1 (every label used), numbered by first appearance. Embedding
    dimension ``n_components`` defaults to :func:`default_n_components`; k-means runs with
    ``n_init`` restarts (default 4 up to N = 5,000, else 1) and is deterministic for a seed.
    """
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    a = _check_affinity(affinity)
    n = a.shape[0]
    k = _check_k(n_categories, n)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    p = default_n_components(k) if n_components is None else int(n_components)
    # p ≥ K: converged eigenvectors (textbook); p < K: a random projection of the leading
    # eigenspace (3 passes), see spectral_embedding.
    emb = spectral_embedding(a, p, random_state=random_state, n_iter=None if p >= k else 3)
    if n_init is None:
        n_init = 4 if n <= 5000 else 1
    km = KMeans(n_clusters=k, n_init=n_init, max_iter=100, random_state=random_state)
    with warnings.catch_warnings():
        # Duplicate embedding rows (an exact block) can leave fewer distinct clusters than K;
        # _ensure_k_labels repairs that, so the warning would only confuse.
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = km.fit_predict(emb)
    return _ensure_k_labels(labels, k)


def _category_affinity(a: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(K, K) mean affinity between categories (diagonal: mean within, self-pairs excluded)."""
    from scipy import sparse

    n = a.shape[0]
    # Indicator in Ψ's dtype: a float64 indicator would make scipy upcast (copy) a float32 Ψ.
    z = sparse.csr_matrix((np.ones(n, dtype=a.dtype), (labels, np.arange(n))), shape=(k, n))  # (K, N)
    zs = np.asarray(z @ a, dtype=np.float64)  # (K, N) row sums per category, one pass over Ψ
    s = np.asarray(z.astype(np.float64) @ zs.T)  # (K, K) sums
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    diag_sum = np.bincount(labels, weights=np.diagonal(a).astype(np.float64), minlength=k)
    pairs = np.outer(counts, counts)
    s[np.arange(k), np.arange(k)] -= diag_sum
    pairs[np.arange(k), np.arange(k)] -= counts
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(pairs > 0, s / np.maximum(pairs, 1), 0.0)
    return c


def _leaf_order(sim: np.ndarray) -> np.ndarray:
    """Leaf order of an average-linkage dendrogram on ``max(sim) - sim``.

    Optimal leaf ordering (neighbouring leaves as similar as possible) for up to 1,000 items
    (it is cubic: ~10 s at 1,100);
    beyond that the plain dendrogram order, which still keeps every subtree contiguous.
    """
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import squareform

    m = sim.shape[0]
    if m <= 2:
        return np.arange(m)
    s = (np.asarray(sim, dtype=np.float64) + np.asarray(sim, dtype=np.float64).T) / 2
    d = s.max() - s
    np.fill_diagonal(d, 0.0)
    d = np.maximum(d, 0.0)
    z = hierarchy.linkage(squareform(d, checks=False), method="average", optimal_ordering=m <= 1000)
    return hierarchy.leaves_list(z).astype(np.int64)


def left_to_right_order(affinity: Any, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The "left to right" leaf order of the two-layer tree (§IV-A).

    Returns ``(order, new_labels)``: ``order`` lists the input indices left to right (each
    category contiguous, similar categories adjacent, classes within a category ordered by
    their own dendrogram); ``new_labels[i]`` renumbers input ``i``'s category so that
    categories are 0..K-1 from left to right.
    """
    a = _check_affinity(affinity)
    lab = np.asarray(labels, dtype=np.int64)
    n = a.shape[0]
    if lab.shape != (n,):
        raise DmdeValueError(f"labels must have shape ({n},) to match the affinity, got {lab.shape}")
    lab = _ensure_k_labels(lab, int(np.unique(lab).size))
    k = int(lab.max()) + 1
    cat_order = _leaf_order(_category_affinity(a, lab, k)) if k > 1 else np.zeros(1, dtype=np.int64)
    order: list[np.ndarray] = []
    for c in cat_order:
        idx = np.flatnonzero(lab == c)
        if idx.size > 2:
            idx = idx[_leaf_order(a[np.ix_(idx, idx)])]
        if order and idx.size > 1:
            # Orient the category so its first class is the one nearer the previous category.
            prev = order[-1][-1]
            if a[prev, idx[-1]] > a[prev, idx[0]]:
                idx = idx[::-1]
        order.append(idx)
    full = np.concatenate(order)
    new_labels = np.empty(n, dtype=np.int64)
    for new, c in enumerate(cat_order):
        new_labels[lab == c] = new
    return full, new_labels


def visual_affinity(features: Any, kernel: str = "cosine", random_state: int | None = 0) -> np.ndarray:
    """(N, N) float32 affinity between class-mean deep features (the visual tree, §V(e)).

    ``cosine``: max(cos, 0), non-negative as spectral clustering needs. ``rbf``: exp(−d²/m) with
    m the median squared distance between distinct classes (estimated on at most 200,000 seeded
    pairs, so N = 21,841 costs no N² sort).
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1:
        raise DmdeValueError(f"features must be an (N, d) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DmdeValueError("features have non-finite entries")
    if kernel == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        xn = x / np.where(norms > 0, norms, 1.0)
        a = xn @ xn.T
        np.maximum(a, 0.0, out=a)
        np.fill_diagonal(a, 1.0)
        return a
    if kernel == "rbf":
        n = x.shape[0]
        sq = np.einsum("ij,ij->i", x, x).astype(np.float32)
        rng = np.random.default_rng(random_state)
        npairs = min(200_000, n * (n - 1) // 2)
        if npairs > 0:
            i = rng.integers(0, n, size=npairs)
            j = (i + rng.integers(1, n, size=npairs)) % n if n > 1 else i
            d2s = np.maximum(sq[i] + sq[j] - 2 * np.einsum("ij,ij->i", x[i], x[j]), 0)
            med = float(np.median(d2s))
        else:
            med = 1.0
        med = med if med > 0 else 1.0
        a = x @ x.T  # (N, N) float32, turned into exp(-d²/med) in place
        a *= -2.0
        a += sq[:, None]
        a += sq[None, :]
        np.maximum(a, 0.0, out=a)
        a *= -1.0 / med
        np.exp(a, out=a)
        np.fill_diagonal(a, 1.0)
        return a
    raise DmdeValueError(f"unknown kernel {kernel!r}; choose 'cosine' or 'rbf'")


# --------------------------------------------------------------------------------------------
# the ontology artefact


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
        if self.kind not in ("semantic", "visual"):
            raise DmdeValueError(f"ontology kind must be 'semantic' or 'visual', got {self.kind!r}")
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
        if not isinstance(data, dict) or data.get("format") != ONTOLOGY_FORMAT:
            raise DmdeValueError(f"{where} is not a dmde ontology file (format != {ONTOLOGY_FORMAT!r})")
        if data.get("version") != ONTOLOGY_VERSION:
            raise DmdeValueError(f"{where} has ontology format version {data.get('version')}, expected {ONTOLOGY_VERSION}")
        try:
            rows = data["classes"]
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
        except (KeyError, TypeError) as exc:
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


# --------------------------------------------------------------------------------------------
# estimator


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


# --------------------------------------------------------------------------------------------
# builders


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
    from dmde import semantic

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
