"""Time and memory to preprocess one large image (4096x4096), ours next to the previous version.

Each measurement runs in a fresh Python process (so peak RSS is that image's alone): decode +
preprocess of one file, median wall and CPU time of --repeats runs after one warm-up, and the
peak RSS increase over the process's RSS just before (/proc/self/status VmHWM after clear_refs;
torch and torchvision are imported before that, and glibc keeps freed memory for the next image
(device.reuse_freed_memory), as in `digitsum predict`/`serve`). "before" is
the preprocessing of commit 442c91f (predict.py before preprocess.py existed), loaded from git.
"decode ms" is open_image() alone (median wall), "decoder" what read a large PNG (libspng whole;
ISA-L / zlib-ng + libspng in strips; libpng; "raw strips" for an uncompressed BMP, TIFF, TGA or
PPM; Pillow otherwise).

--decoders prints, instead, the decode alone of each PNG input by each candidate decoder side by
side (one process, min and median wall ms of --repeats runs after a warm-up): Pillow, libpng
(torchvision's decode_png, to grey or grey+alpha as our fallback asks), libspng (pyspng, to the
PNG's own channels), ISA-L inflate + libspng unfilter of one whole stored PNG, imagecodecs' libpng/libspng where
installed, and ours (open_image). Other processes on the machine disturb both tables: the load
average is printed with each row.

    python benchmarks/preprocess_cost.py [--repeats 5] [--side 4096] [--only BMP,TIFF] [--decoders]

Target (issue 10): <= 100 ms and <= 64 MB extra RSS for a 4096x4096 input on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

try:  # HEIC: its Pillow plugin (a dependency of digitsum)
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover
    pass

REPO = Path(__file__).resolve().parents[1]
BEFORE = "442c91f"

CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[3])
data = open(sys.argv[1], "rb").read()
# Loaded before the baseline RSS is taken, in both versions: digitsum predict/serve have torch loaded
# for the model, and ours decodes large PNGs with torchvision (its import is not per-image memory).
import torch, torchvision.io
# As digitsum predict and serve set it at their start (both versions: a process setting): freed
# memory stays in the process for the next image instead of being faulted in again
from digitsum.device import reuse_freed_memory
reuse_freed_memory()
decoder, decode_ms = "", float("nan")
if sys.argv[2] == "ours":
    from digitsum.preprocess import DECODER_KEY, WORK_SIDE, open_image, preprocess_view as run
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
if sys.argv[2] == "ours":
    decodes = []
    for _ in range(int(sys.argv[5])):
        wall = time.perf_counter()
        image = open_image(data, max_decoded_side=2 * WORK_SIDE)
        decodes.append(time.perf_counter() - wall)
    decoder, decode_ms = image.info.get(DECODER_KEY, "Pillow"), 1000 * statistics.median(decodes)
print(json.dumps({"wall_ms": 1000 * statistics.median(walls), "cpu_ms": 1000 * statistics.median(cpus),
                  "rss_mb": (peak - base) / 1024, "decode_ms": decode_ms, "decoder": decoder}))
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
    # A phone photo's page: lit from one side (30% across), with fine, smooth sensor noise
    across = np.linspace(1.0, 0.7, side, dtype=np.float32)[None, :]
    noise = Image.fromarray(np.clip(rng.normal(128, 12, page.size[::-1]), 0, 255).astype(np.uint8))
    smooth = np.asarray(noise.filter(ImageFilter.GaussianBlur(1.5)), np.float32) - 128
    photo = np.clip(np.asarray(page, np.float32) * across + smooth, 0, 255).astype(np.uint8)
    # A drawing app's transparent canvas: black everywhere, the strokes only in the alpha channel
    canvas = np.zeros((side, side, 4), np.uint8)
    canvas[..., 3] = np.where(np.asarray(page) < 128, 255, 0)
    files = {}
    for name, image, fmt, options in [
        ("PNG L (flat page)", page, "PNG", {}),
        ("PNG RGB (flat page)", page.convert("RGB"), "PNG", {}),
        ("PNG RGBA (flat page)", page.convert("RGBA"), "PNG", {}),
        ("PNG RGBA (ink only in alpha)", Image.fromarray(canvas, "RGBA"), "PNG", {}),
        ("PNG L (paper grain)", Image.fromarray(noisy), "PNG", {}),
        ("PNG RGB (paper grain)", Image.fromarray(noisy).convert("RGB"), "PNG", {}),
        ("JPEG RGB q90 (paper grain)", Image.fromarray(noisy).convert("RGB"), "JPEG", {"quality": 90}),
        # The other formats digitsum reads, less often this large:
        ("BMP RGB (paper grain)", Image.fromarray(noisy).convert("RGB"), "BMP", {}),
        ("TIFF RGB uncompressed (paper grain)", Image.fromarray(noisy).convert("RGB"), "TIFF", {}),
        ("TIFF RGB LZW (paper grain)", Image.fromarray(noisy).convert("RGB"), "TIFF", {"compression": "tiff_lzw"}),
        ("GIF (paper grain)", Image.fromarray(noisy), "GIF", {}),
        ("WebP q90 (paper grain)", Image.fromarray(noisy).convert("RGB"), "WEBP", {"quality": 90}),
        ("WebP q90 (flat page)", page.convert("RGB"), "WEBP", {"quality": 90}),
        ("WebP q80 (lit page, fine noise)", Image.fromarray(photo).convert("RGB"), "WEBP", {"quality": 80}),
        # An iPhone's format, in 512x512 tiles as iPhones write it (x265 takes 10-20 s to encode this one)
        ("HEIC q80 in tiles (lit page, fine noise)", Image.fromarray(photo).convert("RGB"), "HEIF", {"quality": 80}),
    ]:
        buffer = io.BytesIO()
        if fmt == "HEIF":
            import pillow_heif

            pillow_heif.options.GRID_TILE_SIZE = 512
        image.save(buffer, format=fmt, **options)
        files[name] = buffer.getvalue()
    return files


def decoders(side: int, repeats: int) -> None:
    """The decode-alone table (--decoders): each candidate on each PNG input, in this process."""
    import importlib.util
    import zlib

    import torch
    from torchvision.io import ImageReadMode, decode_png

    sys.path.insert(0, str(REPO / "src"))
    from digitsum import preprocess

    torch.set_num_threads(1)  # as in digitsum predict's preprocessing: one image, one core

    def pillow(data):
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    def libpng(data):
        alpha = Image.open(io.BytesIO(data)).mode in ("RGBA", "LA")
        mode = ImageReadMode.GRAY_ALPHA if alpha else ImageReadMode.GRAY
        return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode)

    def stored_png(header: bytes, raw: bytes) -> bytes:
        """A PNG whose one IDAT holds `raw` (inflated, still filtered scanlines) as stored deflate blocks
        (no compression): libspng then only copies and unfilters. The zlib trailer's Adler-32 and the
        IDAT's CRC are left 0: the stream was checked when it was inflated, and pyspng checks neither."""
        block = 65535
        view = memoryview(raw)
        count = max(1, -(-len(raw) // block))
        size = 2 + len(raw) + 5 * count + 4
        pieces = [
            preprocess._PNG_SIGNATURE,
            preprocess._png_chunk(b"IHDR", bytes(header)),
            size.to_bytes(4, "big"),
            b"IDAT\x78\x01",
        ]
        for index in range(count):
            piece = view[index * block : (index + 1) * block]
            last = 1 if index == count - 1 else 0
            pieces += [bytes((last,)) + len(piece).to_bytes(2, "little") + (len(piece) ^ 0xFFFF).to_bytes(2, "little"), piece]
        pieces += [bytes(8), preprocess._PNG_END]  # Adler-32 and CRC (unchecked), IEND
        return b"".join(pieces)

    def isal_libspng(data):
        import isal.isal_zlib
        import pyspng

        at, stream = 8, []
        while at < len(data):
            length = int.from_bytes(data[at : at + 4], "big")
            if data[at + 4 : at + 8] == b"IDAT":
                stream.append(data[at + 8 : at + 8 + length])
            at += 12 + length
        return pyspng.load(stored_png(data[16:29], isal.isal_zlib.decompress(b"".join(stream))))

    candidates = {
        "Pillow": pillow,
        "libpng (torchvision, to grey)": libpng,
        "ours (open_image)": lambda data: preprocess.open_image(data, max_decoded_side=2 * preprocess.WORK_SIDE),
    }
    if importlib.util.find_spec("pyspng"):
        import pyspng

        candidates["libspng (pyspng)"] = pyspng.load
        if importlib.util.find_spec("isal"):
            candidates["ISA-L + libspng"] = isal_libspng
    if importlib.util.find_spec("imagecodecs"):
        import imagecodecs

        candidates["imagecodecs png (libpng)"] = imagecodecs.png_decode
        candidates["imagecodecs spng (libspng)"] = imagecodecs.spng_decode
    print(
        f"decode alone, one {side}x{side} PNG per row; min / median wall ms of {repeats} after a warm-up; "
        f"zlib {zlib.ZLIB_RUNTIME_VERSION}\n"
    )
    print("| input | file KB | " + " | ".join(candidates) + " | load avg |")
    print("|---|---|" + "---|" * len(candidates) + "---|")
    for name, data in inputs(side).items():
        if not name.startswith("PNG"):
            continue
        cells = []
        for decode in candidates.values():
            try:
                decode(data)
            except Exception as error:
                cells.append(f"fails ({type(error).__name__})")
                continue
            walls = []
            for _ in range(repeats):
                wall = time.perf_counter()
                decode(data)
                walls.append(1000 * (time.perf_counter() - wall))
            cells.append(f"{min(walls):.0f} / {statistics.median(walls):.0f}")
        print(f"| {name} | {len(data) / 1024:,.0f} | " + " | ".join(cells) + f" | {os.getloadavg()[0]:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--decoders", action="store_true", help="the decode-alone table of the candidate PNG decoders instead")
    parser.add_argument("--only", default="", help="comma-separated substrings of input names to run (default: all)")
    args = parser.parse_args(argv)
    if args.decoders:
        decoders(args.side, args.repeats)
        return 0
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
            "| input | file KB | decoder | decode ms | ours wall ms | ours CPU ms | ours +RSS MB | before wall ms "
            "| before +RSS MB | time ratio before/ours | RSS ratio before/ours | load avg |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, data in inputs(args.side).items():
            if args.only and not any(part.strip() and part.strip() in name for part in args.only.split(",")):
                continue
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
                    results[version].update(decode_ms=float("nan"), decoder="failed")
                    print(f"  ({version} failed: {output.stderr.strip().splitlines()[-1][:120]})", file=sys.stderr)
                else:
                    results[version] = json.loads(output.stdout.strip().splitlines()[-1])
            ours, old = results["ours"], results["before"]
            print(
                f"| {name} | {len(data) / 1024:,.0f} | {ours['decoder']} | {ours['decode_ms']:.0f} | {ours['wall_ms']:.0f} "
                f"| {ours['cpu_ms']:.0f} | {ours['rss_mb']:.0f} | {old['wall_ms']:.0f} | {old['rss_mb']:.0f} "
                f"| {old['wall_ms'] / ours['wall_ms']:.1f}x | {old['rss_mb'] / max(ours['rss_mb'], 1):.1f}x "
                f"| {os.getloadavg()[0]:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
