"""The one epoch loop every trained stage uses (experts, the N-way layer, flat baseline, early
fusion, end-to-end fine-tuning): data in memory or streamed, per-batch augmentation, a cosine (or
constant) rate, a checkpoint after every epoch (atomic), ``--resume`` from the last completed epoch, and a
JSONL line per epoch (with TensorBoard scalars beside it: :mod:`dmde.core.tensorboard`).

Every random draw of epoch e comes from a generator seeded by (seed, e) (or, with
``shuffle=False``, from the caller's ``epoch_samples(e)``, which must give the same order for the
same e), so resuming at an epoch boundary gives the same weights as an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dmde.core.batches import (  # noqa: F401  (ImageTensors, prepare_inputs: imported from here too)
    ImageTensors,
    StreamedImages,
    as_model_input,
    load_batches,
    prepare_inputs,
    to_model_input,
)
from dmde.core.checkpoint import load_checkpoint, save_checkpoint
from dmde.core.distributed import average_gradients, barrier, dist_context
from dmde.core.errors import DmdeValueError, MismatchError
from dmde.core.precision import autocast
from dmde.core.tensorboard import event_writer, write_scalars

#: One line per finished epoch (INFO): the CLI shows it on stderr, with or without progress bars.
log = logging.getLogger("dmde.train")

#: The optimisers of :func:`make_optimizer`.
OPTIMIZERS = ("sgd", "adamw", "adam")


@dataclass
class OptimConfig:
    """How a stage trains: epochs, batch size, optimiser and schedule, augmentation."""

    epochs: int = 4
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adamw | adam (weight decay as an L2 term in the gradient)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    augment: bool = True  # random crop with padding + horizontal flip, per batch
    crop_padding: int = 4
    seed: int = 0


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


def make_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise DmdeValueError(f"unknown optimizer {cfg.optimizer!r} (use {', '.join(OPTIMIZERS)})")


def optim_part(cfg: OptimConfig) -> OptimConfig:
    """The :class:`OptimConfig` part of a stage's config (e.g. the experts'), as its own object."""
    return OptimConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(OptimConfig)})


def lr_at(cfg: OptimConfig, step: int, total: int, steps_per_epoch: int, constant: bool = False) -> float:
    """Linear warm-up, then cosine decay to zero over the whole run (or the ``constant`` rate)."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if constant:
        return cfg.lr
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def rank_slices(idx: torch.Tensor, labels: torch.Tensor, batch: int, rank: int = 0, world: int = 1
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's part of each global batch of an epoch's order: rank r takes b[r::world], so
    the ranks together see every sample exactly once per epoch (a DistributedSampler's job)."""
    out = []
    for s in range(0, idx.numel(), batch):
        b_idx, b_lab = idx[s : s + batch], labels[s : s + batch]
        if world > 1:
            b_idx, b_lab = b_idx[rank::world], b_lab[rank::world]
        out.append((b_idx, b_lab))
    return out


EpochSamples = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def fit(
    model: nn.Module,
    data: ImageTensors | StreamedImages,
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
    precision: str | int = "32",
    shuffle: bool = True,
    constant_lr: bool = False,
    resume_state: dict[str, Any] | None = None,
    on_batch: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs``, resuming from ``ckpt_path`` when it exists.

    ``loss_fn(model, x, y) -> (loss, logits)``; ``epoch_samples(e) -> (indices, labels)``
    (default: every sample with its target); ``identity`` is stored in the checkpoint and
    must match on resume (e.g. the ontology hash). Returns the last epoch's metrics.
    ``stop_after_epoch`` simulates a crash, for tests. With ``data_parallel`` under torchrun,
    each rank takes its slice of every global batch (``world × batch_size`` samples), gradients
    are averaged, and rank 0 writes the checkpoint. ``precision`` (32, bf16, fp16): the forward pass
    and loss under :func:`dmde.core.precision.autocast`; fp16 scales the loss, its scaler saved with
    the checkpoint. ``shuffle=False``: each epoch in the order ``epoch_samples`` gives;
    ``constant_lr``: no decay after the warm-up (the layers trained on precomputed inputs).
    ``resume_state``: the checkpoint at ``ckpt_path`` when the caller has already read it.
    ``on_batch(indices)``: called with the samples of each batch (this rank's) before its loss, for
    a loss that needs per-sample data beside the label (the experts' distillation targets).
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
    precision = str(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # a no-op unless fp16
    start, metrics = 0, {}
    if path.exists():  # resume: first check that the checkpoint is this model's, then load it
        state = resume_state if resume_state is not None else load_checkpoint(path)
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
        if str(state.get("precision", "32")) != precision:
            raise MismatchError(f"checkpoint {path} was trained at precision {state.get('precision', '32')}, "
                                f"not {precision}; move it away, or train at its precision")
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start = int(state["epoch"])
        metrics = state.get("metrics", {})
        if restore_extra is not None:
            restore_extra(state)
        if start >= cfg.epochs:
            return metrics
    _truncate_log(log_path, start)
    board = event_writer(path.with_suffix(".tb"), start) if rank == 0 else None  # None: off or not installed

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
        if shuffle:
            order = torch.randperm(idx.numel(), generator=gen)
            idx, labels = idx[order], labels[order]
        model.train()
        tot_loss = 0.0
        correct = seen = 0
        scored = False
        slices = rank_slices(idx, labels, batch, rank, world)  # (all ranks drew the same permutation)
        raws = load_batches(data, [b for b, _ in slices], pin_memory=device.type == "cuda")
        bar = tqdm(zip(slices, raws), total=len(slices), desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                   disable=not progress or rank != 0, leave=False, mininterval=1.0)
        for (b_idx, b_lab), raw in bar:
            y = b_lab.to(device)
            # (the ranks' augmentation draws may differ)
            x = to_model_input(raw, data, cfg.augment, cfg.crop_padding, gen, device)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(cfg, step, total, steps[epoch], constant_lr)
            if on_batch is not None:
                on_batch(b_idx)
            with autocast(precision, device):
                loss, logits = loss_fn(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if world > 1:
                average_gradients(trained, world)
            scaler.step(optimizer)
            scaler.update()
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
        if precision != "32":
            state["precision"] = precision
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        if extra_state is not None:
            state.update(extra_state())
        if rank == 0:  # the log line first: one past the checkpoint is dropped on resume, a missing one is not restored
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
            write_scalars(board, metrics)
            save_checkpoint(path, state)
            extra = "".join(f", {k} {v:.3f}" for k, v in metrics.items()
                            if k.startswith("holdout_") and isinstance(v, float))
            acc = f", train acc {metrics['train_acc']:.3f}" if scored else ""  # a loss may keep its logits
            log.info("%s epoch %d/%d: loss %.4f%s%s, %.0f img/s, %.1f s", desc, epoch + 1, cfg.epochs,
                     metrics["train_loss"], acc, extra, metrics["images_per_s"], seconds)
        if world > 1:
            barrier()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    if board is not None:
        board.close()
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
    data: ImageTensors | StreamedImages,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "predict",
    precision: str | int = "32",
) -> torch.Tensor:
    """``forward`` over every sample of ``data`` (no augmentation), outputs stacked on the CPU;
    under :func:`autocast` at ``precision``."""
    outs = []
    batches = [torch.arange(s, min(len(data), s + batch_size)) for s in range(0, len(data), batch_size)]
    raws = load_batches(data, batches, pin_memory=torch.device(device).type == "cuda")
    for raw in tqdm(raws, total=len(batches), desc=desc, disable=not progress, leave=False):
        with autocast(precision, device):
            outs.append(forward(to_model_input(raw, data, device=device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)
