"""Time-to-99% and time-to-99.5%: our presets, the previous default recipe and the classic PyTorch
MNIST example recipe, side by side.

    python benchmarks/train_speed.py [--seeds 0,1,2]
        [--recipes ours-fast,ours-default,ours-previous-default,ours-old-default,classic]
        [--check-every 5000] [--classic-epochs 3] [--targets 0.99,0.995]

For each recipe and seed (each in its own process, so peak RSS is its own): train, and every
`--check-every` training images pause the clock and measure digit and sum accuracy on the 10,000
test images; note the training time (evaluation excluded) at which both first reach each target,
and stop once the highest target is reached or the recipe's epochs are done. A recipe that never
reaches a target gives a lower bound: its whole training time ("> N s"). Reported per target:
the median over seeds with the range, how many seeds reached it, and for the highest target the
training images/s, peak RSS, final accuracies and, for ours, the achieved training FLOP/s as a
fraction of this machine's fp32 matmul peak (a 4096x4096 torch.matmul, measured in the same run).
Seeds are interleaved (seed 0 of every recipe, then seed 1, ...), so slow drift of the machine hits
all recipes alike; the classic/ours-fast and old/new default ratios are computed seed by seed.

Recipes: ours-fast and ours-default are today's presets; ours-old-default is the default recipe
before issue 14 and ours-previous-default the one before the crop (both defined below, so they stay
measurable); classic is pytorch/examples mnist/main.py.
The whole default run takes 35-40 minutes on a 2-core CPU (3 recipes took 25+ min); pass fewer --seeds or
--recipes for a quicker look (e.g. --seeds 0 --recipes ours-default,ours-old-default).

    python benchmarks/train_speed.py --step-cost '32,48,64;16,48,64;16,32,64'

prints instead the cost of one training step of the default recipe at other channel counts,
interleaved in one process (a minute; what docs/RESULTS.md 2.7's cheaper-net table starts from).

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

TARGETS = (0.99, 0.995)


def old_default():
    """The `default` preset before issue 14 (16 epochs, ~100 s on a 2-core AMX CPU in bf16), kept here
    so that it stays measurable after the preset changed."""
    from digitsum.model import ModelConfig
    from digitsum.train import TrainConfig

    return TrainConfig(
        preset="default",
        epochs=16,
        batch_size=256,
        optimizer="sgd",
        lr=0.3,
        warmup=0.2,
        weight_decay=5e-4,
        label_smoothing=0.1,
        sum_lr_scale=13.0,
        rotate=8.0,
        scale=0.08,
        translate=1.5,
        model=ModelConfig(channels=(16, 32, 64), dropout=0.25),
    )


def previous_default():
    """The `default` preset of the sessions between issue 14's first recipe and the crop: 7 epochs of
    (32, 48, 96) on the whole 28x28 image (8.5 MFLOP a forward pass against today's 6.1)."""
    from dataclasses import replace

    from digitsum.config import preset
    from digitsum.model import ModelConfig

    return replace(
        preset("default"), model=ModelConfig(channels=(32, 48, 96), first_stride=2, norm_after_pool=True, dropout=0.25)
    )


class Clock:
    """Training time with the evaluation pauses taken out; checks accuracy every N images."""

    def __init__(self, check_every: int, evaluate, targets=TARGETS):
        self.check_every, self.evaluate, self.targets = check_every, evaluate, tuple(sorted(targets))
        self.images, self.next_check, self.training_seconds = 0, check_every, 0.0
        self.history = []
        self.reached_at = {}  # target -> (images, seconds, digit, sum) of the first check that met it
        self.mark = time.perf_counter()

    @property
    def reached(self):
        """The check at which the highest target was met, or None."""
        return self.reached_at.get(self.targets[-1])

    def step(self, model, batch_images: int) -> bool:
        """Call after each optimizer step; True once both accuracies reached the highest target."""
        self.images += batch_images
        if self.images < self.next_check:
            return False
        self.training_seconds += time.perf_counter() - self.mark
        self.next_check += self.check_every
        digit, total = self.evaluate(model)
        self.history.append((self.images, round(self.training_seconds, 3), digit, total))
        for target in self.targets:
            if digit >= target and total >= target and target not in self.reached_at:
                self.reached_at[target] = self.history[-1]
        self.mark = time.perf_counter()
        return self.reached is not None

    def finish(self, model) -> None:
        """Count the training after the last check (a run that ends between checks) and check once more."""
        if self.images and (not self.history or self.history[-1][0] != self.images):
            self.next_check = self.images
            self.step(model, 0)


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


def run_ours(recipe: str, seed: int, check_every: int, data_root, targets=TARGETS) -> dict:
    from dataclasses import replace

    from digitsum.data import load_split
    from digitsum.model import training_flops_per_image
    from digitsum.config import preset
    from digitsum.train import prepare

    if recipe == "old-default":
        config = replace(old_default(), seed=seed)
    elif recipe == "previous-default":
        config = replace(previous_default(), seed=seed)
    else:
        config = preset(recipe, seed=seed)
    setup = prepare(config, data_root)
    test = load_split("test", data_root).to(setup.device)

    clock = Clock(check_every, lambda model: test_accuracy(setup.eval_model, test), targets)
    for _ in range(config.epochs):
        setup.epoch(config, on_step=lambda model: clock.step(model, config.batch_size))
        if clock.reached:
            break
    if not clock.reached:
        clock.finish(setup.eval_model)
    return finish(clock, training_flops_per_image(config.model), f"{config.batch_size}", config.epochs)


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


def run_classic(seed: int, check_every: int, epochs: int, data_root, targets=TARGETS) -> dict:
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
    clock = Clock(check_every, lambda model: test_accuracy(model, test), targets)
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
    if not clock.reached:
        clock.finish(model)
    return finish(clock, CLASSIC_FLOPS, "64", epochs)


def finish(clock: Clock, flops_per_image: int, batch_size: str, epochs: int) -> dict:
    """Per target: reached or not, and the training seconds/images at the first check that met it,
    or (not reached) the whole run's, a lower bound."""
    images, seconds, digit, total = clock.reached or clock.history[-1]
    per_target = {}
    for target in clock.targets:
        hit = clock.reached_at.get(target)
        at = hit or clock.history[-1]
        per_target[str(target)] = {"reached": hit is not None, "seconds": at[1], "images": at[0]}
    return {
        "reached": clock.reached is not None,
        "seconds": seconds,
        "images": images,
        "images_per_second": images / seconds,
        "digit_accuracy": digit,
        "sum_accuracy": total,
        "targets": per_target,
        "epochs": epochs,
        "flops_per_image": flops_per_image,
        "batch_size": batch_size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "history": clock.history,
    }


# ----------------------------------------------------------------------------- driver


def child(args) -> None:
    from digitsum.device import reuse_freed_memory

    reuse_freed_memory()  # the same process environment for every recipe (our prepare() sets it anyway)
    targets = parse_targets(args.targets)
    if args.recipe == "classic":
        result = run_classic(args.seed, args.check_every, args.classic_epochs, args.data_root, targets)
    else:
        result = run_ours(args.recipe.removeprefix("ours-"), args.seed, args.check_every, args.data_root, targets)
    print("RESULT " + json.dumps(result))


RECIPES = ("ours-fast", "ours-default", "ours-previous-default", "ours-old-default", "classic")


def step_cost(channel_sets: list[tuple[int, ...]], rounds: int = 8, steps: int = 20) -> None:
    """--step-cost: the default recipe's training step (forward, loss, backward, optimizer and
    schedule step; batch 256, bf16 as `--bf16 auto` decides, channels-last) at each channel set,
    interleaved in one process: `rounds` rounds of `steps` steps per net after 3 warm-up steps;
    median ms and the median of the per-round ratios to the first set. No data pipeline: random
    images, so only the net's cost differs between rows."""
    from dataclasses import replace

    from digitsum.config import preset
    from digitsum.device import autocast, bf16_pays_off, reuse_freed_memory
    from digitsum.model import DigitSumNet
    from digitsum.train import build_optimizer, loss_fn

    base = preset("default")
    configs = [replace(base, model=replace(base.model, channels=channels)) for channels in channel_sets]
    for config in configs:  # every net checked (ValueError, one line) before any is built
        config.model.validate()
    reuse_freed_memory()
    torch.manual_seed(0)
    device = torch.device("cpu")
    bf16 = bf16_pays_off(device)
    nets = []
    for config in configs:
        model = DigitSumNet(config.model).to(memory_format=torch.channels_last).train()
        nets.append((config, model, *build_optimizer(model, config, 10_000)))
    images = torch.randn(base.batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    numbers, digits = torch.randint(0, 10, (base.batch_size,)), torch.randint(0, 10, (base.batch_size,))

    def step(config, model, optimizer, scheduler):
        with autocast(device, bf16):
            digit_logits, sum_logits = model(images, numbers)
        loss = loss_fn(digit_logits, sum_logits, digits, digits + numbers, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    times = [[] for _ in nets]
    for _ in range(rounds):
        for net, record in zip(nets, times):
            for _ in range(3):
                step(*net)
            start = time.perf_counter()
            for _ in range(steps):
                step(*net)
            record.append(1000 * (time.perf_counter() - start) / steps)
    print(
        f"training step of `default` at other channels, batch {base.batch_size}, bf16 {'on' if bf16 else 'off'}, "
        f"{torch.get_num_threads()} threads; {rounds} interleaved rounds of {steps} steps: median\n"
    )
    print(f"| channels | ms a step | vs {','.join(map(str, channel_sets[0]))} |")
    print("|---|---|---|")
    for channels, record in zip(channel_sets, times):
        ratio = statistics.median(a / b for a, b in zip(record, times[0]))
        print(f"| {','.join(map(str, channels))} | {statistics.median(record):.1f} | {ratio:.2f}x |")


def parse_targets(text: str) -> tuple[float, ...]:
    return tuple(sorted(float(t) for t in text.split(",")))


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """median (min-max) of a list, or the one value."""
    median = fmt.format(statistics.median(values))
    return median if len(values) == 1 else f"{median} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def time_cell(runs: list[dict], target: str) -> str:
    """Median (range) of the time to `target`; '>' where some seed never reached it (its whole
    training time is then only a lower bound, and so is the median if half or more missed)."""
    hits = [r["targets"][target] for r in runs]
    missed = sum(not h["reached"] for h in hits)
    seconds = [h["seconds"] for h in hits]
    cell = spread(seconds)
    if missed == len(runs):
        return f"> {cell} (never reached)"
    if missed:
        bound = "> " if missed * 2 >= len(runs) else ""
        return f"{bound}{cell} ({missed} of {len(runs)} never reached: lower bounds)"
    return cell


def ratio_cell(slow: list[dict], fast: list[dict], target: str) -> str:
    """slow/fast time ratios seed by seed; '>=' where the slow one never reached the target,
    '<=' where the fast one did not, '?' where neither did."""
    cells = []
    for a, b in zip(slow, fast):
        ha, hb = a["targets"][target], b["targets"][target]
        ratio = ha["seconds"] / hb["seconds"]
        mark = "" if ha["reached"] and hb["reached"] else ">= " if hb["reached"] else "<= " if ha["reached"] else "? "
        cells.append(f"{mark}{ratio:.1f}")
    return ", ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per recipe each (default 0,1,2)")
    parser.add_argument("--repeats", type=int, default=None, help="shorthand for --seeds 0,...,N-1")
    parser.add_argument("--check-every", type=int, default=5000, help="training images between test checks")
    parser.add_argument("--classic-epochs", type=int, default=3, help="cap on the classic recipe's epochs")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument(
        "--targets",
        default=",".join(str(t) for t in TARGETS),
        help="comma-separated test accuracies (digit and sum) to time (default 0.99,0.995)",
    )
    parser.add_argument("--data-root", default=None)
    parser.add_argument(
        "--step-cost",
        default=None,
        metavar="C,C,C;C,C,C;...",
        help="instead: the default recipe's training step at these channel sets, interleaved (e.g. '32,48,64;16,32,64')",
    )
    parser.add_argument("--child", dest="recipe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recipe:
        return child(args)
    if args.step_cost:
        try:
            return step_cost([tuple(int(c) for c in group.split(",")) for group in args.step_cost.split(";")])
        except ValueError as error:  # a malformed number or a net that cannot be built: nothing ran yet
            parser.error(f"--step-cost: {error}")
    seeds = list(range(args.repeats)) if args.repeats else [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    targets = [str(t) for t in parse_targets(args.targets)]

    peak = matmul_peak_gflops()
    results = {recipe: [] for recipe in recipes}
    for seed in seeds:  # interleaved, so slow drift of the machine hits all recipes alike
        for recipe in recipes:
            command = [
                sys.executable,
                __file__,
                "--child",
                recipe,
                "--seed",
                str(seed),
                "--targets",
                args.targets,
                "--check-every",
                str(args.check_every),
                "--classic-epochs",
                str(args.classic_epochs),
            ]
            if args.data_root:
                command += ["--data-root", args.data_root]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(output.split("RESULT ", 1)[1])
            results[recipe].append(result)
            print(
                f"# {recipe} seed {seed}: "
                + ", ".join(
                    f"{float(t):.1%} {'at' if h['reached'] else 'not reached in'} {h['seconds']:.1f}s"
                    for t, h in result["targets"].items()
                ),
                file=sys.stderr,
                flush=True,
            )

    print(
        f"fp32 matmul peak (4096x4096, same run): {peak:.0f} GFLOP/s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; seeds {','.join(map(str, seeds))}: median (min-max); test checked "
        f"every {args.check_every:,} training images; '>': never reached, the whole training time is a lower bound\n"
    )
    print(
        "| recipe | epochs | batch | "
        + " | ".join(f"time to {float(t):.1%} digit+sum (s)" for t in targets)
        + " | train images/s | digit at stop | sum at stop | peak RSS (MB) | GFLOP/s | of fp32 matmul peak |"
    )
    print("|---|---|---|" + "---|" * len(targets) + "---|---|---|---|---|---|")
    for recipe, runs in results.items():

        def median(key):
            return statistics.median(r[key] for r in runs)

        gflops = median("images_per_second") * runs[0]["flops_per_image"] / 1e9
        print(
            f"| {recipe} | {runs[0]['epochs']} | {runs[0]['batch_size']} | "
            + " | ".join(time_cell(runs, t) for t in targets)
            + f" | {median('images_per_second'):,.0f} | {spread([100 * r['digit_accuracy'] for r in runs], '{:.2f}')}% "
            f"| {spread([100 * r['sum_accuracy'] for r in runs], '{:.2f}')}% | {median('peak_rss_mb'):.0f} "
            f"| {gflops:.0f} | {100 * gflops / peak:.0f}% |"
        )
    pairs = [
        ("classic", "ours-fast"),
        ("ours-old-default", "ours-default"),
        ("ours-previous-default", "ours-default"),
        ("classic", "ours-default"),
    ]
    for slow, fast in pairs:
        if slow in results and fast in results:
            for t in targets:
                print(
                    f"\n{slow} / {fast} time to {float(t):.1%}, seed by seed: {ratio_cell(results[slow], results[fast], t)}"
                    " ('>=': only the second reached it, so the ratio is a lower bound; '<=': only the first; "
                    "'?': neither)"
                )


if __name__ == "__main__":
    main()
