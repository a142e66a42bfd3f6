"""The stage table (dmde.run.stages): one place for names, order, reads, outputs and hashes."""
from __future__ import annotations

import dataclasses

import pytest

from dmde.run.config import RunConfig
from dmde.run.stages import BY_NAME, OUTPUTS, STAGES, TABLE, shareable, stage_hashes


def _downstream(name: str) -> set[str]:
    """Every stage whose hash depends on ``name``'s, by the table's ``reads``."""
    out, grew = {name}, True
    while grew:
        grew = False
        for s in TABLE:
            if s.name not in out and any(r in out for r in s.reads):
                out.add(s.name)
                grew = True
    return out


def test_order_reads_and_outputs_come_from_one_table():
    assert STAGES == tuple(s.name for s in TABLE) and STAGES[0] == "ontology" and STAGES[-1] == "evaluate"
    for s in TABLE:
        assert set(s.reads) <= set(STAGES) and s.outputs and OUTPUTS[s.name] == list(s.outputs)
    # a stage runs after what it reads, except the warm start's flat model (run first on demand)
    for s in TABLE:
        assert all(STAGES.index(r) < STAGES.index(s.name) for r in s.reads if (s.name, r) != ("experts", "flat"))
    assert "evaluate" not in shareable() and set(shareable()) == set(STAGES) - {"evaluate"}


def test_the_train_command_offers_exactly_the_table_as_until():
    from dmde.cli.main import build_parser

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions if a.dest == "until")
    assert tuple(train.choices) == STAGES


#: The default config's stage hashes as computed before the stage table existed (the hub's
#: hand-written function): the table reproduces them, so no finished run has to redo a stage.
PINNED = {"ontology": "ead00c35ba8eafc0", "groups": "15fbcd4c2cba6d9e", "flat": "245c4f75fb00972b",
          "experts": "00d78660876644fb", "fusion": "920948ada4936bf0", "finetune": "9e26366ad812fcff",
          "flat_wide": "cf6aa28d6b3efdb5", "ensemble": "73b5f7ebce82852c", "early_fusion": "e1362478e1ae721b",
          "evaluate": "892e12f46a3c8de8"}


def test_hashes_of_the_default_config_are_pinned():
    """Changing how a hash is computed makes every user's finished run redo its stages: these
    values may only change on purpose."""
    assert stage_hashes(RunConfig()) == PINNED


@pytest.mark.parametrize("section, key, value, changed", [
    ("ontology", "categories", 7, "ontology"),
    ("groups", "size", 3, "groups"),
    ("experts", "lr", 0.123, "experts"),
    ("fusion", "lr", 0.123, "fusion"),
    ("baselines", "early_fusion_epochs", 9, "early_fusion"),
])
def test_a_setting_changes_its_stage_and_what_reads_it_only(section, key, value, changed):
    base = RunConfig()
    cfg = dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section), **{key: value})})
    a, b = stage_hashes(base), stage_hashes(cfg)
    moved = {k for k in a if a[k] != b[k]}
    expect = _downstream(changed)
    if section == "experts":  # the flat model trains with the experts' optimiser settings
        expect |= _downstream("flat")
    assert moved == expect


def test_the_warm_start_ties_the_experts_to_the_flat_model():
    base = RunConfig()
    warm = dataclasses.replace(base, experts=dataclasses.replace(base.experts, init="flat"))
    longer = dataclasses.replace(warm, baselines=dataclasses.replace(warm.baselines, epochs=3))
    assert stage_hashes(warm)["experts"] != stage_hashes(longer)["experts"]  # flat changed → experts redo
    assert stage_hashes(base)["experts"] == stage_hashes(
        dataclasses.replace(base, baselines=dataclasses.replace(base.baselines, epochs=3)))["experts"]
    assert BY_NAME["flat"].enabled(warm) and not BY_NAME["ensemble"].enabled(warm)
