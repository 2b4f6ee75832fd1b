"""Does the image path see MNIST the way the tensor path does? Two checks, one markdown table.

1. PNG round trip: every MNIST test image saved as a 28x28 PNG and read back through
   `digitsum.predict.preprocess`, then classified the way `digitsum predict` does (load_predictor +
   classify: folded BatchNorm, bf16 where measured faster here); the digit predictions must
   agree with the tensor path (the plain fp32 model, as `digitsum evaluate` runs it) on at least
   99.9% of the images.
2. Drawn style: every test image rendered the way people draw (dark ink on a white 280x280
   canvas, the digit at a random size and offset), saved as JPEG quality 75 and read back;
   digit accuracy must be within 0.5 points of the tensor path's test accuracy.

    python benchmarks/preprocess_agreement.py [--checkpoint runs/latest/model.pt] [--limit N]
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np
import torch
from PIL import Image

from digitsum.checkpoint import load_model
from digitsum.data import load_split, normalize
from digitsum.predict import classify, load_predictor, preprocess

CANVAS = 280


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def drawn_jpeg(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """An MNIST digit as a person might draw it: dark on white 280x280, random size and place, JPEG q75."""
    rows, cols = np.nonzero(image.any(axis=1))[0], np.nonzero(image.any(axis=0))[0]
    digit = Image.fromarray(255 - image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    longer = int(rng.integers(80, 241))  # the digit's longer side on the canvas, px
    scale = longer / max(digit.size)
    digit = digit.resize((max(1, round(digit.width * scale)), max(1, round(digit.height * scale))), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (CANVAS, CANVAS), 255)
    canvas.paste(digit, (int(rng.integers(0, CANVAS - digit.width + 1)), int(rng.integers(0, CANVAS - digit.height + 1))))
    buffer = io.BytesIO()
    canvas.convert("RGB").save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


def digits_of(model, views: list[np.ndarray], numbers: torch.Tensor) -> torch.Tensor:
    inputs = normalize(torch.from_numpy(np.stack(views)))  # the same normalisation preprocess() applies
    predicted = [
        classify(model, inputs[i : i + 1000], numbers[i : i + 1000].tolist())[0].argmax(1) for i in range(0, len(views), 1000)
    ]
    return torch.cat(predicted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/latest/model.pt", help="model checkpoint (default: runs/latest/model.pt)")
    parser.add_argument("--data-root", default=None, help="where MNIST lives (default: $DIGITSUM_DATA or ./data)")
    parser.add_argument("--limit", type=int, default=10000, help="test images to use (default: all 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn-style sizes and offsets")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    model, _ = load_model(args.checkpoint)
    predictor, _ = load_predictor(args.checkpoint)
    test = load_split("test", args.data_root, limit=args.limit)
    images = test.images.numpy()
    with torch.inference_mode():
        tensor_digits = torch.cat(
            [
                model(normalize(test.images[i : i + 1000]), test.numbers[i : i + 1000])[0].argmax(1)
                for i in range(0, len(test), 1000)
            ]
        )
    tensor_accuracy = float((tensor_digits == test.digits).float().mean())

    start = time.perf_counter()
    png_views = [preprocess(png_bytes(image))[1] for image in images]
    png_seconds = time.perf_counter() - start
    png_digits = digits_of(predictor, png_views, test.numbers)
    agreement = float((png_digits == tensor_digits).float().mean())
    identical = float(np.mean([np.array_equal(view, image) for view, image in zip(png_views, images)]))

    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    drawn_views = [preprocess(drawn_jpeg(image, rng))[1] for image in images]
    drawn_seconds = time.perf_counter() - start
    drawn_accuracy = float((digits_of(predictor, drawn_views, test.numbers) == test.digits).float().mean())
    gap = 100 * (tensor_accuracy - drawn_accuracy)

    count = len(test)
    print(f"checkpoint {args.checkpoint}, {count:,} MNIST test images, tensor-path digit accuracy {100 * tensor_accuracy:.2f}%\n")
    print("| check | result | target | met |")
    print("|---|---|---|---|")
    print(
        f"| 28x28 PNG round trip: digit agrees with the tensor path | {100 * agreement:.2f}% "
        f"({round((1 - agreement) * count)} differ) | >= 99.9% | {'yes' if agreement >= 0.999 else 'NO'} |"
    )
    print(f"| 28x28 PNG round trip: 28x28 view identical to the MNIST image | {100 * identical:.2f}% | - | - |")
    print(
        f"| drawn style (280x280 JPEG q75): digit accuracy | {100 * drawn_accuracy:.2f}% "
        f"({abs(gap):.2f} pts {'below' if gap >= 0 else 'above'} the tensor path) | within 0.5 pts "
        f"| {'yes' if gap <= 0.5 else 'NO'} |"
    )
    print(
        f"| preprocessing time per image (PNG 28x28 / JPEG 280x280) | {1000 * png_seconds / count:.2f} ms / "
        f"{1000 * drawn_seconds / count:.2f} ms | - | - |"
    )
    return 0 if agreement >= 0.999 and gap <= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
