"""Figures of a run: sample grid, training curves, confusion matrix, mistakes, augmentations."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from digitsum.data import Split  # noqa: E402
from digitsum.files import write_atomic  # noqa: E402


def _save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    write_atomic(Path(path), buffer.getvalue())


def _image_grid(images, titles, path: Path, columns: int = 10, title: str | None = None) -> None:
    """Images (N, H, W) - uint8 0..255 or float 0..1 - in a grid, each with its title above it.

    Drawn as one image in one axes with the titles as text: one matplotlib axes per image made the
    60-image mistakes figure cost ~1.3 s to draw, this ~0.3 s (the same grid and labels).
    """
    count = len(images)
    rows = max(1, (count + columns - 1) // columns)
    height, width = (int(images.shape[-2]), int(images.shape[-1])) if count else (28, 28)
    gap, label = max(1, width // 5), height // 2  # white space between tiles, and above each for its title
    cell_height, cell_width = height + label, width + gap
    canvas = np.ones((rows * cell_height, columns * cell_width), np.float32)  # white, like the figure
    for index in range(count):
        image = images[index].float().numpy()
        image = image / 255 if images.dtype == torch.uint8 else image.clip(0, 1)
        top, left = (index // columns) * cell_height + label, (index % columns) * cell_width
        canvas[top : top + height, left : left + width] = image
    figure, axis = plt.subplots(figsize=(columns * 1.1, rows * 1.3))
    axis.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axis.axis("off")
    for index, text in enumerate(titles[:count]):
        if text:
            row, column = divmod(index, columns)
            axis.text(column * cell_width + width / 2, row * cell_height + label - 1, text, ha="center", va="bottom", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, path)


def samples(split: Split, path: Path, count: int = 30) -> None:
    """The first training samples with their two inputs and two targets."""
    titles = [f"{int(d)} + {int(n)} = {int(d + n)}" for d, n in zip(split.digits[:count], split.numbers[:count])]
    _image_grid(split.images[:count].cpu(), titles, path, title="image digit + input number = sum")


def augmentations(pixels: torch.Tensor, path: Path, title: str) -> None:
    """A grid of (augmented) [0,1] images (B,1,28,28)."""
    _image_grid(pixels[:, 0].cpu().clamp(0, 1), [""] * len(pixels), path, title=title)


def curves(metrics_csv: Path, path: Path) -> None:
    """Loss and both accuracies per epoch, train vs validation."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]

    def column(name):
        return [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]

    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot(epochs, column("train_loss"), "o-", label="train")
    loss_axis.plot(epochs, column("val_loss"), "o-", label="validation")
    loss_axis.set(
        xlabel="epoch", ylabel="loss (digit CE + sum CE)", yscale="log", title="loss (train: with label smoothing, augmented)"
    )
    loss_axis.legend()
    for name, style in (("digit", "-"), ("sum", "--")):
        acc_axis.plot(epochs, [100 * v for v in column(f"train_{name}_accuracy")], "o" + style, label=f"train {name}")
        acc_axis.plot(epochs, [100 * v for v in column(f"val_{name}_accuracy")], "s" + style, label=f"val {name}")
    acc_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    acc_axis.set_ylim(max(90.0, acc_axis.get_ylim()[0]), 100)
    acc_axis.grid(alpha=0.3)
    acc_axis.legend(fontsize=8)
    _save(figure, path)


def confusion(matrix: torch.Tensor, path: Path) -> None:
    """The digit confusion matrix (rows true, columns predicted), diagonal dimmed to show errors."""
    figure, axis = plt.subplots(figsize=(5.2, 4.6))
    off_diagonal = matrix.clone().float()
    off_diagonal.fill_diagonal_(0)
    axis.imshow(off_diagonal.numpy(), cmap="Reds")
    for t in range(matrix.shape[0]):
        for p in range(matrix.shape[1]):
            value = int(matrix[t, p])
            if value:
                axis.text(p, t, str(value), ha="center", va="center", fontsize=7, color="gray" if t == p else "black")
    axis.set(
        xticks=range(10),
        yticks=range(10),
        xlabel="predicted digit",
        ylabel="true digit",
        title=f"test confusion ({int(matrix.sum() - matrix.diag().sum())} errors)",
    )
    _save(figure, path)


def mistakes(test: Split, digit_pred: torch.Tensor, sum_pred: torch.Tensor, path: Path, limit: int = 60) -> None:
    """The misclassified test digits with true -> predicted labels (and wrong sums)."""
    wrong = ((digit_pred != test.digits) | (sum_pred != test.sums)).nonzero().flatten()[:limit]
    titles = [
        f"{int(test.digits[i])}→{int(digit_pred[i])}" + ("" if sum_pred[i] == test.sums[i] else f" Σ{int(sum_pred[i])}")
        for i in wrong
    ]
    _image_grid(
        test.images[wrong], titles, path, title=f"test mistakes: true→predicted digit ({len(wrong)} shown; Σ = wrong sum)"
    )
