"""Saving and loading checkpoints: plain dicts of tensors and JSON-able values.

Everything here loads with `torch.load(..., weights_only=True)`, so a checkpoint can never run
code. model.pt and last.pt share one layout (format version 2):

    {"format": "digitsum-checkpoint", "version": 2,
     "model_config": ModelConfig.to_dict(), "model": the weights to evaluate (state dict),
     "metadata": {"epoch", "val", "train_config", "bf16", "environment", "run"}}

and last.pt adds "resume": everything else a run needs to continue exactly (see train.save_last).
Files of an older format version are upgraded on reading, one MIGRATIONS step per version.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from digitsum.errors import DigitsumError
from digitsum.config import ModelConfig, drop_retired
from digitsum.files import write_atomic
from digitsum.model import DigitSumNet

FORMAT = "digitsum-checkpoint"
VERSION = 2
FORMAT_V1 = "digitsum-checkpoint-v1"  # version 1 spelled its version into the format name


class CheckpointError(DigitsumError):
    """A checkpoint is missing, unreadable, or not one of ours."""


def save(path: str | os.PathLike, payload: dict) -> None:
    """Write a checkpoint atomically (an interrupted save never leaves a half-written file)."""
    buffer = io.BytesIO()
    payload = {k: v for k, v in payload.items() if k not in ("format", "version")}
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
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
    return upgrade(payload, path)


def format_version(payload: object) -> int | None:
    """The format version of a loaded checkpoint, or None when it is not one of ours."""
    if not isinstance(payload, dict):
        return None
    if payload.get("format") == FORMAT_V1:
        return 1
    version = payload.get("version")
    if payload.get("format") == FORMAT and isinstance(version, int) and not isinstance(version, bool) and version >= 2:
        return version
    return None


def upgrade(payload: dict, path: str | os.PathLike = "checkpoint") -> dict:
    """The payload in the current layout (VERSION): the MIGRATIONS step of each older version in turn."""
    version = format_version(payload)
    if version is None:
        raise CheckpointError(f"{path} is not a digitsum checkpoint")
    if version > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, written by a newer digitsum; "
            f"this one reads versions 1..{VERSION} (upgrade digitsum)"
        )
    while version < VERSION:
        try:
            payload = MIGRATIONS[version](payload)
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from None
        version += 1
    return payload


def _v1_train_config(values: object) -> object:
    """A v1 train_config in v2's shape: no retired settings, no "model" section (that is model_config)."""
    if not isinstance(values, dict):
        return values  # not a settings dict: the readers' own checks say so
    values = drop_retired(values, "train")
    if isinstance(values.get("model"), dict):
        drop_retired(values["model"], "model")  # a retired variant here is refused like in model_config
    values.pop("model", None)
    return values


# v1 -> v2, the keys of a v1 last.pt that move into "resume" (the rest is model.pt's layout).
_V1_RESUME_KEYS = ("optimizer", "scheduler", "generator", "torch_rng", "rows", "best_score", "world_size", "rank_states")


def migrate_v1(payload: dict) -> dict:
    """v1 -> v2. v1 model.pt was {format, model_config, model, metadata{epoch, val, train_config,
    environment, run}}; v1 last.pt nested differently: epoch, train_config and bf16 at the top (and
    metadata only {epoch}), model_train beside model (the same weights unless EMA was on), the whole
    EMA state (its copy of the weights again) and the resume state at the top. Settings of ablation
    variants this version no longer builds are dropped at their shipped values (config.RETIRED_SETTINGS),
    any other value is a ValueError naming it."""
    v2 = {"format": FORMAT, "version": 2}
    if "model_config" in payload:
        config = payload["model_config"]
        v2["model_config"] = drop_retired(config, "model") if isinstance(config, dict) else config
    if "model" in payload:
        v2["model"] = payload["model"]
    metadata = payload.get("metadata", {})
    if not isinstance(metadata, dict):
        v2["metadata"] = metadata  # load_model refuses it with its own message
        return v2
    metadata = dict(metadata)
    if "train_config" in metadata:
        metadata["train_config"] = _v1_train_config(metadata["train_config"])
    if isinstance(metadata.get("environment"), dict) and "bf16" in metadata["environment"]:
        metadata["environment"] = dict(metadata["environment"])
        metadata.setdefault("bf16", metadata["environment"].pop("bf16"))
    if "optimizer" in payload or "train_config" in payload:  # a last.pt
        for name in ("epoch", "bf16"):
            if name in payload:
                metadata[name] = payload[name]
        if "train_config" in payload:
            metadata["train_config"] = _v1_train_config(payload["train_config"])
        resume = {name: payload[name] for name in _V1_RESUME_KEYS if name in payload}
        ema = payload.get("ema")
        if isinstance(ema, dict):  # AveragedModel.state_dict(): n_averaged + module.* (= "model")
            resume["model_train"] = payload.get("model_train")
            resume["ema_n_averaged"] = ema.get("n_averaged")
        elif "model_train" in payload:
            v2["model"] = payload["model_train"]  # without EMA the same weights as "model": the trained ones
        v2["resume"] = resume
    v2["metadata"] = metadata
    return v2


MIGRATIONS = {1: migrate_v1}  # version -> the step that turns a payload of that version into the next


def train_weights(payload: dict) -> dict:
    """The weights a last.pt trains on: resume["model_train"] when they differ from the evaluated
    "model" (a weight average is on), else "model" itself (stored once)."""
    resume = payload.get("resume") if isinstance(payload.get("resume"), dict) else {}
    return resume["model_train"] if "model_train" in resume else payload.get("model")


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


def check_weights(weights: object, config: ModelConfig, path: str | os.PathLike = "checkpoint", what: str = "weights") -> None:
    """CheckpointError unless `weights` is a state dict with exactly the tensors `config` builds, shape for shape."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} has no {what} (expected a dict of tensors)")
    expected = expected_shapes(config)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}") + (
            f" and {len(missing) + len(unexpected) - 1} more" if len(missing) + len(unexpected) > 1 else ""
        )
        raise CheckpointError(f"{path} does not match the DigitSumNet architecture it declares ({what}: {detail})")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"{path} does not match the DigitSumNet architecture it declares "
                f"({what}: {name} has shape {list(weights[name].shape)}, "
                f"the declared model_config needs {list(shape)})"
            )


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
