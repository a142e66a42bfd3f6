"""Mixed precision of a run (``precision: 32 | bf16 | fp16``): the trained stages' forward passes
and losses under :func:`torch.autocast` to bfloat16 or float16 (float16 with loss scaling,
:class:`torch.amp.GradScaler`, in :func:`dmde.core.training.fit`); 32 is the float32 path unchanged.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from dmde.core.errors import DmdeValueError

#: The values of ``precision``.
PRECISIONS = ("32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str | int, device: torch.device | str):
    """The context of a forward pass: none at precision 32 (the float32 path, unchanged), else
    :func:`torch.autocast` to bfloat16 or float16 on ``device``'s type."""
    if str(precision) == "32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[str(precision)])


def check_precision(precision: str | int, device: torch.device | str) -> None:
    """One line, before any work, when this torch cannot autocast to ``precision`` on ``device``
    (it would fall back to float32 with a warning: a run would silently not be what it says)."""
    precision, device = str(precision), torch.device(device)
    if precision == "32":
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with autocast(precision, device):
                ones = torch.ones(2, 2, device=device)
                ok = (ones @ ones).dtype == _AUTOCAST_DTYPES[precision]
        except RuntimeError:
            ok = False
    if not ok:
        hint = "fp16 needs CUDA; use bf16 on CPU" if precision == "fp16" and device.type == "cpu" else "use 32"
        raise DmdeValueError(f"precision={precision!r} does not run on {device} with torch {torch.__version__}: {hint}")
