"""The run directory: the stage record (``stages.json``) and reading back what each stage wrote
(ontology, groups, experts, fusion, fine-tuned mixture, baselines) as models. Evaluation,
prediction, export and the report read runs through this module; none imports the orchestrator."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dmde.baselines.models import EarlyFusion, FlatEnsemble, flat_model
from dmde.core.checkpoint import load_checkpoint
from dmde.core.config import load_config
from dmde.core.errors import DmdeFileError, DmdeValueError, MismatchError
from dmde.core.io import read_json, write_json
from dmde.core.training import ImageTensors, predict_logits
from dmde.experts.train import ExpertsConfig, expert_path, load_expert
from dmde.fusion.mixture import Mixture, NWaySoftmax
from dmde.fusion.stacking import LOG_VARIANTS
from dmde.hierarchy.groups import TaskGroups
from dmde.hierarchy.ontology import Ontology
from dmde.run.config import FusionConfig, RunConfig
from dmde.run.stages import OUTPUTS


class Run:
    """A run directory and its stage bookkeeping."""

    def __init__(self, run_dir: str | os.PathLike, cfg: RunConfig) -> None:
        self.dir = Path(run_dir)
        self.cfg = cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stages_path = self.dir / "stages.json"
        self.stages: dict[str, dict[str, Any]] = read_json(self._stages_path) if self._stages_path.exists() else {}
        self.trained: list[str] = []  # stages that did work in this invocation

    def reload(self) -> None:
        """Re-read the bookkeeping (another rank may have finished a stage)."""
        if self._stages_path.exists():
            self.stages = read_json(self._stages_path)

    def is_done(self, name: str, h: str) -> bool:
        rec = self.stages.get(name)
        ok = rec is not None and rec.get("hash") == h and rec.get("done")
        return bool(ok) and all((self.dir / p).exists() for p in OUTPUTS[name][:1])

    def begin(self, name: str, h: str) -> None:
        """Start (or resume) a stage; outputs from a different configuration are removed."""
        rec = self.stages.get(name)
        if rec is not None and rec.get("hash") != h:
            for p in OUTPUTS[name]:
                path = self.dir / p
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.stages[name] = {"hash": h, "done": False, "started": time.time()}
        write_json(self._stages_path, self.stages)

    def finish(self, name: str, **extra: Any) -> None:
        rec = self.stages[name]
        rec.update(done=True, seconds=round(time.time() - rec.pop("started", time.time()), 2), **extra)
        write_json(self._stages_path, self.stages)
        self.trained.append(name)


def load_groups(run_dir: Path, onto):
    groups = TaskGroups.from_json(run_dir / "groups.json")
    groups.validate(onto)
    return groups


def load_experts(run_dir: Path, onto, groups, expected: ExpertsConfig | None = None) -> list[nn.Module]:
    """Every expert of a run, checked against the run's ontology, groups and (``expected``) expert
    settings before any weights are loaded."""
    experts = []
    for j, wnids in enumerate(groups.wnids):
        path = expert_path(run_dir / "experts", j)
        if not path.exists():
            raise DmdeFileError(f"expert {j} of {run_dir} is missing ({path.name}); run `dmde train` to finish it")
        expert, state = load_expert(path, onto.hash(), wnids, expected)
        if int(state["epoch"]) < int(state["config"]["epochs"]):
            raise DmdeValueError(f"expert {j} of {run_dir} is unfinished (epoch {state['epoch']}); resume training")
        experts.append(expert)
    return experts


def expert_similarities(run_dir: Path, n_experts: int) -> list[torch.Tensor | None]:
    return [load_checkpoint(expert_path(run_dir / "experts", j)).get("similarity") for j in range(n_experts)]


def build_mixture(run_dir: Path, cfg: RunConfig, experts: Sequence[nn.Module], groups: Sequence[Sequence[int]],
                  n: int, stage: str = "finetune") -> nn.Module:
    """The mixture as of a stage: ``upsilon`` (argmax Υ), ``fusion`` (+ N-way) or ``finetune``."""
    f = cfg.fusion
    nway = None
    if stage != "upsilon" and f.nway != "none":
        nway = NWaySoftmax(n, kind=f.nway, rank=f.rank, input=nway_input(f))
    fusion = load_checkpoint(run_dir / "fusion.pt") if stage != "upsilon" and (run_dir / "fusion.pt").exists() \
        else {}
    if nway is not None and fusion:
        nway.load_state_dict(fusion["model"])
    mixture = Mixture(list(experts), groups, n, stacking=f.stacking, eps=f.eps, lam=f.lam, nway=nway,
                      batched=f.batched)
    for name in ("temperature", "nig_bias"):  # the experts' calibration, fitted with the N-way layer
        if name in fusion:
            getattr(mixture, name).copy_(fusion[name])
    if stage == "finetune" and (run_dir / "mixture.pt").exists():
        mixture.load_state_dict(load_checkpoint(run_dir / "mixture.pt")["model"])
    mixture.eval()
    return mixture


def nway_input(f: FusionConfig) -> str:
    """The log-odds variant already yields log Υ: the N-way layer takes it as it is."""
    return "upsilon" if f.stacking in LOG_VARIANTS else f.input


def _load_flat(path: Path, cfg: RunConfig, onto) -> nn.Module:
    state = load_checkpoint(path)
    if state.get("ontology_hash") != onto.hash():
        raise MismatchError(f"{path} was trained for another ontology")
    flat = flat_model(cfg.experts, onto.n_classes, state.get("width_match"))
    flat.load_state_dict(state["model"])
    return flat


def load_flat_state(run_dir: Path, onto) -> dict[str, torch.Tensor]:
    """The trained flat model's weights, for the experts' warm start (experts.init=flat)."""
    path = Path(run_dir) / "flat.pt"
    if not path.exists():
        raise DmdeFileError(f"experts.init=flat needs {path}: the flat stage has not run")
    state = load_checkpoint(path)
    if state.get("ontology_hash") != onto.hash():
        raise MismatchError(f"{path} was trained for another ontology")
    return state["model"]


def flat_logits(run_dir: Path, cfg: RunConfig, onto, data: ImageTensors,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """The trained flat model's logits (len(data), N) on ``data``: the experts' soft targets
    (experts.distill > 0), computed once for every expert."""
    path = Path(run_dir) / "flat.pt"
    if not path.exists():
        raise DmdeFileError(f"experts.distill > 0 needs {path}: the flat stage has not run")
    flat = _load_flat(path, cfg, onto).to(device).eval()
    with torch.no_grad():
        return predict_logits(flat, data, device=device, desc="flat teacher")


def _stage_done(run_dir: Path, name: str) -> bool:
    path = Path(run_dir) / "stages.json"
    return path.exists() and bool(read_json(path).get(name, {}).get("done"))


def load_models(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[dict[str, nn.Module], Any]:
    """Every trained model of a run, by name, for evaluation and prediction.

    ``mixture_upsilon`` (argmax Υ), ``mixture_nway`` (+ trained N-way layer), ``mixture``
    (fine-tuned end to end), ``flat`` and ``early_fusion`` when the run has them.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise DmdeFileError(f"{run_dir} is not a dmde run directory (no config.yaml)")
    cfg = load_config(RunConfig, run_dir / "config.yaml")
    onto = Ontology.from_json(run_dir / "ontology.json")
    groups = load_groups(run_dir, onto)
    n = onto.n_classes
    models: dict[str, nn.Module] = {}
    if (run_dir / "experts").is_dir():
        experts = load_experts(run_dir, onto, groups, cfg.experts)
        models["mixture_upsilon"] = build_mixture(run_dir, cfg, experts, groups.groups, n, stage="upsilon")
        if (run_dir / "fusion.pt").exists():
            models["mixture_nway"] = build_mixture(run_dir, cfg, experts, groups.groups, n, stage="fusion")
        if (run_dir / "mixture.pt").exists():
            fresh = load_experts(run_dir, onto, groups, cfg.experts)  # fine-tuning changed the experts: own copies
            models["mixture"] = build_mixture(run_dir, cfg, fresh, groups.groups, n, stage="finetune")
        if (run_dir / "early_fusion.pt").exists():
            ef = EarlyFusion(experts, n)
            ef.classifier.load_state_dict(load_checkpoint(run_dir / "early_fusion.pt")["model"])
            models["early_fusion"] = ef
    for name in ("flat", "flat_wide"):
        if (run_dir / f"{name}.pt").exists():
            models[name] = _load_flat(run_dir / f"{name}.pt", cfg, onto)
    members = sorted((run_dir / "ensemble").glob("flat_*.pt")) if "flat" in models else []
    if members and _stage_done(run_dir, "ensemble"):
        models["flat_ensemble"] = FlatEnsemble([models["flat"]] + [_load_flat(p, cfg, onto) for p in members])
    for m in models.values():
        m.to(device).eval()
    return models, cfg
