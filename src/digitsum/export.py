"""`digitsum export`: a checkpoint to an ONNX graph, with proven parity against PyTorch.

The graph (opset 18, torch.onnx's dynamo exporter, batch dimension dynamic):

    inputs   image   float32 (B, 1, 28, 28)  normalised like training: (pixel/255 - 0.1307) / 0.3081
             number  int64   (B,)            in 0..9
    outputs  digit_probabilities (B, 10), sum_probabilities (B, 19)   softmax of the two heads
             digit_logits (B, 10),        sum_logits (B, 19)          the heads themselves

It is exported from the checkpoint's plain eval-mode model: the exporter's optimiser already folds
BatchNorm into the convolutions, and onnxruntime runs this graph 2.5-6x faster than one exported from
model.inference_model (whose strided-slice max-pool and channels-last layout help PyTorch only).
The sum block's straight-through one-hot exports as ArgMax + Equal: ONNX ArgMax, like torch.argmax,
takes the first index on ties, so the digit the sum block sees is the same (tested on tied logits).

Nothing is written unless the graph agrees with PyTorch (parity): on image x number pairs, 100% of
the digit and sum argmaxes equal and every probability within 1e-4.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from digitsum import __version__
from digitsum.checkpoint import load_model
from digitsum.data import MEAN, STD, standardize
from digitsum.files import write_atomic
from digitsum.mnist import default_root, ensure_mnist, file_problem, raw_folder, read_idx
from digitsum.model import NUM_NUMBERS, DigitSumNet
from digitsum.onnx_backend import INSTALL_HINT, METADATA_KEY, ONNX_INPUTS, ONNX_OUTPUTS, OnnxBackend, OnnxError, _first_line

OPSET = 18
FORMATS = ("onnx",)
PROBABILITY_TOLERANCE = 1e-4
SAMPLE_IMAGES = 1000  # parity after every export: 1,000 images x 10 numbers; --check: all 10,000 test images
TEST_IMAGES = "t10k-images-idx3-ubyte"


class ExportError(OnnxError):
    """A checkpoint could not be exported, or its graph disagrees with PyTorch."""


def require_exporter() -> None:
    """One-line ExportError unless onnx, onnxscript and onnxruntime are importable."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"{', '.join(missing)} not installed; {INSTALL_HINT}")


class _WithProbabilities(nn.Module):
    """The model plus the softmax of both heads: the four ONNX_OUTPUTS."""

    def __init__(self, model: DigitSumNet):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, number: torch.Tensor):
        digit_logits, sum_logits = self.model(image, number)
        return digit_logits.softmax(dim=1), sum_logits.softmax(dim=1), digit_logits, sum_logits


def onnx_bytes(model: DigitSumNet, info: dict | None = None) -> bytes:
    """The serialised ONNX graph of `model` (eval mode, float32), with `info` stored as JSON metadata."""
    require_exporter()
    wrapped = _WithProbabilities(model.float().eval()).eval()
    example = (torch.randn(2, 1, 28, 28), torch.tensor([3, 4]))
    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings():
            # The exporter notes that the two inputs share one batch axis; that is the point.
            warnings.simplefilter("ignore", UserWarning)
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines, printed even with verbose=False
                program = torch.onnx.export(
                    wrapped,
                    example,
                    dynamo=True,
                    opset_version=OPSET,
                    input_names=list(ONNX_INPUTS),
                    output_names=list(ONNX_OUTPUTS),
                    dynamic_shapes=({0: batch}, {0: batch}),
                    verbose=False,
                )
        proto = program.model_proto
    except Exception as error:  # the exporter raises many types; the user gets its first line
        raise ExportError(f"the ONNX exporter failed ({type(error).__name__}: {_first_line(error)})") from None
    proto.doc_string = (
        "digitsum: image (B,1,28,28) float32 normalised (pixel/255 - 0.1307)/0.3081 and "
        "number (B,) int64 in 0..9 -> digit/sum probabilities and logits"
    )
    entry = proto.metadata_props.add()
    entry.key, entry.value = (
        METADATA_KEY,
        json.dumps(
            {
                "model_config": model.config.to_dict(),
                "normalization": {"mean": MEAN, "std": STD},
                "inputs": list(ONNX_INPUTS),
                "outputs": list(ONNX_OUTPUTS),
                "digitsum_version": __version__,
                **(info or {}),
            }
        ),
    )
    return proto.SerializeToString()


# ----------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class Parity:
    """How a graph's outputs compare with PyTorch's on every image x number pair of a sample."""

    source: str  # where the images came from
    images: int
    pairs: int
    digit_agreement: float  # fraction of pairs with the same digit argmax
    sum_agreement: float
    digit_max_diff: float  # largest absolute difference of any probability
    sum_max_diff: float
    torch_seconds: float
    ort_seconds: float

    @property
    def ok(self) -> bool:
        return (
            self.digit_agreement == 1.0
            and self.sum_agreement == 1.0
            and max(self.digit_max_diff, self.sum_max_diff) <= PROBABILITY_TOLERANCE
        )

    def summary(self) -> str:
        return (
            f"{self.pairs:,} pairs: argmax agreement digit {100 * self.digit_agreement:.3f}% "
            f"sum {100 * self.sum_agreement:.3f}%, max abs probability difference "
            f"{max(self.digit_max_diff, self.sum_max_diff):.1e} (tolerance {PROBABILITY_TOLERANCE:g})"
        )

    def table(self) -> str:
        return "\n".join(
            [
                f"parity of onnxruntime with PyTorch on {self.source}: {self.images:,} images x {NUM_NUMBERS} numbers",
                "| pairs | digit argmax agreement | sum argmax agreement | max abs diff digit prob "
                "| max abs diff sum prob | onnxruntime (s) | torch (s) | parity |",
                "|---|---|---|---|---|---|---|---|",
                f"| {self.pairs:,} | {100 * self.digit_agreement:.3f}% | {100 * self.sum_agreement:.3f}% "
                f"| {self.digit_max_diff:.1e} | {self.sum_max_diff:.1e} | {self.ort_seconds:.2f} "
                f"| {self.torch_seconds:.2f} | {'pass' if self.ok else 'FAIL'} |",
            ]
        )


def synthetic_images(count: int, seed: int = 0) -> torch.Tensor:
    """`count` normalised (count,1,28,28) images of seeded noise, mostly dark like MNIST (no data needed)."""
    generator = torch.Generator().manual_seed(seed)
    return standardize(torch.rand(count, 1, 28, 28, generator=generator) ** 4)


def parity_images(count: int | None, data_root: str | os.PathLike | None = None, fetch: bool = False) -> tuple[torch.Tensor, str]:
    """(normalised images, where from): the first `count` MNIST test images (None: all 10,000).

    With `fetch` MNIST is fetched if missing (ensure_mnist); without, a missing or unverified test
    file means `count` synthetic images instead, so an export works offline and before `digitsum data`.
    """
    root = Path(data_root) if data_root is not None else default_root()
    if fetch:
        ensure_mnist(root)
    path = raw_folder(root) / TEST_IMAGES
    if file_problem(path) is not None:
        return synthetic_images(count or 10000), "synthetic noise images (MNIST test set not found)"
    pixels = torch.from_numpy(read_idx(path)[:count].copy())
    return standardize(pixels.float().div(255.0).unsqueeze(1)), "the MNIST test set"


@torch.inference_mode()
def check_parity(
    model: DigitSumNet, backend: OnnxBackend, images: torch.Tensor, source: str = "images", chunk_images: int = 100
) -> Parity:
    """Compare `backend` with the eval-mode `model` (float32) on every image x every number 0..9."""
    model = model.float().eval()
    numbers = torch.arange(NUM_NUMBERS).repeat(chunk_images)
    digit_same = sum_same = 0
    digit_diff = sum_diff = 0.0
    torch_seconds = ort_seconds = 0.0
    for start in range(0, len(images), chunk_images):
        batch = images[start : start + chunk_images].repeat_interleave(NUM_NUMBERS, dim=0)
        batch_numbers = numbers[: len(batch)]
        began = time.perf_counter()
        digit_logits, sum_logits = model(batch, batch_numbers)
        torch_digit, torch_sum = digit_logits.softmax(1).numpy(), sum_logits.softmax(1).numpy()
        middle = time.perf_counter()
        ort_digit, ort_sum = backend.run(batch, batch_numbers)
        ort_seconds += time.perf_counter() - middle
        torch_seconds += middle - began
        digit_same += int((torch_digit.argmax(1) == ort_digit.argmax(1)).sum())
        sum_same += int((torch_sum.argmax(1) == ort_sum.argmax(1)).sum())
        digit_diff = max(digit_diff, float(np.abs(torch_digit - ort_digit).max()))
        sum_diff = max(sum_diff, float(np.abs(torch_sum - ort_sum).max()))
    pairs = len(images) * NUM_NUMBERS
    return Parity(
        source, len(images), pairs, digit_same / pairs, sum_same / pairs, digit_diff, sum_diff, torch_seconds, ort_seconds
    )


# ----------------------------------------------------------------------------- export


def check_destination(out: Path, overwrite: bool) -> None:
    """One-line ExportError unless `out` can be written (validated before anything is exported)."""
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name such as {out / 'model.onnx'}")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    folder = out.parent
    while not folder.exists():  # write_atomic creates missing folders: the first existing one must be writable
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: {folder} is not a writable folder")


def exported_checkpoint(
    checkpoint: str | os.PathLike, full: bool = False, data_root: str | os.PathLike | None = None
) -> tuple[bytes, dict, Parity]:
    """(ONNX bytes, checkpoint metadata, parity) of a checkpoint; ExportError if parity fails.

    The parity sample is SAMPLE_IMAGES MNIST test images x 10 numbers (synthetic images where MNIST
    is absent), or with `full` all 10,000 test images x 10 numbers (MNIST fetched if needed).
    """
    require_exporter()
    model, metadata = load_model(checkpoint)
    if full:
        images, source = parity_images(None, data_root, fetch=True)
    else:
        images, source = parity_images(SAMPLE_IMAGES, data_root)
    data = onnx_bytes(model, {"checkpoint": str(checkpoint), "metadata": metadata})
    parity = check_parity(model, OnnxBackend(data, name=f"export of {checkpoint}"), images, source)
    if not parity.ok:
        raise ExportError(f"the exported graph disagrees with PyTorch ({parity.summary()}); nothing written")
    return data, metadata, parity


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "onnx",
    overwrite: bool = False,
    full: bool = False,
    data_root: str | os.PathLike | None = None,
) -> Parity:
    """Export `checkpoint` to `out` (written atomically, only after parity passes); return the parity."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    check_destination(out, overwrite)
    data, _, parity = exported_checkpoint(checkpoint, full=full, data_root=data_root)
    try:
        write_atomic(out, data)
    except OSError as error:
        raise ExportError(f"cannot write {out} ({error.strerror or error})") from None
    return parity
