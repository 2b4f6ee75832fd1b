"""Time and memory to preprocess one large image (4096x4096), ours next to the previous version.

Each measurement runs in a fresh Python process (so peak RSS is that image's alone): decode +
preprocess of one file, median wall and CPU time of --repeats runs after one warm-up, and the
peak RSS increase over the process's RSS just before (/proc/self/status VmHWM after clear_refs;
torch and torchvision are imported before that, as in `digitsum predict`/`serve`). "before" is
the preprocessing of commit 442c91f (predict.py before preprocess.py existed), loaded from git.

    python benchmarks/preprocess_cost.py [--repeats 5] [--side 4096]

Target (issue 10): <= 100 ms and <= 64 MB extra RSS for a 4096x4096 input on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
BEFORE = "442c91f"

CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[3])
data = open(sys.argv[1], "rb").read()
# Loaded before the baseline RSS is taken, in both versions: digitsum predict/serve have torch loaded
# for the model, and ours decodes large PNGs with torchvision (its import is not per-image memory).
import torch, torchvision.io
if sys.argv[2] == "ours":
    from digitsum.preprocess import preprocess_view as run
else:
    import importlib.util
    spec = importlib.util.spec_from_file_location("before_predict", sys.argv[4])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = lambda d: module.preprocess(d)[1]
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as handle:  # resets the peak (VmHWM) to the current RSS
    handle.write("5")
run(data)  # warm-up (and the peak)
peak = status("VmHWM:")
walls, cpus = [], []
for _ in range(int(sys.argv[5])):
    wall, cpu = time.perf_counter(), time.process_time()
    run(data)
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
print(json.dumps({"wall_ms": 1000 * statistics.median(walls), "cpu_ms": 1000 * statistics.median(cpus),
                  "rss_mb": (peak - base) / 1024}))
"""


def inputs(side: int) -> dict[str, bytes]:
    """A digit drawn on a large page, in the encodings people send."""
    page = Image.new("L", (side, side), 245)
    k = side / 280
    ImageDraw.Draw(page).line(
        [(70 * k, 60 * k), (210 * k, 60 * k), (120 * k, 230 * k)], fill=20, width=round(20 * k), joint="curve"
    )
    rng = np.random.default_rng(0)
    noisy = np.clip(np.asarray(page, np.int16) + rng.integers(-6, 7, page.size[::-1]), 0, 255).astype(np.uint8)
    files = {}
    for name, image, fmt, options in [
        ("PNG L (flat page)", page, "PNG", {}),
        ("PNG RGB (flat page)", page.convert("RGB"), "PNG", {}),
        ("PNG RGBA (flat page)", page.convert("RGBA"), "PNG", {}),
        ("PNG L (paper grain)", Image.fromarray(noisy), "PNG", {}),
        ("JPEG RGB q90 (paper grain)", Image.fromarray(noisy).convert("RGB"), "JPEG", {"quality": 90}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        files[name] = buffer.getvalue()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--side", type=int, default=4096)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        before = Path(folder) / "before_predict.py"
        before.write_text(
            subprocess.run(
                ["git", "-C", str(REPO), "show", f"{BEFORE}:src/digitsum/predict.py"], capture_output=True, text=True, check=True
            ).stdout
        )
        print(
            f"one {args.side}x{args.side} image per process; median of {args.repeats} after a warm-up; "
            f"'before' = preprocessing of {BEFORE}\n"
        )
        print(
            "| input | file KB | ours wall ms | ours CPU ms | ours +RSS MB | before wall ms | before +RSS MB "
            "| time ratio before/ours | RSS ratio before/ours |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, data in inputs(args.side).items():
            path = Path(folder) / "input.bin"
            path.write_bytes(data)
            results = {}
            for version in ("ours", "before"):
                output = subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), version, str(REPO / "src"), str(before), str(args.repeats)],
                    capture_output=True,
                    text=True,
                )
                if output.returncode != 0:
                    results[version] = {"wall_ms": float("nan"), "cpu_ms": float("nan"), "rss_mb": float("nan")}
                    print(f"  ({version} failed: {output.stderr.strip().splitlines()[-1][:120]})", file=sys.stderr)
                else:
                    results[version] = json.loads(output.stdout.strip().splitlines()[-1])
            ours, old = results["ours"], results["before"]
            print(
                f"| {name} | {len(data) / 1024:,.0f} | {ours['wall_ms']:.0f} | {ours['cpu_ms']:.0f} | {ours['rss_mb']:.0f} "
                f"| {old['wall_ms']:.0f} | {old['rss_mb']:.0f} | {old['wall_ms'] / ours['wall_ms']:.1f}x "
                f"| {old['rss_mb'] / max(ours['rss_mb'], 1):.1f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
