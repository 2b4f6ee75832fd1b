"""The digit+number dataset and fast batching (MNIST itself is fetched and verified by mnist.py).

1. `DigitSumDataset` is the per-sample dataset class of the original write-up: torchvision's
   MNIST plus a stored random number per image, returning the four-key dict.
2. `load_split()` + `batches()` are the hot path: uint8 tensors on the device, batches by
   indexing, normalised on the fly, no per-sample Python.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from digitsum.errors import DigitsumError
from digitsum.mnist import ensure_mnist, resolve_root

MEAN, STD = 0.1307, 0.3081  # of the 60,000 training pixels after /255
NUM_CLASSES, NUM_NUMBERS, NUM_SUMS = 10, 10, 19


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """A split held as tensors: the batched path trains on these directly."""

    images: torch.Tensor  # (N, 28, 28) uint8
    digits: torch.Tensor  # (N,) int64
    numbers: torch.Tensor  # (N,) int64, drawn once from a seeded generator

    def __len__(self) -> int:
        return len(self.digits)

    @property
    def sums(self) -> torch.Tensor:
        return self.digits + self.numbers

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.digits.to(device), self.numbers.to(device))


def draw_numbers(count: int, seed: int) -> torch.Tensor:
    """`count` numbers uniform in 0..9 from a generator seeded with `seed` (the stored extra input)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_NUMBERS, (count,), generator=generator)


def split_indices(total: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, validation) indices of the training images for a given seed."""
    if not 0 <= val_size < total:
        raise DigitsumError(f"validation size must be in 0..{total - 1}, got {val_size}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


# Each split draws its numbers from its own stream so that, e.g., the validation size
# does not change the test set's numbers.
_NUMBER_STREAMS = {"train": 1, "val": 2, "test": 3}


def _mnist(root: Path, train: bool):
    import torchvision

    return torchvision.datasets.MNIST(str(root), train=train, download=False)


def load_split(
    split: str, root: str | os.PathLike | None = None, val_size: int = 5000, seed: int = 0, limit: int | None = None
) -> Split:
    """One split ("train", "val", "test") as uint8/int64 tensors with its stored numbers.

    `limit` keeps the first `limit` examples (for quick runs and tests).
    """
    if split not in _NUMBER_STREAMS:
        raise ValueError(f"split must be train, val or test, got {split!r}")
    root = resolve_root(root)
    ensure_mnist(root)
    mnist = _mnist(root, train=split != "test")
    images, digits = mnist.data, mnist.targets.long()
    if split != "test":
        train_idx, val_idx = split_indices(len(digits), val_size, seed)
        keep = train_idx if split == "train" else val_idx
        images, digits = images[keep], digits[keep]
    if limit is not None:
        images, digits = images[:limit], digits[:limit]
    numbers = draw_numbers(len(digits), seed * 10 + _NUMBER_STREAMS[split])
    return Split(images.contiguous(), digits, numbers)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float32 (B, 1, 28, 28) in [0, 1], ink bright on black (0)."""
    return (images.float() / 255.0).unsqueeze(1)


def standardize(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the model's input scale (mean 0.1307, std 0.3081 of MNIST)."""
    return (pixels - MEAN) / STD


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float32 (B, 1, 28, 28) normalised like training data."""
    return standardize(to_unit(images))


def random_affine(
    pixels: torch.Tensor,
    generator: torch.Generator,
    rotate: float = 0.0,
    scale: float = 0.0,
    shear: float = 0.0,
    translate: float = 0.0,
) -> torch.Tensor:
    """Randomly rotate (degrees), scale (+-fraction), shear (degrees) and shift (pixels) a batch.

    Works on whole batches with one `affine_grid` + `grid_sample` on the batch's device, so it
    costs little next to the model and runs the same on CPU and GPU. `pixels` is (B, 1, H, W)
    in [0, 1] with a black (0) background, which is what the zero padding fills in.
    """
    count, _, height, width = pixels.shape
    device = pixels.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator, device=device)

    angle = torch.deg2rad(uniform(-rotate, rotate))
    shear_angle = torch.deg2rad(uniform(-shear, shear))
    zoom = uniform(1 - scale, 1 + scale)
    # affine_grid maps output coordinates to input coordinates in [-1, 1] units, so the
    # matrix is the inverse of the visible transform: dividing by zoom makes the digit bigger.
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear_angle)
    theta = torch.zeros(count, 2, 3, device=device)
    theta[:, 0, 0] = cos / zoom
    theta[:, 0, 1] = (-sin + cos * tan) / zoom
    theta[:, 1, 0] = sin / zoom
    theta[:, 1, 1] = (cos + sin * tan) / zoom
    theta[:, 0, 2] = uniform(-translate, translate) * 2 / width
    theta[:, 1, 2] = uniform(-translate, translate) * 2 / height
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def batches(
    split: Split,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    augment=None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (images float (B,1,28,28) normalised, numbers, digits, sums) by indexing whole batches.

    The split's tensors stay wherever they are (CPU or GPU); no per-sample Python runs.
    `augment(pixels)` transforms a [0, 1] batch before normalisation.
    """
    count = len(split)
    device = split.images.device
    if shuffle:
        order = torch.randperm(count, generator=generator, device=device)
    else:
        order = torch.arange(count, device=device)
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        digits = split.digits[index]
        numbers = split.numbers[index]
        pixels = to_unit(split.images[index])
        if augment is not None:
            pixels = augment(pixels)
        yield standardize(pixels), numbers, digits, digits + numbers


# ----------------------------------------------------------------------------- the seed's dataset


class DigitSumDataset(torch.utils.data.Dataset):
    """torchvision's MNIST plus a stored random number per image (the original write-up's class).

    Each sample is a dict:
        'input_mnist_image': float32 (1, 28, 28), normalised (mean 0.1307, std 0.3081)
        'input_number'     : int64 scalar in 0..9
        'mnist_gt'         : int64 scalar in 0..9
        'sum_gt'           : int64 scalar in 0..18 (= mnist_gt + input_number)
    `batch(indices)` returns the same keys for many indices at once, by tensor indexing.
    """

    def __init__(
        self, root: str | os.PathLike | None = None, split: str = "train", val_size: int = 5000, seed: int = 0, transform=None
    ):
        self.split = load_split(split, root, val_size=val_size, seed=seed)
        self.transform = transform  # optional, applied to the normalised image tensor

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = normalize(self.split.images[index : index + 1])[0]
        if self.transform is not None:
            image = self.transform(image)
        digit, number = self.split.digits[index], self.split.numbers[index]
        return {"input_mnist_image": image, "input_number": number, "mnist_gt": digit, "sum_gt": digit + number}

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """The four keys for many samples at once (leading batch dimension), without a Python loop."""
        index = torch.as_tensor(indices, dtype=torch.long)
        images = normalize(self.split.images[index])
        if self.transform is not None:
            images = torch.stack([self.transform(image) for image in images])
        digits, numbers = self.split.digits[index], self.split.numbers[index]
        return {"input_mnist_image": images, "input_number": numbers, "mnist_gt": digits, "sum_gt": digits + numbers}
