"""Why the mixture stays under the ensemble of flat models (issue "The mixture earns its place"),
offline on one finished run that holds the experts, the flat model and the ensemble (the suite's row
`ensemble`): nothing is trained, everything is measured on the run's hold-out.

    .venv/bin/python benchmarks/diversity.py RUN_DIR

Prints three tables (top-1 and rates in %):

1. **Voters and fusion.** The ensemble's curve (the mean probabilities of its first k flat models,
   k = 1, 2, 4, G) beside the mixture's argmax Υ, and the flat models *dressed as experts*: flat
   model j keeps group j's classes and folds the rest of its softmax into a not-in-group
   probability, and the experts' own stacking rule (the product, ``fusion.stacking``) fuses the G of
   them. The same fusion over voters of known quality: where the dressed flat models come out as
   high as the ensemble, the fusion's restriction to groups costs nothing and the experts are the
   weaker voters; where they fall to the mixture, the restriction is what costs.
2. **Diversity.** For every pair of experts j < k that share classes S: on the hold-out images of S,
   each restricted to S (argmax over S's columns), how often the two disagree and how often both are
   wrong; the same for flat models j and k of the ensemble on the same images and columns.
   Image-weighted means over the pairs.
3. **Each expert against the flat model** on its own classes (restricted to them): top-1 of each and
   how often the two disagree.
"""
from __future__ import annotations

import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Sequence

import torch

from dmde.core.training import predict_logits
from dmde.experts.distill import fold_to_group
from dmde.fusion.stacking import GroupLayout, stack
from dmde.hierarchy.ontology import Ontology
from dmde.hierarchy.wordnet import WordNet
from dmde.run.prepare import prepare_splits
from dmde.run.store import load_models


def top1(scores: torch.Tensor, y: torch.Tensor) -> float:
    return 100 * float((scores.argmax(1) == y).float().mean())


def dressed(flat_logits: Sequence[torch.Tensor], layout: GroupLayout) -> torch.Tensor:
    """Flat models' softmaxes as the experts' padded probabilities P (B, G, Mmax+1): flat model j
    keeps group j's classes as they are and folds every other class's mass into not-in-group
    (:func:`dmde.experts.distill.fold_to_group`, the folding of distillation's soft targets)."""
    return layout.pad_probs([fold_to_group(torch.softmax(z, -1), g) for z, g in zip(flat_logits, layout.groups)])


def main(run: Path) -> None:
    t0 = time.perf_counter()
    models, cfg = load_models(run)
    if "flat_ensemble" not in models:
        raise SystemExit(f"{run} holds no ensemble of flat models (the suite's row `ensemble` does)")
    onto = Ontology.from_json(run / "ontology.json")
    splits = prepare_splits(cfg, WordNet.load(cfg.ontology.wordnet), progress=False, cache_dir=run)
    splits = splits.align(onto.positions_or(splits.classes))
    hold, y = splits.holdout, splits.holdout.targets
    mix = models["mixture_upsilon"]
    layout = GroupLayout.from_groups(mix.layout.groups, onto.n_classes)
    n, g_count, m_max = onto.n_classes, layout.n_groups, layout.max_size
    with torch.no_grad():
        raw = predict_logits(lambda x: mix.padded_logits(x).flatten(1), hold).view(len(y), g_count, -1)
        probs = torch.softmax(mix.calibrate(raw), -1)  # (B, G, Mmax+1), calibrated as in the run
        members = [predict_logits(m, hold) for m in models["flat_ensemble"].members]  # G × (B, N)
    rule = cfg.fusion.stacking

    def mean_probs(k: int) -> torch.Tensor:
        return torch.stack([torch.softmax(z, -1) for z in members[:k]]).mean(0)

    print(f"run {run.name}: {g_count} experts, {len(members)} flat models, stacking {rule}, "
          f"{len(y)} hold-out images\n")
    print("| voters | fusion | top-1 |\n|---|---|---|")
    for k in sorted({1, 2, 4, len(members)}):
        print(f"| the first {k} flat model(s) | mean of the probabilities | {top1(mean_probs(k), y):.2f} |")
    print(f"| the {g_count} experts (calibrated) | {rule} (argmax Υ) | {top1(stack(probs, layout, rule), y):.2f} |")
    raw_p = torch.softmax(raw, -1)
    print(f"| the {g_count} experts (raw) | {rule} | {top1(stack(raw_p, layout, rule), y):.2f} |")
    if len(members) >= g_count:
        d = dressed(members[:g_count], layout)
        print(f"| {g_count} flat models dressed as the experts (flat model j keeps group j) | {rule} | "
              f"{top1(stack(d, layout, rule), y):.2f} |")
    d0 = dressed([members[0]] * g_count, layout)
    print(f"| the flat model dressed as every expert | {rule} | {top1(stack(d0, layout, rule), y):.2f} |")

    # per-expert N-class score matrices (−inf outside the group), for restricted argmaxes
    full = torch.full((len(y), g_count, n), -float("inf"))
    for j, grp in enumerate(layout.groups):
        full[:, j, torch.as_tensor(grp)] = raw[:, j, : len(grp)]

    def restricted(scores: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return cols[scores[:, cols].argmax(1)]

    totals = {k: 0.0 for k in ("images", "e_dis", "e_both", "f_dis", "f_both", "e_acc", "f_acc")}
    for j, k in combinations(range(g_count), 2):
        shared = sorted(set(layout.groups[j]) & set(layout.groups[k]))
        if not shared or k >= len(members):
            continue
        cols = torch.as_tensor(shared)
        rows = torch.isin(y, cols)
        if not rows.any():
            continue
        yy = y[rows]
        ej, ek = restricted(full[rows, j], cols), restricted(full[rows, k], cols)
        fj, fk = restricted(members[j][rows], cols), restricted(members[k][rows], cols)
        w = float(rows.sum())
        totals["images"] += w
        totals["e_dis"] += w * float((ej != ek).float().mean())
        totals["e_both"] += w * float(((ej != yy) & (ek != yy)).float().mean())
        totals["f_dis"] += w * float((fj != fk).float().mean())
        totals["f_both"] += w * float(((fj != yy) & (fk != yy)).float().mean())
        totals["e_acc"] += w * float(((ej == yy).float().mean() + (ek == yy).float().mean()) / 2)
        totals["f_acc"] += w * float(((fj == yy).float().mean() + (fk == yy).float().mean()) / 2)
    w = max(totals["images"], 1.0)
    print("\n| pairs sharing classes, restricted to them | top-1 (mean of the two) | disagree | both wrong |\n"
          "|---|---|---|---|")
    print(f"| experts j, k | {100 * totals['e_acc'] / w:.2f} | {100 * totals['e_dis'] / w:.2f} | "
          f"{100 * totals['e_both'] / w:.2f} |")
    print(f"| flat models j, k | {100 * totals['f_acc'] / w:.2f} | {100 * totals['f_dis'] / w:.2f} | "
          f"{100 * totals['f_both'] / w:.2f} |")

    print("\n| expert | its top-1 | flat model's top-1 (restricted) | disagree |\n|---|---|---|---|")
    for j, grp in enumerate(layout.groups):
        cols = torch.as_tensor(grp)
        rows = torch.isin(y, cols)
        e, f = restricted(full[rows, j], cols), restricted(members[0][rows], cols)
        print(f"| {j} | {100 * float((e == y[rows]).float().mean()):.2f} | "
              f"{100 * float((f == y[rows]).float().mean()):.2f} | {100 * float((e != f).float().mean()):.2f} |")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
