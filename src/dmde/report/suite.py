"""An experiment suite (``configs/<suite>/suite.yaml``): its rows and seeds as ``dmde train`` runs under
``OUT/<regime>/<row>-s<seed>``, finished runs reused, finished stages shared between rows whose
stage hashes agree (hard links), resumable at any point."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from dmde.core.config import load_config, read_yaml
from dmde.core.errors import DmdeFileError, DmdeValueError
from dmde.run.config import RunConfig, validate

#: Where ``--suite NAME`` and a bare ``--config NAME/REGIME.yaml`` are looked up: the configs shipped
#: inside the package (``src/dmde/configs``; the checkout's ``configs/`` links to it), so an installed
#: wheel runs ``dmde experiment --suite paper`` too.
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Row:
    name: str
    seeds: list[int]
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    """A suite file: its directory (holding one ``<regime>.yaml`` per regime), rows and quick mode."""

    name: str
    dir: Path
    regimes: list[str]
    rows: list[Row]
    quick_overrides: dict[str, Any] = field(default_factory=dict)
    quick_seeds: list[int] = field(default_factory=lambda: [0])

    def base_config(self, regime: str) -> Path:
        if regime not in self.regimes:
            raise DmdeValueError(f"suite {self.name!r} has no regime {regime!r}; it has {', '.join(self.regimes)}")
        path = self.dir / f"{regime}.yaml"
        if not path.is_file():
            raise DmdeFileError(f"suite {self.name!r} lacks its {regime} config {path.name}")
        return path

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise DmdeValueError(f"suite {self.name!r} has no row {name!r}; rows: {', '.join(r.name for r in self.rows)}")


def load_suite(name_or_path: str | os.PathLike) -> Suite:
    """A suite by name (``configs/<name>/suite.yaml``) or by the path of its directory or file."""
    p = Path(name_or_path)
    if not p.exists() and os.sep not in str(name_or_path):
        p = CONFIGS_DIR / str(name_or_path)
    if p.is_dir():
        p = p / "suite.yaml"
    if not p.is_file():
        raise DmdeFileError(f"suite {name_or_path} not found (looked for {p.name} in configs/{name_or_path}/)")
    raw = read_yaml(p)
    rows = []
    for item in raw.get("rows", []):
        if not isinstance(item, dict) or "name" not in item:
            raise DmdeValueError(f"{p.name}: every row needs a name")
        rows.append(Row(str(item["name"]), [int(s) for s in item.get("seeds", [0])], dict(item.get("overrides") or {})))
    quick = raw.get("quick") or {}
    return Suite(p.parent.name, p.parent, list(raw.get("regimes", [])), rows, dict(quick.get("overrides") or {}),
                 [int(s) for s in quick.get("seeds", [0])])


def _override_list(mapping: dict[str, Any]) -> list[str]:
    """``{"a.b": 1, "c": "x"}`` → ``["a.b=1", "c=x"]`` (values as YAML flow, parsed back by the config)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True, width=1000).strip().removesuffix(chr(10) + '...')}"
            for k, v in mapping.items()]


def row_overrides(suite: Suite, regime: str, row: Row, seed: int, out: Path, data: str | None = None,
                  quick: bool = False, extra: Sequence[str] = ()) -> list[str]:
    """The ``KEY=VALUE`` overrides that make a row's config from its regime's base file."""
    over = _override_list(suite.quick_overrides) if quick else []
    over += _override_list(row.overrides)
    over += [f"experts.seed={seed}", f"groups.seed={seed}"]
    if data is not None:
        over.append(f"data.root={Path(data).resolve()}")
        over.append(f"data.cache={(out / 'cache' / f'{regime}_images.pt').resolve()}")
    return over + list(extra)


def row_config(suite: Suite, regime: str, row: Row, seed: int, out: Path, data: str | None = None,
               quick: bool = False, extra: Sequence[str] = ()):
    cfg = load_config(RunConfig, suite.base_config(regime),
                      row_overrides(suite, regime, row, seed, out, data, quick, extra))
    validate(cfg)
    return cfg


def run_name(row: str, seed: int) -> str:
    return f"{row}-s{seed}"


def plan(suite: Suite, regimes: Sequence[str], rows: Sequence[str] | None = None,
         seeds: Sequence[int] | None = None, quick: bool = False) -> list[tuple[str, Row, int]]:
    """(regime, row, seed) in run order: regime by regime, rows as listed, seeds ascending."""
    chosen = [suite.row(r) for r in rows] if rows else list(suite.rows)
    out = []
    for regime in regimes:
        suite.base_config(regime)
        for row in chosen:
            row_seeds = list(seeds) if seeds is not None else (
                [s for s in row.seeds if s in suite.quick_seeds] or row.seeds[:1] if quick else row.seeds)
            out.extend((regime, row, s) for s in row_seeds)
    return out


#: The mixture's final model, best first: fine-tuned end to end, else with its N-way layer, else argmax Υ.
MIXTURE_MODELS = ("mixture", "mixture_nway", "mixture_upsilon")


def best_model(metrics: dict[str, Any]) -> str | None:
    return next((m for m in MIXTURE_MODELS if m in metrics), None)
