"""The HTTP API in-process (FastAPI TestClient): good input, and every kind of bad input."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from digitsum import __version__, cli  # noqa: E402
from digitsum.checkpoint import CheckpointError  # noqa: E402
from digitsum.serve import MAX_BODY_BYTES, create_app  # noqa: E402
from model_files import random_checkpoint  # noqa: E402


def seven_png(ink: int = 0, paper: int = 255) -> bytes:
    image = Image.new("L", (280, 280), paper)
    ImageDraw.Draw(image).line([(70, 60), (210, 60), (120, 230)], fill=ink, width=22, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def post_form(client, image: bytes | None = seven_png(), number="3", filename="digit.png"):
    files = {"image": (filename, image, "image/png")} if image is not None else None
    data = {"number": number} if number is not None else None
    return client.post("/api/predict", files=files, data=data)


def field_of(response) -> str:
    return response.json()["detail"][0]["loc"][-1]


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def client(request, tmp_path_factory):
    """The API with each backend: every test of this file runs against torch and onnxruntime (the
    session's export of the same random checkpoint: conftest.py's exported_random)."""
    if request.param == "onnxruntime":
        path = request.getfixturevalue("exported_random")[1]
    else:
        path = random_checkpoint(tmp_path_factory.mktemp("serve") / "model.pt")
    with TestClient(create_app(path, backend=request.param)) as client:
        client.model_file = path.name  # what the answers' "model" names: <parent>/<file>@<hash>
        yield client


# ----------------------------------------------------------------------------- good input


def test_health_says_the_model_is_loaded_and_names_it(client):
    body = client.get("/api/health").json()
    assert body["status"] == "ok" and body["model_loaded"] is True
    assert body["model"].startswith(("serve", "exported-random")) and f"{client.model_file}@" in body["model"]
    assert body["version"] == __version__


def test_a_multipart_request_gets_both_heads_probabilities(client):
    response = post_form(client)
    assert response.status_code == 200
    body = response.json()
    assert len(body["digit_probabilities"]) == 10 and len(body["sum_probabilities"]) == 19
    assert abs(sum(body["digit_probabilities"]) - 1) < 1e-3 and abs(sum(body["sum_probabilities"]) - 1) < 1e-3
    assert body["digit"] == int(np.argmax(body["digit_probabilities"]))
    assert body["sum"] == int(np.argmax(body["sum_probabilities"]))
    assert body["number"] == 3 and body["latency_ms"] > 0 and f"{client.model_file}@" in body["model"]


def test_the_response_carries_the_28x28_image_the_model_saw_as_a_png_data_url(client):
    url = post_form(client).json()["image_28x28"]
    assert url.startswith("data:image/png;base64,")
    view = Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))
    assert view.size == (28, 28) and view.mode == "L"


def test_a_json_request_gives_the_same_answer_as_multipart(client):
    by_json = client.post("/api/predict", json={"image_png_base64": base64.b64encode(seven_png()).decode(), "number": 3}).json()
    by_form = post_form(client).json()
    for key in ("digit", "sum", "digit_probabilities", "sum_probabilities", "image_28x28"):
        assert by_json[key] == by_form[key]


def test_a_json_request_may_send_a_data_url(client):
    url = "data:image/png;base64," + base64.b64encode(seven_png()).decode()
    assert client.post("/api/predict", json={"image_png_base64": url, "number": 4}).status_code == 200


def test_the_page_is_served_at_the_root_with_its_script_and_styles(client):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_openapi_documents_the_predict_endpoint(client):
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    content = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}


# ----------------------------------------------------------------------------- bad input: 422 naming the field


@pytest.mark.parametrize("number", ["12", "-1", "three", "", "3.5"])
def test_a_bad_number_is_422_naming_the_number_field(client, number):
    response = post_form(client, number=number)
    assert response.status_code == 422 and field_of(response) == "number"


def test_a_missing_number_is_422_naming_the_number_field(client):
    response = post_form(client, number=None)
    assert response.status_code == 422 and field_of(response) == "number"


def test_a_json_number_out_of_range_is_422(client):
    response = client.post("/api/predict", json={"image_png_base64": base64.b64encode(seven_png()).decode(), "number": 10})
    assert response.status_code == 422 and field_of(response) == "number"


def test_a_missing_image_is_422_naming_the_image_field(client):
    response = client.post("/api/predict", data={"number": "3"}, files={"other": ("x.png", seven_png())})
    assert response.status_code == 422 and field_of(response) == "image"


def test_an_empty_image_file_is_422(client):
    response = post_form(client, image=b"")
    assert response.status_code == 422 and field_of(response) == "image"


def test_a_blank_image_is_422_saying_it_is_blank(client):
    response = post_form(client, image=png(Image.new("RGB", (280, 280), "white")))
    assert response.status_code == 422 and "blank" in response.json()["detail"][0]["msg"]


def test_a_truncated_image_is_422(client):
    data = png(Image.effect_noise((300, 300), 60))
    response = post_form(client, image=data[: len(data) // 2])
    assert response.status_code == 422 and field_of(response) == "image"


def test_an_image_over_8192_pixels_is_422(client):
    response = post_form(client, image=png(Image.new("L", (9000, 10), 255)))
    assert response.status_code == 422 and "8192x8192" in response.json()["detail"][0]["msg"]


def test_invalid_base64_is_422_naming_the_field(client):
    response = client.post("/api/predict", json={"image_png_base64": "not base64 !!", "number": 1})
    assert response.status_code == 422 and field_of(response) == "image_png_base64"


def test_a_json_body_that_is_not_json_is_422(client):
    response = client.post("/api/predict", content=b"{oops", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_a_malformed_multipart_body_is_422_not_500(client):
    response = client.post("/api/predict", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert response.status_code == 422


# ----------------------------------------------------------------------------- bad input: 413 and 415


def test_a_body_over_2_mb_is_413(client):
    response = post_form(client, image=b"\x89PNG" + bytes(MAX_BODY_BYTES))
    assert response.status_code == 413


def test_a_streamed_body_over_the_limit_without_a_length_is_413(client):
    def chunks():
        for _ in range(MAX_BODY_BYTES // (64 * 1024) + 8):
            yield bytes(64 * 1024)

    response = client.post("/api/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_an_upload_that_is_not_an_image_is_415(client):
    response = post_form(client, image=b"%PDF-1.4 this is a document, not a picture")
    assert response.status_code == 415 and field_of(response) == "image"


def test_a_request_that_is_neither_multipart_nor_json_is_415(client):
    response = client.post("/api/predict", content=b"7", headers={"content-type": "text/plain"})
    assert response.status_code == 415


def test_the_server_keeps_serving_after_bad_requests(client):
    post_form(client, image=b"junk")
    post_form(client, number="99")
    post_form(client, image=b"\x00" * (MAX_BODY_BYTES + 1))
    assert post_form(client).status_code == 200


# ----------------------------------------------------------------------------- startup


def test_a_missing_checkpoint_fails_to_start_with_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        create_app(tmp_path / "none.pt")


def test_serve_exits_2_for_a_missing_checkpoint(tmp_path, capsys):
    assert cli.main(["serve", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_a_trained_model_reads_a_drawn_seven_and_adds_the_number(trained_pt):
    with TestClient(create_app(trained_pt)) as trained:
        body = post_form(trained, image=seven_png(), number="6").json()
    assert (body["digit"], body["sum"]) == (7, 13)


def test_files_that_used_to_crash_the_server_are_predicted_or_refused_with_a_4xx(client):
    from PIL import Image as PILImage

    seven = PILImage.open(io.BytesIO(seven_png())).convert("L")
    lab = PILImage.merge("LAB", [seven, PILImage.new("L", seven.size, 128), PILImage.new("L", seven.size, 128)])
    values = np.asarray(seven, np.float32)
    values[:4] = np.nan
    values[-4:] = np.inf
    blank = np.full((60, 60), np.nan, np.float32)
    cases = {"lab.tif": (lab, 200), "nan.tif": (PILImage.fromarray(values), 200), "all-nan.tif": (PILImage.fromarray(blank), 422)}
    for name, (image, status) in cases.items():
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF")
        response = post_form(client, buffer.getvalue(), filename=name)
        assert response.status_code == status, (name, response.text)
        if status == 200:
            assert 0 <= response.json()["digit"] <= 9 and response.json()["number"] == 3


def test_a_heic_photo_from_a_phone_is_predicted(client):
    buffer = io.BytesIO()
    Image.open(io.BytesIO(seven_png())).convert("RGB").save(buffer, "HEIF", quality=80)
    response = post_form(client, buffer.getvalue(), filename="IMG_0001.HEIC")
    assert response.status_code == 200, response.text
    assert 0 <= response.json()["digit"] <= 9 and response.json()["number"] == 3


def test_files_found_by_fuzzing_are_refused_with_a_4xx_and_the_server_keeps_answering(client):
    # A palette PNG over 1024 px with a chunk among its IDATs killed the process (libpng's error in
    # torchvision's decoder); an ICO decoded its embedded image while opening; a JPEG of thousands
    # of empty scans took seconds, on the event loop where it was small.
    from test_preprocess import _progressive_jpeg, _split_palette_png

    icon = io.BytesIO()
    Image.open(io.BytesIO(seven_png())).save(icon, "ICO")
    cases = {
        "split.png": (_split_palette_png(), 422),
        "seven.ico": (icon.getvalue(), 415),
        "scans.jpg": (_progressive_jpeg(5000), 422),
    }
    for name, (data, status) in cases.items():
        response = post_form(client, data, filename=name)
        assert response.status_code == status and field_of(response) == "image", (name, response.text)
        assert client.get("/api/health").status_code == 200
    assert post_form(client).status_code == 200


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_both_backends_serve_the_same_api_with_the_same_answers(exported_random, backend):
    # The session's model.pt and its export (a .pt served by onnxruntime is exported in memory by the
    # same load_backend: test_export.py::test_load_backend_exports_a_pt_checkpoint_in_memory_for_onnxruntime, slow).
    model_pt, model_onnx, _ = exported_random
    with (
        TestClient(create_app(model_onnx if backend == "onnxruntime" else model_pt, backend=backend)) as backend_client,
        TestClient(create_app(model_pt, backend="torch")) as torch_client,
    ):
        assert backend_client.get("/api/health").json()["backend"] == backend
        ours, reference = post_form(backend_client), post_form(torch_client)
        assert ours.status_code == reference.status_code == 200
        assert ours.json()["digit"] == reference.json()["digit"] and ours.json()["sum"] == reference.json()["sum"]
        assert np.allclose(ours.json()["digit_probabilities"], reference.json()["digit_probabilities"], atol=1e-3)
        bad = post_form(backend_client, number="12")
        assert bad.status_code == 422 and field_of(bad) == "number"


def test_an_unknown_backend_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--backend", "tensorrt"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
