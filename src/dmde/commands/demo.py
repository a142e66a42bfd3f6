"""``dmde demo [--out RUN]``: the main job on the embedded default (Fashion-MNIST)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on Fashion-MNIST, mixture against flat (≤ 10 min on 2 cores)",
                       description="Runs dmde train with the bundled demo configuration "
                       "(src/dmde/resources/demo.yaml): Fashion-MNIST's 10 classes as WordNet synsets, "
                       "a semantic ontology, 5 overlapping task groups, small-CNN experts with multi-task "
                       "heads, Eq. 7 stacking, the N-way softmax, end-to-end fine-tuning and the flat "
                       "baseline; then prints their accuracy side by side. Needs Debian's "
                       "dataset-fashion-mnist and wordnet-base (make demo installs them).")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. experts.epochs=2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.resources
    import tempfile
    import time

    from dmde.config import load_config
    from dmde.evaluate import format_table
    from dmde.pipeline import RunConfig, train

    text = importlib.resources.files("dmde").joinpath("resources/demo.yaml").read_text()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(text)
    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    cfg = load_config(RunConfig, fh.name, overrides)
    t0 = time.perf_counter()
    metrics = train(args.out, cfg)
    wall = time.perf_counter() - t0
    print(f"\ndmde demo: Fashion-MNIST, {cfg.data.holdout_per_class} hold-out images per class, run in {args.out}")
    print(format_table(metrics))
    if "mixture" in metrics and "flat" in metrics:
        d = 100 * (metrics["mixture"]["top1"] - metrics["flat"]["top1"])
        print(f"\nmixture − flat top-1: {d:+.2f} points")
    print(f"wall time: {wall:.0f} s")
    return 0
