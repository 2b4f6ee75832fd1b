"""What should feed the sum block, and how should it learn? Variants measured side by side.

    python benchmarks/sum_block.py [--preset fast] [--seeds 0]

Each variant trains the preset with one change to the sum block and reports validation digit
and sum accuracy (what the choice was made on) and, for information, the test grid's addition
errors (pairs whose digit is right but whose sum is wrong, out of 100,000).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from dataclasses import replace

from digitsum.train import preset, train

VARIANTS = {
    "softmax -> 128 hidden -> 19, sum lr x13 (chosen)": {},
    "softmax -> linear 20->19 (the original design)": {"model": {"sum_hidden": 0}},
    "logits -> 128 hidden -> 19": {"model": {"sum_input": "logits"}},
    "log-softmax -> 128 hidden -> 19": {"model": {"sum_input": "log_softmax"}},
    "softmax, detached (no sum gradient into the CNN)": {"model": {"detach_sum_input": True}},
    "softmax -> 128 hidden, sum lr x1 (same as the CNN)": {"sum_lr_scale": 1.0},
}


def run(preset_name: str, seed: int, change: dict, data_root) -> dict:
    base = preset(preset_name, seed=seed)
    model = replace(base.model, **change.get("model", {}))
    config = replace(base, model=model, **{k: v for k, v in change.items() if k != "model"})
    with tempfile.TemporaryDirectory() as out:
        summary = train(config, out_dir=out, data_root=data_root, log=lambda *a: None, progress=False, figures=False)
        with open(f"{out}/metrics.csv", newline="") as f:
            last = list(csv.DictReader(f))[-1]
    return {"val_digit": float(last["val_digit_accuracy"]), "val_sum": float(last["val_sum_accuracy"]),
            "errors": summary["metrics"]["grid"]["addition_errors"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"preset {args.preset}, seeds {seeds} (means over seeds)\n")
    print("| sum block variant | val digit accuracy | val sum accuracy | test grid addition errors |")
    print("|---|---|---|---|")
    for name, change in VARIANTS.items():
        results = [run(args.preset, seed, change, args.data_root) for seed in seeds]
        def mean(key):
            return statistics.mean(r[key] for r in results)
        print(f"| {name} | {100 * mean('val_digit'):.2f}% | {100 * mean('val_sum'):.2f}% | {mean('errors'):,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
