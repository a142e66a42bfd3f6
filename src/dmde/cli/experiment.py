"""``dmde experiment --suite paper --data PATH --out DIR``: the paper's tables and figures."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="the paper's experiments as one resumable suite of runs, and a report",
                       description="Run every row of a suite (configs/<suite>/suite.yaml: the mixture, the flat "
                       "baseline, random and visual-tree assignment, Stack 2, without multi-task learning, "
                       "λ = 0 … 0.5, early fusion, without not-in-group) as `dmde train` runs under "
                       "OUT/<regime>/<row>-s<seed>, reusing finished runs and shared stages, then write "
                       "REPORT.md with Tables I–IV, the figures, mean ± std over seeds, the paper's own "
                       "numbers and whether each of its claims holds here. Interrupt it at any time and "
                       "run the same command again to continue.")
    p.add_argument("--suite", default="paper", help="suite name (configs/<name>/) or its directory (default: paper)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="Tiny-ImageNet directory or its train.zip (sets data.root of every row)")
    p.add_argument("--out", required=True, metavar="DIR", help="suite directory (runs, caches, suite.json)")
    p.add_argument("--regime", action="append", default=None,
                   help="regime(s) to run: pretrained, scratch (repeatable; default: pretrained)")
    p.add_argument("--rows", default=None, help="comma-separated rows to run (default: every row)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: each row's own)")
    p.add_argument("--quick", action="store_true",
                   help="smoke-sized suite: the suite's quick overrides (few classes, images, epochs), one seed")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new run after this many minutes (rerun to continue)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="where REPORT.md and its figures go (default: OUT/report)")
    p.add_argument("--report-only", action="store_true", help="train nothing; write the report from finished runs")
    p.add_argument("--no-report", action="store_true", help="train only")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every row")
    p.set_defaults(func=run)


def _ints(text: str | None, what: str) -> list[int] | None:
    from dmde.core.errors import DmdeValueError

    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DmdeValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dmde.report.experiment import write_report
    from dmde.report.runner import run_suite
    from dmde.report.suite import load_suite

    suite = load_suite(args.suite)
    regimes = args.regime or ["pretrained"]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    seeds = _ints(args.seeds, "--seeds")
    if not args.report_only:
        run_suite(suite, args.out, data=args.data, regimes=regimes, rows=rows, seeds=seeds, quick=args.quick,
                  extra=args.overrides, max_minutes=args.max_minutes, log=lambda s: print(s, flush=True))
    if not args.no_report:
        path = write_report(suite, args.out, regimes, Path(args.report) if args.report else None)
        print(f"wrote {path}")
    return 0
