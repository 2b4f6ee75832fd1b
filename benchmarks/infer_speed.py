"""Inference speed of each preset's model, in-process on this machine.

    python benchmarks/infer_speed.py [--checkpoint runs/latest/model.pt] [--seconds 2] [--rounds 5]
                                     [--threads N] [--backends-only]

Throughput: images/s for a batch of 1,024 images + numbers (the whole forward: digit and sum
heads), two ways: "plain" = one `model(images, numbers)` call of the model as trained (eval mode,
channels-last), and "predict path" = what `digitsum predict`/`serve` run (`load_predictor` ->
`model.inference_model`: BatchNorm folded into the convs, ReLU after the max-pool, a faster
max-pool; `predict.classify`: the batch in chunks of 512 (INFERENCE_CHUNK)).
Latency: one image + one number through the predict path's model, median and p99.
Both in fp32 and, where the CPU has bf16 kernels, bf16 autocast; the line under the table says which
of the two `classify` picks by default on this machine (device.bf16_pays_off measures it).
This shared machine's speed drifts by up to 2x from minute to minute, so each cell is measured
`--rounds` times, interleaved, and the median round is reported with the range.
Weights do not change speed, so presets are measured with their architecture freshly built;
`--checkpoint` adds a row for a trained model.

Where the [onnx] extra is installed, a second table puts the two inference backends side by side
in the same interleaved rounds: "torch" = load_predictor's model through `classify` with its
default precision (what `digitsum predict`/`serve` run), "onnxruntime" = the model exported by
`digitsum export` (export.onnx_bytes) run by onnx_backend.OnnxBackend through the same `classify`.
Both use torch.get_num_threads() threads. Ratios are onnxruntime over torch (>1: onnxruntime better).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from digitsum.device import autocast, bf16_pays_off, bf16_supported, cpu_bf16_speedup, reuse_freed_memory
from digitsum.model import DigitSumNet, count_parameters, inference_model, training_flops_per_image
from digitsum.predict import BF16_MIN_BATCH, INFERENCE_CHUNK, classify
from digitsum.config import PRESETS


def prepared(model: DigitSumNet) -> DigitSumNet:
    return model.eval().to(memory_format=torch.channels_last)


@torch.inference_mode()
def throughput(model, batch: int, bf16: bool | None, seconds: float, chunk: int | None = None) -> float:
    """images/s of one forward of `batch` images: one plain call, or predict.classify in chunks."""
    images = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    numbers = torch.randint(0, 10, (batch,))

    def run():
        if chunk is None:
            with autocast(torch.device("cpu"), bf16):
                model(images, numbers)
        else:
            classify(model, images, numbers.tolist(), chunk=chunk, bf16=bf16)

    for _ in range(3):  # warm-up: oneDNN picks and caches its kernels on first use
        run()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        calls += 1
    return calls * batch / (time.perf_counter() - start)


@torch.inference_mode()
def latency_ms(model, bf16: bool | None, seconds: float) -> tuple[float, float]:
    """Median and p99 of one image + one number through predict.classify."""
    image = torch.randn(1, 1, 28, 28)
    times = []
    for _ in range(20):
        classify(model, image, [3], bf16=bf16)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        classify(model, image, [3], bf16=bf16)
        times.append(time.perf_counter() - start)
    times.sort()
    return 1000 * statistics.median(times), 1000 * times[int(0.99 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="also measure this trained checkpoint")
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per cell and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per cell (median reported)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch (and so onnxruntime) threads (default: torch's, the physical cores)"
    )
    parser.add_argument(
        "--backends-only", action="store_true", help="only the torch vs onnxruntime table (skips the plain/bf16 cells)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as predict.load_predictor does

    names_by_architecture: dict = {}
    for name, config in PRESETS.items():  # presets that share an architecture are measured once
        names_by_architecture.setdefault(config.model, []).append(name)
    models = {"preset " + " = ".join(names): DigitSumNet(model_config) for model_config, names in names_by_architecture.items()}
    if args.checkpoint:
        from digitsum.checkpoint import load_model

        models[f"checkpoint {args.checkpoint}"] = load_model(args.checkpoint)[0]
    precisions = [False] + ([True] if bf16_supported(torch.device("cpu")) else [])

    ways = {name: (prepared(model), inference_model(model)) for name, model in models.items()}  # plain, predict path
    backends = onnx_backends(models)  # name -> OnnxBackend, empty without the [onnx] extra
    cells = {}  # (name, bf16) -> {"plain": [...], "path": [...], "latency": [...]}
    pairs = {}  # name -> {"torch": [...], "onnxruntime": [...], "torch latency": [...], "onnxruntime latency": [...]}
    for round_number in range(args.rounds):
        for name, runner in backends.items():
            cell = pairs.setdefault(name, {})
            order = [("torch", ways[name][1]), ("onnxruntime", runner)]
            for label, model in order if round_number % 2 == 0 else order[::-1]:  # neither always goes first
                cell.setdefault(label, []).append(throughput(model, args.batch, None, args.seconds, chunk=INFERENCE_CHUNK))
                cell.setdefault(label + " latency", []).append(latency_ms(model, None, args.seconds))
        for name, (plain, fast) in ways.items():
            for bf16 in [] if args.backends_only else precisions:
                cell = cells.setdefault((name, bf16), {"plain": [], "path": [], "latency": []})
                cell["plain"].append(throughput(plain, args.batch, bf16, args.seconds))
                cell["path"].append(throughput(fast, args.batch, bf16, args.seconds, chunk=INFERENCE_CHUNK))
                cell["latency"].append(latency_ms(fast, bf16, args.seconds))

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.rounds} interleaved rounds of {args.seconds:g} s per cell: median (min-max)\n"
    )
    if cells:
        precision_table(cells, models, args.batch)
    cpu = torch.device("cpu")
    probe = (
        f"bf16 measured {cpu_bf16_speedup():.2f}x as fast as fp32 by device.cpu_bf16_speedup"
        if bf16_supported(cpu)
        else "no bf16 kernels"
    )
    choice = f"bf16 for batches of {BF16_MIN_BATCH} or more, fp32 below" if bf16_pays_off(cpu) else "fp32"
    print(f"\nclassify's default precision on this machine: {choice} ({probe})")
    if pairs:
        print(
            "\nBackends side by side (predict.classify, default precision; median of the rounds; "
            "ratio = onnxruntime / torch for images/s, torch / onnxruntime for latency):\n"
        )
        print(
            f"| model | torch images/s at batch {args.batch} | onnxruntime images/s | ratio "
            "| torch single image median / p99 (ms) | onnxruntime median / p99 (ms) | ratio (median) |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, cell in pairs.items():
            torch_rate, ort_rate = statistics.median(cell["torch"]), statistics.median(cell["onnxruntime"])
            (t_med, t_p99), (o_med, o_p99) = (
                (statistics.median(m for m, _ in cell[key]), statistics.median(p for _, p in cell[key]))
                for key in ("torch latency", "onnxruntime latency")
            )
            print(
                f"| {name} | {torch_rate:,.0f} | {ort_rate:,.0f} | {ort_rate / torch_rate:.2f}x "
                f"| {t_med:.3f} / {t_p99:.3f} | {o_med:.3f} / {o_p99:.3f} | {t_med / o_med:.2f}x |",
                flush=True,
            )
    else:
        print("\n(onnxruntime not measured: install the [onnx] extra)")


def precision_table(cells: dict, models: dict, batch: int) -> None:
    """The plain / predict path / latency table: one row per model and precision."""

    def rate(values):
        return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"

    print(
        "| model | parameters | forward MFLOP/image | precision | plain: images/s at batch "
        f"{batch} | predict path: images/s at batch {batch} | single image median (ms) | single image p99 (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (name, bf16), cell in cells.items():
        model = models[name]
        forward_mflop = training_flops_per_image(model.config) / 3 / 1e6
        median = statistics.median(m for m, _ in cell["latency"])
        p99 = statistics.median(p for _, p in cell["latency"])
        print(
            f"| {name} | {count_parameters(model):,} | {forward_mflop:.1f} | {'bf16' if bf16 else 'fp32'} "
            f"| {rate(cell['plain'])} | {rate(cell['path'])} | {median:.3f} | {p99:.3f} |",
            flush=True,
        )


def onnx_backends(models: dict) -> dict:
    """name -> OnnxBackend of each model's ONNX export (parity-checked), or {} without the [onnx] extra."""
    try:
        from digitsum.export import check_parity, onnx_bytes, require_exporter, synthetic_images
        from digitsum.onnx_backend import OnnxBackend

        require_exporter()
    except Exception as error:  # the extra is optional for this benchmark
        print(f"onnxruntime backend skipped: {error}")
        return {}
    backends = {}
    for name, model in models.items():
        model = model.eval()
        backends[name] = OnnxBackend(onnx_bytes(model), name=name)
        parity = check_parity(model, backends[name], synthetic_images(100))
        assert parity.ok, parity.table()  # a fast but wrong graph is no result
    return backends


if __name__ == "__main__":
    main()
