"""Evaluation (§V): top-k accuracy, per-class accuracy (Figs. 5, 6), how far, in WordNet,
a model's mistakes land (the mean distance D of Eq. 1 between the true and the predicted class),
and a stage-by-stage accounting of where the mixture loses accuracy:

* per expert, on the hold-out images: top-1 among its group's classes beside the flat model's top-1
  restricted to the same classes (argmax over the group's columns), not-in-group recall on images
  outside the group, the false not-in-group rate on images inside it, and the expected calibration
  error of its in-group probability 1 − φ;
* for the mixture, an oracle row (Υ from the groups that hold the true class only: a perfect gate),
  then argmax Υ, the N-way layer and the fine-tuned model, so each stage's loss reads as a difference.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmde.core.io import DirectoryLock, ensure_directory, write_json
from dmde.core.training import predict_logits
from dmde.fusion.stacking import LOG_VARIANTS, restrict_to_true_groups, stack
from dmde.hierarchy.ontology import Ontology
from dmde.hierarchy.semantic import shortest_path_distances
from dmde.hierarchy.taxonomy import two_layer_distances
from dmde.hierarchy.wordnet import WordNet
from dmde.run.config import resolve_device
from dmde.run.plots import plot_per_class
from dmde.run.prepare import prepare_splits, run_wordnet
from dmde.run.store import load_models
from dmde.run.tally import TOPK, ExpertTally, ScoreTally, restricted_hits, share

#: One line per model evaluated (INFO): progress that shows without progress bars.
log = logging.getLogger("dmde.evaluate")
#: Images per forward pass in evaluation, and the memory one chunk of evaluated images may take
#: (every model's scores and the mixtures' expert probabilities; :func:`chunk_images`).
EVAL_BATCH = 512
EVAL_MEMORY = 512 * 2**20


def class_distances(wnids: Sequence[str], wordnet_dir: str | None = None) -> np.ndarray:
    """Shortest hypernym-path distances (edges) between the classes (N, N)."""
    wn = WordNet.load(wordnet_dir)
    return np.asarray(shortest_path_distances(wn, wn.indices(list(wnids))))


def run_distances(onto: Ontology, cfg) -> np.ndarray | None:
    """The class distances a run's mistakes are measured in: WordNet's (``ontology.source=wordnet``),
    the taxonomy's two-layer tree (2 between siblings, 4 otherwise), or none for a visual tree
    (a distance in the tree the experts were grouped by would measure the grouping, not the mistake)."""
    if cfg.ontology.source == "wordnet":
        return class_distances(onto.classes, cfg.ontology.wordnet)
    if cfg.ontology.source == "taxonomy":
        return two_layer_distances(onto.category)
    return None


#: The mixtures of a run (:func:`dmde.run.store.load_models`), scored through their experts' probabilities.
MIXTURES = ("mixture_upsilon", "mixture_nway", "mixture")


def mixture_probs(models: dict[str, torch.nn.Module], data, device: torch.device | str = "cpu",
                  progress: bool = False, seconds: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Padded expert probabilities P (n, G, Mmax+1) of each mixture of ``models`` on ``data``, one
    pass of the experts per mixture; mixtures with the same experts and calibration share it.
    ``seconds``: each pass's time is added to its mixture's entry."""
    out: dict[str, torch.Tensor] = {}
    for name in MIXTURES:
        model = models.get(name)
        if model is None:
            continue
        twin = next((k for k in out if _same_experts(models[k], model)), None)
        if twin is not None:
            out[name] = out[twin]
            continue
        model.eval()
        g = len(model.experts)
        t0 = time.perf_counter()
        out[name] = predict_logits(lambda x: model.expert_probs(x).flatten(1), data, batch_size=EVAL_BATCH,
                                   device=device, progress=progress, desc=f"experts of {name}").view(len(data), g, -1)
        if seconds is not None:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
    return out


def _log_pass(what: str, n: int, seconds: float) -> None:
    """One line per pass over the evaluation images (INFO): the CLI shows it, also with --no-progress."""
    log.info("%s: %d images, %.0f img/s, %.1f s", what, n, n / max(seconds, 1e-9), seconds)


def _same_experts(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(x is y for x, y in zip(a.experts, b.experts)) and torch.equal(a.temperature, b.temperature) \
        and torch.equal(a.nig_bias, b.nig_bias)


@torch.no_grad()
def mixture_scores(model: torch.nn.Module, P: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """``model(x)`` from its experts' probabilities P: Υ (Eq. 7 or the variant), then the N-way layer
    in the batches :func:`~dmde.core.training.predict_logits` uses, so the numbers equal a direct pass."""
    u = stack(P, model.layout.to("cpu"), model.stacking, model.eps, model.lam)
    if model.nway is None:
        return u
    dev = model.temperature.device
    batch_size = batch_size or EVAL_BATCH
    return torch.cat([model.nway(u[s : s + batch_size].to(dev)).float().cpu() for s in range(0, len(u), batch_size)])


def restricted_top1(scores: torch.Tensor, targets: torch.Tensor, classes: Sequence[int]) -> float:
    """Top-1 among ``classes`` on the images of those classes: argmax over their columns only
    (a flat model read as if it were the expert of that group). NaN without such images."""
    cols = torch.as_tensor(list(classes), dtype=torch.long)
    inside = torch.isin(targets, cols)
    return share(restricted_hits(scores, targets, cols, inside), int(inside.sum()))


def expert_accounting(P: torch.Tensor, layout, targets: torch.Tensor,
                      flat_scores: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Per expert j, from padded expert probabilities P (B, G, Mmax+1) on labelled images:
    ``group_top1`` (among its M_j classes, on its classes' images), ``flat_group_top1`` (the flat
    model restricted to the same classes and images), ``nig_recall`` (images outside the group
    called not-in-group: φ above every in-group probability), ``false_nig_rate`` (images inside it
    called not-in-group) and ``phi_ece`` (expected calibration error of 1 − φ as the probability
    that the image belongs to the group). Chunk by chunk: :class:`~dmde.run.tally.ExpertTally`."""
    return ExpertTally(layout).add(P, targets, flat_scores).rows()


class MixtureAccounting:
    """The accounting rows of a run's mixtures, from their experts' probabilities
    (:func:`mixture_probs`), added chunk by chunk of images: ``mixture_oracle`` (the trained
    experts, Υ from the groups that hold the true class), ``mixture_upsilon_calibrated`` (argmax Υ
    after the fusion stage's calibration, when there is one), ``mixture_upsilon_eq7`` /
    ``mixture_upsilon_poe`` (argmax of the stacking the run did not use, on the same calibrated
    experts) and ``mixture_finetuned_oracle`` (the oracle of the fine-tuned experts); and the
    per-expert table (:func:`expert_accounting`) of the trained experts, with the φ calibration
    error after calibration when the run calibrates."""

    def __init__(self, models: dict[str, torch.nn.Module], dist: np.ndarray | None) -> None:
        self.models, self.dist = models, dist
        self.base = models.get("mixture_upsilon")
        self.layout = self.base.layout.to("cpu") if self.base is not None else None  # P is on the CPU
        self.experts = ExpertTally(self.layout) if self.base is not None else None
        self.tallies: dict[str, ScoreTally] = {}

    def _stacked(self, model: torch.nn.Module, P: torch.Tensor, variant: str | None = None) -> torch.Tensor:
        return stack(P, self.layout, variant or model.stacking, model.eps, model.lam)

    def _oracle(self, model: torch.nn.Module, P: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        if model.stacking not in LOG_VARIANTS:  # Eq. 7 and kin: only the true groups' terms
            return self._stacked(model, restrict_to_true_groups(P, layout, y))
        # A log score gives −69 to every class of a zeroed group (even one a true group holds):
        # keep the full score and rule out the classes outside the true groups instead.
        holds = (layout.class_index.unsqueeze(0) == y.view(-1, 1, 1)).any(-1)  # (B, G)
        member = torch.zeros(layout.n_groups, layout.n_classes, dtype=torch.bool)
        member[torch.arange(layout.n_groups).repeat_interleave(layout.sizes), layout.flat_class] = True
        allowed = (holds.float() @ member.float()) > 0  # (B, N)
        return self._stacked(model, P).masked_fill(~allowed, float("-inf"))

    def _add(self, name: str, scores: torch.Tensor, y: torch.Tensor) -> None:
        self.tallies.setdefault(name, ScoreTally(scores.shape[1], self.dist)).add(scores, y)

    def add(self, probs: dict[str, torch.Tensor], targets: torch.Tensor,
            flat_scores: torch.Tensor | None = None) -> MixtureAccounting:
        base, y = self.base, targets
        if base is None:
            return self
        P = probs["mixture_upsilon"]
        self._add("mixture_oracle", self._oracle(base, P, y), y)
        Pc = probs.get("mixture_nway", P)
        for variant in ("eq7", "poe"):  # the other stacking on the same (calibrated) experts: paired
            if variant != base.stacking and P.shape[-1] == self.layout.max_size + 1:
                self._add(f"mixture_upsilon_{variant}", self._stacked(base, Pc, variant), y)
        calibrated = Pc is not P  # the fusion stage calibrated the experts
        if calibrated:
            self._add("mixture_upsilon_calibrated", self._stacked(self.models["mixture_nway"], Pc), y)
        self.experts.add(P, y, flat_scores, Pc if calibrated else None)
        Pf = probs.get("mixture")
        if Pf is not None:
            self._add("mixture_finetuned_oracle", self._oracle(self.models["mixture"], Pf, y), y)
        return self

    def results(self) -> tuple[dict[str, dict], dict]:
        if self.base is None:
            return {}, {}
        return {k: t.metrics() for k, t in self.tallies.items()}, {"experts": self.experts.rows()}


def mixture_accounting(models: dict[str, torch.nn.Module], probs: dict[str, torch.Tensor], targets: torch.Tensor,
                       dist: np.ndarray | None, flat_scores: torch.Tensor | None = None) -> tuple[dict[str, dict], dict]:
    """:class:`MixtureAccounting` of one chunk: every image at once."""
    return MixtureAccounting(models, dist).add(probs, targets, flat_scores).results()


#: The order of the rows in metrics.json and the printed table: the accounting reads top down.
ROW_ORDER = ("mixture_oracle", "mixture_upsilon", "mixture_upsilon_calibrated", "mixture_upsilon_eq7",
             "mixture_upsilon_poe", "mixture_nway",
             "mixture_finetuned_oracle", "mixture", "flat", "flat_ensemble", "flat_wide", "early_fusion")


def write_per_class(path: str | os.PathLike, wnids: Sequence[str], lemmas: Sequence[str],
                    per_class: dict[str, np.ndarray]) -> None:
    names = list(per_class)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["position", "wnid", "lemma", *names])
        for p, (wnid, lemma) in enumerate(zip(wnids, lemmas)):
            w.writerow([p, wnid, lemma, *(f"{per_class[k][p]:.4f}" for k in names)])


def evaluate_run(run_dir: str | os.PathLike, data=None, device: torch.device | str = "auto",
                 progress: bool = False, out_dir: str | os.PathLike | None = None,
                 chunk: int | None = None) -> dict[str, Any]:
    """Evaluate every model of a run on ``data`` (default: the run's own hold-out split) and
    write ``metrics.json``, ``per_class.csv`` and ``per_class.png`` (into ``out_dir`` or the run),
    holding that directory's lock. The images go through in chunks of ``chunk`` (rounded up to whole
    batches of :data:`EVAL_BATCH`; default: :func:`chunk_images`), the figures accumulated as counts
    (:mod:`dmde.run.tally`)."""
    run_dir = Path(run_dir)
    device = resolve_device(device)
    models, cfg = load_models(run_dir, device)  # not a run, or a broken one: nothing is written
    out = ensure_directory(out_dir if out_dir is not None else run_dir, "evaluation output directory")
    with DirectoryLock(out):
        return _evaluate_run(run_dir, models, cfg, data, device, progress, out, chunk)


def chunk_images(models: dict[str, torch.nn.Module], n_classes: int, budget: int = EVAL_MEMORY) -> int:
    """Images per evaluation chunk: what fits ``budget`` bytes (a few score matrices of N floats and
    each mixture's G × (Mmax + 1) probabilities per image), in whole batches of :data:`EVAL_BATCH`
    (so the batches, and the numbers, are those of one pass over every image)."""
    per_image = 6 * n_classes * 4
    for name in MIXTURES:
        if name in models:
            layout = models[name].layout
            per_image += layout.n_groups * (layout.max_size + 1) * 4
    return max(EVAL_BATCH, budget // per_image // EVAL_BATCH * EVAL_BATCH)


def _evaluate_run(run_dir: Path, models: dict[str, torch.nn.Module], cfg, data, device: torch.device,
                  progress: bool, out: Path, chunk: int | None = None) -> dict[str, Any]:
    onto = Ontology.from_json(run_dir / "ontology.json")
    if data is None:
        splits = prepare_splits(cfg, run_wordnet(cfg), progress=progress, cache_dir=run_dir, device=device)
        data = splits.align(onto.positions_or(splits.classes)).holdout
    dist = run_distances(onto, cfg)
    n = onto.n_classes
    tallies = {name: ScoreTally(n, dist) for name in models}
    accounting = MixtureAccounting(models, dist)
    seconds = dict.fromkeys(models, 0.0)
    # whole batches per chunk: the batches, and so the numbers, of one pass over every image
    size = -(-chunk // EVAL_BATCH) * EVAL_BATCH if chunk else chunk_images(models, n)
    for s in range(0, len(data), size):  # memory bounded by the chunk: counts carry the figures
        part = data.subset(torch.arange(s, min(len(data), s + size)))
        probs = mixture_probs(models, part, device, progress, seconds)  # each mixture's experts run once
        flat_scores = None
        for name, model in models.items():
            t0 = time.perf_counter()
            if name in probs:
                scores = mixture_scores(model, probs[name])
            else:
                model.eval()
                scores = predict_logits(model, part, batch_size=EVAL_BATCH, device=device, progress=progress,
                                        desc=f"eval {name}")
            seconds[name] += time.perf_counter() - t0
            tallies[name].add(scores, part.targets)
            if name == "flat":
                flat_scores = scores
            del scores  # one (chunk, N) score matrix at a time
        accounting.add(probs, part.targets, flat_scores)
        del probs, flat_scores
        if size < len(data):
            log.info("evaluated %d of %d images", min(len(data), s + size), len(data))
    for name in models:
        _log_pass(f"eval {name}", len(data), seconds[name])
    metrics = {name: t.metrics() for name, t in tallies.items()}
    per_class = {name: t.per_class() for name, t in tallies.items()}
    rows, expert_table = accounting.results()
    metrics.update(rows)
    metrics = {k: metrics[k] for k in sorted(metrics, key=lambda k: ROW_ORDER.index(k) if k in ROW_ORDER else 99)}
    if expert_table:
        metrics["accounting"] = expert_table
    write_json(out / "metrics.json", metrics)
    write_per_class(out / "per_class.csv", onto.classes, onto.lemmas, per_class)
    plot_per_class(per_class, out / "per_class.png", names=onto.lemmas, named="mixture")
    return metrics


def model_rows(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The per-model entries of a metrics dict (without the ``accounting`` section)."""
    return {k: v for k, v in metrics.items() if isinstance(v, dict) and "top1" in v}


def format_accounting(metrics: dict[str, Any]) -> str:
    """The per-expert accounting as a markdown table (%), empty when the run has none."""
    table = (metrics.get("accounting") or {}).get("experts") or []
    if not table:
        return ""

    def pct(v: Any) -> str:
        return "–" if v is None or v != v else f"{100 * v:.1f}"

    cal = any("phi_ece_calibrated" in r for r in table)
    head = ["expert", "classes", "group top-1", "flat on its classes", "Δ", "not-in-group recall",
            "false not-in-group", "φ ECE"] + (["φ ECE calibrated"] if cal else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        d = r["group_top1"] - r["flat_group_top1"] if "flat_group_top1" in r else float("nan")
        vals = [str(r["expert"]), str(r["classes"]), pct(r["group_top1"]), pct(r.get("flat_group_top1")),
                "–" if d != d else f"{100 * d:+.1f}", pct(r.get("nig_recall")), pct(r.get("false_nig_rate")),
                pct(r.get("phi_ece"))] + ([pct(r.get("phi_ece_calibrated"))] if cal else [])
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def format_table(metrics: dict[str, Any], ks: Sequence[int] = TOPK) -> str:
    """Metrics as a markdown table (top-k in %); the accounting section is left out."""
    cols = [f"top-{k}" for k in ks] + ["mistake D"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in model_rows(metrics).items():
        vals = [f"{100 * m[f'top{k}']:.2f}" for k in ks]
        d = m.get("mistake_distance")
        vals.append("–" if d is None or d != d else f"{d:.2f}")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
