"""The stage table: every stage of a run named once, with the stages it reads, the config section
that sets it, what it leaves in the run directory, when it runs, and what its hash covers.

Everything about stages derives from :data:`TABLE`: the order of ``dmde train`` and the choices of
``--until`` (:data:`STAGES`), the stage hashes that say whether a stage is done
(:func:`stage_hashes`), what is removed when a stage must be redone and what a suite shares
between its rows (:data:`OUTPUTS`, :func:`shareable`).

A stage's hash covers its own settings and the hashes of the stages it reads, so a changed setting
redoes that stage and every stage after it, and nothing else. Settings added after runs existed
enter a hash only when they differ from their default (:data:`LATER`): those runs stay finished.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dmde.core.config import config_hash, to_dict, without_defaults

if TYPE_CHECKING:  # the table itself stays free of torch: `dmde train --help` lists its stages
    from dmde.run.config import RunConfig

#: Settings added after runs existed, with their defaults: in a hash only when changed.
LATER = {"init": "backbone", "budget": "epochs", "calibrate": "none", "pool_temperature": "none", "source": "wordnet",
         "taxonomy": None, "finetune_data": "all", "distill": 0.0, "distill_temperature": 2.0,
         "distill_membership": "teacher", "budget_share": 1.0}


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]  # stages whose outputs it uses (their hashes are part of its own)
    section: str | None  # the config section that sets it
    outputs: tuple[str, ...]  # what it writes in the run directory; the first marks it as present
    key: Callable[[RunConfig, dict[str, str]], list[Any]]  # what its hash covers, given the others'
    enabled: Callable[[RunConfig], bool]  # False: the stage is skipped
    does: str  # the function that does the work
    parallel: bool = False  # data-parallel on every torchrun rank (else rank 0 alone)
    shared: bool = True  # a suite row may take it from a sibling with the same hash


#: Data settings that say how images are read, not which: they change no result, so no hash.
DATA_IO = ("storage", "workers")


def data_key(cfg: RunConfig) -> dict[str, Any]:
    """The data settings that decide the images and their split (what the data hash covers)."""
    return {k: v for k, v in to_dict(cfg.data).items() if k not in DATA_IO}


def _data(cfg: RunConfig) -> str:
    return config_hash(data_key(cfg))


def _ontology(cfg: RunConfig) -> dict[str, Any]:
    """The ontology's settings; a taxonomy file enters by its content (an edited file redoes the
    ontology), a visual tree with the features it is built from (``groups.visual_*``)."""
    out = _later(to_dict(cfg.ontology))
    tax = Path(cfg.ontology.taxonomy) if cfg.ontology.taxonomy is not None else None
    if tax is not None and tax.is_file():  # (a missing file is validate()'s error)
        out["taxonomy"] = hashlib.sha256(tax.read_bytes()).hexdigest()
    if cfg.ontology.source == "visual":
        out["visual"] = [cfg.groups.visual_backbone, cfg.groups.visual_per_class, cfg.groups.seed]
    return out


def _later(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the :data:`LATER` ones left at their defaults."""
    return without_defaults(settings, LATER)


def _experts(cfg: RunConfig) -> dict[str, Any]:
    return _later(to_dict(cfg.experts))


def _fusion(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the fusion stage's settings, the fine-tuning's): ``batched`` goes with the stage it runs."""
    fusion = _later(to_dict(cfg.fusion))
    finetune = _later(fusion.pop("finetune"))
    fusion.pop("batched")
    finetune["batched"] = fusion.pop("batched_finetune")
    if "finetune_data" in fusion:  # (left out at its default: see LATER)
        finetune["data"] = fusion.pop("finetune_data")
    return fusion, finetune


def _precision(cfg: RunConfig) -> list[Any]:
    """``precision`` (added later: in a hash only when not 32) enters the stages that train from
    scratch, experts and flat; every other trained stage reads one of them."""
    return [] if str(cfg.precision) == "32" else [{"precision": str(cfg.precision)}]


def _always(cfg: RunConfig) -> bool:
    return True


#: Expert settings that are not the flat model's (the flat stage's hash leaves them out).
EXPERTS_ONLY = ("init", "budget", "budget_share", "distill", "distill_temperature", "distill_membership")


def needs_flat(cfg: RunConfig) -> bool:
    """Whether the experts read the trained flat model: their warm start (``experts.init=flat``) or
    its soft targets (``experts.distill > 0``); the flat model then trains before them."""
    return cfg.experts.init == "flat" or float(cfg.experts.distill) > 0


TABLE: tuple[Stage, ...] = (
    Stage("ontology", (), "ontology", ("ontology.json",),
          lambda c, h: [_data(c), _ontology(c)], _always,
          "dmde.hierarchy.ontology.build_semantic_ontology"),
    Stage("groups", ("ontology",), "groups", ("groups.json", "visual_ontology.json"),
          lambda c, h: [h["ontology"], to_dict(c.groups)], _always,
          "dmde.run.trainers.make_run_groups"),
    # experts.init=flat (the experts start from the flat model) or experts.distill > 0 (they learn its
    # soft targets): the flat model's hash enters theirs
    Stage("experts", ("groups", "flat"), "experts", ("experts",),
          lambda c, h: [h["groups"], _data(c), _experts(c)] + ([h["flat"]] if needs_flat(c) else [])
          + _precision(c),
          _always, "dmde.experts.train.train_all_experts"),
    Stage("fusion", ("experts",), "fusion", ("fusion.pt", "fusion.train.pt", "fusion.train.jsonl",
                                               "fusion.train.tb"),
          lambda c, h: [h["experts"], _fusion(c)[0]], lambda c: c.fusion.nway != "none",
          "dmde.run.trainers.train_fusion"),
    Stage("finetune", ("fusion",), "fusion.finetune", ("mixture.pt", "mixture.jsonl", "mixture.tb"),
          lambda c, h: [h["fusion"], _fusion(c)[1]], lambda c: c.fusion.finetune.epochs > 0,
          "dmde.run.trainers.finetune", parallel=True),
    # how the experts start, how long they run and what they learn from it are not the flat model's settings
    Stage("flat", ("ontology",), "baselines", ("flat.pt", "flat.jsonl", "flat.tb"),
          lambda c, h: [h["ontology"], _data(c), {k: v for k, v in _experts(c).items() if k not in EXPERTS_ONLY},
                        c.baselines.epochs] + _precision(c),
          lambda c: c.baselines.flat or needs_flat(c), "dmde.run.trainers.train_flat", parallel=True),
    Stage("flat_wide", ("flat", "groups"), "baselines", ("flat_wide.pt", "flat_wide.jsonl", "flat_wide.tb"),
          lambda c, h: [h["flat"], h["groups"], c.fusion.nway, c.fusion.rank],
          lambda c: c.baselines.width_matched_flat, "dmde.run.trainers.train_flat", parallel=True),
    Stage("ensemble", ("flat", "groups"), "baselines", ("ensemble",),
          lambda c, h: [h["flat"], h["groups"], "ensemble"], lambda c: c.baselines.ensemble,
          "dmde.run.trainers.train_flat", parallel=True),
    Stage("early_fusion", ("experts",), "baselines", ("early_fusion.pt", "early_fusion.train.pt",
                                                           "early_fusion.train.jsonl", "early_fusion.train.tb"),
          lambda c, h: [h["experts"], c.baselines.early_fusion_epochs], lambda c: c.baselines.early_fusion,
          "dmde.run.trainers.train_early_fusion"),
    # every model of the run is measured: its hash covers every other stage
    Stage("evaluate", ("ontology", "groups", "experts", "fusion", "finetune", "flat", "flat_wide", "ensemble",
                       "early_fusion"), "baselines", ("metrics.json", "per_class.csv", "per_class.png"),
          lambda c, h: [h[s] for s in STAGES[:-1]] + [to_dict(c.baselines)], _always,
          "dmde.run.evaluate.evaluate_run", shared=False),
)

BY_NAME = {s.name: s for s in TABLE}
#: The stages in the order ``dmde train`` runs them (``--until`` takes any of them).
STAGES = tuple(s.name for s in TABLE)
#: What each stage leaves in the run directory (removed when the stage must be redone).
OUTPUTS = {s.name: list(s.outputs) for s in TABLE}


def stage_hashes(cfg: RunConfig) -> dict[str, str]:
    """Hash of each stage's inputs: its own settings plus the hashes of the stages it reads."""
    h: dict[str, str] = {}

    def visit(name: str) -> str:
        if name not in h:
            stage = BY_NAME[name]
            for dep in stage.reads:
                visit(dep)
            h[name] = config_hash(stage.key(cfg, h))
        return h[name]

    for s in TABLE:
        visit(s.name)
    return {s.name: h[s.name] for s in TABLE}


def shareable() -> tuple[str, ...]:
    """The stages a suite row may take from a finished sibling with the same hash."""
    return tuple(s.name for s in TABLE if s.shared)


def describe() -> str:
    """One line per stage (``dmde train --help``): name, what it reads, its config section."""
    return "\n".join(f"  {s.name:<13} reads {', '.join(s.reads) or 'the data':<34} [{s.section or '-'}]"
                     for s in TABLE)
