"""TensorBoard event files beside a trained model's JSONL log: one scalar per metric per epoch,
written by the one training loop (:func:`dmde.core.training.fit`, rank 0 only).

Optional: the ``tensorboard`` package (``pip install dmde[tensorboard]``). Without it, or with
the run's ``tensorboard: false`` (:func:`set_enabled`), :func:`event_writer` returns None and
training writes the JSONL log alone. ``tensorboard --logdir RUN`` then shows every model of a
run, one TensorBoard run per ``<model>.tb/`` directory.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

_ENABLED = True


def set_enabled(flag: bool) -> None:
    """Write event files (the default, when tensorboard is installed) or not (``tensorboard: false``)."""
    global _ENABLED
    _ENABLED = bool(flag)


def event_writer(log_dir: str | Path, start_epoch: int = 0) -> Any | None:
    """A ``SummaryWriter`` into ``log_dir``, or None when disabled or tensorboard is not installed.
    A fresh training (``start_epoch`` 0) starts an empty directory; a resumed one hides the events
    of the epochs it trains again (TensorBoard's purge step), as the JSONL log drops their lines."""
    if not _ENABLED:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
    except ImportError:
        return None
    log_dir = Path(log_dir)
    if start_epoch == 0:
        shutil.rmtree(log_dir, ignore_errors=True)
    # steps are 1-based epochs: a run resumed after epoch k hides the stale events from step k + 1 on
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_epoch + 1 if start_epoch else None)


def write_scalars(writer: Any | None, metrics: dict[str, Any]) -> None:
    """One scalar per numeric metric at step ``metrics["epoch"]``, flushed (a killed run keeps it)."""
    if writer is None:
        return
    step = int(metrics["epoch"])
    for key, value in metrics.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, float(value), step)
    writer.flush()
