"""Time-to-99%: our presets vs the classic PyTorch MNIST example recipe, side by side.

    python benchmarks/train_speed.py [--repeats 3] [--check-every 5000] [--classic-epochs 3]

For each recipe and repetition (each in its own process, so peak RSS is its own):
train, and every `--check-every` training images pause the clock, measure digit and sum
accuracy on the 10,000 test images, and stop once both reach 99.0%. Reported: training
wall time to 99% (evaluation excluded), training images/s, peak RSS, the accuracies at the
stop, and for ours the achieved training FLOP/s as a fraction of this machine's fp32 matmul
peak (a 4096x4096 torch.matmul, measured in the same run). Medians over the repetitions;
the classic/ours-fast ratio is computed pair by pair (repetition i with repetition i).

Test accuracy picks nothing here: it only decides when the clock stops (benchmark only).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGET = 0.99


class Clock:
    """Training time with the evaluation pauses taken out; checks accuracy every N images."""

    def __init__(self, check_every: int, evaluate):
        self.check_every, self.evaluate = check_every, evaluate
        self.images, self.next_check, self.training_seconds = 0, check_every, 0.0
        self.history, self.reached = [], None
        self.mark = time.perf_counter()

    def step(self, model, batch_images: int) -> bool:
        """Call after each optimizer step; True once both accuracies reached the target."""
        self.images += batch_images
        if self.images < self.next_check:
            return False
        self.training_seconds += time.perf_counter() - self.mark
        self.next_check += self.check_every
        digit, total = self.evaluate(model)
        self.history.append((self.images, round(self.training_seconds, 3), digit, total))
        if digit >= TARGET and total >= TARGET and self.reached is None:
            self.reached = self.history[-1]
        self.mark = time.perf_counter()
        return self.reached is not None


def test_accuracy(model, test) -> tuple[float, float]:
    """(digit, sum) accuracy on the test split; the same `measure` for our models and the classic one."""
    from digitsum.evaluate import measure

    metrics = measure(model, test)
    return metrics["digit_accuracy"], metrics["sum_accuracy"]


def matmul_peak_gflops(size: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


# ----------------------------------------------------------------------------- ours


def run_ours(preset_name: str, seed: int, check_every: int, data_root) -> dict:
    from digitsum.data import load_split
    from digitsum.model import training_flops_per_image
    from digitsum.config import preset
    from digitsum.train import prepare

    config = preset(preset_name, seed=seed)
    setup = prepare(config, data_root)
    test = load_split("test", data_root).to(setup.device)

    clock = Clock(check_every, lambda model: test_accuracy(setup.eval_model, test))
    for _ in range(config.epochs):
        setup.epoch(config, on_step=lambda model: clock.step(model, config.batch_size))
        if clock.reached:
            break
    return finish(clock, training_flops_per_image(config.model), f"{config.batch_size}")


# ----------------------------------------------------------------------------- classic


class ClassicNet(nn.Module):
    """pytorch/examples mnist/main.py's Net, plus our sum block (softmax(10) + one-hot(10) -> 128 -> 19)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)
        self.sum_block = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 19))

    def forward(self, x, number):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        digit_logits = self.fc2(x)
        pair = torch.cat([digit_logits.softmax(1), F.one_hot(number, 10).float()], 1)
        return digit_logits, self.sum_block(pair)


CLASSIC_FLOPS = 3 * 2 * (26 * 26 * 32 * 9 + 24 * 24 * 64 * 32 * 9 + 9216 * 128 + 128 * 10 + 20 * 128 + 128 * 19)


class ClassicDataset(torch.utils.data.Dataset):
    """The per-sample dataset of the original write-up: torchvision MNIST + a stored number."""

    def __init__(self, mnist, numbers):
        self.mnist, self.numbers = mnist, numbers

    def __len__(self):
        return len(self.mnist)

    def __getitem__(self, index):
        image, digit = self.mnist[index]
        number = self.numbers[index]
        return {"input_mnist_image": image, "input_number": number, "mnist_gt": digit, "sum_gt": digit + number}


def run_classic(seed: int, check_every: int, epochs: int, data_root) -> dict:
    import torchvision
    from torchvision import transforms

    from digitsum.data import draw_numbers, load_split
    from digitsum.mnist import default_root, ensure_mnist

    root = data_root or default_root()
    ensure_mnist(root)
    torch.manual_seed(seed)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    mnist = torchvision.datasets.MNIST(str(root), train=True, download=False, transform=transform)
    dataset = ClassicDataset(mnist, draw_numbers(len(mnist), seed))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
    model = ClassicNet()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    test = load_split("test", root)
    clock = Clock(check_every, lambda model: test_accuracy(model, test))
    model.train()
    for _ in range(epochs):
        for batch in loader:
            digit_logits, sum_logits = model(batch["input_mnist_image"], batch["input_number"])
            loss = F.cross_entropy(digit_logits, batch["mnist_gt"]) + F.cross_entropy(sum_logits, batch["sum_gt"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if clock.step(model, len(batch["mnist_gt"])):
                break
        if clock.reached:
            break
        scheduler.step()
    return finish(clock, CLASSIC_FLOPS, "64")


def finish(clock: Clock, flops_per_image: int, batch_size: str) -> dict:
    images, seconds, digit, total = clock.reached or clock.history[-1]
    return {"reached": clock.reached is not None, "seconds": seconds, "images": images,
            "images_per_second": images / seconds, "digit_accuracy": digit, "sum_accuracy": total,
            "flops_per_image": flops_per_image, "batch_size": batch_size,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "history": clock.history}


# ----------------------------------------------------------------------------- driver


def child(args) -> None:
    from digitsum.device import reuse_freed_memory

    reuse_freed_memory()  # the same process environment for every recipe (our prepare() sets it anyway)
    if args.recipe == "classic":
        result = run_classic(args.seed, args.check_every, args.classic_epochs, args.data_root)
    else:
        result = run_ours(args.recipe.removeprefix("ours-"), args.seed, args.check_every, args.data_root)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per recipe (default 3)")
    parser.add_argument("--check-every", type=int, default=5000, help="training images between test checks")
    parser.add_argument("--classic-epochs", type=int, default=3, help="cap on the classic recipe's epochs")
    parser.add_argument("--recipes", default="ours-fast,ours-default,classic", help="comma-separated recipes")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--child", dest="recipe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recipe:
        return child(args)

    peak = matmul_peak_gflops()
    recipes = args.recipes.split(",")
    results = {recipe: [] for recipe in recipes}
    for repeat in range(args.repeats):  # interleaved, so slow drift of the machine hits all recipes alike
        for recipe in recipes:
            command = [sys.executable, __file__, "--child", recipe, "--seed", str(repeat),
                       "--check-every", str(args.check_every), "--classic-epochs", str(args.classic_epochs)]
            if args.data_root:
                command += ["--data-root", args.data_root]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(output.split("RESULT ", 1)[1])
            results[recipe].append(result)
            print(f"# {recipe} repeat {repeat}: {result['seconds']:.1f}s to 99% "
                  f"(reached={result['reached']}, {result['images']:,} images)", file=sys.stderr, flush=True)

    print(f"fp32 matmul peak (4096x4096, same run): {peak:.0f} GFLOP/s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} runs; test checked every "
          f"{args.check_every:,} training images\n")
    print("| recipe | batch | time to 99% digit+sum (s) | images to 99% | train images/s | digit | sum "
          "| peak RSS (MB) | GFLOP/s | of fp32 matmul peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for recipe, runs in results.items():
        def median(key):
            return statistics.median(r[key] for r in runs)
        gflops = median("images_per_second") * runs[0]["flops_per_image"] / 1e9
        missed = sum(not r["reached"] for r in runs)
        print(f"| {recipe} | {runs[0]['batch_size']} | {median('seconds'):.1f}"
              f"{f' ({missed} of {len(runs)} never reached)' if missed else ''} | {median('images'):,.0f} "
              f"| {median('images_per_second'):,.0f} | {100 * median('digit_accuracy'):.2f}% "
              f"| {100 * median('sum_accuracy'):.2f}% | {median('peak_rss_mb'):.0f} | {gflops:.0f} "
              f"| {100 * gflops / peak:.0f}% |")
    if "classic" in results and "ours-fast" in results:
        ratios = [c["seconds"] / f["seconds"] for c, f in zip(results["classic"], results["ours-fast"])]
        # A classic run that never reached 99% within its cap only gives a lower bound.
        bound = "" if all(c["reached"] for c in results["classic"]) else ">= "
        print(f"\nclassic / ours-fast time-to-99% ratio, pair by pair: "
              f"{', '.join(f'{bound}{r:.1f}' for r in ratios)}; median {bound}{statistics.median(ratios):.1f}"
              + (" (lower bounds: the classic recipe did not reach 99% within its epoch cap)" if bound else ""))


if __name__ == "__main__":
    main()
