"""Serving past one process: `digitsum serve --workers N`, /metrics (Prometheus text format, added up
over workers) and POST /api/predict_batch.

In-process tests use FastAPI's TestClient; the worker tests start a real `digitsum serve --workers 2`
(one server for the module: each worker imports torch, which takes 10-30 s on a busy 2-core machine).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("prometheus_client", reason="the [serve] extra is not installed")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from budget import examples  # noqa: E402  (fewer examples in the fast subset)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from digitsum import cli, serve  # noqa: E402
from digitsum.errors import DigitsumError  # noqa: E402
from digitsum.predict import load_predictor, predict  # noqa: E402
from model_files import random_checkpoint  # noqa: E402

# Under pytest-xdist the multi-process server tests go to one worker: one `workers` server, and no
# two of these servers (each worker process importing torch) starting at once.
WORKERS_WORKER = pytest.mark.xdist_group("serve-workers")


def seven_png(size: int = 280) -> bytes:
    image = Image.new("L", (size, size), "white")
    scale = size / 280
    ImageDraw.Draw(image).line(
        [(70 * scale, 60 * scale), (210 * scale, 60 * scale), (120 * scale, 230 * scale)],
        fill="black",
        width=max(1, round(22 * scale)),
        joint="curve",
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def one_png(size: int = 200) -> bytes:
    image = Image.new("L", (size, size), "white")
    ImageDraw.Draw(image).line([(size // 2, size // 8), (size // 2, size * 7 // 8)], fill="black", width=size // 10)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def blank_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100), "white").save(buffer, format="PNG")
    return buffer.getvalue()


SEVEN, ONE = seven_png(), one_png()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def field_of(response) -> str:
    return response.json()["detail"][0]["loc"][-1]


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of a Prometheus text exposition (parsed, so a
    malformed exposition fails the test)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("scale") / "model.pt")


@pytest.fixture()
def client(checkpoint):
    """A fresh app per test: its metrics start at zero."""
    with TestClient(serve.create_app(checkpoint)) as client:
        yield client


# ----------------------------------------------------------------------------- /metrics in one process


def test_metrics_is_prometheus_text_counting_requests_by_route_and_status(client):
    for _ in range(3):
        assert client.get("/api/health").status_code == 200
    assert client.post("/api/predict", files={"image": ("d.png", SEVEN, "image/png")}, data={"number": "2"}).status_code == 200
    assert client.post("/api/predict", files={"image": ("d.png", SEVEN, "image/png")}, data={"number": "12"}).status_code == 422
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert value(text, "digitsum_http_requests_total", route="/api/health", method="GET", status="200") == 3
    assert value(text, "digitsum_http_requests_total", route="/api/predict", method="POST", status="200") == 1
    assert value(text, "digitsum_http_requests_total", route="/api/predict", method="POST", status="422") == 1
    # Latency histogram by route: one observation per request, cumulative buckets ending at +Inf.
    assert value(text, "digitsum_http_request_duration_seconds_count", route="/api/predict") == 2
    assert value(text, "digitsum_http_request_duration_seconds_bucket", route="/api/predict", le="+Inf") == 2
    assert value(text, "digitsum_http_request_duration_seconds_sum", route="/api/predict") > 0


def test_a_response_is_counted_before_its_last_byte_is_sent_and_a_vanished_client_as_499():
    """The count must be in /metrics by the time a client holds its answer: a worker killed right
    after answering (test_a_dead_worker_...) once lost the count, written after the send."""
    import asyncio

    metrics = serve.Metrics("m")
    counted_at_send: list[float] = []

    def count(status: str) -> float:
        text = metrics.exposition().decode()
        return value(text, "digitsum_http_requests_total", route="/api/health", method="GET", status=status)

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})

    async def send(message):
        counted_at_send.append(count("200"))

    async def went_away(scope, receive, send):
        raise asyncio.CancelledError

    scope = {"type": "http", "path": "/api/health", "method": "GET"}
    asyncio.run(serve.RequestMetrics(app, metrics)(scope, None, send))
    assert counted_at_send == [0, 0, 1] and count("200") == 1  # counted once, before the last body part
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(serve.RequestMetrics(went_away, metrics)(scope, None, send))
    assert count("499") == 1 and count("200") == 1


def test_metrics_count_images_by_outcome_and_name_the_model(client):
    client.post("/api/predict", files={"image": ("d.png", SEVEN, "image/png")}, data={"number": "1"})
    client.post("/api/predict", files={"image": ("d.png", b"%PDF not an image", "image/png")}, data={"number": "1"})
    client.post("/api/predict", files={"image": ("d.png", blank_png(), "image/png")}, data={"number": "1"})
    text = client.get("/metrics").text
    assert value(text, "digitsum_images_preprocessed_total", outcome="ok") == 1
    assert value(text, "digitsum_images_preprocessed_total", outcome="error") == 2
    model = client.get("/api/health").json()["model"]
    assert value(text, "digitsum_model_info", model=model, version=serve.__version__) == 1
    assert value(text, "digitsum_preprocessing_in_flight") == 0
    assert value(text, "digitsum_worker_processes") == 1


def test_route_labels_are_bounded_and_body_limit_rejections_are_counted(client):
    client.get("/nowhere/1")
    client.get("/nowhere/2")
    client.get("/static/app.js")
    assert (
        client.post(
            "/api/predict", content=bytes(serve.MAX_BODY_BYTES + 1), headers={"content-type": "application/json"}
        ).status_code
        == 413
    )
    text = client.get("/metrics").text
    routes = {dict(labels).get("route") for name, labels in samples(text) if name == "digitsum_http_requests_total"}
    assert routes == {"other", "/static", "/api/predict"}  # not one series per made-up path
    assert value(text, "digitsum_http_requests_total", route="other", method="GET", status="404") == 2
    assert value(text, "digitsum_http_requests_total", route="/api/predict", method="POST", status="413") == 1


def test_in_flight_preprocessing_shows_a_large_image_being_decoded(checkpoint, monkeypatch):
    # The large image's preprocessing is held open until the gauge has been seen at 1: a 4096x4096
    # page now decodes in ~30 ms, too short to catch reliably by polling.
    release = threading.Event()
    real_preprocess = serve.preprocess

    def held_preprocess(data):
        release.wait(30)
        return real_preprocess(data)

    monkeypatch.setattr(serve, "preprocess", held_preprocess)
    big = seven_png(4096)
    with TestClient(serve.create_app(checkpoint)) as client:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            upload = pool.submit(
                client.post, "/api/predict", files={"image": ("big.png", big, "image/png")}, data={"number": "1"}
            )
            seen = []
            deadline = time.monotonic() + 30
            while not upload.done() and time.monotonic() < deadline:
                seen.append(value(client.get("/metrics").text, "digitsum_preprocessing_in_flight"))
                if seen[-1] == 1:
                    break
                time.sleep(0.02)
            release.set()
            assert upload.result().status_code == 200
        assert 1 in seen, seen
        assert value(client.get("/metrics").text, "digitsum_preprocessing_in_flight") == 0


# ----------------------------------------------------------------------------- the batch route


def batch_form(client, images: list[tuple[str, bytes]], **data):
    return client.post(
        "/api/predict_batch", files=[("image", (name, content, "image/png")) for name, content in images], data=data
    )


def test_a_batch_gives_predict_json_results_for_good_items_and_errors_for_bad_ones(client, checkpoint):
    response = batch_form(
        client,
        [("a.png", SEVEN), ("junk.png", b"%PDF-1.4 no picture"), ("blank.png", blank_png()), ("b.png", ONE)],
        numbers="3,4,5,6",
    )
    assert response.status_code == 200
    results = response.json()["results"]
    assert [result["image"] for result in results] == ["a.png", "junk.png", "blank.png", "b.png"]
    assert set(results[1]) == {"image", "error"} and results[1]["error"].startswith("junk.png: ")
    assert set(results[2]) == {"image", "error"} and "blank" in results[2]["error"]
    # The good items are exactly what `digitsum predict --json` gives for the same images and numbers.
    model, _ = load_predictor(checkpoint)
    expected = predict(model, [SEVEN, ONE], [3, 6])
    for got, want in zip([results[0], results[3]], expected):
        assert {key: got[key] for key in want if key != "image"} == {key: want[key] for key in want if key != "image"}
    assert response.json()["model"] == client.get("/api/health").json()["model"]
    text = client.get("/metrics").text
    assert value(text, "digitsum_images_preprocessed_total", outcome="ok") == 2
    assert value(text, "digitsum_images_preprocessed_total", outcome="error") == 2


def test_a_json_batch_reports_each_bad_item_by_index(client):
    items = [
        {"image_png_base64": b64(SEVEN), "number": 1},
        {"image_png_base64": "not base64 !!", "number": 1},
        {"image_png_base64": b64(SEVEN), "number": 10},
        7,
        {"number": 2},
        {"image_png_base64": "data:image/png;base64," + b64(ONE), "number": 0},
    ]
    response = client.post("/api/predict_batch", json={"items": items})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [result["image"] for result in results] == [f"items[{i}]" for i in range(6)]
    assert [("error" in result) for result in results] == [False, True, True, True, True, False]
    assert "base64" in results[1]["error"] and "number" in results[2]["error"]
    assert results[0]["number"] == 1 and results[5]["number"] == 0 and len(results[0]["top3"]["sum"]) == 3


def test_one_number_applies_to_every_image_and_repeated_number_fields_go_one_per_image(client):
    same = batch_form(client, [("a.png", SEVEN), ("b.png", ONE)], numbers="4").json()["results"]
    assert [result["number"] for result in same] == [4, 4]
    each = batch_form(client, [("a.png", SEVEN), ("b.png", ONE)], number=["2", "9"]).json()["results"]
    assert [result["number"] for result in each] == [2, 9]


@pytest.mark.parametrize(
    "data,field", [({"numbers": "1,2,3"}, "numbers"), ({}, "number"), ({"numbers": "1,2", "number": "3"}, "numbers")]
)
def test_numbers_that_do_not_fit_the_images_fail_the_whole_request_with_422(client, data, field):
    response = batch_form(client, [("a.png", SEVEN), ("b.png", ONE)], **data)
    assert response.status_code == 422 and field_of(response) == field


@pytest.mark.parametrize(
    "body,field",
    [({"items": []}, "items"), ({"items": "x"}, "items"), ([1, 2], "items"), ({"image_png_base64": "x", "number": 1}, "items")],
)
def test_a_json_batch_without_a_list_of_items_is_422(client, body, field):
    response = client.post("/api/predict_batch", json=body)
    assert response.status_code == 422 and field_of(response) == field


def test_a_form_without_images_is_422(client):
    response = client.post("/api/predict_batch", data={"numbers": "1"}, files={"other": ("x.png", SEVEN)})
    assert response.status_code == 422 and field_of(response) == "image"


def test_more_than_64_items_is_413_for_json_and_multipart(client):
    tiny = b64(ONE)
    response = client.post(
        "/api/predict_batch", json={"items": [{"image_png_base64": tiny, "number": 1}] * (serve.MAX_BATCH_ITEMS + 1)}
    )
    assert response.status_code == 413 and field_of(response) == "items"
    response = batch_form(client, [("a.png", ONE)] * (serve.MAX_BATCH_ITEMS + 1), numbers="1")
    assert response.status_code == 413 and field_of(response) == "image"
    full = batch_form(client, [("a.png", ONE)] * serve.MAX_BATCH_ITEMS, numbers="1")
    assert full.status_code == 200 and len(full.json()["results"]) == serve.MAX_BATCH_ITEMS


def padded_png(size: int, seed: int) -> bytes:
    """SEVEN with `size` random bytes in a private ancillary chunk (decoders skip it): a large upload
    that is cheap to preprocess, unlike a large photo, which costs seconds per item on a busy CPU."""
    payload = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    chunk = len(payload).to_bytes(4, "big") + b"tsTp" + payload + zlib.crc32(b"tsTp" + payload).to_bytes(4, "big")
    end = SEVEN.rindex(b"IEND") - 4  # before the IEND chunk's length field
    return SEVEN[:end] + chunk + SEVEN[end:]


def test_the_batch_route_takes_larger_bodies_than_the_single_route(client, checkpoint):
    images = [(f"n{i}.png", padded_png(serve.MAX_BODY_BYTES // 3 + 1000, i)) for i in range(3)]  # over the single cap together
    assert serve.MAX_BODY_BYTES < sum(len(content) for _, content in images) < serve.MAX_BATCH_BODY_BYTES
    response = batch_form(client, images, numbers="1")
    assert response.status_code == 200
    # each item read whole: what `digitsum predict --json` gives for the seven itself
    (want,) = predict(load_predictor(checkpoint)[0], [SEVEN], [1])
    assert [got["image"] for got in response.json()["results"]] == ["n0.png", "n1.png", "n2.png"]
    for got in response.json()["results"]:
        assert {key: got[key] for key in want if key != "image"} == {key: want[key] for key in want if key != "image"}
    assert (
        client.post(
            "/api/predict", files={"image": ("n.png", b"".join(c for _, c in images), "image/png")}, data={"number": "1"}
        ).status_code
        == 413
    )
    response = client.post(
        "/api/predict_batch", content=bytes(serve.MAX_BATCH_BODY_BYTES + 1), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "32 MB" in response.json()["detail"][0]["msg"]


def test_a_batch_that_finds_no_preprocessing_slot_in_time_is_503_as_a_whole(checkpoint, monkeypatch):
    from test_serve_faults import slow_down_preprocessing_of

    lanes = serve.PreprocessLanes(large_slots=1, wait_s=0.01)
    big = seven_png(4096)
    slow_down_preprocessing_of(big, monkeypatch)
    with TestClient(serve.create_app(checkpoint, lanes=lanes)) as client:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hog = pool.submit(client.post, "/api/predict", files={"image": ("big.png", big, "image/png")}, data={"number": "1"})
            time.sleep(0.3)  # the big single upload holds the one large slot
            response = batch_form(client, [("a.png", big), ("b.png", big)], numbers="1")
            assert hog.result().status_code == 200
    assert response.status_code == 503 and response.headers["retry-after"] and field_of(response) == "image"


def test_openapi_documents_the_batch_route_and_metrics(client):
    paths = client.get("/openapi.json").json()["paths"]
    content = paths["/api/predict_batch"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert content["application/json"]["schema"]["properties"]["items"]["maxItems"] == serve.MAX_BATCH_ITEMS
    assert "/metrics" in paths


# ----------------------------------------------------------------------------- batch fuzz: no 5xx

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
image_bytes = st.one_of(
    st.binary(max_size=300),
    st.just(ONE),
    st.just(SEVEN[: len(SEVEN) // 2]),
    st.binary(max_size=30).map(lambda tail: ONE[:60] + tail),
)
number_texts = st.one_of(st.text(max_size=6), st.integers(-3, 12).map(str), st.just("³"))


@st.composite
def batch_requests(draw):
    """kwargs for client.post of a random multipart or JSON batch (a few items, some broken)."""
    if draw(st.booleans()):
        files = [
            (
                draw(st.sampled_from(["image", "image", "number", "x"])),
                (draw(st.sampled_from(["a.png", "", "ü.png"])), draw(image_bytes), "image/png"),
            )
            for _ in range(draw(st.integers(0, 4)))
        ]
        data = draw(
            st.dictionaries(
                st.sampled_from(["number", "numbers", "image"]),
                st.one_of(number_texts, st.lists(number_texts, max_size=4).map(",".join)),
                max_size=3,
            )
        )
        return {"files": files or None, "data": data}
    items = draw(
        st.lists(
            st.one_of(
                json_values,
                st.fixed_dictionaries(
                    {
                        "image_png_base64": st.one_of(image_bytes.map(b64), st.text(max_size=8)),
                        "number": st.one_of(st.integers(-2, 11), json_values),
                    }
                ),
            ),
            max_size=4,
        )
    )
    body = {"items": items} if draw(st.booleans()) else draw(json_values)
    return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}


@settings(
    max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(request=batch_requests())
def test_fuzz_the_batch_route_never_answers_5xx(client, request):
    response = client.post("/api/predict_batch", **request)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code == 200:
        for result in response.json()["results"]:
            assert ("error" in result) != ("digit" in result) and result["image"]
    else:
        detail = response.json()["detail"]
        assert detail[0]["loc"][0] == "body" and detail[0]["msg"]


# ----------------------------------------------------------------------------- --workers: validation


@pytest.mark.parametrize("workers", ["0", "-1", "65", "two", "1.5", ""])
def test_a_bad_workers_value_is_a_one_line_usage_error(workers, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--workers", workers])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "workers must be an integer in 1..64" in error


@pytest.mark.parametrize("workers", [0, 65, True, 2.0])
def test_run_refuses_bad_workers_before_binding(workers):
    with pytest.raises(DigitsumError, match="workers must be an integer in 1..64"):
        serve.run("no-such.pt", port=0, workers=workers)


def metrics_dirs() -> set[str]:
    return {str(path) for path in Path(os.environ.get("TMPDIR", "/tmp")).glob("digitsum-metrics-*")}


def test_workers_with_a_missing_checkpoint_exit_2_in_one_line_and_leave_nothing(tmp_path, capsys):
    before = metrics_dirs()
    assert cli.main(["serve", "--workers", "2", "--port", "0", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "does not exist" in error
    assert metrics_dirs() == before and serve.CHECKPOINT_ENV not in os.environ


def test_workers_on_a_port_in_use_is_a_one_line_error(checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--workers", "2", "--port", str(port), "--checkpoint", str(checkpoint)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "in use" in error


@pytest.mark.slow  # a real multi-process uvicorn server (each worker imports torch)
@WORKERS_WORKER
def test_a_worker_that_cannot_load_the_model_stops_the_server_with_one_line_errors(checkpoint, tmp_path):
    """The parent checked the checkpoint; it is gone before the workers (still importing torch) load it.
    They must not be restarted forever: each says why in one line and the parent exits 2."""
    doomed = tmp_path / "doomed.pt"
    doomed.write_bytes(checkpoint.read_bytes())
    process = serve_process(doomed)
    try:
        assert "serving" in process.stdout.readline()
        doomed.unlink()
        _, errors = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 2
    worker_errors = [line for line in errors.splitlines() if line.startswith("digitsum serve: error: worker ")]
    assert worker_errors and all("does not exist" in line for line in worker_errors)
    assert "Traceback" not in errors
    assert errors.strip().splitlines()[-1].startswith("digitsum serve: error: a worker process failed to start")


def serve_process(checkpoint: Path, workers: int = 2) -> subprocess.Popen:
    """`digitsum serve --workers N --port 0` started in its own process group, output piped as text."""
    command = [sys.executable, "-m", "digitsum.cli", "serve", "--workers", str(workers), "--port", "0"]
    return subprocess.Popen(
        [*command, "--checkpoint", str(checkpoint), "--no-access-log"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
        start_new_session=True,
    )


def worker_env() -> dict:
    """This process's environment with the digitsum under test first on PYTHONPATH."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(serve.__file__).parents[1]), os.environ.get("PYTHONPATH")])),
    }


def test_a_worker_says_it_loaded_the_model_in_one_write_to_its_shared_stdout(checkpoint, monkeypatch):
    # N workers share the parent's stdout; with PYTHONUNBUFFERED, print's two writes (the line, then
    # its newline) once let another worker's line land in between, and the server tests, counting
    # "loaded" lines, waited out their deadline
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    monkeypatch.setenv(serve.CHECKPOINT_ENV, str(checkpoint))
    monkeypatch.setattr(sys, "stdout", Recorder())
    # (the worker's process-wide settings are not this test's business: kept off the test process)
    monkeypatch.setattr(serve, "reuse_freed_memory", lambda: None)
    monkeypatch.setattr(serve.torch, "set_num_threads", lambda count: None)
    serve.app_from_env()
    assert len(writes) == 1 and writes[0].startswith(f"digitsum worker {os.getpid()}: loaded ")
    assert writes[0].endswith("\n") and writes[0].count("\n") == 1


# ----------------------------------------------------------------------------- --workers 2: a real server


class WorkerServer:
    """`digitsum serve --workers 2 --port 0` in its own process group; stdout collected line by line."""

    def __init__(self, checkpoint: Path, workers: int = 2):
        self.process = serve_process(checkpoint, workers)
        self.lines: list[str] = []
        self.errors: list[str] = []
        threading.Thread(target=self._collect, args=(self.process.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._collect, args=(self.process.stderr, self.errors), daemon=True).start()
        self.url = None
        deadline = time.monotonic() + 180  # two workers importing torch on a shared 2-core machine
        while len(self.loaded_pids()) < workers or self.url is None:
            assert self.process.poll() is None, "".join(self.errors)[-2000:]
            assert time.monotonic() < deadline, "workers did not start: " + "".join(self.lines + self.errors)[-2000:]
            if self.url is None and self.lines:
                port = int(self.lines[0].split("http://127.0.0.1:")[1].split("/")[0])
                self.url = f"http://127.0.0.1:{port}"
            time.sleep(0.1)
        while True:  # loaded is printed just before uvicorn starts serving
            try:
                if httpx.get(self.url + "/api/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)

    @staticmethod
    def _collect(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def loaded_pids(self) -> list[int]:
        """The pid of every "digitsum worker PID: loaded MODEL" line so far (one per model load)."""
        return [int(line.split()[2].rstrip(":")) for line in self.lines if line.startswith("digitsum worker ")]

    def health_pid(self) -> int:
        # A fresh connection per request: the kernel hands each to whichever worker accepts first.
        response = httpx.get(self.url + "/api/health", headers={"connection": "close"}, timeout=30)
        assert response.status_code == 200
        return response.json()["pid"]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def workers(checkpoint):
    server = WorkerServer(checkpoint)
    try:
        yield server
    finally:
        server.stop()


def serve_until_both_workers_answered(server: WorkerServer, at_least: int = 20) -> Counter:
    pids: Counter = Counter()
    while len(pids) < 2 or sum(pids.values()) < at_least:
        pids[server.health_pid()] += 1
        assert sum(pids.values()) < 400, f"one worker never answered: {pids}"
    return pids


@pytest.mark.slow  # a real multi-process uvicorn server (each worker imports torch)
@WORKERS_WORKER
def test_two_workers_start_answer_and_each_loads_the_model_once(workers):
    loaded = workers.loaded_pids()
    assert len(loaded) == 2 and len(set(loaded)) == 2
    pids = serve_until_both_workers_answered(workers)
    assert set(pids) == set(loaded)  # the answering processes are the two that loaded the model
    response = httpx.post(
        workers.url + "/api/predict", files={"image": ("d.png", SEVEN, "image/png")}, data={"number": "3"}, timeout=30
    )
    assert response.status_code == 200 and response.json()["number"] == 3
    assert workers.loaded_pids() == loaded  # requests do not load the model again


@pytest.mark.slow  # a real multi-process uvicorn server (each worker imports torch)
@WORKERS_WORKER
def test_metrics_add_up_the_requests_both_workers_served(workers):
    def health_count() -> float:
        text = httpx.get(workers.url + "/metrics", timeout=30).text
        return value(text, "digitsum_http_requests_total", route="/api/health", method="GET", status="200")

    before = health_count()
    pids = serve_until_both_workers_answered(workers)
    text = httpx.get(workers.url + "/metrics", timeout=30).text
    counted = value(text, "digitsum_http_requests_total", route="/api/health", method="GET", status="200")
    assert counted - before == sum(pids.values())  # every request, whichever worker served it
    assert counted - before > max(pids.values())  # more than any one worker saw
    assert value(text, "digitsum_worker_processes") == 2
    assert len([name for name, _ in samples(text) if name == "digitsum_model_info"]) == 1  # one series, not per pid


@pytest.mark.slow  # a real multi-process uvicorn server (each worker imports torch)
@WORKERS_WORKER
def test_the_batch_route_and_head_deadline_work_under_workers(workers):
    response = httpx.post(
        workers.url + "/api/predict_batch",
        json={"items": [{"image_png_base64": b64(SEVEN), "number": 1}, {"image_png_base64": b64(b"junk"), "number": 2}]},
        timeout=30,
    )
    assert response.status_code == 200
    assert ["error" in result for result in response.json()["results"]] == [False, True]
    # The head-deadline protocol travels to the workers: a connection that sends nothing is closed.
    host, port = workers.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=serve.READ_TIMEOUT_S + 10) as connection:
        start = time.monotonic()
        assert connection.recv(1) == b""
        assert time.monotonic() - start < serve.READ_TIMEOUT_S + 5


@pytest.mark.slow  # a real multi-process uvicorn server (each worker imports torch)
@WORKERS_WORKER
def test_a_dead_worker_is_replaced_and_marked_dead_in_the_metrics(workers):
    """Last in the module: it kills a worker. Its counts stay in the totals; its live gauges go."""
    metrics_dir = dict(
        line.split("=", 1) for line in Path(f"/proc/{workers.loaded_pids()[0]}/environ").read_text().split("\0") if "=" in line
    )[serve.MULTIPROC_ENV]
    before = value(
        httpx.get(workers.url + "/metrics", timeout=30).text,
        "digitsum_http_requests_total",
        route="/api/health",
        method="GET",
        status="200",
    )
    victim = workers.health_pid()
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while len(workers.loaded_pids()) < 3:  # the supervisor starts a replacement, which loads the model
        assert time.monotonic() < deadline, "no replacement worker"
        time.sleep(0.2)
    while list(Path(metrics_dir).glob(f"gauge_live*_{victim}.db")):  # marked dead on the supervisor's next round
        assert time.monotonic() < deadline, "the dead worker's live gauges stayed"  # (every 0.5 s; slower when loaded)
        time.sleep(0.2)
    text = httpx.get(workers.url + "/metrics", timeout=30).text
    assert value(text, "digitsum_worker_processes") == 2  # not 3: the dead worker's gauge was dropped
    assert value(text, "digitsum_http_requests_total", route="/api/health", method="GET", status="200") >= before + 1
    workers.stop()
    assert not Path(metrics_dir).exists()  # the parent removes the metrics folder at exit
