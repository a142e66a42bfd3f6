"""N-way softmax (Eq. 10), Mixture, end-to-end fine-tuning (Eq. 11), batched experts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmde.core.errors import DmdeValueError, MismatchError
from dmde.fusion.mixture import Mixture, NWaySoftmax, mixture_loss
from dmde.fusion.stacking import GroupLayout, stack


class TinyBackbone(nn.Module):
    """conv-BN-ReLU-pool: (B, 3, H, W) → (B, 4); BN buffers made non-trivial."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.num_features = width
        with torch.no_grad():
            self.bn.running_mean.normal_(0, 0.3)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))  # (B, width)


class TinyHead(nn.Module):
    """W_k = W_0 + V_k plus a not-in-group row (the interface of dmde.experts.multitask's head)."""

    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        self.W0 = nn.Parameter(torch.randn(d) * 0.5)
        self.V = nn.Parameter(torch.randn(m, d) * 0.5)
        self.nig = nn.Parameter(torch.randn(1, d) * 0.5)
        self.bias = nn.Parameter(torch.zeros(m + 1))

    @property
    def class_weights(self) -> torch.Tensor:
        return self.W0 + self.V  # (M, d)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(f, torch.cat([self.class_weights, self.nig]), self.bias)  # (B, M+1)


class TinyExpert(nn.Module):
    def __init__(self, m: int, width: int = 4) -> None:
        super().__init__()
        self.backbone = TinyBackbone(width)
        self.head = TinyHead(width, m)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


EQUAL = [[0, 1, 2], [2, 3, 4], [4, 5, 0]]  # N = 6, every expert M = 3
UNEQUAL = [[0, 1, 2, 3], [3, 4], [4, 5, 0]]  # M_j = 4, 2, 3


def make_mixture(groups, n=6, seed=0, **kw) -> Mixture:
    torch.manual_seed(seed)
    return Mixture([TinyExpert(len(g)) for g in groups], groups, n, **kw)


def images(b=5, seed=1) -> torch.Tensor:
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- N-way


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
@pytest.mark.parametrize("inp", ["upsilon", "log"])
def test_identity_init_keeps_argmax(kind, inp):
    torch.manual_seed(0)
    u = torch.rand(16, 50) * torch.rand(16, 1) * 10
    layer = NWaySoftmax(50, kind=kind, rank=4, input=inp)
    torch.testing.assert_close(layer.weight(), torch.eye(50))
    logits = layer(u)
    assert torch.equal(logits.argmax(1), u.argmax(1))
    expected = torch.log(u / u.sum(1, keepdim=True) + layer.log_eps) if inp == "log" else u
    torch.testing.assert_close(logits, expected)


def test_lowrank_parameters_grow_linearly():
    def count(n: int) -> int:
        return sum(p.numel() for p in NWaySoftmax(n, kind="lowrank", rank=8).parameters())

    assert count(100) == 100 * (2 * 8 + 2)
    assert count(400) == 4 * count(100)
    assert sum(p.numel() for p in NWaySoftmax(100, kind="dense").parameters()) == 100 * 100 + 100


def test_lowrank_forward_matches_dense_weight():
    torch.manual_seed(0)
    layer = NWaySoftmax(30, kind="lowrank", rank=3)
    with torch.no_grad():
        layer.V.normal_()
        layer.diag.uniform_(0.5, 1.5)
    u = torch.rand(4, 30)
    torch.testing.assert_close(layer(u), u @ layer.weight().T + layer.bias)


def test_nway_bad_arguments():
    with pytest.raises(DmdeValueError):
        NWaySoftmax(10, kind="sparse")
    with pytest.raises(DmdeValueError):
        NWaySoftmax(10, input="sqrt")
    with pytest.raises(DmdeValueError):
        NWaySoftmax(10, kind="lowrank", rank=0)


# ------------------------------------------------------------------------------------- Mixture


@pytest.mark.parametrize("variant", ["eq7", "eq7_log", "poe", "stack2", "sum"])
def test_mixture_upsilon_matches_stacking_of_expert_softmaxes(variant):
    mix = make_mixture(UNEQUAL, stacking=variant).eval()
    x = images()
    with torch.no_grad():
        probs = [torch.softmax(e(x), -1) for e in mix.experts]
        layout = GroupLayout.from_groups(UNEQUAL, 6)
        expected = stack(layout.pad_probs(probs), layout, variant)
        torch.testing.assert_close(mix(x), expected)  # nway=None → Υ
        P = mix.expert_probs(x)
    assert P.shape == (5, 3, 5)
    torch.testing.assert_close(P.sum(-1), torch.ones(5, 3))


def test_mixture_with_nway_predicts_argmax_upsilon_at_init():
    mix = make_mixture(EQUAL, nway=NWaySoftmax(6, input="log")).eval()
    with torch.no_grad():
        logits, u = mix(images()), mix.upsilon(images())
    assert logits.shape == (5, 6)
    assert torch.equal(logits.argmax(1), u.argmax(1))


def test_mixture_checks():
    with pytest.raises(MismatchError):
        Mixture([TinyExpert(3)], EQUAL, 6)
    with pytest.raises(MismatchError):
        Mixture([TinyExpert(3) for _ in EQUAL], EQUAL, 6, nway=NWaySoftmax(7))
    with pytest.raises(DmdeValueError):
        Mixture([TinyExpert(3) for _ in EQUAL], EQUAL, 6, stacking="eq8")
    with pytest.raises(DmdeValueError):
        Mixture([TinyExpert(3) for _ in EQUAL], EQUAL, 6, stacking="eq7_log",
                nway=NWaySoftmax(6, input="log"))
    mix = Mixture([TinyExpert(2) for _ in EQUAL], EQUAL, 6)  # heads too small for the groups
    with pytest.raises(MismatchError):
        mix(images())


# ------------------------------------------------------------------------------------- Eq. 11


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_end_to_end_gradient_reaches_A_heads_and_cnns(kind):
    mix = make_mixture(UNEQUAL, nway=NWaySoftmax(6, kind=kind, rank=2, input="log")).train()
    loss, parts = mixture_loss(mix, images(8), torch.arange(8) % 6, expert_terms=True)
    loss.backward()
    assert parts["loss"] > parts["ce"] > 0
    a_grad = mix.nway.A.grad if kind == "dense" else mix.nway.V.grad
    assert a_grad is not None and a_grad.abs().sum() > 0
    for e in mix.experts:
        assert e.backbone.conv.weight.grad.abs().sum() > 0
        for p in e.head.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_mixture_loss_without_nway_and_without_expert_terms():
    mix = make_mixture(EQUAL)
    loss, parts = mixture_loss(mix, images(4), torch.tensor([0, 1, 2, 3]), expert_terms=False)
    loss.backward()
    assert set(parts) == {"ce", "loss"} and parts["ce"] == pytest.approx(parts["loss"])
    assert mix.experts[0].backbone.conv.weight.grad.abs().sum() > 0


def test_mixture_loss_laplacian_term():
    mix = make_mixture(EQUAL)
    S = [torch.ones(3, 3) - torch.eye(3) for _ in EQUAL]
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    with_s, parts = mixture_loss(mix, x, y, similarities=S, delta1=0.0, delta2=1.0)
    # Tr(W L Wᵀ) = ½ Σ_{k,l} S_kl ‖W_k − W_l‖²
    expected = 0.0
    for e in mix.experts:
        W = e.head.class_weights
        expected += 0.5 * float(((W[:, None] - W[None]) ** 2).sum().detach())
    assert parts["laplacian_trace"] == pytest.approx(expected, rel=1e-4)
    assert float(with_s.detach()) == pytest.approx(parts["ce"] + 0.5 * expected, rel=1e-4)


# ------------------------------------------------------------------------------------- batched

# (groups, Mixture(batched=...), the implementation it must pick)
MODES = [(EQUAL, "vmap", "vmap"), (UNEQUAL, "vmap", "vmap_backbone"), (EQUAL, "wide", "wide"),
         (UNEQUAL, True, "wide")]


@pytest.mark.parametrize("groups, how, mode", MODES)
def test_batched_equals_loop_eval_with_batchnorm(groups, how, mode):
    loop = make_mixture(groups, nway=NWaySoftmax(6, kind="lowrank", rank=2)).eval()
    batched = make_mixture(groups, nway=NWaySoftmax(6, kind="lowrank", rank=2), batched=how)
    batched.load_state_dict(loop.state_dict())
    batched.eval()
    assert batched.batch_mode() == mode and loop.batch_mode() == "loop"
    x = images(6)
    out_loop, out_batched = loop(x), batched(x)
    torch.testing.assert_close(out_batched, out_loop, rtol=1e-5, atol=1e-5)
    # gradients flow back to every expert's own parameters through the stacked copy
    out_loop.square().sum().backward()
    out_batched.square().sum().backward()
    for (n, p), q in zip(loop.named_parameters(), batched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("groups, how, mode", MODES)
def test_batched_equals_loop_in_training_with_batchnorm(groups, how, mode):
    """Train mode: batch statistics per expert, running statistics written back, equal gradients."""
    loop = make_mixture(groups, nway=NWaySoftmax(6, input="log")).train()
    batched = make_mixture(groups, nway=NWaySoftmax(6, input="log"), batched=how).train()
    batched.load_state_dict(loop.state_dict())
    assert batched.batch_mode() == mode
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (loop, batched)]
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    for step in range(3):  # several steps: the optimiser's in-place updates must be seen
        x = images(6, seed=10 + step)
        for m, opt in zip((loop, batched), opts):
            opt.zero_grad()
            mixture_loss(m, x, y)[0].backward()
        for (n, p), q in zip(loop.named_parameters(), batched.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
        for opt in opts:
            opt.step()
    for (n, b), c in zip(loop.named_buffers(), batched.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=n)  # running stats, counters
    assert int(batched.experts[0].backbone.bn.num_batches_tracked) == 3


def test_batched_falls_back_to_loop_for_cumulative_batchnorm_and_mixed_shapes():
    mix = make_mixture(EQUAL, batched=True).train()
    for e in mix.experts:
        e.backbone.bn.momentum = None  # cumulative average reads num_batches_tracked as a number
    assert mix.batch_mode() == "loop"
    before = mix.experts[0].backbone.bn.running_mean.clone()
    mix(images())
    assert not torch.equal(before, mix.experts[0].backbone.bn.running_mean)  # stats updated
    assert mix.eval().batch_mode() == "wide"  # eval mode reads the statistics only
    mix.batched = "vmap"
    assert mix.batch_mode() == "vmap"
    mix.batched = "wide"
    with pytest.raises(DmdeValueError, match="cumulative"):
        mix.train().batch_mode()
    mixed = Mixture([TinyExpert(3, width=4), TinyExpert(3, width=5), TinyExpert(3)], EQUAL, 6,
                    batched=True).eval()
    assert mixed.batch_mode() == "loop"  # different shapes


@pytest.mark.parametrize("request_", ["vmap", "wide"])
def test_stack_cache_reused_in_inference_and_invalidated_by_changes(request_):
    loop = make_mixture(EQUAL).eval()
    mix = make_mixture(EQUAL, batched=request_).eval()
    x = images(4)
    mix(x[:1])  # the wide network is built (and checked) on its first batch
    cache = mix._stack_cache if request_ == "vmap" else mix._wide.cache
    cache.clear()
    cache.hits = cache.misses = 0
    with torch.no_grad():
        first = mix(x)
        misses = cache.misses
        assert misses > 0 and cache.hits == 0
        torch.testing.assert_close(mix(x), first)
        assert cache.misses == misses and cache.hits == misses  # second call: every tensor cached
        mix.experts[1].backbone.conv.weight.mul_(2.0)  # in place: version bump
        loop.load_state_dict(mix.state_dict())
        torch.testing.assert_close(mix(x), loop(x), rtol=1e-5, atol=1e-5)
        assert cache.misses == misses + 1  # only the changed tensor is joined again
        mix.load_state_dict(make_mixture(EQUAL, seed=3).state_dict())  # copy_: version bumps
        loop.load_state_dict(mix.state_dict())
        torch.testing.assert_close(mix(x), loop(x), rtol=1e-5, atol=1e-5)
    mix.double()  # new storage
    with torch.inference_mode():
        out = mix(x.double())
    assert out.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(out.float(), loop(x), rtol=1e-5, atol=1e-5)
    # parameters that need a gradient are never taken from the cache
    mix.float()(x).sum().backward()
    assert all(p.grad is not None for p in mix.parameters())
    mix.clear_stack_cache()
    assert not cache.entries or request_ == "wide"  # .float() rebuilt the wide network


def test_stack_cache_for_frozen_parameters_during_training():
    loop = make_mixture(UNEQUAL).train()
    mix = make_mixture(UNEQUAL, batched="vmap").train()
    mix.load_state_dict(loop.state_dict())
    for m in (loop, mix):
        for e in m.experts:
            e.backbone.conv.weight.requires_grad_(False)  # a frozen trunk
    x = images(6)
    for _ in range(2):
        out_loop, out = loop(x), mix(x)
        torch.testing.assert_close(out, out_loop, rtol=1e-5, atol=1e-5)
        out_loop.sum().backward()
        out.sum().backward()
    assert "backbone.conv.weight" in mix._stack_cache.entries and mix._stack_cache.hits >= 1
    for (n, p), q in zip(loop.named_parameters(), mix.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)


def real_experts(groups, seed=0, **kw):
    from dmde.experts.expert import Expert

    torch.manual_seed(seed)
    return [Expert.build("small_cnn", len(g), width=4, **kw) for g in groups]


@pytest.mark.parametrize("groups, how, mode", MODES)
def test_batched_equals_loop_with_dmde_experts(groups, how, mode):
    loop = Mixture(real_experts(groups), groups, 6).eval()
    batched = Mixture(real_experts(groups), groups, 6, batched=how).eval()
    for e in loop.experts:  # non-trivial BatchNorm statistics
        for m in e.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    batched.load_state_dict(loop.state_dict())
    assert batched.batch_mode() == mode
    x = images(3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(batched(x), loop(x), rtol=1e-5, atol=1e-5)


def test_end_to_end_with_dmde_experts():
    from dmde.experts.multitask import MultiTaskHead

    mix = Mixture(real_experts(UNEQUAL), UNEQUAL, 6, nway=NWaySoftmax(6, input="log")).train()
    assert all(isinstance(e.head, MultiTaskHead) for e in mix.experts)
    S = [torch.rand(len(g), len(g)) for g in UNEQUAL]
    loss, parts = mixture_loss(mix, images(8), torch.arange(8) % 6, similarities=S)
    loss.backward()
    assert parts["laplacian_trace"] > 0 and parts["weight_norm"] > 0
    assert mix.nway.A.grad.abs().sum() > 0
    for e in mix.experts:
        assert e.backbone.stem[0].weight.grad.abs().sum() > 0  # the CNN's first conv
        for name, p in e.head.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name



@pytest.mark.parametrize("groups", [EQUAL, UNEQUAL])
def test_end_to_end_batched_training_equals_loop_with_dmde_experts(groups):
    """Eq. 11 in training mode with small_cnn experts: same loss, gradients and BN statistics."""
    S = [torch.rand(len(g), len(g)) for g in groups]
    loop = Mixture(real_experts(groups), groups, 6, nway=NWaySoftmax(6, input="log")).train()
    batched = Mixture(real_experts(groups), groups, 6, nway=NWaySoftmax(6, input="log"), batched=True).train()
    batched.load_state_dict(loop.state_dict())
    assert batched.batch_mode() != "loop"
    x, y = images(8, seed=7), torch.arange(8) % 6
    l_loop, p_loop = mixture_loss(loop, x, y, similarities=S)
    l_b, p_b = mixture_loss(batched, x, y, similarities=S)
    assert p_b["loss"] == pytest.approx(p_loop["loss"], rel=1e-5)
    l_loop.backward()
    l_b.backward()
    for (n, p), q in zip(loop.named_parameters(), batched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=n)
    for (n, b), c in zip(loop.named_buffers(), batched.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=n)
