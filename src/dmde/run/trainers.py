"""The stages' work that is not a room's own: the run's task groups (visual tree included), the
N-way layer and calibration (Eq. 10), end-to-end fine-tuning (Eq. 11) and the baselines' training."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmde.baselines.models import EarlyFusion, flat_model, width_matched_flat
from dmde.core.checkpoint import save_checkpoint
from dmde.core.errors import DmdeValueError
from dmde.core.training import (
    ImageTensors,
    OptimConfig,
    Salt,
    fit,
    mix_seed,
    optim_part,
    predict_logits,
)
from dmde.experts.backbones import create_backbone
from dmde.experts.train import uses_cached_trunk
from dmde.fusion.calibration import fit_calibration, fit_pool_temperature
from dmde.fusion.mixture import Mixture, NWaySoftmax, mixture_loss
from dmde.fusion.stacking import group_slots
from dmde.hierarchy.groups import make_groups
from dmde.hierarchy.ontology import Ontology, build_semantic_ontology, build_visual_ontology
from dmde.hierarchy.taxonomy import build_taxonomy_ontology, read_taxonomy
from dmde.run.config import FusionConfig, RunConfig
from dmde.run.prepare import Splits
from dmde.run.store import expert_similarities, nway_input


def cross_entropy(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of a model with one N-way softmax (flat, early fusion, the N-way layer), for :func:`fit`."""
    logits = m(x)
    return F.cross_entropy(logits, y), logits


def n_categories(cfg: RunConfig, n: int) -> int | None:
    """K of the ontology, checked against the number of classes."""
    k = cfg.ontology.categories
    if k is not None and not 1 <= k <= n:
        raise DmdeValueError(f"ontology.categories={k} must lie in 1..{n} (the number of classes)")
    return k


def build_run_ontology(cfg: RunConfig, splits: Splits, wn, device: torch.device) -> Ontology:
    """The run's two-layer ontology (§III) from ``ontology.source``: WordNet's Ψ (Eq. 1), the
    visual tree of the training images (§V(e)), or the user's taxonomy file. ``splits`` are not yet
    aligned: their targets index ``splits.classes``."""
    o, classes = cfg.ontology, splits.classes
    k = n_categories(cfg, len(classes))
    if o.source == "taxonomy":
        return build_taxonomy_ontology(read_taxonomy(o.taxonomy, classes), n_categories=k,
                                       source=f"taxonomy {Path(o.taxonomy).name}")
    if o.source == "visual":
        return visual_tree(cfg, splits.train, classes, classes, k, None, device)
    return build_semantic_ontology(wn, classes, n_categories=k, random_state=o.seed,
                                   drop_non_atomic=o.drop_non_atomic, source="dataset classes")


def visual_tree(cfg: RunConfig, data: ImageTensors, classes: Sequence[str], names: Sequence[str],
                k: int | None, wn, device: torch.device) -> Ontology:
    """The visual tree (§V(e)) of class-mean features of ``data`` (targets index ``classes``):
    from the experts' pretrained trunk + body when the trunk is cached, else ``groups.visual_backbone``."""
    g = cfg.groups
    if data.kind == "features":
        feats = class_mean_features(data, len(classes), cfg.experts.backbone, g.visual_per_class, g.seed, device,
                                    cfg.experts.backbone_kwargs)
    else:
        feats = class_mean_features(data, len(classes), g.visual_backbone, g.visual_per_class, g.seed, device)
    return build_visual_ontology(feats.numpy(), classes, names, n_categories=k, random_state=g.seed, wn=wn,
                                 source=f"class-mean {g.visual_backbone} features")


def make_run_groups(cfg: RunConfig, onto, splits: Splits, wn, run_dir: Path, device: torch.device):
    """The run's task groups (§IV-A); with ``groups.assignment=visual`` the visual tree first (§V(e))."""
    g = cfg.groups
    visual = None
    if g.assignment == "visual":
        visual = visual_tree(cfg, splits.train, onto.classes, onto.lemmas, onto.n_categories, wn, device)
        visual.to_json(run_dir / "visual_ontology.json")
    return make_groups(onto, g.size, g.overlap, assignment=g.assignment, random_state=g.seed,
                       visual_ontology=visual)


@torch.no_grad()
def class_mean_features(data: ImageTensors, n_classes: int, backbone: str, per_class: int, seed: int,
                        device: torch.device, backbone_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Mean deep feature of each class (N, d) from a per-class sample: the visual tree's input."""
    torch.manual_seed(seed)
    if data.kind == "features":  # cached trunk outputs: the pretrained backbone's body on top
        net = create_backbone(backbone, **backbone_kwargs).use_cached_trunk().to(device).eval()
    else:
        kw = {"pretrained": True} if backbone == "efficientnet_lite0" else {}
        net = create_backbone(backbone, **kw).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([m[torch.randperm(m.numel(), generator=g)[:per_class]]
                     for m in (torch.nonzero(data.targets == c).flatten() for c in range(n_classes))])
    sub = data.subset(idx)
    feats = predict_logits(net, sub, device=device)
    sums = torch.zeros(n_classes, feats.shape[1]).index_add_(0, sub.targets, feats)
    counts = torch.bincount(sub.targets, minlength=n_classes).clamp_min(1).unsqueeze(1)
    return sums / counts


def train_fusion(path: Path, experts: Sequence[nn.Module], groups: Sequence[Sequence[int]], n: int,
                 data: ImageTensors, f: FusionConfig, device: torch.device, progress: bool,
                 precision: str | int = "32") -> dict[str, float]:
    """Train the N-way layer on Υ of the (frozen) experts, computed once (Eq. 10), on ``device``."""
    mixture = Mixture(list(experts), groups, n, stacking=f.stacking, eps=f.eps, lam=f.lam, batched=f.batched)
    mixture.to(device).eval()
    calibration = {}
    if f.calibrate != "none":  # T_j (and b_j) on the fusion split, before Eq. 7
        calibration = calibrate_mixture(mixture, data, bias=f.calibrate == "temperature_bias", device=device,
                                        progress=progress, precision=precision)
    ups = predict_logits(mixture.upsilon, data, device=device, progress=progress, desc="Υ",
                         precision=precision).to(device)  # (n_img, N), computed again on resume
    torch.manual_seed(mix_seed(Salt.NWAY_INIT, n))
    nway = NWaySoftmax(n, kind=f.nway, rank=f.rank, input=nway_input(f)).to(device)
    if f.pool_temperature == "fit":  # τ of the pooled scores, before A and b train (argmax Υ kept)
        with torch.no_grad():
            nway.scale.fill_(fit_pool_temperature(nway.inputs(ups), data.targets))
    init = {k: v.clone() for k, v in nway.state_dict().items()}

    def loss_fn(m: nn.Module, u: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = cross_entropy(m, u, y)
        if f.identity_l2 > 0:  # stay near the initial (identity) map
            loss = loss + f.identity_l2 * sum(((p - init[k]) ** 2).sum() for k, p in m.named_parameters())
        return loss, logits

    y = data.targets
    ocfg = OptimConfig(epochs=f.epochs, batch_size=f.batch_size, optimizer="adam", lr=f.lr, weight_decay=0.0,
                       augment=False)
    metrics = fit(nway, ImageTensors(ups, y, kind="features"), ocfg, loss_fn, path.with_suffix(".train.pt"),
                  epoch_samples=_orders(len(y), f.epochs, y, mix_seed(Salt.NWAY_ORDER, n)), device=device,
                  desc="fusion", progress=progress, shuffle=False, constant_lr=True)
    with torch.no_grad():
        nway.eval()
        y = y.to(device)
        metrics = {**metrics, "fusion_train_acc": float((nway(ups).argmax(1) == y).float().mean()),
                   "upsilon_train_acc": float((ups.argmax(1) == y).float().mean()),
                   "pool_temperature": float(nway.scale)}
    _finish(path, {"kind": "nway", "model": nway.state_dict(), "metrics": metrics, **calibration})
    return metrics


def _orders(n_samples: int, epochs: int, targets: torch.Tensor, seed: int):
    """``epoch_samples`` for :func:`fit` with ``shuffle=False``: epoch e's order is the e-th
    permutation of one generator seeded by ``seed`` (the layers trained on precomputed inputs
    draw their orders this way, so their numbers are those of the loops they had before). The
    generator's state before each epoch is kept (a few KB), not the orders."""
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(epochs):
        states.append(g.get_state())
        torch.randperm(n_samples, generator=g)

    def epoch_samples(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.randperm(n_samples, generator=torch.Generator().set_state(states[e]))
        return order, targets[order]

    return epoch_samples


def _finish(path: Path, state: dict[str, Any]) -> None:
    """Write a layer trained on precomputed inputs (what evaluation and prediction load), then drop
    the training checkpoint beside it: ``path`` appears only once training is over, and an
    interruption before that resumes from the training checkpoint."""
    save_checkpoint(path, state)
    path.with_suffix(".train.pt").unlink(missing_ok=True)


def calibrate_mixture(mixture: nn.Module, data: ImageTensors, bias: bool, device: torch.device | str = "cpu",
                      progress: bool = False, precision: str | int = "32") -> dict[str, torch.Tensor]:
    """Fit every expert's temperature (and not-in-group bias) on ``data`` and set them on the
    mixture (:func:`dmde.fusion.calibration.fit_calibration`); returns them for the fusion checkpoint."""
    g = len(mixture.experts)
    logits = predict_logits(lambda x: mixture.padded_logits(x).flatten(1), data, device=device,
                            progress=progress, desc="calibrate", precision=precision).view(len(data), g, -1)
    temperature, nig_bias = fit_calibration(logits, group_slots(mixture.layout.to("cpu"), data.targets), bias=bias)
    mixture.temperature.copy_(temperature)
    mixture.nig_bias.copy_(nig_bias)
    return {"temperature": temperature, "nig_bias": nig_bias}


def finetune(path: Path, mixture: nn.Module, data: ImageTensors, cfg: RunConfig, ontology_hash: str,
             device: torch.device, progress: bool) -> dict[str, Any]:
    """End-to-end fine-tuning (Eq. 11): the N-way loss into A, every head and every CNN,
    with each expert's own multi-task terms kept."""
    sims = expert_similarities(Path(path).parent, len(mixture.experts))
    e = cfg.experts
    mixture.to(device)
    mixture.batched = cfg.fusion.batched_finetune

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, None]:
        loss, _ = mixture_loss(model, x, y, expert_terms=e.multitask, delta1=e.delta1, delta2=e.delta2,
                               similarities=sims_dev)
        return loss, None

    sims_dev = [None if s is None else s.to(device) for s in sims]
    return fit(mixture, data, cfg.fusion.finetune, loss_fn, path, identity={"ontology_hash": ontology_hash},
               seed_parts=(Salt.FINETUNE,), device=device, desc="fine-tune", progress=progress, data_parallel=True,
               precision=cfg.precision)


def width_matched_model(cfg: RunConfig, n: int, groups, data: ImageTensors) -> tuple[nn.Module, dict[str, Any]]:
    """A flat model as costly per image as the whole mixture (experts, heads, N-way layer)."""
    e = cfg.experts
    if uses_cached_trunk(e):
        raise DmdeValueError("baselines.width_matched_flat needs a backbone with a width option "
                             "(small_cnn, alexnet), not a cached pretrained trunk")
    sizes = [len(g) for g in groups.groups]
    torch.manual_seed(mix_seed(e.seed, Salt.FLAT_WIDE))
    m = width_matched_flat(e.backbone, len(sizes), n, int(round(sum(sizes) / len(sizes))),
                           input_shape=tuple(data.sample_shape), nway_kind=cfg.fusion.nway, rank=cfg.fusion.rank,
                           **e.backbone_kwargs)
    return m.model, {"width_arg": m.width_arg, "width": m.width, "macs": m.macs, "mixture_macs": m.target_macs}


def train_flat(path: Path, data: ImageTensors, n: int, cfg: RunConfig, ontology_hash: str, device: torch.device,
               progress: bool, model: nn.Module | None = None, extra: dict[str, Any] | None = None,
               member: int = 0) -> dict[str, Any]:
    """The flat baseline ("AlexNet Extension"): the experts' backbone with one N-way softmax.
    ``member`` k > 0: the k-th flat model of the ensemble baseline (its own initial weights and
    data order; member 0 is the flat model itself)."""
    seeds = (Salt.FLAT,) if member == 0 else (Salt.FLAT, member)
    if model is None:
        torch.manual_seed(mix_seed(cfg.experts.seed, *seeds))
        model = flat_model(cfg.experts, n)
    model = model.to(device)
    ocfg = optim_part(cfg.experts)
    if cfg.baselines.epochs is not None:
        ocfg.epochs = cfg.baselines.epochs

    return fit(model, data, ocfg, cross_entropy, path, identity={"ontology_hash": ontology_hash},
               extra_state=(lambda: dict(extra)) if extra else None,
               seed_parts=seeds, device=device, desc=path.stem, progress=progress, data_parallel=True,
               precision=cfg.precision)


def train_early_fusion(path: Path, experts: Sequence[nn.Module], data: ImageTensors, n: int, cfg: RunConfig,
                       device: torch.device, progress: bool) -> dict[str, float]:
    """Early fusion (Table IV): one N-way layer on the experts' concatenated features, on ``device``."""
    torch.manual_seed(mix_seed(Salt.EARLY_FUSION_INIT, n))
    model = EarlyFusion(list(experts), n).to(device).eval()
    feats = predict_logits(lambda x: torch.cat([e.features(x) for e in model.experts], 1), data, device=device,
                           progress=progress, desc="features", precision=cfg.precision).to(device)
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd
    lin = nn.Linear(z.shape[1], n).to(device)

    # the layer trains on standardised features (checkpointed per epoch in early_fusion.train.pt);
    # the standardisation is then folded into the layer that early_fusion.pt holds
    ocfg = OptimConfig(epochs=cfg.baselines.early_fusion_epochs, batch_size=256, optimizer="adam", lr=1e-3,
                       weight_decay=1e-4, augment=False)
    metrics = fit(lin, ImageTensors(z, data.targets, kind="features"), ocfg, cross_entropy,
                  path.with_suffix(".train.pt"),
                  epoch_samples=_orders(len(z), ocfg.epochs, data.targets, mix_seed(Salt.EARLY_FUSION_ORDER, n)),
                  device=device, desc="early fusion", progress=progress, shuffle=False, constant_lr=True)
    with torch.no_grad():  # fold the standardisation into the layer
        w = lin.weight / sd
        model.classifier.weight.copy_(w)
        model.classifier.bias.copy_(lin.bias - w @ mu)
    _finish(path, {"kind": "early_fusion", "model": model.classifier.state_dict(), "metrics": metrics})
    return metrics
