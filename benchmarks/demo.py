"""`dmde demo` wall time (issue "The first five minutes"): the demo run TRIALS times, each in a
fresh run directory and a fresh process, as a user runs it (`dmde demo --out DIR --no-progress`).

Prints the wall time of each run, the median, where the time goes (per stage, from each run's
``stages.json``: median over the runs), the load average before each run, and whether the
printed tables are identical across the runs (same seed: they must be).

    .venv/bin/python benchmarks/demo.py [--trials 3] [--out runs/bench-demo] [-- OVERRIDES...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def table_of(text: str) -> str:
    """The [result] table printed by the demo."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| model |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default="runs/bench-demo")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    dmde = str(Path(sys.executable).with_name("dmde"))
    out = Path(args.out)
    walls, loads, tables, stages = [], [], [], []
    for t in range(args.trials):
        run = out / f"trial{t}"
        shutil.rmtree(run, ignore_errors=True)
        loads.append(os.getloadavg()[0])
        t0 = time.perf_counter()
        proc = subprocess.run([dmde, "demo", "--out", str(run), "--no-progress", *args.overrides],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n")
            return proc.returncode
        walls.append(wall)
        tables.append(table_of(proc.stdout))
        stages.append({k: float(v.get("seconds", 0)) for k, v in json.loads((run / "stages.json").read_text()).items()})
        if t == 0:
            (out / "demo_output.txt").write_text(proc.stdout)
        print(f"trial {t}: {wall:.1f} s (load average before: {loads[-1]:.2f})", flush=True)
    print(f"\n`dmde demo` wall time over {args.trials} runs: median {statistics.median(walls):.1f} s "
          f"[{min(walls):.1f}–{max(walls):.1f}]")
    print("\n| stage | seconds (median) |\n|---|---|")
    for name in stages[0]:
        print(f"| {name} | {statistics.median(s.get(name, 0.0) for s in stages):.1f} |")
    same = all(t == tables[0] for t in tables)
    print(f"\ntables identical across the {args.trials} runs: {'yes' if same else 'NO'}\n")
    print(tables[0])
    print(f"\nfirst run's whole output: {out / 'demo_output.txt'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
