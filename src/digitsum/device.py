"""Where and in which precision to run: the device, and bf16 autocast where the hardware runs it faster.

Imports only torch, so inference (predict, serve) can use it without the training and plotting code.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import time

import torch
import torch.nn as nn

from digitsum.config import check_device_name
from digitsum.errors import DigitsumError


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; anything else is passed to torch.device after a check."""
    problem = check_device_name(name)
    if problem:
        raise DigitsumError(problem)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DigitsumError(f"--device {name} was asked for but no CUDA GPU is available")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DigitsumError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if name == "mps" and not _mps_available():
        raise DigitsumError("--device mps was asked for but MPS is not available")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """Whether the hardware has bfloat16 kernels at all (AVX-512 BF16/AMX on CPU, Ampere+ on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


# Having bf16 kernels is not the same as being faster with them. Measured on 2-core CPUs with
# AVX-512 BF16: an AMD EPYC (Zen 4) trained this project's CNN 2.1x faster in bf16, an Intel Xeon
# without AMX 0.57-0.73x as fast; an Intel Xeon with AMX-BF16 (tile matrix units) ran the probe below
# 2.5x-20x faster. "auto" used to time a 0.1 s probe, but a timing flips under machine load, so two
# runs with the same seed - or a run and its resume - trained in different precisions. The rule is
# now what the machine *is*: on a CPU, bf16 only with AMX-BF16 (the `amx_bf16` flag of
# /proc/cpuinfo); this gives up the Zen 4 speed-up (pass --bf16 on there) to never lose 0.6x.
CPU_BF16_FLAG = "amx_bf16"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a small conv forward + backward on this CPU (measured once).

    For benchmarks and reports only: "auto" does not use it, because a timing depends on load.
    """
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
    """What precision "auto" means: bf16 autocast where the hardware is known to run it faster.

    CUDA: whenever supported (tensor cores). CPU: when oneDNN has bf16 kernels and the CPU has
    AMX-BF16 (CPU_BF16_FLAG). Decided from what the machine is, never from a timing, so it is the
    same under any load; training stores the resolved choice and a resume reuses it.
    """
    if device.type == "cuda":
        return bf16_supported(device)
    if device.type == "cpu":
        return CPU_BF16_FLAG in cpu_flags() and bf16_supported(device)
    return False


# glibc's malloc hands out tensors above its mmap threshold as fresh pages and returns freed memory
# to the OS, so a small CNN that allocates the same activations every step page-faults them back in
# every step. Measured on a 2-core Xeon: training the default preset 6,400 -> 7,900-8,100 images/s,
# fast's inference model 8.3 -> 4.4 ms per 256 images - though how bad it is depends on the heap's
# layout, which is why it has to be set rather than left to chance. Either threshold alone is worse.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_KEEP_BELOW = 1 << 30  # allocations under 1 GiB come from the heap, and the heap is never trimmed


@functools.cache
def reuse_freed_memory() -> bool:
    """Keep freed tensor memory in the process for the next batch (Linux/glibc; elsewhere a no-op).

    Process-wide and idempotent, so it is set where a process starts, not by library functions:
    the CLI's train and predict commands (torchrun's processes run `digitsum train` too) and the
    server's processes (serve.run, serve.app_from_env) call it. The cost: memory
    a run has freed is not given back to the OS until the process ends (the peak stays resident).
    Returns whether the setting took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    # Both: the mmap threshold so tensors come from the heap, the trim threshold so the heap keeps them.
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW))


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when enabled (a no-op context otherwise)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
