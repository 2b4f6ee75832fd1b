"""Training with several processes (torchrun, gloo on this CPU): one model, one run folder, exact resume.

The two-process runs go through `python -m torch.distributed.run --standalone --nproc-per-node 2`
and the real CLI; tests/dist_entry.py only adds the synthetic MNIST's checksums, a stop after
one epoch and a per-rank summary file (with each rank's weight digest).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_synthetic_mnist
from model_files import RUN_FOLDER_FILES
from digitsum import checkpoint, distributed
from digitsum.data import Split
from digitsum.distributed import World, world_from_env
from digitsum.errors import DigitsumError
from digitsum.config import ModelConfig, TrainConfig
from digitsum.train import rank_shard, train

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
# The default preset's augmentation and dropout (per-rank random streams) plus a weight average.
FLAGS = [
    "--epochs",
    "3",
    "--batch-size",
    "50",
    "--lr",
    "0.05",
    "--val-size",
    "100",
    "--ema",
    "0.9",
    "--bf16",
    "off",
    "--sum-hidden",
    "32",
]


def torchrun(args, env_extra: dict, module: bool = False, timeout: float = 240) -> subprocess.CompletedProcess:
    """Two processes of the CLI under torchrun (standalone rendezvous on this machine)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        **env_extra,
    }
    env.pop("WORLD_SIZE", None)
    target = ["-m", "digitsum"] if module else [str(TESTS / "dist_entry.py")]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summaries(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def two_process_train(base: Path, name: str, args: list[str], **env) -> subprocess.CompletedProcess:
    """`train ARGS` by two processes; each rank's summary goes to base/name/rank<R>.json."""
    (base / name).mkdir()
    result = torchrun(
        ["train", "--data-root", str(base / "data"), *args],
        {"DIGITSUM_TEST_MNIST_TABLE": str(base / "table.json"), "DIGITSUM_TEST_SUMMARY_DIR": str(base / name), **env},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# Under pytest-xdist the tests of the shared 2-process run go to one worker: one `two_process_runs`,
# and no two torchrun launches (4 processes) at once on the machine.
TORCHRUN_WORKER = pytest.mark.xdist_group("torchrun")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """A 3-epoch 2-process run on the synthetic MNIST (shared by the tests below)."""
    base = tmp_path_factory.mktemp("ddp")
    (base / "table.json").write_text(json.dumps(make_synthetic_mnist(base / "data")))
    straight = two_process_train(base, "straight", ["--out", str(base / "runs" / "straight"), *FLAGS])
    return {"base": base, "root": base / "data", "straight": straight}


@pytest.mark.slow  # torchrun launches of 2 processes
@TORCHRUN_WORKER
def test_two_processes_hold_identical_weights_and_write_one_complete_run_folder(two_process_runs):
    base, result = two_process_runs["base"], two_process_runs["straight"]
    run_dir = base / "runs" / "straight"
    rank0, rank1 = summaries(base / "straight")
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    assert rank0["eval_weights_sha256"] == rank1["eval_weights_sha256"]  # the EMA too
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    from digitsum.model import DigitSumNet

    model = DigitSumNet(ModelConfig.from_dict(saved["model_config"]))
    model.load_state_dict(checkpoint.train_weights(saved))
    assert distributed.state_digest(model) == rank0["weights_sha256"]  # what rank 0 saved is what both hold
    for name in RUN_FOLDER_FILES:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*.tmp"))
    assert (run_dir.parent / "latest").resolve() == run_dir
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 100
    assert saved["resume"]["world_size"] == 2 and len(saved["resume"]["rank_states"]) == 2
    # Each rank has its own augmentation stream (seeded seed * 1000 + rank).
    ranks = saved["resume"]["rank_states"]
    assert not torch.equal(ranks[0]["augment_generator"], ranks[1]["augment_generator"])
    # Only rank 0 logs: every epoch line and the final evaluation appear once.
    output = result.stdout + result.stderr
    assert output.count("training into") == 1 and output.count("epoch  1/3") == 1 and output.count("test: digit") == 1
    assert [row["epoch"] for row in metric_rows(run_dir)] == ["1", "2", "3"]
    # 500 training images, 250 per rank, 5 steps of 50 each: the logged accuracies count all 500.
    for row in metric_rows(run_dir):
        hits = float(row["train_digit_accuracy"]) * 500
        assert abs(hits - round(hits)) < 1e-3


@pytest.mark.slow  # two more 2-process launches (~30 s on 2 busy cores)
@TORCHRUN_WORKER
def test_a_stopped_two_process_run_resumes_to_the_same_weights(two_process_runs):
    base = two_process_runs["base"]
    two_process_train(base, "stopped", ["--out", str(base / "runs2" / "resumed"), *FLAGS], DIGITSUM_TEST_STOP_AFTER="1")
    stopped = summaries(base / "stopped")
    assert all(s["stopped"] and s["epochs"] == 1 for s in stopped)
    assert stopped[0]["weights_sha256"] == stopped[1]["weights_sha256"]
    resumed_run = two_process_train(base, "resumed", ["--resume", str(base / "runs2" / "resumed" / "last.pt")])
    resumed, straight = summaries(base / "resumed"), summaries(base / "straight")
    assert "resuming" in resumed_run.stdout + resumed_run.stderr
    for rank in (0, 1):
        assert resumed[rank]["weights_sha256"] == straight[0]["weights_sha256"]
        assert resumed[rank]["eval_weights_sha256"] == straight[0]["eval_weights_sha256"]
    assert metric_rows(base / "runs2" / "resumed") == metric_rows(base / "runs" / "straight")


@pytest.mark.slow  # torchrun launches of 2 processes
@TORCHRUN_WORKER
def test_a_two_process_last_pt_is_refused_by_one_process(two_process_runs):
    base = two_process_runs["base"]
    stopped_copy = base / "runs" / "stopped-copy"
    stopped_copy.mkdir()
    state = torch.load(base / "runs" / "straight" / "last.pt", weights_only=True)
    state["metadata"]["epoch"], state["resume"]["rows"] = 1, state["resume"]["rows"][:1]  # as if stopped after epoch 1
    torch.save(state, stopped_copy / "last.pt")
    with pytest.raises(DigitsumError, match="trained by 2 processes.*--nproc-per-node 2"):
        train(None, resume=stopped_copy / "last.pt", data_root=two_process_runs["root"], log=lambda *a: None)


@pytest.mark.slow  # torchrun launches of 2 processes
@TORCHRUN_WORKER
def test_a_refusal_is_one_line_on_every_rank_and_nothing_hangs(two_process_runs):
    base = two_process_runs["base"]
    run_dir = base / "runs" / "straight"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    # The real `python -m digitsum` under torchrun: the folder already holds a run.
    result = torchrun(
        ["train", "--data-root", str(two_process_runs["root"]), "--out", str(run_dir), *FLAGS], {}, module=True, timeout=120
    )
    assert result.returncode != 0
    assert result.stderr.count("digitsum train: error: ") == 2 and "already holds a run" in result.stderr
    # torchrun itself then reports the failed workers (its own ChildFailedError summary); no frame of ours.
    assert "exitcode  : 2" in result.stderr and str(SRC / "digitsum") not in result.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_python_dash_m_digitsum_is_the_cli():
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, "-m", "digitsum", "train", "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "--preset" in result.stdout


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, None),  # torchrun with one process: the plain path
        ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, World(rank=3, local_rank=1, size=4)),
    ],
)
def test_world_from_env(environ, expected):
    assert world_from_env(environ) == expected


@pytest.mark.parametrize(
    "environ",
    [
        {"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"},
        {"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"},
        {"WORLD_SIZE": "2", "RANK": "0"},
    ],
)
def test_a_malformed_torchrun_environment_is_one_line(environ):
    with pytest.raises(DigitsumError):
        world_from_env(environ)


def test_rank_shards_are_equal_disjoint_slices_of_one_permutation():
    split = Split(torch.zeros(103, 28, 28, dtype=torch.uint8), torch.arange(103), torch.zeros(103, dtype=torch.long))
    shards = [rank_shard(split, World(rank, rank, 3), torch.Generator().manual_seed(5)) for rank in range(3)]
    order = torch.randperm(103, generator=torch.Generator().manual_seed(5))
    assert [len(s) for s in shards] == [34, 34, 34]
    assert torch.equal(torch.cat([s.digits for s in shards]), order[:102])


def test_a_single_process_run_never_touches_torch_distributed(synthetic_root, tmp_path, monkeypatch):
    import torch.distributed as dist

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"a single-process run called {name}")

        return call  # one function per name (torch._dynamo refuses one object under several names)

    for name in (
        "init_process_group",
        "all_reduce",
        "all_gather_object",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "destroy_process_group",
        "is_initialized",
        "get_world_size",
    ):
        monkeypatch.setattr(dist, name, forbidden(f"torch.distributed.{name}"))
    monkeypatch.setattr(distributed, "init", forbidden("distributed.init"))
    config = TrainConfig(
        epochs=1, batch_size=50, lr=0.05, val_size=100, bf16="off", ema=0.9, model=ModelConfig(channels=(8, 16), sum_hidden=32)
    )
    summary = train(
        config,
        out_dir=tmp_path / "run",
        data_root=synthetic_root,
        log=lambda *a: None,
        progress=False,
        figures=False,
        evaluate_test=False,
    )
    assert "rank" not in summary
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert "world_size" not in state["resume"] and "rank_states" not in state["resume"]


# ----------------------------------------------------------------------------- benchmarks/gpu_check.py


def load_gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", TESTS.parent / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # runs benchmarks/gpu_check.py in a fresh interpreter; its pieces are tested just below
def test_gpu_check_without_a_gpu_says_not_run_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, str(TESTS.parent / "benchmarks" / "gpu_check.py"), "--data-root", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "not run: no GPU"
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_gpu_check_pieces_work_on_the_cpu(synthetic_root, tmp_path):
    from PIL import Image

    from digitsum.data import load_split

    gpu_check = load_gpu_check()
    files = gpu_check.write_test_pngs(synthetic_root, tmp_path, count=5)
    test = load_split("test", synthetic_root)
    for index, (path, digit) in enumerate(files):
        assert digit == int(test.digits[index])
        assert torch.equal(torch.from_numpy(np.array(Image.open(path))), test.images[index])
    result = gpu_check.cli("train", "--help", timeout=60)  # the CLI the check drives is this checkout's
    assert result.returncode == 0 and "--preset" in result.stdout
    assert (
        gpu_check.first_error(subprocess.CompletedProcess([], 2, "", "digitsum train: error: x\n")) == "digitsum train: error: x"
    )
