"""Saving and loading checkpoints: plain dicts of tensors and JSON-able values.

Everything here loads with `torch.load(..., weights_only=True)`, so a checkpoint can never run
code. A checkpoint is {"format", "model_config", "model", "metadata"} plus, for last.pt, the
optimizer, scheduler and RNG states needed to resume.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from digitsum.errors import DigitsumError
from digitsum.files import write_atomic
from digitsum.model import DigitSumNet, ModelConfig

FORMAT = "digitsum-checkpoint-v1"


class CheckpointError(DigitsumError):
    """A checkpoint is missing, unreadable, or not one of ours."""


def save(path: str | os.PathLike, payload: dict) -> None:
    """Write a checkpoint atomically (an interrupted save never leaves a half-written file)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    write_atomic(Path(path), buffer.getvalue())


def read(path: str | os.PathLike) -> dict:
    """Load a checkpoint dict safely, turning every way it can be wrong into one clear error."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (train one with `digitsum train`)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a .pt file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a file that is not a checkpoint
        reason = str(error).strip().splitlines()[0][:100] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a .pt file: {reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a digitsum checkpoint")
    return payload


def model_config(payload: dict, path: str | os.PathLike = "checkpoint") -> ModelConfig:
    """The checked ModelConfig a checkpoint declares (CheckpointError when it is missing or unusable)."""
    values = payload.get("model_config")
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} has no model_config (not a digitsum model checkpoint)")
    try:
        return ModelConfig.from_dict(values).validate()
    except (TypeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0][:160]
        raise CheckpointError(f"{path} declares an unusable architecture ({reason})") from None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a DigitSumNet's state_dict, computed without allocating it.

    The network is built on PyTorch's `meta` device, which records shapes and holds no memory, so a
    checkpoint declaring a huge architecture costs microseconds here instead of gigabytes.
    """
    with torch.device("meta"):
        return {name: tuple(tensor.shape) for name, tensor in DigitSumNet(config).state_dict().items()}


def check_weights(weights: object, config: ModelConfig, path: str | os.PathLike = "checkpoint",
                  what: str = "weights") -> None:
    """CheckpointError unless `weights` is a state dict with exactly the tensors `config` builds, shape for shape."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} has no {what} (expected a dict of tensors)")
    expected = expected_shapes(config)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}") + (
            f" and {len(missing) + len(unexpected) - 1} more" if len(missing) + len(unexpected) > 1 else "")
        raise CheckpointError(f"{path} does not match the DigitSumNet architecture it declares ({what}: {detail})")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{path} does not match the DigitSumNet architecture it declares "
                                  f"({what}: {name} has shape {list(weights[name].shape)}, "
                                  f"the declared model_config needs {list(shape)})")


def build_model(payload: dict, path: str | os.PathLike = "checkpoint") -> DigitSumNet:
    """The DigitSumNet a checkpoint describes, with its weights loaded (eval mode, on CPU).

    The declared architecture and the stored tensors are checked against each other before
    anything is built, so a tampered or foreign checkpoint is refused without a large allocation.
    """
    config = model_config(payload, path)
    check_weights(payload.get("model"), config, path)
    try:
        model = DigitSumNet(config)
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0][:120]
        raise CheckpointError(f"{path} does not match the DigitSumNet architecture ({reason})") from None
    return model.eval()


def load_model(path: str | os.PathLike) -> tuple[DigitSumNet, dict]:
    """(model in eval mode on CPU, metadata) from a checkpoint file."""
    payload = read(path)
    metadata = payload.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} has metadata of the wrong kind ({type(metadata).__name__}, expected a dict)")
    return build_model(payload, path), metadata
