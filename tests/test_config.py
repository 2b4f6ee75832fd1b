"""`digitsum train`'s settings: flags generated from config.py's dataclasses, --config, checks first."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import subprocess
import sys

import pytest
import torch

from digitsum import cli
from digitsum.config import PRESETS, ModelConfig, TrainConfig, read_config_file
from digitsum.errors import DigitsumError
from test_faults import cli_error

FLAGS = {dest: (flag, field, annotation) for flag, dest, field, annotation in cli.config_flags()}
SETTINGS = [("train", field) for field in dataclasses.fields(TrainConfig) if field.name not in cli.NOT_FLAGS] + [
    ("model", field) for field in dataclasses.fields(ModelConfig)
]
DEFAULT = PRESETS["default"]
TINY = [
    "--epochs",
    "2",
    "--batch-size",
    "50",
    "--val-size",
    "100",
    "--bf16",
    "off",
    "--channels",
    "8,16",
    "--sum-hidden",
    "16",
    "--ema",
    "0.5",
    "--seed",
    "3",
    "--dropout",
    "0.1",
    "--train-limit",
    "200",
]  # 4 steps per epoch: two runs of it in test_config_repeats_a_run_exactly


def parse(argv: list[str]) -> TrainConfig:
    return cli.train_config_from_args(cli.build_parser().parse_args(["train", *argv]))


def another_value(field: dataclasses.Field, annotation, current):
    """A value of the field's type that differs from `current` (and is one of its choices, if any)."""
    if "choices" in field.metadata:
        return next(choice for choice in field.metadata["choices"] if choice != current)
    if annotation is bool:
        return not current
    if annotation is int:
        return current + 3
    if annotation is float:
        return current + 0.25
    if annotation == tuple[int, ...]:
        return (8, 24)
    if annotation is str:
        return "cpu" if current != "cpu" else "auto"  # device: the one free-text setting
    raise AssertionError(f"no test value for {field.name}: {annotation}")


def as_argv(flag: str, value) -> list[str]:
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, tuple):
        return [flag, ",".join(map(str, value))]
    return [flag, str(value)]


@pytest.mark.parametrize("section, field", SETTINGS, ids=[f"{s}.{f.name}" for s, f in SETTINGS])
def test_every_setting_is_a_flag_that_sets_exactly_its_field(section, field):
    flag, _, annotation = FLAGS[f"{section}.{field.name}"]  # a KeyError: a field without a flag
    assert flag == "--" + field.name.replace("_", "-")
    assert field.metadata.get("help"), f"{field.name} has no help text"
    current = getattr(DEFAULT.model if section == "model" else DEFAULT, field.name)
    value = another_value(field, annotation, current)
    changed = {field.name: value} if section == "train" else {"model": dataclasses.replace(DEFAULT.model, **{field.name: value})}
    assert parse(as_argv(flag, value)) == dataclasses.replace(DEFAULT, **changed)


def test_only_the_excluded_fields_have_no_flag():
    assert len(FLAGS) == len(SETTINGS)
    assert {name for name in cli.NOT_FLAGS} <= {field.name for field in dataclasses.fields(TrainConfig)}


def test_the_flags_follow_the_dataclass_when_a_field_goes(monkeypatch):
    """Nothing lists the fields by hand: a TrainConfig without `ema` has no --ema, and the rest still map."""
    import typing

    types = typing.get_type_hints(TrainConfig)
    reduced = dataclasses.make_dataclass(
        "TrainConfig",
        [
            (f.name, types[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
            for f in dataclasses.fields(TrainConfig)
            if f.name != "ema"
        ],
        frozen=True,
    )
    monkeypatch.setattr(cli, "TrainConfig", reduced)
    dests = [dest for _, dest, _, _ in cli.config_flags()]
    assert "train.ema" not in dests and "train.epochs" in dests and "model.channels" in dests
    args = cli.build_parser().parse_args(["train", "--epochs", "3", "--channels", "8"])
    assert cli.config_overrides(args) == ({"epochs": 3}, {"channels": (8,)})
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--ema", "0.5"])


def test_every_train_flag_of_earlier_versions_still_exists():
    subcommands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {option for action in subcommands.choices["train"]._actions for option in action.option_strings}
    for flag in (
        "--epochs",
        "--batch-size",
        "--lr",
        "--optimizer",
        "--weight-decay",
        "--label-smoothing",
        "--val-size",
        "--train-limit",
        "--seed",
        "--device",
        "--bf16",
        "--ema",
        "--sum-hidden",
        "--preset",
        "--out",
        "--resume",
        "--overwrite",
        "--data-root",
    ):
        assert flag in options, flag


def test_a_boolean_flag_and_its_no_form_override_the_preset():
    assert PRESETS["fast"].model.norm_after_pool and not DEFAULT.sum_all_numbers
    assert parse(["--preset", "fast", "--no-norm-after-pool"]).model.norm_after_pool is False
    assert parse(["--norm-after-pool"]).model.norm_after_pool is True
    assert parse(["--sum-all-numbers"]).sum_all_numbers is True
    assert parse(["--preset", "best", "--no-sum-all-numbers"]).sum_all_numbers is False


def test_a_tuple_flag_sets_the_channels_and_keeps_the_rest_of_the_preset():
    config = parse(["--preset", "best", "--channels", "8,16"])
    assert config.model.channels == (8, 16)
    assert config.model.convs_per_stage == PRESETS["best"].model.convs_per_stage
    assert config.preset == "best" and config.epochs == PRESETS["best"].epochs


@pytest.mark.parametrize("dest", [dest for dest, (_, field, _) in FLAGS.items() if "choices" in field.metadata])
def test_a_value_outside_a_fields_choices_is_one_line(capsys, dest):
    flag, _, annotation = FLAGS[dest]
    bogus = "99" if annotation is int else "bogus"  # the right type, not one of the choices
    assert f"{flag}: invalid choice: " in cli_error(capsys, ["train", flag, bogus])


def test_device_cuda_n_is_accepted_and_checked(capsys, tmp_path, monkeypatch):
    assert parse(["--device", "cuda:3"]).device == "cuda:3"
    assert "unknown device 'cuda:x'" in cli_error(capsys, ["train", "--device", "cuda:x"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine has no CUDA GPU, whatever it is
    monkeypatch.chdir(tmp_path)
    err = cli_error(
        capsys, ["train", "--device", "cuda:1", "--out", str(tmp_path / "run"), "--data-root", str(tmp_path / "data")]
    )
    assert "cuda:1" in err and "no CUDA GPU" in err
    assert list(tmp_path.iterdir()) == []  # no run folder, no data


def test_an_invalid_choice_exits_2_in_one_line_and_creates_nothing(tmp_path):
    """The real process: `digitsum train --optimizer adam` leaves no run folder, no runs/, no data."""
    result = subprocess.run(
        [sys.executable, "-m", "digitsum", "train", "--optimizer", "adam", "--out", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--optimizer: invalid choice: 'adam'" in result.stderr
    assert list(tmp_path.iterdir()) == []


def write_json(path, values) -> str:
    path.write_text(json.dumps(values))
    return str(path)


def test_config_file_settings_with_flags_over_them(tmp_path):
    values = {
        "train": dataclasses.replace(DEFAULT, epochs=7, lr=0.05, model=ModelConfig(channels=(4, 8))).to_dict(),
        "bf16": False,
        "environment": {"anything": "ignored"},
    }
    path = write_json(tmp_path / "config.json", values)
    config = parse(["--config", path, "--epochs", "2", "--sum-hidden", "0"])
    assert (config.epochs, config.lr, config.model.channels, config.model.sum_hidden) == (2, 0.05, (4, 8), 0)
    assert config.bf16 == "off"  # "auto" pinned to what the run resolved it to
    assert parse(["--config", path, "--bf16", "auto"]).bf16 == "auto"
    assert read_config_file(write_json(tmp_path / "bare.json", values["train"])) == parse(["--config", path, "--bf16", "auto"])


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"train": {"epochs": 2, "bogus": 1}}, "unknown training settings: ['bogus']"),
        ({"train": {"model": {"bogus": 1}}}, "unknown model settings: ['bogus']"),
        ({"train": {"model": {"channels": "abc"}}}, "channels must be a list of integers"),
        ({"train": {"model": 3}}, '"model" must be a JSON object'),
        ({"train": [1]}, '"train" must be a JSON object'),
        ([1, 2], "must hold a JSON object"),
        ({"train": {"optimizer": "adam"}}, "optimizer must be sgd or adamw"),
        ({"train": {"epochs": "3"}}, "epochs must be an integer"),
    ],
)
def test_a_bad_config_file_is_one_line_and_creates_nothing(tmp_path, capsys, content, fragment):
    path = write_json(tmp_path / "config.json", content)
    err = cli_error(capsys, ["train", "--config", path, "--out", str(tmp_path / "run"), "--data-root", str(tmp_path / "data")])
    assert fragment in err
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_config_with_preset_or_resume_is_refused(tmp_path, capsys):
    path = write_json(tmp_path / "config.json", {"train": {}})
    assert "--preset" in cli_error(capsys, ["train", "--config", path, "--preset", "fast"])
    assert "--resume" in cli_error(capsys, ["train", "--config", path, "--resume", str(tmp_path / "last.pt")])


def metrics_without_time(path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_config_repeats_a_run_exactly(synthetic_root, tmp_path, monkeypatch):
    from digitsum import train

    # Both CLI trainings without the figures and the final test evaluation (seconds, neither compared
    # here; test_train.py checks them): what --config must repeat is the config, metrics and weights.
    monkeypatch.setattr(train, "train", functools.partial(train.train, figures=False, evaluate_test=False))
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main(["train", "--data-root", str(synthetic_root), "--out", str(first), *TINY]) == 0
    assert (
        cli.main(["train", "--data-root", str(synthetic_root), "--out", str(second), "--config", str(first / "config.json")]) == 0
    )
    saved = [json.loads((run / "config.json").read_text()) for run in (first, second)]
    assert saved[0]["train"] == saved[1]["train"] and saved[0]["train"]["model"]["channels"] == [8, 16]
    assert saved[0]["bf16"] is saved[1]["bf16"] is False
    rows = metrics_without_time(first / "metrics.csv")
    assert len(rows) == 2 and rows == metrics_without_time(second / "metrics.csv")
    for name in ("model.pt", "last.pt"):
        weights = [torch.load(run / name, weights_only=True)["model"] for run in (first, second)]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_read_config_file_problems_are_digitsum_errors(tmp_path):
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DigitsumError, match="is not JSON"):
        read_config_file(tmp_path / "broken.json")
    with pytest.raises(DigitsumError, match="cannot read"):
        read_config_file(tmp_path)
