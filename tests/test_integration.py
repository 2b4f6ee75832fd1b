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


def _terminal_sigint() -> None:
    """In the child before exec: SIGINT with its default action and not blocked."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def saved_epoch(last_pt) -> int:
    """The epoch a last.pt holds, or -1 while there is none (it is replaced atomically: never half-written)."""
    try:
        return torch.load(last_pt, weights_only=True)["metadata"]["epoch"]
    except FileNotFoundError:
        return -1


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
    # The child starts with Ctrl-C's default action and SIGINT unblocked, as from a terminal (an ignored
    # or blocked SIGINT would survive exec). In one whole-suite run under pytest-xdist the child did not
    # stop on SIGINT and trained on; cause not confirmed (no test leaves SIGINT's handler changed).
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_terminal_sigint,
    )
    # Interrupt once last.pt holds epoch 1, i.e. during epoch 2's training. metrics.csv is written just
    # before last.pt: a Ctrl-C sent when it appears can land before epoch 1's last.pt (seen on a busy machine).
    deadline = time.monotonic() + 300  # epoch 1 takes seconds on an idle machine, minutes on a loaded one
    while saved_epoch(out / "last.pt") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "resume with" in err and "Traceback" not in err
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["metadata"]["epoch"] >= 1
