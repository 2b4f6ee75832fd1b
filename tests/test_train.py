"""The training loop: run folder, determinism, resume, interruption, refusals."""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

from digitsum import checkpoint
from digitsum.errors import DigitsumError, Interrupted
from digitsum.config import TrainConfig
from digitsum.train import train
from model_files import RUN_FOLDER_FILES, TINY_RUN

TINY = TINY_RUN  # the config of the session's shared `tiny_run` (conftest.py)


def quiet(*args):
    pass


def run(config, root, out, **kwargs):
    return train(config, out_dir=out, data_root=root, log=quiet, progress=False, figures=False, **kwargs)


def snapshot(folder):
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metric_values(run_dir):
    """metrics.csv without the wall-clock column."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_a_run_writes_its_folder_and_points_latest_at_it(tiny_run):
    out = tiny_run  # train(TINY, out_dir=.../runs/tiny) with the default figures and final evaluation
    for name in RUN_FOLDER_FILES:
        assert (out / name).exists(), name
    assert (out.parent / "latest").resolve() == out.resolve()
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["train"]["model"]["channels"] == [8, 16]
    assert "torch" in saved["environment"] and saved["bf16"] is False
    assert len(metric_values(out)) == 2
    assert set(json.loads((out / "eval.json").read_text())["test"]) == {"digit_accuracy", "sum_accuracy", "loss"}


def test_training_learns_the_synthetic_digits(session_root, tmp_path):
    config = TrainConfig(**{**TINY.__dict__, "epochs": 6})
    summary = run(config, session_root, tmp_path / "run")
    assert summary["metrics"]["test"]["digit_accuracy"] > 0.5  # chance is 0.1


def test_same_seed_twice_gives_identical_metrics(tiny_run, session_root, tmp_path):
    run(TINY, session_root, tmp_path / "again", evaluate_test=False)
    assert metric_values(tmp_path / "again") == metric_values(tiny_run)


def test_another_seed_gives_other_metrics(tiny_run, session_root, tmp_path):
    run(replace(TINY, seed=1), session_root, tmp_path / "b", evaluate_test=False)
    assert metric_values(tmp_path / "b") != metric_values(tiny_run)


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_run, session_root, tmp_path, ema):
    config = replace(TINY, ema=ema)  # TINY augments (rotate, scale, translate): its random stream must resume too
    if ema:
        run(config, session_root, tmp_path / "straight", evaluate_test=False)
        straight_dir = tmp_path / "straight"
    else:
        straight_dir = tiny_run  # the same config, trained straight through by the session
    stopped = run(config, session_root, tmp_path / "resumed", stop_after=1, evaluate_test=False)
    assert stopped["stopped"]
    run(None, session_root, None, resume=tmp_path / "resumed" / "last.pt", evaluate_test=False)
    straight_pt = torch.load(straight_dir / "last.pt", weights_only=True)
    for weights in (checkpoint.train_weights, lambda payload: payload["model"]):  # trained, evaluated (EMA)
        straight = weights(straight_pt)
        resumed = weights(torch.load(tmp_path / "resumed" / "last.pt", weights_only=True))
        assert straight.keys() == resumed.keys()
        for name in straight:
            assert torch.equal(straight[name], resumed[name]), name
    # With EMA the evaluated weights are the average, not the trained ones (else the check above is one check).
    averaged = [
        not torch.equal(straight_pt["model"][k], checkpoint.train_weights(straight_pt)[k])
        for k in straight_pt["model"]
        if straight_pt["model"][k].is_floating_point()
    ]
    assert any(averaged) == bool(ema)
    assert metric_values(straight_dir) == metric_values(tmp_path / "resumed")


def test_ctrl_c_leaves_a_resumable_last_pt(session_root, tmp_path):
    def interrupt_after_first_epoch(line):
        if line.startswith("epoch  1/"):
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="resume with"):
        train(
            TINY, out_dir=tmp_path / "run", data_root=session_root, log=interrupt_after_first_epoch, progress=False, figures=False
        )
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["metadata"]["epoch"] == 1
    summary = run(None, session_root, None, resume=tmp_path / "run" / "last.pt")
    assert summary["epochs"] == 2 and len(metric_values(tmp_path / "run")) == 2


def test_an_output_folder_holding_a_run_is_refused_and_left_untouched(tiny_run, session_root, tmp_path):
    out = shutil.copytree(tiny_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DigitsumError, match="already holds a run.*--overwrite"):
        run(TINY, session_root, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_overwrite_replaces_a_run(tiny_run, session_root, tmp_path):
    out = shutil.copytree(tiny_run, tmp_path / "run")
    run(TrainConfig(**{**TINY.__dict__, "epochs": 1}), session_root, out, overwrite=True, evaluate_test=False)
    assert len(metric_values(out)) == 1
    assert not (out / "eval.json").exists()  # the old run's files went with it


def test_resuming_a_finished_and_evaluated_run_is_refused(tiny_run, session_root, tmp_path):
    out = shutil.copytree(tiny_run, tmp_path / "run")
    assert (out / "eval.json").exists()
    before = snapshot(out)
    with pytest.raises(DigitsumError, match="finished run.*digitsum evaluate"):
        run(None, session_root, None, resume=out / "last.pt")
    assert snapshot(out) == before


def test_resuming_a_finished_run_without_eval_json_runs_the_final_evaluation(tiny_run, session_root, tmp_path):
    out = shutil.copytree(tiny_run, tmp_path / "run")
    (out / "eval.json").unlink()  # as if the final evaluation had failed
    before = (out / "last.pt").read_bytes()
    summary = run(None, session_root, None, resume=out / "last.pt")
    assert set(summary["metrics"]["test"]) == {"digit_accuracy", "sum_accuracy", "loss"}
    assert (out / "eval.json").exists()
    assert (out / "last.pt").read_bytes() == before  # no training happened


def test_resuming_from_a_weights_only_checkpoint_is_refused(tiny_run, session_root, tmp_path):
    out = shutil.copytree(tiny_run, tmp_path / "run")
    with pytest.raises(DigitsumError, match="not resumable"):
        run(None, session_root, None, resume=out / "model.pt")


def test_resuming_a_last_pt_whose_weights_do_not_fit_its_settings_is_refused(tiny_run, session_root, tmp_path):
    out = shutil.copytree(tiny_run, tmp_path / "run")
    (out / "eval.json").unlink()  # resumable: the mismatch, not the finished run, must be what is refused
    path = out / "last.pt"
    state = torch.load(path, weights_only=True)
    state["model_config"]["channels"] = [4, 4]
    checkpoint.save(path, {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(DigitsumError, match="does not match"):
        run(None, session_root, None, resume=path)


def test_grid_training_of_the_sum_block_learns_the_synthetic_sums(session_root, tmp_path):
    config = TrainConfig(**{**TINY.__dict__, "epochs": 6, "sum_all_numbers": True})
    summary = run(config, session_root, tmp_path / "run")
    grid = summary["metrics"]["grid"]
    assert summary["metrics"]["test"]["sum_accuracy"] > 0.5 and grid["sum_accuracy"] > 0.5


def test_presets_differ_only_where_they_say_and_flags_override_them():
    from digitsum.config import PRESETS, preset

    assert preset("fast").epochs == PRESETS["fast"].epochs and preset("fast").preset == "fast"
    assert preset("best", epochs=3, seed=7).epochs == 3 and preset("best", seed=7).seed == 7
    assert preset("best").model.convs_per_stage != preset("default").model.convs_per_stage
    with pytest.raises(DigitsumError, match="unknown preset"):
        preset("quickest")


# ----------------------------------------------------------------------------- precision, optimizer, no validation


def test_bf16_forced_on_trains_on_the_cpu_and_is_recorded(tiny_run, session_root, tmp_path):
    out = tmp_path / "bf16"
    summary = run(replace(TINY, bf16="on"), session_root, out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["bf16"] is True and saved["train"]["bf16"] == "on"
    assert torch.load(out / "last.pt", weights_only=True)["metadata"]["bf16"] is True
    rows = metric_values(out)
    assert len(rows) == 2 and all(math.isfinite(float(v)) for row in rows for v in row.values())
    assert all(math.isfinite(v) for v in summary["metrics"]["test"].values())
    # The same run in float32 (the shared tiny run): bf16 autocast really changed the arithmetic.
    assert rows[0]["train_loss"] != metric_values(tiny_run)[0]["train_loss"]


def test_adamw_trains_and_resumes_to_the_same_weights(session_root, tmp_path):
    config = replace(TINY, optimizer="adamw", lr=0.003, ema=0.9)
    run(config, session_root, tmp_path / "straight", evaluate_test=False)
    run(config, session_root, tmp_path / "resumed", stop_after=1, evaluate_test=False)
    run(None, session_root, None, resume=tmp_path / "resumed" / "last.pt", evaluate_test=False)
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    optimizer_state = next(iter(straight["resume"]["optimizer"]["state"].values()))
    assert {"exp_avg", "exp_avg_sq"} <= set(optimizer_state)  # Adam's moments: AdamW really ran
    for weights in (checkpoint.train_weights, lambda payload: payload["model"]):
        for name, tensor in weights(straight).items():
            assert torch.equal(tensor, weights(resumed)[name]), name
    assert metric_values(tmp_path / "straight") == metric_values(tmp_path / "resumed")
    rows = metric_values(tmp_path / "straight")
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_val_size_0_trains_without_validation_and_keeps_the_last_epoch(session_root, tmp_path):
    # (`--val-size 0` reaches TrainConfig.val_size like every flag: tests/test_config.py.)
    from digitsum.evaluate import evaluate_checkpoint

    out = tmp_path / "run"
    run(replace(TINY, val_size=0), session_root, out, evaluate_test=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["val_images"] == 0 and saved["train_images"] == 600  # every training image is trained on
    rows = metric_values(out)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(row[f"val_{k}"] == "" for row in rows for k in ("loss", "digit_accuracy", "sum_accuracy"))
    model_pt = torch.load(out / "model.pt", weights_only=True)
    assert model_pt["metadata"]["epoch"] == 2 and model_pt["metadata"]["val"] == {}  # best = the last epoch
    metrics = evaluate_checkpoint(out / "model.pt", session_root, device="cpu", figures=False)
    assert set(metrics["test"]) == {"digit_accuracy", "sum_accuracy", "loss"}
    assert json.loads((out / "eval.json").read_text())["test"] == metrics["test"]
