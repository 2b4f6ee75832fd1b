"""The training loop, written out: presets, one epoch, checkpoints, resume, the run folder.

    train(config, ...) -> runs/<name>/{config.json, metrics.csv, model.pt, last.pt, curves.png,
                                        samples.png, eval.json, confusion.png, mistakes.png}

Loss = CE(digit) + CE(sum). The data lives on the device
as uint8 tensors and batches are made by indexing a random permutation (see data.batches).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import digitsum
from digitsum import checkpoint, distributed, plots
from digitsum.config import TrainConfig, config_problem, describe
from digitsum.data import NUM_NUMBERS, Split, batches, load_split, random_affine
from digitsum.errors import DigitsumError, Interrupted
from digitsum.distributed import World, all_reduce_sum
from digitsum.device import autocast, bf16_pays_off, resolve_device
from digitsum.evaluate import evaluate_checkpoint, measure, summary_line
from digitsum.files import write_atomic
from digitsum.mnist import resolve_root
from digitsum.model import DigitSumNet

RUN_FILES = ("config.json", "metrics.csv", "model.pt", "last.pt")
METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_digit_accuracy",
    "train_sum_accuracy",
    "val_loss",
    "val_digit_accuracy",
    "val_sum_accuracy",
    "lr",
    "seconds",
)


# ----------------------------------------------------------------------------- pieces of the loop


def one_cycle(step: int, total: int, warmup: float) -> float:
    """LR factor: linear rise over the first `warmup` fraction of steps, then linear decay to 0."""
    rise = max(1, round(total * warmup))
    if step < rise:
        return (step + 1) / rise
    return max(0.0, (total - step) / max(1, total - rise))


def build_optimizer(model: DigitSumNet, config: TrainConfig, steps: int):
    """SGD (Nesterov) or AdamW with a one-cycle schedule; no weight decay on BN weights and biases."""
    sum_params = set(model.sum_block.parameters())
    groups = []
    for in_sum_block in (False, True):
        params = [p for p in model.parameters() if (p in sum_params) == in_sum_block]
        lr = config.lr * (config.sum_lr_scale if in_sum_block else 1.0)
        groups.append({"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay, "lr": lr})
        groups.append({"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr})
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    elif config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    else:
        raise DigitsumError(f"optimizer must be sgd or adamw, got {config.optimizer!r}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(one_cycle, total=steps, warmup=config.warmup))
    return optimizer, scheduler


def loss_fn(digit_logits, sum_logits, digits, sums, config: TrainConfig) -> torch.Tensor:
    """The joint loss; logits are cast to float32 so bf16 autocast never reaches the softmax."""
    digit_loss = F.cross_entropy(digit_logits.float(), digits, label_smoothing=config.label_smoothing)
    sum_loss = F.cross_entropy(sum_logits.float(), sums, label_smoothing=config.label_smoothing)
    return digit_loss + sum_loss


def augmenter(config: TrainConfig, generator: torch.Generator):
    """The batch augmentation a config asks for, or None."""
    if not (config.rotate or config.scale or config.translate):
        return None
    # No shear: random_affine still draws its (zero-width) shear angle, so the random stream is v1's.
    return partial(random_affine, generator=generator, rotate=config.rotate, scale=config.scale, translate=config.translate)


def train_one_epoch(
    model,
    optimizer,
    scheduler,
    train_split: Split,
    config: TrainConfig,
    generator: torch.Generator,
    bf16: bool,
    ema=None,
    progress: bool = False,
    on_step=None,
    world: World | None = None,
    augment_generator: torch.Generator | None = None,
) -> dict:
    """One pass over the training split; returns mean loss and accuracies (as seen while training).

    `on_step(model)`, if given, runs after every optimizer step; returning True ends the epoch
    early (benchmarks use it to measure time-to-accuracy).

    With a `world` (torchrun), `model` is the DistributedDataParallel wrapper: every rank draws the
    same permutation from `generator` (seeded alike on all ranks) and trains on its own contiguous
    slice of it, augmenting from its own `augment_generator`; the returned
    metrics are summed over all ranks, so every rank returns the same numbers.
    """
    model.train()
    device = train_split.images.device
    totals = torch.zeros(3, device=device)  # loss * B, digit hits, sum hits: summed on device, no sync
    if world is None:  # the whole split, shuffled by `generator`
        split, shuffle, augment_generator = train_split, True, generator
    else:  # this rank's slice of the shared permutation, augmented from its own generator
        split, shuffle = rank_shard(train_split, world, generator), False
    steps = len(split) // config.batch_size
    epoch_batches = batches(
        split,
        config.batch_size,
        shuffle=shuffle,
        generator=augment_generator,
        drop_last=True,
        augment=augmenter(config, augment_generator),
    )
    network = getattr(model, "module", model)  # the DigitSumNet itself (under DDP, model.module)
    bar = tqdm(total=steps, disable=not progress, leave=False, unit="batch", dynamic_ncols=True)
    seen = 0
    for images, numbers, digits, sums in epoch_batches:
        images = images.contiguous(memory_format=torch.channels_last)  # the layout CPU convolutions prefer
        with autocast(device, bf16):
            digit_logits, sum_logits = model(images, numbers)
        if config.sum_all_numbers:
            # The sum block also sees each image with all ten numbers (the whole grid): ten times
            # the addition practice for a block that costs next to nothing next to the CNN.
            grid_numbers = torch.arange(NUM_NUMBERS, device=device).repeat(len(digits))  # (B*10,)
            grid_sum_logits = network.add(digit_logits.repeat_interleave(NUM_NUMBERS, 0), grid_numbers)
            loss = loss_fn(digit_logits, grid_sum_logits, digits, digits.repeat_interleave(NUM_NUMBERS) + grid_numbers, config)
        else:
            loss = loss_fn(digit_logits, sum_logits, digits, sums, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(network)
        with torch.no_grad():
            totals += torch.stack(
                [loss.detach() * len(digits), (digit_logits.argmax(1) == digits).sum(), (sum_logits.argmax(1) == sums).sum()]
            ).float()
        bar.update()
        seen += len(digits)
        if on_step is not None and on_step(network):
            break
    bar.close()
    if world is not None:
        # Loss sums and hit counts of all ranks (steps are equal, so is every rank's `seen`).
        all_reduce_sum(totals)
        seen *= world.size
    loss_sum, digit_hits, sum_hits = totals.tolist()
    return {"loss": loss_sum / seen, "digit_accuracy": digit_hits / seen, "sum_accuracy": sum_hits / seen}


def rank_shard(split: Split, world: World, generator: torch.Generator) -> Split:
    """This rank's part of one epoch: a permutation drawn from `generator` (the same on every rank,
    as all ranks seed it alike), cut into `world.size` equal contiguous slices (the remainder is
    dropped so that every rank takes the same number of steps); rank r takes slice r."""
    order = torch.randperm(len(split), generator=generator, device=split.images.device)
    per_rank = len(split) // world.size
    mine = order[world.rank * per_rank : (world.rank + 1) * per_rank]
    return Split(split.images[mine], split.digits[mine], split.numbers[mine])


# ----------------------------------------------------------------------------- run folder


def default_run_dir(config: TrainConfig, runs_root: Path = Path("runs")) -> Path:
    return runs_root / f"{datetime.now():%Y%m%d-%H%M%S}-{config.preset}"


def point_latest(run_dir: Path, log=print) -> bool:
    """<parent>/latest -> this run (a relative symlink, replaced atomically); returns whether it was set.

    Only a missing `latest` or a symlink is replaced: a file or folder of that name is the user's, so
    it is left alone with one line saying why. A failure to link is reported, never raised: the run
    itself is fine without the convenience link.
    """
    run_dir = Path(os.path.abspath(run_dir))  # "." or "sub/.." must name the folder itself
    latest = run_dir.parent / "latest"
    if not run_dir.name or latest == run_dir:
        return False  # the run is itself called latest (or is /): nothing to point
    if latest.exists() and not latest.is_symlink():
        kind = "folder" if latest.is_dir() else "file"
        log(f"note: {latest} is a {kind}, not a symlink; left it alone, so it does not point at this run")
        return False
    temporary = run_dir.parent / f".latest-{os.getpid()}"
    try:
        if temporary.is_symlink() or temporary.exists():
            temporary.unlink()
        temporary.symlink_to(run_dir.name)
        os.replace(temporary, latest)  # fails (and is reported) if a folder appeared meanwhile
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        log(f"note: could not point {latest} at this run ({error.strerror or error})")
        return False
    return True


def write_metrics(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue().encode())


def environment(device: torch.device, bf16: bool) -> dict:
    import torchvision

    return {
        "digitsum": digitsum.__version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "bf16": bf16,
        "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to train into a folder that already holds a run, unless overwrite is asked for.

    Checks only; `make_run_dir` creates the folder once the data has loaded.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise DigitsumError(f"output {run_dir} exists and is not a folder")
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing and not overwrite:
        raise DigitsumError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --overwrite to replace it or choose another --out"
        )


def make_run_dir(run_dir: Path) -> None:
    """Create the run folder; a stale eval.json of an overwritten run goes, so that it cannot pass for this one's."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DigitsumError(f"cannot create output folder {run_dir} ({error.strerror or error})") from None
    if not os.access(run_dir, os.W_OK):
        raise DigitsumError(f"output folder {run_dir} is not writable")
    remove_stale_temporaries(run_dir)  # a killed earlier run's half-written files
    try:
        (run_dir / "eval.json").unlink(missing_ok=True)
    except OSError as error:
        raise DigitsumError(f"cannot remove the old {run_dir / 'eval.json'} ({error.strerror or error})") from None


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files a killed run left (write_atomic's `.NAME.*.tmp` of train's own files).

    A kill -9 during a save cannot clean up after itself; the complete files are never touched.
    """
    for name in RUN_FILES:
        for stale in run_dir.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()


def _is_rng_state(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.ndim == 1


def resume_state_problem(payload: dict, config: TrainConfig) -> str:
    """Why a last.pt's training state is not usable with its saved settings (one line), or ""."""
    metadata, resume = payload["metadata"], payload["resume"]
    epoch = metadata.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        return f"metadata.epoch is missing or not an integer ({epoch!r})"
    if not 0 <= epoch <= config.epochs:
        return f"metadata.epoch {epoch} is outside 0..{config.epochs}"
    rows = resume.get("rows")
    if not isinstance(rows, list) or len(rows) != epoch:
        return f"resume.rows must list one metrics row per finished epoch ({epoch}), got {type(rows).__name__}"
    for row in rows:
        if not isinstance(row, dict) or set(row) - set(METRIC_COLUMNS) or "seconds" not in row:
            return f"a metrics row is malformed ({str(row)[:60]})"
        try:
            float(row["seconds"])
        except (TypeError, ValueError):
            return f"a metrics row has seconds {row['seconds']!r}"
    best = resume.get("best_score")
    if best is not None and not (
        isinstance(best, (list, tuple))
        and 1 <= len(best) <= 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in best)
    ):
        return f"resume.best_score is malformed ({str(best)[:60]})"
    if epoch > 0 and best is None:
        return "resume.best_score is missing"
    for name in ("optimizer", "scheduler"):
        if not isinstance(resume.get(name), dict):
            return f"resume.{name} is missing"
    if config.ema:
        if not isinstance(resume.get("model_train"), dict):
            return "resume.model_train is missing (the settings use a weight average)"
        if not isinstance(resume.get("ema_n_averaged"), torch.Tensor):
            return "resume.ema_n_averaged is missing (the settings use a weight average)"
    for name in ("generator", "torch_rng"):
        if not _is_rng_state(resume.get(name)):
            return f"resume.{name} is missing or not a random-number state"
    cuda = resume.get("cuda_rng")
    if cuda is not None and not (isinstance(cuda, list) and all(_is_rng_state(state) for state in cuda)):
        return "resume.cuda_rng is not a list of random-number states"
    if "bf16" in metadata and not isinstance(metadata["bf16"], bool):
        return f"metadata.bf16 must be true or false, got {metadata['bf16']!r}"
    if "world_size" in resume:  # written by a torchrun run: every rank's random streams
        size, ranks = resume["world_size"], resume.get("rank_states")
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            return f"resume.world_size must be an integer >= 2, got {size!r}"
        if not isinstance(ranks, list) or len(ranks) != size:
            return f"resume.rank_states must hold one entry per process ({size})"
        for entry in ranks:
            if not isinstance(entry, dict) or not all(
                _is_rng_state(entry.get(name)) for name in ("augment_generator", "torch_rng")
            ):
                return "resume.rank_states holds an entry that is not a random-number state"
    return ""


def load_resume_state(path: Path) -> tuple[TrainConfig, dict]:
    """The config and checkpoint payload of a last.pt, checked field by field so that a tampered or
    foreign file is one clear CheckpointError, and a finished run with an eval.json is refused."""
    payload = checkpoint.read(path)
    if not isinstance(payload.get("resume"), dict):
        raise checkpoint.CheckpointError(f"{path} is not resumable (it holds weights only; pass a run's last.pt)")
    metadata = payload.get("metadata")
    try:
        if not isinstance(metadata, dict) or not isinstance(metadata.get("train_config"), dict):
            raise TypeError("metadata.train_config is not a dict")
        model_config = checkpoint.model_config(payload, path)
        config = TrainConfig.from_dict({**metadata["train_config"], "model": model_config.to_dict()})
    except (TypeError, ValueError, DigitsumError) as error:
        if isinstance(error, checkpoint.CheckpointError):
            raise
        raise checkpoint.CheckpointError(f"{path} holds settings this version does not know ({error})") from None
    problem = config_problem(config)
    if problem:
        raise checkpoint.CheckpointError(f"{path} holds unusable settings ({problem})")
    problem = resume_state_problem(payload, config)
    if problem:
        raise checkpoint.CheckpointError(f"{path} is damaged or not a digitsum last.pt ({problem})")
    # The weights must fit the saved architecture before anything is built from it (see checkpoint.check_weights).
    checkpoint.check_weights(payload.get("model"), config.model, path, what="model")
    if "model_train" in payload["resume"]:
        checkpoint.check_weights(payload["resume"]["model_train"], config.model, path, what="resume.model_train")
    epoch = metadata["epoch"]
    if epoch >= config.epochs and (path.parent / "eval.json").exists():
        raise checkpoint.CheckpointError(
            f"{path} is a finished run ({epoch}/{config.epochs} epochs, evaluated in "
            f"{path.parent / 'eval.json'}); nothing to resume (re-evaluate with: digitsum evaluate {path.parent / 'model.pt'})"
        )
    return config, payload


@dataclass
class Setup:
    """Everything a run trains with, built from a TrainConfig by `prepare`."""

    device: torch.device
    bf16: bool
    train_split: Split
    val_split: Split | None
    model: DigitSumNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: AveragedModel | None
    generator: torch.Generator
    # Under torchrun: this rank's place, the DDP wrapper that trains `model`, and this rank's own
    # generator for augmentation (`generator` then only draws the shared permutation).
    world: World | None = None
    ddp: torch.nn.Module | None = None
    augment_generator: torch.Generator | None = None

    def epoch(self, config: "TrainConfig", progress: bool = False, on_step=None) -> dict:
        """Train one epoch with this setup (see train_one_epoch)."""
        metrics = train_one_epoch(
            self.model if self.world is None else self.ddp,
            self.optimizer,
            self.scheduler,
            self.train_split,
            config,
            self.generator,
            self.bf16,
            self.ema,
            progress,
            on_step,
            world=self.world,
            augment_generator=self.augment_generator,
        )
        if self.world is not None:
            distributed.broadcast_state(*[m for m in (self.model, self.ema) if m is not None])
        return metrics

    @property
    def eval_model(self) -> DigitSumNet:
        """The weights to evaluate: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model


def resolve_bf16(config: TrainConfig, device: torch.device) -> bool:
    """The precision `config.bf16` means on `device` (auto: device.bf16_pays_off, from the hardware)."""
    if config.bf16 not in ("auto", "on", "off"):
        raise DigitsumError(f"bf16 must be auto, on or off, got {config.bf16!r}")
    return bf16_pays_off(device) if config.bf16 == "auto" else config.bf16 == "on"


def prepare(config: TrainConfig, data_root=None, bf16: bool | None = None, world: World | None = None) -> Setup:
    """Data on the device, a seeded model, optimizer, schedule and weight average for `config`.

    `bf16` is a precision decided before (a resumed run's stored one); None resolves config.bf16.
    With a `world` (torchrun, process group joined) the model is wrapped in DistributedDataParallel,
    each rank's schedule counts its own steps (its 1/N of the training set) and each rank gets its
    own seeded augmentation generator and global RNG (dropout).
    """
    config.validate()
    device = resolve_device(config.device)
    if world is not None:
        device = distributed.rank_device(world, device)
    if bf16 is None:
        bf16 = resolve_bf16(config, device)
    train_split = load_split("train", data_root, config.val_size, config.seed, limit=config.train_limit or None).to(device)
    val_split = load_split("val", data_root, config.val_size, config.seed).to(device) if config.val_size else None
    if len(train_split) < config.batch_size:
        raise DigitsumError(f"batch size {config.batch_size} is larger than the {len(train_split)} training images")
    per_rank = len(train_split) // world.size if world is not None else len(train_split)
    if per_rank < config.batch_size:
        raise DigitsumError(
            f"batch size {config.batch_size} is larger than the {per_rank} training images "
            f"of each of the {world.size} processes (lower --batch-size)"
        )

    torch.manual_seed(config.seed)
    model = DigitSumNet(config.model).to(device, memory_format=torch.channels_last)
    steps_per_epoch = per_rank // config.batch_size
    optimizer, scheduler = build_optimizer(model, config, steps_per_epoch * config.epochs)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) if config.ema else None
    generator = torch.Generator(device=device).manual_seed(config.seed)
    if world is None:
        return Setup(device, bf16, train_split, val_split, model, optimizer, scheduler, ema, generator)
    from torch.nn.parallel import DistributedDataParallel

    # DDP copies rank 0's weights to every rank here (they are equal anyway: same seed).
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    augment_generator = torch.Generator(device=device).manual_seed(world.seed(config.seed))
    torch.manual_seed(world.seed(config.seed))  # dropout masks differ between ranks
    return Setup(
        device,
        bf16,
        train_split,
        val_split,
        model,
        optimizer,
        scheduler,
        ema,
        generator,
        world=world,
        ddp=ddp,
        augment_generator=augment_generator,
    )


# ----------------------------------------------------------------------------- the whole run


def train(
    config: TrainConfig | None,
    out_dir: str | os.PathLike | None = None,
    data_root=None,
    overwrite: bool = False,
    resume: str | os.PathLike | None = None,
    log=print,
    progress: bool | None = None,
    stop_after: int | None = None,
    evaluate_test: bool = True,
    figures: bool = True,
) -> dict:
    """Train a DigitSumNet, write the run folder, evaluate on the test set; return a summary.

    `resume` continues from a last.pt (its saved settings and precision win; `config` is ignored);
    a last.pt of a finished run without an eval.json (its final evaluation failed or was
    interrupted) is finished: curves and evaluation only. `stop_after` ends after that many epochs
    of this call with a resumable last.pt (for tests). Every setting, the data root and the output
    folder are checked before any data is loaded or any file is written.

    Started by torchrun (WORLD_SIZE > 1 in the environment) every process calls this: they train
    one model with DistributedDataParallel on their own slices of the data (batch_size per process,
    so the global batch is batch_size x WORLD_SIZE), and only rank 0 logs and writes the run
    folder. Without torchrun torch.distributed is never touched.
    """
    world = distributed.world_from_env()
    data_root = resolve_root(data_root)
    if resume is not None:
        resume = Path(resume).resolve()  # the real run folder, even via runs/latest or from inside it
        config, state = load_resume_state(resume)
        run_dir = resume.parent
        check_world_size(state, world, resume)
    else:
        if not isinstance(config, TrainConfig):
            raise DigitsumError("train() needs a TrainConfig or resume=")
        config.validate()
        state = None
        if world is None:
            run_dir = Path(out_dir if out_dir is not None else default_run_dir(config)).resolve()
            check_run_dir(run_dir, overwrite)
    if world is None:
        if progress is None:
            progress = sys.stderr.isatty()
        return _train(config, state, run_dir, data_root, log, progress, stop_after, evaluate_test, figures, resume=resume)

    # torchrun: join the group, then agree on the checks of the run folder before anyone writes.
    distributed.init(world, distributed.rank_device(world, resolve_device(config.device)))
    try:
        if state is None:
            # The default name has a timestamp: rank 0's is everyone's.
            run_dir = Path(out_dir) if out_dir is not None else distributed.broadcast_object(default_run_dir(config))
            run_dir = run_dir.resolve()
            try:
                check_run_dir(run_dir, overwrite)
                problem = ""
            except DigitsumError as error:
                problem = str(error)
            problem = distributed.agree_on_error(problem)
            if problem:
                raise DigitsumError(problem)
        if not world.main:
            log, progress = _quiet, False
        elif progress is None:
            progress = sys.stderr.isatty()
        if world.main:
            log(
                f"{world.size} processes (torchrun), {config.batch_size} images per process and step: "
                f"global batch {config.batch_size * world.size}"
            )
        return _train(
            config, state, run_dir, data_root, log, progress, stop_after, evaluate_test, figures, resume=resume, world=world
        )
    finally:
        distributed.close()


def _quiet(*args) -> None:
    """The log of ranks other than 0."""


def check_world_size(state: dict, world: World | None, path: Path) -> None:
    """A last.pt continues exactly only with as many processes as it was trained by (the data
    slices, step counts and per-rank random streams depend on it): refuse another count."""
    saved = state["resume"].get("world_size", 1)
    now = world.size if world is not None else 1
    if saved != now and state["metadata"]["epoch"] < state["metadata"]["train_config"].get("epochs", 0):
        how = (
            f"torchrun --nproc-per-node {saved} -m digitsum train --resume {path}"
            if saved > 1
            else f"digitsum train --resume {path} (one process, without torchrun)"
        )
        raise DigitsumError(
            f"{path} was trained by {saved} process{'es' if saved > 1 else ''}, "
            f"this is {now}; resume it with the same count: {how}"
        )


def _train(
    config: TrainConfig,
    state: dict | None,
    run_dir: Path,
    data_root,
    log,
    progress: bool,
    stop_after: int | None,
    evaluate_test: bool,
    figures: bool,
    resume: Path | None = None,
    world: World | None = None,
) -> dict:
    """The run itself, once every check has passed (see train)."""
    main = world is None or world.main
    if state is not None and state["metadata"]["epoch"] >= config.epochs:
        if not main:  # rank 0 alone finishes the run; the others wait for it
            distributed.barrier()
            return {"run_dir": run_dir, "epochs": config.epochs, "rank": world.rank}
        log(f"{run_dir} finished training but has no eval.json (its final evaluation did not happen); running it now")
        summary = finish(config, run_dir, list(state["resume"]["rows"]), data_root, log, evaluate_test, figures)
        if world is not None:
            distributed.barrier()
        return summary

    stored_bf16 = None
    if state is not None:
        stored_bf16 = state["metadata"].get("bf16")
        if stored_bf16 is None:  # last.pt of an older version: the choice is in config.json's environment
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                stored_bf16 = json.loads((run_dir / "config.json").read_text())["environment"]["bf16"]
            if not isinstance(stored_bf16, bool):
                stored_bf16 = None
                log("note: this last.pt does not record its precision; deciding it again")
    if world is not None and stored_bf16 is None:
        # One precision for all processes: rank 0's choice (auto looks at each machine's hardware).
        stored_bf16 = distributed.broadcast_object(
            resolve_bf16(config, distributed.rank_device(world, resolve_device(config.device)))
        )
    setup = prepare(config, data_root, bf16=stored_bf16, world=world)
    device, bf16, train_split, val_split = setup.device, setup.bf16, setup.train_split, setup.val_split
    model, optimizer, scheduler, ema, generator = (setup.model, setup.optimizer, setup.scheduler, setup.ema, setup.generator)

    rows: list[dict] = []
    best_score, start_epoch = None, 0
    if state is not None:
        try:
            resume_state = state["resume"]
            model.load_state_dict(checkpoint.train_weights(state))
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            if ema is not None:  # the average is the evaluated "model"; only its step count is extra
                ema.load_state_dict(
                    {
                        "n_averaged": resume_state["ema_n_averaged"],
                        **{f"module.{name}": value for name, value in state["model"].items()},
                    }
                )
            generator.set_state(resume_state["generator"])
            if world is None:
                restore_rng_states(resume_state, device, log)
            else:
                restore_rank_state(setup, resume_state["rank_states"][world.rank])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
            reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
            raise checkpoint.CheckpointError(f"{resume} does not match the run's saved settings ({reason})") from None
        start_epoch, rows = state["metadata"]["epoch"], list(state["resume"]["rows"])
        if main:
            remove_stale_temporaries(run_dir)
        best_score = tuple(state["resume"]["best_score"]) if state["resume"]["best_score"] is not None else None
        log(
            f"resuming {run_dir} at epoch {start_epoch + 1}/{config.epochs} (bf16 autocast: {'on' if bf16 else 'off'}, as stored)"
        )
    elif main:
        make_run_dir(run_dir)
        log(f"training into {run_dir} on {device} (bf16 autocast: {'on' if bf16 else 'off'}), settings:")
        log(describe(config))
        run_info = {
            "train": config.to_dict(),
            "bf16": bf16,
            "environment": environment(device, bf16),
            "data_root": str(data_root),
            "train_images": len(train_split),
            "val_images": len(val_split) if val_split is not None else 0,
        }
        if world is not None:
            run_info["world_size"] = world.size
            run_info["global_batch_size"] = config.batch_size * world.size
        write_atomic(run_dir / "config.json", (json.dumps(run_info, indent=2) + "\n").encode())
        if figures:
            plots.samples(train_split.to("cpu"), run_dir / "samples.png")

    train_config = config.to_dict()
    del train_config["model"]  # it is model_config
    run_environment = environment(device, bf16)  # once: platform.platform() reads the interpreter binary
    del run_environment["bf16"]  # it is metadata.bf16

    def model_payload(epoch: int, val_metrics: dict) -> dict:
        """model.pt's layout (last.pt adds "resume"): the evaluated weights and what they are."""
        return {
            "model_config": config.model.to_dict(),
            "model": setup.eval_model.state_dict(),
            "metadata": {
                "epoch": epoch,
                "val": val_metrics,
                "train_config": train_config,
                "bf16": bf16,
                "environment": run_environment,
                "run": str(run_dir),
            },
        }

    def save_last(epoch: int, val_metrics: dict) -> None:
        # Under torchrun each rank's streams are in rank_states; the top-level CPU one is rank 0's.
        global_rng = rng_states(device) if world is None else {"torch_rng": torch.get_rng_state()}
        resume_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            **global_rng,
            "rows": rows,
            "best_score": list(best_score) if best_score is not None else None,
        }
        if ema is not None:  # "model" is the average; the trained weights and its step count come here
            resume_state["model_train"] = model.state_dict()
            resume_state["ema_n_averaged"] = ema.n_averaged
        if world is not None:
            # Every rank's own random streams, so that a resume continues each of them exactly.
            resume_state["world_size"] = world.size
            resume_state["rank_states"] = distributed.gather_objects(rank_state(setup))
        if main:
            checkpoint.save(run_dir / "last.pt", {**model_payload(epoch, val_metrics), "resume": resume_state})

    if state is None:
        save_last(0, {})  # so that even an interrupted first epoch leaves something to resume
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            start = time.perf_counter()
            train_metrics = setup.epoch(config, progress)
            seconds = time.perf_counter() - start
            if not math.isfinite(train_metrics["loss"]):
                # Checked once per epoch on the summed loss (NaN and inf propagate into it), so the hot
                # loop never syncs; the diverged weights are not saved over the last good epoch.
                raise DigitsumError(
                    f"training diverged: the loss became {train_metrics['loss']} in epoch {epoch} "
                    f"(lower --lr?); {run_dir / 'last.pt'} keeps epoch {epoch - 1}"
                )
            # Under torchrun every rank measures the whole validation split with the same weights:
            # the numbers are those of a single-process evaluation, and all ranks choose the same best.
            val_metrics = measure(setup.eval_model, val_split) if val_split is not None else {}
            row = {
                "epoch": epoch,
                "seconds": round(seconds, 3),
                "lr": f"{scheduler.get_last_lr()[0]:.6g}",
                **{f"train_{k}": f"{v:.6f}" for k, v in train_metrics.items()},
                **{f"val_{k}": f"{v:.6f}" for k, v in val_metrics.items()},
            }
            rows.append(row)
            # Best by validation (sum accuracy, then digit accuracy, then lower loss; later epoch on ties).
            score = (
                (val_metrics["sum_accuracy"], val_metrics["digit_accuracy"], -val_metrics["loss"]) if val_metrics else (epoch,)
            )
            if best_score is None or score >= best_score:
                best_score = score
                if main:
                    checkpoint.save(run_dir / "model.pt", model_payload(epoch, val_metrics))
            if main:
                write_metrics(run_dir / "metrics.csv", rows)
            save_last(epoch, val_metrics)
            if epoch == start_epoch + 1 and main:
                point_latest(run_dir, log)  # only once the run holds a model.pt that commands can use
            log(
                f"epoch {epoch:>2}/{config.epochs}  train loss {train_metrics['loss']:.4f} "
                f"digit {100 * train_metrics['digit_accuracy']:.2f}% sum {100 * train_metrics['sum_accuracy']:.2f}%"
                + (
                    f" | val loss {val_metrics['loss']:.4f} digit {100 * val_metrics['digit_accuracy']:.2f}% "
                    f"sum {100 * val_metrics['sum_accuracy']:.2f}%"
                    if val_metrics
                    else ""
                )
                + f" | lr {scheduler.get_last_lr()[0]:.4f} | {seconds:.1f}s"
            )
            if stop_after is not None and epoch - start_epoch >= stop_after and epoch < config.epochs:
                summary = {"run_dir": run_dir, "epochs": epoch, "stopped": True}
                if world is not None:
                    distributed.barrier()
                    summary.update(
                        rank=world.rank,
                        weights_sha256=distributed.state_digest(model),
                        eval_weights_sha256=distributed.state_digest(setup.eval_model),
                    )
                return summary
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; {run_dir / 'last.pt'} holds the last finished epoch "
            f"(resume with: digitsum train --resume {run_dir / 'last.pt'})"
        ) from None
    if world is None:
        return finish(config, run_dir, rows, data_root, log, evaluate_test, figures)
    # Rank 0 draws the curves and evaluates on the test set; the others wait until the folder is complete.
    summary = (
        finish(config, run_dir, rows, data_root, log, evaluate_test, figures)
        if main
        else {"run_dir": run_dir, "epochs": config.epochs}
    )
    distributed.barrier()
    summary.update(
        rank=world.rank,
        weights_sha256=distributed.state_digest(model),
        eval_weights_sha256=distributed.state_digest(setup.eval_model),
    )
    return summary


def rng_states(device: torch.device) -> dict:
    """The global random streams a resume must continue (dropout): the CPU's, and every CUDA
    device's when training runs on CUDA. The run's own generator is saved separately."""
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, device: torch.device, log=print) -> None:
    """Undo rng_states. A CUDA state is restored on CUDA only when the device count matches."""
    torch.set_rng_state(states["torch_rng"])
    cuda = states.get("cuda_rng")
    if device.type != "cuda":
        return
    if cuda is not None and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    else:
        log(
            "note: this last.pt holds no CUDA random state for this machine's GPUs; "
            "dropout continues from a fresh stream (the run is no longer bit-exact)"
        )


def rank_state(setup: Setup) -> dict:
    """This rank's random streams: its augmentation generator and its global RNG (dropout)."""
    state = {"augment_generator": setup.augment_generator.get_state(), "torch_rng": torch.get_rng_state()}
    if setup.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(setup.device)
    return state


def restore_rank_state(setup: Setup, state: dict) -> None:
    """Undo rank_state: continue this rank's random streams where the saved run left them."""
    setup.augment_generator.set_state(state["augment_generator"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and setup.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], setup.device)


def finish(
    config: TrainConfig, run_dir: Path, rows: list[dict], data_root, log=print, evaluate_test: bool = True, figures: bool = True
) -> dict:
    """The end of a run: curves, then the test evaluation (eval.json marks a run as evaluated).

    When this fails or is interrupted, last.pt (at the final epoch) stays resumable: `--resume`
    runs this step again.
    """
    summary = {"run_dir": run_dir, "epochs": config.epochs, "train_seconds": round(sum(float(r["seconds"]) for r in rows), 2)}
    try:
        if figures:
            plots.curves(run_dir / "metrics.csv", run_dir / "curves.png")
        log(f"trained {config.epochs} epochs in {summary['train_seconds']:.1f}s of training time")
        if evaluate_test:
            metrics = evaluate_checkpoint(run_dir / "model.pt", data_root, config.device, figures=figures)
            log(summary_line(metrics))
            summary["metrics"] = metrics
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during the final evaluation; training is complete in {run_dir} "
            f"(evaluate with: digitsum train --resume {run_dir / 'last.pt'})"
        ) from None
    return summary
