"""What should feed the sum block, and how should it learn? Variants measured side by side.

    python benchmarks/sum_block.py [--preset fast] [--seeds 0] [--only TEXT,...] [--train-limit N]

Each variant trains the preset with one change to the sum block and reports validation digit
and sum accuracy (what the choice was made on) and, for information, the test grid's addition
errors (pairs whose digit is right but whose sum is wrong, out of 100,000) and the addition
table (how many of the 100 sums digit + number the block gets right when the digit head is sure;
for the one-hot input these are the only inputs the block can ever see).

DigitSumNet builds only the chosen sum path; the other variants are subclasses defined here
(`sum_variant`), trained by the same pieces as `digitsum train` (train.prepare, Setup.epoch).
All numbers are of the final epoch's weights (`digitsum train` evaluates its best-by-validation
model.pt on the test set; with the one-cycle schedule that is nearly always the final epoch).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from digitsum.data import load_split
from digitsum.evaluate import evaluate_model, measure
from digitsum.model import NUM_DIGITS, NUM_NUMBERS, NUM_SUMS, DigitSumNet
from digitsum.config import preset
from digitsum.train import build_optimizer, prepare


def sum_variant(representation=None, one_linear: bool = False, detach: bool = False) -> type[DigitSumNet]:
    """A DigitSumNet whose sum block sees `representation(digit_logits)` (None: the shipped one-hot
    predicted digit) instead, is one linear layer 20 -> 19 (`one_linear`), and/or gets no gradient
    from the sum loss into the CNN (`detach`)."""

    class SumVariant(DigitSumNet):
        def __init__(self, config):
            super().__init__(config)
            if one_linear:  # the original design: no hidden layer
                self.sum_block = nn.Linear(NUM_DIGITS + NUM_NUMBERS, NUM_SUMS)

        def add(self, digit_logits, numbers):
            if detach:
                digit_logits = digit_logits.detach()
            if representation is None:
                return super().add(digit_logits, numbers)
            number = F.one_hot(numbers, NUM_NUMBERS).to(torch.float32)
            return self.sum_block(torch.cat([representation(digit_logits.float()), number], dim=1))

    return SumVariant


def softmax(logits):
    return logits.softmax(dim=1)


VARIANTS = {
    "one-hot predicted digit -> 128 hidden -> 19, sum lr x13 (chosen)": {},
    "one-hot predicted digit -> linear 20->19": {"network": sum_variant(one_linear=True)},
    "softmax -> 128 hidden -> 19, sum lr x13 (the first version)": {"network": sum_variant(softmax)},
    "softmax -> linear 20->19 (the original design)": {"network": sum_variant(softmax, one_linear=True)},
    "logits -> 128 hidden -> 19": {"network": sum_variant(lambda logits: logits)},
    "log-softmax -> 128 hidden -> 19": {"network": sum_variant(lambda logits: logits.log_softmax(dim=1))},
    "softmax, detached (no sum gradient into the CNN)": {"network": sum_variant(softmax, detach=True)},
    "softmax -> 128 hidden, sum lr x1 (same as the CNN)": {"network": sum_variant(softmax), "sum_lr_scale": 1.0},
}


def run(preset_name: str, seed: int, change: dict, data_root, train_limit: int = 0) -> dict:
    """Train the preset with `change` (TrainConfig fields, "model": ModelConfig fields, "network": a
    DigitSumNet subclass to train instead) and measure its final weights."""
    base = preset(preset_name, seed=seed, train_limit=train_limit)
    model = replace(base.model, **change.get("model", {}))
    config = replace(base, model=model, **{k: v for k, v in change.items() if k not in ("model", "network")})
    setup = prepare(config, data_root)  # the data, and DigitSumNet seeded exactly as `digitsum train` seeds it
    if "network" in change:
        torch.manual_seed(config.seed)
        network = change["network"](config.model).to(setup.device, memory_format=torch.channels_last)
        steps = len(setup.train_split) // config.batch_size * config.epochs
        optimizer, scheduler = build_optimizer(network, config, steps)
        ema = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) if config.ema else None
        setup = replace(setup, model=network, optimizer=optimizer, scheduler=scheduler, ema=ema)
    seconds = 0.0
    for _ in range(config.epochs):
        start = time.perf_counter()
        setup.epoch(config)
        seconds += time.perf_counter() - start
    val = measure(setup.eval_model, setup.val_split)
    metrics, _ = evaluate_model(setup.eval_model, load_split("test", data_root).to(setup.device), setup.bf16)
    grid = metrics["grid"]
    return {
        "val_digit": val["digit_accuracy"],
        "val_sum": val["sum_accuracy"],
        "errors": grid["addition_errors"],
        "table": grid["addition_table_correct"],
        "minutes": seconds / 60,
    }


def ablation_args(doc: str, default_preset: str):
    """The command line shared by the ablation scripts: --preset, --seeds, --only, --data-root, --train-limit."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=default_preset)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--only", default="", help="comma-separated texts: run only the variants whose names contain one")
    parser.add_argument("--data-root", default=None)
    parser.add_argument(
        "--train-limit",
        type=int,
        default=0,
        help="train on the first N training images only (0 = all; a quick check that every variant runs)",
    )
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def variant_results(args, variants: dict, resolve=lambda preset_name, change: change):
    """For each variant: (name, means over the seeds of run()'s values, the per-seed results)."""
    for name, change in variants.items():
        if not any(text.lower() in name.lower() for text in args.only.split(",")):
            continue
        results = [run(args.preset, seed, resolve(args.preset, change), args.data_root, args.train_limit) for seed in args.seeds]
        yield name, {key: statistics.mean(r[key] for r in results) for key in results[0]}, results


def main() -> None:
    from digitsum.device import reuse_freed_memory

    reuse_freed_memory()  # as `digitsum train` does at its start (process-wide)
    args = ablation_args(__doc__, "fast")
    print(f"preset {args.preset}, seeds {args.seeds} (means over seeds)\n")
    print("| sum block variant | val digit accuracy | val sum accuracy | test grid addition errors | addition table |")
    print("|---|---|---|---|---|")
    for name, mean, results in variant_results(args, VARIANTS):
        print(
            f"| {name} | {100 * mean['val_digit']:.2f}% | {100 * mean['val_sum']:.2f}% | {mean['errors']:,.0f} "
            f"| {min(r['table'] for r in results)}/100 |",
            flush=True,
        )


if __name__ == "__main__":
    main()
