"""`digitsum serve`: an HTTP API around predict.py and the drawing page in web/.

    POST /api/predict   multipart (image file + number) or JSON {"image_png_base64", "number"}
    GET  /api/health    model loaded, model id, version
    GET  /              the drawing page (plain HTML/CSS/JS from web/, no build step)
    GET  /docs          OpenAPI

Bad input is the client's fault and never a 500: 422 names the field (bad number, missing,
truncated, oversized or blank image, JSON nested too deep), 413 for bodies over 2 MB, 415 for
content that is not an image (or a request that is neither multipart nor JSON), 408 for a body
that stops arriving (READ_TIMEOUT_S per chunk), 503 when preprocessing is busier than QUEUE_WAIT_S.

Images are preprocessed in worker threads, in two lanes (large images over LARGE_IMAGE_PIXELS,
and the rest) with a bounded number in flight each, so the event loop keeps answering
/api/health and small drawings while big photos are being decoded. The model itself (about a
millisecond) runs on the event loop. `build_server` adds the connection limits: keep-alive
timeout, a deadline for the request head, and at most MAX_CONNECTIONS in flight (uvicorn 503s above).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import hashlib
import io
import json
import os
import re
import socket
import time
import warnings
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

MAX_NUMBER_CHARS = 8  # "number" as text: ASCII digits with an optional sign, no 5,000-digit strings
MAX_JSON_INT_DIGITS = 32  # longer JSON integers are refused while parsing (Python caps int() at 4,300 digits)
MAX_JSON_DEPTH = 32  # the body is one flat object; deeper nesting is refused before json.loads recurses
READ_TIMEOUT_S = 10.0  # a request head, or each chunk of a body, must arrive within this (else 408 / closed)
KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 64  # uvicorn answers 503 to requests beyond this many connections or tasks
LARGE_IMAGE_PIXELS = 1024 * 1024  # images with more pixels are preprocessed in the "large" lane
QUEUE_WAIT_S = 20.0  # a request that waits longer than this for a preprocessing slot gets 503
# Large images get half the cores, so the other half stays free for the event loop and small drawings.
LARGE_SLOTS = max(1, (os.cpu_count() or 1) // 2)
SMALL_SLOTS = max(2, os.cpu_count() or 1)

NOSNIFF = (b"x-content-type-options", b"nosniff")
# The page uses only its own files and data: URLs (the 28x28 view); no inline script or style.
PAGE_CSP = (b"content-security-policy",
            b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
            b"frame-ancestors 'none'; form-action 'self'")

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
    """ASGI middleware: 413 for request bodies over `limit` bytes (declared or streamed), and 408
    (connection closed) when the next chunk of a body takes over `read_timeout` seconds to arrive:
    uvicorn itself has no body timeout, so a half-sent body would hold its connection forever."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT_S):
        self.app, self.limit, self.read_timeout = app, limit, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reply(413, f"request body is larger than {self.limit // (1024 * 1024)} MB",
                                     scope, receive, send)
        received, complete, started = 0, False, False

        async def guarded_receive():
            nonlocal received, complete
            if complete:  # after the body, receive() waits for a disconnect: no deadline there
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                raise _ReadTimeout() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge()
                complete = not message.get("more_body", False)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reply(413, f"request body is larger than {self.limit // (1024 * 1024)} MB",
                                  scope, receive, send)
        except _ReadTimeout:
            if not started:
                await self._reply(408, f"the request body stopped arriving (nothing for {self.read_timeout:g} s)",
                                  scope, receive, send, close=True)

    async def _reply(self, status, message, scope, receive, send, close=False):
        response = _error(status, "body" if status == 408 else "image", message)
        if close:  # the rest of the body may still come: do not read it as the next request
            response.headers["connection"] = "close"
        await response(scope, receive, send)


class _BodyAbort(Exception):
    """Raised from receive() by BodyLimit; the app must let it through to BodyLimit."""


class _TooLarge(_BodyAbort):
    pass


class _ReadTimeout(_BodyAbort):
    pass


class SecurityHeaders:
    """ASGI middleware: `X-Content-Type-Options: nosniff` on every response (no response is ever
    sniffed into HTML or script), and a Content-Security-Policy on the page at `/`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = [NOSNIFF, PAGE_CSP] if scope["path"] == "/" else [NOSNIFF]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class PreprocessLanes:
    """Run preprocess() in worker threads, at most `large_slots` large images and `small_slots`
    others at a time; a request that waits over `wait_s` for a slot gets 503 (BadInput)."""

    def __init__(self, large_slots: int = LARGE_SLOTS, small_slots: int = SMALL_SLOTS,
                 wait_s: float = QUEUE_WAIT_S, large_pixels: int = LARGE_IMAGE_PIXELS):
        self.large_slots, self.small_slots, self.wait_s, self.large_pixels = large_slots, small_slots, wait_s, large_pixels
        self._loop = None

    def _lane(self, data: bytes) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # asyncio primitives belong to one loop (TestClient starts its own)
            self._loop, self._large, self._small = loop, asyncio.Semaphore(self.large_slots), \
                asyncio.Semaphore(self.small_slots)
        return self._large if _pixel_count(data) > self.large_pixels else self._small

    async def preprocess(self, data: bytes, field: str):
        lane = self._lane(data)
        try:
            await asyncio.wait_for(lane.acquire(), self.wait_s)
        except asyncio.TimeoutError:
            raise BadInput(503, field, f"the server is busy preprocessing other images (waited {self.wait_s:g} s); "
                           "retry later") from None
        try:
            return await asyncio.get_running_loop().run_in_executor(None, preprocess, data)
        finally:
            lane.release()


def _pixel_count(data: bytes) -> int:
    """Width x height from the image header (no decoding); 0 when there is no readable header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            width, height = Image.open(io.BytesIO(data)).size
        return width * height
    except Exception:  # preprocess() names whatever is wrong, quickly, in the small lane
        return 0


def model_id(path: Path) -> str:
    """A short, stable name for a checkpoint: its run folder, file name and content hash."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{path.resolve().parent.name}/{path.name}@{digest}"


def png_data_url(view: np.ndarray) -> str:
    """The 28x28 uint8 view as a data: URL the page can show directly."""
    buffer = io.BytesIO()
    Image.fromarray(view).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_NUMBER_TEXT = re.compile(r"[+-]?[0-9]+")  # ASCII only: str.isdigit() also accepts '³' and '٣'


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "...'"


def _parse_number(value) -> int:
    """The number 0..9 from a form text field or a JSON value; BadInput(422, "number") otherwise.

    Text must be ASCII digits with an optional sign (at most MAX_NUMBER_CHARS characters); a JSON
    value must be an integer: floats (even 3.0), booleans and strings of other kinds are refused.
    """
    expected = f"number must be an integer 0..{NUM_NUMBERS - 1}"
    if value is None:
        raise BadInput(422, "number", f"{expected}; the request has no number")
    if isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_NUMBER_CHARS or not _NUMBER_TEXT.fullmatch(text):
            raise BadInput(422, "number", f"{expected} written with ASCII digits, got {_shown(value)}")
        value = int(text)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(422, "number", f"{expected} (a JSON integer, not {type(value).__name__}), got {_shown(value)}")
    if not 0 <= value < NUM_NUMBERS:
        raise BadInput(422, "number", f"number must be in 0..{NUM_NUMBERS - 1}, got {value}")
    return value


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"an integer with {len(text.lstrip('-')):,} digits")
    return int(text)


def _json_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_too_deep(body: bytes) -> bool:
    """Whether the JSON text nests arrays/objects deeper than MAX_JSON_DEPTH (json.loads recurses
    once per level, so 100,000 levels raise RecursionError). Cheap: a real request has 1 level, and
    base64 has no brackets, so the exact count runs only for bodies with many brackets."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return False
    outside_strings = re.sub(rb'"[^"\\]*(?:\\.[^"\\]*)*"', b"", body)
    codes = np.frombuffer(outside_strings, dtype=np.uint8)
    steps = (np.isin(codes, (ord("["), ord("{"))).astype(np.int32) - np.isin(codes, (ord("]"), ord("}"))))
    return bool(len(steps)) and int(np.cumsum(steps).max()) > MAX_JSON_DEPTH


def _parse_json(body: bytes):
    if _json_too_deep(body):
        raise BadInput(422, "body", f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(body, parse_int=_json_int, parse_constant=_json_constant)
    except RecursionError:  # not reachable past _json_too_deep, but never a 500
        raise BadInput(422, "body", "the JSON body nests too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0][:100] if str(error) else type(error).__name__
        raise BadInput(422, "body", f"the body is not valid JSON ({reason})") from None


async def _read_request(request: "Request") -> tuple[bytes, int]:
    """(image bytes, number) from a multipart or JSON request; BadInput otherwise."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await request.form()
        except _BodyAbort:
            raise
        except Exception as error:  # malformed multipart: the client's fault, not ours
            raise BadInput(422, "image", f"malformed multipart body ({type(error).__name__})") from None
        upload = form.get("image")
        if upload is None:
            raise BadInput(422, "image", "the form has no 'image' file field")
        if isinstance(upload, str):
            raise BadInput(422, "image", "'image' must be a file upload, not a text field")
        data = await upload.read()
        number = form.get("number")
        if number is not None and not isinstance(number, str):
            raise BadInput(422, "number", "'number' must be a text field, not a file upload")
        number = _parse_number(number)
    elif content_type == "application/json":
        body = _parse_json(await request.body())
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


def create_app(checkpoint_path: str | os.PathLike, read_timeout: float = READ_TIMEOUT_S,
               lanes: PreprocessLanes | None = None) -> "FastAPI":
    """The FastAPI app serving one checkpoint (loaded once, here; CheckpointError if unusable).

    `read_timeout`: seconds each chunk of a request body may take (408 after); `lanes`: where
    preprocessing runs (default PreprocessLanes(): LARGE_SLOTS and SMALL_SLOTS worker threads).
    """
    if FastAPI is None:
        raise DigitsumError("serving needs FastAPI and uvicorn: pip install 'digitsum[serve]'")
    path = Path(checkpoint_path)
    model, metadata = load_predictor(path)
    identity = model_id(path)
    lanes = lanes or PreprocessLanes()

    app = FastAPI(title="digitsum", version=__version__,
                  description="An image of a handwritten digit and a number 0..9 in; the digit and their sum out.")
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, read_timeout=read_timeout)
    app.add_middleware(SecurityHeaders)  # added last = outermost: also on BodyLimit's 413 and 408

    @app.get("/api/health")
    async def health() -> dict:
        """Whether the model is loaded, which one, and the digitsum version."""
        return {"status": "ok", "model_loaded": True, "model": identity, "version": __version__,
                "epoch": metadata.get("epoch")}

    # HEAD for uptime monitors (uvicorn sends the headers only); one OpenAPI operation is enough.
    app.add_api_route("/api/health", health, methods=["HEAD"], include_in_schema=False)

    @app.post("/api/predict", openapi_extra=_REQUEST_BODY_DOC)
    async def api_predict(request: Request):
        """Predict the digit in an image and its sum with a number (probabilities of both heads)."""
        started = time.perf_counter()
        try:
            data, number = await _read_request(request)
            field = "image_png_base64" if request.headers.get("content-type", "").startswith("application/json") \
                else "image"
            try:
                # Decoding a 4096x4096 photo takes a second: in a worker thread, so that the event
                # loop keeps answering health checks and small drawings meanwhile.
                inputs, view = await lanes.preprocess(data, field)
            except NotAnImageError as error:
                raise BadInput(415, field, str(error)) from None
            except ImageError as error:
                raise BadInput(422, field, str(error)) from None
        except BadInput as bad:
            response = _error(bad.status, bad.field, bad.message)
            if bad.status == 503:
                response.headers["retry-after"] = "5"
            return response
        # The model is tiny (about a millisecond), so it runs right here on the event loop:
        # a thread hand-off would cost about as much as the model.
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

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free port), or DigitsumError in one line.

    Bound here rather than by uvicorn so that a port in use is a clear error before the model
    loads, and so that the real port of --port 0 is known.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise DigitsumError(f"cannot listen on {host!r}: {getattr(error, 'strerror', None) or error}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a live listener still conflicts
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        hint = "; another program is listening there: pick another --port (0 = any free port)" \
            if error.errno == errno.EADDRINUSE else ""
        raise DigitsumError(f"cannot listen on {host}:{port}: {error.strerror or error}{hint}") from None
    return sock


def _head_timeout_protocol(seconds: float):
    """uvicorn's HTTP protocol, closing connections that do not finish a request head within
    `seconds` of connecting or of their last response (uvicorn's keep-alive timer is disarmed
    by the first byte, so a client that sends half a head, or connects and sends nothing, would
    otherwise hold a connection forever)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadTimeoutProtocol(AutoHTTPProtocol):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc):
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

        def _head_timed_out(self):
            self._head_timer = None
            # A request in progress (its head complete) is the body timeout's business.
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutProtocol


def build_server(app, access_log: bool = True, log_level: str = "info",
                 keep_alive: float = KEEP_ALIVE_S, head_timeout: float = READ_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS):
    """A uvicorn.Server for `app` with digitsum's connection limits; start it with .run(sockets=[sock])."""
    import uvicorn

    config = uvicorn.Config(app, access_log=access_log, log_level=log_level, timeout_keep_alive=keep_alive,
                            limit_concurrency=max_connections, http=_head_timeout_protocol(head_timeout))
    return uvicorn.Server(config)


def run(checkpoint_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
        access_log: bool = True) -> None:
    """Load the checkpoint and serve until Ctrl-C (uvicorn, one process)."""
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise DigitsumError("serving needs FastAPI and uvicorn: pip install 'digitsum[serve]'") from None
    sock = bind_socket(host, port)
    try:
        app = create_app(checkpoint_path)
        # One intra-op thread: requests are single images, and extra threads only fight over the cores.
        torch.set_num_threads(1)
        port = sock.getsockname()[1]
        shown_host = f"[{host}]" if ":" in host else host
        print(f"digitsum serving {checkpoint_path} on http://{shown_host}:{port}/ (API docs at /docs); "
              "Ctrl-C stops", flush=True)
        build_server(app, access_log=access_log).run(sockets=[sock])
    finally:
        sock.close()
