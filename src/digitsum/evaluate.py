"""Metrics of a model: loss and accuracy of both heads, the (image x number) grid, per-class accuracy.

`measure()` is what training uses for validation; `evaluate_checkpoint()` is `digitsum evaluate`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from digitsum import checkpoint, plots
from digitsum.data import NUM_NUMBERS, Split, batches, load_split
from digitsum.device import autocast, resolve_device
from digitsum.files import WriteError, write_atomic, write_error
from digitsum.model import NUM_DIGITS, DigitSumNet


@torch.no_grad()
def predict_split(model: DigitSumNet, split: Split, batch_size: int = 1000, bf16: bool = False) -> dict:
    """Digit logits, sum logits and per-example losses for a whole split (model in eval mode)."""
    device = split.images.device
    digit_logits, sum_logits = [], []
    for images, numbers, _, _ in batches(split, batch_size):
        with autocast(device, bf16):
            d, s = model(images, numbers)
        digit_logits.append(d.float())
        sum_logits.append(s.float())
    return {"digit_logits": torch.cat(digit_logits), "sum_logits": torch.cat(sum_logits)}


def measure(model: DigitSumNet, split: Split, batch_size: int = 1000, bf16: bool = False) -> dict:
    """Mean loss (digit CE + sum CE) and both accuracies on a split; restores the model's mode."""
    was_training = model.training
    model.eval()
    out = predict_split(model, split, batch_size, bf16)
    model.train(was_training)
    digit_loss = F.cross_entropy(out["digit_logits"], split.digits)
    sum_loss = F.cross_entropy(out["sum_logits"], split.sums)
    return {
        "loss": float(digit_loss + sum_loss),
        "digit_accuracy": float((out["digit_logits"].argmax(1) == split.digits).float().mean()),
        "sum_accuracy": float((out["sum_logits"].argmax(1) == split.sums).float().mean()),
    }


@torch.no_grad()
def grid_metrics(model: DigitSumNet, digit_logits: torch.Tensor, digits: torch.Tensor) -> dict:
    """Every image with every number 0..9: accuracies and addition errors (digit right, sum wrong).

    The CNN runs once per image; only the small sum block runs ten times.
    """
    model.eval()
    digit_right = digit_logits.argmax(1) == digits  # (N,)
    sums_right, addition_errors = 0, 0
    for number in range(NUM_NUMBERS):
        numbers = torch.full_like(digits, number)
        sum_right = model.add(digit_logits, numbers).argmax(1) == digits + number
        sums_right += int(sum_right.sum())
        addition_errors += int((digit_right & ~sum_right).sum())
    pairs = len(digits) * NUM_NUMBERS
    return {
        "digit_accuracy": float(digit_right.float().mean()),
        "sum_accuracy": sums_right / pairs,
        "addition_errors": addition_errors,
        "pairs": pairs,
        "addition_table_correct": int(addition_table(model).sum()),
    }


def addition_table(model: DigitSumNet) -> torch.Tensor:
    """(10, 10) bool: whether the sum block adds digit d (row) and number n (column) correctly.

    The digit head is replaced by a sure one (logits = 30 * one_hot(d)). For the `onehot` sum input
    this is exhaustive: whatever the image, the sum block sees one of exactly these 100 inputs, so
    a full table means no image whose digit is right can get a wrong sum.
    """
    device = next(model.parameters()).device
    digits = torch.arange(NUM_DIGITS, device=device).repeat_interleave(NUM_NUMBERS)  # 0,0,..,1,1,..
    numbers = torch.arange(NUM_NUMBERS, device=device).repeat(NUM_DIGITS)  # 0,1,..,9,0,1,..
    with torch.no_grad():
        sums = model.add(30.0 * F.one_hot(digits, NUM_DIGITS).float(), numbers).argmax(1)
    return (sums == digits + numbers).reshape(NUM_DIGITS, NUM_NUMBERS).cpu()


def confusion_matrix(predicted: torch.Tensor, truth: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """(classes, classes) counts, rows = true class, columns = predicted class."""
    return torch.bincount(truth * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def evaluate_model(model: DigitSumNet, test: Split, bf16: bool = False) -> tuple[dict, dict]:
    """(metrics in the `digitsum evaluate --json` shape, raw outputs for figures)."""
    model.eval()
    out = predict_split(model, test, bf16=bf16)
    digit_pred = out["digit_logits"].argmax(1)
    sum_pred = out["sum_logits"].argmax(1)
    loss = F.cross_entropy(out["digit_logits"], test.digits) + F.cross_entropy(out["sum_logits"], test.sums)
    confusion = confusion_matrix(digit_pred.cpu(), test.digits.cpu())
    per_class = {str(d): round(float(confusion[d, d] / confusion[d].sum()), 6) for d in range(10)}
    metrics = {
        "test": {
            "digit_accuracy": float((digit_pred == test.digits).float().mean()),
            "sum_accuracy": float((sum_pred == test.sums).float().mean()),
            "loss": float(loss),
        },
        "grid": grid_metrics(model, out["digit_logits"], test.digits),
        "per_class": per_class,
    }
    return metrics, {"digit_pred": digit_pred.cpu(), "sum_pred": sum_pred.cpu(), "confusion": confusion}


def evaluate_checkpoint(
    path: str | os.PathLike, data_root=None, device: str = "auto", out_dir=None, figures: bool = True
) -> dict:
    """`digitsum evaluate`: test + grid metrics of a checkpoint; writes eval.json and figures.

    Files go next to the checkpoint unless `out_dir` is given. When they cannot be written (full
    disk, read-only folder) it raises ResultsNotSaved, a one-line DigitsumError that carries the
    metrics, so the caller can still report them.
    """
    start = time.perf_counter()
    model, metadata = checkpoint.load_model(path)
    torch_device = resolve_device(device)
    model.to(torch_device)
    test = load_split("test", data_root).to(torch_device)
    metrics, raw = evaluate_model(model, test)
    metrics["checkpoint"] = str(path)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    out = Path(out_dir) if out_dir is not None else Path(path).parent
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(out, error) from None
        write_atomic(out / "eval.json", (json.dumps(metrics, indent=2) + "\n").encode())
        if figures:
            test_cpu = test.to("cpu")
            plots.confusion(raw["confusion"], out / "confusion.png")
            plots.mistakes(test_cpu, raw["digit_pred"], raw["sum_pred"], out / "mistakes.png")
    except WriteError as error:
        raise ResultsNotSaved(str(error), metrics) from None
    return metrics


class ResultsNotSaved(WriteError):
    """The evaluation ran but its files could not be written; `metrics` holds the results anyway."""

    def __init__(self, message: str, metrics: dict):
        super().__init__(message)
        self.metrics = metrics


def summary_line(metrics: dict) -> str:
    """One human line for a metrics dict of `evaluate_model`."""
    test, grid = metrics["test"], metrics["grid"]
    return (
        f"test: digit {100 * test['digit_accuracy']:.2f}%  sum {100 * test['sum_accuracy']:.2f}%  "
        f"loss {test['loss']:.4f} | grid of {grid['pairs']:,} pairs: sum {100 * grid['sum_accuracy']:.3f}%, "
        f"{grid['addition_errors']} addition errors; addition table {grid['addition_table_correct']}/100"
    )
