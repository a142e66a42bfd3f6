"""Throughput and peak memory of the mixture against its experts, one expert and the flat model
(issue #6 items 1–2): inference and training images/s, measured side by side in one process.

Settings (groups are SPEC §3's circular windows from :func:`dmde.hierarchy.groups.circular_groups`):

* ``demo``: N = 10, M = 4, λ = 0.5 → 5 small_cnn experts (width ``WIDTH``), 28 px (``dmde demo``);
* ``tiny``: N = 200, M = 50, λ = 0.5 → 8 small_cnn experts, 32 px (the from-scratch regime);
* ``lite0``: N = 200, M = 50, λ = 0.5 → 8 EfficientNet-Lite0 experts over cached trunk outputs
  (192 × 2 × 2, a 64 px image): the last stage + head conv per expert (the pretrained regime).

Inference (``torch.no_grad``, eval mode), at batch 1, 32 and 256, images/s of: the mixture with
its experts run as one wide network (``batched='wide'``, :mod:`dmde.fusion.batched`), in one vmap pass
(``'vmap'``) and in a loop (``False``); the experts alone (a loop of ``expert(x)``: the sum of
their own compute, the reference of the overhead target); one expert; the flat model (same
backbone + Linear(d, N)). For small_cnn the loop and the wide mixture also run on channels-last
tensors. Overhead = time(mixture) / time(experts alone) − 1: padding, N-way softmax input,
stacking (Eq. 7), N-way layer, joining weights. "GFLOP/s" = 2 × the experts' multiply-adds per
image (``dmde.baselines.models.count_flops``) × images/s; the machine's reference is a 1024³ float32
matrix product on the same threads.

Training (train mode, SGD, no augmentation for either side), images/s of: the expert stage through
dmde's ``training.fit`` (multi-task loss of Eq. 6 with a fixed S, a checkpoint per epoch) against a
plain PyTorch loop over the same expert and data; end-to-end fine-tuning (Eq. 11,
``fusion.mixture_loss``) through ``training.fit`` against a plain loop, and plain loops with the
wide and the vmapped mixture.

Timing: every variant of a setting runs in the same process, interleaved (the order rotates every
trial), ``TRIALS`` trials, median reported. Memory: each configuration again in a fresh
subprocess; "peak MB" is that process's peak RSS (VmHWM, reset through ``/proc/self/clear_refs``
once the models and data are built) minus its RSS at that moment, i.e. the extra memory of running it (activations, gradients, stacked weights,
optimizer state), not the weights themselves.

GPU (``--device cuda``, issue #11; ``benchmarks/gpu.sh`` runs it): the models on the device, the
images on the host as the pipeline keeps them (a training batch is copied per step, inference input
once); every timing ends with a ``torch.cuda.synchronize``; "peak MB" is
``torch.cuda.max_memory_allocated`` (reset before each configuration, in this process) minus what
was allocated at the reset. ``--precisions 32 bf16``: every table once per precision (forward passes
under ``torch.autocast``, as ``precision: bf16`` trains), then the two side by side.

    python benchmarks/throughput.py                    # every setting, tables in markdown
    python benchmarks/throughput.py --settings demo --trials 3 --no-memory
    python benchmarks/throughput.py --device cuda --precisions 32 bf16 --batches 32 256 --settings tiny lite0
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One place for every setting (units in the names).
SETTINGS = {
    "demo": dict(n_classes=10, group_size=4, overlap=0.5, image_px=28, backbone="small_cnn"),
    "tiny": dict(n_classes=200, group_size=50, overlap=0.5, image_px=32, backbone="small_cnn"),
    "lite0": dict(n_classes=200, group_size=50, overlap=0.5, image_px=64, backbone="efficientnet_lite0"),
}
LITE0_KW = dict(pretrained=False, freeze_trunk=True, trainable_stages=1)  # timing only: no weights needed
WIDTH = 48  # small_cnn width (the demo's default)
BATCHES = (1, 32, 256)
MIN_IMAGES_PER_TIMING = 32  # batch 1 is timed over this many calls
MIN_IMAGES_PER_TIMING_CUDA = 2048  # a GPU call takes milliseconds: time more of them
TRAIN_IMAGES = 256  # images per training epoch timed
TRAIN_BATCH = 32
TRIALS = 5
LR = 0.01
INFER_VARIANTS = ("mixture wide", "mixture vmap", "mixture loop", "experts alone", "one expert", "flat",
                  "mixture loop, channels-last", "mixture wide, channels-last")
TRAIN_VARIANTS = ("expert: fit", "expert: plain loop", "e2e: fit loop", "e2e: plain loop", "e2e: plain wide",
                  "e2e: plain vmap")
MIXTURES = {"mixture wide": "wide", "mixture vmap": "vmap", "mixture loop": False}


def variants(setting: str, kind: str = "infer") -> tuple[str, ...]:
    """The variants of a setting: channels-last only where there are feature maps to lay out."""
    vs = INFER_VARIANTS if kind == "infer" else TRAIN_VARIANTS
    if SETTINGS[setting]["backbone"] != "small_cnn":
        vs = tuple(v for v in vs if "channels-last" not in v)
    return vs


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MB (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_mb() -> float:
    """Reset the peak RSS to the current RSS (``clear_refs`` 5) and return the current RSS."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_mb("VmRSS")


def build(setting: str, seed: int = 0, device: str = "cpu"):
    """Models (on ``device``) and data (on the host) of a setting: a mixture factory, experts, flat
    model, inputs, targets.

    Inputs are uint8 images for small_cnn (normalised per batch, as the pipeline does) and the
    frozen trunk's float outputs for Lite0 (computed once, as the pipeline caches them)."""
    import copy

    import torch

    from dmde.baselines.models import FlatClassifier
    from dmde.experts.backbones import create_backbone
    from dmde.experts.expert import Expert
    from dmde.fusion.mixture import Mixture, NWaySoftmax
    from dmde.hierarchy.groups import circular_groups

    s = SETTINGS[setting]
    groups = [[int(c) for c in g] for g in circular_groups(s["n_classes"], s["group_size"], s["overlap"])]
    kw = dict(width=WIDTH) if s["backbone"] == "small_cnn" else dict(LITE0_KW)
    torch.manual_seed(seed)
    experts = [Expert.build(s["backbone"], len(g), **kw).to(device) for g in groups]
    flat = FlatClassifier(create_backbone(s["backbone"], **kw), s["n_classes"]).to(device)
    n = s["n_classes"]
    g = torch.Generator().manual_seed(seed)
    count = max(BATCHES + (TRAIN_IMAGES,))
    images = torch.randint(0, 256, (count, 3, s["image_px"], s["image_px"]), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, n, (count,), generator=g)
    if s["backbone"] != "small_cnn":
        with torch.no_grad():
            trunk = experts[0].backbone.trunk.eval()
            images = torch.cat([trunk(normalised(images, torch.arange(i, min(i + 64, count)), device)).cpu()
                                for i in range(0, count, 64)])
        for m in [*experts, flat]:
            m.backbone.use_cached_trunk(True)

    def mixture(batched) -> Mixture:
        return Mixture(copy.deepcopy(experts), groups, n, stacking="eq7",
                       nway=NWaySoftmax(n, kind="dense", input="log"), batched=batched).to(device)

    return groups, experts, mixture, flat, images, targets


# ------------------------------------------------------------------------------------ inference


def infer_fn(variant: str, models: dict):
    if variant in MIXTURES:
        return models[variant]
    if variant.endswith("channels-last"):
        import torch

        model = models[variant]
        return lambda x: model(x.contiguous(memory_format=torch.channels_last))
    if variant == "experts alone":
        experts = list(models["mixture loop"].experts)
        return lambda x: [e(x) for e in experts]
    if variant == "one expert":
        return models["mixture loop"].experts[0]
    if variant == "flat":
        return models["flat"]
    raise ValueError(variant)


def sync(device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously): a timing ends here."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_inference(fn, x, calls: int, precision: str = "32") -> float:
    """Seconds per image (forward passes under dmde's autocast at ``precision``)."""
    import torch

    from dmde.core.precision import autocast

    with torch.no_grad(), autocast(precision, x.device):
        sync(x.device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x)
        sync(x.device)
        return (time.perf_counter() - t0) / (calls * x.shape[0])


def normalised(images, idx, device="cpu"):
    x = images[idx].to(device, non_blocking=True)
    if images.is_floating_point():  # cached trunk outputs
        return x
    return x.float().div_(255.0).sub_(0.5).div_(0.25)


# ------------------------------------------------------------------------------------- training


def multitask_loss_fn(S):
    from dmde.experts.multitask import multitask_loss

    def loss_fn(model, x, y):
        logits = model(x)
        return multitask_loss(logits, y, model.head.class_weights, S.to(logits.device), delta2=1e-3), logits

    return loss_fn


def e2e_loss_fn(model, x, y):
    from dmde.fusion.mixture import mixture_loss

    return mixture_loss(model, x, y)[0], None


def plain_loop(model, loss_fn, images, targets, batch: int, device="cpu", precision: str = "32") -> None:
    """The reference: index, normalise, forward, loss, backward, SGD step."""
    import torch

    from dmde.core.precision import autocast

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9,
                          nesterov=True, weight_decay=5e-4)
    model.train()
    order = torch.randperm(images.shape[0])
    for s in range(0, images.shape[0], batch):
        idx = order[s : s + batch]
        x, y = normalised(images, idx, device), targets[idx].to(device)
        with autocast(precision, device):
            loss, _ = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)


def dmde_fit(model, loss_fn, images, targets, batch: int, tmp: Path, epoch_samples=None, device="cpu",
             precision: str = "32") -> None:
    from dmde.core.training import ImageTensors, OptimConfig, fit

    ckpt = tmp / "bench.pt"
    for p in (ckpt, ckpt.with_suffix(".jsonl")):
        p.unlink(missing_ok=True)
    cfg = OptimConfig(epochs=1, batch_size=batch, lr=LR, augment=False)
    kind = "features" if images.is_floating_point() else "images"  # cached trunk outputs: as they are
    data = ImageTensors(images, targets, kind=kind, mean=(0.5,) * 3, std=(0.25,) * 3)
    fit(model, data, cfg, loss_fn, ckpt, epoch_samples=epoch_samples, progress=False, device=device,
        precision=precision)
    sync(device)


def train_runner(variant: str, models: dict, groups, images, targets, tmp: Path, device="cpu",
                 precision: str = "32"):
    """A callable training one epoch of ``TRAIN_IMAGES`` images with ``variant``."""
    import torch

    at = dict(device=device, precision=precision)

    imgs, tg = images[:TRAIN_IMAGES], targets[:TRAIN_IMAGES]
    m0 = len(groups[0])
    y_expert = torch.where(tg < m0, tg, torch.full_like(tg, m0))  # in-group labels, else not-in-group
    S = torch.rand(m0, m0, generator=torch.Generator().manual_seed(1))
    S = (S + S.T) / 2
    expert = models["expert"]
    if variant == "expert: fit":
        return lambda: dmde_fit(expert, multitask_loss_fn(S), imgs, y_expert, TRAIN_BATCH, tmp, **at)
    if variant == "expert: plain loop":
        return lambda: plain_loop(expert, multitask_loss_fn(S), imgs, y_expert, TRAIN_BATCH, **at)
    if variant == "e2e: fit loop":
        return lambda: dmde_fit(models["mixture loop"], e2e_loss_fn, imgs, tg, TRAIN_BATCH, tmp, **at)
    plain = {"e2e: plain loop": "mixture loop", "e2e: plain wide": "mixture wide", "e2e: plain vmap": "mixture vmap"}
    if variant in plain:
        return lambda: plain_loop(models[plain[variant]], e2e_loss_fn, imgs, tg, TRAIN_BATCH, **at)
    raise ValueError(variant)


def make_models(setting: str, device: str = "cpu") -> tuple[dict, list, "object", "object"]:
    import copy

    import torch

    groups, experts, mixture, flat, images, targets = build(setting, device=device)
    models = {v: mixture(how).eval() for v, how in MIXTURES.items()}
    models.update({"flat": flat.eval(), "expert": copy.deepcopy(experts[0]),
                   "_input_shape": tuple(images.shape[1:])})
    if SETTINGS[setting]["backbone"] == "small_cnn":
        for v, how in (("mixture loop, channels-last", False), ("mixture wide, channels-last", "wide")):
            models[v] = mixture(how).eval().to(memory_format=torch.channels_last)
    return models, groups, images, targets


# --------------------------------------------------------------------------------------- driver


def run_timings(setting: str, trials: int, batches=BATCHES, device: str = "cpu", precision: str = "32") -> dict:
    """Medians of every variant; on a GPU also each configuration's peak memory (``out['memory']``)."""
    import torch

    models, groups, images, targets = make_models(setting, device)
    cuda = torch.device(device).type == "cuda"
    out: dict = {"infer": {}, "train": {}}
    for b in batches:
        x = normalised(images, torch.arange(b), device)
        calls = max(1, (MIN_IMAGES_PER_TIMING_CUDA if cuda else MIN_IMAGES_PER_TIMING) // b)
        vs = variants(setting)
        for v in vs:  # warm-up (builds the wide network, fills the joined-weight caches)
            time_inference(infer_fn(v, models), x, 1, precision)
        res = {v: [] for v in vs}
        for t in range(trials):
            order = vs[t % len(vs):] + vs[: t % len(vs)]
            for v in order:
                res[v].append(time_inference(infer_fn(v, models), x, calls, precision))
        out["infer"][b] = {v: statistics.median(ts) for v, ts in res.items()}
    if cuda:
        out["memory"] = {"infer": {v: cuda_peak_mb(lambda: time_inference(infer_fn(v, models), x, 1, precision))
                                   for v in variants(setting)}, "train": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {v: train_runner(v, models, groups, images, targets, Path(tmp), device, precision)
                   for v in TRAIN_VARIANTS}
        for v in TRAIN_VARIANTS:  # warm-up
            runners[v]()
        res = {v: [] for v in TRAIN_VARIANTS}
        for t in range(trials):
            order = TRAIN_VARIANTS[t % len(TRAIN_VARIANTS):] + TRAIN_VARIANTS[: t % len(TRAIN_VARIANTS)]
            for v in order:
                t0 = time.perf_counter()
                runners[v]()
                res[v].append((time.perf_counter() - t0) / TRAIN_IMAGES)
        out["train"] = {v: statistics.median(ts) for v, ts in res.items()}
        if cuda:
            out["memory"]["train"] = {v: cuda_peak_mb(runners[v]) for v in TRAIN_VARIANTS}
    out["gflop_per_image"] = gflop_per_image(models)
    out["gemm_gflops"] = gemm_gflops(trials, device=device)
    return out


def cuda_peak_mb(run) -> float:
    """The GPU memory ``run()`` allocates at its peak beyond what was allocated before, MB."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def gflop_per_image(models: dict) -> float:
    """2 × multiply-adds of all experts' forward passes for one input (GFLOP)."""
    from dmde.baselines.models import count_flops

    shape = models["_input_shape"]
    return 2e-9 * sum(count_flops(e, shape) for e in models["mixture loop"].experts)


def gemm_gflops(trials: int, n: int = 1024, device: str = "cpu") -> float:
    """The machine's float32 matrix-product rate on the current threads or the GPU (median, GFLOP/s)."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    rates = []
    for _ in range(max(3, trials)):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        rates.append(5 * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def memory_worker(setting: str, kind: str, variant: str, batch: int, precision: str = "32") -> dict:
    """Peak RSS growth (MB) of one configuration, run in this (fresh) process (the CPU)."""
    import torch

    models, groups, images, targets = make_models(setting)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "infer":
            x = normalised(images, torch.arange(batch))
            fn = infer_fn(variant, models)
            base = _reset_peak_mb()
            for _ in range(2):
                time_inference(fn, x, 1, precision)
        else:
            run = train_runner(variant, models, groups, images, targets, Path(tmp), precision=precision)
            base = _reset_peak_mb()
            run()
    return {"peak_mb": _status_mb("VmHWM") - base}


def memory(setting: str, threads: int, batch: int = 256, precision: str = "32") -> dict:
    out: dict = {"infer": {}, "train": {}}
    configs = [("infer", v, batch) for v in variants(setting)] + [("train", v, TRAIN_BATCH) for v in TRAIN_VARIANTS]
    for kind, v, b in configs:
        cmd = [sys.executable, __file__, "--worker", json.dumps([setting, kind, v, b, precision]),
               "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[kind][v] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]
    return out


def machine(threads: int, device: str = "cpu") -> str:
    import torch

    if torch.device(device).type == "cuda":
        return (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}, "
                f"{os.cpu_count()} cores, {threads} threads")

    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores (nproc), {cpu}, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, {threads} threads")


def table(setting: str, t: dict, mem: dict | None, precision: str = "32") -> str:
    s = SETTINGS[setting]
    batches = sorted(t["infer"])  # the batches measured
    model = (f"small_cnn width {WIDTH}, {s['image_px']} px" if s["backbone"] == "small_cnn" else
             "EfficientNet-Lite0 last stage + head conv over cached trunk outputs (64 px images)")
    vs = variants(setting)
    blank = " | |" if mem else " |"
    lines = [f"### {setting}: N = {s['n_classes']}, M = {s['group_size']}, λ = {s['overlap']}, {model}"
             + ("" if precision == "32" else f", precision {precision}"), "",
             "| inference | " + " | ".join(f"img/s @ batch {b}" for b in batches)
             + (f" | peak MB @ {batches[-1]} |" if mem else " |"),
             "|---|" + "---:|" * (len(batches) + bool(mem))]
    for v in vs:
        row = [f"{1 / t['infer'][b][v]:.0f}" for b in batches]
        if mem:
            row.append(f"{mem['infer'][v]:.0f}")
        lines.append(f"| {v} | " + " | ".join(row) + " |")
    ratios = [("wide / loop (speed-up)", "mixture loop", "mixture wide"),
              ("vmap / loop (speed-up)", "mixture loop", "mixture vmap")]
    if "mixture loop, channels-last" in vs:
        ratios += [("loop channels-last / loop", "mixture loop", "mixture loop, channels-last"),
                   ("wide channels-last / loop channels-last", "mixture loop, channels-last",
                    "mixture wide, channels-last")]
    for name, num, den in ratios:
        lines.append(f"| {name} | " + " | ".join(f"{t['infer'][b][num] / t['infer'][b][den]:.2f}×"
                                                for b in batches) + blank)
    for v in ("mixture loop", "mixture wide", "mixture vmap"):
        lines.append(f"| overhead of {v} over experts alone | "
                     + " | ".join(f"{100 * (t['infer'][b][v] / t['infer'][b]['experts alone'] - 1):+.0f}%"
                                  for b in batches) + blank)
    lines.append("| experts alone: GFLOP/s | " + " | ".join(
        f"{t['gflop_per_image'] / t['infer'][b]['experts alone']:.0f}" for b in batches) + blank)
    lines += ["", f"Experts: {t['gflop_per_image']:.3f} GFLOP per image; the machine's 1024³ matrix "
              f"product: {t['gemm_gflops']:.0f} GFLOP/s.", "",
              f"| training (batch {TRAIN_BATCH}, {TRAIN_IMAGES} images/epoch) | img/s | ratio |"
              + (" peak MB |" if mem else ""), "|---|---:|---:|" + ("---:|" if mem else "")]
    refs = {"expert: fit": "expert: plain loop", "e2e: fit loop": "e2e: plain loop",
            "e2e: plain wide": "e2e: plain loop", "e2e: plain vmap": "e2e: plain loop"}
    for v in TRAIN_VARIANTS:
        ratio = f"{t['train'][refs[v]] / t['train'][v]:.2f}× vs {refs[v]}" if v in refs else "1.00×"
        lines.append(f"| {v} | {1 / t['train'][v]:.1f} | {ratio} |" + (f" {mem['train'][v]:.0f} |" if mem else ""))
    return "\n".join(lines)


def precision_table(setting: str, runs: dict) -> str:
    """The precisions side by side: expert training and the mixture's three batch modes, img/s and
    peak MB. ``runs``: precision -> (timings, memory or None)."""
    ps = list(runs)
    batches = sorted(next(iter(runs.values()))[0]["infer"])
    rows = [("expert: fit (training)", "train", None, "expert: fit")]
    rows += [(f"{v} @ batch {b}", "infer", b, v) for b in batches for v in MIXTURES]
    mem = all(m is not None for _, m in runs.values())
    head = " | ".join(f"img/s {p}" for p in ps) + (" | " + " | ".join(f"peak MB {p}" for p in ps) if mem else "")
    lines = [f"### {setting}: precisions side by side", "",
             f"| | {head} | {ps[-1]} / {ps[0]} |", "|---|" + "---:|" * (len(ps) * (1 + mem) + 1)]
    for name, kind, b, v in rows:
        secs = [runs[p][0][kind][b][v] if b else runs[p][0][kind][v] for p in ps]
        cells = [f"{1 / x:.0f}" for x in secs]
        if mem:
            cells += [f"{runs[p][1][kind][v]:.0f}" if kind == "train" or b == batches[-1] else "" for p in ps]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs[0] / secs[-1]:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--trials", type=int, default=TRIALS)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--no-memory", action="store_true", help="skip the per-configuration subprocesses")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (models there, images on the host)")
    ap.add_argument("--precisions", nargs="+", default=["32"], choices=["32", "bf16"],
                    help="forward passes in float32 and/or under bfloat16 autocast (several: compared)")
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="inference batch sizes")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(memory_worker(*json.loads(args.worker))))
        return
    if max(args.batches) > max(BATCHES):
        ap.error(f"--batches: at most {max(BATCHES)} (the images built per setting)")
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit(f"throughput.py: --device {args.device} but torch {torch.__version__} sees no CUDA GPU")
    load0 = os.getloadavg()
    t0 = time.time()
    cmd = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    print(f"## Throughput ({datetime.date.today().isoformat()})\n")
    print(f"`{cmd.strip()}`; {machine(args.threads, args.device)}; {args.trials} trials, medians.", flush=True)
    for setting in args.settings:  # each table as soon as it is measured (a run cut short keeps them)
        runs = {}
        for precision in args.precisions:
            t = run_timings(setting, args.trials, sorted(args.batches), args.device, precision)
            mem = t.get("memory") if cuda else None if args.no_memory else memory(
                setting, args.threads, max(args.batches), precision)
            runs[precision] = (t, mem)
            print("\n" + table(setting, t, mem, precision), flush=True)
        if len(runs) > 1:
            print("\n" + precision_table(setting, runs), flush=True)
    load1 = os.getloadavg()
    print(f"\nLoad average {load0[0]:.1f} at start, {load1[0]:.1f} at end; {time.time() - t0:.0f} s.")


if __name__ == "__main__":
    main()
