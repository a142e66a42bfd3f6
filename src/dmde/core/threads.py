"""How many threads torch uses, chosen from the cores this process may actually run on.

``torch.get_num_threads()`` defaults to every core of the machine, even in a container or a
``taskset`` that allows fewer, and two PyTorch processes on the same cores each take all of them:
on a 2-core machine a 4-minute job then takes an hour. :func:`configure_threads` sets the count
from the CPU affinity (shared between the ranks of a torchrun job on one machine) unless the user
gives one (``--threads``, ``DMDE_THREADS``, or ``OMP_NUM_THREADS`` as torch reads it);
:func:`load_warning` says when the machine is already busy.
"""
from __future__ import annotations

import os

from dmde.core.errors import DmdeValueError

ENV = "DMDE_THREADS"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None, local_world: int | None = None) -> int:
    """Cores shared evenly between the processes of a torchrun job on this machine (at least 1)."""
    cores = available_cores() if cores is None else cores
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_world is None else local_world
    return max(1, cores // max(1, local))


def parse_threads(value: str | int | None) -> int | None:
    """A thread count from the command line or the environment: a positive integer, or None."""
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise DmdeValueError(f"the thread count must be a positive integer, got {value!r}") from None
    if n < 1:
        raise DmdeValueError(f"the thread count must be a positive integer, got {value!r}")
    return n


def configure_threads(requested: str | int | None = None) -> int:
    """Set torch's intra-op thread count: ``requested``, else ``$DMDE_THREADS``, else what
    ``$OMP_NUM_THREADS`` gave torch, else :func:`default_threads`. Returns the count in force."""
    import torch

    n = parse_threads(requested)
    if n is None:
        n = parse_threads(os.environ.get(ENV))
    if n is None and os.environ.get("OMP_NUM_THREADS"):  # torch has read it already: the user's choice stands
        return torch.get_num_threads()
    if n is None:
        n = default_threads()
    torch.set_num_threads(n)
    return n


def load_warning(cores: int | None = None, load: float | None = None) -> str | None:
    """One line when the 1-minute load average is above the cores available, else None."""
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return None
    if load <= cores:
        return None
    return (f"warning: the load average is {load:.1f} on {cores} core(s): other work is running, "
            f"so this will be slow (threads compete; see --threads)")
