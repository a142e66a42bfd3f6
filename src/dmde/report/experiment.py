"""``dmde experiment``: the paper's experiments (§V, Tables I–IV, Figs. 1, 5–9, 13–14) as one
resumable suite of ``dmde train`` runs, and a report that sets our numbers beside the paper's.

A suite (``configs/<suite>/suite.yaml``) lists rows — a name, seeds and config overrides — on top
of one base config per regime (``configs/<suite>/<regime>.yaml``). Row r at seed s of regime g is
the run directory ``OUT/g/r-s<s>`` made by :func:`dmde.run.pipeline.train`, so it is finished, resumed
or redone exactly as ``dmde train`` would; a finished run is skipped without loading anything.

Before a row runs, every finished stage of a sibling run whose stage hash equals this row's (the
same inputs, so the same result) is shared into it: checkpoints are hard-linked (they are only
ever replaced by a rename, never written in place), small files copied. The Stack 2 row thus reuses
the mixture's experts, and every row of a seed reuses one flat baseline. Cached trunk outputs
(``trunk_<hash>.pt``, named by the hash of what they depend on) are shared the same way through
``OUT/cache``, and decoded images through ``data.cache = OUT/cache/<regime>_images.pt``.

:func:`write_report` reads the finished runs and writes ``REPORT.md`` with every table and figure,
mean ± std over seeds, and for each of the paper's claims whether it holds here; ``OUT/NOTES.md``,
when present (the machine, its load, anything a reader of the numbers should know), goes in as is.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dmde.core.config import load_config
from dmde.core.io import read_json, write_text
from dmde.core.training import predict_logits
from dmde.core.transforms import resize
from dmde.hierarchy.ontology import Ontology
from dmde.hierarchy.wordnet import WordNet
from dmde.report.claims import claims
from dmde.report.results import (
    PAPER,
    RowResult,
    _expert_group_top1,
    _final,
    _n_groups,
    _run_seconds,
    _topk_cells,
    collect,
    ensemble_row,
    fmt,
    mean_std,
    paired,
)
from dmde.report.suite import Suite, _override_list, plan, run_name
from dmde.run.config import RunConfig
from dmde.run.plots import (
    plot_curves,
    plot_ontology,
    plot_per_class,
    plot_points,
    plot_predictions,
)
from dmde.run.prepare import load_splits, prepare_splits
from dmde.run.store import load_models, nway_input


def _budget_rule(e) -> str:
    """The experts' budget rule in words (ExpertsConfig.budget and budget_share)."""
    if e.budget != "flat_steps":
        return "epochs over the group view"
    if float(e.budget_share) == 1.0:
        return "as many optimiser steps per expert as the flat model"
    return f"{float(e.budget_share):g} of the flat model's optimiser steps per expert"


def write_report(suite: Suite, out: str | os.PathLike, regimes: Sequence[str] = ("pretrained",),
                 report_dir: str | os.PathLike | None = None) -> Path:
    """``REPORT.md`` and its figures (into ``report_dir``, default ``OUT/report``) from the finished runs."""
    out = Path(out)
    rep = Path(report_dir) if report_dir is not None else out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    book = read_json(out / "suite.json") if (out / "suite.json").is_file() else {"runs": {}}
    lines = [f"# The paper's experiments on Tiny-ImageNet: suite `{suite.name}`", ""]
    lines += ["Made by `dmde experiment` (src/dmde/report/experiment.py) from the runs under its `--out` directory; every "
              "row is a `dmde train` run of `configs/" + suite.name + "/<regime>.yaml` plus the row's overrides "
              "in `configs/" + suite.name + "/suite.yaml`. All accuracies are measured on the pipeline's own seeded "
              "hold-out split of the training set (never trained on), in %, as mean ± std over the seeds that "
              "finished (one number: one seed). The paper's numbers come from ImageNet-10K with "
              "7,756 classes, AlexNet experts and M = 1,000: compare signs and gaps, not levels.", ""]
    if book.get("quick"):
        lines += ["**Quick mode** (`--quick`): smoke-sized settings; the numbers mean nothing.", ""]
    if (out / "NOTES.md").is_file():  # what whoever ran the suite wants a reader to know (machine, load, ...)
        lines += ["## Notes on this run", "", (out / "NOTES.md").read_text().strip(), ""]
    for regime in regimes:
        if not (out / regime).is_dir():
            lines += [f"## Regime: {regime}", "", "No run of this regime has finished yet.", ""]
            continue
        lines += _regime_report(suite, out, regime, rep, book)
    lines += _how_to_run(suite, out, regimes, bool(book.get("quick")))
    path = rep / "REPORT.md"

    write_text(path, "\n".join(lines) + "\n")
    return path


#: The accounting's rows, top down: what each stage of the mixture keeps of what the experts know.
ACCOUNTING_ROWS = (("mixture_oracle", "oracle: Υ from the groups holding the true class (a perfect gate)"),
                   ("mixture_upsilon", "argmax Υ (the run's stacking)"),
                   ("mixture_upsilon_calibrated", "argmax Υ after calibrating each expert"),
                   ("mixture_upsilon_eq7", "argmax Υ, Eq. 7 on the calibrated experts"),
                   ("mixture_upsilon_poe", "argmax Υ, product of the experts on the calibrated experts"),
                   ("mixture_nway", "N-way softmax (Eq. 10)"),
                   ("mixture_finetuned_oracle", "oracle of the fine-tuned experts"),
                   ("mixture", "fine-tuned end to end (Eq. 11)"),
                   ("flat", "flat"), ("flat_ensemble", "ensemble of G flat models"))


def _accounting_report(res: dict[str, RowResult]) -> list[str]:
    """Where the mixture row loses accuracy: its stages top down, and each expert on its own
    classes beside the flat model restricted to them (mean ± std over the seeds)."""
    mix = res.get("mixture")
    if mix is None or not any("accounting" in m for m in mix.metrics.values()):
        return []
    L = ["### Accounting: where the mixture loses accuracy (row `mixture`)", "",
         "Top-1 % on the hold-out split, mean ± std over seeds; Δ is paired per seed against the row above it.", "",
         "| stage | model | top-1 | Δ vs the row above | top-5 |", "|---|---|---|---|---|"]
    ens = ensemble_row(res)
    prev: dict[int, float] | None = None
    for model, label in ACCOUNTING_ROWS:
        rr = res[ens] if model == "flat_ensemble" and ens is not None else mix
        v = rr.values(model, "top1")
        if not v:
            continue
        d = fmt(paired(v, prev)) if prev is not None else ""
        L.append(f"| {label} | {model} | {fmt(v)} | {d} | {fmt(rr.values(model, 'top5'))} |")
        prev = v
    tables = {s: m["accounting"]["experts"] for s, m in mix.metrics.items() if "accounting" in m}
    n = min(len(t) for t in tables.values())

    def col(j: int, key: str) -> dict[int, float]:
        return {s: float(t[j][key]) for s, t in tables.items() if key in t[j]}

    L += ["", "Each expert on the hold-out images of its own classes (top-1 among them), beside the flat model "
          "restricted to the same classes and images; not-in-group recall on the images outside the group, false "
          "not-in-group rate inside it; φ ECE: expected calibration error of 1 − φ (15 bins), before and after "
          "the fusion stage's calibration. Mean ± std over seeds (the groups of a seed differ: groups.seed).", "",
          "| expert | group top-1 | flat on its classes | Δ (paired) | not-in-group recall | false not-in-group | "
          "φ ECE | φ ECE calibrated |", "|---|---|---|---|---|---|---|---|"]
    for j in range(n):
        g, f = col(j, "group_top1"), col(j, "flat_group_top1")
        L.append(f"| {j} | {fmt(g)} | {fmt(f)} | {fmt(paired(g, f))} | {fmt(col(j, 'nig_recall'))} | "
                 f"{fmt(col(j, 'false_nig_rate'))} | {fmt(col(j, 'phi_ece'))} | {fmt(col(j, 'phi_ece_calibrated'))} |")
    wins = {s: sum(t[j]["group_top1"] >= t[j].get("flat_group_top1", float("inf")) for j in range(n))
            for s, t in tables.items()}
    L += ["", "Experts at least as accurate on their own classes as the restricted flat model: " +
          ", ".join(f"seed {s}: {w}/{n}" for s, w in sorted(wins.items())), ""]
    return L


def _regime_report(suite: Suite, out: Path, regime: str, rep: Path, book: dict[str, Any]) -> list[str]:
    res = collect(out, regime, suite)
    L: list[str] = [f"## Regime: {regime}", ""]
    if "mixture" not in res:
        return L + ["The mixture row has not finished yet; nothing to report.", ""]
    mix = res["mixture"]
    ref = mix.runs[min(mix.runs)]
    cfg = load_config(RunConfig, ref / "config.yaml")
    info = read_json(ref / "data.json")
    final = _final(mix)
    ens = ensemble_row(res)  # the row holding the ensemble of G flat models, if one does

    n_cat = Ontology.from_json(ref / "ontology.json").n_categories
    # ---- setting
    e, g = cfg.experts, cfg.groups
    L += ["### Setting", "",
          f"- data: {cfg.data.dataset}, N = {len(info['classes'])} classes, input {info['image_size'][0]} px; "
          f"split (seed {cfg.data.seed}) per class: {cfg.data.holdout_per_class} hold-out, {cfg.data.fusion_per_class} "
          f"for the N-way layer, training {info['n_train']} images in all "
          f"({'at most ' + str(cfg.data.max_per_class) + ' per class' if cfg.data.max_per_class else 'all the rest'}); "
          f"hold-out {info['n_holdout']} images",
          f"- ontology: WordNet (Eq. 1), K = {n_cat} "
          f"categories; groups: M = {g.size}, λ = {g.overlap} → {_n_groups(ref)} experts "
          "(λ = 0 of Table III gives " + (f"{_n_groups(res['lambda_0.0'].runs[min(res['lambda_0.0'].runs)])}" if
                                           'lambda_0.0' in res else "–") + ")",
          f"- experts: `{e.backbone}` {e.backbone_kwargs}, {e.epochs} epoch(s), {e.optimizer} lr {e.lr}, batch "
          f"{e.batch_size}, multi-task head (δ1 = {e.delta1}, δ2 = {e.delta2}), "
          f"not-in-group ratio {e.not_in_group_ratio}; start: {e.init}; budget: {e.budget} "
          f"({_budget_rule(e)})",
          f"- fusion: stacking {cfg.fusion.stacking} (ε = {cfg.fusion.eps}), N-way {cfg.fusion.nway} on "
          f"{'log Υ' if nway_input(cfg.fusion) == 'log' else 'Υ as it is (a log score)'}, {cfg.fusion.epochs} epochs; end-to-end fine-tuning {cfg.fusion.finetune.epochs} "
          f"epoch(s); calibration before Eq. 7: {cfg.fusion.calibrate}; the mixture's final model here: **{final}**",
          f"- flat baseline: the same backbone with one N-way softmax, trained on the experts' and the N-way "
          f"layer's images together, {cfg.baselines.epochs or e.epochs} epoch(s)" +
          (f"; ensemble: {_n_groups(ref)} such flat models (seeds), probabilities averaged (row {ens})"
           if ens else ""),
          "- seeds: a seed sets experts.seed and groups.seed; finished: " +
          ", ".join(f"{r} {sorted(rr.runs)}" for r, rr in res.items()), ""]
    ks3 = (1, 5, 10)
    # ---- Table I
    L += ["### Table I: mixture against the baselines (top-1 / top-5 / top-10 %)", "",
          "| method | row | model | top-1 | top-5 | top-10 | paper top-1 / 5 / 10 |", "|---|---|---|---|---|---|---|"]
    stacking = {"eq7": "Eq. 7", "eq7_log": "log Eq. 7", "poe": "product of the experts", "stack2": "Stack 2",
                "sum": "sum"}.get(cfg.fusion.stacking, cfg.fusion.stacking)
    t1 = [(f"ours (semantic tree, {stacking})", "mixture", final, "mixture"),
          ("ours, argmax Υ", "mixture", "mixture_upsilon", None),
          ("ours, fine-tuned end to end (Eq. 11)", "finetuned", "mixture", None),
          ("flat (\"AlexNet Extension\")", "mixture", "flat", "flat"),
          ("flat, width-matched", "mixture", "flat_wide", None),
          ("ensemble of G flat models (equal compute)", ens or "mixture", "flat_ensemble", None),
          ("random assignment", "random", _final(res.get("random")), "random"),
          ("visual tree", "visual", _final(res.get("visual")), "visual"),
          ("Stack 2 (Eq. 12)", "stack2", _final(res.get("stack2")), "stack2"),
          ("Stack 2, argmax Υ", "stack2", "mixture_upsilon", None)]
    for label, row, model, paper in t1:
        rr = res.get(row)
        if model in ("flat_wide", "flat_ensemble") and not (rr and any(model in m for m in rr.metrics.values())):
            continue
        if row == "finetuned" and (rr is None or final == "mixture" or "mixture" not in rr.models()):
            continue  # the mixture row is fine-tuned already (its base config does it)
        p = " / ".join(f"{v:.2f}" for v in PAPER["table1"][paper]) if paper else ""
        L.append(f"| {label} | {row} | {model or '–'} | " + " | ".join(_topk_cells(rr, model, ks3)) + f" | {p} |")
    L.append("")
    L += _accounting_report(res)
    # ---- every model of every row
    L += ["All models of every row (top-1 / 2 / 5 / 10 %, and D = mean WordNet distance of the top-1 mistakes, "
          "edges + 1, lower = nearer misses):", "",
          "| row | model | seeds | top-1 | top-2 | top-5 | top-10 | D |", "|---|---|---|---|---|---|---|---|"]
    for name, rr in res.items():
        for m in rr.models():
            L.append(f"| {name} | {m} | {len(rr.values(m, 'top1'))} | " + " | ".join(_topk_cells(rr, m, (1, 2, 5, 10)))
                     + f" | {fmt(rr.values(m, 'mistake_distance'), 1.0)} |")
    L.append("")
    # ---- Table II
    L += ["### Table II: per task group, top-1 without / with multi-task learning", ""]
    if "no_multitask" in res:
        seeds = sorted(set(res["no_multitask"].runs) & set(mix.runs))
        s0 = seeds[0] if seeds else None
        if s0 is not None:
            without = _expert_group_top1(res["no_multitask"].runs[s0])
            with_ = _expert_group_top1(mix.runs[s0])
            L += [f"Seed {s0}; top-1 among the group's own classes on the hold-out images of those classes.", "",
                  "| group | without | with | gain | paper without / with |", "|---|---|---|---|---|"]
            for j, (a, b) in enumerate(zip(without, with_)):
                pp = PAPER["table2"][j] if j < len(PAPER["table2"]) else None
                L.append(f"| {j} | {100 * a:.2f} | {100 * b:.2f} | {100 * (b - a):+.2f} | "
                         + (f"{pp[0]} / {pp[1]}" if pp else "") + " |")
            gains = [b - a for a, b in zip(without, with_)]
            mean_gain = 100 * sum(gains) / max(1, len(gains))
            L += [f"| mean | {fmt(without)} | {fmt(with_)} | {mean_gain:+.2f} | 38.9 / 40.3 |", ""]
    else:
        L += ["The no_multitask row has not finished yet.", ""]
    # ---- Table III
    L += ["### Table III: overlap λ (top-1 / 2 / 5 / 10 %), Figs. 13–14", "",
          f"Model: {final}; the last column is argmax Υ (Eq. 7) of the same experts.", "",
          "| λ | experts | top-1 | top-2 | top-5 | top-10 | paper top-1 / 2 / 5 / 10 | top-1 argmax Υ |",
          "|---|---|---|---|---|---|---|---|"]
    lam_rows = [(res[n].groups()[1], res[n]) for n in res if n.startswith("lambda_")] + [(mix.groups()[1], mix)]
    lam_rows.sort(key=lambda t: t[0])
    xs, ng = [], []
    curves: dict[str, tuple[list[float], list[float]]] = {f"mixture ({final})": ([], []), "argmax Υ": ([], [])}
    for lam, rr in lam_rows:
        model = _final(rr)
        n_exp = _n_groups(rr.runs[min(rr.runs)])
        pp = " / ".join(f"{v:.2f}" for v in PAPER["table3"][round(lam, 1)]) if round(lam, 1) in PAPER["table3"] else ""
        L.append(f"| {lam:.1f} | {n_exp} | " + " | ".join(_topk_cells(rr, model, (1, 2, 5, 10)))
                 + f" | {pp} | {fmt(rr.values('mixture_upsilon', 'top1'))} |")
        xs.append(lam), ng.append(n_exp)
        for (ys, es), m_name in zip(curves.values(), (model, "mixture_upsilon")):
            m, sd, _ = mean_std(rr.values(m_name, "top1").values())
            ys.append(100 * m), es.append(100 * sd)
    L.append("")
    if len(lam_rows) > 1:
        paper = [PAPER["table3"].get(round(x, 1), (float("nan"),))[0] for x in xs]
        plot_curves(xs, {**curves, "paper (ImageNet-10K)": (paper, None)}, rep / f"{regime}_accuracy_vs_lambda.png",
                    "overlap λ", "top-1 (%)", "Top-1 against λ (Fig. 14)")
        plot_curves(ng, curves, rep / f"{regime}_accuracy_vs_experts.png",  # each point another λ: no line
                    "number of experts", "top-1 (%)", "Top-1 against the number of experts (Fig. 13)",
                    lines=False, point_labels=[f"λ={x:.1f}" for x in xs])
        L += [f"![top-1 against λ]({regime}_accuracy_vs_lambda.png) "
              f"![top-1 against the number of experts]({regime}_accuracy_vs_experts.png)", ""]
    # ---- Table IV
    L += ["### Table IV: late against early fusion; without not-in-group", "",
          "| model | top-1 | top-5 | top-10 | paper top-1 / 5 / 10 |", "|---|---|---|---|---|",
          f"| late fusion (ours, {final}) | " + " | ".join(_topk_cells(mix, final, ks3)) + " | 38.65 / 55.41 / 64.32 |",
          "| early fusion (the same experts' features concatenated, early_fusion row) | "
          + " | ".join(_topk_cells(res.get("early_fusion"), "early_fusion", ks3)) + " | 36.23 / 52.45 / 61.38 |"]
    nn_ = res.get("no_not_in_group")
    L.append(f"| without not-in-group (Υ = in-group sum, {_final(nn_) or '–'}) | "
             + " | ".join(_topk_cells(nn_, _final(nn_), ks3)) + " | |")
    L.append("")
    # ---- claims
    L += claims(res, final, lam_rows)
    # ---- figures
    L += _figures(regime, res, ref, final, rep)
    # ---- wall times
    L += ["### Wall time", "", "| run | trained here (s) | shared from siblings (s) | suite wall (s) |",
          "|---|---|---|---|"]
    total = 0.0
    for name, rr in res.items():
        for s, d in sorted(rr.runs.items()):
            own, shared = _run_seconds(d)
            wall = (book.get("runs", {}).get(f"{regime}/{d.name}") or {}).get("seconds")
            total += wall or 0.0
            L.append(f"| {d.name} | {own:.0f} | {shared:.0f} | {'' if wall is None else f'{wall:.0f}'} |")
    L += ["", f"Suite wall time of the finished runs of this regime: **{total / 60:.1f} min** "
          "(the sum of each run's time in `suite.json`; includes loading the cached data and trunk outputs "
          "per run, and the one-off image decode and trunk pass in the first run unless they were cached "
          "beforehand).", ""]
    return L


def _figures(regime: str, res: dict[str, RowResult], ref: Path, final: str | None, rep: Path) -> list[str]:
    L = ["### Figures", ""]
    onto = Ontology.from_json(ref / "ontology.json")
    plot_ontology(onto, rep / f"{regime}_ontology.png")
    L += [f"Fig. 1, the ontology of the {onto.n_classes} classes (WordNet, spectral clustering, left-to-right order):",
          "", f"![ontology]({regime}_ontology.png)", ""]
    # per-class curves (Figs. 5, 6) from the first seed's per_class.csv

    def per_class(run: Path) -> dict[str, np.ndarray]:
        with open(run / "per_class.csv") as fh:
            rows = list(csv.DictReader(fh))
        names = [k for k in rows[0] if k not in ("position", "wnid", "lemma")]
        return {k: np.array([float(r[k]) for r in rows]) for k in names}

    pc = per_class(ref)
    lemmas = onto.lemmas  # per_class.csv follows the ontology's positions
    curves = {f"mixture ({final})": pc[final], "flat": pc["flat"]} if final in pc and "flat" in pc else pc
    plot_per_class(curves, rep / f"{regime}_per_class_mixture_flat.png",
                   title="Per-class top-1, classes sorted (Fig. 5)", names=lemmas)
    others = {f"semantic ({final})": pc.get(final)}
    for name in ("random", "visual", "stack2"):
        rr = res.get(name)
        if rr is not None and min(rr.runs) in rr.runs:
            p = per_class(rr.runs[min(rr.runs)])
            m = _final(rr)
            if m in p:
                others[name] = p[m]
    plot_per_class({k: v for k, v in others.items() if v is not None}, rep / f"{regime}_per_class_variants.png",
                   title="Per-class top-1 of the mixture variants (Fig. 6)", names=lemmas)
    L += [f"Per-class accuracy (seed {min(res['mixture'].runs)}), Figs. 5–6:", "",
          f"![per-class mixture vs flat]({regime}_per_class_mixture_flat.png) "
          f"![per-class variants]({regime}_per_class_variants.png)", ""]
    # mistake distance bars (hierarchy-aware)
    items = [("mixture", final), ("mixture", "mixture_upsilon"), ("mixture", "flat"), ("mixture", "flat_wide"),
             ("early_fusion", "early_fusion"), ("random", _final(res.get("random"))),
             ("visual", _final(res.get("visual"))), ("stack2", _final(res.get("stack2")))]
    names, vals, errs = [], [], []
    for row, model in items:
        rr = res.get(row)
        if rr is None or model is None:
            continue
        m, s, n = mean_std(rr.values(model, "mistake_distance").values())
        if n:
            names.append(f"{row}:{model}"), vals.append(m), errs.append(s)
    if names:
        plot_points(names, vals, errs, rep / f"{regime}_mistake_distance.png", "mean D of top-1 mistakes",
                    "How far in WordNet the mistakes land (lower: nearer misses)")
        L += ["Hierarchy-aware error: the mean WordNet distance D (Eq. 1: edges + 1) between the true and the "
              "predicted class over each model's top-1 mistakes (mean ± std over seeds):", "",
              f"![mistake distance]({regime}_mistake_distance.png)", ""]
    try:
        L += _prediction_panels(regime, ref, final, rep)
    except Exception as exc:  # a figure must not cost the report
        L += [f"(prediction panels not drawn: {exc})", ""]
    return L


def _prediction_panels(regime: str, run: Path, final: str | None, rep: Path, n_each: int = 2,
                       size: int = 48, pool_size: int = 1000) -> list[str]:
    """Figs. 7–9: a few hold-out images, each with the top-5 of the mixture and of the flat model."""
    cfg = load_config(RunConfig, run / "config.yaml")
    models, _ = load_models(run)
    if final not in models or "flat" not in models:
        return []
    wn = WordNet.load(cfg.ontology.wordnet)
    onto = Ontology.from_json(run / "ontology.json")
    pos = onto.positions_or
    images = load_splits(cfg.data, wn, progress=False)
    images = images.align(pos(images.classes)).holdout
    feats = prepare_splits(cfg, wn, progress=False, cache_dir=run)
    feats = feats.align(pos(feats.classes)).holdout
    pool = torch.as_tensor(np.random.default_rng(0).permutation(len(feats))[:pool_size])  # a sample is enough
    images, feats = images.subset(pool), feats.subset(pool)
    probs = {}
    for name in (final, "flat"):
        s = predict_logits(models[name], feats)
        probs[name] = s / s.sum(1, keepdim=True).clamp_min(1e-12) if name == "mixture_upsilon" else torch.softmax(s, 1)
    y = feats.targets
    right = {k: v.argmax(1) == y for k, v in probs.items()}
    rng = np.random.default_rng(0)
    picks = []
    for want in ((True, False), (False, True), (True, True)):
        cand = torch.nonzero((right[final] == want[0]) & (right["flat"] == want[1])).flatten().numpy()
        picks += list(rng.permutation(cand)[:n_each])
    if not picks:
        return []
    raw = images.gather(torch.as_tensor(picks, dtype=torch.long))
    small = [resize(raw[k].float().div(255.0), (size, size)).clamp(0, 1) for k in range(len(picks))]
    imgs = [x.mul(255).byte().permute(1, 2, 0).numpy() for x in small]  # (size, size, 3)
    truths = [onto.lemmas[int(y[i])] for i in picks]
    preds = {}
    for name, label in ((final, f"mixture ({final})"), ("flat", "flat")):
        val, idx = probs[name][picks].topk(5, dim=1)
        preds[label] = [[(onto.lemmas[int(j)], float(v)) for v, j in zip(vr, ir)] for vr, ir in zip(val, idx)]
    plot_predictions(imgs, truths, preds, rep / f"{regime}_predictions.png")
    return [f"Figs. 7–9: hold-out images (downscaled to {size} px), true class above, top-5 classes and scores of "
            "the mixture and of the flat model (green: the true class). Rows, picked at random (seed 0) within "
            f"each kind: {n_each} the mixture gets right and the flat model wrong, {n_each} the reverse, "
            f"{n_each} both right.", "", f"![predictions]({regime}_predictions.png)", ""]


def _how_to_run(suite: Suite, out: Path, regimes: Sequence[str], quick: bool) -> list[str]:
    """The commands that made (and continue) the suite, and which planned runs are missing."""
    q = " --quick" if quick else ""
    reg = " ".join(f"--regime {r}" for r in regimes)
    L = ["## How to run, resume and rerun one row", "",
         "```bash",
         "# PATH: the Tiny-ImageNet directory or its train.zip",
         f"dmde experiment --suite {suite.name} --data PATH --out DIR {reg}{q}",
         f"dmde experiment --suite {suite.name} --out DIR {reg} --report-only --report docs/paper-report",
         "```", "",
         "The same command continues an interrupted suite: finished runs are skipped, a run killed half-way "
         "resumes from its last checkpoint (every expert and model saves one per epoch). One row by hand "
         f"(`configs/{suite.name}/suite.yaml` gives each row's overrides; seed S):", "",
         "```bash"]
    for r in suite.rows[:3]:
        over = " ".join(_override_list(r.overrides))
        L.append(f"dmde train --config configs/{suite.name}/{regimes[0]}.yaml --out RUN data.root=PATH "
                 f"experts.seed=S groups.seed=S {over}".rstrip())
    L += ["```", ""]
    missing = []
    for regime, row, seed in plan(suite, regimes, quick=quick):
        d = out / regime / run_name(row.name, seed)
        rec = (read_json(d / "stages.json").get("evaluate") or {}) if (d / "stages.json").is_file() else {}
        if not rec.get("done"):
            missing.append(f"{regime}/{run_name(row.name, seed)}")
    L += [("Planned runs not finished yet (the command above continues them, in this order): "
           + ", ".join(missing) + ".") if missing else "Every planned run has finished.", ""]
    return L
