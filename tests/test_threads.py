"""Thread defaults from the CPU affinity, the option, and the load warning."""
from __future__ import annotations

import os

import pytest
import torch

from dmde.core.errors import DmdeValueError
from dmde.core.threads import (
    available_cores,
    configure_threads,
    default_threads,
    load_warning,
    parse_threads,
)


def test_default_threads_shares_the_cores_between_local_ranks():
    assert default_threads(cores=8, local_world=1) == 8
    assert default_threads(cores=8, local_world=3) == 2
    assert default_threads(cores=2, local_world=4) == 1


def test_available_cores_follows_the_affinity():
    if hasattr(os, "sched_getaffinity"):
        assert available_cores() == len(os.sched_getaffinity(0))
    assert available_cores() >= 1


@pytest.mark.parametrize("bad", ["abc", "0", "-2", "1.5"])
def test_bad_thread_counts_are_one_line_errors(bad):
    with pytest.raises(DmdeValueError, match="positive integer"):
        parse_threads(bad)


def test_configure_threads_order(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("DMDE_THREADS", "1")
        assert configure_threads(None) == 1 and torch.get_num_threads() == 1
        assert configure_threads("2") == 2 and torch.get_num_threads() == 2  # the option beats the variable
        monkeypatch.delenv("DMDE_THREADS")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch's own variable is respected as it was read
        torch.set_num_threads(1)
        assert configure_threads(None) == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert configure_threads(None) == default_threads()
    finally:
        torch.set_num_threads(before)


def test_load_warning():
    assert load_warning(cores=2, load=1.9) is None
    msg = load_warning(cores=2, load=3.5)
    assert msg.startswith("warning:") and "3.5" in msg and "2 core" in msg
