"""Prediction with a trained run: ``dmde.load(run_dir).predict(images)``.

Images are files (any Pillow format, any mode), directories (their image files, sorted), glob
patterns (``photos/*.jpg``), PIL images, numpy arrays (H, W[, C]) or uint8 / float tensors
(3, H, W). Each is brought to the run's input size keeping its aspect ratio (the largest centred
window of the input's shape, then resized: :func:`dmde.core.transforms.center_crop_resize`),
normalised like the training data, and scored by the run's best model (the fine-tuned mixture
when present, else the mixture with its N-way layer, else argmax Υ, else the flat baseline). A
corrupt file stops the batch with its name, or with ``on_corrupt="skip"`` is reported and
skipped (its result is ``None``).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from dmde.core.config import from_dict
from dmde.core.errors import DmdeError, DmdeFileError, DmdeValueError
from dmde.core.io import read_json
from dmde.core.training import ImageTensors, as_model_input
from dmde.core.transforms import center_crop_resize
from dmde.data.files import IMAGE_EXTENSIONS, decode_image, pil_to_tensor
from dmde.experts.train import ExpertsConfig
from dmde.fusion.stacking import LOG_VARIANTS
from dmde.hierarchy.ontology import Ontology
from dmde.run.config import resolve_device
from dmde.run.prepare import trunk_module
from dmde.run.store import load_models

PREFERENCE = ("mixture", "mixture_nway", "mixture_upsilon", "flat", "early_fusion")


@dataclass
class Prediction:
    wnid: str
    lemma: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"wnid": self.wnid, "lemma": self.lemma, "score": self.score}


class Predictor:
    """A run's model ready to score images."""

    def __init__(self, model: torch.nn.Module, classes: Sequence[str], lemmas: Sequence[str],
                 image_size: tuple[int, int], mean: Sequence[float], std: Sequence[float], model_name: str,
                 scores_are_probabilities: bool = False, device: str | torch.device = "cpu") -> None:
        self.model = model.eval()
        self.classes, self.lemmas = list(classes), list(lemmas)
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.model_name = model_name
        self.scores_are_probabilities = scores_are_probabilities
        self.device = resolve_device(device)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, model: str | None = None,
                 device: str | torch.device = "auto") -> "Predictor":
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise DmdeFileError(f"run directory {run_dir} does not exist")
        device = resolve_device(device)
        models, cfg = load_models(run_dir, device)
        if not models:
            raise DmdeValueError(f"run {run_dir} has no trained model yet")
        name = model or next(n for n in PREFERENCE if n in models)
        if name not in models:
            raise DmdeValueError(f"run {run_dir} has no model {name!r}; it has {', '.join(models)}")
        onto = Ontology.from_json(run_dir / "ontology.json")
        info = read_json(run_dir / "data.json", "run data summary")

        defaults = ImageTensors(torch.empty(0), torch.empty(0))
        net = models[name]
        if info.get("trunk"):  # the run cached its frozen trunk: put it back in front

            net = torch.nn.Sequential(trunk_module(from_dict(ExpertsConfig, info["trunk"])), net).to(device).eval()
        return cls(net, onto.classes, onto.lemmas, tuple(info["image_size"]),
                   info.get("mean", defaults.mean), info.get("std", defaults.std), name,
                   scores_are_probabilities=name == "mixture_upsilon" and cfg.fusion.stacking not in LOG_VARIANTS,
                   device=device)

    def _load(self, image: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = pil_to_tensor(image)
        elif isinstance(image, np.ndarray):  # as np.asarray(PIL image) gives: (H, W) or (H, W, C)
            if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
                raise DmdeValueError(f"a numpy image must be (H, W) or (H, W, 1|3|4), got {image.shape}")
            arr = image if image.ndim == 2 else image[..., :3]
            image = torch.from_numpy(np.ascontiguousarray(arr))
            image = image.unsqueeze(0) if image.dim() == 2 else image.permute(2, 0, 1)
        if isinstance(image, torch.Tensor):  # (3, H, W), (1, H, W) or (H, W); uint8 0–255 or float 0–1
            x = image
            if x.dim() == 2:
                x = x.unsqueeze(0)
            if x.dim() != 3 or x.shape[0] not in (1, 3):
                raise DmdeValueError(f"an image tensor must be (3, H, W), (1, H, W) or (H, W), got {tuple(x.shape)}")
            if x.shape[0] == 1:
                x = x.expand(3, -1, -1)
            x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        else:
            p = Path(image)
            if not p.is_file():
                raise DmdeFileError(f"image {p} does not exist")
            x = decode_image(p.read_bytes(), str(p)).float().div_(255.0)
        if tuple(x.shape[-2:]) != self.image_size:
            x = center_crop_resize(x, self.image_size)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def _score_loaded(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, N) of a batch of loaded (normalised) images."""
        y = self.model(as_model_input(x.to(self.device))).float().cpu()
        if self.scores_are_probabilities:  # Υ: normalise to sum to one
            return y / y.sum(1, keepdim=True).clamp_min(1e-12)
        return torch.softmax(y, 1)

    def _scored(self, images: list[Any], batch_size: int, skip: bool) -> tuple[list[int], torch.Tensor]:
        """(the positions scored, their probabilities): each image is loaded once, a batch at a
        time; with ``skip`` a file that cannot be read is listed in ``self.skipped`` instead."""
        self.skipped: list[tuple[Any, str]] = []
        kept, out = [], []
        for s in range(0, len(images), batch_size):
            idx, xs = [], []
            for i in range(s, min(s + batch_size, len(images))):
                try:
                    xs.append(self._load(images[i]))
                except DmdeError as exc:  # missing, unreadable, corrupt
                    if not (skip and isinstance(images[i], (str, os.PathLike))):
                        raise
                    self.skipped.append((images[i], str(exc)))
                    continue
                idx.append(i)
            if xs:
                kept += idx
                out.append(self._score_loaded(torch.stack(xs)))
        return kept, torch.cat(out) if out else torch.empty(0, len(self.classes))

    def scores(self, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """Class probabilities (B, N) in the ontology's order (directories and globs expanded)."""
        return self._scored(expand_images(images), batch_size, skip=False)[1]

    def predict(self, images: Sequence[Any], top_k: int = 5,
                on_corrupt: str = "raise") -> list[list[Prediction] | None]:
        """The ``top_k`` classes of every image, best first, one list per image after directories
        and globs are expanded (:func:`expand_images` gives the same order). ``on_corrupt="skip"``:
        an image that cannot be read gets ``None`` and is listed in ``self.skipped`` with why."""
        if top_k < 1:
            raise DmdeValueError(f"top-k must be at least 1, got {top_k}")
        if on_corrupt not in ("raise", "skip"):
            raise DmdeValueError(f"on_corrupt={on_corrupt!r} is not one of raise, skip")
        images = expand_images(images)
        kept, probs = self._scored(images, 64, skip=on_corrupt == "skip")
        k = min(top_k, probs.shape[1])
        val, idx = probs.topk(k, dim=1)
        out: list[list[Prediction] | None] = [None] * len(images)
        for i, vr, ir in zip(kept, val, idx):
            out[i] = [Prediction(self.classes[c], self.lemmas[c], float(v)) for v, c in zip(vr.tolist(), ir.tolist())]
        return out


def expand_images(images: Sequence[Any]) -> list[Any]:
    """Paths as given, a directory as its image files (sorted), a glob pattern as its matches
    (sorted); PIL images, arrays and tensors as they are. A pattern or directory with no image is
    an error naming it."""
    out: list[Any] = []
    for im in images:
        if not isinstance(im, (str, os.PathLike)):
            out.append(im)
            continue
        p = Path(im)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DmdeFileError(f"directory {p} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            out += [str(f) for f in files]
        elif not p.exists() and any(c in str(im) for c in "*?["):
            files = sorted(glob.glob(str(im)))
            if not files:
                raise DmdeFileError(f"no file matches {im}")
            out += files
        else:
            out.append(im)
    return out
