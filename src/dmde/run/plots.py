"""Figures: the two-layer ontology (Figs. 1–2, 15), per-class accuracy curves (Figs. 5–6),
accuracy against the number of experts and against λ (Figs. 13–14), prediction panels with an
image and the top-5 classes of two models side by side (Figs. 7–9), and dot plots (e.g. the mean
WordNet distance of each model's mistakes).

Every function draws on a fresh :class:`matplotlib.figure.Figure` (no pyplot state, no display
needed) and writes a PNG atomically.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from dmde.core.io import atomic_write

if TYPE_CHECKING:
    from dmde.hierarchy.ontology import Ontology

__all__ = ["plot_ontology", "plot_per_class", "plot_curves", "plot_points", "plot_predictions"]

#: Above this many classes the ontology figure shows categories only, one node each, sized by its
#: class count (a list of 10⁴ leaf labels is no figure).
MAX_LEAVES = 300
#: Category nodes per column when the ontology figure shows categories only.
CATEGORY_ROWS = 60


def _save(fig, path: str | os.PathLike, dpi: int) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_ontology(
    ontology: "Ontology",
    path: str | os.PathLike,
    max_leaves: int = MAX_LEAVES,
    title: str | None = None,
    dpi: int = 120,
) -> None:
    """Draw root → categories → classes like the paper's Figs. 1–2, turned on its side so that
    every class name is a horizontal line of readable text: root on the left, the categories, then
    the classes top to bottom in left-to-right order (a small gap between categories).

    With more than ``max_leaves`` classes the classes are collapsed into their categories: one node
    per category, its area proportional to its class count, labelled with its name and count, in
    columns of :data:`CATEGORY_ROWS` (read column by column: the left-to-right order).
    """
    n, k = ontology.n_classes, ontology.n_categories
    kind = {"visual": "visual tree", "taxonomy": "taxonomy"}.get(ontology.kind, "semantic ontology")
    if n > max_leaves:
        _plot_categories(ontology, path, title or f"{kind}: {k} categories, {n} classes "
                         "(categories only, area ∝ class count)", dpi)
        return
    cat = np.asarray(ontology.category)
    leaf_y = np.arange(n) + 0.6 * cat  # (N,) a gap between categories
    cat_y = np.array([leaf_y[cat == c].mean() for c in range(k)])
    root_y = float(cat_y.mean())
    x_root, x_cat, x_leaf = 0.0, 1.0, 2.0
    fig = Figure(figsize=(8.0, max(2.0, 0.13 * (leaf_y[-1] + 1) + 0.8)))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    edges = [[(x_root, root_y), (x_cat, y)] for y in cat_y] + [[(x_cat, cat_y[c]), (x_leaf, y)]
                                                              for c, y in zip(cat, leaf_y)]
    ax.add_collection(LineCollection(edges, colors="0.7", linewidths=0.6, zorder=1))
    ax.scatter(np.full(n, x_leaf), leaf_y, s=8, color="tab:green", zorder=2)
    ax.scatter(np.full(k, x_cat), cat_y, s=30, color="tab:blue", zorder=2)
    ax.scatter([x_root], [root_y], s=60, color="tab:red", zorder=2)
    ax.text(x_root - 0.04, root_y, "root", ha="right", va="center", fontsize=9)
    for p in range(n):
        ax.text(x_leaf + 0.04, leaf_y[p], _short(ontology.lemmas[p], 40), ha="left", va="center", fontsize=7)
    for c in range(k):
        ax.text(x_cat - 0.04, cat_y[c], _short(ontology.categories[c].name), ha="right", va="center", fontsize=8,
                weight="bold", bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.5), zorder=3)
    ax.set_xlim(-0.45, 3.2)
    ax.set_ylim(leaf_y[-1] + 0.8, -0.8)  # the first class at the top
    ax.set_title(title or f"{kind}: {k} categories, {n} classes", fontsize=11)
    _save(fig, path, dpi)


def _plot_categories(ontology: "Ontology", path: str | os.PathLike, title: str, dpi: int) -> None:
    """The ontology collapsed into its categories (:func:`plot_ontology` above ``max_leaves``)."""
    k = ontology.n_categories
    sizes = ontology.category_sizes()
    rows = min(k, CATEGORY_ROWS)
    cols = int(np.ceil(k / rows))
    c = np.arange(k)
    x, y = c // rows, c % rows  # column by column: the left-to-right order
    area = 6.0 + 250.0 * sizes / sizes.max()  # points²
    fig = Figure(figsize=(2.9 * cols + 0.5, 0.17 * rows + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    ax.scatter(x, y, s=area, color="tab:blue", alpha=0.7, zorder=2)
    for i in range(k):
        ax.text(x[i] + 0.07, y[i], f"{_short(ontology.categories[i].name, 24)} ({sizes[i]})", ha="left", va="center",
                fontsize=7)
    for ref in sorted({int(sizes.max()), int(np.median(sizes)), int(sizes.min())}, reverse=True):
        ax.scatter([], [], s=6.0 + 250.0 * ref / sizes.max(), color="tab:blue", alpha=0.7, label=f"{ref} classes")
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, fontsize=8, frameon=False)
    ax.set_xlim(-0.2, cols)
    ax.set_ylim(rows - 0.4, -0.6)
    ax.set_title(title, fontsize=11, pad=24)
    _save(fig, path, dpi)


def plot_per_class(per_class: dict[str, np.ndarray], path: str | os.PathLike, title: str | None = None,
                   dpi: int = 120, names: Sequence[str] | None = None, named: str | None = None,
                   n_named: int = 5) -> None:
    """Per-class top-1 accuracy of each model, classes sorted by accuracy (the paper's Figs. 5, 6).

    ``per_class`` maps a model's name to its (N,) accuracies (NaN for classes without images).
    With ``names`` (a name per class: lemmas, not WNIDs), the ``n_named`` best and worst classes
    of model ``named`` (default: the first) are marked on its curve and listed beside the plot.
    """
    fig = Figure(figsize=(9.5 if names is not None else 7, 4))
    ax = fig.add_subplot(1, 1, 1)
    named = named if named in per_class else next(iter(per_class), None)
    for name, acc in per_class.items():
        acc = np.asarray(acc, dtype=float)
        a = np.sort(acc[~np.isnan(acc)])[::-1]
        if not a.size:
            continue
        line, = ax.plot(np.arange(1, a.size + 1), 100 * a, label=f"{name} (mean {100 * a.mean():.1f}%)", lw=1.5)
        if names is None or name != named:
            continue
        seen = np.flatnonzero(~np.isnan(acc))
        order = seen[np.argsort(-acc[seen], kind="stable")]  # classes best first, as the curve
        m = min(n_named, order.size // 2 if order.size > 1 else order.size)
        ranks = np.r_[np.arange(m), np.arange(order.size - m, order.size)]
        ax.scatter(ranks + 1, 100 * acc[order[ranks]], s=18, color=line.get_color(), edgecolor="black", zorder=3)

        best, worst = order[:m], order[order.size - m:][::-1]  # worst: the lowest first
        best, worst = ("\n".join(f"{_short(str(names[c]), 26)}  {100 * acc[c]:.0f}%" for c in idx)
                       for idx in (best, worst))
        text = f"{name}: best {m}\n{best}\n\nworst {m}\n{worst}"
        ax.text(1.02, 1.0, text, transform=ax.transAxes, ha="left", va="top", fontsize=7.5, family="monospace")
    ax.set_xlabel("classes, sorted by accuracy")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or "Per-class accuracy")
    _save(fig, path, dpi)


def plot_curves(x: list[float], series: dict[str, tuple[list[float], list[float] | None]], path: str | os.PathLike,
                xlabel: str, ylabel: str, title: str, dpi: int = 120, lines: bool = True,
                point_labels: Sequence[str] | None = None) -> None:
    """One series per model, ``series[name] = (y, yerr or None)`` over the shared ``x`` (Figs. 13, 14).

    ``lines=False`` draws points only: where the points are separate settings (each λ of the
    accuracy-against-experts plot) a line would invent the values between them. ``point_labels``
    names each x (e.g. its λ) beside the points of the first series.
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^vP*X"
    for s_i, (name, (y, err)) in enumerate(series.items()):
        ax.errorbar(x, y, yerr=err, marker=markers[s_i % len(markers)], capsize=3, lw=1.5 if lines else 0,
                    elinewidth=1.0, label=name, linestyle="-" if lines else "none")
        if point_labels is not None and s_i == 0:
            for i, (xi, yi, lab) in enumerate(zip(x, y, point_labels)):
                below = sum(xj == xi for xj in x[:i])  # settings that share an x: their labels stacked
                ax.annotate(lab, (xi, yi), textcoords="offset points", xytext=(6, 6 - 11 * below), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path, dpi)


def plot_points(names: list[str], values: list[float], errors: list[float] | None, path: str | os.PathLike,
                xlabel: str, title: str, dpi: int = 120) -> None:
    """A dot per model with its error bar (e.g. mean ± std over seeds), each labelled with its value
    and its difference to the first model.

    A dot plot, not bars: a bar's length says its value from zero, so bars must start at zero, and
    mistake distances of 10.37 and 10.28 then look equal; a dot's position needs no zero, so the
    axis spans the values (and their error bars) and the differences show.
    """
    v = np.asarray(values, dtype=float)
    e = np.zeros_like(v) if errors is None else np.nan_to_num(np.asarray(errors, dtype=float))
    fig = Figure(figsize=(7, 0.45 * len(names) + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(len(names))
    ax.errorbar(v, pos, xerr=e, fmt="o", color="tab:blue", capsize=3)
    lo, hi = float(np.nanmin(v - e)), float(np.nanmax(v + e))
    pad = 0.15 * max(hi - lo, 1e-3 * max(abs(hi), 1.0))
    ax.set_xlim(lo - pad, hi + 3 * pad)  # room for the labels on the right
    for p, (val, err) in enumerate(zip(v, e)):
        diff = "" if p == 0 else f"  ({val - v[0]:+.2f} vs the first)"
        ax.annotate(f"{val:.2f}" + (f" ± {err:.2f}" if err else "") + diff, (val + err, p),
                    textcoords="offset points", xytext=(6, 0), va="center", fontsize=8)
    ax.set_yticks(pos)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)  # the first model at the top
    ax.set_xlabel(xlabel + " (axis spans the values, not from 0)")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title)
    _save(fig, path, dpi)


def plot_predictions(images: list[np.ndarray], truths: list[str],
                     predictions: dict[str, list[list[tuple[str, float]]]], path: str | os.PathLike,
                     title: str | None = None, dpi: int = 100) -> None:
    """The paper's Figs. 7–9: each image (H, W, 3 uint8) with its true class, and for every model
    its top-k classes with scores, side by side; a correct class is drawn in green."""
    models = list(predictions)
    n = len(images)
    fig = Figure(figsize=(2.0 + 3.2 * len(models), 1.9 * n))
    for i, (img, truth) in enumerate(zip(images, truths)):
        ax = fig.add_subplot(n, 1 + len(models), i * (1 + len(models)) + 1)
        ax.imshow(img, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(truth, fontsize=8)
        for m, name in enumerate(models):
            ax = fig.add_subplot(n, 1 + len(models), i * (1 + len(models)) + 2 + m)
            top = predictions[name][i]
            labels = [lemma for lemma, _ in top][::-1]
            scores = [score for _, score in top][::-1]
            colours = ["tab:green" if lemma == truth else "tab:gray" for lemma in labels]
            ax.barh(np.arange(len(top)), scores, color=colours)
            ax.set_yticks(np.arange(len(top)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.set_xlim(0, 1)
            ax.tick_params(axis="x", labelsize=6)
            if i == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path, dpi)
