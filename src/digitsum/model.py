"""DigitSumNet: an image and a number in, digit logits and sum logits out.

    image (B,1,28,28) -> CNN trunk -> digit logits (B,10)
    [one_hot(predicted digit) (B,10) ; one_hot(number) (B,10)] = (B,20) -> FC block -> sum logits (B,19)

Its settings, ModelConfig, live in config.py (no torch there); this file imports nothing else from the project.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from digitsum.config import ModelConfig

NUM_DIGITS, NUM_NUMBERS, NUM_SUMS = 10, 10, 19
IMAGE_SIZE = 28
# Batches smaller than this take the fewest-ops path where two exist (MaxPool2x2, Conv2dBeforePool
# in inference): their time is per-op overhead, not arithmetic.
SMALL_BATCH = 16


class Conv2dBeforePool(nn.Conv2d):
    """A 3x3, stride-1, padding-1 conv whose output goes straight into a 2x2 max-pool: computes only
    the rows and columns the pool reads.

    On an odd size the pool floors (7x7 -> 3x3) and never reads the conv's last row and column:
    at 7x7 that is 13 of 49 outputs, 27% of the conv's work forward and backward. Padding only the
    top and left side gives exactly the outputs the pool reads (output (i, j) sees input rows i-1..i+1
    and columns j-1..j+1 either way), so the pooled values, and every gradient, are the plain conv's
    (up to float rounding). Same parameters and checkpoint as nn.Conv2d. In inference on fewer than
    SMALL_BATCH images it runs as the plain conv: the floor pool drops the extra row and column anyway.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if (height % 2 == 0 and width % 2 == 0) or (x.shape[0] < SMALL_BATCH and not torch.is_grad_enabled()):
            return super().forward(x)  # (a few images in inference: the pad costs more than the row it saves)
        return F.conv2d(F.pad(x, (1, 1 - width % 2, 1, 1 - height % 2)), self.weight, self.bias)


def before_pool(conv: nn.Conv2d) -> nn.Conv2d:
    """`conv` as a Conv2dBeforePool (same weights) if it is a 3x3 stride-1 padding-1 conv, else itself."""
    if type(conv) is not nn.Conv2d or conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1):
        return conv
    cropped = Conv2dBeforePool(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None)
    cropped.load_state_dict(conv.state_dict())
    return cropped.to(conv.weight.device, conv.weight.dtype)


def conv_block(in_channels: int, out_channels: int, stride: int = 1, pool: bool = False) -> nn.Sequential:
    """3x3 conv -> BN -> ReLU, or with `pool` conv -> 2x2 max-pool -> BN -> ReLU."""
    # bias=False with BatchNorm: its shift makes a conv bias redundant.
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
    if pool:
        conv = before_pool(conv)
    return nn.Sequential(conv, *([nn.MaxPool2d(2)] if pool else []), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask comes from random bytes: the same distribution, ~3x cheaper.

    On a CPU, torch's bernoulli_ draws one random number per element: 2.5 ms of a ~35 ms training
    step for the default net's (256, 864) features, 8% of the step (torch.profiler, docs/RESULTS.md
    2.7). Here every 64-bit draw gives four 16-bit lanes, each kept when it is at or above
    round(p * 65536): 0.8 ms for mask and multiply. p is rounded to a multiple of 1/65536 (0.25 is
    exact). The draws come from torch's global generator, so seeding and exact resume work as with
    nn.Dropout. Other devices use the library's fused kernel. No parameters: checkpoints are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        count = x.numel()
        draws = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64)
        lanes = draws.view(torch.int16)[:count].view(x.shape)
        keep = lanes >= round(self.p * 65536) - 32768
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


class _FlattenGradChannelsLast(torch.autograd.Function):
    """x.flatten(1) whose backward hands back a channels-last gradient, the layout of x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        return x.flatten(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(ctx.shape).contiguous(memory_format=torch.channels_last)


class Flatten(nn.Flatten):
    """nn.Flatten that keeps the backward pass in the trunk's channels-last layout.

    Flattening a channels-last (B, C, H, W) activation copies it into (B, C*H*W) in C, H, W order, as
    nn.Flatten does; its gradient then comes back in that order (plain contiguous), while the ReLU,
    BatchNorm and max-pool before it saved channels-last tensors, and their backward kernels take a
    slow path on mixed layouts (~1.5 ms of a ~35 ms CPU training step). Copying the gradient back to
    channels-last (221k values, ~0.05 ms) avoids it. Same numbers; no parameters.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.training
            and x.dim() == 4
            and x.requires_grad
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
        ):
            return _FlattenGradChannelsLast.apply(x)
        return super().forward(x)


def predicted_digit_onehot(digit_logits: torch.Tensor) -> torch.Tensor:
    """The predicted digit as a one-hot vector (B,10) that passes the softmax's gradient.

    Straight-through estimator: the forward value is exactly one of ten inputs, the backward pass
    is the softmax's, so the sum loss still trains the CNN.
    """
    soft = digit_logits.float().softmax(dim=1)
    hard = F.one_hot(soft.argmax(dim=1), NUM_DIGITS).to(soft.dtype)
    if not soft.requires_grad:  # inference (no_grad, inference_mode, eval of frozen logits): two ops fewer
        return hard
    return hard + (soft - soft.detach())  # parenthesised so the value is exactly `hard`


class DigitSumNet(nn.Module):
    """CNN digit classifier plus a fully connected block that adds the digit to a number."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        if config.first_stride not in (1, 2):
            raise ValueError(f"first_stride must be 1 or 2, got {config.first_stride}")
        layers, in_channels, size = [], 1, IMAGE_SIZE - 2 * config.crop
        for stage, out_channels in enumerate(config.channels):
            pooled = not (stage == 0 and config.first_stride == 2)  # a stride-2 first conv is the pool
            for conv in range(config.convs_per_stage):
                stride = config.first_stride if stage == conv == 0 else 1
                pool_inside = pooled and config.norm_after_pool and conv == config.convs_per_stage - 1
                layers.append(conv_block(in_channels, out_channels, stride, pool_inside))
                in_channels = out_channels
            if pooled and not config.norm_after_pool:
                layers.append(nn.MaxPool2d(2))
            size //= 2
        self.trunk = nn.Sequential(*layers)
        self.digit_head = nn.Sequential(
            Flatten(),
            Dropout(config.dropout),
            nn.Linear(in_channels * size * size, NUM_DIGITS),  # derived, never a magic number
        )
        self.sum_block = nn.Sequential(
            nn.Linear(NUM_DIGITS + NUM_NUMBERS, config.sum_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(config.sum_hidden, NUM_SUMS),
        )

    def add(self, digit_logits: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """Sum logits (B,19) from digit logits (B,10) and numbers (B,) in 0..9."""
        digit = predicted_digit_onehot(digit_logits)  # (B,10)
        number = F.one_hot(numbers, NUM_NUMBERS).to(torch.float32)  # (B,10)
        return self.sum_block(torch.cat([digit, number], dim=1))  # (B,20) -> (B,19)

    def forward(self, image: torch.Tensor, number: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B,1,28,28) normalised, number (B,) int64 -> (digit_logits (B,10), sum_logits (B,19))."""
        if self.config.crop:  # the empty border (ModelConfig.crop); a view, no copy
            image = image[..., self.config.crop : -self.config.crop, self.config.crop : -self.config.crop]
        digit_logits = self.digit_head(self.trunk(image))  # (B,10)
        return digit_logits, self.add(digit_logits, number)


def fold_batchnorm(model: DigitSumNet) -> DigitSumNet:
    """An eval-mode copy whose BatchNorms are folded into the preceding convolutions.

    In eval mode BatchNorm is a fixed per-channel affine map, so it can be merged into the conv's
    weights and bias: the same outputs (up to float rounding) with one pass over memory fewer per
    layer, which is most of the cost of a small CNN on a CPU.
    """
    folded = copy.deepcopy(model).eval()
    for block in folded.trunk:
        if isinstance(block, nn.Sequential) and isinstance(block[0], nn.Conv2d) and isinstance(block[1], nn.BatchNorm2d):
            block[0] = fuse_conv_bn_eval(block[0], block[1])
            block[1] = nn.Identity()
    return folded


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2) for inference: the max of the four strided views of the input.

    The same numbers (max is exact), about twice as fast as the library kernel on a CPU for the
    small channels-last activations of this CNN. No indices are kept, so it is not for training.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < SMALL_BATCH:  # one library call beats seven small ones (single-image latency)
            return F.max_pool2d(x, 2)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor, like MaxPool2d(2)
        return torch.maximum(
            torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2]), torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2])
        )


def inference_model(model: DigitSumNet) -> DigitSumNet:
    """A copy for fast inference with the same outputs (up to float rounding from the BN fold).

    BatchNorm folded into the convs (fold_batchnorm); each stage's last ReLU moved after its
    max-pool (ReLU and max commute, and the ReLU then touches a quarter of the values); the pool
    computed by MaxPool2x2; channels-last memory format, which the CPU convolutions prefer.
    A BatchNorm after a pool (norm_after_pool) is, in eval mode, a per-channel affine map; where
    every channel's scale is positive it is increasing, so it commutes with the max and is folded
    into the conv before the pool like the others (one pass over memory fewer). Otherwise it stays.
    Every 3x3 conv followed by a pool computes only the rows and columns the pool reads (Conv2dBeforePool).
    """
    folded = fold_batchnorm(model)
    layers = []
    for layer in folded.trunk:
        if isinstance(layer, nn.MaxPool2d):
            relu = layers[-1][2]  # the preceding conv block's ReLU
            layers[-1] = nn.Sequential(before_pool(layers[-1][0]), layers[-1][1])  # the pool now follows the conv
            layers += [MaxPool2x2(), relu]
        elif isinstance(layer[1], nn.MaxPool2d):  # norm_after_pool: conv -> pool -> BN -> ReLU
            conv, norm = layer[0], layer[2]
            if isinstance(norm, nn.BatchNorm2d) and bool((norm.weight > 0).all()):
                # max(a*x+b) = a*max(x)+b for a > 0: BN moves before the pool, into the conv.
                layers.append(nn.Sequential(fuse_conv_bn_eval(conv, norm), MaxPool2x2(), *layer[3:]))
            else:
                layers.append(nn.Sequential(conv, MaxPool2x2(), *layer[2:]))
        else:
            layers.append(layer)
    folded.trunk = nn.Sequential(*layers)
    return folded.to(memory_format=torch.channels_last)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_flops_per_image(config: ModelConfig) -> int:
    """Multiply-add FLOPs (x2) of conv/linear layers for forward+backward of one image.

    Backward costs about twice the forward (gradients w.r.t. inputs and weights), so x3.
    """
    flops, in_channels, size = 0, 1, IMAGE_SIZE - 2 * config.crop
    for stage, out_channels in enumerate(config.channels):
        for conv in range(config.convs_per_stage):
            if stage == conv == 0 and config.first_stride == 2:
                size //= 2  # the strided conv computes the 14x14 outputs only
            # A stage's last conv feeds its pool directly under norm_after_pool: on an odd size it
            # computes only the rows and columns the pool reads (Conv2dBeforePool).
            computed = (
                size // 2 * 2
                if config.norm_after_pool and conv == config.convs_per_stage - 1 and not (stage == 0 and config.first_stride == 2)
                else size
            )
            flops += 2 * computed * computed * out_channels * in_channels * 9
            in_channels = out_channels
        if not (stage == 0 and config.first_stride == 2):
            size //= 2
    flops += 2 * in_channels * size * size * NUM_DIGITS
    flops += 2 * ((NUM_DIGITS + NUM_NUMBERS) * config.sum_hidden + config.sum_hidden * NUM_SUMS)
    return 3 * flops
