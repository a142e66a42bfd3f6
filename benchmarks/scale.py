"""The fusion stage alone at the paper's scale (issue #6 item 3): stacking (Eq. 7) + N-way softmax.

Synthetic expert outputs stand in for the CNNs: logits (B, G, Mmax+1) ~ N(0, 1) that require
grad, so the backward pass also reaches the experts' outputs as in end-to-end fine-tuning. One
training step = softmax → Υ (Eq. 7, clamped odds) → N-way layer on log Υ → cross-entropy →
backward → Adam step. Configurations (groups are SPEC §3's circular windows, M = 1,000, λ = 0.5):

* N = 7,756 (ImageNet-10K atomic classes): 16 experts;
* N = 21,841 (ImageNet-21K): 44 experts (both from :func:`dmde.hierarchy.groups.circular_groups`);

each with the dense N×N layer and the diagonal + low-rank one. Every configuration runs in a
fresh subprocess; peak memory is that process's ``ru_maxrss`` minus its value right after
``import torch`` (torch's CPU allocations are invisible to tracemalloc). A dense configuration
whose predicted training state (params + grad + two Adam moments = 16·N² bytes) exceeds
``--max-gb`` is not run; its prediction is reported instead.

    python benchmarks/scale.py                 # all four configurations, markdown table
    python benchmarks/scale.py --max-gb 12     # let dense at N = 21,841 (≈ 7.6 GB state) run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# One place for every setting (units in the names).
BATCH = 64
GROUP_SIZE = 1000
OVERLAP = 0.5
RANK = 64
TRIALS = 5
WARMUP = 1
CONFIGS = [(7756, "dense"), (7756, "lowrank"), (21841, "dense"), (21841, "lowrank")]
TARGET_GB = 4.0  # lowrank must train at N = 21,841 within this


def predicted_state_gb(n: int, kind: str, rank: int) -> float:
    """Parameters + gradient + Adam's two moments, fp32: 16 bytes per parameter."""
    params = n * n + n if kind == "dense" else n * (2 * rank + 2)
    return 16 * params / 1e9


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def worker(n: int, kind: str, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    base_gb = _rss_gb()
    from dmde.fusion.mixture import NWaySoftmax
    from dmde.fusion.stacking import GroupLayout, stack
    from dmde.hierarchy.groups import circular_groups

    groups = circular_groups(n, args.group_size, args.overlap)
    layout = GroupLayout.from_groups(groups, n)
    torch.manual_seed(0)
    nway = NWaySoftmax(n, kind=kind, rank=args.rank, input="log")
    opt = torch.optim.Adam(nway.parameters(), lr=1e-4)
    width = layout.max_size + 1
    times = []
    for t in range(args.warmup + args.trials):
        logits = torch.randn(args.batch, layout.n_groups, width, requires_grad=True)  # (B, G, Mmax+1)
        y = torch.randint(0, n, (args.batch,))
        start = time.perf_counter()
        P = torch.softmax(logits, dim=-1)
        loss = F.cross_entropy(nway(stack(P, layout, "eq7")), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        elapsed = time.perf_counter() - start
        if t >= args.warmup:
            times.append(elapsed)
    return {
        "n": n, "kind": kind, "groups": layout.n_groups,
        "coverage": sorted(set(layout.coverage().tolist())),
        "params": sum(p.numel() for p in nway.parameters()),
        "median_s": statistics.median(times),
        "min_s": min(times), "max_s": max(times),
        "peak_gb": _rss_gb() - base_gb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--group-size", type=int, default=GROUP_SIZE)
    ap.add_argument("--overlap", type=float, default=OVERLAP)
    ap.add_argument("--rank", type=int, default=RANK)
    ap.add_argument("--trials", type=int, default=TRIALS)
    ap.add_argument("--warmup", type=int, default=WARMUP)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--max-gb", type=float, default=8.0,
                    help="skip configurations whose predicted training state exceeds this")
    ap.add_argument("--only", default=None, help="e.g. 21841:lowrank")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        n, kind = args.worker.split(":")
        print(json.dumps(worker(int(n), kind, args)))
        return

    configs = CONFIGS
    if args.only:
        n, kind = args.only.split(":")
        configs = [(int(n), kind)]
    from dmde.hierarchy.groups import circular_groups

    rows = []
    for n, kind in configs:
        pred = predicted_state_gb(n, kind, args.rank)
        if pred > args.max_gb:
            rows.append({"n": n, "kind": kind, "pred": pred, "skipped": True})
            print(f"# N={n} {kind}: predicted {pred:.2f} GB > --max-gb {args.max_gb}: not run",
                  file=sys.stderr)
            continue
        cmd = [sys.executable, __file__, "--worker", f"{n}:{kind}"] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("worker", "only") and v is not None
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"n": n, "kind": kind, "pred": pred, "error": tail})
            print(f"# N={n} {kind}: failed: {tail}", file=sys.stderr)
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["pred"] = pred
        rows.append(row)
        print(f"# N={n} {kind}: {row['median_s']:.3f} s, {row['peak_gb']:.2f} GB", file=sys.stderr)

    print(f"Fusion stage at scale — {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, batch {args.batch}, M = {args.group_size}, λ = {args.overlap}, "
          f"rank {args.rank}, median of {args.trials} trials after {args.warmup} warm-up; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| N | experts | N-way | params | predicted state (GB) | step (s, median [min–max]) "
          f"| peak RSS Δ (GB) | ≤ {TARGET_GB:g} GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        groups = len(circular_groups(r["n"], args.group_size, args.overlap))
        if r.get("skipped") or r.get("error"):
            why = "not run (> --max-gb)" if r.get("skipped") else f"failed: {r['error']}"
            params = r["n"] * r["n"] + r["n"] if r["kind"] == "dense" else r["n"] * (2 * args.rank + 2)
            print(f"| {r['n']:,} | {groups} | {r['kind']} | {params / 1e6:.1f} M | {r['pred']:.2f} "
                  f"| {why} | — | {'no' if r['pred'] > TARGET_GB else '?'} |")
            continue
        print(f"| {r['n']:,} | {r['groups']} | {r['kind']} | {r['params'] / 1e6:.1f} M | {r['pred']:.2f} "
              f"| {r['median_s']:.3f} [{r['min_s']:.3f}–{r['max_s']:.3f}] | {r['peak_gb']:.2f} "
              f"| {'yes' if r['peak_gb'] <= TARGET_GB else 'no'} |")


if __name__ == "__main__":
    main()
