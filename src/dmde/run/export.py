"""Ship a trained model: ``dmde export RUN OUT`` and ``dmde.load(OUT)``.

An export is a directory that holds everything prediction needs and nothing training needs:

    model.safetensors   the chosen model's weights (with the frozen trunk when the run cached it);
                        no optimiser state, no pickles
    export.json         format, model name, classes (WNIDs) and lemmas, input size and normalisation,
                        the experts' model settings, versions of dmde and torch, the training device
    config.yaml         the run's resolved configuration
    ontology.json, groups.json
    MODEL_CARD.md       data, classes, metrics, versions: what a reader needs before using it

:func:`load_export` rebuilds the model's architecture from those files (no pretrained weights are
needed: the export carries them) and loads the weights strictly.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dmde
from dmde.baselines.models import EarlyFusion, flat_model
from dmde.core.checkpoint import load_checkpoint
from dmde.core.config import from_dict, load_config
from dmde.core.errors import DmdeFileError, DmdeValueError, MismatchError
from dmde.core.io import read_json, write_json, write_text
from dmde.experts.backbones import create_backbone
from dmde.experts.train import ExpertsConfig, build_expert, expert_path
from dmde.hierarchy.groups import TaskGroups
from dmde.hierarchy.ontology import Ontology
from dmde.run.config import RunConfig, resolve_device
from dmde.run.predict import Predictor
from dmde.run.store import build_mixture

FORMAT = "dmde-export/1"
WEIGHTS = "model.safetensors"


def _no_download(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Backbone settings without ``pretrained``: an export carries its weights."""
    return {k: v for k, v in kwargs.items() if k != "pretrained"}


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, model: str | None = None) -> Path:
    """Write the export of ``run_dir``'s best model (or ``model``) into the new directory ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DmdeFileError(f"export directory {out} already exists and is not empty")
    pred = Predictor.from_run(run_dir, model=model)
    name = pred.model_name
    experts = []
    if name.startswith("mixture") or name == "early_fusion":
        for j in range(len(read_json(run_dir / "groups.json")["groups"])):
            st = load_checkpoint(expert_path(run_dir / "experts", j))
            experts.append({"config": st["config"], "group": st["group"]})
    width = None
    if name == "flat_wide":
        width = load_checkpoint(run_dir / "flat_wide.pt").get("width_match")
    info = read_json(run_dir / "data.json", "run data summary")
    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in pred.model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT, "model": name})
        for f in ("config.yaml", "ontology.json", "groups.json"):
            shutil.copy2(run_dir / f, tmp / f)
        meta = {"format": FORMAT, "model": name, "classes": pred.classes, "lemmas": pred.lemmas,
                "image_size": list(pred.image_size), "mean": list(pred.mean), "std": list(pred.std),
                "scores_are_probabilities": pred.scores_are_probabilities, "trunk": info.get("trunk"),
                "experts": experts, "width_match": width, "dmde_version": dmde.__version__,
                "torch_version": torch.__version__, "trained_on": info.get("device", "unknown"),
                "metrics": metrics.get(name, {}), "data": {k: info.get(k) for k in
                                                          ("dataset", "n_train", "n_fusion", "n_holdout")}}
        write_json(tmp / "export.json", meta)
        write_text(tmp / "MODEL_CARD.md", model_card(meta, run_dir.name))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_card(meta: dict[str, Any], run_name: str) -> str:
    m = meta.get("metrics") or {}
    acc = ", ".join(f"top-{k} {100 * m[f'top{k}']:.2f}%" for k in (1, 5) if f"top{k}" in m) or "not evaluated"
    d = meta.get("data") or {}
    lines = [f"# dmde model card: {meta['model']} from run `{run_name}`", "",
             "A mixture of diverse experts (Zhao, Fan et al., *Deep Mixture of Diverse Experts for Large-Scale "
             "Visual Recognition*) trained with dmde." if meta["model"].startswith("mixture") else
             f"A `{meta['model']}` baseline trained with dmde.", "",
             f"- classes: {len(meta['classes'])} "
             + ("WordNet 3.0 nouns" if all(re.fullmatch(r"n\d{8}", c) for c in meta["classes"]) else "named classes")
             + " (`export.json` → `classes`, `lemmas`), e.g. "
             + ", ".join(meta["lemmas"][:8]) + ("…" if len(meta["lemmas"]) > 8 else ""),
             f"- data: {d.get('dataset')}, {d.get('n_train')} training images, {d.get('n_fusion')} for the N-way "
             f"layer, {d.get('n_holdout')} held out",
             f"- accuracy on the run's own hold-out split: {acc}",
             f"- input: RGB, resized to {meta['image_size'][0]}×{meta['image_size'][1]}, normalised with mean "
             f"{meta['mean']} and std {meta['std']}",
             f"- experts: {len(meta['experts'])}" if meta["experts"] else "- experts: none (a flat model)",
             f"- trained with dmde {meta['dmde_version']}, torch {meta['torch_version']}, on {meta['trained_on']}",
             "", "Use: `dmde.load(\"THIS_DIRECTORY\").predict([image])` or `dmde predict THIS_DIRECTORY IMAGE`.",
             "The hold-out accuracy is measured on images from the training distribution; it says nothing "
             "about other data."]
    return "\n".join(lines) + "\n"


def is_export(path: str | os.PathLike) -> bool:
    return (Path(path) / "export.json").is_file() and (Path(path) / WEIGHTS).is_file()


def build_model(meta: dict[str, Any], cfg: Any, n_classes: int, groups: list[list[int]], path: Path) -> nn.Module:
    """The exported model's architecture (weights uninitialised as trained)."""
    name = meta["model"]
    if name.startswith("mixture") or name == "early_fusion":
        experts = []
        for e in meta["experts"]:
            ecfg = from_dict(ExpertsConfig, e["config"])
            ecfg.backbone_kwargs = _no_download(ecfg.backbone_kwargs)
            experts.append(build_expert(ecfg, len(e["group"])))
        if name == "early_fusion":
            return EarlyFusion(experts, n_classes)
        # the run's own constructor; an export holds no fusion.pt / mixture.pt, so nothing is loaded here
        return build_mixture(path, cfg, experts, groups, n_classes, "upsilon" if name == "mixture_upsilon" else "fusion")
    if name in ("flat", "flat_wide"):
        cfg.experts.backbone_kwargs = _no_download(cfg.experts.backbone_kwargs)
        return flat_model(cfg.experts, n_classes, meta.get("width_match"))
    raise DmdeValueError(f"an export of model {name!r} cannot be loaded by this version of dmde")


def load_export(path: str | os.PathLike, device: str | torch.device = "auto"):
    """A :class:`dmde.run.predict.Predictor` from an export directory."""
    path, device = Path(path), resolve_device(device)
    meta = read_json(path / "export.json", "export summary")
    if meta.get("format") != FORMAT:
        raise MismatchError(f"{path} is an export of format {meta.get('format')!r}; this dmde reads {FORMAT}")
    cfg = load_config(RunConfig, path / "config.yaml")
    onto = Ontology.from_json(path / "ontology.json")
    groups = TaskGroups.from_json(path / "groups.json").groups
    if onto.classes != meta["classes"]:
        raise MismatchError(f"{path}: export.json and ontology.json list different classes")
    net = build_model(meta, cfg, onto.n_classes, groups, path)
    if meta.get("trunk"):
        t = meta["trunk"]
        trunk = create_backbone(t["backbone"], **_no_download(t["backbone_kwargs"])).trunk
        net = nn.Sequential(trunk, net)
    try:
        net.load_state_dict(load_file(str(path / WEIGHTS)))
    except RuntimeError as exc:
        raise MismatchError(f"{path / WEIGHTS} does not fit the exported architecture: "
                            f"{str(exc).splitlines()[0]}") from None
    return Predictor(net.to(device).eval(), onto.classes, onto.lemmas, tuple(meta["image_size"]), meta["mean"],
                     meta["std"], meta["model"], scores_are_probabilities=meta["scores_are_probabilities"],
                     device=device)
