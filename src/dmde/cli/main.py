"""The ``dmde`` command line.

Each sub-command lives in :mod:`dmde.cli` as a module with ``register(subparsers)``;
heavy imports (torch) stay inside the command functions so ``dmde --help`` is instant.
Errors derived from :class:`dmde.core.errors.DmdeError` print one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from dmde import __version__
from dmde.core.errors import DmdeError

# Order = order in ``dmde --help``. A module that is not written yet is skipped.
_COMMAND_MODULES = (
    "dmde.cli.ontology",  # dmde ontology build|show
    "dmde.cli.groups",  # dmde groups
    "dmde.cli.shards",  # dmde shards
    "dmde.cli.train",  # dmde train
    "dmde.cli.evaluate",  # dmde evaluate
    "dmde.cli.predict",  # dmde predict
    "dmde.cli.export",  # dmde export
    "dmde.cli.demo",  # dmde demo
    "dmde.cli.experiment",  # dmde experiment
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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is emitted (not when it was made)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides after an option that follows a positional (`shards SRC --out D k=v`)
        if not hasattr(args, "overrides") or not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logger, handler = logging.getLogger("dmde"), None
    # one line per epoch trained, or per model evaluated, even with --no-progress
    if args.command in ("train", "train-experts", "experiment", "evaluate"):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        if args.command not in ("ontology", "groups", "export"):  # the commands that run torch
            from dmde.core.threads import configure_threads

            configure_threads(args.threads)
        result = args.func(args)
    except DmdeError as exc:
        print(f"dmde: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no (permissions, a full disk, …): one line too
        where = f": {exc.filename}" if exc.filename else ""
        print(f"dmde: error: {(exc.strerror or str(exc)).lower()}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dmde: interrupted", file=sys.stderr)
        return 130
    finally:  # the command's own: a caller running commands in-process keeps its logging as it was
        if handler is not None:
            logger.removeHandler(handler)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
