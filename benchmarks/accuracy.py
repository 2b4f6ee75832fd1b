"""Accuracy of the presets over several seeds: the table behind the README's results.

    python benchmarks/accuracy.py --presets best --seeds 0,1,2 [--out runs/accuracy]

Each (preset, seed) is a full `digitsum train` run (model selection on the validation split,
then one evaluation on the test set) written to OUT/<preset>-seed<seed>/. Prints a markdown
table: seed, test digit accuracy, test sum accuracy, grid addition errors, training minutes,
then mean and standard deviation per preset. An existing finished run is reused, not retrained,
so an interrupted benchmark continues where it stopped (only if its config.json matches the
preset's current settings).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from digitsum.config import PRESETS, preset
from digitsum.train import train


def same_recipe(run_dir: Path, config) -> bool:
    """Whether a finished run was trained with `config` (all settings but the device)."""
    saved = json.loads((run_dir / "config.json").read_text())["train"]
    wanted = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as in the saved file
    ignore = ("device", "preset")
    return {k: v for k, v in saved.items() if k not in ignore} == {k: v for k, v in wanted.items() if k not in ignore}


def run_or_reuse(name: str, seed: int, out: Path, data_root) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    config = preset(name, seed=seed)
    if (run_dir / "eval.json").exists() and same_recipe(run_dir, config):
        metrics = json.loads((run_dir / "eval.json").read_text())
        with open(run_dir / "metrics.csv", newline="") as f:
            seconds = sum(float(row["seconds"]) for row in csv.DictReader(f))
    else:
        summary = train(
            config,
            out_dir=run_dir,
            data_root=data_root,
            overwrite=True,
            log=lambda line: print(f"  [{name} seed {seed}] {line}", flush=True) if line.startswith(("epoch", "test")) else None,
        )
        metrics, seconds = summary["metrics"], summary["train_seconds"]
    return {
        "seed": seed,
        "digit": metrics["test"]["digit_accuracy"],
        "sum": metrics["test"]["sum_accuracy"],
        "errors": metrics["grid"]["addition_errors"],
        "minutes": seconds / 60,
    }


def main() -> None:
    from digitsum.device import reuse_freed_memory

    reuse_freed_memory()  # as `digitsum train` does at its start (process-wide)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="best", help=f"comma-separated, from {', '.join(PRESETS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--out", default="runs/accuracy", help="folder for the runs")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    tables = {}
    for name in args.presets.split(","):
        tables[name] = [run_or_reuse(name, seed, Path(args.out), args.data_root) for seed in seeds]

    print("| preset | seed | test digit accuracy | test sum accuracy | grid addition errors | training minutes |")
    print("|---|---|---|---|---|---|")
    for name, rows in tables.items():
        for row in rows:
            print(
                f"| {name} | {row['seed']} | {100 * row['digit']:.2f}% | {100 * row['sum']:.2f}% "
                f"| {row['errors']} | {row['minutes']:.1f} |"
            )

        def spread(key, scale=100.0):
            values = [scale * row[key] for row in rows]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {std:.3f}"

        print(
            f"| {name} | mean ± std of {len(rows)} | {spread('digit')}% | {spread('sum')}% "
            f"| {spread('errors', 1.0)} | {spread('minutes', 1.0)} |"
        )


if __name__ == "__main__":
    main()
