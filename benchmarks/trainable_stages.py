"""What one more trainable stage of EfficientNet-Lite0 costs an expert (issue #10, "stronger experts").

The pretrained regime caches the frozen trunk's output once and trains, per expert, the last
``trainable_stages`` stages + head conv over it (``experts.backbone_kwargs``). For k = 1, 2, 3 this
times one optimiser step of what an expert trains: the body over a cached batch of 64-px images
(batch ``--batch``, the regime's 128) plus a linear head of M + 1 = 101 outputs (M = 100), AdamW,
forward + backward; ``--trials`` interleaved trials of ``--steps`` steps each (after 3 warm-up
steps), median ms/step, images/s, the ratio to k = 1, and what the full budget would take per
model: 360,000 images (the flat model's 4 epochs over 90,000 images; every expert gets as many
steps, ``experts.budget=flat_steps``). Random weights: the cost does not depend on their values.

    .venv/bin/python benchmarks/trainable_stages.py
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from dmde.core.threads import configure_threads
from dmde.experts.backbones import efficientnet_lite0

BUDGET_IMAGES = 360_000


def step_seconds(k: int, batch: int, steps: int) -> tuple[tuple[int, ...], float]:
    torch.manual_seed(0)
    model = efficientnet_lite0(pretrained=False, trainable_stages=k, freeze_trunk=True)
    with torch.no_grad():
        feats = model.trunk(torch.rand(batch, 3, 64, 64))
    head = torch.nn.Linear(model.num_features, 101)
    opt = torch.optim.AdamW(list(model.body.parameters()) + list(head.parameters()), lr=1e-3)
    y = torch.randint(0, 101, (batch,))
    model.body.train()
    for i in range(3 + steps):
        if i == 3:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(head(model.body(feats)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return tuple(feats.shape[1:]), (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    configure_threads()
    times: dict[int, list[float]] = {k: [] for k in args.stages}
    shapes: dict[int, tuple[int, ...]] = {}
    for _ in range(args.trials):  # interleaved: a slow spell of the machine hits every k alike
        for k in args.stages:
            shapes[k], dt = step_seconds(k, args.batch, args.steps)
            times[k].append(dt)
    base = statistics.median(times[args.stages[0]])
    print(f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), batch {args.batch}, "
          f"{args.trials} trials × {args.steps} steps, median")
    print(f"| trainable stages | cached trunk output | ms / step | images / s | × k = {args.stages[0]} "
          f"| one model at the full budget ({BUDGET_IMAGES:,} images) |")
    print("|---|---|---|---|---|---|")
    for k in args.stages:
        dt = statistics.median(times[k])
        ips = args.batch / dt
        print(f"| {k} | {' × '.join(map(str, shapes[k]))} | {1000 * dt:.1f} | {ips:,.0f} | {dt / base:.2f} "
              f"| {BUDGET_IMAGES / ips / 60:.0f} min |")


if __name__ == "__main__":
    main()
