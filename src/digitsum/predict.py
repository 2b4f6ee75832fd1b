"""Predictions from a checkpoint for real images: loading, preprocessing (preprocess.py), classify.

image -> preprocess.preprocess_view (28x28 uint8, what the model sees) -> normalise -> classify
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from digitsum.data import NUM_NUMBERS, normalize
from digitsum.errors import DigitsumError
from digitsum.checkpoint import load_model
from digitsum.device import autocast, bf16_pays_off
from digitsum.model import DigitSumNet, inference_model
from digitsum.preprocess import (
    MAX_FILE_BYTES,
    MAX_SIDE,
    ImageError,
    ImageSource,
    NotAnImageError,
    _name,
    grayscale,
    ink_map,
    mnist_layout,
    open_image,
    preprocess_view,
)

# The preprocessing names are re-exported: predict was their home before preprocess.py existed.
__all__ = [
    "INFERENCE_CHUNK",
    "classify",
    "load_predictor",
    "predict",
    "preprocess",
    "MAX_FILE_BYTES",
    "MAX_SIDE",
    "ImageError",
    "ImageSource",
    "NotAnImageError",
    "grayscale",
    "ink_map",
    "mnist_layout",
    "open_image",
    "preprocess_view",
]


def preprocess(image: ImageSource) -> tuple[torch.Tensor, np.ndarray]:
    """Any image (path, bytes or Pillow image) -> (model input (1, 1, 28, 28), the 28x28 uint8 view).

    The model input is the view normalised exactly like the training data, so what the user is
    shown is precisely what the model saw. Raises ImageError (one line naming the image) for a
    missing, empty, non-image, truncated, oversized or blank file.
    """
    view = preprocess_view(image)
    return normalize(torch.from_numpy(view).unsqueeze(0)), view  # (1,1,28,28), (28,28)


# ----------------------------------------------------------------------------- predicting


def _check_number(number) -> int:
    if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or not 0 <= number < NUM_NUMBERS:
        raise DigitsumError(f"number must be an integer in 0..{NUM_NUMBERS - 1}, got {number!r}")
    return int(number)


def _top(probabilities: torch.Tensor, k: int = 3) -> list[dict]:
    values, indices = probabilities.topk(k)
    return [{"value": int(i), "probability": round(float(p), 4)} for p, i in zip(values, indices)]


def load_predictor(path: str | os.PathLike) -> tuple[DigitSumNet, dict]:
    """(model ready for inference, metadata) from a checkpoint: eval mode, BatchNorm folded in,
    ReLU after max-pool, channels-last (model.inference_model). A process that predicts many
    batches should call device.reuse_freed_memory() once at its start (the CLI and the server do): up to
    2x faster batches on Linux. A `.onnx` path gives an onnxruntime backend instead (onnx_backend.load_onnx),
    which classify accepts."""
    if Path(path).suffix.lower() == ".onnx":  # `digitsum export`'s graph, run by onnxruntime
        from digitsum.onnx_backend import load_onnx

        return load_onnx(path)
    model, metadata = load_model(path)
    return inference_model(model), metadata


# Images per forward pass: bounds the activations a large batch holds at once. 512 rather than 256:
# under bf16 on an AMX CPU the bigger chunks were faster in every interleaved round (default model,
# batch 1,024: 36,300-68,700 vs 32,500-63,000 images/s, docs/RESULTS.md 4); fp32 on a CPU without AMX
# measured +1-2% for 512 before.
INFERENCE_CHUNK = 512
BF16_MIN_BATCH = 64  # measured on a 2-core AVX-512 BF16 CPU: 1 image 0.31 ms fp32 vs 0.55 bf16; 64: 2.0 vs 1.7


@torch.inference_mode()
def classify(
    model: DigitSumNet, inputs: torch.Tensor, numbers: Sequence[int], chunk: int = INFERENCE_CHUNK, bf16: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(digit probabilities (B, 10), sum probabilities (B, 19)) for normalised inputs (B, 1, 28, 28).

    Large batches run in chunks of `chunk` images, so a batch of any size holds the activations of
    one chunk at a time (the first fp32 version gained ~2x from 128-image chunks over one pass).
    `bf16=None` runs the CNN under bfloat16 autocast for batches of BF16_MIN_BATCH or more where bf16
    is faster on this machine (device.bf16_pays_off, as training does; for a few images the casts
    cost more than they save);
    the softmax and the sum block stay in float32.
    """
    if not isinstance(model, torch.nn.Module):  # onnx_backend.OnnxBackend runs its own graph
        return model.classify(inputs, numbers)
    device = next(model.parameters()).device
    if bf16 is None:
        bf16 = len(inputs) >= BF16_MIN_BATCH and bf16_pays_off(device)
    numbers = torch.as_tensor(list(numbers), dtype=torch.long, device=device)
    with autocast(device, bf16):
        digit_logits, sum_logits = zip(
            *(model(images.to(device), chunk_numbers) for images, chunk_numbers in zip(inputs.split(chunk), numbers.split(chunk)))
        )
    return torch.cat(digit_logits).float().softmax(1).cpu(), torch.cat(sum_logits).float().softmax(1).cpu()


def predict(
    model: DigitSumNet, images: Sequence[ImageSource], numbers: Sequence[int] | int, views: list | None = None
) -> list[dict]:
    """One result per image, in the `digitsum predict --json` shape (see docs/ARCHITECTURE.md).

    `numbers` is one number for all images or one per image. An image (or number) that cannot be
    used gives `{"image": ..., "error": "..."}` and the others are still predicted, in one batch.
    If `views` is a list, the 28x28 uint8 view of each image (None on error) is appended to it.
    """
    if isinstance(numbers, (int, np.integer)) and not isinstance(numbers, bool):
        numbers = [numbers] * len(images)
    if len(numbers) != len(images):
        raise DigitsumError(f"got {len(numbers)} numbers for {len(images)} images; give one number or one per image")
    results: list[dict] = []
    inputs, good_numbers, good_slots = [], [], []
    for image, number in zip(images, numbers):
        name = _name(image)
        try:
            try:
                number = _check_number(number)
            except DigitsumError as error:
                raise DigitsumError(f"{name}: {error}") from None
            tensor, view = preprocess(image)  # its errors already name the image
        except DigitsumError as error:
            results.append({"image": name, "error": str(error)})
            if views is not None:
                views.append(None)
            continue
        results.append({"image": name, "number": number})
        inputs.append(tensor)
        good_numbers.append(number)
        good_slots.append(len(results) - 1)
        if views is not None:
            views.append(view)
    if inputs:
        digit_probs, sum_probs = classify(model, torch.cat(inputs), good_numbers)
        for slot, digit_p, sum_p in zip(good_slots, digit_probs, sum_probs):
            digit, total = int(digit_p.argmax()), int(sum_p.argmax())
            results[slot].update(
                {
                    "digit": digit,
                    "digit_probability": round(float(digit_p[digit]), 4),
                    "sum": total,
                    "sum_probability": round(float(sum_p[total]), 4),
                    "top3": {"digit": _top(digit_p), "sum": _top(sum_p)},
                }
            )
    return results
