"""Load test of `digitsum serve`: requests/s, p50/p99 latency, errors and memory across runs.

Starts the server (uvicorn, its own process, one torch thread, no access log), then from this
process sends `--requests` multipart predict requests (a 280x280 drawing like the page sends)
with `--concurrency` in flight over keep-alive connections, `--runs` times, reading the
server's resident memory after each run. The client is a few lines of asyncio that write
prebuilt HTTP/1.1 requests, so it costs the shared CPU as little as possible.

    python benchmarks/serve_load.py [--checkpoint runs/latest/model.pt] [--requests 2000] [--concurrency 16]

`--scenario large-uploads` measures instead whether big photos starve everyone else: a few
clients send small drawings and GET /api/health for `--seconds`, first alone, then while
`--large-clients` clients continuously upload a 4096x4096 PNG (a digit drawn on a big, unevenly lit RGB
canvas; the mostly uniform canvas compresses to well under the body limit - its size is
printed). It prints p50/p99 of the small requests without and with that load (target: p99 < 250 ms).

    python benchmarks/serve_load.py --scenario large-uploads [--large-clients 8] [--seconds 20]

`--scenario workers` runs the throughput load (same requests, same checkpoint) against
`digitsum serve --workers 1` and then `--workers N` (default 2), and prints requests/s and p50/p99
side by side with the ratios N-workers / 1-worker (medians over `--runs`).

    python benchmarks/serve_load.py --scenario workers [--workers 2] [--requests 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from digitsum import serve

BOUNDARY = "digitsumloadtest"


def drawing_png() -> bytes:
    """A '7' drawn on a white 280x280 RGBA canvas, as the page's canvas.toBlob() produces."""
    image = Image.new("RGBA", (280, 280), (255, 255, 255, 255))
    ImageDraw.Draw(image).line([(70, 60), (210, 60), (120, 230)], fill=(17, 17, 17, 255), width=23, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def large_png(side: int = 4096) -> bytes:
    """A '7' on a side x side RGB page lit unevenly (light falling off by 30% across it, like a phone
    photo without the sensor noise): it takes the full photo path of preprocessing, not the cheap
    one for a drawing app's exact-colour canvas, and still compresses far below the body limit."""
    import numpy as np

    image = Image.new("L", (side, side), 255)
    scale = side / 280
    ImageDraw.Draw(image).line(
        [(70 * scale, 60 * scale), (210 * scale, 60 * scale), (120 * scale, 230 * scale)],
        fill=17,
        width=round(23 * scale),
        joint="curve",
    )
    lit = np.asarray(image, np.float32) * np.linspace(1.0, 0.7, side, dtype=np.float32)[None, :]
    buffer = io.BytesIO()
    Image.fromarray(lit.astype(np.uint8)).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def health_request(host: str, port: int) -> bytes:
    return f"GET /api/health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


def predict_request(host: str, port: int, image: bytes, number: int) -> bytes:
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="number"\r\n\r\n{number}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="drawing.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST /api/predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
        f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def load(host: str, port: int, request: bytes, total: int, concurrency: int) -> tuple[list[float], int, float]:
    """(latencies in s, error count, wall seconds) for `total` requests, `concurrency` at a time."""
    latencies: list[float] = []
    errors = 0
    remaining = total

    async def connection():
        nonlocal remaining, errors
        reader, writer = await asyncio.open_connection(host, port)
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            try:
                writer.write(request)
                status = int((await reader.readline()).split()[1])
                length, close = 0, False
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                    close |= name.lower() == "connection" and "close" in value.lower()
                body = await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if status != 200 or b'"digit"' not in body:
                    errors += 1
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start


async def exchange(reader, writer, request: bytes) -> tuple[int, bytes, bool]:
    """Send one prebuilt request and read its response: (status, body, whether the server closes)."""
    writer.write(request)
    status = int((await reader.readline()).split()[1])
    length, close = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        close |= name.lower() == "connection" and "close" in value.lower()
    return status, await reader.readexactly(length), close


async def keep_sending(host: str, port: int, request: bytes, until: float, log: list, pause: float = 0.0) -> None:
    """Send `request` over and over (`pause` s apart) on one keep-alive connection until time `until`;
    log (status, seconds) of each."""
    reader, writer = await asyncio.open_connection(host, port)
    while time.perf_counter() < until:
        start = time.perf_counter()
        try:
            status, _, close = await exchange(reader, writer, request)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            status, close = 0, True
        log.append((status, time.perf_counter() - start))
        if close:
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
        await asyncio.sleep(pause)
    writer.close()


async def mixed_load(
    host: str, port: int, seconds: float, small: bytes, big: bytes, small_clients: int, health_clients: int, large_clients: int
) -> dict[str, list]:
    """Logs of (status, seconds) per kind of request, all clients running for `seconds`."""
    until = time.perf_counter() + seconds
    logs = {"small predict": [], "health": [], "4096x4096 upload": []}
    clients = [keep_sending(host, port, small, until, logs["small predict"]) for _ in range(small_clients)]
    # Health checks are paced like a monitor's (every 20 ms); the other clients send back to back.
    clients += [
        keep_sending(host, port, health_request(host, port), until, logs["health"], pause=0.02) for _ in range(health_clients)
    ]
    clients += [keep_sending(host, port, big, until, logs["4096x4096 upload"]) for _ in range(large_clients)]
    await asyncio.gather(*clients)
    return logs


def large_uploads_scenario(args, port: int, server: subprocess.Popen) -> int:
    small = predict_request("127.0.0.1", port, drawing_png(), number=5)
    big_png = large_png()
    big = predict_request("127.0.0.1", port, big_png, number=5)
    asyncio.run(mixed_load("127.0.0.1", port, 2, small, big, args.small_clients, args.health_clients, 0))  # warm-up
    phases = {}
    for name, large_clients in (
        ("without large uploads", 0),
        (f"with {args.large_clients} clients uploading 4096x4096", args.large_clients),
    ):
        phases[name] = asyncio.run(
            mixed_load("127.0.0.1", port, args.seconds, small, big, args.small_clients, args.health_clients, large_clients)
        )
    print(
        f"`digitsum serve` on 127.0.0.1: {args.small_clients} clients sending small predictions (280x280 PNG "
        f"drawing) back to back and {args.health_clients} sending GET /api/health every 20 ms for {args.seconds:g} s, without "
        f"and with {args.large_clients} clients continuously uploading a 4096x4096 RGB PNG "
        f"({len(big_png) / 1024:.0f} KiB; body limit {serve.MAX_BODY_BYTES // 2**20} MB)\n"
    )
    print("| load | request | requests | p50 ms | p99 ms | max ms | statuses |")
    print("|---|---|---|---|---|---|---|")
    worst_small_p99 = 0.0
    for name, logs in phases.items():
        for kind, log in logs.items():
            if not log:
                continue
            ms = 1000 * np.array([seconds for _, seconds in log])
            statuses = ", ".join(f"{status}: {count}" for status, count in sorted(Counter(status for status, _ in log).items()))
            p99 = np.percentile(ms, 99)
            if kind != "4096x4096 upload":
                worst_small_p99 = max(worst_small_p99, p99)
            print(f"| {name} | {kind} | {len(log)} | {np.percentile(ms, 50):.1f} | {p99:.1f} | {ms.max():.1f} | {statuses} |")
    print(
        f"\nworst p99 of small requests: {worst_small_p99:.1f} ms (target < 250 ms); load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; server RSS {rss_mib(server.pid):.1f} MiB"
    )
    return 0 if worst_small_p99 < 250 else 1


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(checkpoint: str, port: int, workers: int = 1) -> subprocess.Popen:
    """`digitsum serve` on `port`, once it answers (with workers > 1: once every worker loaded the model)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "digitsum.cli",
            "serve",
            "--checkpoint",
            checkpoint,
            "--port",
            str(port),
            "--no-access-log",
            "--workers",
            str(workers),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    loaded = []  # "digitsum worker PID: loaded MODEL" lines, one per worker
    threading.Thread(
        target=lambda: [loaded.append(line) for line in process.stdout if line.startswith("digitsum worker ")], daemon=True
    ).start()
    deadline = time.monotonic() + 90 * workers
    while True:
        if process.poll() is not None:
            sys.exit(f"server exited with {process.returncode}: {process.stderr.read().strip()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as response:
                if json.load(response)["model_loaded"] and (workers == 1 or len(loaded) >= workers):
                    return process
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.terminate()  # stdout is the reader thread's; the log is on stderr
            log = process.stderr.read().strip().splitlines()[-10:]
            sys.exit(
                f"server did not answer /api/health within {90 * workers} s "
                f"({len(loaded)} of {workers} workers loaded); its log ends:\n" + "\n".join(log)
            )
        time.sleep(0.2)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()  # the parent of --workers N stops its workers on SIGTERM
    server.wait(timeout=30)


def workers_scenario(args) -> int:
    """The throughput load against 1 worker, then args.workers: a table and the ratios."""
    results = {}
    for workers in (1, args.workers):
        port = free_port()
        server = start_server(args.checkpoint, port, workers)
        request = predict_request("127.0.0.1", port, drawing_png(), number=5)
        runs = []
        try:
            asyncio.run(load("127.0.0.1", port, request, args.warmup, args.concurrency))
            for _ in range(args.runs):
                latencies, errors, seconds = asyncio.run(load("127.0.0.1", port, request, args.requests, args.concurrency))
                ms = 1000 * np.array(latencies)
                runs.append((len(latencies) / seconds, np.percentile(ms, 50), np.percentile(ms, 99), errors))
        finally:
            stop_server(server)
        results[workers] = runs
    print(
        f"`digitsum serve --workers 1` vs `--workers {args.workers}` on 127.0.0.1: {args.requests:,} multipart "
        f"predict requests per run (280x280 PNG drawing), {args.concurrency} in flight from another process, "
        f"{args.runs} runs each, checkpoint {args.checkpoint}\n"
    )
    print("| workers | requests/s (median) | p50 ms | p99 ms (median) | errors | requests/s per run |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for workers, runs in results.items():
        rate, p50, p99 = (statistics.median(run[i] for run in runs) for i in range(3))
        medians[workers] = (rate, p99)
        print(
            f"| {workers} | {rate:.0f} | {p50:.1f} | {p99:.1f} | {sum(run[3] for run in runs)} | "
            f"{', '.join(f'{run[0]:.0f}' for run in runs)} |"
        )
    (rate_1, p99_1), (rate_n, p99_n) = medians[1], medians[args.workers]
    print(
        f"\n{args.workers} workers / 1 worker: requests/s x{rate_n / rate_1:.2f}, p99 x{p99_n / p99_1:.2f}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (the client runs on the same CPUs)"
    )
    return 0 if all(run[3] == 0 for runs in results.values() for run in runs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/latest/model.pt", help="model checkpoint (default: runs/latest/model.pt)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per run (default: 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    parser.add_argument("--runs", type=int, default=3, help="repeated runs, to see whether memory grows (default: 3)")
    parser.add_argument("--warmup", type=int, default=200, help="requests before measuring (default: 200)")
    parser.add_argument(
        "--scenario",
        default="throughput",
        choices=["throughput", "large-uploads", "workers"],
        help="throughput: many small predictions; large-uploads: small requests with and "
        "without clients uploading 4096x4096 images; workers: the throughput load against "
        "1 and --workers worker processes (default: throughput)",
    )
    parser.add_argument("--workers", type=int, default=2, help="workers: processes to compare with 1 (default: 2)")
    parser.add_argument("--large-clients", type=int, default=8, help="large-uploads: uploading clients (default: 8)")
    parser.add_argument(
        "--small-clients", type=int, default=2, help="large-uploads: clients sending small predictions (default: 2)"
    )
    parser.add_argument(
        "--health-clients", type=int, default=1, help="large-uploads: clients sending GET /api/health (default: 1)"
    )
    parser.add_argument("--seconds", type=float, default=20, help="large-uploads: seconds per phase (default: 20)")
    args = parser.parse_args(argv)

    if args.scenario == "workers":
        return workers_scenario(args)
    port = free_port()
    server = start_server(args.checkpoint, port)
    if args.scenario == "large-uploads":
        try:
            return large_uploads_scenario(args, port, server)
        finally:
            server.terminate()
            server.wait(timeout=10)
    request = predict_request("127.0.0.1", port, drawing_png(), number=5)
    rows = []
    try:
        asyncio.run(load("127.0.0.1", port, request, args.warmup, args.concurrency))
        rss_before = rss_mib(server.pid)
        for run in range(1, args.runs + 1):
            cpu_before = cpu_seconds(server.pid)
            latencies, errors, seconds = asyncio.run(load("127.0.0.1", port, request, args.requests, args.concurrency))
            cpu_ms = 1000 * (cpu_seconds(server.pid) - cpu_before) / args.requests
            ms = 1000 * np.array(latencies)
            rows.append(
                (run, len(latencies) / seconds, np.percentile(ms, 50), np.percentile(ms, 99), errors, cpu_ms, rss_mib(server.pid))
            )
    finally:
        server.terminate()
        server.wait(timeout=10)

    print(
        f"`digitsum serve` on 127.0.0.1, {args.requests:,} multipart predict requests per run (280x280 PNG "
        f"drawing), {args.concurrency} in flight from another process; server RSS after warm-up "
        f"{rss_before:.1f} MiB\n"
    )
    print("| run | requests/s | p50 ms | p99 ms | errors | server CPU ms/request | server RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for run, rate, p50, p99, errors, cpu_ms, rss in rows:
        print(f"| {run} | {rate:.0f} | {p50:.1f} | {p99:.1f} | {errors} | {cpu_ms:.2f} | {rss:.1f} |")
    growth = rows[-1][-1] - rows[0][-1]
    print(
        f"\nRSS change from run 1 to run {len(rows)}: {growth:+.1f} MiB; load average during the runs "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    return 0 if all(row[4] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
