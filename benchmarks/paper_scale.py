"""The paper's scale, simulated (issue #11 item 6): the whole pipeline on the 10,450 classes of
ImageNet-21K-P (``../shared/data/imagenet-wnids/imagenet21k_miil_w21_synsets.txt``) with M = 1,000
and λ = 0.5 (21 experts), from streamed synthetic shards whose class structure follows WordNet.

1. The two-layer ontology of the classes is built from WordNet (as the run's first stage will).
2. Synthetic images (:class:`dmde.data.synthetic.HierarchicalSynthetic`): a category's classes
   share its hue and a 45° sector of stripe directions, so siblings look closer than cousins.
   They are written into tar shards (:mod:`dmde.data.shards`), split per class as a run splits.
3. ``dmde train`` on the shards (``data.storage=stream``), one stage per process (``--until``):
   wall time and peak RSS (``ru_maxrss`` of that process) of every stage.

    .venv/bin/python benchmarks/paper_scale.py                 # N = 10,450, M = 1,000, λ = 0.5
    .venv/bin/python benchmarks/paper_scale.py --limit 400 --size-m 60   # a quick smoke run

Small inputs (12 px, a small CNN, one epoch): this measures that the pipeline runs at N = 10⁴ in
bounded memory and time, not accuracy.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DMDE_SHARED", REPO.parent / "shared"))
WNIDS = SHARED / "data" / "imagenet-wnids" / "imagenet21k_miil_w21_synsets.txt"
#: Runs `dmde ARGS...` and prints the process's own peak RSS (VmHWM: counted from its exec, unlike
#: ru_maxrss, which a child inherits from the parent it was forked from).
STAGE_RUNNER = ("import sys\nfrom dmde.cli.main import main\nrc = main(sys.argv[1:])\n"
                "hwm = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
                "print(f'peak RSS KiB {hwm}', flush=True)\nsys.exit(rc)")
STAGES = ("ontology", "groups", "experts", "fusion", "finetune", "flat", "evaluate")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wnids", default=str(WNIDS))
    ap.add_argument("--limit", type=int, default=None, help="first n classes only (smoke runs)")
    ap.add_argument("--out", default="runs/paper-scale")
    ap.add_argument("--size-m", type=int, default=1000, help="M, classes per group")
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--train-per-class", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=12)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--resume", action="store_true",
                    help="keep --out's shards and finished stages; time only the stages still to do")
    ap.add_argument("--redo", nargs="*", default=(), choices=STAGES, metavar="STAGE",
                    help="with --resume: do these finished stages again (and time them), e.g. --redo evaluate")
    args = ap.parse_args()

    from dmde.data.shards import write_shards
    from dmde.data.synthetic import HierarchicalSynthetic
    from dmde.hierarchy.ontology import build_semantic_ontology
    from dmde.hierarchy.wordnet import WordNet
    from dmde.run.config import DataConfig
    from dmde.run.prepare import SPLIT_SETTINGS, SPLITS, split_indices

    wnids = Path(args.wnids).read_text().split()
    if args.limit:
        wnids = wnids[: args.limit]
    out = Path(args.out)
    if not args.resume:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    t0 = time.perf_counter()
    wn = WordNet.load()
    onto = build_semantic_ontology(wn, wnids, random_state=0)
    pos = {w: i for i, w in enumerate(onto.classes)}
    category_of = [int(onto.category[pos[w]]) for w in wnids]
    rows.append(("(setup) WordNet ontology for the images", time.perf_counter() - t0, None))

    t0 = time.perf_counter()
    holdout, fusion = 2, 2
    stages_path = out / "run" / "stages.json"
    done = json.loads(stages_path.read_text()) if stages_path.exists() else {}
    for stage in args.redo:  # not done: `dmde train --until` does it again (same hash, outputs rewritten)
        if stage in done:
            done[stage]["done"] = False
    if args.redo:
        stages_path.write_text(json.dumps(done, indent=1))
    data = DataConfig(dataset="shards", root=str(out / "shards"), image_size=args.image_size,
                      holdout_per_class=holdout, fusion_per_class=fusion, storage="stream", workers=args.workers)
    ds = HierarchicalSynthetic(category_of, wnids, args.train_per_class + holdout + fusion, size=args.image_size)
    classes, parts = split_indices(data, wnids, np.asarray(ds.targets))
    labels = np.asarray(ds.targets)
    if not (args.resume and (out / "shards").exists()):
        write_shards(ds, out / "shards", {n: parts[n][0] for n in SPLITS}, classes, labels, size=None,
                     shard_size=10000, settings={k: getattr(data, k) for k in SPLIT_SETTINGS}, progress=False)
    shard_bytes = sum(p.stat().st_size for p in (out / "shards").iterdir())
    if not args.resume:
        rows.append((f"(setup) {len(ds):,} images into shards ({shard_bytes / 1e6:.0f} MB)",
                     time.perf_counter() - t0, None))

    cfg = {
        "data": {k: getattr(data, k) for k in ("dataset", "root", "image_size", "holdout_per_class",
                                               "fusion_per_class", "storage", "workers")},
        "ontology": {"seed": 0},
        "groups": {"size": args.size_m, "overlap": args.overlap},
        "experts": {"backbone": "small_cnn", "backbone_kwargs": {"width": 8}, "epochs": 1, "batch_size": 256,
                    "lr": 0.05, "similarity_per_class": 2},
        "fusion": {"epochs": 2, "batch_size": 1024, "finetune": {"epochs": 1, "batch_size": 256, "lr": 0.002}},
        "baselines": {"flat": True, "epochs": 1},
        "progress": False,
        "tensorboard": False,
    }
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    for stage in STAGES:
        if args.resume and done.get(stage, {}).get("done"):
            continue  # timed by the invocation that ran it
        t0 = time.perf_counter()
        with open(out / f"{stage}.log", "w") as log:
            proc = subprocess.run([sys.executable, "-c", STAGE_RUNNER, "train", "--config", str(out / "config.yaml"),
                                   "--out", str(out / "run"), "--until", stage, "--no-progress"],
                                  stdout=log, stderr=subprocess.STDOUT, check=False)
        wall = time.perf_counter() - t0
        text = (out / f"{stage}.log").read_text()
        if proc.returncode != 0:
            print(text[-3000:])
            return 1
        peak = int(text.rsplit("peak RSS KiB ", 1)[1].split()[0]) / 2**20  # KiB → GiB
        rows.append((stage, wall, peak))
        print(f"{stage}: {wall:.1f} s, peak RSS {peak:.2f} GiB", flush=True)

    groups = json.loads((out / "run" / "groups.json").read_text())
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    total = sum(r[1] for r in rows)
    print(f"\nPaper scale, simulated: N = {len(classes):,} classes, {len(groups['groups'])} experts "
          f"(M = {args.size_m}, λ = {args.overlap}), {len(onto.categories)} categories, "
          f"{args.image_size} px, {args.train_per_class} training images per class, streamed "
          f"({args.workers} worker(s)); {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{datetime.date.today()}\n")
    print("| stage | wall (s) | peak RSS (GiB) |\n|---|---|---|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {'' if rss is None else f'{rss:.2f}'} |")
    print(f"| **total** | **{total:.1f}** ({total / 60:.1f} min) | **{max(r[2] or 0 for r in rows):.2f}** (max) |")
    top1 = {k: v["top1"] for k, v in metrics.items() if isinstance(v, dict) and "top1" in v}
    print("\ntop-1 on the hold-out (synthetic; chance = 1/N): "
          + ", ".join(f"{k} {100 * v:.2f}%" for k, v in sorted(top1.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
