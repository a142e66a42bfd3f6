"""``dmde train``: the whole method as one resumable run directory.

data → ontology (§III) → task groups (§IV-A) → experts (§IV-B) → fusion (Eqs. 7–10) →
end-to-end fine-tuning (Eq. 11) → baselines (§V) → evaluation.

Each stage records in ``stages.json`` the hash of everything it depends on (its own config
section and the hashes of the stages before it). Running again skips a stage whose hash is
unchanged and whose outputs exist; a changed setting redoes that stage and the ones after it.
A stage killed half-way resumes from its last checkpoint (experts and every trained model
write one per epoch).

Run directory::

    config.yaml      resolved configuration       stages.json   stage hashes and timings
    data.json        classes, split sizes         ontology.json / groups.json
    experts/expert_XXX.pt (+ .jsonl logs)         fusion.pt     the trained N-way layer
    mixture.pt       fine-tuned mixture           flat.pt, early_fusion.pt   baselines
    metrics.json, per_class.csv, per_class.png    evaluation
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from dmde.core.checkpoint import load_checkpoint
from dmde.core.config import save_config
from dmde.core.distributed import barrier, dist_context
from dmde.core.errors import DmdeValueError
from dmde.core.io import DirectoryLock, read_json, remove_stale_temporaries, write_json
from dmde.core.tensorboard import set_enabled as set_tensorboard
from dmde.core.precision import check_precision
from dmde.experts.train import train_all_experts
from dmde.hierarchy.ontology import Ontology
from dmde.run.config import RunConfig, resolve_device, validate
from dmde.run.evaluate import evaluate_run
from dmde.run.prepare import cat_data, data_summary, prepare_splits, run_wordnet
from dmde.run.stages import BY_NAME, STAGES, needs_flat, stage_hashes
from dmde.run.store import (
    Run,
    build_mixture,
    flat_logits,
    load_experts,
    load_flat_state,
    load_groups,
)
from dmde.run.trainers import (
    build_run_ontology,
    finetune,
    make_run_groups,
    train_early_fusion,
    train_flat,
    train_fusion,
    width_matched_model,
)


def train(run_dir: str | os.PathLike, cfg: RunConfig, until: str | None = None,
          only_experts: Sequence[int] | None = None,
          on_stage: Callable[[str, Path], None] | None = None) -> dict[str, Any]:
    """Run (or resume) every stage up to ``until`` (default: all); returns the metrics.
    ``on_stage(name, run_dir)`` is called on rank 0 once each stage is finished (or was already):
    :class:`dmde.report.narrate.Narrator` prints what it did.

    Rank 0 holds the run directory's lock throughout (a second ``dmde train`` into it fails at
    once, naming this process) and first removes the temporary files a killed run left."""
    if until is not None and until not in STAGES:
        raise DmdeValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    validate(cfg)
    check_precision(cfg.precision, resolve_device(cfg.device))  # a missing GPU: one line before anything is written
    if dist_context()[0] != 0:
        return _train(run_dir, cfg, until, only_experts, on_stage)
    with DirectoryLock(run_dir):
        remove_stale_temporaries(run_dir)
        return _train(run_dir, cfg, until, only_experts, on_stage)


def _train(run_dir: str | os.PathLike, cfg: RunConfig, until: str | None,
           only_experts: Sequence[int] | None, on_stage: Callable[[str, Path], None] | None) -> dict[str, Any]:
    run = Run(run_dir, cfg)
    rank, world = dist_context()
    set_tensorboard(cfg.tensorboard)  # event files beside every JSONL log, or not
    device = resolve_device(cfg.device)

    told: set[str] = set()

    def tell(name: str) -> None:
        if on_stage is not None and rank == 0 and name not in told:
            told.add(name)
            on_stage(name, run.dir)

    if rank == 0:
        save_config(cfg, run.dir / "config.yaml")
    hashes = stage_hashes(cfg)
    wn = run_wordnet(cfg)  # None: ontology.source visual or taxonomy, class names as they are
    progress = cfg.progress and rank == 0
    if rank != 0:
        barrier()  # rank 0 decodes (and caches the trunk outputs) first
    splits = prepare_splits(cfg, wn, progress=progress, cache_dir=run.dir, device=device)
    if rank == 0:
        barrier()
        write_json(run.dir / "data.json", data_summary(cfg, splits, device))

    def want(name: str) -> bool:
        return until is None or STAGES.index(name) <= STAGES.index(until)

    # ---- ontology (§III)
    if not run.is_done("ontology", hashes["ontology"]):
        if rank == 0:
            run.begin("ontology", hashes["ontology"])
            onto = build_run_ontology(cfg, splits, wn, device)
            onto.to_json(run.dir / "ontology.json")
            run.finish("ontology")
        barrier()
    onto = Ontology.from_json(run.dir / "ontology.json")
    tell("ontology")
    positions = onto.positions_or(splits.classes)
    splits = splits.align(positions)
    n = onto.n_classes

    # ---- task groups (§IV-A)
    if not run.is_done("groups", hashes["groups"]):
        if rank == 0:
            run.begin("groups", hashes["groups"])
            groups = make_run_groups(cfg, onto, splits, wn, run.dir, device)
            groups.to_json(run.dir / "groups.json")
            run.finish("groups", n_groups=len(groups.groups))
        barrier()
    groups = load_groups(run.dir, onto)
    tell("groups")
    if not want("experts"):
        return {}

    def stage(name: str, fn, when: bool = True, record=None) -> None:
        """Run a stage of the table once, when the table enables it (and ``when``): on rank 0, or
        on every rank (data-parallel) for a parallel stage; ``record()`` adds facts about the
        finished stage to stages.json."""
        barrier()
        run.reload()
        spec = BY_NAME[name]
        if not (when and spec.enabled(cfg)):
            return
        parallel = spec.parallel
        if not run.is_done(name, hashes[name]):
            if rank == 0:
                run.begin(name, hashes[name])
            barrier()
            if parallel or rank == 0:
                fn()
            barrier()
            if rank == 0:
                run.finish(name, **(record() if record else {}))
        tell(name)

    everything = cat_data(splits.train, splits.fusion)

    def flat() -> None:
        train_flat(run.dir / "flat.pt", everything, n, cfg, onto.hash(), device, progress)

    warm = cfg.experts.init == "flat"
    if needs_flat(cfg):  # the experts start from the flat model (HD-CNN's warm start) or learn its soft
        stage("flat", flat)  # targets: it trains first

    # ---- experts (§IV-B)
    h = hashes["experts"]
    if not run.is_done("experts", h) or only_experts is not None:
        if rank == 0 and run.stages.get("experts", {}).get("hash") != h:
            run.begin("experts", h)
        barrier()
        results = train_all_experts(groups.groups, groups.wnids, splits.train, cfg.experts, run.dir / "experts",
                                    onto.hash(), holdout=splits.holdout, only=only_experts, device=device,
                                    progress=progress, init_from=load_flat_state(run.dir, onto) if warm else None,
                                    flat_samples=len(everything), precision=cfg.precision,
                                    teacher_logits=flat_logits(run.dir, cfg, onto, splits.train, device)
                                    if cfg.experts.distill > 0 else None)
        write_json(run.dir / "experts" / f"metrics_rank{rank}.json", {str(k): v for k, v in results.items()})
        if rank == 0 and only_experts is None:
            run.finish("experts")
        barrier()
        if only_experts is not None:
            return {"experts": results}
    tell("experts")
    if not want("fusion"):
        return {}

    experts = load_experts(run.dir, onto, groups, cfg.experts)
    # ---- fusion: the N-way softmax on Υ (Eqs. 7–10), experts frozen
    stage("fusion",
          lambda: train_fusion(run.dir / "fusion.pt", experts, groups.groups, n,
                               splits.fusion if len(splits.fusion) else splits.train, cfg.fusion, device, progress,
                               cfg.precision))
    # ---- end-to-end fine-tuning (Eq. 11), data-parallel under torchrun
    stage("finetune",
          lambda: finetune(run.dir / "mixture.pt", build_mixture(run.dir, cfg, experts, groups.groups, n, "fusion"),
                           splits.fusion if cfg.fusion.finetune_data == "fusion" else everything, cfg, onto.hash(),
                           device, progress), want("finetune"))
    # ---- baselines (§V)
    stage("flat", flat, want("flat"))

    def flat_wide() -> None:
        model, match = width_matched_model(cfg, n, groups, splits.train)
        train_flat(run.dir / "flat_wide.pt", everything, n, cfg, onto.hash(), device, progress, model=model,
                   extra={"width_match": match})

    stage("flat_wide", flat_wide, want("flat_wide"), record=lambda: load_checkpoint(run.dir / "flat_wide.pt")["width_match"])

    def ensemble() -> None:  # member 0 is the flat model itself
        for k in range(1, len(groups.groups)):
            train_flat(run.dir / "ensemble" / f"flat_{k:03d}.pt", everything, n, cfg, onto.hash(), device, progress,
                       member=k)

    stage("ensemble", ensemble, want("ensemble") and len(groups.groups) > 1,
          record=lambda: {"members": len(groups.groups)})
    stage("early_fusion",
          lambda: train_early_fusion(run.dir / "early_fusion.pt", experts, everything, n, cfg, device, progress),
          want("early_fusion"))
    if rank != 0:
        return {}

    # ---- evaluation
    if want("evaluate") and not run.is_done("evaluate", hashes["evaluate"]):
        run.begin("evaluate", hashes["evaluate"])
        evaluate_run(run.dir, data=splits.holdout, device=device, progress=progress)
        run.finish("evaluate")
    if want("evaluate"):
        tell("evaluate")
    return read_json(run.dir / "metrics.json") if (run.dir / "metrics.json").exists() else {}
