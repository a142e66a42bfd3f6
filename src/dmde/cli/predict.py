"""``dmde predict RUN IMAGE... [--top-k K] [--json]``."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k classes (WNID, lemma, score) of images",
                       description="Score image files with a trained run's best model (the fine-tuned "
                       "mixture when present) and print the top-k classes of each.")
    p.add_argument("run", help="run directory made by dmde train, or an export made by dmde export")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (any format Pillow reads), directories of them, or glob patterns")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--model", default=None, help="mixture, mixture_nway, mixture_upsilon, flat or early_fusion")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="report an image that cannot be read on stderr and go on with the others")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmde.run.export import is_export, load_export
    from dmde.run.predict import Predictor, expand_images

    if is_export(args.run):
        if args.model is not None:
            from dmde.core.errors import DmdeValueError

            raise DmdeValueError(f"{args.run} is an export of one model: drop --model")
        pred = load_export(args.run, device=args.device)
    else:
        pred = Predictor.from_run(args.run, model=args.model, device=args.device)
    images = expand_images(args.images)
    results = pred.predict(images, top_k=args.top_k, on_corrupt="skip" if args.skip_corrupt else "raise")
    for im, why in pred.skipped:
        print(f"dmde: skipped {im}: {why}", file=sys.stderr)
    pairs = [(im, r) for im, r in zip(images, results) if r is not None]
    if args.json:
        print(json.dumps([{"image": im, "model": pred.model_name, "top": [p.to_dict() for p in r]}
                          for im, r in pairs], indent=1))
        return 0
    for im, r in pairs:
        print(f"{im}  ({pred.model_name})")
        for rank, p in enumerate(r, 1):
            print(f"  {rank}. {p.score:6.3f}  {p.wnid}  {p.lemma}")
    return 0
