"""The gate, offline (issue "The mixture earns its place"): one finished run's trained and
fine-tuned experts scored once on the fusion and hold-out splits, then every stacking rule compared
on the same expert outputs — argmax only, nothing trained except the small fitted gates, which
are fitted on the fusion split and measured on the hold-out.

    .venv/bin/python benchmarks/gate.py RUN_DIR

Prints top-1 % on the hold-out for: Eq. 7 (raw and calibrated), the sum of in-group
probabilities, the product of the experts (raw, calibrated), the product with a fitted
per-expert scale/offset and per-class bias, and a logistic regression on every in-group log-odds;
then the temperature τ of the calibrated product and what it does to the hold-out's cross-entropy.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dmde.core.training import predict_logits
from dmde.fusion.calibration import calibrate_logits, fit_calibration, fit_pool_temperature
from dmde.fusion.stacking import GroupLayout, group_slots, stack
from dmde.hierarchy.ontology import Ontology
from dmde.hierarchy.wordnet import WordNet
from dmde.run.prepare import prepare_splits
from dmde.run.store import load_models


def acc(s: torch.Tensor, y: torch.Tensor) -> float:
    return 100 * float((s.argmax(1) == y).float().mean())


def lbfgs(params, loss, steps: int = 300) -> None:
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        v = loss()
        v.backward()
        return v

    opt.step(closure)


def main(run: Path) -> None:
    t0 = time.perf_counter()
    models, cfg = load_models(run)
    onto = Ontology.from_json(run / "ontology.json")
    splits = prepare_splits(cfg, WordNet.load(cfg.ontology.wordnet), progress=False, cache_dir=run)
    splits = splits.align(onto.positions_or(splits.classes))
    layout = GroupLayout.from_groups(models["mixture_upsilon"].layout.groups, onto.n_classes)
    m_max, n = layout.max_size, onto.n_classes
    yf, yh = splits.fusion.targets, splits.holdout.targets
    print(f"run {run.name}: flat {acc(predict_logits(models['flat'], splits.holdout), yh):.2f}")
    print("| experts | stacking | top-1 |\n|---|---|---|")
    taus = []
    for name in ("mixture_upsilon", "mixture"):  # the trained experts, then the fine-tuned ones
        m = models[name]
        with torch.no_grad():
            zf, zh = (predict_logits(lambda x: m.padded_logits(x).flatten(1), d).view(len(d), len(m.experts), -1)
                      for d in (splits.fusion, splits.holdout))
        T, b = fit_calibration(zf, group_slots(layout, yf), bias=True)
        ph, pc = torch.softmax(zh, -1), torch.softmax(calibrate_logits(zh, T, b), -1)
        rows = {"Eq. 7": stack(ph, layout, "eq7"), "Eq. 7, calibrated": stack(pc, layout, "eq7"),
                "sum of in-group probabilities": stack(ph, layout, "sum"),
                "product of the experts": stack(ph, layout, "poe"), "product, calibrated": stack(pc, layout, "poe")}

        def odds(z: torch.Tensor) -> torch.Tensor:  # in-group log-odds z_j(i) − z_j(nig), padding 0
            d = z[..., :m_max] - z[..., m_max:]
            return torch.where(layout.mask.unsqueeze(0), d, torch.zeros(()))

        df, dh = odds(zf), odds(zh)

        def scaled(d, a, o, c):
            t = (d * a.view(1, -1, 1) + o.view(1, -1, 1)).reshape(len(d), -1)[:, layout.flat_slot]
            return torch.zeros(len(d), n).index_add(1, layout.flat_class, t) + c

        a, o, c = torch.ones(layout.n_groups, requires_grad=True), torch.zeros(layout.n_groups, requires_grad=True), \
            torch.zeros(n, requires_grad=True)
        lbfgs([a, o, c], lambda: F.cross_entropy(scaled(df, a, o, c), yf) + 1e-3 * (c ** 2).sum())
        rows["product, fitted scale/offset per expert + class bias"] = scaled(dh, a, o, c).detach()
        xf, xh = (d.reshape(len(d), -1)[:, layout.flat_slot] for d in (df, dh))
        w0 = torch.zeros(len(layout.flat_slot), n)
        w0[torch.arange(len(layout.flat_slot)), layout.flat_class] = 1.0
        for wd in (1e-4, 1e-2):
            w, bias = w0.clone().requires_grad_(True), torch.zeros(n, requires_grad=True)
            lbfgs([w, bias], lambda: F.cross_entropy(xf @ w + bias, yf) + wd * ((w - w0) ** 2).sum(), steps=200)
            rows[f"logistic regression on every log-odds (weight decay {wd:g})"] = (xh @ w + bias).detach()
        for rule, s in rows.items():
            print(f"| {'trained' if name == 'mixture_upsilon' else 'fine-tuned'} | {rule} | {acc(s, yh):.2f} |")
        # the temperature τ of the product's scores (fusion.pool_temperature=fit): fitted on the fusion
        # split; it moves no argmax, only the cross-entropy the N-way layer and fine-tuning start from
        uf = stack(torch.softmax(calibrate_logits(zf, T, b), -1), layout, "poe")
        tau = fit_pool_temperature(uf, yf)
        u = rows["product, calibrated"]
        taus.append(f"{name}: τ = {tau:.3f}, hold-out cross-entropy of the calibrated product "
                    f"{float(F.cross_entropy(u, yh)):.2f} → {float(F.cross_entropy(tau * u, yh)):.2f}")
    print("\n" + "\n".join(taus))
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
