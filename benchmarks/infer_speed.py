"""Inference speed of each preset's model, in-process on this machine.

    python benchmarks/infer_speed.py [--checkpoint runs/latest/model.pt] [--seconds 3]

Throughput: images/s for a batch of 1,024 images + numbers (the whole forward: digit and sum
heads), two ways: "plain" = one `model(images, numbers)` call on the training-mode layout, and
"predict path" = what `digitsum predict`/`serve` run (`load_predictor`: BatchNorm folded into the
convolutions; `classify`: the batch in chunks of 128 so activations stay in cache).
Latency: one image + one number through the predict path's model, median and p99.
Both in fp32 and, where the CPU runs it fast, bf16 autocast; channels_last; inference mode.
Weights do not change speed, so presets are measured with their architecture freshly built;
`--checkpoint` adds a row for a trained model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from digitsum.evaluate import autocast, bf16_supported
from digitsum.model import DigitSumNet, count_parameters, fold_batchnorm, training_flops_per_image
from digitsum.predict import INFERENCE_CHUNK, classify
from digitsum.train import PRESETS


def prepared(model: DigitSumNet) -> DigitSumNet:
    return model.eval().to(memory_format=torch.channels_last)


@torch.inference_mode()
def throughput(model, batch: int, bf16: bool, seconds: float, chunk: int | None = None) -> float:
    images = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    numbers = torch.randint(0, 10, (batch,))

    def run():
        if chunk is None:
            model(images, numbers)
        else:
            classify(model, images, numbers.tolist(), chunk=chunk)

    with autocast(torch.device("cpu"), bf16):
        for _ in range(3):  # warm-up: oneDNN picks and caches its kernels on first use
            run()
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            run()
            calls += 1
    return calls * batch / (time.perf_counter() - start)


@torch.inference_mode()
def latency_ms(model, bf16: bool, seconds: float) -> tuple[float, float]:
    image = torch.randn(1, 1, 28, 28)
    number = torch.tensor([3])
    times = []
    with autocast(torch.device("cpu"), bf16):
        for _ in range(20):
            model(image, number)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            model(image, number)
            times.append(time.perf_counter() - start)
    times.sort()
    return 1000 * statistics.median(times), 1000 * times[int(0.99 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="also measure this trained checkpoint")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per cell")
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()

    names_by_architecture: dict = {}
    for name, config in PRESETS.items():  # presets that share an architecture are measured once
        names_by_architecture.setdefault(config.model, []).append(name)
    models = {"preset " + " = ".join(names): DigitSumNet(model_config)
              for model_config, names in names_by_architecture.items()}
    if args.checkpoint:
        from digitsum.checkpoint import load_model

        models[f"checkpoint {args.checkpoint}"] = load_model(args.checkpoint)[0]
    precisions = [False] + ([True] if bf16_supported(torch.device("cpu")) else [])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.seconds:.0f} s per cell\n")
    print("| model | parameters | forward MFLOP/image | precision | plain: images/s at batch "
          f"{args.batch} | predict path: images/s at batch {args.batch} | single image median (ms) | single image p99 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        plain = prepared(model)
        folded = prepared(fold_batchnorm(model))
        forward_mflop = training_flops_per_image(model.config) / 3 / 1e6
        for bf16 in precisions:
            plain_rate = throughput(plain, args.batch, bf16, args.seconds)
            path_rate = throughput(folded, args.batch, bf16, args.seconds, chunk=INFERENCE_CHUNK)
            median, p99 = latency_ms(folded, bf16, args.seconds)
            print(f"| {name} | {count_parameters(model):,} | {forward_mflop:.1f} | {'bf16' if bf16 else 'fp32'} "
                  f"| {plain_rate:,.0f} | {path_rate:,.0f} | {median:.3f} | {p99:.3f} |", flush=True)


if __name__ == "__main__":
    main()
