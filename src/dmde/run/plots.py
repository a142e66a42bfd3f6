"""Figures: the two-layer ontology (Figs. 1–2, 15), per-class accuracy curves (Figs. 5–6),
accuracy against the number of experts and against λ (Figs. 13–14), prediction panels with an
image and the top-5 classes of two models side by side (Figs. 7–9), and bar charts (e.g. the mean
WordNet distance of each model's mistakes).

Every function draws on a fresh :class:`matplotlib.figure.Figure` (no pyplot state, no display
needed) and writes a PNG atomically.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from dmde.core.io import atomic_write

if TYPE_CHECKING:
    from dmde.hierarchy.ontology import Ontology

__all__ = ["plot_ontology", "plot_per_class", "plot_curves", "plot_bars", "plot_predictions"]

#: Above this many classes the ontology figure shows categories only (leaf labels unreadable).
MAX_LEAVES = 300
#: Above this many categories only every k-th category is labelled.
MAX_CATEGORY_LABELS = 120


def _save(fig, path: str | os.PathLike, dpi: int) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


def plot_ontology(
    ontology: "Ontology",
    path: str | os.PathLike,
    max_leaves: int = MAX_LEAVES,
    title: str | None = None,
    dpi: int = 120,
) -> None:
    """Draw root → categories → classes, left to right, like the paper's Figs. 1–2.

    With more than ``max_leaves`` classes the leaves are dropped and each category node shows
    its class count instead, so the figure stays readable up to N = 21,841.
    """
    n, k = ontology.n_classes, ontology.n_categories
    cat = np.asarray(ontology.category)
    sizes = ontology.category_sizes()
    show_leaves = n <= max_leaves
    span = n if show_leaves else k
    width = float(np.clip((0.16 if show_leaves else 0.3) * span + 2.0, 6.0, 60.0))
    height = 6.0 if show_leaves else 4.5
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()

    if show_leaves:
        leaf_x = np.arange(n, dtype=float)
        cat_x = np.array([leaf_x[cat == c].mean() for c in range(k)])
    else:
        cat_x = np.arange(k, dtype=float)  # evenly spaced: labels stay apart; sizes go in the labels
    root_x = float(cat_x.mean()) if k else 0.0
    y_root, y_cat, y_leaf = 2.0, 1.0, 0.0

    line = dict(color="0.6", linewidth=0.6, zorder=1)
    for c in range(k):
        ax.plot([root_x, cat_x[c]], [y_root, y_cat], **line)
    if show_leaves:
        for p in range(n):
            ax.plot([cat_x[cat[p]], leaf_x[p]], [y_cat, y_leaf], **line)
        ax.scatter(leaf_x, np.full(n, y_leaf), s=10, color="tab:green", zorder=2)
        fs = float(np.clip(260.0 / max(n, 1) ** 0.9, 4.0, 9.0))
        for p in range(n):
            ax.text(leaf_x[p], y_leaf - 0.05, ontology.lemmas[p], rotation=90, ha="center", va="top", fontsize=fs)
    ax.scatter(cat_x, np.full(k, y_cat), s=30, color="tab:blue", zorder=2)
    ax.scatter([root_x], [y_root], s=60, color="tab:red", zorder=2)
    ax.text(root_x, y_root + 0.08, "root", ha="center", va="bottom", fontsize=10)

    step = max(1, int(np.ceil(k / MAX_CATEGORY_LABELS)))
    fs_cat = float(np.clip(300.0 / max(k, 1), 5.0, 10.0))
    for c in range(0, k, step):
        label = ontology.categories[c].name if show_leaves else f"{ontology.categories[c].name} ({sizes[c]})"
        ax.text(cat_x[c], y_cat + 0.06, label, rotation=45 if k > 8 else 0, ha="left" if k > 8 else "center",
                va="bottom", fontsize=fs_cat)
    kind = "visual tree" if ontology.kind == "visual" else "semantic ontology"
    shown = "" if show_leaves else " (categories only)"
    ax.set_title(title or f"{kind}: {k} categories, {n} classes{shown}", fontsize=11)
    ax.set_ylim(y_leaf - 0.15 if show_leaves else y_cat - 0.3, y_root + 0.5)  # tight bbox keeps labels
    _save(fig, path, dpi)


def plot_per_class(per_class: dict[str, np.ndarray], path: str | os.PathLike, title: str | None = None,
                   dpi: int = 120) -> None:
    """Per-class top-1 accuracy of each model, classes sorted by accuracy (the paper's Figs. 5, 6).

    ``per_class`` maps a model's name to its (N,) accuracies (NaN for classes without images).
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    for name, acc in per_class.items():
        a = np.sort(np.asarray(acc, dtype=float)[~np.isnan(acc)])[::-1]
        if a.size:
            ax.plot(np.arange(1, a.size + 1), 100 * a, label=f"{name} (mean {100 * a.mean():.1f}%)", lw=1.5)
    ax.set_xlabel("classes, sorted by accuracy")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or "Per-class accuracy")
    _save(fig, path, dpi)


def plot_curves(x: list[float], series: dict[str, tuple[list[float], list[float] | None]], path: str | os.PathLike,
                xlabel: str, ylabel: str, title: str, dpi: int = 120) -> None:
    """One line per series, ``series[name] = (y, yerr or None)`` over the shared ``x`` (Figs. 13, 14)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for name, (y, err) in series.items():
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, lw=1.5, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path, dpi)


def plot_bars(names: list[str], values: list[float], errors: list[float] | None, path: str | os.PathLike,
              ylabel: str, title: str, dpi: int = 120) -> None:
    """A bar per model with an error bar (e.g. mean ± std over seeds)."""
    fig = Figure(figsize=(max(5.0, 0.9 * len(names) + 2), 4))
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(len(names))
    ax.bar(pos, values, yerr=errors, capsize=3, color="tab:blue", alpha=0.8)
    for p, v in zip(pos, values):
        ax.text(p, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
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
