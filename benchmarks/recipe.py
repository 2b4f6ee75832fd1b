"""Recipe ablations: one change at a time to a preset, judged on the validation split.

    python benchmarks/recipe.py [--preset default] [--seeds 0] [--only TEXT,...]

Each variant trains the preset (a full run, 40-60 s of training for `default` on a 2-core AMX CPU) with one
change and reports the last epoch's validation digit and sum accuracy, which is what the recipe
is chosen on; the test set is not looked at. The `default` preset stands in for `best` here
(same code, 7 instead of 20 epochs, a cheaper CNN) so that every change can be measured.
"""

from __future__ import annotations

import torch.nn as nn
from sum_block import ablation_args, variant_results  # same folder: training runs with one change each

from digitsum.model import DigitSumNet


class NoBatchNormNet(DigitSumNet):
    """DigitSumNet with plain convs (with a bias) + ReLU: every BatchNorm of the trunk removed."""

    def __init__(self, config):
        super().__init__(config)
        for block in self.trunk:
            if isinstance(block, nn.Sequential):
                conv = block[0]
                block[0] = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=conv.stride, padding=1, bias=True)
                for index, layer in enumerate(block):
                    if isinstance(layer, nn.BatchNorm2d):
                        block[index] = nn.Identity()


VARIANTS = {
    "the preset as it is": {},
    "no BatchNorm (conv bias instead)": {"network": NoBatchNormNet},
    "no BatchNorm, peak lr 0.1": {"network": NoBatchNormNet, "lr": 0.1},
    "no dropout": {"model": {"dropout": 0.0}},
    "dropout 0.25 before the digit classifier": {"model": {"dropout": 0.25}},
    "no label smoothing": {"label_smoothing": 0.0},
    "EMA of the weights, decay 0.999": {"ema": 0.999},
    "half the epochs": {"half_epochs": True},
    "1.5x the epochs": {"more_epochs": True},
    "2x wider CNN (channels x2)": {"wider": True},
    "2 convs per stage": {"model": {"convs_per_stage": 2}},
    "layout: BatchNorm after each pool": {"model": {"norm_after_pool": True}},
    "layout: stride-2 first conv, BatchNorm after each pool (fast's)": {"model": {"first_stride": 2, "norm_after_pool": True}},
}


def change_for(preset_name: str, change: dict) -> dict:
    """Resolve the relative changes (epochs, width) against the preset."""
    from digitsum.config import PRESETS

    base = PRESETS[preset_name]
    change = dict(change)
    if change.pop("half_epochs", False):
        change["epochs"] = max(1, base.epochs // 2)
    if change.pop("more_epochs", False):
        change["epochs"] = base.epochs * 3 // 2
    if change.pop("wider", False):
        change["model"] = {"channels": tuple(2 * c for c in base.model.channels)}
    return change


def main() -> None:
    from digitsum.device import reuse_freed_memory

    reuse_freed_memory()  # as `digitsum train` does at its start (process-wide)
    args = ablation_args(__doc__, "default")
    print(f"preset {args.preset}, seeds {args.seeds} (means over seeds), validation split\n")
    print("| change | val digit accuracy | val sum accuracy | training minutes |")
    print("|---|---|---|---|")
    for name, mean, _ in variant_results(args, VARIANTS, resolve=change_for):
        print(f"| {name} | {100 * mean['val_digit']:.2f}% | {100 * mean['val_sum']:.2f}% | {mean['minutes']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
