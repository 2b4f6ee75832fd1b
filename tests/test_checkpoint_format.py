"""The checkpoint format: version 2's one layout, the v1 migration, retired settings, RNG states.

tests/fixtures/v1_tiny_*.pt were written by the v1 code (tests/fixtures/make_v1_checkpoint.py) on
the synthetic MNIST of conftest (train=600, test=200, seed=0), which `synthetic_root` rebuilds.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from digitsum import checkpoint
from digitsum.checkpoint import CheckpointError
from digitsum.config import RETIRED_SETTINGS, ModelConfig, TrainConfig
from digitsum.train import load_resume_state, restore_rng_states, rng_states, train

FIXTURES = Path(__file__).resolve().parent / "fixtures"
V1_MODEL, V1_LAST = FIXTURES / "v1_tiny_model.pt", FIXTURES / "v1_tiny_last.pt"
EXPECTED = json.loads((FIXTURES / "v1_tiny_expected.json").read_text())
TINY = TrainConfig(
    epochs=2, batch_size=64, val_size=100, seed=0, device="cpu", bf16="off", model=ModelConfig(channels=(8, 16), sum_hidden=32)
)

# What a real v1 run (`digitsum train`, default preset) stored as model_config and train_config.
V1_MODEL_CONFIG = {
    "channels": [16, 32, 64],
    "convs_per_stage": 1,
    "first_stride": 1,
    "norm_after_pool": False,
    "batchnorm": True,
    "dropout": 0.25,
    "sum_input": "onehot",
    "sum_hidden": 128,
    "detach_sum_input": False,
}
V1_TRAIN_CONFIG = {
    "preset": "default",
    "epochs": 16,
    "batch_size": 256,
    "optimizer": "sgd",
    "lr": 0.3,
    "sum_lr_scale": 13.0,
    "warmup": 0.2,
    "weight_decay": 0.0005,
    "label_smoothing": 0.1,
    "digit_loss_weight": 1.0,
    "sum_loss_weight": 1.0,
    "rotate": 8.0,
    "scale": 0.08,
    "shear": 0.0,
    "translate": 1.5,
    "redraw_numbers": False,
    "sum_all_numbers": False,
    "ema": 0.0,
    "val_size": 5000,
    "train_limit": 0,
    "seed": 0,
    "device": "auto",
    "bf16": "auto",
    "channels_last": True,
    "model": V1_MODEL_CONFIG,
}


def fixed_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of make_v1_checkpoint.fixed_inputs (closed-form, no RNG)."""
    grid = torch.arange(28 * 28, dtype=torch.float64).reshape(28, 28)
    images = torch.stack([torch.sin(grid * 0.013 * (k + 1) + k) * 2.0 for k in range(8)]).unsqueeze(1)
    return images.float(), torch.arange(8, dtype=torch.int64) % 10


def quiet_train(config, out=None, root=None, **options) -> dict:
    return train(
        config, out_dir=out, data_root=root, log=lambda *a: None, progress=False, figures=False, evaluate_test=False, **options
    )


def metric_values(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------- v1 files


def test_the_v1_files_are_v1_and_small():
    for path in (V1_MODEL, V1_LAST):
        assert torch.load(path, weights_only=True)["format"] == "digitsum-checkpoint-v1"
    assert sum(p.stat().st_size for p in FIXTURES.iterdir()) < 200_000


def test_the_v1_model_pt_loads_and_gives_the_outputs_v1_recorded():
    model, metadata = checkpoint.load_model(V1_MODEL)
    images, numbers = fixed_inputs()
    assert numbers.tolist() == EXPECTED["numbers"]
    with torch.no_grad():
        digit_logits, sum_logits = model(images, numbers)
    assert torch.allclose(digit_logits, torch.tensor(EXPECTED["digit_logits"]), atol=1e-4)
    assert torch.allclose(sum_logits, torch.tensor(EXPECTED["sum_logits"]), atol=1e-4)
    assert digit_logits.argmax(1).tolist() == EXPECTED["digits"]
    assert sum_logits.argmax(1).tolist() == EXPECTED["sums"]
    assert metadata["epoch"] == 1 and metadata["bf16"] is False  # moved out of v1's environment
    assert "bf16" not in metadata["environment"] and "model" not in metadata["train_config"]
    for name, (_, _) in RETIRED_SETTINGS["train"].items():
        assert name not in metadata["train_config"]


def test_the_v1_model_pt_predicts_the_same_through_the_inference_model():
    from digitsum.predict import load_predictor

    fast, _ = load_predictor(V1_MODEL)
    images, numbers = fixed_inputs()
    with torch.no_grad():
        digit_logits, sum_logits = fast(images, numbers)
    assert digit_logits.argmax(1).tolist() == EXPECTED["digits"]
    assert sum_logits.argmax(1).tolist() == EXPECTED["sums"]


def test_the_v1_last_pt_resumes_to_what_v1_itself_reached(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(V1_LAST, run_dir / "last.pt")
    config, state = load_resume_state(run_dir / "last.pt")
    assert config == TINY and state["metadata"]["epoch"] == 1
    train(
        None,
        resume=run_dir / "last.pt",
        data_root=synthetic_root,
        log=lambda *a: None,
        progress=False,
        figures=False,
        evaluate_test=False,
    )
    # v1 resumed its own last.pt to epoch 2 (make_v1_checkpoint.py): this version continues identically -
    # every count exactly; the losses (6 decimals) to their last digit, which the order of torch's
    # intra-op float sums (its thread count: this process's, not the fixture maker's) may change.
    ours, v1 = metric_values(run_dir / "metrics.csv"), metric_values(FIXTURES / "v1_tiny_metrics.csv")
    assert [row.keys() for row in ours] == [row.keys() for row in v1] and len(ours) == 2
    for row, expected in zip(ours, v1):
        for key in row:
            if key.endswith("loss"):
                assert abs(float(row[key]) - float(expected[key])) <= 2e-6, (key, row, expected)
            else:
                assert row[key] == expected[key], (key, row, expected)
    resumed = torch.load(run_dir / "last.pt", weights_only=True)
    assert resumed["format"] == checkpoint.FORMAT and resumed["version"] == checkpoint.VERSION


def _v1_shaped(path: Path, change=None) -> dict:
    """A raw v1 payload (as v1 wrote it) of the checked-in file, with `change` applied."""
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == checkpoint.FORMAT_V1
    if change:
        change(payload)
    return payload


RETIRED_V1_VALUES = {
    "model.pt sum_input softmax": (V1_MODEL, lambda p: p["model_config"].update(sum_input="softmax"), "sum_input = 'softmax'"),
    "model.pt batchnorm false": (V1_MODEL, lambda p: p["model_config"].update(batchnorm=False), "batchnorm = False"),
    "model.pt trained with shear": (V1_MODEL, lambda p: p["metadata"]["train_config"].update(shear=10.0), "shear = 10.0"),
    "last.pt sum_input logits": (V1_LAST, lambda p: p["model_config"].update(sum_input="logits"), "sum_input = 'logits'"),
    "last.pt detached in train_config": (
        V1_LAST,
        lambda p: p["train_config"]["model"].update(detach_sum_input=True),
        "detach_sum_input = True",
    ),
    "last.pt redraw_numbers": (V1_LAST, lambda p: p["train_config"].update(redraw_numbers=True), "redraw_numbers = True"),
    "last.pt sum loss weight": (V1_LAST, lambda p: p["train_config"].update(sum_loss_weight=0.5), "sum_loss_weight = 0.5"),
}


@pytest.mark.parametrize("name", list(RETIRED_V1_VALUES))
def test_a_v1_checkpoint_of_a_retired_ablation_variant_is_one_line_naming_it(tmp_path, name):
    source, change, fragment = RETIRED_V1_VALUES[name]
    path = tmp_path / source.name
    torch.save(_v1_shaped(source, change), path)
    with pytest.raises(CheckpointError) as error:
        checkpoint.load_model(path) if source == V1_MODEL else load_resume_state(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert fragment in message and "ablation variant that is no longer built" in message


def test_the_sum_input_softmax_error_says_where_the_variant_lives(tmp_path):
    torch.save(_v1_shaped(V1_MODEL, lambda p: p["model_config"].update(sum_input="softmax")), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"benchmarks/sum_block\.py builds"):
        checkpoint.load_model(tmp_path / "m.pt")


def test_a_v1_checkpoint_without_the_retired_settings_loads_too(tmp_path):
    def strip(payload):
        for name in RETIRED_SETTINGS["model"]:
            payload["model_config"].pop(name)

    torch.save(_v1_shaped(V1_MODEL, strip), tmp_path / "m.pt")
    assert checkpoint.load_model(tmp_path / "m.pt")[0].config == checkpoint.load_model(V1_MODEL)[0].config


def test_a_checkpoint_of_a_newer_format_version_is_refused(tmp_path):
    payload = checkpoint.read(V1_MODEL)
    torch.save({**payload, "version": checkpoint.VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match=f"format version {checkpoint.VERSION + 1}, written by a newer"):
        checkpoint.load_model(tmp_path / "new.pt")


# ----------------------------------------------------------------------------- config.json sections


def test_a_v1_config_json_train_section_reads_back_with_the_shipped_values_dropped():
    config = TrainConfig.from_dict(json.loads(json.dumps(V1_TRAIN_CONFIG)))
    assert config == TrainConfig(model=ModelConfig(dropout=0.25))
    assert ModelConfig.from_dict(V1_MODEL_CONFIG) == ModelConfig(dropout=0.25)


@pytest.mark.parametrize(
    "section, name, value",
    [
        ("train", "shear", 5.0),
        ("train", "channels_last", False),
        ("train", "digit_loss_weight", 0.0),
        ("model", "sum_input", "logits"),
        ("model", "batchnorm", 1),
    ],
)
def test_a_retired_setting_at_another_value_is_refused_by_from_dict(section, name, value):
    values = json.loads(json.dumps(V1_TRAIN_CONFIG))
    (values if section == "train" else values["model"])[name] = value
    with pytest.raises(Exception) as error:
        TrainConfig.from_dict(values)
    assert f"{name} = {value!r}" in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- the v2 layout


def test_model_pt_and_last_pt_share_one_layout_apart_from_resume(tiny_run):
    model_pt = torch.load(tiny_run / "model.pt", weights_only=True)
    last_pt = torch.load(tiny_run / "last.pt", weights_only=True)
    assert set(last_pt) == set(model_pt) | {"resume"}
    assert set(model_pt) == {"format", "version", "model_config", "model", "metadata"}
    assert set(model_pt["metadata"]) == set(last_pt["metadata"]) == {"epoch", "val", "train_config", "bf16", "environment", "run"}
    assert model_pt["version"] == checkpoint.VERSION and model_pt["format"] == checkpoint.FORMAT
    # No field stored twice: the weights once (no EMA), the model settings once, bf16 once, epoch once.
    assert "model_train" not in last_pt["resume"] and "epoch" not in last_pt["resume"]
    assert "model" not in last_pt["metadata"]["train_config"] and "bf16" not in last_pt["metadata"]["environment"]
    assert set(last_pt["resume"]) == {"optimizer", "scheduler", "generator", "torch_rng", "rows", "best_score"}
    # The migrated v1 files have this layout too.
    assert set(checkpoint.read(V1_MODEL)) == set(model_pt)
    assert set(checkpoint.read(V1_LAST)) == set(last_pt)


def _as_v1(payload: dict, ema_decay: float) -> dict:
    """A v2 last.pt written back into v1's layout (what the v1 code saved) - to test migrate_v1 with EMA."""
    metadata, resume = payload["metadata"], payload["resume"]
    train_config = {**metadata["train_config"], "model": payload["model_config"]}
    v1 = {
        "format": checkpoint.FORMAT_V1,
        "model_config": payload["model_config"],
        "model": payload["model"],
        "model_train": checkpoint.train_weights(payload),
        "optimizer": resume["optimizer"],
        "scheduler": resume["scheduler"],
        "ema": None,
        "generator": resume["generator"],
        "torch_rng": resume["torch_rng"],
        "epoch": metadata["epoch"],
        "rows": resume["rows"],
        "best_score": resume["best_score"],
        "train_config": train_config,
        "bf16": metadata["bf16"],
        "metadata": {"epoch": metadata["epoch"]},
    }
    if ema_decay:
        v1["ema"] = {"n_averaged": resume["ema_n_averaged"], **{f"module.{k}": v for k, v in payload["model"].items()}}
    return v1


# Without EMA in the slow run only: four trainings; the fast subset keeps the case with EMA (more fields).
@pytest.mark.parametrize("ema", [pytest.param(0.0, marks=pytest.mark.slow), 0.9])
def test_a_v1_shaped_last_pt_with_or_without_ema_resumes_exactly(synthetic_root, tmp_path, ema):
    config = replace(TINY, ema=ema)
    quiet_train(config, tmp_path / "straight", synthetic_root)
    quiet_train(config, tmp_path / "stopped", synthetic_root, stop_after=1)
    v2 = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert ("model_train" in v2["resume"]) == bool(ema)  # trained weights stored apart only with an average
    torch.save(_as_v1(v2, ema), tmp_path / "stopped" / "last.pt")
    quiet_train(None, root=synthetic_root, resume=tmp_path / "stopped" / "last.pt")
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    for weights in (checkpoint.train_weights, lambda payload: payload["model"]):
        for name, tensor in weights(straight).items():
            assert torch.equal(tensor, weights(resumed)[name]), name
    assert metric_values(tmp_path / "straight" / "metrics.csv") == metric_values(tmp_path / "stopped" / "metrics.csv")


# ----------------------------------------------------------------------------- CUDA random state


class FakeCuda:
    """Stands in for torch.cuda's RNG functions: records what is set, returns fixed states."""

    def __init__(self, monkeypatch, count: int):
        self.saved = [torch.full((16,), 7 + i, dtype=torch.uint8) for i in range(count)]
        self.restored = None
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.saved])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: setattr(self, "restored", states))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_the_cuda_random_state_is_saved_next_to_the_cpu_one_only_when_training_on_cuda(monkeypatch):
    fake = FakeCuda(monkeypatch, count=2)
    on_cuda = rng_states(torch.device("cuda"))
    assert set(on_cuda) == {"torch_rng", "cuda_rng"} and len(on_cuda["cuda_rng"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(on_cuda["cuda_rng"], fake.saved))
    assert set(rng_states(torch.device("cpu"))) == {"torch_rng"}


def test_the_cuda_random_state_is_restored_on_resume_and_a_missing_one_is_said(monkeypatch):
    fake = FakeCuda(monkeypatch, count=2)
    cpu_before = torch.get_rng_state()
    states = rng_states(torch.device("cuda"))
    torch.rand(5)  # move the CPU stream on; restoring must bring it back
    notes = []
    restore_rng_states(states, torch.device("cuda"), notes.append)
    assert torch.equal(torch.get_rng_state(), cpu_before)
    assert fake.restored is states["cuda_rng"] and notes == []
    fake.restored = None
    restore_rng_states({"torch_rng": cpu_before}, torch.device("cuda"), notes.append)  # saved on a CPU
    assert fake.restored is None and len(notes) == 1 and "no CUDA random state" in notes[0]
    restore_rng_states(states, torch.device("cpu"), notes.append)  # saved on CUDA, resumed on a CPU
    assert fake.restored is None


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: the real CUDA generator's save/restore in a resumed run is untested",
)
def test_a_cuda_run_with_dropout_resumes_with_the_same_weights(synthetic_root, tmp_path):
    config = replace(TINY, device="cuda", model=replace(TINY.model, dropout=0.5))
    quiet_train(config, tmp_path / "straight", synthetic_root)
    quiet_train(config, tmp_path / "stopped", synthetic_root, stop_after=1)
    assert "cuda_rng" in torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["resume"]
    quiet_train(None, root=synthetic_root, resume=tmp_path / "stopped" / "last.pt")
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(straight[k], resumed[k]) for k in straight)
