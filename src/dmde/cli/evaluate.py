"""``dmde evaluate RUN [--data PATH] [--json]``."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="top-1/2/5/10, per-class accuracy and mistake distance of a run's models",
                       description="Evaluate every model of RUN (mixture, its stages, baselines) on the run's "
                       "own hold-out split, or on a dataset given by --data: Tiny-ImageNet's official val/ "
                       "layout (val/images + val/val_annotations.txt), its zip, or an ImageFolder "
                       "(<root>/<wnid or lemma>/<image>). Writes metrics.json, per_class.csv and "
                       "per_class.png.")
    p.add_argument("run", help="run directory made by dmde train")
    p.add_argument("--data", default=None, help="dataset to evaluate on (default: the run's hold-out split)")
    p.add_argument("--out", default=None, help="where to write the results (default: RUN, or RUN/eval-<name> "
                   "with --data)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dmde.run.evaluate import evaluate_run, format_accounting, format_table

    data, out = None, args.out
    if args.data is not None:
        from dmde.run.prepare import external_eval_data

        data, skipped = external_eval_data(args.run, args.data)
        out = out or str(Path(args.run) / f"eval-{Path(args.data).stem}")
        if skipped:
            print(f"note: {skipped} images of classes outside the run's ontology were left out", file=sys.stderr)
    metrics = evaluate_run(args.run, data=data, device=args.device, out_dir=out, progress=not args.no_progress)
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        print(format_table(metrics))
        if format_accounting(metrics):
            print("\nexperts on their own classes (hold-out), beside the flat model restricted to them:")
            print(format_accounting(metrics))
    return 0
