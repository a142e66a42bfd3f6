"""Install like a library: the built wheel, in a fresh virtualenv, run from outside the checkout."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, SHARED

pytestmark = pytest.mark.slow  # builds a wheel, makes a venv, runs a quick suite


def test_the_wheel_runs_every_command_outside_the_checkout(tmp_path, real_wordnet_dir):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(dist.glob("dmde-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("dmde/configs/paper/suite.yaml", "dmde/configs/paper/pretrained.yaml",
                    "dmde/configs/paper-full/pretrained.yaml", "dmde/resources/demo.yaml",
                    "dmde/resources/fashion_mnist_wnids.txt", "dmde/run/stages.py"):
        assert shipped in names, shipped

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # The dependencies (torch is large) come from this environment: its site-packages as plain
    # path entries. Their .pth files are not processed that way, so this checkout's editable
    # install stays out: `import dmde` must find the wheel's copy.
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # --ignore-installed: this environment's own dmde metadata is on the path too; never touch it
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--ignore-installed", str(wheel)], check=True, capture_output=True, env=env)
    away = tmp_path / "elsewhere"
    away.mkdir()

    def dmde(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "dmde"), *args], cwd=away, env=env, capture_output=True,
                              text=True, timeout=timeout)

    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import dmde; print(dmde.__file__)"], cwd=away,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(str(site)), r.stderr[-1500:] + r.stdout
    r = dmde("--help")
    assert r.returncode == 0 and "experiment" in r.stdout and "predict" in r.stdout
    (away / "classes.txt").write_text("n02084071\nn02121808\nn02374451\nn02958343\n")  # dog cat horse car
    r = dmde("ontology", "build", "--wnids", "classes.txt", "--out", "o.json", "--categories", "2",
             "--wordnet", str(real_wordnet_dir))
    assert r.returncode == 0, r.stderr
    assert (away / "o.json").is_file()
    tiny = SHARED / "data" / "tiny-imagenet-200" / "train.zip"
    if not tiny.is_file():
        pytest.skip("Tiny-ImageNet is absent: the wheel's --help and ontology build were checked")
    r = dmde("experiment", "--suite", "paper", "--quick", "--data", str(tiny), "--out", "q", "--no-report",
             "--rows", "mixture", timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (away / "q" / "pretrained" / "mixture-s0" / "metrics.json").is_file()
