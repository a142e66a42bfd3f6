"""Visual similarity between the classes of a task group (Eq. 3).

    S_kl = (1 / (R_k R_l)) Σ_a Σ_b κ(x_ka, x_lb),    κ(x, y) = exp(−‖x − y‖² / h),    S_kk = 0

the mean RBF kernel value between the deep features of class k's and class l's images. S feeds the
Laplacian regulariser of the multi-task loss (:mod:`dmde.experts.multitask`, Eq. 5).

Decisions (docs/METHOD.md, "Multi-task head"): each class is represented by a random subsample of at most ``per_class``
images (R_k = min(n_k, per_class)); the bandwidth h defaults to the median pairwise squared
distance of the subsample (the "median heuristic"), so S does not depend on the feature scale;
classes without samples get zero rows and columns. Cost O((M·r)²·d) time and O(block·M·r) memory.
"""
from __future__ import annotations

import torch

from dmde.core.errors import DmdeValueError

__all__ = ["visual_similarity", "median_sq_distance"]

_MEDIAN_POINTS = 1024  # points used to estimate the median bandwidth (all of them when fewer)


def _subsample(labels: torch.Tensor, n_classes: int, per_class: int, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of at most ``per_class`` random samples of each class, grouped by class."""
    n = labels.numel()
    perm = torch.randperm(n, generator=generator).to(labels.device)  # random order within a class
    lab = labels[perm]
    order = torch.sort(lab, stable=True).indices
    idx, lab = perm[order], lab[order]  # (n,) grouped by class
    counts = torch.bincount(lab, minlength=n_classes)  # (M,)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=labels.device) - starts[lab]  # position inside its class
    return idx[rank < per_class]


def median_sq_distance(x: torch.Tensor, generator: torch.Generator | None = None) -> float:
    """Median squared Euclidean distance over the distinct pairs of the rows of ``x`` (n, d),
    estimated on at most 1024 random rows. Falls back to the mean, then 1.0, when it is 0."""
    if x.shape[0] > _MEDIAN_POINTS:
        x = x[torch.randperm(x.shape[0], generator=generator)[:_MEDIAN_POINTS].to(x.device)]
    if x.shape[0] < 2:
        return 1.0
    d2 = torch.cdist(x, x).pow(2)  # (p, p)
    iu = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    pairs = d2[iu[0], iu[1]]  # (p(p−1)/2,)
    for h in (pairs.median(), pairs.mean()):
        if torch.isfinite(h) and h > 0:
            return float(h)
    return 1.0


@torch.no_grad()
def visual_similarity(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    per_class: int = 32,
    bandwidth: str | float = "median",
    generator: torch.Generator | None = None,
    block_size: int = 4096,
) -> torch.Tensor:
    """Class-to-class visual similarity S (M, M) of Eq. 3 from deep features.

    ``features`` (n, d) and ``labels`` (n,) in 0..M−1 (M = ``n_classes``); ``bandwidth`` is
    ``"median"`` or the scale h > 0 of κ(x, y) = exp(−‖x − y‖² / h). Symmetric, entries in [0, 1],
    zero diagonal; a class with no sample has a zero row and column. ``generator`` seeds the
    subsample. Returns float64 for float64 features, else float32.
    """
    if features.dim() != 2 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
        raise DmdeValueError(
            f"features (n, d) and labels (n,) do not match: {tuple(features.shape)} vs {tuple(labels.shape)}"
        )
    if per_class < 1:
        raise DmdeValueError(f"per_class must be at least 1, got {per_class}")
    M = int(n_classes)
    labels = labels.to(features.device).long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= M):
        raise DmdeValueError(f"labels must lie in 0..{M - 1}")
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    S = torch.zeros(M, M, dtype=dtype, device=features.device)
    if labels.numel() == 0:
        return S

    idx = _subsample(labels, M, per_class, generator)
    x = features[idx].to(dtype)  # (m, d), m = Σ_k min(n_k, per_class)
    lab = labels[idx]  # (m,)
    if bandwidth == "median":
        h = median_sq_distance(x, generator)
    elif isinstance(bandwidth, (int, float)) and not isinstance(bandwidth, bool) and bandwidth > 0:
        h = float(bandwidth)
    else:
        raise DmdeValueError(f"bandwidth must be 'median' or a positive number, got {bandwidth!r}")

    m = x.shape[0]
    for s in range(0, m, block_size):
        d2 = torch.cdist(x[s : s + block_size], x).pow_(2).clamp_(min=0)  # (b, m)
        k = torch.exp(d2.div_(-h))  # (b, m) kernel values
        by_col = torch.zeros(k.shape[0], M, dtype=dtype, device=x.device).index_add_(1, lab, k)  # (b, M)
        S.index_add_(0, lab[s : s + block_size], by_col)  # (M, M) sums over class pairs
    counts = torch.bincount(lab, minlength=M).to(dtype)  # (M,) R_k
    S /= (counts[:, None] * counts[None, :]).clamp_(min=1)
    S = 0.5 * (S + S.T)  # exact symmetry despite float round-off
    S.fill_diagonal_(0)
    return S
