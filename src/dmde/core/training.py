"""The one epoch loop every trained stage uses (experts, flat baseline, early fusion,
end-to-end fine-tuning): in-memory data, per-batch augmentation, a cosine schedule,
a checkpoint after every epoch (atomic), ``--resume`` from the last completed epoch, and a
JSONL line per epoch.

Every random draw of epoch e comes from a generator seeded by (seed, e), so resuming at an
epoch boundary gives the same weights as an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from dmde.core.checkpoint import load_checkpoint, save_checkpoint
from dmde.core.distributed import average_gradients, barrier, dist_context
from dmde.core.errors import DmdeValueError, MismatchError
from dmde.core.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    random_crop_with_padding,
    random_horizontal_flip,
)

#: One line per finished epoch (INFO): the CLI shows it on stderr, with or without progress bars.
log = logging.getLogger("dmde.train")

#: The optimisers of :func:`make_optimizer`.
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class OptimConfig:
    """How a stage trains: epochs, batch size, optimiser and schedule, augmentation."""

    epochs: int = 4
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    augment: bool = True  # random crop with padding + horizontal flip, per batch
    crop_padding: int = 4
    seed: int = 0


@dataclass
class ImageTensors:
    """Decoded images of one split, in memory: the data path is a tensor index, never a decoder.

    ``inputs`` is uint8 (n, 3, H, W) images, or float (n, C, h, w) cached trunk features when
    ``kind == 'features'``; ``targets`` are ontology positions 0..N−1.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    kind: str = "images"  # images | features
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __len__(self) -> int:
        return int(self.targets.numel())

    def subset(self, idx: torch.Tensor) -> "ImageTensors":
        return ImageTensors(self.inputs[idx], self.targets[idx], self.kind, self.mean, self.std)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (FNV-1a style), stable across runs and processes."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class Salt:
    """Every seed salt of a run, in one place: ``mix_seed(seed, Salt.X, …)`` gives each random
    stream its own seed, and no two streams can collide by accident (the values are fixed: a
    run's results depend on them)."""

    EXPERT_INIT = 0xE  # an expert's initial weights: mix_seed(seed, j, EXPERT_INIT)
    NWAY_INIT = 0xF0  # the N-way layer's initial weights
    NWAY_ORDER = 0xF1  # the order of its training images
    FINETUNE = 0xE2E  # end-to-end fine-tuning's epochs
    FLAT = 0xF1A7  # the flat model (ensemble member k: (FLAT, k))
    FLAT_WIDE = 0xF1A8  # the width-matched flat model's initial weights
    EARLY_FUSION_INIT = 0xEA
    EARLY_FUSION_ORDER = 0xEB


def prepare_inputs(
    data: ImageTensors,
    idx: torch.Tensor,
    augment: bool = False,
    padding: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Gather a batch and turn it into model input: float, augmented, normalised."""
    x = data.inputs[idx].to(device, non_blocking=True)
    if data.kind == "features":
        return x.float()
    x = x.float().div_(255.0)  # (B, 3, H, W)
    if augment:
        x = random_horizontal_flip(x, generator=generator)
        if padding > 0:
            x = random_crop_with_padding(x, padding, generator=generator)
    return as_model_input(normalize(x, data.mean, data.std))


#: Images enter models in channels-last layout: measured on a 2-core CPU (benchmarks/RESULTS.md,
#: "Throughput"), a small_cnn step trains 1.4×, EfficientNet-Lite0 1.6× and a mixture's loop of
#: experts infers 1.3–1.8× faster than in PyTorch's default layout (whose max-pooling kernel is slow
#: there); the numbers computed differ only by float rounding.
CHANNELS_LAST = True


def as_model_input(x: torch.Tensor) -> torch.Tensor:
    """A batch of images (B, C, H, W) in the layout models run fastest on (:data:`CHANNELS_LAST`)."""
    if CHANNELS_LAST and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def make_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise DmdeValueError(f"unknown optimizer {cfg.optimizer!r} (use sgd or adamw)")


def lr_at(cfg: OptimConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to zero over the whole run."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


EpochSamples = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def fit(
    model: nn.Module,
    data: ImageTensors,
    cfg: OptimConfig,
    loss_fn: LossFn,
    ckpt_path: str | os.PathLike,
    epoch_samples: EpochSamples | None = None,
    on_epoch_start: Callable[[int, torch.Generator], None] | None = None,
    extra_state: Callable[[], dict[str, Any]] | None = None,
    restore_extra: Callable[[dict[str, Any]], None] | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    identity: dict[str, Any] | None = None,
    seed_parts: Sequence[int] = (),
    device: torch.device | str = "cpu",
    desc: str = "train",
    progress: bool = True,
    stop_after_epoch: int | None = None,
    params: Sequence[nn.Parameter] | None = None,
    data_parallel: bool = False,
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs``, resuming from ``ckpt_path`` when it exists.

    ``loss_fn(model, x, y) -> (loss, logits)``; ``epoch_samples(e) -> (indices, labels)``
    (default: every sample with its target); ``identity`` is stored in the checkpoint and
    must match on resume (e.g. the ontology hash). Returns the last epoch's metrics.
    ``stop_after_epoch`` simulates a crash, for tests. With ``data_parallel`` under torchrun,
    each rank takes its slice of every global batch (``world × batch_size`` samples), gradients
    are averaged, and rank 0 writes the checkpoint.
    """
    device = torch.device(device)
    path = Path(ckpt_path)
    log_path = path.with_suffix(".jsonl")
    identity = dict(identity or {})
    if epoch_samples is None:
        all_idx = torch.arange(len(data))

        def epoch_samples(_e: int) -> tuple[torch.Tensor, torch.Tensor]:
            return all_idx, data.targets

    rank, world = dist_context() if data_parallel else (0, 1)
    trained = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    optimizer = make_optimizer(cfg, trained)
    start, metrics = 0, {}
    if path.exists():  # resume: first check that the checkpoint is this model's, then load it
        state = load_checkpoint(path)
        missing = [k for k in ("model", "optimizer", "epoch") if k not in state]
        if missing:
            raise MismatchError(f"checkpoint {path} is not a dmde training checkpoint (no {', '.join(missing)}); "
                                "move it away and train again")
        for k, v in identity.items():
            if k in state and state[k] != v:  # checkpoints older than a key do not carry it
                raise MismatchError(f"checkpoint {path} belongs to another run ({k} {state[k]!r} != this run's {v!r}); "
                                    "move it away, or train into a fresh directory")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise MismatchError(f"checkpoint {path} does not fit this model (another backbone or width?): {first}") from None
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
        metrics = state.get("metrics", {})
        if restore_extra is not None:
            restore_extra(state)
        if start >= cfg.epochs:
            return metrics
    _truncate_log(log_path, start)

    batch = cfg.batch_size * world  # the global batch; rank r takes its r-th slice
    sizes = [int(epoch_samples(e)[0].numel()) for e in range(cfg.epochs)]
    steps = [max(1, math.ceil(n / batch)) for n in sizes]
    total, step = sum(steps), sum(steps[:start])
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, *seed_parts, epoch))
        torch.manual_seed(mix_seed(cfg.seed, *seed_parts, epoch, 1))  # dropout and friends
        if on_epoch_start is not None:
            on_epoch_start(epoch, gen)
        idx, labels = epoch_samples(epoch)
        order = torch.randperm(idx.numel(), generator=gen)
        idx, labels = idx[order], labels[order]
        model.train()
        tot_loss = 0.0
        correct = seen = 0
        scored = False
        bar = tqdm(range(0, idx.numel(), batch), desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                   disable=not progress or rank != 0, leave=False, mininterval=1.0)
        for s in bar:
            b_idx, b_lab = idx[s : s + batch], labels[s : s + batch]
            if world > 1:
                b_idx, b_lab = b_idx[rank::world], b_lab[rank::world]
            y = b_lab.to(device)
            # (all ranks drew the same permutation above; their augmentation draws may differ)
            x = prepare_inputs(data, b_idx, cfg.augment, cfg.crop_padding, gen, device)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(cfg, step, total, steps[epoch])
            loss, logits = loss_fn(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                average_gradients(trained, world)
            optimizer.step()
            step += 1
            n = y.numel()
            tot_loss += float(loss.detach()) * n
            if logits is not None:  # a loss may not expose its logits (e.g. the mixture's)
                correct += int((logits.detach().argmax(1) == y).sum())
                scored = True
            seen += n
            bar.set_postfix(loss=f"{tot_loss / seen:.3f}", refresh=False)
        bar.close()
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "train_loss": tot_loss / max(1, seen), "train_acc": correct / max(1, seen),
                   "images": seen, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}
        if evaluate is not None:
            metrics.update(evaluate(model))
        state = {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "metrics": metrics, **identity}
        if extra_state is not None:
            state.update(extra_state())
        if rank == 0:
            save_checkpoint(path, state)
            with open(log_path, "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
            extra = "".join(f", {k} {v:.3f}" for k, v in metrics.items()
                            if k.startswith("holdout_") and isinstance(v, float))
            acc = f", train acc {metrics['train_acc']:.3f}" if scored else ""  # a loss may keep its logits
            log.info("%s epoch %d/%d: loss %.4f%s%s, %.0f img/s, %.1f s", desc, epoch + 1, cfg.epochs,
                     metrics["train_loss"], acc, extra, metrics["images_per_s"], seconds)
        if world > 1:
            barrier()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return metrics


def _truncate_log(log_path: Path, epochs: int) -> None:
    """Keep the first ``epochs`` lines: lines past the last checkpoint came from a crash."""
    if not log_path.exists():
        return
    lines = log_path.read_text().splitlines()[:epochs]
    log_path.write_text("".join(line + "\n" for line in lines))


@torch.no_grad()
def predict_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    data: ImageTensors,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "predict",
) -> torch.Tensor:
    """``forward`` over every sample of ``data`` (no augmentation), outputs stacked on the CPU."""
    outs = []
    for s in tqdm(range(0, len(data), batch_size), desc=desc, disable=not progress, leave=False):
        idx = torch.arange(s, min(len(data), s + batch_size))
        outs.append(forward(prepare_inputs(data, idx, device=device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)
