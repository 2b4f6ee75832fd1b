"""Digit accuracy under the mild shifts real input has, for one or more checkpoints side by side.

    python benchmarks/robustness.py runs/best/model.pt runs/default/model.pt

Every test image is transformed the same way for every model (fixed seed): rotation by a
random angle in +-15 degrees, a random shift of up to +-3 px, thicker strokes (3x3 grey
dilation) and thinner strokes (the mean of each pixel and its 3x3 grey erosion: the stroke's
edges fade to half). Prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from digitsum.checkpoint import load_model
from digitsum.data import load_split, random_affine, standardize, to_unit


def thicker(pixels: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(pixels, 3, stride=1, padding=1)


def thinner(pixels: torch.Tensor) -> torch.Tensor:
    # A full 3x3 erosion removes most of a 2-3 px MNIST stroke; half of it is a mild thinning.
    return (pixels - F.max_pool2d(-pixels, 3, stride=1, padding=1)) / 2


def shifts(seed: int = 0) -> dict:
    def affine(**kwargs):
        return lambda pixels: random_affine(pixels, torch.Generator().manual_seed(seed), **kwargs)

    return {
        "clean": lambda pixels: pixels,
        "rotation ±15°": affine(rotate=15),
        "shift ±3 px": affine(translate=3),
        "thicker strokes": thicker,
        "thinner strokes": thinner,
    }


@torch.no_grad()
def digit_accuracy(model, pixels: torch.Tensor, digits: torch.Tensor, numbers: torch.Tensor) -> float:
    hits = 0
    for start in range(0, len(digits), 1000):
        digit_logits, _ = model(standardize(pixels[start : start + 1000]), numbers[start : start + 1000])
        hits += int((digit_logits.argmax(1) == digits[start : start + 1000]).sum())
    return hits / len(digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="model.pt files to compare")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()

    test = load_split("test", args.data_root)
    variants = {name: transform(to_unit(test.images)) for name, transform in shifts().items()}
    models = {path: load_model(path)[0] for path in args.checkpoints}
    print("| test digit accuracy | " + " | ".join(args.checkpoints) + " |")
    print("|---|" + "---|" * len(models))
    for name, pixels in variants.items():
        cells = [f"{100 * digit_accuracy(model, pixels, test.digits, test.numbers):.2f}%" for model in models.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
