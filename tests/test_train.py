"""The training loop: run folder, determinism, resume, interruption, refusals."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from digitsum import checkpoint
from digitsum.errors import DigitsumError, Interrupted
from digitsum.config import ModelConfig, TrainConfig
from digitsum.train import train

TINY = TrainConfig(epochs=2, batch_size=50, lr=0.05, val_size=100, bf16="off",
                   model=ModelConfig(channels=(8, 16), sum_hidden=32))


def quiet(*args):
    pass


def run(config, root, out, **kwargs):
    return train(config, out_dir=out, data_root=root, log=quiet, progress=False, figures=False, **kwargs)


def metric_values(run_dir):
    """metrics.csv without the wall-clock column."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_a_run_writes_its_folder_and_points_latest_at_it(synthetic_root, tmp_path):
    out = tmp_path / "runs" / "first"
    summary = train(TINY, out_dir=out, data_root=synthetic_root, log=quiet, progress=False)
    for name in ("config.json", "metrics.csv", "model.pt", "last.pt", "curves.png", "samples.png",
                 "eval.json", "confusion.png", "mistakes.png"):
        assert (out / name).exists(), name
    assert (tmp_path / "runs" / "latest").resolve() == out.resolve()
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["train"]["model"]["channels"] == [8, 16]
    assert "torch" in saved["environment"]
    assert len(metric_values(out)) == 2
    assert set(summary["metrics"]["test"]) == {"digit_accuracy", "sum_accuracy", "loss"}


def test_training_learns_the_synthetic_digits(synthetic_root, tmp_path):
    config = TrainConfig(**{**TINY.__dict__, "epochs": 6})
    summary = run(config, synthetic_root, tmp_path / "run")
    assert summary["metrics"]["test"]["digit_accuracy"] > 0.5  # chance is 0.1


def test_same_seed_twice_gives_identical_metrics(synthetic_root, tmp_path):
    run(TINY, synthetic_root, tmp_path / "a")
    run(TINY, synthetic_root, tmp_path / "b")
    assert metric_values(tmp_path / "a") == metric_values(tmp_path / "b")


def test_another_seed_gives_other_metrics(synthetic_root, tmp_path):
    run(TINY, synthetic_root, tmp_path / "a")
    run(TrainConfig(**{**TINY.__dict__, "seed": 1}), synthetic_root, tmp_path / "b")
    assert metric_values(tmp_path / "a") != metric_values(tmp_path / "b")


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(synthetic_root, tmp_path, ema):
    config = TrainConfig(**{**TINY.__dict__, "rotate": 5.0, "ema": ema})
    run(config, synthetic_root, tmp_path / "straight", evaluate_test=False)
    stopped = run(config, synthetic_root, tmp_path / "resumed", stop_after=1, evaluate_test=False)
    assert stopped["stopped"]
    run(None, synthetic_root, None, resume=tmp_path / "resumed" / "last.pt", evaluate_test=False)
    for weights in (checkpoint.train_weights, lambda payload: payload["model"]):  # trained, evaluated (EMA)
        straight = weights(torch.load(tmp_path / "straight" / "last.pt", weights_only=True))
        resumed = weights(torch.load(tmp_path / "resumed" / "last.pt", weights_only=True))
        assert straight.keys() == resumed.keys()
        for name in straight:
            assert torch.equal(straight[name], resumed[name]), name
    assert metric_values(tmp_path / "straight") == metric_values(tmp_path / "resumed")


def test_ctrl_c_leaves_a_resumable_last_pt(synthetic_root, tmp_path):
    def interrupt_after_first_epoch(line):
        if line.startswith("epoch  1/"):
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="resume with"):
        train(TINY, out_dir=tmp_path / "run", data_root=synthetic_root, log=interrupt_after_first_epoch,
              progress=False, figures=False)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["metadata"]["epoch"] == 1
    summary = run(None, synthetic_root, None, resume=tmp_path / "run" / "last.pt")
    assert summary["epochs"] == 2 and len(metric_values(tmp_path / "run")) == 2


def test_an_output_folder_holding_a_run_is_refused_and_left_untouched(synthetic_root, tmp_path):
    out = tmp_path / "run"
    run(TINY, synthetic_root, out, evaluate_test=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DigitsumError, match="already holds a run.*--overwrite"):
        run(TINY, synthetic_root, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_overwrite_replaces_a_run(synthetic_root, tmp_path):
    out = tmp_path / "run"
    run(TINY, synthetic_root, out, evaluate_test=False)
    run(TrainConfig(**{**TINY.__dict__, "epochs": 1}), synthetic_root, out, overwrite=True, evaluate_test=False)
    assert len(metric_values(out)) == 1


def test_resuming_a_finished_and_evaluated_run_is_refused(synthetic_root, tmp_path):
    run(TINY, synthetic_root, tmp_path / "run")
    assert (tmp_path / "run" / "eval.json").exists()
    with pytest.raises(DigitsumError, match="finished run.*digitsum evaluate"):
        run(None, synthetic_root, None, resume=tmp_path / "run" / "last.pt")


def test_resuming_a_finished_run_without_eval_json_runs_the_final_evaluation(synthetic_root, tmp_path):
    run(TINY, synthetic_root, tmp_path / "run", evaluate_test=False)  # as if the evaluation had failed
    before = (tmp_path / "run" / "last.pt").read_bytes()
    summary = run(None, synthetic_root, None, resume=tmp_path / "run" / "last.pt")
    assert set(summary["metrics"]["test"]) == {"digit_accuracy", "sum_accuracy", "loss"}
    assert (tmp_path / "run" / "eval.json").exists()
    assert (tmp_path / "run" / "last.pt").read_bytes() == before  # no training happened


def test_resuming_from_a_weights_only_checkpoint_is_refused(synthetic_root, tmp_path):
    run(TINY, synthetic_root, tmp_path / "run", evaluate_test=False)
    with pytest.raises(DigitsumError, match="not resumable"):
        run(None, synthetic_root, None, resume=tmp_path / "run" / "model.pt")


def test_resuming_a_last_pt_whose_weights_do_not_fit_its_settings_is_refused(synthetic_root, tmp_path):
    run(TINY, synthetic_root, tmp_path / "run", stop_after=1, evaluate_test=False)
    path = tmp_path / "run" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["model_config"]["channels"] = [4, 4]
    checkpoint.save(path, {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(DigitsumError, match="does not match"):
        run(None, synthetic_root, None, resume=path)


def test_grid_training_of_the_sum_block_learns_the_synthetic_sums(synthetic_root, tmp_path):
    config = TrainConfig(**{**TINY.__dict__, "epochs": 6, "sum_all_numbers": True})
    summary = run(config, synthetic_root, tmp_path / "run")
    grid = summary["metrics"]["grid"]
    assert summary["metrics"]["test"]["sum_accuracy"] > 0.5 and grid["sum_accuracy"] > 0.5


def test_presets_differ_only_where_they_say_and_flags_override_them():
    from digitsum.config import PRESETS, preset

    assert preset("fast").epochs == PRESETS["fast"].epochs and preset("fast").preset == "fast"
    assert preset("best", epochs=3, seed=7).epochs == 3 and preset("best", seed=7).seed == 7
    assert preset("best").model.convs_per_stage != preset("default").model.convs_per_stage
    with pytest.raises(DigitsumError, match="unknown preset"):
        preset("quickest")
