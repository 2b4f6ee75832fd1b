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

from digitsum.data import write_atomic
from digitsum.errors import DigitsumError
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


def build_model(payload: dict, path: str | os.PathLike = "checkpoint") -> DigitSumNet:
    """The DigitSumNet a checkpoint describes, with its weights loaded (eval mode, on CPU)."""
    try:
        model = DigitSumNet(ModelConfig.from_dict(payload["model_config"]))
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0][:120]
        raise CheckpointError(f"{path} does not match the DigitSumNet architecture ({reason})") from None
    return model.eval()


def load_model(path: str | os.PathLike) -> tuple[DigitSumNet, dict]:
    """(model in eval mode on CPU, metadata) from a checkpoint file."""
    payload = read(path)
    return build_model(payload, path), payload.get("metadata", {})
