"""Every error a user can cause is one line on stderr naming the culprit, exit 2, and nothing left
half-written: a table of (command, expected message), run in-process, plus the run directory's
lock and a write killed half-way."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmde.cli.main import main
from dmde.core.io import DirectoryLock, atomic_write, remove_stale_temporaries

SYNTH = ["data.dataset=synthetic", "progress=false"]


def _ontology_json(path: Path, category) -> None:
    path.write_text(json.dumps({
        "format": "dmde-ontology", "version": 1, "kind": "semantic",
        "classes": [{"wnid": "n00000001", "lemma": "a", "category": 0},
                    {"wnid": "n00000002", "lemma": "b", "category": category}],
        "categories": [{"name": "c0"}, {"name": "c1"}]}))


def _setup(case: str, tmp: Path) -> list[str]:
    """Lay out the files case ``case`` needs and return its command line."""
    wnids = tmp / "classes.txt"
    wnids.write_text("n02084071\n")
    (tmp / "afile").write_text("not a directory\n")
    (tmp / "notes.txt").write_text("my notes\n")
    (tmp / "adir").mkdir()
    _ontology_json(tmp / "onto.json", 0)
    if case == "ontology-out-dir":
        return ["ontology", "build", "--wnids", str(wnids), "--out", str(tmp / "adir")]
    if case == "ontology-out-unrelated":
        return ["ontology", "build", "--wnids", str(wnids), "--out", str(tmp / "notes.txt")]
    if case == "ontology-out-under-file":
        return ["ontology", "build", "--wnids", str(wnids), "--out", str(tmp / "afile" / "o.json")]
    if case == "groups-out-dir":
        return ["groups", "--ontology", str(tmp / "onto.json"), "--size", "2", "--overlap", "0", "--out",
                str(tmp / "adir")]
    if case == "groups-hand-edited-ontology":
        _ontology_json(tmp / "edited.json", "one")
        return ["groups", "--ontology", str(tmp / "edited.json"), "--size", "2", "--overlap", "0", "--out",
                str(tmp / "g.json")]
    if case == "train-out-file":
        return ["train", "--out", str(tmp / "afile"), *SYNTH]
    if case == "train-out-under-file":
        return ["train", "--out", str(tmp / "afile" / "run"), *SYNTH]
    if case == "train-wrong-type":
        return ["train", "--out", str(tmp / "run"), *SYNTH, "groups.size=abc"]
    if case == "train-no-cuda":
        return ["train", "--out", str(tmp / "run"), *SYNTH, "--device", "cuda"]
    if case == "evaluate-not-a-run":
        return ["evaluate", str(tmp / "adir"), "--out", str(tmp / "eval")]
    if case == "evaluate-no-cuda":
        return ["evaluate", str(tmp / "adir"), "--out", str(tmp / "eval"), "--device", "cuda"]
    if case == "predict-no-cuda":
        return ["predict", str(tmp / "adir"), str(tmp / "afile"), "--device", "cuda"]
    raise KeyError(case)


CASES = [
    ("ontology-out-dir", "is a directory; give a file name"),
    ("ontology-out-unrelated", "exists and is not a dmde ontology file: refusing to overwrite it"),
    ("ontology-out-under-file", "lies under a file"),
    ("groups-out-dir", "is a directory; give a file name"),
    ("groups-hand-edited-ontology", "has category 'one': categories are integers"),
    ("train-out-file", "is a file, not a directory"),
    ("train-out-under-file", "lies under a file"),
    ("train-wrong-type", "groups.size='abc' must be an integer"),
    ("train-no-cuda", "this machine has no CUDA GPU"),
    ("evaluate-not-a-run", "is not a dmde run directory"),
    ("evaluate-no-cuda", "this machine has no CUDA GPU"),
    ("predict-no-cuda", "this machine has no CUDA GPU"),
]


@pytest.mark.parametrize("case, message", CASES, ids=[c for c, _ in CASES])
def test_user_error_is_one_line_exit_2_nothing_written(case, message, tmp_path, capsys):
    if case.endswith("-no-cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = _setup(case, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dmde: error: ") and err.count("\n") == 1, err
    assert message in err, err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing new, nothing changed (the unrelated file included)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_the_python_api_takes_a_device_and_refuses_a_missing_gpu_in_one_line(tmp_path):
    import dmde
    from dmde.core.errors import DmdeValueError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DmdeValueError, match="this machine has no CUDA GPU"):
        dmde.load(str(tmp_path), device="cuda")


def test_read_only_output_directory(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **kw: False if Path(p) == ro else real(p, m, **kw))
    try:
        for argv in (["train", "--out", str(ro), *SYNTH],
                     ["ontology", "build", "--wnids", str(tmp_path / "x.txt"), "--out", str(ro / "o.json")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert "permission denied" in err and err.count("\n") == 1, err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_a_second_train_into_a_held_run_directory_fails_at_once(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dmde.core.io import DirectoryLock\n"
         "with DirectoryLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        assert main(["train", "--out", str(run), *SYNTH]) == 2
        err = capsys.readouterr().err
        assert f"in use by another dmde process (pid {holder.pid})" in err and err.count("\n") == 1, err
        assert time.perf_counter() - t0 < 30  # at once, not after waiting
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    with DirectoryLock(run), DirectoryLock(run):  # free again once its holder died; re-entrant
        pass


def test_a_write_killed_half_way_leaves_no_temporary_behind(tmp_path):
    """A process killed inside atomic_write leaves its hidden .tmp; the next run removes it, and
    the target was never half-written."""
    target = tmp_path / "run" / "metrics.json"
    code = ("import sys, time\nfrom dmde.core.io import atomic_write\n"
            "def slow(tmp):\n    open(tmp, 'w').write('{\"half')\n    print('writing', flush=True)\n"
            "    time.sleep(60)\n"
            "atomic_write(sys.argv[1], slow)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list((tmp_path / "run").glob(".*.tmp"))
    assert len(left) == 1 and not target.exists()
    with DirectoryLock(tmp_path / "run"):
        assert remove_stale_temporaries(tmp_path / "run") == 1
    assert list((tmp_path / "run").glob(".*.tmp")) == [] and not target.exists()
    atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))  # and a later write goes through
    assert target.read_text() == "{}"
