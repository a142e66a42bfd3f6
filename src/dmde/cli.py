"""The ``dmde`` command line.

Each sub-command lives in :mod:`dmde.commands` as a module with ``register(subparsers)``;
heavy imports (torch) stay inside the command functions so ``dmde --help`` is instant.
Errors derived from :class:`dmde.errors.DmdeError` print one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from dmde import __version__
from dmde.errors import DmdeError

# Order = order in ``dmde --help``. A module that is not written yet is skipped.
_COMMAND_MODULES = (
    "dmde.commands.ontology",  # dmde ontology build|show
    "dmde.commands.groups",  # dmde groups
    "dmde.commands.experts",  # dmde train-experts
    "dmde.commands.train",  # dmde train
    "dmde.commands.evaluate",  # dmde evaluate
    "dmde.commands.predict",  # dmde predict
    "dmde.commands.export",  # dmde export
    "dmde.commands.demo",  # dmde demo
    "dmde.commands.experiment",  # dmde experiment
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmde",
        description="Deep Mixture of Diverse Experts: WordNet ontology, task groups, "
        "multi-task experts and their fusion.",
    )
    parser.add_argument("--version", action="version", version=f"dmde {__version__}")
    parser.add_argument("--threads", default=None, metavar="N",
                        help="torch threads (default: $DMDE_THREADS, else the cores this process may use, "
                        "shared between torchrun ranks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command not in ("ontology", "groups", "export"):  # the commands that run torch
            from dmde.threads import configure_threads

            configure_threads(args.threads)
        result = args.func(args)
    except DmdeError as exc:
        print(f"dmde: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dmde: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
