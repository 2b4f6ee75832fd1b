"""The ablation variants that left DigitSumNet live in benchmarks/sum_block.py and recipe.py: they
still build, and each still is the variant its name says (what ModelConfig switches once built)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from digitsum.config import ModelConfig
from digitsum.model import DigitSumNet

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SMALL = ModelConfig(channels=(8, 16), sum_hidden=32)


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # recipe.py imports sum_block from its own folder
    import recipe
    import sum_block

    yield sum_block, recipe
    for name in ("recipe", "sum_block"):
        sys.modules.pop(name, None)


def batch(size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 1, 28, 28, generator=generator), torch.randint(0, 10, (size,), generator=generator))


def sum_block_input(model, images, numbers) -> torch.Tensor:
    seen = []
    hook = model.sum_block.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    model(images, numbers)
    hook.remove()
    return seen[0]


def test_the_softmax_variant_feeds_the_softmax_and_the_chosen_one_the_one_hot(benchmarks):
    sum_block, _ = benchmarks
    images, numbers = batch()
    for network, represent in (
        (sum_block.sum_variant(sum_block.softmax), lambda logits: logits.softmax(1)),
        (sum_block.sum_variant(), lambda logits: F.one_hot(logits.argmax(1), 10).float()),
    ):
        model = network(SMALL).eval()
        digit_logits, _ = model(images, numbers)
        expected = torch.cat([represent(digit_logits), F.one_hot(numbers, 10).float()], dim=1)
        assert torch.allclose(sum_block_input(model, images, numbers), expected, atol=1e-6)


def test_the_one_linear_variant_has_the_original_20_to_19_sum_block(benchmarks):
    sum_block, _ = benchmarks
    model = sum_block.sum_variant(one_linear=True)(SMALL)
    assert isinstance(model.sum_block, torch.nn.Linear)
    assert (model.sum_block.in_features, model.sum_block.out_features) == (20, 19)


def test_the_detached_variant_sends_no_sum_gradient_into_the_cnn(benchmarks):
    sum_block, _ = benchmarks
    images, numbers = batch()
    for detach in (True, False):
        model = sum_block.sum_variant(sum_block.softmax, detach=detach)(SMALL)
        _, sum_logits = model(images, numbers)
        F.cross_entropy(sum_logits, numbers).backward()
        reached = any(p.grad is not None and p.grad.abs().max() > 0 for p in model.trunk.parameters())
        assert reached is not detach


@pytest.mark.parametrize("config", [SMALL, ModelConfig(channels=(4, 8), first_stride=2, norm_after_pool=True)])
def test_the_no_batchnorm_variant_has_plain_convs_with_biases_and_learns(benchmarks, config):
    _, recipe = benchmarks
    torch.manual_seed(0)
    model = recipe.NoBatchNormNet(config)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(config.channels) and all(c.bias is not None for c in convs)
    assert model.state_dict().keys() != DigitSumNet(config).state_dict().keys()
    images, numbers = batch(32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def loss():
        return F.cross_entropy(model(images, numbers)[1], numbers)

    before = loss()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item()


def test_train_speeds_step_cost_table_times_each_channel_set_against_the_first(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import train_speed

    try:
        train_speed.step_cost([(16, 32, 64), (16, 48, 64)], rounds=2, steps=1)
    finally:
        sys.modules.pop("train_speed", None)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 16,")]
    assert [row.split(" | ")[0] for row in rows] == ["| 16,32,64", "| 16,48,64"]
    assert rows[0].endswith("| 1.00x |")  # the first set against itself
    assert all(float(row.split(" | ")[1]) > 0 for row in rows)
