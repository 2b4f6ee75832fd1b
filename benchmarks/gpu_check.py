"""On a CUDA machine: train `fast` and `default`, time them to 99%, and check evaluate/predict/export there.

    python benchmarks/gpu_check.py [--data-root DIR] [--presets fast,default] [--seed 0] [--keep DIR]

Without CUDA it prints "not run: no GPU" and exits 0 (nothing is trained on a CPU).

For each preset, on cuda:
1. time to 99%: the preset trained through train.prepare/Setup.epoch, the clock paused every
   --check-every training images to measure digit and sum accuracy on the 10,000 test images
   (CUDA is synchronised before each reading, so queued kernels count as training time);
2. the full run as a user starts it: `python -m digitsum train --preset P --device cuda`
   (wall time of the command, test accuracy from its eval.json);
3. `digitsum evaluate --device cuda --json` on its model.pt: must repeat eval.json's accuracies;
4. `digitsum predict --json` on 20 test images written as PNG files: must answer every one, and
   mostly right;
5. `digitsum export --check`: the ONNX graph's parity with PyTorch (skipped, with the reason,
   when the [onnx] extra is not installed).
Then one table. The exit status is 1 when a check fails, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.99


def cli(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    """`python -m digitsum ARGS` with this checkout's sources first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "digitsum", *args], env=env, capture_output=True, text=True, timeout=timeout)


def first_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return lines[-1][:160] if lines else f"exit {result.returncode}"


def time_to_target(preset_name: str, seed: int, check_every: int, data_root) -> dict:
    """Training seconds (evaluation pauses excluded) until test digit and sum accuracy both reach 99%."""
    import torch

    from digitsum.data import load_split
    from digitsum.evaluate import measure
    from digitsum.config import preset
    from digitsum.train import prepare

    config = preset(preset_name, seed=seed, device="cuda")
    setup = prepare(config, data_root)
    test = load_split("test", data_root).to(setup.device)
    state = {"images": 0, "next": check_every, "seconds": 0.0, "reached": None, "last": None}
    torch.cuda.synchronize()
    state["mark"] = time.perf_counter()

    def on_step(model) -> bool:
        state["images"] += config.batch_size
        if state["images"] < state["next"]:
            return False
        torch.cuda.synchronize()
        state["seconds"] += time.perf_counter() - state["mark"]
        state["next"] += check_every
        metrics = measure(model, test)
        state["last"] = (state["images"], state["seconds"], metrics["digit_accuracy"], metrics["sum_accuracy"])
        if metrics["digit_accuracy"] >= TARGET and metrics["sum_accuracy"] >= TARGET:
            state["reached"] = state["last"]
        torch.cuda.synchronize()
        state["mark"] = time.perf_counter()
        return state["reached"] is not None

    for _ in range(config.epochs):
        setup.epoch(config, on_step=on_step)
        if state["reached"] is not None:
            break
    images, seconds, digit, total = state["reached"] or state["last"] or (0, 0.0, float("nan"), float("nan"))
    return {
        "reached": state["reached"] is not None,
        "seconds": seconds,
        "images": images,
        "digit_accuracy": digit,
        "sum_accuracy": total,
    }


def write_test_pngs(data_root, folder: Path, count: int = 20) -> list[tuple[Path, int]]:
    """The first `count` test images as PNG files, with their true digits."""
    from PIL import Image

    from digitsum.data import load_split

    test = load_split("test", data_root)
    files = []
    for index in range(count):
        path = folder / f"test{index:02d}.png"
        Image.fromarray(test.images[index].numpy()).save(path)
        files.append((path, int(test.digits[index])))
    return files


def check_preset(preset_name: str, args, work: Path) -> dict:
    """Steps 1-5 for one preset; returns a row of the table (and the problems found)."""
    row = {"preset": preset_name, "problems": []}
    speed = time_to_target(preset_name, args.seed, args.check_every, args.data_root)
    row["time_to_99"] = f"{speed['seconds']:.1f} s" if speed["reached"] else f"not reached ({speed['seconds']:.1f} s)"
    row["images_to_99"] = speed["images"]

    run_dir = work / preset_name
    data_flag = ["--data-root", str(args.data_root)] if args.data_root else []
    start = time.perf_counter()
    result = cli(
        "train",
        "--preset",
        preset_name,
        "--device",
        "cuda",
        "--seed",
        str(args.seed),
        "--out",
        str(run_dir),
        "--overwrite",
        *data_flag,
    )
    row["train_wall"] = f"{time.perf_counter() - start:.1f} s"
    if result.returncode != 0:
        row["problems"].append(f"train: {first_error(result)}")
        return row
    trained = json.loads((run_dir / "eval.json").read_text())
    row["test_digit"] = f"{100 * trained['test']['digit_accuracy']:.2f}%"
    row["test_sum"] = f"{100 * trained['test']['sum_accuracy']:.2f}%"
    environment = json.loads((run_dir / "config.json").read_text())["environment"]
    if not environment["device"].startswith("cuda"):
        row["problems"].append(f"train ran on {environment['device']}, not cuda")
    row["bf16"] = environment["bf16"]

    result = cli("evaluate", str(run_dir / "model.pt"), "--device", "cuda", "--json", "--out", str(work / "eval"), *data_flag)
    if result.returncode != 0:
        row["problems"].append(f"evaluate: {first_error(result)}")
        row["evaluate"] = "failed"
    else:
        again = json.loads(result.stdout)
        same = all(abs(again["test"][k] - trained["test"][k]) < 1e-4 for k in ("digit_accuracy", "sum_accuracy"))
        row["evaluate"] = "same as training's" if same else "differs"
        if not same:
            row["problems"].append(f"evaluate on cuda gave {again['test']} vs the run's {trained['test']}")

    files = write_test_pngs(args.data_root, work)
    result = cli(
        "predict", *[str(path) for path, _ in files], "--number", "3", "--checkpoint", str(run_dir / "model.pt"), "--json"
    )
    if result.returncode != 0:
        row["problems"].append(f"predict: {first_error(result)}")
        row["predict"] = "failed"
    else:
        answers = json.loads(result.stdout)
        right = sum(1 for answer, (_, digit) in zip(answers, files) if answer.get("digit") == digit)
        row["predict"] = f"{right}/{len(files)} digits right"
        if len(answers) != len(files) or right < len(files) - 2:
            row["problems"].append(f"predict: {row['predict']}")

    try:
        from digitsum.export import require_exporter

        require_exporter()
    except Exception as error:  # noqa: BLE001 - any reason the exporter is unusable is reported, not raised
        row["export"] = "skipped"
        print(f"export of {preset_name}: skipped ({error})")
    else:
        result = cli(
            "export", str(run_dir / "model.pt"), "--check", "--out", str(run_dir / "model.onnx"), "--overwrite", *data_flag
        )
        row["export"] = "parity ok" if result.returncode == 0 else "failed"
        if result.returncode != 0:
            row["problems"].append(f"export: {first_error(result)}")
    return row


def main(argv: list[str] | None = None) -> int:
    from digitsum.device import reuse_freed_memory

    reuse_freed_memory()  # as `digitsum train` does at its start (process-wide)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="MNIST data root (default: $DIGITSUM_DATA or ./data)")
    parser.add_argument("--presets", default="fast,default", help="comma-separated presets (default: fast,default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-every", type=int, default=5000, help="training images between test checks")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the runs in DIR (default: a temporary folder)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("not run: no GPU")
        return 0
    sys.path.insert(0, str(REPO / "src"))
    from digitsum.mnist import resolve_root

    args.data_root = resolve_root(args.data_root)
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; data {args.data_root}")
    with tempfile.TemporaryDirectory(prefix="digitsum-gpu-") as temporary:
        work = Path(args.keep) if args.keep else Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        rows = [check_preset(name.strip(), args, work) for name in args.presets.split(",") if name.strip()]
    columns = (
        "preset",
        "time_to_99",
        "images_to_99",
        "train_wall",
        "test_digit",
        "test_sum",
        "bf16",
        "evaluate",
        "predict",
        "export",
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(column, "-")) for column in columns) + " |")
    problems = [f"{row['preset']}: {problem}" for row in rows for problem in row["problems"]]
    for problem in problems:
        print("FAILED " + problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
