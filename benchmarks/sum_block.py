"""What should feed the sum block, and how should it learn? Variants measured side by side.

    python benchmarks/sum_block.py [--preset fast] [--seeds 0]

Each variant trains the preset with one change to the sum block and reports validation digit
and sum accuracy (what the choice was made on) and, for information, the test grid's addition
errors (pairs whose digit is right but whose sum is wrong, out of 100,000) and the addition
table (how many of the 100 sums digit + number the block gets right when the digit head is sure;
for the one-hot input these are the only inputs the block can ever see).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from dataclasses import replace

from digitsum.config import preset
from digitsum.train import train

VARIANTS = {
    "one-hot predicted digit -> 128 hidden -> 19, sum lr x13 (chosen)": {},
    "one-hot predicted digit -> linear 20->19": {"model": {"sum_hidden": 0}},
    "softmax -> 128 hidden -> 19, sum lr x13 (the first version)": {"model": {"sum_input": "softmax"}},
    "softmax -> linear 20->19 (the original design)": {"model": {"sum_input": "softmax", "sum_hidden": 0}},
    "logits -> 128 hidden -> 19": {"model": {"sum_input": "logits"}},
    "log-softmax -> 128 hidden -> 19": {"model": {"sum_input": "log_softmax"}},
    "softmax, detached (no sum gradient into the CNN)": {"model": {"sum_input": "softmax", "detach_sum_input": True}},
    "softmax -> 128 hidden, sum lr x1 (same as the CNN)": {"model": {"sum_input": "softmax"}, "sum_lr_scale": 1.0},
}


def run(preset_name: str, seed: int, change: dict, data_root) -> dict:
    base = preset(preset_name, seed=seed)
    model = replace(base.model, **change.get("model", {}))
    config = replace(base, model=model, **{k: v for k, v in change.items() if k != "model"})
    with tempfile.TemporaryDirectory() as out:
        summary = train(config, out_dir=out, data_root=data_root, log=lambda *a: None, progress=False, figures=False)
        with open(f"{out}/metrics.csv", newline="") as f:
            last = list(csv.DictReader(f))[-1]
    grid = summary["metrics"]["grid"]
    return {"val_digit": float(last["val_digit_accuracy"]), "val_sum": float(last["val_sum_accuracy"]),
            "errors": grid["addition_errors"], "table": grid["addition_table_correct"],
            "minutes": summary["train_seconds"] / 60}


def ablation_args(doc: str, default_preset: str):
    """The command line shared by the ablation scripts: --preset, --seeds, --only, --data-root."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=default_preset)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--only", default="", help="comma-separated texts: run only the variants whose names contain one")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def variant_results(args, variants: dict, resolve=lambda preset_name, change: change):
    """For each variant: (name, means over the seeds of run()'s values, the per-seed results)."""
    for name, change in variants.items():
        if not any(text.lower() in name.lower() for text in args.only.split(",")):
            continue
        results = [run(args.preset, seed, resolve(args.preset, change), args.data_root) for seed in args.seeds]
        yield name, {key: statistics.mean(r[key] for r in results) for key in results[0]}, results


def main() -> None:
    from digitsum.device import reuse_freed_memory

    reuse_freed_memory()  # as `digitsum train` does at its start (process-wide)
    args = ablation_args(__doc__, "fast")
    print(f"preset {args.preset}, seeds {args.seeds} (means over seeds)\n")
    print("| sum block variant | val digit accuracy | val sum accuracy | test grid addition errors | addition table |")
    print("|---|---|---|---|---|")
    for name, mean, results in variant_results(args, VARIANTS):
        print(f"| {name} | {100 * mean['val_digit']:.2f}% | {100 * mean['val_sum']:.2f}% | {mean['errors']:,.0f} "
              f"| {min(r['table'] for r in results)}/100 |", flush=True)


if __name__ == "__main__":
    main()
