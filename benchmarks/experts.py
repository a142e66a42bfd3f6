"""Expert training on Tiny-ImageNet (issue #3): is the data path a bottleneck, and what does the
multi-task head (Eqs. 2–6) buy?

Data: the 100,000 training images of Tiny-ImageNet (``<shared>/data/tiny-imagenet-200/train.zip``),
decoded once and cached under ``--cache-dir``, split as ``configs/paper/pretrained.yaml`` splits
them (seed 0): 50 hold-out images per class (10,000, never trained on), 25 per class kept for the
fusion layer (unused here), 100 per class for the experts (20,000). Ontology: the semantic tree of
the 200 WNIDs (§III); task groups of M = 50 classes overlapping by λ = 0.5 (§IV-A) — 8 groups,
every class in two.

1. **Throughput** (images/s, one epoch of one expert, median over interleaved trials): dmde's path
   (:func:`dmde.experts.train.train_expert` → :func:`dmde.core.training.fit`, fresh run directory every
   trial, so the wall time includes building the model, the group view and the checkpoint)
   against a plain PyTorch loop over the same backbone, the same images (the group view's epoch-0
   sample), batch size and optimiser: manual index batches into a pre-normalised float tensor,
   cross-entropy on a linear layer. "loop" rates count the epoch loop only (dmde: ``fit``'s own
   timer, which includes the epoch-start similarity), "call" rates the whole call. Two regimes:
   ``small_cnn`` at 32 px (images resized once), and EfficientNet-Lite0 (ImageNet weights, trunk
   frozen and cached, last stage + head conv trained). The "same work" dmde row uses a plain
   linear head and no augmentation, as the plain loop does; the next rows add, one at a time,
   what dmde does on top (augmentation, for images; the multi-task head and loss without the
   Laplacian term), and the "default" row all of it, with the visual similarity S (Eq. 3)
   recomputed from the expert's features at the epoch start.
2. **Accuracy with and without the multi-task head** (Table II): top-1 among the group's M classes
   on the group's hold-out images, and the recall of "not in group" on the other hold-out images,
   for a few groups × seeds, multi-task head (δ1, δ2 = defaults) vs plain linear head (δ1 = δ2 = 0),
   both over the cached pretrained EfficientNet-Lite0 trunk. Same seed ⇒ same pretrained body and
   the same not-in-group samples every epoch, so the per-seed difference is paired.

On a shared machine pass ``--threads 1``: two OpenMP threads per process on two busy cores spin
and run several times slower than one.

    python benchmarks/experts.py --threads 1             # the full run (about 15–20 min on 2 shared cores)
    python benchmarks/experts.py --quick                 # minutes: fewer trials/seeds, 1 epoch
    python benchmarks/experts.py --skip-accuracy --trials 3
    python benchmarks/experts.py --shared /path/to/shared --groups 0,3,6 --seeds 0,1,2 --epochs 3
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# One place for every setting (units in the names).
GROUP_SIZE = 50  # M, classes per task group
OVERLAP = 0.5  # λ
HOLDOUT_PER_CLASS = 50  # hold-out images per class (10,000 in all), never trained on
FUSION_PER_CLASS = 25  # kept for the fusion layer by configs/paper (not used here)
TRAIN_PER_CLASS = 100  # the experts' training images per class (20,000 in all)
SPLIT_SEED = 0
BATCH = 128
# throughput
TRIALS = 5
WARMUP_TRIALS = 1
THROUGHPUT_GROUP = 0
CNN_SIZE_PX = 32
CNN_PER_CLASS = 40  # training images per class in the throughput runs (group view: 2 × 50 × 40 per epoch)
CNN_OPTIM = dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
LITE0_PER_CLASS = 50
# accuracy (pretrained regime)
ACC_GROUPS = (0, 3, 6)
ACC_SEEDS = (0, 1, 2)
ACC_EPOCHS = 4
ACC_OPTIM = dict(optimizer="adamw", lr=1e-3, weight_decay=0.05)  # as configs/paper/pretrained.yaml
LITE0_KWARGS = {"pretrained": True, "freeze_trunk": True, "trainable_stages": 1}


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- data


def data_config(zip_path: Path, cache_dir: Path):
    from dmde.run.config import DataConfig

    return DataConfig(dataset="tiny_imagenet", root=str(zip_path), holdout_per_class=HOLDOUT_PER_CLASS,
                      fusion_per_class=FUSION_PER_CLASS, max_per_class=TRAIN_PER_CLASS,
                      cache=str(cache_dir / "tiny_imagenet_train_64px.pt"), seed=SPLIT_SEED)


def load_everything(args: argparse.Namespace, need_lite0: bool):
    """(ontology, groups, 64-px image splits, cached-trunk splits or None), all aligned to the ontology."""
    from dmde.experts.train import ExpertsConfig
    from dmde.hierarchy.groups import make_groups
    from dmde.hierarchy.ontology import build_semantic_ontology
    from dmde.hierarchy.wordnet import WordNet
    from dmde.run.config import RunConfig
    from dmde.run.prepare import load_splits, prepare_splits

    zip_path = Path(args.shared) / "data" / "tiny-imagenet-200" / "train.zip"
    if not zip_path.is_file():
        sys.exit(f"no Tiny-ImageNet at {zip_path} (use --shared)")
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    wn = WordNet.load()
    t0 = time.perf_counter()
    dcfg = data_config(zip_path, cache_dir)
    images = load_splits(dcfg, wn, progress=args.progress)
    log(f"decoded/cached images: {len(images.train)} train, {len(images.holdout)} hold-out "
        f"({time.perf_counter() - t0:.0f} s)")
    onto = build_semantic_ontology(wn, images.classes, random_state=0, source="tiny-imagenet-200")
    groups = make_groups(onto, GROUP_SIZE, OVERLAP)
    pos = onto.positions_or(images.classes)
    images = images.align(pos)
    feats = None
    if need_lite0:
        t0 = time.perf_counter()
        cfg = RunConfig(data=dcfg, experts=ExpertsConfig(backbone="efficientnet_lite0",
                                                        backbone_kwargs=dict(LITE0_KWARGS)))
        feats = prepare_splits(cfg, wn, progress=args.progress, cache_dir=cache_dir).align(pos)
        log(f"cached EfficientNet-Lite0 trunk outputs {tuple(feats.train.inputs.shape[1:])} "
            f"({time.perf_counter() - t0:.0f} s)")
    return onto, groups, images, feats


def per_class_subset(data, k: int, seed: int = 0):
    """The first ``k`` (seeded order) training samples of every class."""
    g = torch.Generator().manual_seed(seed)
    y = data.targets
    keep = []
    for c in torch.unique(y):
        members = torch.nonzero(y == c).flatten()
        keep.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    return data.subset(torch.sort(torch.cat(keep)).values)


def resize_images(data, size: int):
    from dmde.core.training import ImageTensors
    from dmde.core.transforms import resize

    out = torch.cat([resize(data.inputs[s : s + 4096], size) for s in range(0, len(data), 4096)])
    return ImageTensors(out, data.targets, data.kind, data.mean, data.std)


# --------------------------------------------------------------------------- throughput


def plain_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, seed: int) -> float:
    """One epoch of the textbook loop (shuffled index batches, CE, the same optimiser); its seconds."""
    from dmde.core.training import make_optimizer

    opt = make_optimizer(cfg, model.parameters())
    model.train()
    start = time.perf_counter()
    order = torch.randperm(y.numel(), generator=torch.Generator().manual_seed(seed))
    for s in range(0, y.numel(), cfg.batch_size):
        b = order[s : s + cfg.batch_size]
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def throughput(regime: str, data, onto, groups, args: argparse.Namespace) -> dict:
    """Images/s of each variant over interleaved trials (one epoch each): the whole call and the loop."""
    from dmde.core.training import mix_seed, prepare_inputs
    from dmde.data.group_view import GroupView
    from dmde.experts.train import ExpertsConfig, build_expert, train_expert

    j = THROUGHPUT_GROUP
    group, wnids = groups.groups[j], groups.wnids[j]
    if regime == "small_cnn":
        base = dict(backbone="small_cnn", epochs=1, batch_size=BATCH, **CNN_OPTIM)
    else:
        base = dict(backbone="efficientnet_lite0", backbone_kwargs=dict(LITE0_KWARGS), epochs=1,
                    batch_size=BATCH, **ACC_OPTIM)
    same = ExpertsConfig(**base, multitask=False, delta1=0.0, delta2=0.0, augment=False)
    augmented = ExpertsConfig(**base, multitask=False, delta1=0.0, delta2=0.0, augment=True)
    no_s = ExpertsConfig(**base, multitask=True, delta2=0.0, augment=False)
    default = ExpertsConfig(**base, multitask=True, augment=True)
    # The exact images of dmde's epoch 0, pre-normalised once for the plain loop.
    view = GroupView(data.targets.tolist(), list(group), ratio=1.0, seed=mix_seed(same.seed, j))
    idx, lab = torch.as_tensor(view.indices), torch.as_tensor(view.labels)
    x = torch.cat([prepare_inputs(data, idx[s : s + 4096]) for s in range(0, idx.numel(), 4096)])

    def plain() -> tuple[int, float]:
        torch.manual_seed(1)
        backbone = build_expert(same, len(group)).backbone
        model = nn.Sequential(backbone, nn.Linear(backbone.num_features, len(group) + 1))  # (B, M + 1)
        return lab.numel(), plain_loop(model, x, lab, same, seed=1)

    def dmde(cfg):
        def run() -> tuple[int, float]:
            with tempfile.TemporaryDirectory() as d:
                m = train_expert(j, group, wnids, data, cfg, d, onto.hash(), progress=False)
            return int(m["images"]), float(m["seconds"])
        return run

    variants = {
        "plain PyTorch loop": plain,
        "dmde train_expert, same work": dmde(same),
        "dmde, + augmentation (flip, crop)": dmde(augmented),
        "dmde, + multi-task head, δ2 = 0 (no S)": dmde(no_s),
        "dmde train_expert, default (+ augmentation, multi-task head, S every epoch)": dmde(default),
    }
    if data.kind == "features":  # augmentation does not apply to cached trunk outputs
        variants.pop("dmde, + augmentation (flip, crop)")
        variants["dmde train_expert, default (multi-task head, S every epoch)"] = variants.pop(
            "dmde train_expert, default (+ augmentation, multi-task head, S every epoch)")
    call: dict[str, list[float]] = {k: [] for k in variants}
    loop: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for t in range(args.warmup + args.trials):
        order = names[t % len(names):] + names[: t % len(names)]  # rotate who runs first
        for name in order:
            start = time.perf_counter()
            n, loop_s = variants[name]()
            if t >= args.warmup:
                call[name].append(n / (time.perf_counter() - start))
                loop[name].append(n / loop_s)
        if t >= args.warmup:
            log(f"{regime} trial {t + 1 - args.warmup}/{args.trials} (images/s, call/loop): "
                + ", ".join(f"[{k}] {call[k][-1]:.0f}/{loop[k][-1]:.0f}" for k in names))
    return {"images": int(idx.numel()), "call": call, "loop": loop}


def print_throughput(label: str, res: dict, args: argparse.Namespace) -> None:
    print(f"\n**{label}** — expert {THROUGHPUT_GROUP} (M = {GROUP_SIZE}), {res['images']:,} images per epoch "
          f"(in-group + as many not-in-group), batch {BATCH}, one epoch per trial, median of {args.trials} "
          f"interleaved trials after {args.warmup} warm-up\n")
    print("| loop | images/s, whole call (median [min–max]) | ratio | images/s, epoch loop (median [min–max]) "
          "| ratio |")
    print("|---|---|---|---|---|")
    ref = "plain PyTorch loop"
    for name in res["call"]:
        cells = []
        for kind in ("call", "loop"):
            rates, base = res[kind][name], res[kind][ref]
            ratio = statistics.median(r / b for r, b in zip(rates, base))  # per-trial ratios: same load
            cells.append(f"{statistics.median(rates):.0f} [{min(rates):.0f}–{max(rates):.0f}] | {ratio:.2f}")
        print(f"| {name} | {' | '.join(cells)} |")


# --------------------------------------------------------------------------- accuracy


def accuracy(feats, onto, groups, args: argparse.Namespace) -> list[dict]:
    from dmde.experts.train import (
        ExpertsConfig,
        evaluate_expert,
        expert_path,
        load_expert,
        train_expert,
    )

    rows = []
    for j in args.groups:
        for seed in args.seeds:
            for mt in (True, False):
                extra = {} if mt else {"delta1": 0.0, "delta2": 0.0}
                cfg = ExpertsConfig(backbone="efficientnet_lite0", backbone_kwargs=dict(LITE0_KWARGS),
                                    epochs=args.epochs, batch_size=BATCH, seed=seed, multitask=mt, **ACC_OPTIM,
                                    **extra)
                start = time.perf_counter()
                with tempfile.TemporaryDirectory() as d:
                    m = train_expert(j, groups.groups[j], groups.wnids[j], feats.train, cfg, d, onto.hash(),
                                     progress=args.progress)
                    expert, _ = load_expert(expert_path(d, j))
                    ev = evaluate_expert(expert, feats.holdout, groups.groups[j])
                row = {"group": j, "seed": seed, "multitask": mt, **ev, "train_acc": m["train_acc"],
                       "seconds": time.perf_counter() - start, "images_per_s": m["images_per_s"]}
                rows.append(row)
                log(f"group {j} seed {seed} {'multi-task' if mt else 'plain'}: group top-1 {ev['group_top1']:.4f}, "
                    f"not-in-group recall {ev.get('not_in_group_recall', float('nan')):.4f} "
                    f"({row['seconds']:.0f} s, {m['images_per_s']:.0f} img/s)")
    return rows


def _ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.2f} ± {100 * sd:.2f}"


def print_accuracy(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\n**Accuracy** — EfficientNet-Lite0 (ImageNet weights; trunk frozen and cached; last stage + "
          f"head conv + head trained), 64 px, {args.epochs} epochs, AdamW lr {ACC_OPTIM['lr']:g} "
          f"wd {ACC_OPTIM['weight_decay']:g}, cosine, batch {BATCH}; hold-out {HOLDOUT_PER_CLASS} images/class; "
          f"mean ± std over seeds {','.join(map(str, args.seeds))} (in %)\n")
    print("| group | group top-1, multi-task | group top-1, plain head | Δ (paired) "
          "| not-in-group recall, multi-task | not-in-group recall, plain |")
    print("|---|---|---|---|---|---|")
    keys = [*args.groups, "all"]
    for j in keys:
        sel = [r for r in rows if j == "all" or r["group"] == j]
        mt = [r for r in sel if r["multitask"]]
        pl = [r for r in sel if not r["multitask"]]
        mt.sort(key=lambda r: (r["group"], r["seed"]))
        pl.sort(key=lambda r: (r["group"], r["seed"]))
        diff = [a["group_top1"] - b["group_top1"] for a, b in zip(mt, pl)]
        print(f"| {j} | {_ms([r['group_top1'] for r in mt])} | {_ms([r['group_top1'] for r in pl])} "
              f"| {'+' if statistics.mean(diff) >= 0 else ''}{_ms(diff)} "
              f"| {_ms([r['not_in_group_recall'] for r in mt])} | {_ms([r['not_in_group_recall'] for r in pl])} |")


# --------------------------------------------------------------------------- main


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"# [{time.perf_counter() - _T0:5.0f} s] {msg}", file=sys.stderr, flush=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(repo_root().parent / "shared"),
                    help="the shared folder holding data/tiny-imagenet-200/train.zip (default: ../shared)")
    ap.add_argument("--cache-dir", default=str(repo_root() / "runs" / "bench_experts"),
                    help="decoded images and cached trunk outputs (default: runs/bench_experts)")
    ap.add_argument("--trials", type=int, default=TRIALS)
    ap.add_argument("--warmup", type=int, default=WARMUP_TRIALS)
    ap.add_argument("--regimes", default="small_cnn,efficientnet_lite0",
                    help="throughput regimes (comma-separated; empty: none)")
    ap.add_argument("--groups", default=",".join(map(str, ACC_GROUPS)), help="accuracy: task groups")
    ap.add_argument("--seeds", default=",".join(map(str, ACC_SEEDS)), help="accuracy: seeds")
    ap.add_argument("--epochs", type=int, default=ACC_EPOCHS, help="accuracy: epochs per expert")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2 trials, 1 group × 2 seeds × 1 epoch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.warmup, args.groups, args.seeds, args.epochs = 2, 1, "0", "0,1", 1
    args.groups = [int(g) for g in args.groups.split(",") if g]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    regimes = [] if args.skip_throughput else [r for r in args.regimes.split(",") if r]
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    need_lite0 = "efficientnet_lite0" in regimes or not args.skip_accuracy
    onto, groups, images, feats = load_everything(args, need_lite0)
    log(f"{onto.n_classes} classes, {onto.n_categories} categories, {len(groups.groups)} groups of ≤ {GROUP_SIZE}")

    results = {}
    for regime in regimes:
        if regime == "small_cnn":
            data = resize_images(per_class_subset(images.train, CNN_PER_CLASS), CNN_SIZE_PX)
        elif regime == "efficientnet_lite0":
            data = per_class_subset(feats.train, LITE0_PER_CLASS)
        else:
            sys.exit(f"unknown regime {regime!r}")
        results[regime] = throughput(regime, data, onto, groups, args)
    rows = [] if args.skip_accuracy else accuracy(feats, onto, groups, args)

    print(f"## Expert training on Tiny-ImageNet — {datetime.date.today()}\n")
    print(f"{machine()}; load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
          f"{(time.perf_counter() - started) / 60:.1f} min in all; "
          f"{onto.n_classes} classes, {len(groups.groups)} groups of M = {GROUP_SIZE} (λ = {OVERLAP}); "
          f"command: `python benchmarks/experts.py {' '.join(sys.argv[1:])}`")
    for regime, res in results.items():
        label = (f"small_cnn at {CNN_SIZE_PX} px ({CNN_PER_CLASS} images/class), SGD" if regime == "small_cnn"
                 else f"EfficientNet-Lite0 body over cached trunk outputs ({LITE0_PER_CLASS} images/class), AdamW")
        print_throughput(label, res, args)
    if rows:
        print_accuracy(rows, args)


if __name__ == "__main__":
    main()
