"""A suite's finished runs read back for the report: metrics per row and seed, mean ± std, paired
differences and their verdicts, and the paper's own numbers (ImageNet-10K) beside them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dmde.core.io import read_json
from dmde.report.suite import MIXTURE_MODELS, Suite
from dmde.run.evaluate import model_rows

#: The paper's numbers (ImageNet-10K, 7,756 classes, AlexNet experts, M = 1,000), in %.
PAPER = {
    "table1": {"mixture": (38.65, 55.41, 64.32), "flat": (31.70, 46.23, 52.18), "random": (34.53, 47.39, 53.25),
               "visual": (37.55, 53.29, 62.02), "stack2": (37.63, 54.37, 63.29)},
    "table2": [(42.3, 43.6), (37.9, 38.8), (30.7, 31.9), (32.3, 33.7), (43.5, 44.2), (48.0, 49.3), (39.3, 40.4)],
    "table3": {0.0: (33.96, 36.39, 48.17, 57.31), 0.1: (34.43, 37.54, 50.95, 59.75), 0.2: (35.66, 38.29, 51.17, 60.99),
               0.3: (36.92, 39.03, 52.53, 62.46), 0.4: (37.95, 40.12, 54.38, 63.21), 0.5: (38.65, 41.28, 55.41, 64.32)},
    "table4": {"late": (38.65, 55.41, 64.32), "early": (36.23, 52.45, 61.38)},
}


MODEL_LABELS = {"mixture": "mixture, fine-tuned end to end (Eq. 11)", "mixture_nway": "mixture, N-way softmax (Eq. 10)",
                "mixture_upsilon": "mixture, argmax Υ (Eq. 7)", "flat": "flat (\"AlexNet Extension\")",
                "flat_wide": "flat, width-matched", "early_fusion": "early fusion"}


@dataclass
class RowResult:
    """The finished runs of one row of one regime: metrics per seed."""

    name: str
    runs: dict[int, Path]
    metrics: dict[int, dict[str, dict[str, float]]]

    def models(self) -> list[str]:
        names: list[str] = []
        for m in self.metrics.values():
            names += [k for k in model_rows(m) if k not in names]
        return names

    def groups(self) -> tuple[int, float]:
        """(M, λ) as the row's runs cut their task groups (their groups.json), not as its name says."""
        g = read_json(next(iter(self.runs.values())) / "groups.json", "task groups")
        return int(g["size"]), float(g["overlap"])

    def values(self, model: str, key: str) -> dict[int, float]:
        return {s: float(m[model][key]) for s, m in self.metrics.items() if model in m and key in m[model]}


def collect(out: Path, regime: str, suite: Suite) -> dict[str, RowResult]:
    """Every finished run of a regime, by row."""
    results: dict[str, RowResult] = {}
    for row in suite.rows:
        runs, metrics = {}, {}
        for d in sorted((out / regime).glob(f"{row.name}-s*")):
            seed = d.name[len(row.name) + 2:]
            if not seed.isdigit() or not (d / "metrics.json").is_file():
                continue
            stages = read_json(d / "stages.json") if (d / "stages.json").is_file() else {}
            if not (stages.get("evaluate") or {}).get("done"):
                continue
            runs[int(seed)] = d
            metrics[int(seed)] = read_json(d / "metrics.json")
        if runs:
            results[row.name] = RowResult(row.name, runs, metrics)
    return results


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    v = np.asarray(list(values), dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def fmt(values: dict[int, float] | Iterable[float], scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± std (n)`` of values, or ``–`` when there are none."""
    m, s, n = mean_std(values.values() if isinstance(values, dict) else values)
    if n == 0:
        return "–"
    if n == 1:
        return f"{scale * m:.{digits}f}"
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def paired(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """a − b on the seeds both have."""
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def verdict(diffs: dict[int, float], weak: bool = False) -> str:
    """Whether "a > b" (or, with ``weak``, "a ≳ b") holds given per-seed differences a − b."""
    m, s, n = mean_std(diffs.values())
    if n == 0:
        return "not measured"
    pos = sum(d > 0 for d in diffs.values())
    if m > 0:
        if n == 1:
            return "holds (one seed)"
        return "holds" if pos == n else f"holds on average ({pos}/{n} seeds)"
    if weak and (abs(m) <= s or abs(m) < 0.005):
        return "holds within noise (slightly below)"
    return "does not hold"


def _final(rr: RowResult | None) -> str | None:
    if rr is None:
        return None
    return next((m for m in MIXTURE_MODELS if any(m in x for x in rr.metrics.values())), None)


def ensemble_row(res: dict[str, RowResult]) -> str | None:
    """The row whose runs hold the ensemble of G flat models: the mixture row when its base config
    trains it, else a row of its own (``ensemble``: the mixture's stages shared, the G − 1 other flat
    models added), paired with the mixture by seed."""
    for name in ("mixture", "ensemble"):
        rr = res.get(name)
        if rr is not None and "flat_ensemble" in rr.models():
            return name
    return None


def _topk_cells(rr: RowResult | None, model: str | None, ks: Sequence[int]) -> list[str]:
    if rr is None or model is None:
        return ["–"] * len(ks)
    return [fmt(rr.values(model, f"top{k}")) for k in ks]


def _expert_group_top1(run: Path) -> list[float]:
    """holdout_group_top1 of every expert of a run (Table II), from the experts' JSONL logs."""
    out = []
    for log in sorted((run / "experts").glob("expert_*.jsonl")):
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        out.append(float(json.loads(lines[-1]).get("holdout_group_top1", float("nan"))) if lines else float("nan"))
    return out


def _run_seconds(run: Path) -> tuple[float, float]:
    """(seconds of the stages this run trained itself, seconds of stages it shared from a sibling)."""
    stages = read_json(run / "stages.json") if (run / "stages.json").is_file() else {}
    own = sum(float(r.get("seconds", 0)) for r in stages.values() if "shared_from" not in r)
    shared = sum(float(r.get("seconds", 0)) for r in stages.values() if "shared_from" in r)
    return own, shared


def _n_groups(run: Path) -> int:
    return len(read_json(run / "groups.json")["groups"])
