"""Expert training: checkpoints, resume, refusal of mismatched or unsafe checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from dmde.core.checkpoint import (
    check_expert_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dmde.core.errors import DmdeError, MismatchError
from dmde.core.training import ImageTensors
from dmde.data.synthetic import synthetic_images
from dmde.experts.train import (
    ExpertsConfig,
    evaluate_expert,
    expert_path,
    load_expert,
    train_expert,
)


def tiny_data(n_classes: int = 4, per_class: int = 24, size: int = 12, seed: int = 0) -> ImageTensors:
    x, y = synthetic_images(n_classes, per_class, size=size, seed=seed)
    return ImageTensors(x, y)


def tiny_cfg(**kw) -> ExpertsConfig:
    base = dict(backbone="small_cnn", backbone_kwargs={"width": 8}, epochs=2, batch_size=16, lr=0.05,
                similarity_per_class=4, seed=3)
    base.update(kw)
    return ExpertsConfig(**base)


GROUP = [1, 2]
WNIDS = ["n00000001", "n00000002"]


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Evil:
    """Any class: unpickling it would run its module's import (and could run code)."""


def test_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": {}, "payload": Evil()}, path)
    with pytest.raises(DmdeError, match="pickled"):
        load_checkpoint(path)


def test_checkpoint_roundtrip_is_atomic(tmp_path):
    path = tmp_path / "sub" / "c.pt"
    save_checkpoint(path, {"w": torch.arange(3), "name": "x"})
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary file left behind
    state = load_checkpoint(path)
    assert torch.equal(state["w"], torch.arange(3)) and state["name"] == "x"


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DmdeError, match="unreadable or truncated"):
        load_checkpoint(path)


def test_expert_checkpoint_identity_checks():
    state = {"ontology_hash": "abc", "group_wnids": WNIDS}
    check_expert_checkpoint(state, "abc", WNIDS)
    with pytest.raises(MismatchError, match="ontology"):
        check_expert_checkpoint(state, "other", WNIDS)
    with pytest.raises(MismatchError, match="different classes"):
        check_expert_checkpoint(state, "abc", WNIDS[::-1])


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path):
    data = tiny_data()
    cfg = tiny_cfg(epochs=3)
    full = train_expert(0, GROUP, WNIDS, data, cfg, tmp_path / "a", "h", progress=False)
    part = train_expert(0, GROUP, WNIDS, data, cfg, tmp_path / "b", "h", progress=False, stop_after_epoch=1)
    assert part["epoch"] == 1
    resumed = train_expert(0, GROUP, WNIDS, data, cfg, tmp_path / "b", "h", progress=False)
    assert resumed["epoch"] == full["epoch"] == 3
    a = load_checkpoint(expert_path(tmp_path / "a", 0))
    b = load_checkpoint(expert_path(tmp_path / "b", 0))
    assert _states_equal(a["model"], b["model"])
    assert torch.equal(a["similarity"], b["similarity"])
    # one log line per epoch, none duplicated by the resume
    lines = (tmp_path / "b" / "expert_000.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_finished_expert_is_not_retrained(tmp_path):
    data = tiny_data()
    cfg = tiny_cfg(epochs=1)
    train_expert(0, GROUP, WNIDS, data, cfg, tmp_path, "h", progress=False)
    mtime = expert_path(tmp_path, 0).stat().st_mtime_ns
    train_expert(0, GROUP, WNIDS, data, cfg, tmp_path, "h", progress=False)
    assert expert_path(tmp_path, 0).stat().st_mtime_ns == mtime


def test_same_seed_same_expert_other_seed_differs(tmp_path):
    data = tiny_data()
    train_expert(0, GROUP, WNIDS, data, tiny_cfg(epochs=1), tmp_path / "a", "h", progress=False)
    train_expert(0, GROUP, WNIDS, data, tiny_cfg(epochs=1), tmp_path / "b", "h", progress=False)
    train_expert(0, GROUP, WNIDS, data, tiny_cfg(epochs=1, seed=4), tmp_path / "c", "h", progress=False)
    a, b, c = (load_checkpoint(expert_path(tmp_path / d, 0))["model"] for d in "abc")
    assert _states_equal(a, b)
    assert not _states_equal(a, c)


def test_checkpoint_of_another_ontology_is_refused(tmp_path):
    data = tiny_data()
    train_expert(0, GROUP, WNIDS, data, tiny_cfg(epochs=1), tmp_path, "h", progress=False)
    with pytest.raises(MismatchError):
        train_expert(0, GROUP, WNIDS, data, tiny_cfg(epochs=2), tmp_path, "other", progress=False)
    with pytest.raises(MismatchError):
        load_expert(expert_path(tmp_path, 0), "other", WNIDS)


def test_expert_learns_its_group_and_not_in_group(tmp_path):
    """On easy synthetic classes the expert separates its two classes and the rest."""
    data = tiny_data(per_class=40)
    cfg = tiny_cfg(epochs=6, lr=0.01, backbone_kwargs={"width": 16})
    train_expert(0, GROUP, WNIDS, data, cfg, tmp_path, "h", progress=False)
    expert, state = load_expert(expert_path(tmp_path, 0), "h", WNIDS)
    held = tiny_data(per_class=20, seed=1)
    m = evaluate_expert(expert, held, GROUP)
    assert m["group_top1"] > 0.8
    assert m["not_in_group_recall"] > 0.6
    assert state["similarity"].shape == (2, 2)


def test_without_multitask_and_without_not_in_group(tmp_path):
    data = tiny_data()
    cfg = tiny_cfg(epochs=1, multitask=False, not_in_group=False)
    train_expert(0, GROUP, WNIDS, data, cfg, tmp_path, "h", progress=False)
    expert, state = load_expert(expert_path(tmp_path, 0), "h", WNIDS)
    x = torch.zeros(2, 3, 12, 12)
    assert expert(x).shape == (2, 2)  # M_j outputs only
    assert state["similarity"] is None
