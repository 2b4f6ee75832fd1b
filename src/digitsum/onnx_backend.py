"""Inference with onnxruntime: a `model.onnx` written by `digitsum export` behind the predict API.

`OnnxBackend` runs the exported graph on onnxruntime's CPU provider and offers what the torch
model offers to the rest of digitsum: `predict.classify(backend, inputs, numbers)` and
`predict.predict(backend, images, numbers)` work unchanged (classify hands a backend's batch to
`backend.classify`), and `backend(image, number)` returns logits like `DigitSumNet.forward`.

`load_backend(path, "torch" | "onnxruntime")` is the one entry point for choosing a backend
(`digitsum serve --backend` is meant to call it). The graph's inputs and outputs are described in
digitsum.export (ONNX_INPUTS, ONNX_OUTPUTS).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from digitsum.errors import DigitsumError

BACKENDS = ("torch", "onnxruntime")
ONNX_INPUTS = ("image", "number")
# Probabilities first: what a deployment reads. The logits ride along at no cost (they are
# intermediate values of the same graph) for callers that want temperatures or log-likelihoods.
ONNX_OUTPUTS = ("digit_probabilities", "sum_probabilities", "digit_logits", "sum_logits")
METADATA_KEY = "digitsum"  # metadata_props entry holding {"model_config", "metadata", "checkpoint", ...} as JSON
INSTALL_HINT = "pip install 'digitsum[onnx]' (onnx, onnxscript, onnxruntime)"


class OnnxError(DigitsumError):
    """An ONNX file, or the packages to make or run one, is missing or unusable."""


def require_onnxruntime():
    """The onnxruntime module, or a one-line OnnxError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxError(f"onnxruntime is not installed; {INSTALL_HINT}") from None
    return onnxruntime


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text else type(error).__name__


class OnnxBackend:
    """A digitsum ONNX graph run by onnxruntime on the CPU.

    `source` is a path to a .onnx file or the file's bytes. `threads` sets onnxruntime's intra-op
    threads (default: torch.get_num_threads(), the same as the torch backend, so comparisons are
    fair); inter-op parallelism is off because the graph is a single chain of operators.
    """

    def __init__(self, source: str | os.PathLike | bytes, threads: int | None = None, name: str | None = None):
        ort = require_onnxruntime()
        self.name = name or (str(source) if not isinstance(source, bytes) else "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's business
        try:
            self.session = ort.InferenceSession(
                source if isinstance(source, bytes) else str(source), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise OnnxError(f"{self.name} is not a loadable ONNX model ({_first_line(error)})") from None
        inputs = tuple(i.name for i in self.session.get_inputs())
        outputs = tuple(o.name for o in self.session.get_outputs())
        if inputs != ONNX_INPUTS or outputs != ONNX_OUTPUTS:
            raise OnnxError(
                f"{self.name} is not a digitsum model (inputs {list(inputs)}, outputs {list(outputs)}; "
                f"expected {list(ONNX_INPUTS)} -> {list(ONNX_OUTPUTS)}); make one with `digitsum export`"
            )
        stored = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}")
        try:
            self.info = json.loads(stored)
        except ValueError:
            self.info = {}
        self.metadata = self.info.get("metadata", {}) if isinstance(self.info, dict) else {}

    def run(self, images, numbers, outputs: Sequence[str] = ONNX_OUTPUTS[:2]) -> list[np.ndarray]:
        """The named graph outputs (numpy) for normalised images (B,1,28,28) and numbers (B,) in 0..9."""
        images = np.ascontiguousarray(images.numpy() if isinstance(images, torch.Tensor) else images, dtype=np.float32)
        numbers = np.asarray(numbers.numpy() if isinstance(numbers, torch.Tensor) else numbers, dtype=np.int64)
        if images.ndim != 4 or images.shape[1:] != (1, 28, 28) or numbers.shape != (len(images),):
            raise DigitsumError(f"expected images (B, 1, 28, 28) and numbers (B,), got {images.shape} and {numbers.shape}")
        # The graph's one-hot of an out-of-range number is all zeros (torch's F.one_hot raises), so check here.
        if numbers.size and (numbers.min() < 0 or numbers.max() > 9):
            raise DigitsumError(f"numbers must be integers in 0..9, got {numbers.min()}..{numbers.max()}")
        return self.session.run(list(outputs), {"image": images, "number": numbers})

    def classify(self, inputs: torch.Tensor, numbers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(digit probabilities (B,10), sum probabilities (B,19)) as CPU tensors: predict.classify's contract."""
        if len(inputs) == 0:
            return torch.empty(0, 10), torch.empty(0, 19)
        numbers = numbers.cpu() if isinstance(numbers, torch.Tensor) else np.asarray(list(numbers), dtype=np.int64)
        digit, total = self.run(inputs.detach().cpu(), numbers)
        return torch.from_numpy(digit), torch.from_numpy(total)

    def __call__(self, image: torch.Tensor, number: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(digit logits (B,10), sum logits (B,19)), like DigitSumNet.forward."""
        digit_logits, sum_logits = self.run(image.detach().cpu(), number.cpu(), ONNX_OUTPUTS[2:])
        return torch.from_numpy(digit_logits), torch.from_numpy(sum_logits)

    def __repr__(self) -> str:
        return f"OnnxBackend({self.name!r}, threads={self.session.get_session_options().intra_op_num_threads})"


def load_onnx(path: str | os.PathLike, threads: int | None = None) -> tuple[OnnxBackend, dict]:
    """(OnnxBackend, checkpoint metadata stored at export) from a .onnx file, with one-line errors."""
    path = Path(path)
    if not path.exists():
        raise OnnxError(f"{path} does not exist (make one with `digitsum export CHECKPOINT --out {path}`)")
    if path.is_dir():
        raise OnnxError(f"{path} is a folder, not a .onnx file")
    backend = OnnxBackend(path, threads=threads)
    return backend, backend.metadata


def load_backend(path: str | os.PathLike, backend: str = "torch", threads: int | None = None):
    """(model, metadata) for predict.classify/predict from a checkpoint or a .onnx file.

    backend="torch": predict.load_predictor (a .pt checkpoint -> the fast inference model).
    backend="onnxruntime": a .onnx file is loaded as it is; a .pt checkpoint is exported in memory
    first (digitsum.export.onnx_bytes, ~5-10 s, with the sample parity check) - export once with
    `digitsum export` to start faster. Every problem is a one-line DigitsumError.
    """
    if backend not in BACKENDS:
        raise DigitsumError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    path = Path(path)
    is_onnx = path.suffix.lower() == ".onnx"
    if backend == "torch":
        if is_onnx:
            raise DigitsumError(
                f"{path} is an ONNX model; the torch backend needs a .pt checkpoint (use the onnxruntime backend for .onnx files)"
            )
        from digitsum.predict import load_predictor

        return load_predictor(path)
    if is_onnx:
        return load_onnx(path, threads=threads)
    from digitsum.export import exported_checkpoint

    data, metadata, _ = exported_checkpoint(path)
    runner = OnnxBackend(data, threads=threads, name=f"{path} (exported in memory)")
    return runner, metadata
