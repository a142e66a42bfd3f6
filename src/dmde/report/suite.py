"""An experiment suite (``configs/<suite>/suite.yaml``): its rows and seeds as ``dmde train`` runs under
``OUT/<regime>/<row>-s<seed>``, finished runs reused, finished stages shared between rows whose
stage hashes agree (hard links), resumable at any point."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from dmde.core.config import load_config, read_yaml
from dmde.core.errors import DmdeFileError, DmdeValueError
from dmde.core.io import read_json, write_json
from dmde.run.config import RunConfig, validate
from dmde.run.pipeline import train
from dmde.run.stages import OUTPUTS, shareable, stage_hashes

#: Where ``--suite NAME`` is looked up: ``configs/NAME`` of the source tree.
CONFIGS_DIR = Path(__file__).resolve().parents[3] / "configs"


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


def _link_or_copy(src: Path, dst: Path) -> None:
    """Checkpoints (``*.pt``, replaced only by rename) are hard-linked; other files copied."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            if not child.name.startswith("."):
                _link_or_copy(child, dst / child.name)
        return
    if dst.exists():
        dst.unlink()
    if src.suffix == ".pt":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def share_finished_stages(run_dir: Path, cfg, sources: Iterable[Path]) -> dict[str, str]:
    """Bring into ``run_dir`` every finished stage of ``sources`` whose hash equals this config's
    (same inputs, so the same outputs); returns {stage: source run name}. ``evaluate`` is not
    shared: each run measures its own models."""
    hashes = stage_hashes(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages_path = run_dir / "stages.json"
    mine = read_json(stages_path) if stages_path.exists() else {}
    shared: dict[str, str] = {}
    for src in sources:
        if src.resolve() == run_dir.resolve() or not (src / "stages.json").is_file():
            continue
        theirs = read_json(src / "stages.json")
        for name in shareable():
            h = hashes[name]
            have = mine.get(name)
            if have and have.get("done") and have.get("hash") == h and (run_dir / OUTPUTS[name][0]).exists():
                continue
            rec = theirs.get(name)
            if not (rec and rec.get("done") and rec.get("hash") == h and (src / OUTPUTS[name][0]).exists()):
                continue
            for p in OUTPUTS[name]:
                _remove(run_dir / p)
                if (src / p).exists():
                    _link_or_copy(src / p, run_dir / p)
            mine[name] = {**rec, "shared_from": rec.get("shared_from", src.name)}
            shared[name] = src.name
    if shared:
        write_json(stages_path, mine)
    return shared


def _share_trunk_cache(run_dir: Path, cache: Path, into_cache: bool) -> None:
    """Cached trunk outputs are named by the hash of what they depend on: share them by name."""
    src, dst = (run_dir, cache) if into_cache else (cache, run_dir)
    if not src.is_dir():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.glob("trunk_*.pt"):
        if not (dst / p.name).exists():
            _link_or_copy(p, dst / p.name)


def is_finished(run_dir: Path, cfg) -> bool:
    path = run_dir / "stages.json"
    if not path.is_file() or not (run_dir / "metrics.json").is_file():
        return False
    rec = read_json(path).get("evaluate") or {}
    return bool(rec.get("done")) and rec.get("hash") == stage_hashes(cfg)["evaluate"]


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


def run_suite(suite: Suite, out: str | os.PathLike, data: str | None = None, regimes: Sequence[str] = ("pretrained",),
              rows: Sequence[str] | None = None, seeds: Sequence[int] | None = None, quick: bool = False,
              extra: Sequence[str] = (), max_minutes: float | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume, or skip) every planned row; returns the suite log (also ``OUT/suite.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "suite.json"
    book: dict[str, Any] = read_json(log_path) if log_path.exists() else {}
    book.setdefault("runs", {})
    book["suite"], book["quick"] = suite.name, bool(quick)
    t_start = time.time()
    todo = plan(suite, regimes, rows, seeds, quick)
    for i, (regime, row, seed) in enumerate(todo):
        name = run_name(row.name, seed)
        key = f"{regime}/{name}"
        run_dir = out / regime / name
        cfg = row_config(suite, regime, row, seed, out, data, quick, extra)
        if is_finished(run_dir, cfg):
            log(f"[{i + 1}/{len(todo)}] {key}: finished, reused")
            continue
        if max_minutes is not None and (time.time() - t_start) / 60 > max_minutes:
            log(f"[{i + 1}/{len(todo)}] {key}: not started (--max-minutes {max_minutes:g} passed); rerun to continue")
            book["stopped_before"] = key
            break
        siblings = sorted(p for p in (out / regime).iterdir() if p.is_dir()) if (out / regime).is_dir() else []
        shared = share_finished_stages(run_dir, cfg, siblings)
        _share_trunk_cache(run_dir, out / "cache", into_cache=False)
        note = f" (shared: {', '.join(f'{k} from {v}' for k, v in shared.items())})" if shared else ""
        log(f"[{i + 1}/{len(todo)}] {key}: training{note}")
        t0 = time.time()
        metrics = train(run_dir, cfg)
        seconds = time.time() - t0
        _share_trunk_cache(run_dir, out / "cache", into_cache=True)
        prev = book["runs"].get(key, {})
        book["runs"][key] = {"seconds": round(prev.get("seconds", 0.0) + seconds, 1), "finished": time.time(),
                             "shared": {**prev.get("shared", {}), **shared}}
        book.pop("stopped_before", None)
        write_json(log_path, book)
        best = best_model(metrics)
        log(f"[{i + 1}/{len(todo)}] {key}: done in {seconds:.0f} s" +
            (f"; {best} top-1 {100 * metrics[best]['top1']:.2f}%" if best else "") +
            (f", flat {100 * metrics['flat']['top1']:.2f}%" if "flat" in metrics else ""))
    write_json(log_path, book)
    return book


#: The mixture's final model, best first: fine-tuned end to end, else with its N-way layer, else argmax Υ.
MIXTURE_MODELS = ("mixture", "mixture_nway", "mixture_upsilon")


def best_model(metrics: dict[str, Any]) -> str | None:
    return next((m for m in MIXTURE_MODELS if m in metrics), None)
