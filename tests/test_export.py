"""`digitsum export` (ONNX) and the onnxruntime backend: parity with PyTorch, dynamic batch, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from digitsum import checkpoint, cli, export
from digitsum.checkpoint import load_model
from digitsum.errors import DigitsumError
from digitsum.config import ModelConfig
from digitsum.model import DigitSumNet
from digitsum.onnx_backend import ONNX_INPUTS, ONNX_OUTPUTS, OnnxBackend, OnnxError, load_backend, load_onnx
from digitsum.predict import classify, load_predictor, predict

onnx = pytest.importorskip("onnx", reason="the [onnx] extra (in [dev]) is not installed")


def one_line_error(capsys, argv) -> str:
    """Run the CLI, expect exit code 2 and exactly one line on stderr; return it."""
    with pytest.raises(SystemExit) as exited:
        sys.exit(cli.main(argv))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def other_checkpoint(path: Path, seed: int = 1) -> Path:
    """An untrained checkpoint with different weights from random_checkpoint's."""
    torch.manual_seed(seed)
    model = DigitSumNet(ModelConfig()).eval()
    checkpoint.save(path, {"model_config": ModelConfig().to_dict(), "model": model.state_dict(), "metadata": {}})
    return path


@pytest.fixture(scope="module")
def exported(exported_random):
    """(checkpoint, model.onnx, stdout) of one real `digitsum export` of an untrained model (no MNIST:
    the empty --data-root makes the parity sample synthetic); the session's, see conftest.py."""
    return exported_random


@pytest.fixture(scope="module")
def backend(exported) -> OnnxBackend:
    return load_onnx(exported[1])[0]


# ----------------------------------------------------------------------------- the exported graph


def test_export_writes_a_valid_graph_with_the_documented_interface(exported):
    _, out, stdout = exported
    graph = onnx.load(out)
    onnx.checker.check_model(graph)
    assert max(opset.version for opset in graph.opset_import if opset.domain in ("", "ai.onnx")) >= 18
    assert [i.name for i in graph.graph.input] == list(ONNX_INPUTS)
    assert [o.name for o in graph.graph.output] == list(ONNX_OUTPUTS)
    image_dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert image_dims[0].dim_param and [d.dim_value for d in image_dims[1:]] == [1, 28, 28]  # batch is symbolic
    assert graph.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    for output, width in zip(graph.graph.output, (10, 19, 10, 19)):
        dims = output.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_value == width
    assert "10,000 | 100.000% | 100.000%" in stdout and "| pass |" in stdout and "synthetic" in stdout


def test_the_graph_stores_the_checkpoint_metadata_and_config(exported, backend):
    assert ModelConfig.from_dict(backend.info["model_config"]) == ModelConfig()
    assert backend.info["normalization"] == {"mean": 0.1307, "std": 0.3081}
    assert backend.metadata == {"epoch": 0}


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_dynamic_batch_matches_pytorch(exported, backend, batch):
    model = load_model(exported[0])[0]
    images = export.synthetic_images(batch, seed=batch)
    numbers = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(batch))
    digit_p, sum_p = backend.run(images, numbers)
    with torch.inference_mode():
        digit_logits, sum_logits = model(images, numbers)
    assert digit_p.shape == (batch, 10) and sum_p.shape == (batch, 19)
    assert (digit_p.argmax(1) == digit_logits.argmax(1).numpy()).all()
    assert (sum_p.argmax(1) == sum_logits.argmax(1).numpy()).all()
    np.testing.assert_allclose(digit_p, digit_logits.softmax(1).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(sum_p, sum_logits.softmax(1).numpy(), atol=1e-4, rtol=0)
    ort_digit_logits, ort_sum_logits = backend(images, numbers)  # the logits outputs, like model.forward
    torch.testing.assert_close(ort_digit_logits, digit_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ort_sum_logits, sum_logits, atol=1e-4, rtol=1e-4)


def test_check_parity_on_every_number_passes_for_the_exported_graph(exported, backend):
    model = load_model(exported[0])[0]
    parity = export.check_parity(model, backend, export.synthetic_images(30), "synthetic", chunk_images=8)
    assert parity.ok and parity.pairs == 300 and parity.images == 30
    assert parity.digit_agreement == parity.sum_agreement == 1.0
    assert "| 300 |" in parity.table()


def test_check_parity_fails_for_a_graph_of_other_weights(exported, backend, tmp_path):
    other = load_model(other_checkpoint(tmp_path / "other.pt"))[0]
    parity = export.check_parity(other, backend, export.synthetic_images(20), "synthetic")
    assert not parity.ok and "FAIL" in parity.table()


def test_tied_digit_logits_give_the_first_digit_in_both_runtimes(exported):
    # Zero digit head: all ten logits equal. torch.argmax and ONNX ArgMax both take the first index,
    # so the sum block's one-hot, and hence the sum, must match exactly. The ONNX side is the session's
    # export of the same model with that head zeroed in its initializers (a second export costs seconds).
    model = load_model(exported[0])[0]
    head = model.digit_head[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    graph = onnx.load(exported[1])
    head_names = {f"model.{name}" for name, tensor in model.named_parameters() if tensor is head.weight or tensor is head.bias}
    zeroed = [tensor for tensor in graph.graph.initializer if tensor.name in head_names]
    assert len(zeroed) == 2, [tensor.name for tensor in graph.graph.initializer]
    for tensor in zeroed:
        tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(tensor)), tensor.name))
    runner = OnnxBackend(graph.SerializeToString())
    images = export.synthetic_images(20)
    parity = export.check_parity(model, runner, images, "synthetic")
    assert parity.ok, parity.table()
    digit_p, _ = runner.run(images, torch.zeros(20, dtype=torch.long))
    assert (digit_p.argmax(1) == 0).all() and np.allclose(digit_p, 0.1)


# ----------------------------------------------------------------------------- the backend in the predict API


def test_classify_and_predict_work_unchanged_with_the_onnx_backend(exported, tmp_path):
    from test_predict import drawn_seven

    runner, metadata = load_predictor(exported[1])  # a .onnx path gives the onnxruntime backend
    assert isinstance(runner, OnnxBackend) and metadata == {"epoch": 0}
    torch_model, _ = load_predictor(exported[0])
    images, numbers = export.synthetic_images(9), [0, 1, 2, 3, 4, 5, 6, 7, 9]
    ort_digit, ort_sum = classify(runner, images, numbers)
    torch_digit, torch_sum = classify(torch_model, images, numbers, bf16=False)
    assert isinstance(ort_digit, torch.Tensor) and ort_digit.shape == (9, 10) and ort_sum.shape == (9, 19)
    torch.testing.assert_close(ort_digit, torch_digit, atol=1e-4, rtol=0)
    torch.testing.assert_close(ort_sum, torch_sum, atol=1e-4, rtol=0)
    drawn_seven().save(tmp_path / "seven.png")
    (ort_result,) = predict(runner, [tmp_path / "seven.png"], 3)
    (torch_result,) = predict(torch_model, [tmp_path / "seven.png"], 3)
    assert ort_result["digit"] == torch_result["digit"] and ort_result["sum"] == torch_result["sum"]
    assert abs(ort_result["sum_probability"] - torch_result["sum_probability"]) <= 1e-4


def test_digitsum_predict_accepts_a_onnx_checkpoint(exported, tmp_path, capsys):
    from test_predict import drawn_seven

    drawn_seven().save(tmp_path / "seven.png")
    assert cli.main(["predict", str(tmp_path / "seven.png"), "--number", "3", "--checkpoint", str(exported[1])]) == 0
    assert " + 3 = " in capsys.readouterr().out


def test_the_server_serves_a_onnx_file_through_load_predictor(exported):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from fastapi.testclient import TestClient

    from digitsum.serve import create_app
    from test_predict import drawn_seven, encoded

    answers = []
    for path in (exported[1], exported[0]):  # onnxruntime, then torch
        with TestClient(create_app(path)) as client:
            response = client.post(
                "/api/predict", files={"image": ("seven.png", encoded(drawn_seven()), "image/png")}, data={"number": "5"}
            )
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert answers[0]["digit"] == answers[1]["digit"] and answers[0]["sum"] == answers[1]["sum"]
    np.testing.assert_allclose(answers[0]["sum_probabilities"], answers[1]["sum_probabilities"], atol=1e-4)


def test_backend_refuses_numbers_outside_0_to_9(backend):
    # The graph's one-hot of 10 would be silently all zeros, so the backend checks first.
    with pytest.raises(DigitsumError, match="0..9"):
        backend.run(export.synthetic_images(2), torch.tensor([3, 10]))


def test_load_backend_chooses_the_runtime(exported):
    model_pt, model_onnx, _ = exported
    assert isinstance(load_backend(model_pt, "torch")[0], torch.nn.Module)
    assert isinstance(load_backend(model_onnx, "onnxruntime")[0], OnnxBackend)
    with pytest.raises(DigitsumError, match="unknown backend"):
        load_backend(model_pt, "tensorrt")
    with pytest.raises(DigitsumError, match="torch backend needs a .pt"):
        load_backend(model_onnx, "torch")


@pytest.mark.slow  # a second ONNX export (seconds); the fast subset serves the session's export file
def test_load_backend_exports_a_pt_checkpoint_in_memory_for_onnxruntime(exported):
    runner, metadata = load_backend(exported[0], "onnxruntime")
    assert isinstance(runner, OnnxBackend) and metadata == {"epoch": 0}
    images = export.synthetic_images(5)
    saved = load_onnx(exported[1])[0].run(images, torch.arange(5))
    for mine, theirs in zip(runner.run(images, torch.arange(5)), saved):
        np.testing.assert_allclose(mine, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "does not exist"),
        (b"not a protobuf at all", "not a loadable ONNX model"),
        ("identity", "not a digitsum model"),
    ],
)
def test_loading_a_bad_onnx_file_is_one_clear_error(tmp_path, content, fragment):
    path = tmp_path / "model.onnx"
    if content == "identity":  # a valid ONNX graph that is not ours
        from onnx import TensorProto, helper

        node = helper.make_node("Identity", ["x"], ["y"])
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(OnnxError, match=fragment) as raised:
        load_onnx(path)
    assert "\n" not in str(raised.value)


# ----------------------------------------------------------------------------- CLI errors


def test_export_refuses_an_existing_out_and_keeps_it(exported, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the user's file")
    err = one_line_error(capsys, ["export", str(exported[0]), "--out", str(out)])
    assert "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"the user's file"


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing", "does not exist"),
        ("not a checkpoint", "not a readable checkpoint"),
        ("out is a folder", "is a folder"),
        ("out under a file", "not a writable folder"),
    ],
)
def test_export_errors_are_one_line_and_write_nothing(exported, tmp_path, capsys, case, fragment):
    model_pt, out = exported[0], tmp_path / "model.onnx"
    if case == "missing":
        model_pt = tmp_path / "nope.pt"
    elif case == "not a checkpoint":
        model_pt = tmp_path / "notes.pt"
        model_pt.write_text("hello")
    elif case == "out is a folder":
        out = tmp_path / "folder"
        out.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "model.onnx"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert fragment in one_line_error(capsys, ["export", str(model_pt), "--out", str(out)])
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_export_with_an_unknown_format_is_a_usage_error(exported, tmp_path, capsys):
    err = one_line_error(capsys, ["export", str(exported[0]), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert "invalid choice" in err and not (tmp_path / "m").exists()


def test_export_without_the_onnx_packages_says_how_to_install(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    err = one_line_error(capsys, ["export", str(exported[0]), "--out", str(tmp_path / "m.onnx")])
    assert "onnxscript not installed" in err and "digitsum[onnx]" in err
    assert not (tmp_path / "m.onnx").exists()


def test_an_exporter_failure_is_one_line(exported, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator\nwith a long explanation")

    monkeypatch.setattr(torch.onnx, "export", broken)
    err = one_line_error(capsys, ["export", str(exported[0]), "--out", str(tmp_path / "m.onnx")])
    assert "exporter failed (RuntimeError: unsupported operator)" in err
    assert not (tmp_path / "m.onnx").exists()


def test_a_graph_that_fails_parity_is_not_written_and_the_old_file_stays(exported, tmp_path, capsys, monkeypatch):
    # Swap in the graph of another model: the parity check must catch it before anything is written.
    other_pt = other_checkpoint(tmp_path / "other.pt")
    graph_of_the_first_model = exported[1].read_bytes()
    monkeypatch.setattr(export, "onnx_bytes", lambda model, info=None: graph_of_the_first_model)
    monkeypatch.setattr(export, "SAMPLE_IMAGES", 50)  # any sample shows other weights; the full 1,000 cost seconds
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    err = one_line_error(
        capsys, ["export", str(other_pt), "--out", str(out), "--overwrite", "--data-root", str(tmp_path / "no-data")]
    )
    assert "disagrees with PyTorch" in err and "nothing written" in err
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "other.pt"]  # no temporary file left


# ----------------------------------------------------------------------------- real MNIST


@pytest.mark.slow
def test_full_parity_on_100000_real_pairs_with_a_trained_model(real_root, trained_pt, tmp_path, capsys):
    model_pt = trained_pt
    out = tmp_path / "model.onnx"
    assert cli.main(["export", str(model_pt), "--out", str(out), "--check", "--data-root", str(real_root)]) == 0
    stdout = capsys.readouterr().out
    assert "the MNIST test set: 10,000 images x 10 numbers" in stdout
    assert "| 100,000 | 100.000% | 100.000% |" in stdout and "| pass |" in stdout
    print(stdout, file=sys.stderr)  # the table, for `pytest -s`
