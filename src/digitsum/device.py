"""Where and in which precision to run: the device, and bf16 autocast where it is faster here.

Imports only torch, so inference (predict, serve) can use it without the training and plotting code.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch
import torch.nn as nn

from digitsum.errors import DigitsumError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; anything else is passed to torch.device after a check."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DigitsumError("--device cuda was asked for but no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DigitsumError("--device mps was asked for but MPS is not available")
    if name not in ("cpu", "cuda", "mps"):
        raise DigitsumError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """Whether the hardware has bfloat16 kernels at all (AVX-512 BF16/AMX on CPU, Ampere+ on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


# Having bf16 kernels is not the same as being faster with them. Measured on two 2-core CPUs with
# AVX-512 BF16: an AMD EPYC ran this project's CNN 1.6x faster in bf16, an Intel Xeon without AMX
# 0.7x (slower). So on a CPU, "auto" times a small conv stack both ways once per process (~0.1 s)
# and takes bf16 only when it is clearly faster, so that noise cannot flip the choice run to run.
BF16_MIN_SPEEDUP = 1.2


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a small conv forward + backward on this CPU (measured once)."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):  # leaves the caller's RNG alone
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        net = net.to(memory_format=torch.channels_last)
        x = torch.randn(64, 16, 14, 14).contiguous(memory_format=torch.channels_last)

        def fastest(bf16: bool) -> float:
            times = []
            for attempt in range(7):  # two warm-ups (oneDNN builds its kernels), then the best of five
                start = time.perf_counter()
                with autocast(torch.device("cpu"), bf16):
                    out = net(x)
                out.float().sum().backward()
                if attempt >= 2:
                    times.append(time.perf_counter() - start)
            return min(times)

        return fastest(False) / fastest(True)


def bf16_pays_off(device: torch.device) -> bool:
    """What precision "auto" means: bf16 autocast where the hardware has it and it is faster.

    CUDA: whenever supported (tensor cores). CPU: when supported and measured at least
    BF16_MIN_SPEEDUP times faster than fp32 on this machine (cpu_bf16_speedup).
    """
    if device.type == "cuda":
        return bf16_supported(device)
    if device.type == "cpu":
        return bf16_supported(device) and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
    return False


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when enabled (a no-op context otherwise)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
