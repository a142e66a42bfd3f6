"""The N-way layer and early fusion train through the one loop (``training.fit``): per-epoch
checkpoints, a resume equal to an uninterrupted run, and the numbers of the hand-written Adam
loops they replaced (written out here as the known answer); the temperature τ of the fused scores."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dmde.core.training as training
from dmde.core.checkpoint import load_checkpoint
from dmde.core.errors import DmdeValueError, MismatchError
from dmde.core.training import ImageTensors, Salt, mix_seed, predict_logits
from dmde.experts.expert import Expert
from dmde.fusion.calibration import fit_pool_temperature
from dmde.fusion.mixture import Mixture, NWaySoftmax
from dmde.run.config import BaselinesConfig, FusionConfig, RunConfig, validate
from dmde.run.stages import _fusion
from dmde.run.trainers import train_early_fusion, train_fusion

N = 6
GROUPS = [[0, 1, 2], [2, 3, 4], [4, 5, 0]]


def _experts() -> list[nn.Module]:
    torch.manual_seed(0)
    return [Expert.build("small_cnn", len(g), width=4).eval() for g in GROUPS]


def _data(n_per_class: int = 7) -> ImageTensors:
    g = torch.Generator().manual_seed(1)
    targets = torch.arange(N).repeat_interleave(n_per_class)
    return ImageTensors(torch.randint(0, 256, (len(targets), 3, 12, 12), dtype=torch.uint8, generator=g), targets)


def _old_nway_loop(experts, data, f: FusionConfig) -> dict[str, torch.Tensor]:
    """The N-way layer's training as it was before it went through ``fit``."""
    mixture = Mixture(list(experts), GROUPS, N, stacking=f.stacking, eps=f.eps, lam=f.lam).eval()
    ups = predict_logits(mixture.upsilon, data)
    torch.manual_seed(mix_seed(Salt.NWAY_INIT, N))
    nway = NWaySoftmax(N, kind=f.nway, rank=f.rank, input=f.input)
    init = {k: v.clone() for k, v in nway.state_dict().items()}
    opt = torch.optim.Adam(nway.parameters(), lr=f.lr)
    g = torch.Generator().manual_seed(mix_seed(Salt.NWAY_ORDER, N))
    y = data.targets
    for _ in range(f.epochs):
        order = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), f.batch_size):
            b = order[s : s + f.batch_size]
            loss = F.cross_entropy(nway(ups[b]), y[b])
            loss = loss + f.identity_l2 * sum(((p - init[k]) ** 2).sum() for k, p in nway.named_parameters())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return nway.state_dict()


@pytest.mark.parametrize("kind", ["lowrank", "dense"])
def test_nway_layer_through_fit_gives_the_old_loops_weights(kind, tmp_path):
    f = FusionConfig(nway=kind, rank=2, epochs=4, batch_size=8, lr=0.01, identity_l2=0.01)
    experts, data = _experts(), _data()
    metrics = train_fusion(tmp_path / "fusion.pt", experts, GROUPS, N, data, f, torch.device("cpu"), False)
    state = load_checkpoint(tmp_path / "fusion.pt")
    want = _old_nway_loop(experts, data, f)
    assert state["kind"] == "nway" and state["model"].keys() == want.keys()
    for k in want:
        assert torch.equal(state["model"][k], want[k]), k
    assert state["metrics"] == metrics and "optimizer" not in state  # what evaluation loads: the layer
    assert {"fusion_train_acc", "upsilon_train_acc", "train_loss"} <= set(metrics)
    assert not (tmp_path / "fusion.train.pt").exists()  # the training checkpoint is dropped once done
    lines = (tmp_path / "fusion.train.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]  # one line per epoch


def test_nway_layer_with_no_epochs_is_the_identity_map(tmp_path):
    f = FusionConfig(nway="lowrank", rank=2, epochs=0)
    train_fusion(tmp_path / "fusion.pt", _experts(), GROUPS, N, _data(), f, torch.device("cpu"), False)
    torch.manual_seed(mix_seed(Salt.NWAY_INIT, N))
    init = NWaySoftmax(N, kind="lowrank", rank=2, input=f.input).state_dict()
    got = load_checkpoint(tmp_path / "fusion.pt")["model"]
    assert all(torch.equal(got[k], init[k]) for k in init)


@pytest.mark.parametrize("crash", ["after", "before"])
def test_nway_layer_resumed_after_a_crash_equals_an_uninterrupted_run(crash, tmp_path, monkeypatch):
    """A crash after epoch 2's checkpoint, or between epoch 3's log line and its checkpoint (the
    line then goes: the resumed run writes it again)."""
    f = FusionConfig(nway="lowrank", rank=2, epochs=4, batch_size=8, lr=0.01, calibrate="temperature_bias",
                     pool_temperature="fit")
    experts, data = _experts(), _data()
    train_fusion(tmp_path / "a.pt", experts, GROUPS, N, data, f, torch.device("cpu"), False)

    real = training.save_checkpoint
    calls = {"n": 0}

    def crash_at(p, state):
        calls["n"] += 1
        if crash == "before" and calls["n"] == 3:
            raise KeyboardInterrupt
        real(p, state)
        if crash == "after" and calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", crash_at)
    with pytest.raises(KeyboardInterrupt):
        train_fusion(tmp_path / "b.pt", _experts(), GROUPS, N, data, f, torch.device("cpu"), False)
    assert load_checkpoint(tmp_path / "b.train.pt")["epoch"] == 2 and not (tmp_path / "b.pt").exists()
    assert len((tmp_path / "b.train.jsonl").read_text().splitlines()) == (3 if crash == "before" else 2)
    monkeypatch.setattr(training, "save_checkpoint", real)
    train_fusion(tmp_path / "b.pt", _experts(), GROUPS, N, data, f, torch.device("cpu"), False)
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert float(a["model"]["scale"]) != 1.0  # τ fitted, kept through training and the resume
    assert torch.equal(a["temperature"], b["temperature"]) and torch.equal(a["nig_bias"], b["nig_bias"])
    assert a["metrics"] == {**b["metrics"], "seconds": a["metrics"]["seconds"],
                            "images_per_s": a["metrics"]["images_per_s"]}
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "b.train.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_early_fusion_through_fit_gives_the_old_loops_classifier(tmp_path):
    cfg = RunConfig(baselines=BaselinesConfig(early_fusion=True, early_fusion_epochs=3), progress=False)
    experts, data = _experts(), _data()
    train_early_fusion(tmp_path / "early_fusion.pt", experts, data, N, cfg, torch.device("cpu"), False)
    got = load_checkpoint(tmp_path / "early_fusion.pt")["model"]

    # the known answer: the loop it replaced, on the same standardised features
    feats = predict_logits(lambda x: torch.cat([e.features(x) for e in experts], 1), data)
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd
    torch.manual_seed(mix_seed(Salt.EARLY_FUSION_INIT, N))
    nn.Linear(z.shape[1], N)  # (EarlyFusion's own classifier draws first)
    lin = nn.Linear(z.shape[1], N)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(mix_seed(Salt.EARLY_FUSION_ORDER, N))
    for _ in range(3):
        order = torch.randperm(len(z), generator=g)
        for s in range(0, len(z), 256):
            b = order[s : s + 256]
            loss = F.cross_entropy(lin(z[b]), data.targets[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    w = lin.weight.detach() / sd
    assert torch.equal(got["weight"], w) and torch.equal(got["bias"], lin.bias.detach() - w @ mu)
    assert len((tmp_path / "early_fusion.train.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "early_fusion.train.pt").exists()


def test_constant_rate_after_the_warm_up_and_adam_takes_an_l2_term():
    from dmde.core.training import OptimConfig, lr_at, make_optimizer

    cfg = OptimConfig(lr=0.1, warmup_epochs=1)
    assert lr_at(cfg, 0, 100, 10, constant=True) == pytest.approx(0.01)  # warm-up: step 1 of 10
    assert lr_at(cfg, 50, 100, 10, constant=True) == 0.1 and lr_at(cfg, 99, 100, 10, constant=True) == 0.1
    assert lr_at(cfg, 55, 100, 10) == pytest.approx(0.05)  # cosine: half-way through the decay
    p = nn.Parameter(torch.ones(2))
    opt = make_optimizer(OptimConfig(optimizer="adam", lr=0.1, weight_decay=0.5), [p])
    assert type(opt) is torch.optim.Adam and opt.defaults["weight_decay"] == 0.5


# ---- the temperature τ of the fused scores (fusion.pool_temperature): its fit recovers a known
# temperature, it scales the N-way layer's input without moving argmax Υ, layers saved before it
# existed load unchanged, and the fusion stage fits it on the fusion split
@pytest.mark.parametrize("tau", [0.25, 0.6, 2.0])
def test_fit_recovers_the_temperature_the_labels_were_drawn_with(tau):
    g = torch.Generator().manual_seed(0)
    z = 3.0 * torch.randn(20000, 10, generator=g)
    y = torch.multinomial(torch.softmax(tau * z, -1), 1, generator=g).squeeze(1)
    assert fit_pool_temperature(z, y) == pytest.approx(tau, rel=0.05)


def test_fit_is_deterministic_and_checks_its_shapes():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(300, 5, generator=g), torch.randint(0, 5, (300,), generator=g)
    assert fit_pool_temperature(z, y) == fit_pool_temperature(z.clone(), y.clone())
    with pytest.raises(MismatchError):
        fit_pool_temperature(z, y[:-1])
    with pytest.raises(MismatchError):
        fit_pool_temperature(z[0], y[:1])


def test_fit_on_many_scores_takes_a_seeded_sample_of_rows(monkeypatch):
    import dmde.fusion.calibration as calibration

    g = torch.Generator().manual_seed(2)
    z = 3.0 * torch.randn(4000, 10, generator=g)
    y = torch.multinomial(torch.softmax(0.5 * z, -1), 1, generator=g).squeeze(1)
    monkeypatch.setattr(calibration, "POOL_FIT_ELEMENTS", 10 * 1000)  # 1,000 of the 4,000 rows
    keep = torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:1000]
    assert fit_pool_temperature(z, y) == fit_pool_temperature(z[keep], y[keep]) != fit_pool_temperature(z[:1000], y[:1000])
    assert fit_pool_temperature(z, y) == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_the_scale_multiplies_the_input_and_keeps_argmax_at_init(kind):
    torch.manual_seed(0)
    layer = NWaySoftmax(7, kind=kind, rank=2, input="upsilon")
    u = torch.randn(9, 7)
    base = layer(u)
    layer.scale.fill_(0.3)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(7.0))
    # A = I at init (U·Vᵀ = 0 for lowrank): logits = τ·z + b
    assert torch.allclose(layer(u), 0.3 * u + torch.arange(7.0), atol=1e-6)
    assert torch.allclose(base, u, atol=1e-6)
    with torch.no_grad():
        layer.bias.zero_()
    assert torch.equal(layer(u).argmax(1), u.argmax(1))


def test_layers_saved_before_the_scale_existed_load_with_scale_one():
    torch.manual_seed(0)
    layer = NWaySoftmax(5, kind="lowrank", rank=2, input="log")
    assert layer.state_dict()._metadata[""]["version"] == 2  # saved with it: a missing key is then an error
    old = {k: v for k, v in layer.state_dict().items() if k != "scale"}
    fresh = NWaySoftmax(5, kind="lowrank", rank=2, input="log")
    fresh.scale.fill_(4.0)
    fresh.load_state_dict(old)  # strict: no missing key
    assert float(fresh.scale) == 1.0
    u = torch.rand(3, 5)
    assert torch.equal(fresh(u), layer(u))
    saved = layer.state_dict()
    del saved["scale"]  # a file that was written with τ and lost it is refused, not read as τ = 1
    with pytest.raises(RuntimeError, match="scale"):
        fresh.load_state_dict(saved)
    # the same inside a whole mixture (a fine-tuned mixture.pt of an older run)
    mix = Mixture(_experts(), GROUPS, N, stacking="poe", nway=NWaySoftmax(N, kind="lowrank", rank=2, input="upsilon"))
    state = {k: v for k, v in mix.state_dict().items() if k != "nway.scale"}
    mix.nway.scale.fill_(2.0)
    mix.load_state_dict(state)
    assert float(mix.nway.scale) == 1.0


@pytest.mark.parametrize("pool", ["none", "fit"])
def test_the_fusion_stage_fits_tau_on_its_split(pool, tmp_path):
    f = FusionConfig(stacking="poe", nway="lowrank", rank=2, epochs=0, pool_temperature=pool)
    experts, data = _experts(), _data()
    metrics = train_fusion(tmp_path / "fusion.pt", experts, GROUPS, N, data, f, torch.device("cpu"), False)
    state = load_checkpoint(tmp_path / "fusion.pt")
    mixture = Mixture(list(experts), GROUPS, N, stacking="poe").eval()
    ups = predict_logits(mixture.upsilon, data)
    want = fit_pool_temperature(ups, data.targets) if pool == "fit" else 1.0
    assert float(state["model"]["scale"]) == pytest.approx(want, rel=1e-6)
    assert metrics["pool_temperature"] == pytest.approx(want, rel=1e-6)
    # with no epochs the layer is τ·Υ: argmax Υ, and the cross-entropy of the fitted τ
    torch.manual_seed(mix_seed(Salt.NWAY_INIT, N))
    layer = NWaySoftmax(N, kind="lowrank", rank=2, input="upsilon")
    layer.load_state_dict(state["model"])
    with torch.no_grad():
        out = layer(ups)
    assert torch.equal(out.argmax(1), ups.argmax(1))
    if pool == "fit":  # the minimum of the cross-entropy over τ, against a fine grid
        grid = min(float(F.cross_entropy(t * ups, data.targets)) for t in torch.linspace(0.01, 5.0, 500))
        assert float(F.cross_entropy(out, data.targets)) <= grid + 1e-4


def test_config_checks_and_the_stage_hash_of_the_default():
    cfg = RunConfig()
    assert "pool_temperature" not in _fusion(cfg)[0]  # the default leaves every existing run's hash as it was
    cfg.fusion.pool_temperature = "fit"
    assert _fusion(cfg)[0]["pool_temperature"] == "fit"
    validate(cfg)
    cfg.fusion.nway = "none"
    with pytest.raises(DmdeValueError, match="fusion.pool_temperature='fit' scales the N-way layer's input"):
        validate(cfg)
    cfg.fusion.nway, cfg.fusion.pool_temperature = "lowrank", "auto"
    with pytest.raises(DmdeValueError, match="is not one of none, fit"):
        validate(cfg)


def test_the_finetuning_data_enters_only_the_finetuning_hash_and_needs_a_fusion_split():
    cfg = RunConfig()
    fusion, finetune = _fusion(cfg)
    assert "finetune_data" not in fusion and "data" not in finetune  # the default keeps every run's hashes
    cfg.fusion.finetune_data = "fusion"
    assert _fusion(cfg) == (fusion, {**finetune, "data": "fusion"})
    with pytest.raises(DmdeValueError, match="needs data.fusion_per_class ≥ 1"):
        validate(cfg)  # RunConfig() keeps no fusion split
    cfg.data.fusion_per_class = 5
    validate(cfg)
    cfg.fusion.finetune.epochs = 0
    cfg.data.fusion_per_class = 0
    validate(cfg)  # no fine-tuning: nothing to check
    cfg.fusion.finetune_data = "holdout"
    with pytest.raises(DmdeValueError, match="fusion.finetune_data='holdout' is not one of all, fusion"):
        validate(cfg)


def test_a_negative_not_in_group_ratio_is_refused_before_any_work():
    cfg = RunConfig()
    cfg.experts.not_in_group_ratio = -0.5
    with pytest.raises(DmdeValueError, match=r"experts.not_in_group_ratio=-0.5 must be at least 0"):
        validate(cfg)
    cfg.experts.not_in_group_ratio = 0.0  # no not-in-group images at all: allowed
    validate(cfg)
