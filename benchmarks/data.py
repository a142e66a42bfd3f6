"""Streaming data against the in-memory path (issue #11, "Must show").

1. **Throughput**: Tiny-ImageNet's first ``--classes`` classes at 64 px, written once into shards
   (``dmde shards``: the original JPEG bytes), one expert trained for one epoch (the scratch
   regime's small CNN, group of ``--group`` classes plus its not-in-group sample) from memory
   and from the shards with 0, 1 and 2 DataLoader workers; ``--trials`` interleaved trials,
   images/s of the epoch (median), and the image bytes the expert read against the split's.
2. **Memory**: synthetic shards of ``--small`` and 10× as many images; one expert epoch over
   each, streamed and in memory, each in a fresh process: its peak RSS (``VmHWM``).

    .venv/bin/python benchmarks/data.py                      # both parts
    .venv/bin/python benchmarks/data.py --part memory --small 2000   # a quick look
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DMDE_SHARED", REPO.parent / "shared"))
TINY = SHARED / "data" / "tiny-imagenet-200" / "train.zip"


def expert_cfg(width: int = 24, batch: int = 128):
    from dmde.experts.train import ExpertsConfig

    return ExpertsConfig(backbone="small_cnn", backbone_kwargs={"width": width}, epochs=1, batch_size=batch,
                         lr=0.05, similarity_per_class=2, seed=0)


def one_expert_epoch(train, group: list[int], out: Path) -> dict:
    """Train expert 0 on ``group`` for one epoch; its fit metrics."""
    from dmde.experts.train import train_expert

    shutil.rmtree(out, ignore_errors=True)
    return train_expert(0, group, [str(c) for c in group], train, expert_cfg(), out, "bench", progress=False)


def throughput(args) -> list[str]:
    from dmde.run.config import DataConfig
    from dmde.run.prepare import load_splits, write_run_shards

    out = Path(args.out)
    base = DataConfig(dataset="tiny_imagenet", root=str(args.tiny), max_classes=args.classes, holdout_per_class=50,
                      storage="memory")
    shards = out / "tiny-shards"
    if not shards.exists():
        t0 = time.perf_counter()
        write_run_shards(base, shards, shard_size=2000, progress=False)
        print(f"shards written in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    memory = load_splits(base, progress=False).train
    print(f"in-memory decode: {time.perf_counter() - t0:.1f} s", flush=True)
    from dataclasses import replace

    streamed = {w: load_splits(replace(base, dataset="shards", root=str(shards), storage="stream", workers=w),
                               progress=False).train for w in (0, 1, 2)}
    group = list(range(args.group))
    modes = {"memory": memory, **{f"stream, {w} worker{'s' if w != 1 else ''}": d for w, d in streamed.items()}}
    ips: dict[str, list[float]] = {m: [] for m in modes}
    for t in range(args.trials):
        for name, data in modes.items():  # interleaved: drift in the machine's load hits every mode alike
            m = one_expert_epoch(data, group, out / "expert")
            ips[name].append(m["images_per_s"])
            print(f"trial {t} {name}: {m['images_per_s']:.0f} img/s", flush=True)
    reader = streamed[0].reader
    reader.bytes_read = 0
    one_expert_epoch(streamed[0], group, out / "expert")
    rows_all = streamed[0].rows.numpy()
    split_bytes = int(reader.nbytes[rows_all].sum())
    ref = statistics.median(ips["memory"])
    lines = [(f"Throughput: Tiny-ImageNet, first {args.classes} classes at 64 px ({len(memory):,} training images), "
              f"one expert (small_cnn width 24, batch 128, group of {args.group} classes + not-in-group sample), "
              f"one epoch, {args.trials} trials interleaved."), "",
             "| data path | images/s, median [min–max] | ratio to in-memory |", "|---|---|---|"]
    for name, v in ips.items():
        med = statistics.median(v)
        lines.append(f"| {name} | {med:.0f} [{min(v):.0f}–{max(v):.0f}] | {med / ref:.2f}× |")
    lines += ["", (f"Bytes one expert epoch read from the shards: {reader.bytes_read / 1e6:.1f} MB of the training "
                   f"split's {split_bytes / 1e6:.1f} MB ({100 * reader.bytes_read / split_bytes:.0f}%), image members "
                   "only.")]
    return lines


def _memory_worker(shards: str, storage: str, out: str) -> None:
    """One expert epoch over a shard directory; prints JSON (in a fresh process: its own peak RSS)."""
    from dmde.run.config import DataConfig
    from dmde.run.prepare import load_splits

    data = DataConfig(dataset="shards", root=shards, image_size=32, holdout_per_class=2, storage=storage, workers=1)
    t0 = time.perf_counter()
    train = load_splits(data, progress=False).train
    m = one_expert_epoch(train, list(range(10)), Path(out))
    hwm = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])  # KiB, since this exec
    print(json.dumps({"images": len(train), "epoch_images": m["images"], "seconds": time.perf_counter() - t0,
                      "peak_kib": hwm}))


def memory(args) -> list[str]:
    from dmde.data.shards import write_shards
    from dmde.data.synthetic import HierarchicalSynthetic
    from dmde.run.config import DataConfig
    from dmde.run.prepare import SPLIT_SETTINGS, SPLITS, split_indices

    out = Path(args.out)
    rows = []
    for n in (args.small, 10 * args.small):
        shards = out / f"synthetic-{n}"
        per_class = n // 100
        data = DataConfig(dataset="shards", root=str(shards), image_size=32, holdout_per_class=2)
        if not shards.exists():
            ds = HierarchicalSynthetic([c // 10 for c in range(100)], [f"c{c:03d}" for c in range(100)], per_class,
                                       size=32)
            classes, parts = split_indices(data, ds.classes, np.asarray(ds.targets))
            t0 = time.perf_counter()
            write_shards(ds, shards, {k: parts[k][0] for k in SPLITS}, classes, np.asarray(ds.targets),
                         shard_size=5000, settings={k: getattr(data, k) for k in SPLIT_SETTINGS}, progress=False)
            print(f"{n:,} synthetic images written in {time.perf_counter() - t0:.1f} s", flush=True)
        for storage in ("stream", "memory"):
            proc = subprocess.Popen([sys.executable, __file__, "--worker", str(shards), storage, str(out / "expert-m")],
                                    stdout=subprocess.PIPE, text=True)
            text = proc.stdout.read()
            _, status, _ = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"memory worker failed for {shards} {storage}")
            info = json.loads(text.strip().splitlines()[-1])
            rss = info["peak_kib"] / 2**10  # not usage.ru_maxrss: a child inherits it from its parent's fork
            rows.append((n, storage, rss, info))
            print(f"{n:,} images, {storage}: peak RSS {rss:.0f} MiB, {info['seconds']:.1f} s", flush=True)
    lines = [("Memory: synthetic shards (100 classes, 32 px), one expert epoch (group of 10 classes + not-in-group "
              "sample), each in a fresh process."), "",
             "| images | storage | peak RSS (MiB) | ratio to the small dataset | wall (s) |", "|---|---|---|---|---|"]
    small = {s: r for n, s, r, _ in rows if n == args.small}
    for n, storage, rss, info in rows:
        lines.append(f"| {n:,} | {storage} | {rss:.0f} | {rss / small[storage]:.2f}× | {info['seconds']:.1f} |")
    return lines


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _memory_worker(*sys.argv[2:5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("throughput", "memory", "all"), default="all")
    ap.add_argument("--tiny", default=str(TINY))
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--group", type=int, default=2, help="classes in the expert's group (1/10 of 20 by default)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--small", type=int, default=20000)
    ap.add_argument("--out", default="runs/bench-data")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    head = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {datetime.date.today()}, "
            f"load average before {os.getloadavg()[0]:.2f}; command: python benchmarks/data.py "
            + " ".join(sys.argv[1:]))
    lines = [head, ""]
    if args.part in ("throughput", "all"):
        lines += throughput(args) + [""]
    if args.part in ("memory", "all"):
        lines += memory(args)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
