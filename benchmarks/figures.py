"""Figures for the README that no run writes by itself: what the batch augmentation does.

    python benchmarks/figures.py [--out docs]

Writes OUT/augmentation.png: ten training digits, then the same digits as the `default` and
`best` presets augment them (random rotation, scale and shift, one affine_grid per batch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from digitsum import plots
from digitsum.data import load_split, to_unit
from digitsum.config import PRESETS
from digitsum.train import augmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()

    pixels = to_unit(load_split("train", args.data_root).images[:10])  # (10,1,28,28) in [0,1]
    rows = [pixels]
    for name in ("default", "best"):
        augment = augmenter(PRESETS[name], torch.Generator().manual_seed(0))
        rows += [augment(pixels), augment(pixels)]
    path = Path(args.out) / "augmentation.png"
    plots.augmentations(
        torch.cat(rows), path, title="row 1: training digits; rows 2-3: default preset's augmentation; rows 4-5: best preset's"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
