"""Every figure draws on a small fixture and at 10⁴ classes, fast, into a PNG (dmde.run.plots)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from dmde.hierarchy.ontology import Category, Ontology
from dmde.run import plots


def _ontology(n: int, k: int, seed: int = 0) -> Ontology:
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), k - 1, replace=False))
    cat = np.repeat(np.arange(k), np.diff(np.r_[0, cuts, n]))
    return Ontology(classes=[f"n{i:08d}" for i in range(n)], lemmas=[f"class {i}" for i in range(n)],
                    category=cat.tolist(), categories=[Category(f"category {c}") for c in range(k)])


def _spy_texts(monkeypatch) -> list[tuple[str, float]]:
    """Record (text, font size) of every ``ax.text`` the plots draw."""
    texts: list[tuple[str, float]] = []
    real = plots.Figure.add_subplot

    def spy(fig, *a, **kw):
        ax = real(fig, *a, **kw)
        draw = ax.text
        ax.text = lambda *ta, **tk: texts.append((ta[2], tk.get("fontsize", 10))) or draw(*ta, **tk)
        return ax

    monkeypatch.setattr(plots.Figure, "add_subplot", spy)
    return texts


def _png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.mark.parametrize("n, k", [(12, 3), (200, 14), (10_000, 500)])
def test_the_ontology_figure_shows_leaves_up_to_the_limit_then_categories(tmp_path, monkeypatch, n, k):
    texts = _spy_texts(monkeypatch)
    onto = _ontology(n, k)
    t0 = time.perf_counter()
    plots.plot_ontology(onto, tmp_path / "o.png")
    assert time.perf_counter() - t0 < 60  # seconds on a quiet 2-core machine: about 5; a loose bound (the tests may share the cores)
    _png(tmp_path / "o.png")
    drawn = dict(texts)
    if n <= plots.MAX_LEAVES:  # every class named, horizontally, at a size one can read
        assert all(drawn.get(name, 0) >= 7 for name in onto.lemmas)
    else:  # one node per category, named with its class count; no class names
        sizes = onto.category_sizes()
        assert all(f"category {c} ({sizes[c]})" in drawn for c in range(k)) and not set(onto.lemmas) & set(drawn)


def test_the_per_class_curve_names_the_best_and_worst_classes(tmp_path, monkeypatch):
    acc = np.linspace(0.9, 0.1, 9)
    acc = np.r_[acc, np.nan][[3, 0, 9, 8, 1, 2, 4, 5, 7, 6]]  # shuffled; one class without images
    names = [f"class {i}" for i in range(10)]
    texts = _spy_texts(monkeypatch)
    plots.plot_per_class({"mixture": acc, "flat": acc[::-1]}, tmp_path / "pc.png", names=names, n_named=3)
    _png(tmp_path / "pc.png")
    ((listing, _),) = texts
    best, worst = listing.split("\n\n")
    order = [names[i] for i in np.argsort(-np.nan_to_num(acc, nan=-1))][:9]  # best first, without the NaN
    assert [ln.rsplit("  ", 1)[0] for ln in best.splitlines()[1:]] == order[:3]
    assert [ln.rsplit("  ", 1)[0] for ln in worst.splitlines()[1:]] == order[::-1][:3]
    assert best.startswith("mixture: best 3") and "class 2" not in listing  # class 2 has no images


def test_the_per_class_curve_at_ten_thousand_classes_is_fast(tmp_path):
    acc = np.random.default_rng(0).uniform(0, 1, 10_000)
    t0 = time.perf_counter()
    plots.plot_per_class({"mixture": acc, "flat": acc ** 2}, tmp_path / "pc.png",
                         names=[f"class {i}" for i in range(10_000)])
    assert time.perf_counter() - t0 < 60  # as above
    _png(tmp_path / "pc.png")


def test_points_of_separate_settings_are_not_joined(tmp_path, monkeypatch):
    styles = []
    real = plots.Figure.add_subplot

    def spy(fig, *a, **kw):
        ax = real(fig, *a, **kw)
        draw = ax.errorbar
        ax.errorbar = lambda *ea, **ek: styles.append(ek.get("linestyle")) or draw(*ea, **ek)
        return ax

    monkeypatch.setattr(plots.Figure, "add_subplot", spy)
    series = {"mixture": ([40.0, 42.0, 39.0], [1.0, 1.0, 1.0]), "argmax Υ": ([35.0, 36.0, 33.0], None)}
    plots.plot_curves([12, 8, 5], series, tmp_path / "e.png", "number of experts", "top-1 (%)", "t",
                      lines=False, point_labels=["λ=0.7", "λ=0.5", "λ=0.2"])
    plots.plot_curves([0.2, 0.5, 0.7], series, tmp_path / "l.png", "λ", "top-1 (%)", "t")
    assert styles == ["none", "none", "-", "-"]
    _png(tmp_path / "e.png"), _png(tmp_path / "l.png")


def test_close_mistake_distances_get_an_axis_that_shows_their_differences(tmp_path, monkeypatch):
    axes = []
    real = plots.Figure.add_subplot
    monkeypatch.setattr(plots.Figure, "add_subplot", lambda fig, *a, **kw: axes.append(real(fig, *a, **kw)) or axes[-1])
    plots.plot_points(["mixture", "argmax Υ", "flat"], [10.37, 10.28, 10.29], [0.02, 0.01, 0.03],
                      tmp_path / "d.png", "mean D of top-1 mistakes", "t")
    lo, hi = axes[0].get_xlim()
    assert 10.0 < lo < 10.26 and 10.39 < hi < 10.6  # spans the values, not 0..10.4
    labels = [t.get_text() for t in axes[0].texts]
    assert labels == ["10.37 ± 0.02", "10.28 ± 0.01  (-0.09 vs the first)", "10.29 ± 0.03  (-0.08 vs the first)"]
    _png(tmp_path / "d.png")


def test_prediction_panels_draw(tmp_path):
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    preds = {"mixture": [[("cat", 0.7), ("dog", 0.2)]], "flat": [[("dog", 0.6), ("cat", 0.3)]]}
    plots.plot_predictions([img], ["cat"], preds, tmp_path / "p.png")
    _png(tmp_path / "p.png")
