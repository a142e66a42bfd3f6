"""The data a training loop consumes, batch by batch: decoded images or cached features held in
memory (:class:`ImageTensors`, a tensor index per batch), or images read on demand
(:class:`StreamedImages`: tar shards or image files, read in DataLoader worker processes), and
the turn of a gathered batch into model input (float, augmented, normalised, channels-last)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dmde.core.errors import DmdeValueError
from dmde.core.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    random_crop_with_padding,
    random_horizontal_flip,
)


@dataclass
class ImageTensors:
    """Decoded images of one split, in memory: the data path is a tensor index, never a decoder.

    ``inputs`` is uint8 (n, 3, H, W) images, or float (n, C, h, w) cached trunk features when
    ``kind == 'features'``; ``targets`` are ontology positions 0..N−1.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    kind: str = "images"  # images | features
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __len__(self) -> int:
        return int(self.targets.numel())

    def subset(self, idx: torch.Tensor) -> ImageTensors:
        return ImageTensors(self.inputs[idx], self.targets[idx], self.kind, self.mean, self.std)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        return self.inputs[idx]


class StreamedImages:
    """Images read on demand, batch by batch (tar shards, image files): memory bounded by the
    batch, not the dataset. The same interface as :class:`ImageTensors` (``targets``, ``subset``,
    ``gather``), so every stage trains on either; :func:`load_batches` reads through
    ``workers`` DataLoader processes.

    ``reader`` maps a row to a uint8 (3, H, W) image (``reader.read(row)``, ``reader.shape``)
    and must pickle (worker processes); ``rows`` are this split's rows of the reader.
    """

    kind = "images"

    def __init__(self, reader: Any, rows: torch.Tensor, targets: torch.Tensor,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 workers: int = 0) -> None:
        if rows.numel() != targets.numel():
            raise DmdeValueError(f"{rows.numel()} rows but {targets.numel()} targets")
        self.reader, self.rows, self.targets = reader, rows.long(), targets.long()
        self.mean, self.std, self.workers = mean, std, workers

    def __len__(self) -> int:
        return int(self.targets.numel())

    def subset(self, idx: torch.Tensor) -> StreamedImages:
        return StreamedImages(self.reader, self.rows[idx], self.targets[idx], self.mean, self.std, self.workers)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.reader.shape)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.rows[idx].tolist()
        if not rows:
            return torch.empty((0, *self.sample_shape), dtype=torch.uint8)
        return torch.stack([self.reader.read(r) for r in rows])

    def __repr__(self) -> str:
        return f"StreamedImages(n={len(self)}, reader={self.reader!r}, workers={self.workers})"


class _Batches(torch.utils.data.Dataset):
    """A DataLoader dataset whose items are whole batches: item ``idx`` (a tensor of rows) is
    gathered in a worker and crosses to the main process as one tensor."""

    def __init__(self, data: StreamedImages) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: list[int]) -> torch.Tensor:
        return self.data.gather(torch.as_tensor(idx, dtype=torch.long))


def load_batches(data: ImageTensors | StreamedImages, batches: Sequence[torch.Tensor],
                 pin_memory: bool = False) -> Iterable[torch.Tensor]:
    """The raw inputs (uint8 images, or cached features) of each batch of indices, in order: a
    tensor index in memory, or a DataLoader over ``data.workers`` processes when streamed (the
    reads carry no randomness, so any worker count gives the same batches)."""
    if isinstance(data, ImageTensors) or data.workers <= 0:
        return (data.gather(b) for b in batches)
    # indices travel as lists: a tensor sent to a worker is shared through a file descriptor, and
    # at 10^4 classes that traffic was seen to stall a worker and the main process on each other
    return torch.utils.data.DataLoader(_Batches(data), sampler=[b.tolist() for b in batches], batch_size=None,
                                       num_workers=data.workers, pin_memory=pin_memory,
                                       prefetch_factor=2, persistent_workers=False)



def prepare_inputs(
    data: ImageTensors | StreamedImages,
    idx: torch.Tensor,
    augment: bool = False,
    padding: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Gather a batch and turn it into model input: float, augmented, normalised."""
    return to_model_input(data.gather(idx), data, augment, padding, generator, device)


def to_model_input(
    raw: torch.Tensor,
    data: ImageTensors | StreamedImages,
    augment: bool = False,
    padding: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A gathered batch (uint8 images or cached features) as model input."""
    if torch.device(device).type == "cuda" and raw.device.type == "cpu" and not raw.is_pinned():
        raw = raw.pin_memory()  # the copy below then overlaps the GPU's work
    x = raw.to(device, non_blocking=True)
    if data.kind == "features":
        return x.float()
    x = x.float().div_(255.0)  # (B, 3, H, W)
    if augment:
        x = random_horizontal_flip(x, generator=generator)
        if padding > 0:
            x = random_crop_with_padding(x, padding, generator=generator)
    return as_model_input(normalize(x, data.mean, data.std))


#: Images enter models in channels-last layout: measured on a 2-core CPU (benchmarks/RESULTS.md,
#: "Throughput"), a small_cnn step trains 1.4×, EfficientNet-Lite0 1.6× and a mixture's loop of
#: experts infers 1.3–1.8× faster than in PyTorch's default layout (whose max-pooling kernel is slow
#: there); the numbers computed differ only by float rounding.
CHANNELS_LAST = True


def as_model_input(x: torch.Tensor) -> torch.Tensor:
    """A batch of images (B, C, H, W) in the layout models run fastest on (:data:`CHANNELS_LAST`)."""
    if CHANNELS_LAST and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
