"""Every setting of a run, without torch: ModelConfig, TrainConfig, the presets and their checks.

    ModelConfig   what decides the architecture (saved in every checkpoint)
    TrainConfig   every setting of a training run (config.json's "train" section, every checkpoint)
    PRESETS       the named recipes; preset(name, **overrides)
    config_problem(config) -> one line saying why a config cannot be trained, or ""
    read_config_file(path) -> the TrainConfig of a run's config.json (`digitsum train --config`)

Each field's documentation is its metadata (`setting(default, help, choices)`, the HfArgumentParser
convention): `digitsum train` generates one flag per field from it (cli.config_flags).

Importing this module imports no torch, so the command line can build its flags, validate a run's
settings and print --help before torch is loaded.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace

from digitsum.errors import DigitsumError

MAX_STAGES = 4  # 28 -> 14 -> 7 -> 3 -> 1
MAX_CHANNELS = 4096  # far above any preset (128); bounds what a config or checkpoint may ask to build
OPTIMIZERS = ("sgd", "adamw")
BF16_MODES = ("auto", "on", "off")


# Settings that once chose ablation variants inside DigitSumNet and the training loop. Those variants
# are no longer built there (the benchmark named builds its own); old checkpoints and config.json files
# still carry the settings. The one table for both dataclasses (section "model": ModelConfig,
# "train": TrainConfig): name -> (the value every shipped model had, where the variant lives now).
RETIRED_SETTINGS: dict[str, dict[str, tuple[object, str]]] = {
    "model": {
        "sum_input": ("onehot", "benchmarks/sum_block.py"),
        "detach_sum_input": (False, "benchmarks/sum_block.py"),
        "batchnorm": (True, "benchmarks/recipe.py"),
    },
    "train": {
        "digit_loss_weight": (1.0, ""),
        "sum_loss_weight": (1.0, ""),
        "shear": (0.0, ""),
        "redraw_numbers": (False, ""),
        "channels_last": (True, ""),
    },
}


def drop_retired(values: dict, section: str) -> dict:
    """`values` without the RETIRED_SETTINGS of `section` that hold their shipped value; a ValueError
    (one line) naming the first that holds another (an ablation variant this version does not build)."""
    kept = dict(values)
    for name, (shipped, where) in RETIRED_SETTINGS[section].items():
        if name not in kept:
            continue
        value = kept.pop(name)
        if value != shipped or isinstance(value, bool) != isinstance(shipped, bool):
            raise ValueError(
                f"{section} setting {name} = {value!r} was an ablation variant that is no longer "
                f"built (only {shipped!r} is{'; ' + where + ' builds the variants' if where else ''})"
            )
    return kept


def setting(default, help: str, choices: tuple | None = None):
    """A dataclass field with its documentation (the HfArgumentParser convention): `help` and a fixed
    set of `choices`, if any, are what `digitsum train` generates the field's flag from (cli.add_config_flags)."""
    return field(default=default, metadata={"help": help} if choices is None else {"help": help, "choices": choices})


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides the architecture (saved in every checkpoint)."""

    channels: tuple[int, ...] = setting(
        (16, 32, 64),
        "output channels of each stage, 1 to 4 stages; one stage = "
        "--convs-per-stage 3x3 conv+BN+ReLU layers, then a 2x2 max-pool",
    )
    convs_per_stage: int = setting(1, "3x3 conv layers per stage")
    # 2: the first conv has stride 2 and replaces the first max-pool (28x28 -> 14x14 at once), which
    # skips the one full-resolution activation, the memory-bound part of a small CNN. At equal
    # epochs and channels it cost 0.08-0.18 validation points (16 epochs, (16,32,64)); `fast` uses it
    # with norm_after_pool, and so does `default` at twice the channels, which at equal cost per epoch
    # beats the stride-1 (16,32,64) net in a short schedule (PRESETS).
    first_stride: int = setting(
        1, "2: a stride-2 first conv replaces the first max-pool (faster, a little less accurate)", choices=(1, 2)
    )
    # True: each stage's last BatchNorm+ReLU come after its max-pool (conv -> pool -> BN -> ReLU), so
    # they touch a quarter of the values - in training, where BN cannot be folded away, that is most
    # of the memory-bound work. A different net (BN normalises pooled values), not a rewrite of the
    # same one; `fast` uses it with first_stride=2 (benchmarks/train_speed.py).
    norm_after_pool: bool = setting(False, "each stage's last BatchNorm+ReLU after its max-pool (conv -> pool -> BN -> ReLU)")
    dropout: float = setting(0.0, "dropout before the digit classifier")
    sum_hidden: int = setting(128, "hidden units of the sum block 20 -> sum_hidden -> 19")
    # MNIST fits each digit's box into 20x20 and centres its mass in 28x28, so the outer ring is
    # nearly always empty (1 px: 0.009% of the training set's ink, in 1.4% of its images; 2 px: 0.23%,
    # 12%). Cutting it off shrinks every activation: crop 1 leaves 26x26, which a stride-2 first conv
    # takes to 13x13, and the next conv + floor pool compute 12x12 of it (Conv2dBeforePool).
    crop: int = setting(0, "pixels cut off each side of the 28x28 image before the first conv (its empty border)")

    def __post_init__(self):
        # JSON round trips turn tuples into lists; keep the dataclass hashable and comparable.
        if isinstance(self.channels, (str, bytes)) or not hasattr(self.channels, "__iter__"):
            raise ValueError(f"channels must be a list of integers, got {self.channels!r}")
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in self.channels):
            raise ValueError(f"channels must be a list of integers, got {list(self.channels)!r}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

    def validate(self) -> "ModelConfig":
        """Raise ValueError (one line) unless every field has a type and range the network can use.

        Cheap and builds nothing, so callers run it before any data, file or model exists.
        """

        def whole(name: str, low: int, high: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"model {name} must be an integer in {low}..{high}, got {value!r}")

        channels = self.channels
        if not 1 <= len(channels) <= MAX_STAGES:  # each stage halves 28x28; a fifth would leave 0x0
            raise ValueError(f"model channels must list 1..{MAX_STAGES} stages, got {list(channels)}")
        if not all(1 <= c <= MAX_CHANNELS for c in channels):
            raise ValueError(f"model channels must each be in 1..{MAX_CHANNELS}, got {list(channels)}")
        whole("convs_per_stage", 1, 8)
        whole("crop", 0, 6)
        if (28 - 2 * self.crop) >> len(channels) == 0:  # model.IMAGE_SIZE; each stage halves
            raise ValueError(f"model crop {self.crop} leaves too small an image for {len(channels)} stages")
        if self.first_stride not in (1, 2) or isinstance(self.first_stride, bool):
            raise ValueError(f"model first_stride must be 1 or 2, got {self.first_stride!r}")
        if not isinstance(self.norm_after_pool, bool):
            raise ValueError(f"model norm_after_pool must be true or false, got {self.norm_after_pool!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"model dropout must be in [0, 1), got {self.dropout!r}")
        if self.sum_hidden == 0 and not isinstance(self.sum_hidden, bool):
            raise ValueError(
                "model sum_hidden = 0 (one linear layer 20 -> 19) was an ablation variant that is no "
                "longer built (benchmarks/sum_block.py builds it)"
            )
        whole("sum_hidden", 1, MAX_CHANNELS)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """The config saved by to_dict (also an older version's: see RETIRED_SETTINGS); ValueError if unusable."""
        values = drop_retired(values, "model")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model settings: {sorted(unknown)}")
        return cls(**values)


def check_device_name(name: object) -> str:
    """Why `name` is not a device this project accepts (auto, cpu, cuda, cuda:N, mps), or "" when it is.

    Syntax only: nothing is asked of the hardware, so configs can be checked before any work starts.
    """
    if not isinstance(name, str):
        return f"device must be a string, got {name!r}"
    if name in ("auto", "cpu", "cuda", "mps"):
        return ""
    if name.startswith("cuda:") and name[5:].isdigit() and name[5:].isascii():
        return ""
    return f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (saved in config.json and in every checkpoint)."""

    preset: str = setting("default", "the named recipe these settings started from")
    epochs: int = setting(16, "number of epochs")
    batch_size: int = setting(256, "images per batch (per process under torchrun)")
    optimizer: str = setting("sgd", "sgd (Nesterov momentum 0.9) or adamw", choices=OPTIMIZERS)
    lr: float = setting(0.3, "peak learning rate of the one-cycle schedule")
    # The sum block learns addition slowly at the CNN's rate (see README).
    sum_lr_scale: float = setting(13.0, "the sum block's learning rate as a multiple of --lr")
    warmup: float = setting(0.2, "fraction of steps spent rising to the peak learning rate")
    weight_decay: float = setting(5e-4, "weight decay (not applied to BatchNorm and biases)")
    label_smoothing: float = setting(0.1, "label smoothing of both cross-entropies")
    # Batch augmentation (0 = off).
    rotate: float = setting(8.0, "augmentation: random rotation up to +-this many degrees (0 = off)")
    scale: float = setting(0.08, "augmentation: random zoom by up to +-this fraction (0 = off)")
    translate: float = setting(1.5, "augmentation: random shift up to +-this many pixels (0 = off)")
    sum_all_numbers: bool = setting(False, "train the sum block on every image with every number 0..9")
    ema: float = setting(0.0, "decay of an exponential moving average of the weights, used for evaluation (0 = off)")
    val_size: int = setting(5000, "training images held out for validation (deterministic split)")
    train_limit: int = setting(0, "train on the first N training images only (0 = all)")
    seed: int = setting(0, "seed for the split, the numbers, initialisation and shuffling")
    device: str = field(
        default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", "check": check_device_name}
    )
    bf16: str = setting(
        "auto",
        "bfloat16 autocast: auto (on a CUDA GPU with bf16, on a CPU with AMX-BF16: "
        "device.bf16_pays_off; the choice is stored in the run and reused on resume), on, off",
        choices=BF16_MODES,
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the architecture"})

    def validate(self) -> "TrainConfig":
        """Raise DigitsumError (one line) unless every setting has a usable type, range and finite value.

        Runs before any data is loaded or any file or folder is written (train() calls it for new
        runs and on a resumed run's saved settings), so a bad value costs nothing and leaves nothing.
        """
        problem = config_problem(self)
        if problem:
            raise DigitsumError(problem)
        return self

    def to_dict(self) -> dict:
        values = asdict(self)
        values["model"] = self.model.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The settings saved by to_dict (also an older version's: see RETIRED_SETTINGS)."""
        try:
            values = drop_retired(values, "train")
        except ValueError as error:
            raise DigitsumError(str(error)) from None
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise DigitsumError(f"unknown training settings: {sorted(unknown)}")
        values["model"] = ModelConfig.from_dict(values.get("model", {}))
        return cls(**values)


# Seeds: torch.manual_seed takes 0..2**64-1, and the data draws each split's numbers with seed * 10 + stream
# (data.load_split, stream <= 3), which must fit too.
MAX_SEED = (2**64 - 1 - 3) // 10
MAX_EPOCHS = 100_000


def config_problem(config: TrainConfig) -> str:
    """Why `config` cannot be trained (one line), or "" when every field is usable."""

    def number(name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> str:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{name} must be a finite number, got {value!r}"
        if value < low or (low_open and value == low) or value > high or (high_open and value == high):
            if high == math.inf:
                return f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}"
            return f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, got {value!r}"
        return ""

    def whole(name: str, low: int, high: int) -> str:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"{name} must be an integer in {low}..{high}, got {value!r}"
        return ""

    checks = [
        "" if config.preset in PRESETS else f"preset must be one of {', '.join(PRESETS)}, got {config.preset!r}",
        whole("epochs", 1, MAX_EPOCHS),
        whole("batch_size", 1, 1 << 20),
        "" if config.optimizer in OPTIMIZERS else f"optimizer must be sgd or adamw, got {config.optimizer!r}",
        number("lr", 0, math.inf, low_open=True),
        number("sum_lr_scale", 0, math.inf, low_open=True),
        number("warmup", 0, 1),
        number("weight_decay", 0, math.inf),
        number("label_smoothing", 0, 1, high_open=True),
        number("rotate", 0, 180),
        number("scale", 0, 1, high_open=True),  # a zoom of 1 - scale must stay > 0
        number("translate", 0, 28),
        number("ema", 0, 1, high_open=True),
        whole("val_size", 0, 1 << 31),
        whole("train_limit", 0, 1 << 31),
        whole("seed", 0, MAX_SEED),
        check_device_name(config.device),
        "" if config.bf16 in BF16_MODES else f"bf16 must be auto, on or off, got {config.bf16!r}",
    ]
    if not isinstance(config.sum_all_numbers, bool):
        checks.append(f"sum_all_numbers must be true or false, got {config.sum_all_numbers!r}")
    if not isinstance(config.model, ModelConfig):
        checks.append(f"model must be a ModelConfig, got {type(config.model).__name__}")
    else:
        try:
            config.model.validate()
        except ValueError as error:
            checks.append(str(error))
    return next((problem for problem in checks if problem), "")


# Named recipes. Explicit flags override a preset's values. Each was chosen on the validation
# split; the README lists the measurements behind them.
PRESETS: dict[str, TrainConfig] = {
    # What `make train` runs: 99.5% in 7 epochs, 28-62 s of training on a 2-core AMX CPU (bf16), as the VM's speed varies.
    # fast's layout (stride-2 first conv, conv -> pool -> BN -> ReLU) at (32, 48, 64) channels on the
    # image without its empty 1 px border (crop 1: 6.1 MFLOP a forward pass), dropout 0.25. Chosen on
    # validation (3 seeds each): the fastest candidate not below the previous default ((32, 48, 96)
    # uncropped, 8.5 MFLOP: 99.41%) - crop 1 at (32, 48, 64) 99.43%; at (32, 48, 96) 99.49% but 1.5x
    # its last conv; crop 2, (32, 32, 96) and 6 epochs lower. Earlier: (24, 48, 96) lost to CPU
    # BatchNorm, ~3x slower channels-last at 24 channels than at 32 (not a multiple of 16).
    # docs/RESULTS.md 2.7 has the tables.
    "default": TrainConfig(
        epochs=7, model=ModelConfig(channels=(32, 48, 64), first_stride=2, norm_after_pool=True, dropout=0.25, crop=1)
    ),
    # Time-to-99%: two epochs, no augmentation, light weight decay, and a cheaper layout of the same
    # channels - a stride-2 first conv instead of the first pool, BatchNorm after each later pool -
    # that skips most memory-bound work (1.9x training images/s on a 2-core CPU, benchmarks/train_speed.py).
    "fast": TrainConfig(
        preset="fast",
        epochs=2,
        weight_decay=1e-4,
        rotate=0.0,
        scale=0.0,
        translate=0.0,
        model=ModelConfig(first_stride=2, norm_after_pool=True),
    ),
    # Accuracy: a deeper, wider CNN, stronger augmentation, longer, and the sum block trained on
    # every image with every number.
    "best": TrainConfig(
        preset="best",
        epochs=20,
        lr=0.2,
        sum_lr_scale=20.0,
        rotate=10.0,
        scale=0.1,
        translate=2.0,
        sum_all_numbers=True,
        model=ModelConfig(channels=(32, 64, 128), convs_per_stage=2),
    ),
}


def preset(name: str, **overrides) -> TrainConfig:
    """A preset's TrainConfig with `overrides` applied (model settings via model=ModelConfig)."""
    if name not in PRESETS:
        raise DigitsumError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], preset=name, **overrides)


def describe(config: TrainConfig) -> str:
    """The settings as one readable block (printed at the start of a run)."""
    values = config.to_dict()
    model = values.pop("model")
    lines = [f"  {k} = {v}" for k, v in values.items()] + [f"  model.{k} = {v}" for k, v in model.items()]
    return "\n".join(lines)


def read_config_file(path: str | os.PathLike) -> TrainConfig:
    """The TrainConfig saved in a run's config.json (its "train" section), or in a JSON file that is
    such a section by itself; every problem is one DigitsumError line.

    When the settings say bf16 "auto" and the file records the precision its run resolved that to
    (config.json's "bf16"), that precision is pinned ("on"/"off"), so the run is repeated in the
    same arithmetic on any machine. Values are not range-checked here (TrainConfig.validate does).
    """
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, ValueError) as error:
        raise DigitsumError(f"cannot read --config {path} ({getattr(error, 'strerror', None) or error})") from None
    try:
        values = json.loads(text)
    except ValueError as error:
        raise DigitsumError(f"--config {path} is not JSON ({error})") from None
    if not isinstance(values, dict):
        raise DigitsumError(f"--config {path} must hold a JSON object, got {type(values).__name__}")
    run_bf16 = values.get("bf16") if "train" in values else None
    section = values.get("train", values)
    if not isinstance(section, dict):
        raise DigitsumError(f'--config {path}: "train" must be a JSON object, got {type(section).__name__}')
    if not isinstance(section.get("model", {}), dict):
        raise DigitsumError(f'--config {path}: "model" must be a JSON object, got {type(section["model"]).__name__}')
    try:
        config = TrainConfig.from_dict(section)
    except (DigitsumError, ValueError, TypeError) as error:
        raise DigitsumError(f"--config {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if config.bf16 == "auto" and isinstance(run_bf16, bool):
        config = replace(config, bf16="on" if run_bf16 else "off")
    return config
