"""Running a suite: every planned row as a ``dmde train`` run, finished runs reused, finished stages
of a sibling run with the same stage hash shared in (hard links), cached trunk outputs shared by
name, the suite log in ``OUT/suite.json``. The only report module that drives the orchestrator."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from dmde.core.io import read_json, write_json
from dmde.report.suite import Suite, best_model, plan, row_config, run_name
from dmde.run.pipeline import train
from dmde.run.stages import OUTPUTS, shareable, stage_hashes


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
