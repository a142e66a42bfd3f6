"""TensorBoard event files beside the JSONL logs of the one training loop (dmde.core.training.fit)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmde.core import tensorboard
from dmde.core.training import ImageTensors, OptimConfig, fit
from dmde.data.synthetic import synthetic_images

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


@pytest.fixture(autouse=True)
def _enabled():
    tensorboard.set_enabled(True)
    yield
    tensorboard.set_enabled(True)


def _fit(path, epochs: int = 3, stop_after_epoch: int | None = None) -> None:
    x, y = synthetic_images(3, 8, size=8, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))

    def loss_fn(m, xb, yb):
        logits = m(xb)
        return F.cross_entropy(logits, yb), logits

    fit(model, ImageTensors(x, y), OptimConfig(epochs=epochs, batch_size=8, lr=0.05, augment=False), loss_fn,
        path, progress=False, stop_after_epoch=stop_after_epoch)


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]


def test_a_fit_writes_one_scalar_per_metric_per_epoch_equal_to_the_jsonl(tmp_path):
    path = tmp_path / "m.pt"
    _fit(path)
    lines = _jsonl(path)
    got = _scalars(tmp_path / "m.tb")
    assert set(got) == set(lines[0]) - {"epoch"}
    for tag, events in got.items():
        assert [s for s, _ in events] == [1, 2, 3]
        assert [v for _, v in events] == pytest.approx([r[tag] for r in lines], rel=1e-6)  # stored as float32


def test_a_resumed_fit_shows_each_epoch_once(tmp_path):
    """Killed after epoch 3's events but before its checkpoint: the resumed run trains epoch 3 again
    and TensorBoard shows it once (the purge step), as the JSONL log keeps one line for it."""
    path = tmp_path / "m.pt"
    _fit(path, stop_after_epoch=2)
    at_epoch_2 = path.read_bytes()
    _fit(path)
    path.write_bytes(at_epoch_2)
    _fit(path)
    got = _scalars(tmp_path / "m.tb")
    lines = _jsonl(path)
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert [s for s, _ in got["train_loss"]] == [1, 2, 3]
    assert [v for _, v in got["train_loss"]] == pytest.approx([r["train_loss"] for r in lines], rel=1e-6)


def test_tensorboard_false_writes_no_event_files(tmp_path):
    tensorboard.set_enabled(False)
    _fit(tmp_path / "m.pt", epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "m.pt"]
