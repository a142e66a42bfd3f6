"""Evaluation (§V): top-k accuracy, per-class accuracy (Figs. 5, 6) and how far, in WordNet,
a model's mistakes land (the mean distance D of Eq. 1 between the true and the predicted class).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dmde.errors import DmdeValueError
from dmde.io import write_json

TOPK = (1, 2, 5, 10)


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = TOPK) -> dict[str, float]:
    """Share of samples whose true class is among the k highest scores, for each k (k ≤ N)."""
    if scores.shape[0] != targets.shape[0]:
        raise DmdeValueError(f"{scores.shape[0]} score rows for {targets.shape[0]} targets")
    n = scores.shape[1]
    kmax = min(max(ks), n)
    top = scores.topk(kmax, dim=1).indices  # (B, kmax)
    hit = top == targets.unsqueeze(1)
    return {f"top{k}": float(hit[:, : min(k, n)].any(1).float().mean()) for k in ks}


def per_class_accuracy(scores: torch.Tensor, targets: torch.Tensor, n_classes: int) -> np.ndarray:
    """Top-1 accuracy of every class (NaN for a class without samples)."""
    pred = scores.argmax(1)
    correct = torch.bincount(targets[pred == targets], minlength=n_classes).double()
    total = torch.bincount(targets, minlength=n_classes).double()
    acc = (correct / total).numpy()
    acc[total.numpy() == 0] = np.nan
    return acc


def mistake_distance(scores: torch.Tensor, targets: torch.Tensor, dist: np.ndarray) -> float:
    """Mean WordNet distance D (edges + 1, Eq. 1) between true and predicted class over the
    top-1 mistakes: a hierarchy-aware error (smaller means the mistakes are nearer misses)."""
    pred = scores.argmax(1)
    wrong = pred != targets
    if not bool(wrong.any()):
        return float("nan")
    d = dist[targets[wrong].numpy(), pred[wrong].numpy()]
    return float(np.mean(d + 1))


def class_distances(wnids: Sequence[str], wordnet_dir: str | None = None) -> np.ndarray:
    """Shortest hypernym-path distances (edges) between the classes (N, N)."""
    from dmde.semantic import shortest_path_distances
    from dmde.wordnet import WordNet

    wn = WordNet.load(wordnet_dir)
    return np.asarray(shortest_path_distances(wn, wn.indices(list(wnids))))


def evaluate_models(models: dict[str, torch.nn.Module], data, n_classes: int, dist: np.ndarray | None,
                    device: torch.device | str = "cpu", progress: bool = False) -> tuple[dict, dict]:
    """Metrics of every model on ``data`` (an :class:`~dmde.training.ImageTensors`), and their
    per-class accuracies."""
    from dmde.training import predict_logits

    metrics, per_class = {}, {}
    for name, model in models.items():
        model.eval()
        scores = predict_logits(model, data, device=device, progress=progress, desc=f"eval {name}")
        m: dict[str, Any] = topk_accuracy(scores, data.targets)
        if dist is not None:
            m["mistake_distance"] = mistake_distance(scores, data.targets, dist)
        m["n_images"] = len(data)
        metrics[name] = m
        per_class[name] = per_class_accuracy(scores, data.targets, n_classes)
    return metrics, per_class


def write_per_class(path: str | os.PathLike, wnids: Sequence[str], lemmas: Sequence[str],
                    per_class: dict[str, np.ndarray]) -> None:
    names = list(per_class)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["position", "wnid", "lemma", *names])
        for p, (wnid, lemma) in enumerate(zip(wnids, lemmas)):
            w.writerow([p, wnid, lemma, *(f"{per_class[k][p]:.4f}" for k in names)])


def evaluate_run(run_dir: str | os.PathLike, data=None, device: torch.device | str = "cpu",
                 progress: bool = False, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate every model of a run on ``data`` (default: the run's own hold-out split) and
    write ``metrics.json``, ``per_class.csv`` and ``per_class.png`` (into ``out_dir`` or the run)."""
    from dmde.ontology import Ontology
    from dmde.pipeline import load_models, prepare_splits
    from dmde.plots import plot_per_class

    run_dir = Path(run_dir)
    models, cfg = load_models(run_dir, device)
    onto = Ontology.from_json(run_dir / "ontology.json")
    if data is None:
        from dmde.wordnet import WordNet

        splits = prepare_splits(cfg, WordNet.load(cfg.ontology.wordnet), progress=progress, cache_dir=run_dir,
                                device=device)
        data = splits.align(onto.positions_or(splits.classes)).holdout
    dist = class_distances(onto.classes, cfg.ontology.wordnet)
    metrics, per_class = evaluate_models(models, data, onto.n_classes, dist, device, progress)
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    write_per_class(out / "per_class.csv", onto.classes, onto.lemmas, per_class)
    plot_per_class(per_class, out / "per_class.png")
    return metrics


def format_table(metrics: dict[str, dict[str, float]], ks: Sequence[int] = TOPK) -> str:
    """Metrics as a markdown table (top-k in %)."""
    cols = [f"top-{k}" for k in ks] + ["mistake D"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in metrics.items():
        vals = [f"{100 * m[f'top{k}']:.2f}" for k in ks]
        d = m.get("mistake_distance")
        vals.append("–" if d is None or d != d else f"{d:.2f}")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
