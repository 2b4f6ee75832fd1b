"""The device and precision choice: bf16 'auto' means measured faster here, not merely supported."""

from __future__ import annotations

import math

import torch

from digitsum import device


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


def test_auto_takes_bf16_on_a_cpu_only_when_supported_and_clearly_faster(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "bf16_supported", lambda _: True)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: device.BF16_MIN_SPEEDUP + 0.3)
    assert device.bf16_pays_off(cpu)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: device.BF16_MIN_SPEEDUP - 0.1)  # within noise
    assert not device.bf16_pays_off(cpu)
    monkeypatch.setattr(device, "bf16_supported", lambda _: False)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: 10.0)
    assert not device.bf16_pays_off(cpu)
    assert not device.bf16_pays_off(torch.device("meta"))


def test_freed_memory_is_kept_where_glibc_allows_it_and_calling_twice_is_harmless():
    import platform
    import sys

    first = device.reuse_freed_memory()
    assert device.reuse_freed_memory() == first
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert first  # glibc accepted both thresholds
    torch.ones(1 << 22).sum()  # tensors still allocate and free
