"""``dmde demo [--out RUN]``: the main job on the embedded default (Fashion-MNIST)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on Fashion-MNIST, mixture against flat (about 4 min on 2 cores)",
                       description="Runs dmde train with the bundled demo configuration "
                       "(src/dmde/resources/demo.yaml): Fashion-MNIST's 10 classes as WordNet synsets, "
                       "a semantic ontology, 5 overlapping task groups, small-CNN experts with multi-task "
                       "heads, Eq. 7 stacking, the N-way softmax, end-to-end fine-tuning and the flat "
                       "baseline, telling what each stage did; then prints their accuracy side by side. Needs "
                       "Debian's dataset-fashion-mnist and wordnet-base (make demo installs them).")
    p.add_argument("--out", default="runs/demo", help="run directory, kept for dmde evaluate / predict "
                   "(default: runs/demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the stage lines stay)")
    p.add_argument("--threads", default=argparse.SUPPRESS, metavar="N",
                   help="torch threads (default: the cores this process may use)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. experts.epochs=2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.resources
    import sys
    import tempfile
    import time
    from pathlib import Path

    import torch

    from dmde.core.config import load_config
    from dmde.core.io import read_json
    from dmde.core.threads import available_cores, configure_threads, load_warning
    from dmde.report.narrate import Narrator, conclusion
    from dmde.run.config import RunConfig
    from dmde.run.evaluate import format_table, model_rows
    from dmde.run.pipeline import train

    threads = configure_threads(getattr(args, "threads", None))
    warning = load_warning()
    if warning:
        print(warning, file=sys.stderr)
    text = importlib.resources.files("dmde").joinpath("resources/demo.yaml").read_text()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(text)
    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    cfg = load_config(RunConfig, fh.name, overrides)
    print(f"dmde demo: the mixture of diverse experts on Fashion-MNIST (10 classes as WordNet nouns), "
          f"run directory {args.out}; torch {torch.__version__}, {threads} thread(s) on {available_cores()} core(s)",
          flush=True)
    t0 = time.perf_counter()
    metrics = train(args.out, cfg, on_stage=Narrator())
    wall = time.perf_counter() - t0
    print(f"\n[result] top-1 … top-10 (%) on {cfg.data.holdout_per_class} hold-out images per class (never trained "
          "on); mistake D: mean WordNet distance of the wrong answers (Eq. 1)")
    print(format_table(metrics))
    if "mixture" in metrics and "flat" in metrics:
        d = 100 * (metrics["mixture"]["top1"] - metrics["flat"]["top1"])
        print(f"\nmixture − flat top-1: {d:+.2f} points")
    n_classes = len(read_json(Path(args.out) / "ontology.json")["classes"])
    print(conclusion(model_rows(metrics), n_classes))
    print(f"wall time: {wall:.0f} s")
    print("\nnext, on this run:\n"
          f"  dmde evaluate {args.out}                      # the tables again, per-class accuracy in {args.out}\n"
          f"  dmde predict {args.out} IMAGE [IMAGE ...]     # top-5 classes of your images\n"
          f"  dmde train --config CONFIG --out RUN        # your own data (see README)")
    return 0
