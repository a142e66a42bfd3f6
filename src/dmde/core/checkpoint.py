"""Checkpoints: one plain dict of tensors and JSON-like values, written atomically.

Loading always uses ``torch.load(weights_only=True)``: a file that holds pickled Python
objects (anything but tensors, numbers, strings, lists, dicts) is refused, so a checkpoint
from an untrusted source cannot run code. Each expert checkpoint carries the ontology's hash
and its group's classes; :func:`check_expert_checkpoint` refuses one that does not match.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import torch

from dmde.core.errors import DmdeError, DmdeFileError, MismatchError
from dmde.core.io import atomic_write

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` via a temporary file and a rename (never half-written)."""
    state = {"format_version": FORMAT_VERSION, **state}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing pickled objects."""
    p = Path(path)
    if not p.is_file():
        raise DmdeFileError(f"checkpoint {p} does not exist")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DmdeError(
            f"refusing to load checkpoint {p}: it holds pickled Python objects "
            f"(only tensors and plain values are allowed): {first}"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise DmdeError(f"checkpoint {p} is unreadable or truncated ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise DmdeError(f"{p} is not a dmde checkpoint")
    return state


def check_expert_checkpoint(
    state: dict[str, Any],
    ontology_hash: str,
    group_wnids: Sequence[str] | None = None,
    where: str = "checkpoint",
    config_hash: str | None = None,
) -> None:
    """Refuse an expert checkpoint trained for another ontology, another group or (``config_hash``)
    with other expert settings; a checkpoint older than the config hash does not carry one."""
    got = state.get("ontology_hash")
    if got != ontology_hash:
        raise MismatchError(
            f"{where} was trained for ontology {got}, not this run's ontology {ontology_hash}"
        )
    if group_wnids is not None and list(state.get("group_wnids", [])) != list(group_wnids):
        raise MismatchError(f"{where} holds an expert for different classes than its task group")
    if config_hash is not None and "config_hash" in state and state["config_hash"] != config_hash:
        raise MismatchError(f"{where} was trained with other expert settings (another run, width or seed); "
                            "move it away, or train into a fresh directory")
