"""All experts as one wide network (dmde.fusion.batched): equal to the loop, or refused and not used."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmde.core.errors import DmdeValueError
from dmde.experts.expert import Expert
from dmde.fusion.batched import WideBackbones, wide_support
from dmde.fusion.mixture import Mixture, NWaySoftmax, mixture_loss

GROUPS = [[0, 1, 2, 3], [3, 4], [4, 5, 0]]  # unequal M_j: the heads stay per expert


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomise_norms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, different per expert."""
    g = gen(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def pair(build, groups=GROUPS, n=6, how="wide", **mix_kw):
    """Two mixtures with equal weights: a loop and a batched one."""
    experts = []
    for j, g in enumerate(groups):
        torch.manual_seed(j)
        e = build(len(g))
        randomise_norms(e, seed=j)
        experts.append(e)
    loop = Mixture(experts, groups, n, **mix_kw)
    torch.manual_seed(0)
    batched = Mixture([build(len(g)) for g in groups], groups, n, batched=how, **mix_kw)
    batched.load_state_dict(loop.state_dict())
    return loop, batched


def assert_same_grads(a: nn.Module, b: nn.Module, relative: float | None = None) -> None:
    """Equal gradients (``relative``: max |Δ| ≤ relative × the model's largest |grad|)."""
    pairs = [(n, p.grad, q.grad) for (n, p), q in zip(a.named_parameters(), b.parameters())]
    for n, g, h in pairs:
        assert (g is None) == (h is None), n
    scale = max(g.abs().max().item() for _, g, _ in pairs if g is not None)
    for n, g, h in pairs:
        if g is None:
            continue
        if relative is None:
            torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-5, msg=n)
        else:
            err = (h - g).abs().max().item()
            assert err <= relative * scale, (n, err, scale)


def lite0_expert(m: int, stages: int = 2) -> Expert:
    e = Expert.build("efficientnet_lite0", m, pretrained=False, freeze_trunk=True, trainable_stages=stages)
    return e


def test_lite0_body_over_cached_trunk_equals_the_loop():
    """Depthwise and 'SAME'-padded stride-2 convolutions, 1×1 convolutions as one batched product,
    residual additions, ReLU6: outputs and gradients equal the loop's (BatchNorm in eval mode);
    in training mode the loss and the running statistics do. (Training-mode gradients are only
    compared for small_cnn below: here BatchNorm's statistics over 8 × 2 × 2 values of untrained
    channels amplify float32 rounding to ~1e-2 of the largest gradient in either implementation.)"""
    loop, batched = pair(lambda m: lite0_expert(m, stages=2), nway=NWaySoftmax(6, input="log"))
    for m in (loop, batched):
        for e in m.experts:
            e.backbone.use_cached_trunk(True)
    trunk = loop.experts[0].backbone.trunk.eval()
    with torch.no_grad():
        t = trunk(torch.randn(8, 3, 64, 64, generator=gen(3)))  # (8, 112, 4, 4): the cached input
    y = torch.arange(8) % 6
    loop.eval(), batched.eval()
    assert batched.batch_mode() == "wide"
    for m in (loop, batched):
        mixture_loss(m, t, y)[0].backward()
    assert_same_grads(loop, batched, relative=1e-4)
    loop.train(), batched.train()
    losses = [mixture_loss(m, t, y)[1]["loss"] for m in (loop, batched)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for (n, b), c in zip(loop.named_buffers(), batched.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=n)  # running stats, counters
    assert int(batched.experts[1].backbone.body[0][0].bn0.num_batches_tracked) == 1
    # the wide network covers the body only: no frozen trunk tensor was ever joined
    assert all(p is e.backbone.body for p, e in zip(batched._wide_key[0], batched.experts))


def test_whole_backbone_with_linear_layers_in_eval():
    """AlexNet's FC6/FC7 run as per-expert products on the (B, G, in) view; conv1 on the shared image."""
    def build(m: int) -> Expert:
        return Expert.build("alexnet", m, width_mult=0.05, fc_dim=16)

    loop, batched = pair(build)
    loop.eval(), batched.eval()
    x = torch.randn(3, 3, 64, 64, generator=gen(1))
    with torch.no_grad():
        torch.testing.assert_close(batched(x), loop(x), rtol=1e-4, atol=1e-5)
    assert batched.batch_mode() == "wide"


class SharedDepthwise(nn.Module):
    """A depthwise convolution and a Linear that read the shared input directly."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(3, 6, 3, padding=1, groups=3)
        self.bn = nn.BatchNorm2d(6)
        self.num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.dw(x))).amax(dim=(2, 3))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(1), nn.Linear(3 * 4 * 4, 5), nn.GELU(), nn.Linear(5, 4))
        self.num_features = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("backbone", [SharedDepthwise, MLP])
def test_layers_on_the_shared_input(backbone):
    def build(m: int) -> Expert:
        e = Expert.__new__(Expert)
        nn.Module.__init__(e)
        e.backbone = backbone()
        e.head = nn.Linear(e.backbone.num_features, m + 1)
        return e

    loop, batched = pair(build)
    x = torch.randn(5, 3, 4, 4, generator=gen(2))
    loop.train(), batched.train()
    a, b = loop(x), batched(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    assert_same_grads(loop, batched)
    assert batched.batch_mode() == "wide"


class ChannelShuffle(nn.Module):
    """Reads channels by position: widening it silently would mix the experts' channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.num_features = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.flip(1).mean(dim=(2, 3))  # reversed channel order


def shuffle_expert(m: int) -> Expert:
    e = Expert.__new__(Expert)
    nn.Module.__init__(e)
    e.backbone = ChannelShuffle()
    e.head = nn.Linear(4, m + 1)
    return e


def test_a_forward_that_reorders_channels_fails_the_check_and_is_not_used():
    loop, auto = pair(shuffle_expert, how=True)
    x = torch.randn(4, 3, 5, 5, generator=gen(4))
    with torch.no_grad():
        torch.testing.assert_close(auto(x), loop(x))  # the check failed: vmap took over
        assert auto.batch_mode() == "vmap_backbone"
    _, strict = pair(shuffle_expert, how="wide")
    with pytest.raises(DmdeValueError, match="differs from the loop"):
        strict(x)


def test_unknown_parametrised_layers_are_refused():
    class WithLayerNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.norm = nn.GroupNorm(2, 4)

        def forward(self, x):
            return self.norm(self.conv(x)).mean(dim=(2, 3))

    mods = [WithLayerNorm() for _ in range(2)]
    assert "norm (GroupNorm)" in wide_support(mods)
    assert "structure" in wide_support([WithLayerNorm(), ChannelShuffle()])
    assert wide_support(mods[:1]) is not None
    with pytest.raises(ValueError, match="GroupNorm"):
        WideBackbones(mods)


def test_small_cnn_train_steps_equal_the_loop():
    def build(m: int) -> Expert:
        return Expert.build("small_cnn", m, width=4)

    loop, batched = pair(build, nway=NWaySoftmax(6, kind="lowrank", rank=2, input="log"))
    loop.train(), batched.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (loop, batched)]
    y = torch.arange(6)
    for step in range(3):
        x = torch.randn(6, 3, 16, 16, generator=gen(10 + step))
        for m, opt in zip((loop, batched), opts):
            opt.zero_grad()
            mixture_loss(m, x, y)[0].backward()
        assert_same_grads(loop, batched)
        for opt in opts:
            opt.step()
    for (n, b), c in zip(loop.named_buffers(), batched.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=n)
    assert int(batched.experts[2].backbone.stem[1].num_batches_tracked) == 3


def test_no_weights_to_widen_or_mixed_modes_fall_back_to_the_loop():
    """Findings of review: a body of pooling only (nothing to widen) and experts whose layers are in
    different train/eval modes must not run wide."""
    def empty_body(m: int) -> Expert:
        return Expert.build("small_cnn", m, width=4, freeze_trunk=True, trainable_stages=0)

    loop, auto = pair(empty_body, how=True)
    for m in (loop, auto):
        for e in m.experts:
            e.backbone.use_cached_trunk(True)
    t = torch.randn(4, 16, 2, 2, generator=gen(5))
    assert "no layers" in wide_support(auto._wide_parts())
    with torch.no_grad():
        torch.testing.assert_close(auto(t), loop(t))

    def small(m: int) -> Expert:
        return Expert.build("small_cnn", m, width=4)

    loop, auto = pair(small, how=True)
    loop.train(), auto.train()
    auto.experts[1].backbone.stem.eval()  # expert 1's stem reads its running statistics
    loop.experts[1].backbone.stem.eval()
    assert "train/eval" in wide_support(auto._wide_parts())
    x = torch.randn(4, 3, 8, 8, generator=gen(6))
    torch.testing.assert_close(auto(x), loop(x), rtol=1e-5, atol=1e-5)
    assert auto.batch_mode() != "wide"
    auto.train()  # the same modes again: wide is back
    assert auto.batch_mode() == "wide"


def test_dropout_on_the_shared_input_is_refused_in_training():
    class DropFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(self.drop(x)).mean(dim=(2, 3))

    mods = [DropFirst(), DropFirst()]
    assert "dropout on the shared input" in wide_support(mods)
    for m in mods:
        m.eval()
    assert wide_support(mods) is None
