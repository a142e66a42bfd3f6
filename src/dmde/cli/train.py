"""``dmde train`` (the whole pipeline) and ``dmde train-experts`` (up to the experts)."""
from __future__ import annotations

import argparse
from pathlib import Path

from dmde.run.stages import (
    STAGES,  # light (no torch): `dmde train --help` lists the stages
)

OVERRIDES_HELP = "config overrides KEY=VALUE (dotted keys, YAML values), e.g. experts.epochs=2 groups.overlap=0.3"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run the whole pipeline into a run directory (resumable)",
                       description="Ontology → task groups → experts → fusion → end-to-end fine-tuning → "
                       "baselines → evaluation, into RUN. Finished stages are reused; a changed setting "
                       "redoes only the stages that depend on it; an interrupted stage resumes.")
    _common(p)
    p.add_argument("--until", default=None, choices=STAGES, metavar="STAGE",
                   help=f"stop after this stage: {', '.join(STAGES)}")
    p.set_defaults(func=run_train)

    q = sub.add_parser("train-experts", help="train the task groups' experts (§IV-B)",
                       description="Train every task group's expert, or those named by --groups, into "
                       "RUN/experts/. Under torchrun the experts are spread over the ranks.")
    _common(q)
    q.add_argument("--groups", default=None, help="comma-separated group indices to train (default: all)")
    q.add_argument("--resume", action="store_true",
                   help="continue from the last completed epoch (needed when RUN already holds experts)")
    q.set_defaults(func=run_train_experts)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file (see configs/); defaults apply without it")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (overrides the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


def load_run_config(args: argparse.Namespace):
    from dmde.core.config import load_config
    from dmde.run.config import RunConfig

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.no_progress:
        overrides.append("progress=false")
    return load_config(RunConfig, shipped_config(args.config), overrides)


def shipped_config(path: str | None) -> str | None:
    """``--config`` as given, or, when no such file exists, a config shipped with dmde
    (``paper/pretrained.yaml``, ``configs/paper-full/pretrained.yaml``): the same names work from
    a checkout and from an installed wheel."""
    if path is None or Path(path).exists():
        return path
    from dmde.report.suite import CONFIGS_DIR

    rel = Path(path)
    rel = rel.relative_to("configs") if rel.parts[:1] == ("configs",) else rel
    return str(CONFIGS_DIR / rel) if (CONFIGS_DIR / rel).is_file() else path


def run_train(args: argparse.Namespace) -> int:
    from dmde.run.evaluate import format_accounting, format_table
    from dmde.run.pipeline import train

    cfg = load_run_config(args)
    metrics = train(args.out, cfg, until=args.until)
    if metrics:
        print(format_table(metrics))
        if format_accounting(metrics):
            print("\nexperts on their own classes (hold-out), beside the flat model restricted to them:")
            print(format_accounting(metrics))
    return 0


def run_train_experts(args: argparse.Namespace) -> int:
    from dmde.core.errors import DmdeValueError
    from dmde.run.pipeline import train

    cfg = load_run_config(args)
    only = None
    if args.groups:
        try:
            only = [int(g) for g in args.groups.split(",") if g.strip()]
        except ValueError:
            raise DmdeValueError(f"--groups must be comma-separated integers, got {args.groups!r}") from None
    experts_dir = Path(args.out) / "experts"
    if not args.resume and experts_dir.is_dir() and any(experts_dir.glob("expert_*.pt")):
        raise DmdeValueError(f"{experts_dir} already holds expert checkpoints; pass --resume to continue them")
    result = train(args.out, cfg, until="experts", only_experts=only)
    for j, m in sorted(result.get("experts", {}).items()):
        print(f"expert {j}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in m.items() if k != "expert"))
    return 0
