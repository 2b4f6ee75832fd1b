"""Real images in: MNIST-style preprocessing of any image, and predictions from a checkpoint.

MNIST digits were made by fitting each digit's bounding box into 20x20 pixels (keeping the aspect
ratio, with antialiasing) and pasting that into a 28x28 field so the centre of mass sits at the
centre, white ink on black. `preprocess()` does the same to whatever a user has - a phone photo,
a scan, a drawing from the web page - so the model sees what it was trained on:

    read (Pillow, first frame) -> flatten transparency -> grayscale -> polarity (ink bright)
    -> stretch contrast, drop faint pixels away from ink -> crop the ink's bounding box -> longer side 20 px
    -> paste into 28x28 with the centre of mass at the centre -> uint8 view -> normalise
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from digitsum.data import NUM_NUMBERS, normalize
from digitsum.errors import DigitsumError
from digitsum.checkpoint import load_model
from digitsum.device import autocast, bf16_pays_off, reuse_freed_memory
from digitsum.model import IMAGE_SIZE, DigitSumNet, inference_model

MAX_SIDE = 4096  # larger images are refused before decoding (decompression bomb guard)
DIGIT_BOX = 20  # MNIST fits the digit's longer side into 20 px ...
CENTRE = 14.0  # ... and puts its centre of mass here (row and column index; measured on MNIST: 13.99, 14.01)
NOISE_FLOOR = 0.1  # after stretching to [0, 1], fainter pixels are background noise (JPEG ringing, paper grain)
MIN_CONTRAST = 0.1  # an image whose ink differs from its background by less than this is blank

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


class ImageError(DigitsumError):
    """An image could not be used: unreadable, truncated, too large or blank."""


class NotAnImageError(ImageError):
    """The bytes are not in any image format Pillow knows (HTTP 415 rather than 422)."""


# ----------------------------------------------------------------------------- reading


def _name(source: ImageSource) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "image"


def open_image(source: ImageSource) -> Image.Image:
    """A fully decoded Pillow image (first frame) from a path, raw bytes or an Image.

    Every way a file can be wrong becomes an ImageError whose one-line message names it.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        name = _name(source)
        if isinstance(source, bytes):
            data = source
        else:
            path = Path(source)
            if not path.exists():
                raise ImageError(f"{name}: no such file")
            if path.is_dir():
                raise ImageError(f"{name}: is a folder, not an image")
            try:
                data = path.read_bytes()
            except OSError as error:
                raise ImageError(f"{name}: cannot be read ({error.strerror or error})") from None
        if not data:
            raise ImageError(f"{name}: is empty (0 bytes)")
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except UnidentifiedImageError:
            raise NotAnImageError(f"{name}: is not an image Pillow can read (PNG, JPEG, BMP, GIF, WebP, TIFF)") from None
        except Image.DecompressionBombError:
            raise ImageError(f"{name}: is far larger than the {MAX_SIDE}x{MAX_SIDE} limit "
                             "(decompression bomb guard); shrink it first") from None
        except (OSError, ValueError, SyntaxError) as error:
            raise ImageError(f"{name}: cannot be read as an image ({_reason(error)})") from None
    width, height = image.size
    if width > MAX_SIDE or height > MAX_SIDE:
        raise ImageError(f"{_name(source)}: is {width}x{height} pixels, larger than the "
                         f"{MAX_SIDE}x{MAX_SIDE} limit (decompression bomb guard); shrink it first")
    if width < 1 or height < 1:
        raise ImageError(f"{_name(source)}: has no pixels ({width}x{height})")
    try:
        image.seek(0)  # GIF, animated WebP, multi-page TIFF: the first frame
        image.load()
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageError(f"{_name(source)}: is damaged or truncated ({_reason(error)})") from None
    return image


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:100] if text else type(error).__name__


# ----------------------------------------------------------------------------- pixels


def grayscale(image: Image.Image) -> np.ndarray:
    """float32 (H, W) in [0, 1]: transparency flattened, colour to luminance, any bit depth."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and 32-bit scans: scale by the format's range (Pillow's convert("L") would clip).
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        return np.clip(values / top, 0.0, 1.0)
    if image.mode == "1":
        image = image.convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        image = image.convert("RGBA")
        if image.getchannel("A").getextrema()[0] == 255:  # opaque after all (e.g. a canvas export)
            has_alpha = False
    if not has_alpha:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
    luminance = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    # Put the drawing on a background that contrasts with it: dark strokes on a transparent
    # canvas go onto white, light strokes onto black. Alpha-weighted mean of what is visible.
    visible = alpha.sum()
    ink_is_dark = visible == 0 or float((luminance * alpha).sum() / visible) < 0.5
    background = 1.0 if ink_is_dark else 0.0
    return luminance * alpha + background * (1.0 - alpha)


def ink_map(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """float32 (H, W) in [0, 1], ink bright on a black background, faint noise removed.

    Polarity: the median pixel is the background (digits cover well under half of an image);
    a light background means dark ink, so the image is inverted. Then the contrast is stretched
    so the background is 0 and the strongest ink is 1; pixels under NOISE_FLOOR that do not touch
    stronger ink become 0.
    """
    step = max(1, min(gray.shape) // 64)  # a ~64x64 sample estimates the background as well, and faster
    background = float(np.median(gray[::step, ::step]))
    ink = 1.0 - gray if background > 0.5 else gray
    background = min(background, 1.0 - background)
    contrast = float(ink.max()) - background
    if contrast < MIN_CONTRAST:
        raise ImageError(f"{name}: is blank (no ink: every pixel is within {100 * MIN_CONTRAST:.0f}% of the "
                         "background); draw or photograph a digit")
    ink = np.clip((ink - background) / contrast, 0.0, 1.0)
    # Faint pixels are kept only next to real ink (the antialiased edge of a stroke); elsewhere
    # they are noise that would stretch the bounding box and pull the centre of mass.
    return np.where(_grow(ink >= NOISE_FLOOR), ink, 0.0).astype(np.float32)


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask plus its 8 neighbours (a 3x3 binary dilation)."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    grown = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy : dy + height, dx : dx + width]
    return grown


def mnist_layout(ink: np.ndarray) -> np.ndarray:
    """uint8 (28, 28): the ink's bounding box scaled to a longer side of 20 px, centre of mass centred."""
    rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = crop.shape
    scale = DIGIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # Pillow's (width, height)
    # LANCZOS on float pixels: antialiased like MNIST, no uint8 rounding before the final one.
    # (A box that is already 20 px is returned unchanged, so MNIST round-trips exactly.)
    box = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    box = np.clip(box, 0.0, 1.0)
    box = np.where(_grow(box >= NOISE_FLOOR), box, 0.0)  # LANCZOS ringing: faint specks off the strokes
    mass = box.sum()
    if mass <= 0:
        box, mass = np.ones_like(box), box.size  # a speck that vanished in resampling: keep its box
    ys, xs = np.indices(box.shape)
    centre_y, centre_x = float((ys * box).sum() / mass), float((xs * box).sum() / mass)
    top, left = round(CENTRE - centre_y), round(CENTRE - centre_x)
    # Clamp so the box stays inside the field (only a very lopsided digit would need more).
    top = min(max(top, 0), IMAGE_SIZE - box.shape[0])
    left = min(max(left, 0), IMAGE_SIZE - box.shape[1])
    field = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    field[top : top + box.shape[0], left : left + box.shape[1]] = box
    return np.round(field * 255.0).astype(np.uint8)


def preprocess(image: ImageSource) -> tuple[torch.Tensor, np.ndarray]:
    """Any image (path, bytes or Pillow image) -> (model input (1, 1, 28, 28), the 28x28 uint8 view).

    The model input is the view normalised exactly like the training data, so what the user is
    shown is precisely what the model saw. Raises ImageError (one line naming the image) for a
    missing, empty, non-image, truncated, oversized or blank file.
    """
    name = _name(image)
    view = mnist_layout(ink_map(grayscale(open_image(image)), name))
    return normalize(torch.from_numpy(view).unsqueeze(0)), view  # (1,1,28,28), (28,28)


# ----------------------------------------------------------------------------- predicting


def _check_number(number) -> int:
    if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or not 0 <= number < NUM_NUMBERS:
        raise DigitsumError(f"number must be an integer in 0..{NUM_NUMBERS - 1}, got {number!r}")
    return int(number)


def _top(probabilities: torch.Tensor, k: int = 3) -> list[dict]:
    values, indices = probabilities.topk(k)
    return [{"value": int(i), "probability": round(float(p), 4)} for p, i in zip(values, indices)]


def load_predictor(path: str | os.PathLike) -> tuple[DigitSumNet, dict]:
    """(model ready for inference, metadata) from a checkpoint: eval mode, BatchNorm folded in,
    ReLU after max-pool, channels-last (model.inference_model). Also keeps freed memory in the
    process (device.reuse_freed_memory), which makes batches up to 2x faster on Linux.
    A `.onnx` path gives an onnxruntime backend instead (onnx_backend.load_onnx), which classify accepts."""
    if Path(path).suffix.lower() == ".onnx":  # `digitsum export`'s graph, run by onnxruntime
        from digitsum.onnx_backend import load_onnx

        return load_onnx(path)
    reuse_freed_memory()
    model, metadata = load_model(path)
    return inference_model(model), metadata


INFERENCE_CHUNK = 256  # images per forward pass: keeps a small CNN's activations in the CPU's cache
BF16_MIN_BATCH = 64  # measured on a 2-core AVX-512 BF16 CPU: 1 image 0.31 ms fp32 vs 0.55 bf16; 64: 2.0 vs 1.7


@torch.inference_mode()
def classify(model: DigitSumNet, inputs: torch.Tensor, numbers: Sequence[int],
             chunk: int = INFERENCE_CHUNK, bf16: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(digit probabilities (B, 10), sum probabilities (B, 19)) for normalised inputs (B, 1, 28, 28).

    Large batches run in chunks of `chunk` images: on a CPU, a few hundred images of this model
    fit in the cache while 1,024 do not, which makes the chunked pass about twice as fast.
    `bf16=None` runs the CNN under bfloat16 autocast for batches of BF16_MIN_BATCH or more where bf16
    is faster on this machine (device.bf16_pays_off, as training does; for a few images the casts
    cost more than they save);
    the softmax and the sum block stay in float32.
    """
    if not isinstance(model, torch.nn.Module):  # onnx_backend.OnnxBackend runs its own graph
        return model.classify(inputs, numbers)
    device = next(model.parameters()).device
    if bf16 is None:
        bf16 = len(inputs) >= BF16_MIN_BATCH and bf16_pays_off(device)
    numbers = torch.as_tensor(list(numbers), dtype=torch.long, device=device)
    with autocast(device, bf16):
        digit_logits, sum_logits = zip(*(model(images.to(device), chunk_numbers) for images, chunk_numbers
                                         in zip(inputs.split(chunk), numbers.split(chunk))))
    return torch.cat(digit_logits).float().softmax(1).cpu(), torch.cat(sum_logits).float().softmax(1).cpu()


def predict(model: DigitSumNet, images: Sequence[ImageSource], numbers: Sequence[int] | int,
            views: list | None = None) -> list[dict]:
    """One result per image, in the `digitsum predict --json` shape (see DESIGN.md).

    `numbers` is one number for all images or one per image. An image (or number) that cannot be
    used gives `{"image": ..., "error": "..."}` and the others are still predicted, in one batch.
    If `views` is a list, the 28x28 uint8 view of each image (None on error) is appended to it.
    """
    if isinstance(numbers, (int, np.integer)) and not isinstance(numbers, bool):
        numbers = [numbers] * len(images)
    if len(numbers) != len(images):
        raise DigitsumError(f"got {len(numbers)} numbers for {len(images)} images; give one number or one per image")
    results: list[dict] = []
    inputs, good_numbers, good_slots = [], [], []
    for image, number in zip(images, numbers):
        name = _name(image)
        try:
            try:
                number = _check_number(number)
            except DigitsumError as error:
                raise DigitsumError(f"{name}: {error}") from None
            tensor, view = preprocess(image)  # its errors already name the image
        except DigitsumError as error:
            results.append({"image": name, "error": str(error)})
            if views is not None:
                views.append(None)
            continue
        results.append({"image": name, "number": number})
        inputs.append(tensor)
        good_numbers.append(number)
        good_slots.append(len(results) - 1)
        if views is not None:
            views.append(view)
    if inputs:
        digit_probs, sum_probs = classify(model, torch.cat(inputs), good_numbers)
        for slot, digit_p, sum_p in zip(good_slots, digit_probs, sum_probs):
            digit, total = int(digit_p.argmax()), int(sum_p.argmax())
            results[slot].update({
                "digit": digit, "digit_probability": round(float(digit_p[digit]), 4),
                "sum": total, "sum_probability": round(float(sum_p[total]), 4),
                "top3": {"digit": _top(digit_p), "sum": _top(sum_p)},
            })
    return results
