"""On real MNIST (fetched once into the data root): a short run learns; Ctrl-C is clean."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from digitsum.config import preset
from digitsum.train import train

pytestmark = pytest.mark.slow


def test_a_short_run_on_a_few_thousand_real_images_beats_chance_clearly(real_root, tmp_path):
    config = preset("default", epochs=3, train_limit=5000, val_size=1000, batch_size=64)
    summary = train(config, out_dir=tmp_path / "run", data_root=real_root, log=lambda *a: None, progress=False, figures=False)
    test = summary["metrics"]["test"]
    assert test["digit_accuracy"] > 0.90 and test["sum_accuracy"] > 0.85  # chance: 0.10 and about 0.10


def test_ctrl_c_during_training_exits_cleanly_with_a_resumable_last_pt(real_root, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "digitsum.cli",
        "train",
        "--data-root",
        str(real_root),
        "--out",
        str(out),
        "--epochs",
        "50",
        "--train-limit",
        "5000",
        "--val-size",
        "500",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "resume with" in err and "Traceback" not in err
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["metadata"]["epoch"] >= 1
