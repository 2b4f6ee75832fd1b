"""DigitSumNet: shapes, the one-hot sum path, learning, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from digitsum import checkpoint
from digitsum.checkpoint import CheckpointError
from digitsum.config import ModelConfig
from digitsum.model import (
    Conv2dBeforePool,
    DigitSumNet,
    Dropout,
    Flatten,
    MaxPool2x2,
    fold_batchnorm,
    inference_model,
    predicted_digit_onehot,
    training_flops_per_image,
)

SMALL = ModelConfig(channels=(8, 16), sum_hidden=32)


def batch(size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 1, 28, 28, generator=generator)
    numbers = torch.randint(0, 10, (size,), generator=generator)
    digits = torch.randint(0, 10, (size,), generator=generator)
    return images, numbers, digits


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(),
        SMALL,
        ModelConfig(channels=(8, 16, 32, 64)),
        ModelConfig(channels=(8,), convs_per_stage=2, sum_hidden=1),
        ModelConfig(first_stride=2, norm_after_pool=True),
        ModelConfig(channels=(4, 8), convs_per_stage=2, norm_after_pool=True),
        ModelConfig(channels=(4, 8, 8), first_stride=2, norm_after_pool=True, crop=1),
        ModelConfig(channels=(4, 8), crop=3),
    ],
)
def test_forward_gives_10_digit_and_19_sum_logits(config):
    images, numbers, _ = batch(5)
    digit_logits, sum_logits = DigitSumNet(config)(images, numbers)
    assert digit_logits.shape == (5, 10) and sum_logits.shape == (5, 19)


def test_sum_block_sees_20_values_from_the_digit_head_and_the_one_hot_number():
    model = DigitSumNet(ModelConfig(sum_hidden=7))
    assert model.sum_block[0].in_features == 20 and model.sum_block[0].out_features == 7
    assert model.sum_block[-1].out_features == 19


def test_onehot_sum_input_is_exactly_the_predicted_digit_and_passes_the_softmax_gradient():
    logits = torch.tensor([[0.1, 2.0, 1.9] + [0.0] * 7, [5.0] + [0.0] * 9], requires_grad=True)
    representation = predicted_digit_onehot(logits)
    assert torch.equal(representation, F.one_hot(torch.tensor([1, 0]), 10).float())  # exact, not 0.99999
    (representation * torch.arange(10.0)).sum().backward()  # straight-through: d/dlogits of softmax
    soft = logits.detach().softmax(1)
    expected = soft * (torch.arange(10.0) - (soft * torch.arange(10.0)).sum(1, keepdim=True))
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_onehot_sum_input_trains_the_cnn_through_the_sum_loss():
    model = DigitSumNet(ModelConfig(channels=(8,)))
    images, numbers, digits = batch()
    _, sum_logits = model(images, numbers)
    F.cross_entropy(sum_logits, digits + numbers).backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.trunk.parameters())


def test_the_sum_block_sees_the_predicted_digit_and_the_number_as_one_hots():
    model = DigitSumNet(SMALL).eval()
    seen = []
    model.sum_block.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    images, numbers, _ = batch(6)
    digit_logits, _ = model(images, numbers)
    expected = torch.cat([F.one_hot(digit_logits.argmax(1), 10), F.one_hot(numbers, 10)], dim=1).float()
    assert torch.equal(seen[0], expected)


def test_a_sum_block_without_hidden_units_is_refused_as_a_benchmark_variant():
    with pytest.raises(ValueError, match="sum_hidden = 0.*benchmarks/sum_block.py"):
        ModelConfig(sum_hidden=0).validate()


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = DigitSumNet(SMALL)
    images, numbers, digits = batch(32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)

    def loss():
        digit_logits, sum_logits = model(images, numbers)
        return F.cross_entropy(digit_logits, digits) + F.cross_entropy(sum_logits, digits + numbers)

    model.train()
    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item()


def test_first_stride_2_replaces_the_first_pool_and_counts_its_flops():
    config = ModelConfig(channels=(4,), sum_hidden=5, first_stride=2)
    model = DigitSumNet(config)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.trunk)
    assert model.digit_head[-1].in_features == 4 * 14 * 14
    conv = 2 * 14 * 14 * 4 * 1 * 9
    assert training_flops_per_image(config) == 3 * (conv + 2 * 4 * 14 * 14 * 10 + 2 * (20 * 5 + 5 * 19))
    with pytest.raises(ValueError, match="first_stride"):
        DigitSumNet(ModelConfig(first_stride=3))


def test_norm_after_pool_puts_batchnorm_and_relu_after_each_pool():
    model = DigitSumNet(ModelConfig(channels=(4, 8), convs_per_stage=2, norm_after_pool=True))
    kinds = [[type(m).__name__ for m in block] for block in model.trunk]
    assert kinds == [["Conv2d", "BatchNorm2d", "ReLU"], ["Conv2dBeforePool", "MaxPool2d", "BatchNorm2d", "ReLU"]] * 2
    # With a stride-2 first conv the first stage has no pool, so its BatchNorm follows the conv.
    model = DigitSumNet(ModelConfig(channels=(4, 8), first_stride=2, norm_after_pool=True))
    kinds = [[type(m).__name__ for m in block] for block in model.trunk]
    assert kinds == [["Conv2d", "BatchNorm2d", "ReLU"], ["Conv2dBeforePool", "MaxPool2d", "BatchNorm2d", "ReLU"]]
    assert model.digit_head[-1].in_features == 8 * 7 * 7
    # The layout does not change the FLOPs (BatchNorm and pools are not counted).
    assert training_flops_per_image(model.config) == training_flops_per_image(ModelConfig(channels=(4, 8), first_stride=2))


def test_training_flops_count_the_convolutions_from_the_config():
    one_stage = ModelConfig(channels=(4,), sum_hidden=6)
    conv = 2 * 28 * 28 * 4 * 1 * 9
    classifier = 2 * 4 * 14 * 14 * 10
    sum_block = 2 * (20 * 6 + 6 * 19)
    assert training_flops_per_image(one_stage) == 3 * (conv + classifier + sum_block)


def save_small(path, model):
    checkpoint.save(path, {"model_config": model.config.to_dict(), "model": model.state_dict(), "metadata": {"epoch": 1}})


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = DigitSumNet(SMALL).eval()
    save_small(tmp_path / "model.pt", model)
    loaded, metadata = checkpoint.load_model(tmp_path / "model.pt")
    images, numbers, _ = batch()
    assert metadata == {"epoch": 1}
    for a, b in zip(model(images, numbers), loaded(images, numbers)):
        assert torch.equal(a, b)


def test_checkpoint_loads_with_weights_only(tmp_path):
    save_small(tmp_path / "model.pt", DigitSumNet(SMALL))
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert payload["format"] == checkpoint.FORMAT


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nope.pt")


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load_model(tmp_path / "notes.pt")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_small(tmp_path / "model.pt", DigitSumNet(SMALL))
    raw = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load_model(tmp_path / "cut.pt")


def test_a_torch_file_that_is_not_ours_is_a_clear_error(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a digitsum checkpoint"):
        checkpoint.load_model(tmp_path / "other.pt")


def test_checkpoint_of_a_different_architecture_is_a_clear_error(tmp_path):
    model = DigitSumNet(SMALL)
    payload = {"model_config": {**SMALL.to_dict(), "channels": [8, 32]}, "model": model.state_dict(), "metadata": {}}
    checkpoint.save(tmp_path / "mixed.pt", payload)
    with pytest.raises(CheckpointError, match="does not match the DigitSumNet architecture"):
        checkpoint.load_model(tmp_path / "mixed.pt")


@pytest.mark.parametrize("size", [28, 14, 7, 3])
@pytest.mark.parametrize("count", [3, 40])  # a small batch takes the library's pool, a large one the strided views
def test_maxpool2x2_equals_maxpool2d_exactly(size, count):
    x = torch.randn(count, 8, size, size).contiguous(memory_format=torch.channels_last)
    assert torch.equal(MaxPool2x2()(x), torch.nn.MaxPool2d(2)(x))


@pytest.mark.parametrize("count", [1, 15, 16, 70])
def test_small_and_large_inference_batches_give_the_same_numbers(count):
    # Under SMALL_BATCH images the inference model takes its fewest-ops path (the library's pool, the
    # plain conv before it, no straight-through arithmetic); the results are the same either way.
    torch.manual_seed(5)
    model = DigitSumNet(ModelConfig(channels=(8, 16, 16), first_stride=2, norm_after_pool=True, crop=1))
    model.train()
    model(*batch(32, seed=1)[:2])
    model.eval()
    fast = inference_model(model)
    images, numbers, _ = batch(count, seed=2)
    with torch.inference_mode():
        for a, b in zip(model(images, numbers), fast(images, numbers)):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        alone = [fast(images[i : i + 1], numbers[i : i + 1])[0] for i in range(min(count, 4))]
        torch.testing.assert_close(torch.cat(alone), fast(images, numbers)[0][: len(alone)], atol=1e-5, rtol=1e-5)
        hard = predicted_digit_onehot(fast(images, numbers)[0])
    assert set(hard.sum(1).tolist()) == {1.0} and set(hard.flatten().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(),
        ModelConfig(channels=(8, 16), convs_per_stage=2),
        ModelConfig(first_stride=2),
        ModelConfig(first_stride=2, norm_after_pool=True),
    ],
)
def test_inference_model_gives_the_same_outputs_and_keeps_the_original(config):
    torch.manual_seed(3)
    model = DigitSumNet(config)
    model.train()
    for step in range(2):  # non-trivial BatchNorm statistics
        model(*batch(16, seed=step)[:2])
    model.eval()
    fast = inference_model(model)
    images, numbers, _ = batch(6)
    with torch.no_grad():
        for a, b in zip(model(images, numbers), fast(images, numbers)):
            assert torch.allclose(a, b, atol=1e-4)
    pools = [m for m in fast.modules() if isinstance(m, (MaxPool2x2, torch.nn.MaxPool2d))]
    assert pools and all(isinstance(m, MaxPool2x2) for m in pools)
    assert isinstance(list(fast.trunk.modules())[-1], torch.nn.ReLU)  # the last stage ends in its ReLU, after the pool
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())  # the original is untouched


@pytest.mark.parametrize("negative_channel", [False, True])
def test_a_batchnorm_after_a_pool_is_folded_only_where_every_scale_is_positive(negative_channel):
    # BN after the max-pool commutes with it only as an increasing map (scale > 0 in every channel).
    torch.manual_seed(4)
    model = DigitSumNet(ModelConfig(channels=(8, 16, 32), first_stride=2, norm_after_pool=True))
    model.train()
    for step in range(2):
        model(*batch(16, seed=step)[:2])
    model.eval()
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.weight.abs_().add_(0.1)
            if negative_channel:
                norm.weight[0] = -0.5  # this channel's max becomes a min: must not be folded
    fast = inference_model(model)
    images, numbers, _ = batch(6)
    with torch.no_grad():
        for a, b in zip(model(images, numbers), fast(images, numbers)):
            assert torch.allclose(a, b, atol=1e-4)
    left = [m for m in fast.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(left) == (2 if negative_channel else 0)  # the two after-pool BNs; the stride-2 conv's is always folded


def test_folding_batchnorm_keeps_the_outputs():
    torch.manual_seed(2)
    model = DigitSumNet(SMALL)
    model.train()
    for _ in range(3):  # give BatchNorm non-trivial running statistics
        model(*batch(16, seed=_)[:2])
    model.eval()
    folded = fold_batchnorm(model)
    images, numbers, _ = batch()
    with torch.no_grad():
        for a, b in zip(model(images, numbers), folded(images, numbers)):
            assert torch.allclose(a, b, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_addition_table_finds_the_one_wrong_entry_and_the_grid_counts_its_images():
    from digitsum.evaluate import addition_table, grid_metrics

    model = DigitSumNet(ModelConfig(channels=(8,), sum_hidden=20)).eval()
    hidden, out = model.sum_block[0], model.sum_block[-1]
    with torch.no_grad():  # the hidden layer passes the two one-hots on (ReLU keeps 0 and 1), then a
        hidden.weight.copy_(torch.eye(20))  # linear layer adds exactly: score_s = -(s - d - n)^2 expanded
        hidden.bias.zero_()
        s, d = torch.arange(19.0)[:, None], torch.arange(10.0)[None, :]
        out.weight.copy_(torch.cat([2 * s * d, 2 * s * d], dim=1))
        out.bias.copy_(-(torch.arange(19.0) ** 2))
    assert addition_table(model).all()
    digits = torch.tensor([3, 3, 5, 7])
    logits = 4.0 * F.one_hot(torch.tensor([3, 3, 5, 1]), 10).float()  # three right, one wrong digit
    assert grid_metrics(model, logits, digits)["addition_errors"] == 0
    with torch.no_grad():
        out.weight[7, 3] -= 100.0  # now 3 + 4 is no longer 7
    table = addition_table(model)
    assert int(table.sum()) == 99 and not table[3, 4]
    assert grid_metrics(model, logits, digits)["addition_errors"] == 2  # the two right 3s, with number 4


@pytest.mark.parametrize("p", [0.25, 0.5, 0.1])
def test_dropout_keeps_each_value_with_probability_1_minus_p_and_rescales_it(p):
    """The CPU mask from random bytes: same distribution as nn.Dropout, exact values, seeded."""
    layer = Dropout(p).train()
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    kept = y != 0
    # 400,000 Bernoulli(1 - p) draws: the kept fraction is within 5 standard deviations of 1 - p.
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    # Masks are independent across columns and rows: no lane pattern from the 64-bit draws.
    per_lane = kept.view(-1, 4).float().mean(0)
    assert (per_lane - (1 - p)).abs().max() < 5 * (p * (1 - p) / (x.numel() / 4)) ** 0.5
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / (1 - p))  # the gradient passes where the value was kept
    torch.manual_seed(3)
    assert torch.equal(layer(x), y)  # the global generator decides the mask: seeded runs repeat
    assert torch.equal(layer.eval()(x), x)


def test_dropout_of_zero_and_in_eval_is_the_identity_and_bf16_stays_bf16():
    x = torch.randn(8, 50).bfloat16()
    assert torch.equal(Dropout(0.0).train()(x), x) and torch.equal(Dropout(0.5).eval()(x), x)
    y = Dropout(0.5).train()(x)
    assert y.dtype == torch.bfloat16 and set(torch.unique(y[y != 0] / x[y != 0]).tolist()) == {2.0}


def test_flatten_gives_nn_flattens_values_and_hands_back_a_channels_last_gradient():
    x = torch.randn(4, 6, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(54, 5)
    ours = Flatten()(x)
    assert torch.equal(ours, torch.nn.Flatten()(x))
    (ours @ weight).sum().backward()
    ours_grad, x.grad = x.grad, None
    (torch.nn.Flatten()(x) @ weight).sum().backward()
    assert torch.equal(ours_grad, x.grad)
    assert ours_grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("size", [(7, 7), (8, 8), (3, 5), (6, 7), (3, 3)])
def test_a_conv_before_a_pool_gives_the_plain_convs_pooled_values_and_gradients(size):
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(5, 6, 3, padding=1, bias=True)
    cropped = Conv2dBeforePool(5, 6, 3, padding=1, bias=True)
    cropped.load_state_dict(plain.state_dict())
    x = torch.randn(3, 5, *size, requires_grad=True)
    upstream = torch.randn(3, 6, size[0] // 2, size[1] // 2)
    outputs, grads = [], []
    for conv in (plain, cropped):
        x.grad = None
        conv.zero_grad()
        pooled = F.max_pool2d(conv(x), 2)
        (pooled * upstream).sum().backward()
        outputs.append(pooled)
        grads.append((x.grad, conv.weight.grad, conv.bias.grad))
    assert outputs[0].shape == outputs[1].shape
    torch.testing.assert_close(outputs[1], outputs[0])
    for ours, reference in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, reference)


def test_the_default_nets_7x7_conv_computes_only_what_its_pool_reads():
    model = DigitSumNet(ModelConfig(channels=(32, 48, 96), first_stride=2, norm_after_pool=True))
    convs = [block[0] for block in model.trunk]
    assert [type(conv) for conv in convs] == [torch.nn.Conv2d, Conv2dBeforePool, Conv2dBeforePool]
    activation = model.trunk[1](model.trunk[0](torch.randn(2, 1, 28, 28)))  # 48 x 7 x 7
    assert convs[2](activation).shape[-2:] == (6, 6)
    assert type(inference_model(model).trunk[2][0]) is Conv2dBeforePool


@pytest.mark.parametrize("crop", [1, 2])
def test_a_cropped_net_never_sees_the_border_and_counts_only_the_inner_image(crop):
    config = ModelConfig(channels=(8, 16, 32), first_stride=2, norm_after_pool=True, crop=crop)
    model = DigitSumNet(config).eval()
    image, numbers = torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3])
    changed = image.clone()
    changed[..., :crop, :] = changed[..., -crop:, :] = changed[..., :, :crop] = changed[..., :, -crop:] = 5.0
    changed[..., crop, crop] += 1.0  # the first pixel inside does count
    with torch.no_grad():
        border_only = image.clone()
        border_only[..., :crop, :] = border_only[..., -crop:, :] = 5.0
        border_only[..., :, :crop] = border_only[..., :, -crop:] = 5.0
        torch.testing.assert_close(model(border_only, numbers)[0], model(image, numbers)[0], rtol=0, atol=0)
        assert not torch.equal(model(changed, numbers)[0], model(image, numbers)[0])
        torch.testing.assert_close(inference_model(model)(image, numbers)[0], model(image, numbers)[0])
    # 28 - 2 * crop pixels a side: the stride-2 conv gives 13x13 (crop 1) or 12x12 (crop 2), of which the
    # next conv computes the 12x12 its floor pool reads; then 6x6 -> 3x3 either way.
    side = 28 - 2 * crop
    first = side // 2
    expected = 2 * (first * first * 8 * 9 + 12 * 12 * 16 * 8 * 9 + 6 * 6 * 32 * 16 * 9 + 32 * 3 * 3 * 10)
    expected += 2 * (20 * 128 + 128 * 19)
    assert training_flops_per_image(config) == 3 * expected


def test_a_crop_that_leaves_no_image_for_the_stages_is_refused():
    with pytest.raises(ValueError, match="crop"):
        ModelConfig(channels=(8, 8, 8, 8), crop=7).validate()
    with pytest.raises(ValueError, match="crop"):
        ModelConfig(channels=(8, 8, 8, 8), crop=-1).validate()
    ModelConfig(channels=(8, 8, 8, 8), crop=6).validate()  # 16 px: 8, 4, 2, 1
