"""Shared fixtures: a small synthetic MNIST written by our own IDX writer, and the real one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from digitsum import mnist

REPO = Path(__file__).resolve().parents[1]


def make_synthetic_mnist(root: Path, train: int = 600, test: int = 200, seed: int = 0) -> dict:
    """Write four IDX files of learnable fake digits under root/MNIST/raw; return their (size, md5) table.

    Each class is a distinct blob position/shape plus noise, so a tiny model can learn it.
    """
    rng = np.random.default_rng(seed)
    folder = mnist.raw_folder(root)
    table = {}
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 40, size=(count, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            row, col = 4 + 2 * (label // 5) * 5, 3 + 4 * (label % 5)
            images[i, row : row + 8, col : col + 6] = 255
        for kind, array in (("images-idx3", images), ("labels-idx1", labels.astype(np.uint8))):
            path = folder / f"{prefix}-{kind}-ubyte"
            mnist.write_idx(path, array)
            table[path.name] = (path.stat().st_size, hashlib.md5(path.read_bytes()).hexdigest())
    return table


@pytest.fixture
def synthetic_root(tmp_path, monkeypatch) -> Path:
    """A data root holding a small synthetic MNIST that verifies (its MD5 table is patched in)."""
    root = tmp_path / "data"
    table = make_synthetic_mnist(root)
    monkeypatch.setattr(mnist, "MNIST_FILES", table)
    return root


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The real MNIST, fetched once into the data root ($DIGITSUM_DATA or ./data) and reused."""
    root = Path(os.environ.get("DIGITSUM_DATA", REPO / "data"))
    mnist.ensure_mnist(root)
    return root
