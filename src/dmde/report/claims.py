"""The report's "claims" table: each of the paper's claims (and each fidelity step of the full-budget
suite) as a difference of paired seeds, a − b, with its verdict (:func:`dmde.report.results.verdict`)."""
from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from dmde.report.results import (RowResult, _expert_group_top1, _final, ensemble_row, fmt, mean_std, paired,
                                 verdict)

#: The full-budget suite's steps of the recipe (configs/paper-full/suite.yaml): each row undoes one step
#: of the mixture row, and the claim is that the step helps (mixture − row > 0, paired seeds).
STEPS = (
    ("narrow_groups", "each class in 4 of the 8 experts (M = 100, λ = 0.75) > in 2 (M = 50, λ = 0.5)"),
    ("wider_groups", "each class in 4 of the 8 experts > in 6 (M = 150, not-in-group 1:1)"),
    ("wider_natural", "each class in 4 of the 8 experts > in 6 (M = 150, not-in-group at its natural share)"),
    ("finetune_all", "fine-tuning on the fusion split > on every training image"),
    ("no_pool_temperature", "τ before the N-way layer helps"),
    ("eq7", "the product of the experts > Eq. 7"),
    ("no_nway", "the N-way layer helps"),
    ("no_calibration", "calibrating the experts helps"),
    ("init_flat", "the experts' start from the backbone > from the flat model (HD-CNN's warm start)"),
    ("gentle_warm_start", "the start from the backbone > the warm start at a quarter of the learning rate"),
    ("view_epochs", "equal steps help the experts (budget flat_steps > epochs)"),
)

#: Additions to the recipe (rows of the suite that add a step): (row, the claim that it helps, its claim over flat).
ADDITIONS = (
    ("distill", "the flat model's soft targets help the experts", "distilled mixture > flat"),
    ("sixteen_experts", "16 experts at half the steps (each class in 8) > 8 at the flat model's steps (in 4)",
     "16 experts' mixture > flat"),
    ("twelve_experts", "12 experts at 2/3 of the steps (each class in 6) > 8 at the flat model's steps (in 4)",
     "12 experts' mixture > flat"),
)


def claims(res: dict[str, RowResult], final: str | None, lam_rows) -> list[str]:
    mix = res["mixture"]
    L = ["### The paper's claims here", "",
         "Differences in top-1 points, mean ± std over the paired seeds (a − b per seed).", "",
         "| claim | a | b | a − b (top-1) | verdict |", "|---|---|---|---|---|"]

    def end(name: str) -> tuple[str, str | None]:
        """(row, its final model): the last stage a row's runs reached."""
        return name, _final(res.get(name))

    def row(claim: str, a: tuple[str, str | None], b: tuple[str, str | None], weak: bool = False) -> None:
        ra, rb = res.get(a[0]), res.get(b[0])
        if ra is None or rb is None or a[1] is None or b[1] is None:
            L.append(f"| {claim} | {a[0]}:{a[1]} | {b[0]}:{b[1]} | – | not measured (row missing) |")
            return
        d = paired(ra.values(a[1], "top1"), rb.values(b[1], "top1"))
        L.append(f"| {claim} | {a[0]}:{a[1]} | {b[0]}:{b[1]} | {fmt(d)} | {verdict(d, weak)} |")

    row("mixture > flat", ("mixture", final), ("mixture", "flat"))
    ens = ensemble_row(res)
    if ens is not None:
        row("mixture > ensemble of G flat models (equal compute)", ("mixture", final), (ens, "flat_ensemble"))
    if final == "mixture" and "mixture_nway" in mix.models():
        row("end-to-end fine-tuning helps (Eq. 11 > Eq. 10)", ("mixture", "mixture"), ("mixture", "mixture_nway"))
    for name, claim in STEPS:
        if name in res:
            row(f"{claim} (mixture > {name})", ("mixture", final), end(name))
    if "no_pool_temperature" in res:
        row("τ before the N-way layer helps the N-way layer (mixture > no_pool_temperature)",
            ("mixture", "mixture_nway"), ("no_pool_temperature", "mixture_nway"))
    for name, claim, over_flat in ADDITIONS:  # not a step undone: the row is a, the mixture b
        if name in res:
            row(f"{claim} ({name} > mixture)", end(name), ("mixture", final))
            row(over_flat, end(name), (name, "flat"))
    if "distill_label" in res and "distill" in res:
        row("an in-group image's soft target without not-in-group mass helps (distill_label > distill)",
            end("distill_label"), end("distill"))
    if "wider_natural" in res and "wider_groups" in res:
        row("not-in-group images at their natural share > 1:1 (wider_natural > wider_groups)",
            end("wider_natural"), end("wider_groups"))
    row("mixture (argmax Υ) > flat", ("mixture", "mixture_upsilon"), ("mixture", "flat"))
    if final != "mixture" and "finetuned" in res and "mixture" in res["finetuned"].models():
        row("mixture, fine-tuned end to end > flat", ("finetuned", "mixture"), ("mixture", "flat"))
        row("end-to-end fine-tuning helps (Eq. 11 > Eq. 10)", ("finetuned", "mixture"), ("mixture", final))
    if any("flat_wide" in m for m in mix.metrics.values()):
        row("mixture > width-matched flat", ("mixture", final), ("mixture", "flat_wide"))
    row("tree-guided > random", ("mixture", final), end("random"))
    row("tree-guided > random (argmax Υ)", ("mixture", "mixture_upsilon"), ("random", "mixture_upsilon"))
    row("semantic ≳ visual tree", ("mixture", final), end("visual"), weak=True)
    row("semantic ≳ visual tree (argmax Υ)", ("mixture", "mixture_upsilon"), ("visual", "mixture_upsilon"),
        weak=True)
    row("late > early fusion", ("early_fusion", final), ("early_fusion", "early_fusion"))
    row("Stack 1 ≳ Stack 2", ("mixture", final), end("stack2"), weak=True)
    row("Stack 1 ≳ Stack 2 (argmax Υ)", ("mixture", "mixture_upsilon"), ("stack2", "mixture_upsilon"), weak=True)
    row("not-in-group helps (Eq. 7 > plain sum)", ("mixture", final), end("no_not_in_group"))
    row("not-in-group helps (argmax Υ)", ("mixture", "mixture_upsilon"), ("no_not_in_group", "mixture_upsilon"))
    # multi-task: per group, on the first shared seed
    if "no_multitask" in res and set(res["no_multitask"].runs) & set(mix.runs):
        s0 = min(set(res["no_multitask"].runs) & set(mix.runs))
        a, b = _expert_group_top1(mix.runs[s0]), _expert_group_top1(res["no_multitask"].runs[s0])
        gains = {j: x - y for j, (x, y) in enumerate(zip(a, b))}
        better = sum(v > 0 for v in gains.values())
        if better == len(gains):
            v = "holds"
        elif sum(gains.values()) > 0:
            v = f"holds on average ({better}/{len(gains)} groups)"
        else:
            v = f"does not hold ({better}/{len(gains)} groups better)"
        L.append(f"| multi-task > without (per-group top-1, seed {s0}, spread over groups) | mixture experts | "
                 f"no_multitask experts | {fmt(gains)} | {v} |")
        fa, fb = _final(mix), _final(res["no_multitask"])
        row("multi-task > without (whole mixture)", ("mixture", fa), ("no_multitask", fb))
        row("multi-task > without (whole mixture, argmax Υ)", ("mixture", "mixture_upsilon"),
            ("no_multitask", "mixture_upsilon"))
    else:
        L.append("| multi-task > without | | | – | not measured (row missing) |")
    if len(lam_rows) > 2:
        lam = np.array([x for x, _ in lam_rows])
        top = np.array([mean_std(rr.values(_final(rr), "top1").values())[0] for _, rr in lam_rows])
        slope = float(np.polyfit(lam, 100 * top, 1)[0])

        rho = float(spearmanr(lam, top).statistic) if np.ptp(top) > 0 else float("nan")
        v = "holds" if slope > 0 and rho > 0.5 else ("holds weakly (not monotone)" if slope > 0 else "does not hold")
        L.append(f"| accuracy rises with λ | λ = {lam.max():.1f}: {100 * top[-1]:.2f} | λ = {lam.min():.1f}: "
                 f"{100 * top[0]:.2f} | {100 * (top[-1] - top[0]):+.2f} (slope {slope:+.2f} points per unit λ, "
                 f"Spearman ρ = {rho:.2f}) | {v} |")
    else:
        L.append("| accuracy rises with λ | | | – | not measured (λ rows missing) |")
    L.append("")
    return L
