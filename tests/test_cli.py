"""The command line: exit codes, one-line errors, machine-readable output."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import pytest
from budget import examples  # fewer examples in the fast subset
from hypothesis import given, settings
from hypothesis import strategies as st

from digitsum import cli, mnist

FAST = ["--epochs", "1", "--batch-size", "50", "--val-size", "100", "--bf16", "off"]


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exited:
        sys.exit(cli.main(argv))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "train", "evaluate"):
        assert command in out


def test_evaluate_json_has_the_documented_shape_and_out_gets_the_files(tiny_run, session_root, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()}
    out = tmp_path / "evaluation" / "here"  # created, parents too
    assert cli.main(["evaluate", str(tiny_run / "model.pt"), "--data-root", str(session_root), "--json", "--out", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics["test"]) == {"digit_accuracy", "sum_accuracy", "loss"}
    assert set(metrics["grid"]) == {"digit_accuracy", "sum_accuracy", "addition_errors", "pairs", "addition_table_correct"}
    assert metrics["grid"]["pairs"] == 200 * 10
    assert set(metrics["per_class"]) == {str(d) for d in range(10)}
    assert metrics["checkpoint"].endswith("model.pt") and metrics["seconds"] >= 0
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "eval.json", "mistakes.png"]
    assert json.loads((out / "eval.json").read_text()) == metrics
    assert {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()} == before  # the run folder untouched


def test_evaluate_without_out_writes_next_to_the_checkpoint(tiny_run, session_root, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "eval.json").unlink()
    assert cli.main(["evaluate", str(run / "model.pt"), "--data-root", str(session_root)]) == 0
    assert f"wrote eval.json, confusion.png, mistakes.png to {run}" in capsys.readouterr().out
    assert set(json.loads((run / "eval.json").read_text())["test"]) == {"digit_accuracy", "sum_accuracy", "loss"}


def test_evaluate_out_under_a_file_prints_the_metrics_then_one_line_and_exits_2(tiny_run, session_root, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exited:
        sys.exit(
            cli.main(
                [
                    "evaluate",
                    str(tiny_run / "model.pt"),
                    "--data-root",
                    str(session_root),
                    "--json",
                    "--out",
                    str(tmp_path / "file" / "eval"),
                ]
            )
        )
    captured = capsys.readouterr()
    assert exited.value.code == 2
    assert set(json.loads(captured.out)["test"]) == {"digit_accuracy", "sum_accuracy", "loss"}  # results kept
    err = captured.err.strip()
    assert err.startswith("digitsum evaluate: error:") and "\n" not in err and "Traceback" not in err
    assert str(tmp_path / "file") in err
    assert (tmp_path / "file").read_text() == "x"


def test_train_into_a_folder_with_a_run_exits_2_and_keeps_it(tiny_run, session_root, tmp_path, capsys):
    out = shutil.copytree(tiny_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = one_line_error(capsys, ["train", "--data-root", str(session_root), "--out", str(out), *FAST])
    assert "already holds a run" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_with_training_flags_is_refused(synthetic_root, tmp_path, capsys):
    err = one_line_error(capsys, ["train", "--resume", str(tmp_path / "last.pt"), "--epochs", "3"])
    assert "--resume" in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--epochs", "zero"], "expected an integer"),
        (["train", "--epochs", "0"], "epochs must be an integer in 1..100000"),
        (["train", "--lr", "-1"], "lr must be > 0"),
        (["train", "--preset", "nope"], "invalid choice"),
        (["data", "--source", "ftp"], "invalid choice"),
    ],
)
def test_bad_flag_values_exit_2_with_one_line(capsys, argv, fragment):
    assert fragment in one_line_error(capsys, argv)


def test_number_outside_0_to_9_or_not_an_integer_is_rejected():
    assert cli._number("7") == 7
    for bad in ("10", "-1", "3.5", "seven"):
        with pytest.raises(Exception, match="number must be"):
            cli._number(bad)


@given(st.text(max_size=8) | st.from_regex(r"\s*[+-]?[0-9٣³_]{1,3}\s*", fullmatch=True))
@settings(max_examples=examples(300), deadline=None)
def test_the_cli_and_the_http_api_accept_the_same_numbers(text):
    # Before, the CLI's int() took '٣' (an Arabic-Indic 3) and '0_3', which the API refuses.
    from digitsum.serve import BadInput, _parse_number

    try:
        expected = _parse_number(text)
    except BadInput:
        expected = None
    try:
        got = cli._number(text)
    except argparse.ArgumentTypeError:
        got = None
    assert got == expected


def test_evaluate_a_missing_checkpoint_exits_2(capsys, tmp_path):
    assert "does not exist" in one_line_error(capsys, ["evaluate", str(tmp_path / "missing.pt")])


def test_evaluate_a_file_that_is_not_a_checkpoint_exits_2(capsys, tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x00" * 100)
    assert "not a readable checkpoint" in one_line_error(capsys, ["evaluate", str(tmp_path / "model.pt")])


def test_data_reports_a_corrupted_file_by_name_and_exits_2(synthetic_root, capsys):
    path = mnist.raw_folder(synthetic_root) / "t10k-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0x04
    path.write_bytes(bytes(raw))
    err = one_line_error(capsys, ["data", "--data-root", str(synthetic_root), "--source", "local"])
    assert "t10k-labels-idx1-ubyte" in err and "MD5" in err


def test_data_root_that_is_not_writable_exits_2(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, ["data", "--data-root", str(tmp_path / "file" / "data")])
    assert "not writable" in err


@pytest.mark.slow  # a fresh interpreter importing torch; test_help_imports_no_torch runs the entry point fast
def test_the_installed_console_script_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "digitsum.cli", "evaluate", str(tmp_path / "none.pt")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "--help"],
        ["serve", "--help"],
        ["predict", "--help"],
        ["evaluate", "--help"],
        ["data", "--help"],
        ["export", "--help"],
    ],
)
def test_help_imports_no_torch(argv):
    """`digitsum ... --help` through the real entry point (cli.main): the help is printed and torch
    was never imported (the train flags come from config.py's dataclasses, which need no torch)."""
    code = (
        "import sys\nfrom digitsum import cli\n"
        f"try:\n    cli.main({argv!r})\nexcept SystemExit as done:\n    assert done.code == 0, done.code\n"
        "print('TORCH', 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: digitsum" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "TORCH False"


def test_help_lists_every_preset_and_every_setting_flag(capsys):
    from digitsum.config import PRESETS

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "{" + ",".join(PRESETS) + "}" in text
    for flag, _, _, _ in cli.config_flags():
        assert flag in text
