"""Spectral clustering of an affinity matrix into K categories and the left-to-right order of
categories and classes (§III; docs/METHOD.md, "Ontology"): the math of the two-layer ontology,
as pure functions on numpy arrays, for N up to 21,841."""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from scipy import linalg, sparse
from scipy.cluster import hierarchy
from scipy.linalg import solve_triangular
from scipy.spatial.distance import squareform
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state

from dmde.core.errors import DmdeValueError

#: Up to this many classes the eigenvectors come from a dense LAPACK solver (exact, < 1 s).
EXACT_EIGH_MAX_N = 1500


#: Default cap on the spectral embedding's dimension (see the module docstring).
MAX_DEFAULT_COMPONENTS = 128


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
