"""The device and precision choice: bf16 'auto' follows what the CPU is (AMX-BF16), never a timing."""

from __future__ import annotations

import math

import pytest
import torch

from digitsum import config, device


def test_the_bf16_probe_measures_a_speed_ratio_and_leaves_the_random_stream_alone():
    device.cpu_bf16_speedup.cache_clear()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ratio = device.cpu_bf16_speedup()
    assert math.isfinite(ratio) and ratio > 0
    assert torch.equal(torch.rand(3), expected)  # training's seeded initialisation is not shifted
    with torch.inference_mode():  # callable from inference code (predict.classify) too
        device.cpu_bf16_speedup.cache_clear()
        assert device.cpu_bf16_speedup() > 0


def test_auto_takes_bf16_on_a_cpu_only_with_amx_whatever_a_timing_says(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "bf16_supported", lambda _: True)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: 0.1)  # a timing no longer matters
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    assert device.bf16_pays_off(cpu)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: 10.0)
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))  # Zen 4, Xeon w/o AMX
    assert not device.bf16_pays_off(cpu)
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setattr(device, "bf16_supported", lambda _: False)  # no oneDNN bf16 kernels
    assert not device.bf16_pays_off(cpu)
    assert not device.bf16_pays_off(torch.device("meta"))


def test_cpu_flags_are_read_from_proc_cpuinfo():
    import os

    flags = device.cpu_flags()
    assert isinstance(flags, frozenset)
    if os.path.exists("/proc/cpuinfo") and any(line.startswith("flags") for line in open("/proc/cpuinfo")):
        assert "fpu" in flags or "sse2" in flags  # every x86 CPU has these


@pytest.mark.parametrize(
    "name, ok",
    [
        ("auto", True),
        ("cpu", True),
        ("cuda", True),
        ("cuda:1", True),
        ("mps", True),
        ("gpu", False),
        ("cuda:", False),
        ("cuda:x", False),
        ("", False),
        (3, False),
        ("cuda:١", False),
    ],
)
def test_device_names_are_checked_without_asking_the_hardware(name, ok):
    assert (config.check_device_name(name) == "") == ok


def test_freed_memory_is_kept_where_glibc_allows_it_and_calling_twice_is_harmless():
    import platform
    import sys

    first = device.reuse_freed_memory()
    assert device.reuse_freed_memory() == first
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert first  # glibc accepted both thresholds
    torch.ones(1 << 22).sum()  # tensors still allocate and free
