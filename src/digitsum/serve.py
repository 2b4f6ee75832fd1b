"""`digitsum serve`: an HTTP API around predict.py and the drawing page in web/.

    POST /api/predict        multipart (image file + number) or JSON {"image_png_base64", "number"}
    POST /api/predict_batch  up to MAX_BATCH_ITEMS images and numbers in one request (multipart or JSON)
    GET  /api/health         model loaded, model id, version, the worker's pid
    GET  /metrics            Prometheus text format (aggregated over worker processes)
    GET  /              the drawing page (plain HTML/CSS/JS from web/, no build step)
    GET  /docs          OpenAPI

Bad input is the client's fault and never a 500: 422 names the field (bad number, missing,
truncated, oversized or blank image, JSON nested too deep), 413 for bodies over 20 MB (32 MB for
the batch route) or batches over MAX_BATCH_ITEMS items, 415 for
content that is not an image (or a request that is neither multipart nor JSON), 408 for a body
that stops arriving (READ_TIMEOUT_S per chunk) or trickles in (under MIN_BODY_BYTES_PER_S), 503
when preprocessing is busier than QUEUE_WAIT_S.

Images are preprocessed in worker threads, in two lanes (large images over LARGE_IMAGE_PIXELS,
and the rest) with a bounded number in flight each, so the event loop keeps answering
/api/health and small drawings while big photos are being decoded. The model itself (about a
millisecond) runs on the event loop. `build_server` adds the connection limits: keep-alive
timeout, a deadline for the request head, and at most MAX_CONNECTIONS in flight (uvicorn 503s above).

`run(..., workers=N)` with N > 1 starts N uvicorn worker processes sharing one listening socket;
each builds the app with `app_from_env` (the checkpoint path comes in DIGITSUM_SERVE_CHECKPOINT)
and loads the model once. Metrics are then kept in prometheus-client's multiprocess mode, in a
fresh folder the parent creates before the workers start and removes at exit.
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
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from digitsum import __version__
from digitsum.data import NUM_NUMBERS
from digitsum.device import reuse_freed_memory
from digitsum.errors import DigitsumError, quiet_decoder_warnings
from digitsum.onnx_backend import BACKENDS, load_backend
from digitsum.predict import ImageError, NotAnImageError, _top, classify, preprocess
from digitsum.preprocess import IMAGE_FORMATS

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
except ImportError:  # the [serve] extra is optional; cli.py reports this as a one-line error
    FastAPI = None
try:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol as _UvicornHTTPProtocol
except ImportError:
    _UvicornHTTPProtocol = None
try:
    import prometheus_client
except ImportError:
    prometheus_client = None

# A phone's photo is 2-8 MB as a JPEG (12 MP), up to ~20 MB at 48-50 MP; base64 in JSON adds a third.
MAX_BODY_BYTES = 20 * 1024 * 1024
MAX_BATCH_BODY_BYTES = 32 * 1024 * 1024  # the batch route's body cap: 64 drawings, or a few photos
MAX_BATCH_ITEMS = 64  # images per batch request (413 above); classify runs them as one batch
MAX_WORKERS = 64  # --workers 1..MAX_WORKERS
# uvicorn kills a worker that does not answer its supervisor's ping within this (default 5 s). A
# healthy worker answers within milliseconds, but one loading torch's libraries on a busy 2-core
# machine holds the GIL for many seconds; only a hung worker makes the supervisor wait this long.
WORKER_HEALTHCHECK_S = 60
BACKEND_ENV = "DIGITSUM_SERVE_BACKEND"  # ... and which runtime (torch or onnxruntime)
CHECKPOINT_ENV = "DIGITSUM_SERVE_CHECKPOINT"  # how the parent tells app_from_env which checkpoint to serve
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's switch to multiprocess mode
WEB_DIR = Path(__file__).parent / "web"

MAX_NUMBER_CHARS = 8  # "number" as text: ASCII digits with an optional sign, no 5,000-digit strings
MAX_JSON_INT_DIGITS = 32  # longer JSON integers are refused while parsing (Python caps int() at 4,300 digits)
MAX_JSON_DEPTH = 32  # the body is one flat object; deeper nesting is refused before json.loads recurses
READ_TIMEOUT_S = 10.0  # a request head, or each chunk of a body, must arrive within this (else 408 / closed)
# ... and a body as a whole at this rate, READ_TIMEOUT_S of grace added (Apache mod_reqtimeout's
# MinRate): a client trickling a byte every few seconds held its connection (one of MAX_CONNECTIONS)
# for as long as it liked. 8 KiB/s (64 kbit/s) lets a 20 MB photo take 43 minutes.
MIN_BODY_BYTES_PER_S = 8 * 1024
KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 64  # uvicorn answers 503 to requests beyond this many connections or tasks
LARGE_IMAGE_PIXELS = 1024 * 1024  # images with more pixels are preprocessed in the "large" lane
QUEUE_WAIT_S = 20.0  # a request that waits longer than this for a preprocessing slot gets 503
# Large images get half the cores, so the other half stays free for the event loop and small drawings.
LARGE_SLOTS = max(1, (os.cpu_count() or 1) // 2)
SMALL_SLOTS = max(2, os.cpu_count() or 1)

NOSNIFF = (b"x-content-type-options", b"nosniff")
# The page uses only its own files and data: URLs (the 28x28 view); no inline script or style.
PAGE_CSP = (
    b"content-security-policy",
    b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
)

_REQUEST_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "number"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "PNG, JPEG, HEIC, BMP, GIF, WebP or TIFF; at most 4096x4096",
                        },
                        "number": {"type": "integer", "minimum": 0, "maximum": 9},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image_png_base64", "number"],
                    "properties": {
                        "image_png_base64": {
                            "type": "string",
                            "description": "base64 image bytes (a data: URL prefix is allowed)",
                        },
                        "number": {"type": "integer", "minimum": 0, "maximum": 9},
                    },
                }
            },
        },
    },
    "responses": {
        "413": {"description": "body over 20 MB"},
        "415": {"description": "not an image"},
        "422": {"description": "bad number or image; the body names the field"},
    },
}


_BATCH_ITEM_SCHEMA = {
    "type": "object",
    "required": ["image_png_base64", "number"],
    "properties": {"image_png_base64": {"type": "string"}, "number": {"type": "integer", "minimum": 0, "maximum": 9}},
}
_BATCH_RESULT_SCHEMA = {
    "type": "object",
    "properties": {
        "image": {"type": "string", "description": "the upload's file name (or image[i]); items[i] for JSON"},
        "error": {"type": "string", "description": "only for an unusable item (then no prediction fields)"},
        "number": {"type": "integer"},
        "digit": {"type": "integer"},
        "digit_probability": {"type": "number"},
        "sum": {"type": "integer"},
        "sum_probability": {"type": "number"},
        "top3": {"type": "object", "description": "the 3 likeliest digits and sums with probabilities"},
    },
}
_BATCH_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "maxItems": 64,
                            "description": "repeat the field once per image (1..64)",
                        },
                        "numbers": {
                            "type": "string",
                            "example": "3,4,5",
                            "description": "comma-separated: one number for all images or one per image",
                        },
                        "number": {
                            "type": "array",
                            "items": {"type": "integer", "minimum": 0, "maximum": 9},
                            "description": "instead of numbers: repeated, one for all or one per image",
                        },
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["items"],
                    "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 64, "items": _BATCH_ITEM_SCHEMA}},
                }
            },
        },
    },
    "responses": {
        "200": {
            "description": "one result per item, in order; bad items carry an error and the rest are still predicted",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "results": {"type": "array", "items": _BATCH_RESULT_SCHEMA},
                            "model": {"type": "string"},
                            "latency_ms": {"type": "number"},
                        },
                    }
                }
            },
        },
        "413": {"description": "body over 32 MB or more than 64 images"},
        "415": {"description": "neither multipart nor JSON"},
        "422": {
            "description": "malformed as a whole (no images, numbers that do not match the images, "
            "not JSON); the body names the field"
        },
        "503": {"description": "no preprocessing slot in time; retry after the Retry-After seconds"},
    },
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
    """ASGI middleware: 413 for request bodies over `limit` bytes (declared or streamed; paths in
    `path_limits` have their own cap), and 408 (connection closed) when the next chunk of a body
    takes over `read_timeout` seconds to arrive, or the body as a whole arrives slower than
    `min_rate` bytes/s (after `read_timeout` s of grace): uvicorn itself has no body timeout, so
    a half-sent or trickled body would hold its connection forever."""

    def __init__(
        self,
        app,
        limit: int = MAX_BODY_BYTES,
        read_timeout: float = READ_TIMEOUT_S,
        path_limits: dict[str, int] | None = None,
        min_rate: float = MIN_BODY_BYTES_PER_S,
    ):
        self.app, self.limit, self.read_timeout, self.min_rate = app, limit, read_timeout, min_rate
        self.path_limits = path_limits or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.path_limits.get(scope["path"], self.limit)
        too_large = f"request body is larger than {limit // (1024 * 1024)} MB"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._reply(413, too_large, scope, receive, send)
        received, complete, started = 0, False, False
        loop = asyncio.get_running_loop()
        begun = loop.time()

        async def guarded_receive():
            nonlocal received, complete
            if complete:  # after the body, receive() waits for a disconnect: no deadline there
                return await receive()
            # the next chunk within read_timeout, and the body so far at min_rate (grace included)
            left = begun + self.read_timeout + received / self.min_rate - loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), min(self.read_timeout, left))
            except asyncio.TimeoutError:
                raise _ReadTimeout() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
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
                await self._reply(413, too_large, scope, receive, send)
        except _ReadTimeout:
            if not started:
                await self._reply(
                    408,
                    f"the request body stopped arriving (nothing for {self.read_timeout:g} s) "
                    f"or arrived slower than {self.min_rate / 1024:g} KB/s",
                    scope,
                    receive,
                    send,
                    close=True,
                )

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
        # (the page is also served as /static/index.html: the same policy there)
        extra = [NOSNIFF, PAGE_CSP] if scope["path"] in ("/", "/static/index.html") else [NOSNIFF]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# Routes as metric labels: a fixed set, so that clients cannot create a series per URL they make up.
_ROUTE_LABELS = frozenset(
    {"/", "/api/predict", "/api/predict_batch", "/api/health", "/metrics", "/docs", "/openapi.json", "/favicon.ico"}
)
_METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
LATENCY_BUCKETS_S = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _route_label(path: str) -> str:
    if path in _ROUTE_LABELS:
        return path
    return "/static" if path.startswith("/static/") else "other"


def multiprocess_metrics() -> bool:
    """Whether prometheus-client keeps its values in PROMETHEUS_MULTIPROC_DIR (set before workers start)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app, so that several
    apps in one test process do not share counts). With PROMETHEUS_MULTIPROC_DIR set (--workers > 1)
    prometheus-client writes every value to a file per process there, and `exposition()` adds up
    all processes' files; gauges say how: live workers' in-flight counts are summed."""

    def __init__(self, model: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "digitsum_http_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "digitsum_http_request_duration_seconds",
            "Time from the request head to the end of the response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.images = Counter(
            "digitsum_images_preprocessed",
            "Images preprocessed, by outcome: ok, error (not a usable image) or busy (no preprocessing slot in time)",
            ["outcome"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "digitsum_preprocessing_in_flight",
            "Images being preprocessed right now",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.workers = Gauge(
            "digitsum_worker_processes",
            "Worker processes serving (each sets 1; dead ones drop out)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.model = Gauge(
            "digitsum_model_info",
            "The model served (value 1; the labels say which)",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.workers.set(1)
        self.model.labels(model, __version__).set(1)

    def exposition(self) -> bytes:
        """All metrics in the Prometheus text format; over all worker processes in multiprocess mode."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if multiprocess_metrics():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: counts every HTTP response by route, method and status, and times it.
    A request that ends without a response (the client went away) counts as status 499."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, recorded = time.perf_counter(), "499", False

        def record():
            nonlocal recorded
            if not recorded:
                recorded = True
                route = _route_label(scope["path"])
                method = scope["method"] if scope["method"] in _METHOD_LABELS else "other"
                self.metrics.requests.labels(route, method, status).inc()
                self.metrics.latency.labels(route).observe(time.perf_counter() - started)

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted before the last byte goes out: a client that has its answer finds it in
                # /metrics, even when the worker dies right after (counting it afterwards raced that).
                record()
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception:  # not CancelledError: a client that went away stays 499
            status = "500" if status == "499" else status
            raise
        finally:
            record()


# Images up to this many pixels (300x300) are preprocessed on the event loop itself: at most a few
# ms (the page's canvas takes the cheap path), and a thread hand-off per request cost more
# (measured: 189-205 vs 284-298 requests/s for 280x280 drawings on a 2-core Xeon).
INLINE_PIXELS = 300 * 300


class PreprocessLanes:
    """Run preprocess() in worker threads, at most `large_slots` large images and `small_slots`
    others at a time; a request that waits over `wait_s` for a slot gets 503 (BadInput)."""

    def __init__(
        self,
        large_slots: int = LARGE_SLOTS,
        small_slots: int = SMALL_SLOTS,
        wait_s: float = QUEUE_WAIT_S,
        large_pixels: int = LARGE_IMAGE_PIXELS,
    ):
        self.large_slots, self.small_slots, self.wait_s, self.large_pixels = large_slots, small_slots, wait_s, large_pixels
        self._loop = None
        self.metrics: Metrics | None = None  # set by create_app: in-flight gauge and outcome counter

    def _lane(self, pixels: int) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # asyncio primitives belong to one loop (TestClient starts its own)
            self._loop, self._large, self._small = loop, asyncio.Semaphore(self.large_slots), asyncio.Semaphore(self.small_slots)
        return self._large if pixels > self.large_pixels else self._small

    async def preprocess(self, data: bytes, field: str):
        """(model input, 28x28 view) of `data`, computed in a worker thread; ImageError for a bad
        image, BadInput(503, field) when no slot frees up within wait_s."""
        pixels = _pixel_count(data)
        lane = self._lane(pixels)
        try:
            await asyncio.wait_for(lane.acquire(), self.wait_s)
        except asyncio.TimeoutError:
            self._count("busy")
            raise BadInput(
                503, field, f"the server is busy preprocessing other images (waited {self.wait_s:g} s); retry later"
            ) from None
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            if pixels <= INLINE_PIXELS:  # the page's 280x280 canvas: ~3 ms, cheaper than a thread hand-off
                result = preprocess(data)
            else:
                result = await asyncio.get_running_loop().run_in_executor(None, preprocess, data)
        except ImageError:
            self._count("error")
            raise
        finally:
            lane.release()
            if self.metrics is not None:
                self.metrics.in_flight.dec()
        self._count("ok")
        return result

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.images.labels(outcome).inc()


def _pixel_count(data: bytes) -> int:
    """Width x height from the image header (no decoding); 0 when there is no readable header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            width, height = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS).size
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
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int32) - np.isin(codes, (ord("]"), ord("}")))
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


class BatchItem:
    """One image of a batch request: its name in the results, its bytes and number, or why it is unusable."""

    def __init__(self, name: str, data: bytes | None = None, number: int | None = None, error: str | None = None):
        self.name, self.data, self.number, self.error = name, data, number, error


MAX_NAME_CHARS = 100  # an uploaded file name, as echoed back in a batch result


def _item_number(name: str, value) -> tuple[int | None, str | None]:
    try:
        return _parse_number(value), None
    except BadInput as bad:
        return None, f"{name}: {bad.message}"


def _too_many_items(field: str, count: int | str) -> BadInput:
    return BadInput(413, field, f"a batch holds at most {MAX_BATCH_ITEMS} images, got {count}")


async def _read_batch_form(request: "Request") -> list[BatchItem]:
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        # Capped while parsing: a body of 32 MB could otherwise hold tens of thousands of tiny parts.
        form = await request.form(max_files=MAX_BATCH_ITEMS, max_fields=MAX_BATCH_ITEMS + 8)
    except _BodyAbort:
        raise
    except (MultiPartException, HTTPException) as error:  # starlette wraps the parser's error in a 400
        reason = str(getattr(error, "detail", None) or getattr(error, "message", None) or error)
        if reason.startswith("Too many files"):
            raise _too_many_items("image", f"more than {MAX_BATCH_ITEMS}") from None
        if reason.startswith("Too many fields"):
            raise BadInput(413, "number", f"a batch holds at most {MAX_BATCH_ITEMS} number fields") from None
        raise BadInput(422, "image", f"malformed multipart body ({reason[:100]})") from None
    except Exception as error:
        raise BadInput(422, "image", f"malformed multipart body ({type(error).__name__})") from None
    uploads = form.getlist("image")
    if not uploads:
        raise BadInput(422, "image", "the form has no 'image' file fields (repeat 'image' once per image)")
    if len(uploads) > MAX_BATCH_ITEMS:
        raise _too_many_items("image", len(uploads))
    number_fields, numbers_text = form.getlist("number"), form.getlist("numbers")
    if any(not isinstance(value, str) for value in [*number_fields, *numbers_text]):
        raise BadInput(422, "number", "'number' and 'numbers' must be text fields, not file uploads")
    if number_fields and numbers_text or len(numbers_text) > 1:
        raise BadInput(422, "numbers", "give one 'numbers' field (comma-separated) or repeated 'number' fields, not both")
    numbers = numbers_text[0].split(",") if numbers_text else number_fields
    if not numbers:
        raise BadInput(422, "number", "the form has no 'number' or 'numbers' field")
    if len(numbers) not in (1, len(uploads)):
        raise BadInput(
            422, "numbers", f"got {len(numbers)} numbers for {len(uploads)} images; give one number for all or one per image"
        )
    numbers = numbers * len(uploads) if len(numbers) == 1 else numbers
    items = []
    for index, (upload, number_text) in enumerate(zip(uploads, numbers)):
        filename = getattr(upload, "filename", None)
        name = (filename or f"image[{index}]")[:MAX_NAME_CHARS]
        number, error = _item_number(name, number_text)
        if isinstance(upload, str):
            error = f"{name}: 'image' must be a file upload, not a text field"
        data = None if error else await upload.read()
        items.append(BatchItem(name, data, number, error))
    return items


def _read_batch_json(body: bytes) -> list[BatchItem]:
    parsed = _parse_json(body)
    entries = parsed.get("items") if isinstance(parsed, dict) else None
    if not isinstance(entries, list):
        raise BadInput(422, "items", 'the JSON body must be an object {"items": [{"image_png_base64", "number"}, ...]}')
    if not entries:
        raise BadInput(422, "items", "items is empty; send 1 to 64 items")
    if len(entries) > MAX_BATCH_ITEMS:
        raise _too_many_items("items", len(entries))
    items = []
    for index, entry in enumerate(entries):
        name = f"items[{index}]"
        if not isinstance(entry, dict):
            items.append(BatchItem(name, error=f"{name}: must be an object with image_png_base64 and number"))
            continue
        number, error = _item_number(name, entry.get("number"))
        data = None
        encoded = entry.get("image_png_base64")
        if not isinstance(encoded, str):
            error = error or f"{name}: image_png_base64 must be a base64 string"
        else:
            try:
                data = base64.b64decode(encoded.partition(",")[2] if encoded.startswith("data:") else encoded, validate=True)
            except (binascii.Error, ValueError):
                error = error or f"{name}: image_png_base64 is not valid base64"
        items.append(BatchItem(name, data, number, error))
    return items


async def _read_batch(request: "Request") -> list[BatchItem]:
    """The items of a batch request (multipart or JSON); BadInput for a request that is malformed
    as a whole. Items that are bad on their own carry their error and do not fail the request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_batch_form(request)
    if content_type == "application/json":
        return _read_batch_json(await request.body())
    raise BadInput(415, "body", f"send multipart/form-data or application/json, not {content_type or 'nothing'}")


def _image_error(name: str, error: ImageError) -> str:
    # preprocess() names byte input "image"; the batch result names the item instead.
    text = str(error)
    return f"{name}: {text.removeprefix('image: ')}"


def _prediction(number: int, digit_p: torch.Tensor, sum_p: torch.Tensor) -> dict:
    """The prediction fields of one `digitsum predict --json` result (predict.predict's shape)."""
    digit, total = int(digit_p.argmax()), int(sum_p.argmax())
    return {
        "number": number,
        "digit": digit,
        "digit_probability": round(float(digit_p[digit]), 4),
        "sum": total,
        "sum_probability": round(float(sum_p[total]), 4),
        "top3": {"digit": _top(digit_p), "sum": _top(sum_p)},
    }


async def _preprocess_batch(lanes: PreprocessLanes, items: list[BatchItem]) -> list:
    """(model input, view) or the ImageError, per item, preprocessed through `lanes`; BadInput(503)
    if an item found no slot in time. At most as many items of one batch wait for the lanes at a
    time as a lane has slots, so a batch queues behind other requests' images, not behind itself
    (64 large photos would otherwise outwait QUEUE_WAIT_S on their own)."""
    own_slots = asyncio.Semaphore(max(lanes.small_slots, lanes.large_slots))

    async def one(item: BatchItem):
        async with own_slots:
            try:
                return await lanes.preprocess(item.data, "image")
            except ImageError as error:
                return error

    # return_exceptions: a 503 of one item must not abandon the others' threads mid-lane.
    outcomes = await asyncio.gather(*(one(item) for item in items), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, ImageError):
            raise outcome
    return outcomes


def create_app(
    checkpoint_path: str | os.PathLike,
    read_timeout: float = READ_TIMEOUT_S,
    lanes: PreprocessLanes | None = None,
    backend: str | None = None,
) -> "FastAPI":
    """The FastAPI app serving one checkpoint (loaded once, here; CheckpointError if unusable).

    `read_timeout`: seconds each chunk of a request body may take (408 after); `lanes`: where
    preprocessing runs (default PreprocessLanes(): LARGE_SLOTS and SMALL_SLOTS worker threads);
    `backend`: "torch" or "onnxruntime" (None: by the file, .onnx -> onnxruntime; see resolve_backend).
    """
    if FastAPI is None:
        raise DigitsumError("serving needs FastAPI and uvicorn: pip install 'digitsum[serve]'")
    if prometheus_client is None:
        raise DigitsumError("serving needs prometheus-client: pip install 'digitsum[serve]'")
    path = Path(checkpoint_path)
    backend = resolve_backend(path, backend)
    model, metadata = load_backend(path, backend)
    identity = model_id(path)
    lanes = lanes or PreprocessLanes()
    metrics = Metrics(identity)
    lanes.metrics = metrics

    app = FastAPI(
        title="digitsum",
        version=__version__,
        description="An image of a handwritten digit and a number 0..9 in; the digit and their sum out.",
    )
    app.state.model_id = identity
    app.add_middleware(
        BodyLimit, limit=MAX_BODY_BYTES, read_timeout=read_timeout, path_limits={"/api/predict_batch": MAX_BATCH_BODY_BYTES}
    )
    app.add_middleware(SecurityHeaders)  # outer to BodyLimit: also on its 413 and 408
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last = outermost: counts every response

    @app.get("/api/health")
    async def health() -> dict:
        """Whether the model is loaded, which one, the digitsum version, and the serving process's pid
        (with --workers N, requests spread over N processes)."""
        return {
            "status": "ok",
            "model_loaded": True,
            "model": identity,
            "backend": backend,
            "version": __version__,
            "epoch": metadata.get("epoch"),
            "pid": os.getpid(),
        }

    # HEAD for uptime monitors (uvicorn sends the headers only); one OpenAPI operation is enough.
    app.add_api_route("/api/health", health, methods=["HEAD"], include_in_schema=False)

    @app.post("/api/predict", openapi_extra=_REQUEST_BODY_DOC)
    async def api_predict(request: Request):
        """Predict the digit in an image and its sum with a number (probabilities of both heads)."""
        started = time.perf_counter()
        try:
            data, number = await _read_request(request)
            field = "image_png_base64" if request.headers.get("content-type", "").startswith("application/json") else "image"
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
        return JSONResponse(
            {
                "number": number,
                "digit": int(digit_p.argmax()),
                "digit_probabilities": [round(p, 5) for p in digit_p.tolist()],
                "sum": int(sum_p.argmax()),
                "sum_probabilities": [round(p, 5) for p in sum_p.tolist()],
                "image_28x28": png_data_url(view),
                "model": identity,
                "latency_ms": round(1000 * (time.perf_counter() - started), 2),
            }
        )

    @app.post("/api/predict_batch", openapi_extra=_BATCH_BODY_DOC)
    async def api_predict_batch(request: Request):
        """Predict up to 64 images in one request: one result per item, in order, in the shape of
        `digitsum predict --json` ({"image", "error"} for an unusable item). 200 whenever the request
        itself is well-formed, even if some items are bad."""
        started = time.perf_counter()
        try:
            items = await _read_batch(request)
            outcomes = await _preprocess_batch(lanes, [item for item in items if item.error is None])
        except BadInput as bad:
            response = _error(bad.status, bad.field, bad.message)
            if bad.status == 503:
                response.headers["retry-after"] = "5"
            return response
        good = []
        for item, outcome in zip([item for item in items if item.error is None], outcomes):
            if isinstance(outcome, ImageError):
                item.error = _image_error(item.name, outcome)
            else:
                good.append((item, outcome[0]))
        results = {id(item): {"image": item.name, "error": item.error} for item in items if item.error}
        if good:
            # One forward pass for the whole batch (the point of the route).
            digit_probs, sum_probs = classify(model, torch.cat([inputs for _, inputs in good]), [item.number for item, _ in good])
            for (item, _), digit_p, sum_p in zip(good, digit_probs, sum_probs):
                results[id(item)] = {"image": item.name, **_prediction(item.number, digit_p, sum_p)}
        return JSONResponse(
            {
                "results": [results[id(item)] for item in items],
                "model": identity,
                "latency_ms": round(1000 * (time.perf_counter() - started), 2),
            }
        )

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    async def prometheus_metrics():
        """Requests by route and status, latency histograms, images preprocessed by outcome, images being
        preprocessed, the model served: the Prometheus text format, added up over all worker processes."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

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
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise DigitsumError(f"cannot listen on {host!r}: {getattr(error, 'strerror', None) or error}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a live listener still conflicts
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        hint = (
            "; another program is listening there: pick another --port (0 = any free port)"
            if error.errno == errno.EADDRINUSE
            else ""
        )
        raise DigitsumError(f"cannot listen on {host}:{port}: {error.strerror or error}{hint}") from None
    return sock


if _UvicornHTTPProtocol is not None:

    class HeadTimeoutProtocol(_UvicornHTTPProtocol):
        """uvicorn's HTTP protocol, closing connections that do not finish a request head within
        `config.head_timeout` seconds of connecting or of their last response (uvicorn's keep-alive
        timer is disarmed by the first byte, so a client that sends half a head, or connects and
        sends nothing, would otherwise hold a connection forever). A module-level class, with its
        timeout read from the config, so that worker processes can import it by name."""

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
            seconds = getattr(self.config, "head_timeout", READ_TIMEOUT_S)
            self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

        def _head_timed_out(self):
            self._head_timer = None
            # A request in progress (its head complete) is the body timeout's business.
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()


def _server_config(
    app,
    workers: int = 1,
    access_log: bool = True,
    log_level: str = "info",
    keep_alive: float = KEEP_ALIVE_S,
    head_timeout: float = READ_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
):
    """uvicorn.Config with digitsum's connection limits (per worker process); `app` is an ASGI app,
    or for workers > 1 the import string of a factory."""
    import uvicorn

    config = uvicorn.Config(
        app,
        access_log=access_log,
        log_level=log_level,
        timeout_keep_alive=keep_alive,
        limit_concurrency=max_connections,
        # By name, not the class: a worker then imports this module (and torch)
        # only once it runs, after it can answer the supervisor's health pings.
        http="digitsum.serve:HeadTimeoutProtocol",
        workers=workers,
        factory=workers > 1,
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
    )
    config.head_timeout = head_timeout  # read by HeadTimeoutProtocol; travels with the config to workers
    return config


def build_server(
    app,
    access_log: bool = True,
    log_level: str = "info",
    keep_alive: float = KEEP_ALIVE_S,
    head_timeout: float = READ_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
):
    """A uvicorn.Server for `app` with digitsum's connection limits; start it with .run(sockets=[sock])."""
    import uvicorn

    return uvicorn.Server(_server_config(app, 1, access_log, log_level, keep_alive, head_timeout, max_connections))


def app_from_env() -> "FastAPI":
    """The app of one worker process (`digitsum serve --workers N`, N > 1): serves the checkpoint
    named by $DIGITSUM_SERVE_CHECKPOINT, loaded once per worker, and says so on stdout."""
    checkpoint = os.environ.get(CHECKPOINT_ENV)
    if not checkpoint:
        raise DigitsumError(f"{CHECKPOINT_ENV} is not set; start workers with `digitsum serve --workers N`")
    # One intra-op thread per worker: N workers already use N cores, more threads only fight over them.
    torch.set_num_threads(1)
    reuse_freed_memory()  # process-wide: this is the worker process's start
    quiet_decoder_warnings()  # (as the parent's cli.main did: a worker is a fresh interpreter)
    try:
        app = create_app(checkpoint, backend=os.environ.get(BACKEND_ENV) or None)
    except Exception as error:  # one line, and uvicorn's startup-failure code: the supervisor then
        from uvicorn.config import STARTUP_FAILURE  # stops instead of restarting this worker forever

        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        sys.stderr.write(f"digitsum serve: error: worker {os.getpid()}: {message}\n")  # (one write, as below)
        sys.stderr.flush()
        sys.exit(STARTUP_FAILURE)
    # One write of the whole line: the N workers share the parent's stdout, and print's separate write
    # of the newline once let another worker's line land between (two "loaded" lines run together)
    sys.stdout.write(f"digitsum worker {os.getpid()}: loaded {app.state.model_id}\n")
    sys.stdout.flush()
    return app


def check_workers(workers) -> int:
    """`workers` if it is an integer in 1..MAX_WORKERS, else DigitsumError."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise DigitsumError(f"workers must be an integer in 1..{MAX_WORKERS}, got {workers!r}")
    return workers


def _supervise(config, sock: socket.socket) -> None:
    """Run config.workers worker processes on `sock` (uvicorn's Multiprocess supervisor: it restarts
    workers that die) and tell prometheus-client about every worker that is gone, so that its live
    gauges (in-flight preprocessing, worker count) stop counting; its counters stay in the totals."""
    from prometheus_client.multiprocess import mark_process_dead
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen: set[int] = set()
            self.startup_failed = False

        def _reap(self):
            live = {process.pid for process in self.processes if process.process.is_alive()}
            for pid in self.seen - live:
                mark_process_dead(pid)
            self.seen = live
            self.startup_failed = self.startup_failed or any(process.exitcode == STARTUP_FAILURE for process in self.processes)

        def keep_subprocess_alive(self):
            super().keep_subprocess_alive()
            self._reap()

        def handle_signals(self):  # SIGHUP restarts all workers, SIGTTOU stops one
            super().handle_signals()
            self._reap()

    supervisor = Supervisor(config, sockets=[sock])
    supervisor.run()
    if supervisor.startup_failed:
        raise DigitsumError("a worker process failed to start (its error is above); stopped")


def resolve_backend(path: Path, backend: str | None) -> str:
    """The runtime that serves `path`: `backend` if given ("torch" or "onnxruntime"), else
    onnxruntime for a .onnx file (`digitsum export`) and torch for a .pt checkpoint."""
    if backend is None:
        return "onnxruntime" if path.suffix.lower() == ".onnx" else "torch"
    if backend not in BACKENDS:
        raise DigitsumError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return backend


def run(
    checkpoint_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    access_log: bool = True,
    workers: int = 1,
    backend: str | None = None,
) -> None:
    """Load the checkpoint and serve until Ctrl-C (uvicorn; `workers` processes, 1 = this one;
    `backend`: torch or onnxruntime, see resolve_backend)."""
    check_workers(workers)
    backend = resolve_backend(Path(checkpoint_path), backend)
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise DigitsumError("serving needs FastAPI and uvicorn: pip install 'digitsum[serve]'") from None
    if prometheus_client is None:
        raise DigitsumError("serving needs prometheus-client: pip install 'digitsum[serve]'")
    sock = bind_socket(host, port)
    try:
        port = sock.getsockname()[1]
        shown_host = f"[{host}]" if ":" in host else host
        where = f"on http://{shown_host}:{port}/ (API docs at /docs, metrics at /metrics); Ctrl-C stops"
        if workers == 1:
            # One intra-op thread: requests are single images, and extra threads only fight over the
            # cores (set first: the onnxruntime backend takes its thread count from torch's).
            torch.set_num_threads(1)
            reuse_freed_memory()  # process-wide: set here, at the serving process's start
            app = create_app(checkpoint_path, backend=backend)
            print(f"digitsum serving {checkpoint_path} {where}", flush=True)
            build_server(app, access_log=access_log).run(sockets=[sock])
        else:
            _run_workers(checkpoint_path, sock, workers, access_log, where, backend)
    finally:
        sock.close()


def _run_workers(
    checkpoint_path, sock: socket.socket, workers: int, access_log: bool, where: str, backend: str = "torch"
) -> None:
    path = Path(checkpoint_path).absolute()
    # A bad checkpoint (for this backend) is one clear error here, not N workers failing to start.
    load_backend(path, backend)
    metrics_dir = tempfile.mkdtemp(prefix="digitsum-metrics-")
    saved = {name: os.environ.get(name) for name in (CHECKPOINT_ENV, MULTIPROC_ENV, BACKEND_ENV)}
    # Workers are spawned (not forked): they import prometheus-client after this, so in multiprocess mode.
    os.environ[CHECKPOINT_ENV], os.environ[MULTIPROC_ENV] = str(path), metrics_dir
    os.environ[BACKEND_ENV] = backend
    try:
        print(f"digitsum serving {checkpoint_path} with {workers} worker processes {where}", flush=True)
        config = _server_config("digitsum.serve:app_from_env", workers=workers, access_log=access_log)
        _supervise(config, sock)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
