"""``dmde export RUN OUT``: a trained model as safetensors weights, its classes, config and model card."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="ship a trained model: safetensors weights, classes, config, model card",
                       description="Writes OUT (a new directory): model.safetensors (the model's weights, no "
                       "optimiser state), export.json (classes, input size, normalisation, versions), config.yaml, "
                       "ontology.json, groups.json and MODEL_CARD.md. dmde.load(OUT) and dmde predict OUT read it.")
    p.add_argument("run", help="run directory made by dmde train")
    p.add_argument("out", help="export directory to create")
    p.add_argument("--model", default=None,
                   help="mixture, mixture_nway, mixture_upsilon, flat, flat_wide or early_fusion (default: the best)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmde.run.export import export_run, read_json

    out = export_run(args.run, args.out, model=args.model)
    meta = read_json(out / "export.json")
    print(f"exported {meta['model']} of {args.run} ({len(meta['classes'])} classes) to {out}")
    return 0
