"""Shared fixtures: a small synthetic MNIST written by our own IDX writer, the real one, and one
tiny training run per session for the tests that only need *a* finished run.

The suite runs on pytest-xdist workers (pyproject.toml's addopts: `-n logical --dist loadgroup`; `-n 0`
runs it in one process). The costly session fixtures (the synthetic MNIST, the tiny run, the ONNX
export, the trained checkpoint) are built once per test run, not once per worker: see `built_once`.

The fast subset (`pytest -m "not slow"`) also runs the hypothesis property tests with fewer
examples: see `examples()` in tests/budget.py (set DIGITSUM_TEST_EXAMPLES=full to override).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pytest

from digitsum import mnist

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], T]) -> T:
    """`build(folder)` run once per test run, its (picklable) result shared: READ-ONLY for callers.

    In one process this is a plain session fixture's body. Under pytest-xdist the first worker that
    needs `name` builds it in the run's temporary folder (the parent of every worker's basetemp) while
    holding a file lock; the others wait for it and reuse the result instead of building it again.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent
    folder, result = shared / name, shared / f"{name}.pickle"
    with FileLock(str(shared / f"{name}.lock")):
        if result.exists():
            return pickle.loads(result.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed building it left
        folder.mkdir()
        value = build(folder)
        result.write_bytes(pickle.dumps(value))
        return value


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


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Undo a test's torch.set_num_threads (in-process `digitsum serve` sets 1; see pytest_configure): float results of
    later tests - compared bit for bit with the session's `tiny_run` - depend on the thread count."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def synthetic_root(tmp_path, monkeypatch) -> Path:
    """A data root holding a small synthetic MNIST that verifies (its MD5 table is patched in)."""
    root = tmp_path / "data"
    table = make_synthetic_mnist(root)
    monkeypatch.setattr(mnist, "MNIST_FILES", table)
    return root


@pytest.fixture(scope="session")
def session_data(tmp_path_factory) -> tuple[Path, dict]:
    """The synthetic MNIST written once per session (read-only for tests) and its (size, md5) table.

    The table is NOT patched in for the whole session (test_data.py checks the real table); use
    `session_root`, which patches it for one test, or patch it yourself for a session fixture.
    """

    def build(folder: Path) -> tuple[Path, dict]:
        return folder / "data", make_synthetic_mnist(folder / "data")

    return built_once(tmp_path_factory, "session-data", build)


@pytest.fixture
def session_root(session_data, monkeypatch) -> Path:
    """The session's synthetic MNIST (do not modify it: use `synthetic_root` for that), verified for this test."""
    root, table = session_data
    monkeypatch.setattr(mnist, "MNIST_FILES", table)
    return root


@pytest.fixture(scope="session")
def tiny_run(session_data, tmp_path_factory) -> Path:
    """A finished, evaluated run folder of `model_files.TINY_RUN` on the session's synthetic MNIST
    (config.json, metrics.csv, model.pt, last.pt, eval.json, figures; runs/latest points at it).

    Trained once per session and shared: READ-ONLY. A test that changes a run copies it first
    (`shutil.copytree(tiny_run, tmp_path / "run")`); resuming or evaluating it needs `session_root`.
    """
    from model_files import TINY_RUN

    from digitsum.train import train

    root, table = session_data

    def build(folder: Path) -> Path:
        out = folder / "runs" / "tiny"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(mnist, "MNIST_FILES", table)
            train(TINY_RUN, out_dir=out, data_root=root, log=lambda *_: None, progress=False)
        return out

    return built_once(tmp_path_factory, "tiny-run", build)


@pytest.fixture(scope="session")
def exported_random(tmp_path_factory) -> tuple[Path, Path, str]:
    """(model.pt, model.onnx, stdout) of one real `digitsum export` of model_files.random_checkpoint,
    made once per session (the export costs seconds); shared by test_export.py and test_serve.py's
    onnxruntime backend: READ-ONLY. The empty --data-root makes the parity sample synthetic."""
    import contextlib
    import io

    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    from model_files import random_checkpoint

    from digitsum import cli

    def build(folder: Path) -> tuple[Path, Path, str]:
        model_pt = random_checkpoint(folder / "model.pt")
        out = folder / "model.onnx"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = cli.main(["export", str(model_pt), "--out", str(out), "--data-root", str(folder / "no-data")])
        assert code == 0
        return model_pt, out, stdout.getvalue()

    return built_once(tmp_path_factory, "exported-random", build)


# Under pytest-xdist, worker gw<i> builds PREBUILT[i] before its first test (when some test of the run
# uses it), so that the costly shared fixtures are made side by side, not one after the other by one
# worker while the other waits for it (the first tests on both workers need both).
PREBUILT = ("tiny_run", "exported_random")


@pytest.fixture(scope="session", autouse=True)
def _prebuilt(request):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else len(PREBUILT)
    if index < len(PREBUILT) and any(PREBUILT[index] in item.fixturenames for item in request.session.items):
        try:
            request.getfixturevalue(PREBUILT[index])
        except (Exception, pytest.skip.Exception, pytest.fail.Exception):
            pass  # pytest keeps the fixture's error or skip (no onnxruntime) for the tests that use it


@pytest.fixture(scope="session")
def trained_pt(tmp_path_factory) -> Path:
    """model_files.trained_checkpoint: a small model really trained on MNIST, once per test run: READ-ONLY."""
    from model_files import trained_checkpoint

    return built_once(tmp_path_factory, "trained-small", trained_checkpoint)


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The real MNIST, fetched once into the data root ($DIGITSUM_DATA or ./data) and reused."""
    root = Path(os.environ.get("DIGITSUM_DATA", REPO / "data"))
    mnist.ensure_mnist(root)
    return root


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook has tagged the items
def pytest_collection_modifyitems(config, items):
    """Make `--dist loadgroup` group again on pytest >= 9.2 (pytest-xdist issue #1386).

    On a worker, pytest-xdist tags each test with an xdist_group mark by setting `item._nodeid` to
    "<node id>@<group>", from which the controller groups the tests; pytest 9.2 keeps node ids in a
    structured `item._id` and no longer reads `_nodeid`, so the groups are silently ignored. Copy the
    tag over (a no-op on older pytest, or once pytest-xdist sets the structured id itself).
    """
    for item in items:
        tagged = item.__dict__.get("_nodeid")
        if tagged and tagged != item.nodeid and hasattr(item, "_id"):
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(tagged)


def pytest_configure(config):
    """The fast subset (a `-m` expression with "not slow") runs property tests with few examples.

    torch runs one intra-op thread in the test process (DIGITSUM_TEST_THREADS=N for another count):
    the tests' tiny models on small batches train 2-3x faster so on a busy 2-core machine, and
    results compared bit for bit across tests do not depend on the machine's core count.
    """
    if "not slow" in (config.option.markexpr or "") and not os.environ.get("DIGITSUM_TEST_EXAMPLES"):
        os.environ["DIGITSUM_TEST_EXAMPLES"] = "quick"  # before the xdist workers start: they inherit it
    if getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput"):
        return  # the xdist controller runs no tests: no torch to import (seconds of CPU next to the workers')
    import torch

    torch.set_num_threads(int(os.environ.get("DIGITSUM_TEST_THREADS", "1")))
