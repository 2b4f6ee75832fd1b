"""`digitsum serve`: an HTTP API around predict.py and the drawing page in web/.

    POST /api/predict   multipart (image file + number) or JSON {"image_png_base64", "number"}
    GET  /api/health    model loaded, model id, version
    GET  /              the drawing page (plain HTML/CSS/JS from web/, no build step)
    GET  /docs          OpenAPI

Bad input is the client's fault and never a 500: 422 names the field (bad number, missing,
truncated, oversized or blank image), 413 for bodies over 2 MB, 415 for content that is not an
image (or a request that is neither multipart nor JSON).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from digitsum import __version__
from digitsum.data import NUM_NUMBERS
from digitsum.errors import DigitsumError
from digitsum.predict import ImageError, NotAnImageError, classify, load_predictor, preprocess

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
except ImportError:  # the [serve] extra is optional; cli.py reports this as a one-line error
    FastAPI = None

MAX_BODY_BYTES = 2 * 1024 * 1024
WEB_DIR = Path(__file__).parent / "web"

_REQUEST_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image", "number"],
                "properties": {"image": {"type": "string", "format": "binary",
                                         "description": "PNG, JPEG, BMP, GIF, WebP or TIFF; at most 4096x4096"},
                               "number": {"type": "integer", "minimum": 0, "maximum": 9}}}},
            "application/json": {"schema": {
                "type": "object", "required": ["image_png_base64", "number"],
                "properties": {"image_png_base64": {"type": "string",
                                                    "description": "base64 image bytes (a data: URL prefix is allowed)"},
                               "number": {"type": "integer", "minimum": 0, "maximum": 9}}}},
        },
    },
    "responses": {"413": {"description": "body over 2 MB"}, "415": {"description": "not an image"},
                  "422": {"description": "bad number or image; the body names the field"}},
}


class BadInput(Exception):
    """A request the client must fix: HTTP status, the field at fault and why."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


def _error(status: int, field: str, message: str) -> "JSONResponse":
    # The same shape as FastAPI's own validation errors, so clients handle one format.
    return JSONResponse({"detail": [{"loc": ["body", field], "msg": message}]}, status_code=status)


class BodyLimit:
    """ASGI middleware: 413 for request bodies over `limit` bytes, declared or streamed."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._too_large(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        response = _error(413, "image", f"request body is larger than {self.limit // (1024 * 1024)} MB")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def model_id(path: Path) -> str:
    """A short, stable name for a checkpoint: its run folder, file name and content hash."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{path.resolve().parent.name}/{path.name}@{digest}"


def png_data_url(view: np.ndarray) -> str:
    """The 28x28 uint8 view as a data: URL the page can show directly."""
    buffer = io.BytesIO()
    Image.fromarray(view).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _parse_number(value) -> int:
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise BadInput(422, "number", f"number must be an integer 0..{NUM_NUMBERS - 1}, got {value!r}")
    if not 0 <= value < NUM_NUMBERS:
        raise BadInput(422, "number", f"number must be in 0..{NUM_NUMBERS - 1}, got {value}")
    return value


async def _read_request(request: "Request") -> tuple[bytes, int]:
    """(image bytes, number) from a multipart or JSON request; BadInput otherwise."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await request.form()
        except _TooLarge:
            raise
        except Exception as error:  # malformed multipart: the client's fault, not ours
            raise BadInput(422, "image", f"malformed multipart body ({type(error).__name__})") from None
        upload = form.get("image")
        if upload is None:
            raise BadInput(422, "image", "the form has no 'image' file field")
        if isinstance(upload, str):
            raise BadInput(422, "image", "'image' must be a file upload, not a text field")
        data = await upload.read()
        number = _parse_number(form.get("number"))
    elif content_type == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise BadInput(422, "body", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadInput(422, "body", "the JSON body must be an object with image_png_base64 and number")
        encoded = body.get("image_png_base64")
        if not isinstance(encoded, str):
            raise BadInput(422, "image_png_base64", "image_png_base64 must be a base64 string")
        if encoded.startswith("data:"):
            encoded = encoded.partition(",")[2]
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadInput(422, "image_png_base64", "image_png_base64 is not valid base64") from None
        number = _parse_number(body.get("number"))
    else:
        raise BadInput(415, "body", f"send multipart/form-data or application/json, not {content_type or 'nothing'}")
    return data, number


def create_app(checkpoint_path: str | os.PathLike) -> "FastAPI":
    """The FastAPI app serving one checkpoint (loaded once, here; CheckpointError if unusable)."""
    if FastAPI is None:
        raise DigitsumError("serving needs FastAPI and uvicorn: pip install 'digitsum[serve]'")
    path = Path(checkpoint_path)
    model, metadata = load_predictor(path)
    identity = model_id(path)

    app = FastAPI(title="digitsum", version=__version__,
                  description="An image of a handwritten digit and a number 0..9 in; the digit and their sum out.")
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.get("/api/health")
    async def health() -> dict:
        """Whether the model is loaded, which one, and the digitsum version."""
        return {"status": "ok", "model_loaded": True, "model": identity, "version": __version__,
                "epoch": metadata.get("epoch")}

    @app.post("/api/predict", openapi_extra=_REQUEST_BODY_DOC)
    async def api_predict(request: Request):
        """Predict the digit in an image and its sum with a number (probabilities of both heads)."""
        started = time.perf_counter()
        try:
            data, number = await _read_request(request)
            field = "image_png_base64" if request.headers.get("content-type", "").startswith("application/json") \
                else "image"
            try:
                inputs, view = preprocess(data)
            except NotAnImageError as error:
                raise BadInput(415, field, str(error)) from None
            except ImageError as error:
                raise BadInput(422, field, str(error)) from None
        except BadInput as bad:
            return _error(bad.status, bad.field, bad.message)
        # The model is tiny (about a millisecond), so it runs right here on the event loop:
        # a thread pool would only add hand-offs on a 2-core machine.
        digit_probabilities, sum_probabilities = classify(model, inputs, [number])
        digit_p, sum_p = digit_probabilities[0], sum_probabilities[0]
        return JSONResponse({
            "number": number,
            "digit": int(digit_p.argmax()),
            "digit_probabilities": [round(p, 5) for p in digit_p.tolist()],
            "sum": int(sum_p.argmax()),
            "sum_probabilities": [round(p, 5) for p in sum_p.tolist()],
            "image_28x28": png_data_url(view),
            "model": identity,
            "latency_ms": round(1000 * (time.perf_counter() - started), 2),
        })

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def run(checkpoint_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
        access_log: bool = True) -> None:
    """Load the checkpoint and serve until Ctrl-C (uvicorn, one process)."""
    try:
        import uvicorn
    except ImportError:
        raise DigitsumError("serving needs FastAPI and uvicorn: pip install 'digitsum[serve]'") from None
    app = create_app(checkpoint_path)
    # One intra-op thread: requests are single images, and extra threads only fight over the cores.
    torch.set_num_threads(1)
    print(f"digitsum serving {checkpoint_path} on http://{host}:{port}/ (API docs at /docs); Ctrl-C stops",
          flush=True)
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info")
