"""Shared fixtures. Tests make their own small data; those that read ../shared are marked."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the project's root (CI lays a copy there); DMDE_SHARED overrides.
SHARED = Path(os.environ.get("DMDE_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return SHARED


def _wordnet_dir() -> Path | None:
    for cand in (os.environ.get("DMDE_WORDNET"), "/usr/share/wordnet"):
        if cand and (Path(cand) / "data.noun").is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def real_wordnet_dir() -> Path:
    """The real WordNet 3.0 database (Debian's wordnet-base), or skip."""
    d = _wordnet_dir()
    if d is None:
        pytest.skip("WordNet 3.0 database not installed (apt-get install wordnet-base)")
    return d


@pytest.fixture(autouse=True)
def _small_threads(monkeypatch):
    # Two cores: keep each test from oversubscribing when pytest runs alongside other work.
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
