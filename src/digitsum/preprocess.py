"""Any image in, an MNIST-style 28x28 digit out: what a phone, a scanner or a drawing app produces.

MNIST digits were made by fitting each digit's bounding box into 20x20 pixels (keeping the aspect
ratio, with antialiasing) and pasting that into a 28x28 field so the centre of mass sits at the
centre, white ink on black. `preprocess_view()` does the same to whatever a user has:

    read (Pillow, IMAGE_FORMATS only - HEIF/HEIC through pillow-heif -, first frame; a large JPEG is
       decoded at 1/2, 1/4 or 1/8 scale, a large 8-bit PNG straight to grey by libspng (whole, or in
       strips after an ISA-L / zlib-ng inflate running ahead in a thread) or, for a palette, < 8 bits
       or interlacing, torchvision's libpng decoder; other large ones to grey without a whole colour
       copy: uncompressed files in strips, compressed TIFFs by libtiff in groups of strips, a lossy
       WebP by its luma plane, a HEIC in strips from libheif's buffer)
    -> reduce a large image by an integer factor to under 2 x WORK_SIDE px (box averaging), before any
       float conversion
    -> EXIF orientation (all 8 values)
    -> any mode/bit depth to grey in [0, 1] (transparency flattened, NaN/inf tamed)
    -> (an image under SMALL_SIDE px, or a drawing app's exact-colour canvas: a cropped digit on a
       uniform ground, read with one global background, as before the photo steps: an MNIST image
       comes back as it was, to one grey level where its brightest pixel is below 255)
    -> a sheet of paper photographed on a darker desk: the desk painted with the sheet's paper level
    -> polarity (a uniform border is the paper, unless it is a shadow beside a lit area; otherwise
       the ink is what a median removes)
    -> flat-field correction: the paper's brightness is estimated locally by a grey-scale
       morphological closing (the "black top-hat" method of document imaging: the closing removes
       every dark feature narrower than its window - the strokes - and keeps the lighting, even a
       sharp shadow edge), and the image is divided by it, so uneven light and shadows are not ink;
       a background estimate as dark as the pen is a bold marker's filled loop, not paper: ink again
    -> ink mask (strong ink only) -> connected components: thin straight lines spanning most of
       the image (ruled or squared paper, page borders) are dropped, the digit is the component
       with the most ink plus the pieces close to it; specks and dust elsewhere are ignored, and
       so are a circle or box drawn around the digit and a line drawn under it, where they do not
       touch it (_rings, _underlines; also on a clean canvas)
    -> a small digit in a large image is cut out again from the full-resolution pixels
    -> stroke-width normalisation: a marker's strokes, wider than 93% of MNIST's, are eroded to
       about an MNIST pen's width
    -> crop the digit's bounding box -> longer side 20 px -> paste into 28x28 with the centre of
       mass at the centre -> uint8 view -> normalise
"""

from __future__ import annotations

import importlib
import io
import math
import os
import queue
import stat
import threading
import zlib
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageChops, UnidentifiedImageError
from scipy import ndimage

from digitsum.errors import DigitsumError

try:  # the min/max filters (_extreme_filter); scipy computes the same where OpenCV is missing
    import cv2 as _cv2
except ImportError:  # pragma: no cover - a dependency; kept optional like pyspng and ISA-L
    _cv2 = None

MAX_SIDE = 8192  # larger images are refused before decoding (decompression bomb guard) ...
MAX_SIDE_WHOLE = 4096  # ... and this for the ones Pillow decodes whole (no reduced or strip decode below)
# The formats and modes read at a reduced scale or in strips (open_image), so that 8192x8192 (a 48-50
# MP phone photo is 8160x6120) costs about 40-350 MB; anything else - JPEG 2000, AVIF, TGA, 16-bit,
# alpha, CMYK - is decoded whole by Pillow: an 84 KB 8192x8192 RGBA JPEG 2000 took +1.6 GB (fuzzing).
_LARGE_MODES = {
    "JPEG": ("L", "RGB", "CMYK"),
    "MPO": ("L", "RGB"),
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA"),
    "HEIF": ("L", "RGB"),
    "WEBP": ("RGB",),
    "TIFF": ("1", "L", "P", "RGB"),
    "BMP": ("1", "L", "P", "RGB"),
    "DIB": ("1", "L", "P", "RGB"),
    "GIF": ("L", "P"),
}
# The file formats read: what phones, scanners and drawing apps write, each decoded by a C library
# with its size known from the header. Left out (never identified, so "not an image"): Pillow's
# container formats that decode a whole embedded image while opening, before the size check (ICO,
# ICNS, BLP: a 256x256 ICO holding a 13000x13000 PNG took +646 MB), and its pure-Python decoders
# (DDS, XPM, QOI: 1.5-4.3 s for a 2 MB file), as well as formats that are no photo or drawing.
# (A phone's multi-picture JPEG is opened by the JPEG plugin, as format "MPO".) HEIF/HEIC - what
# iPhones, and many Android phones, save their photos as - is read by libheif (pillow-heif, its
# Pillow plugin: the primary picture, turned as its rotation/mirror properties say, which also
# carry the EXIF orientation, then set to 1; no thumbnails, depth or auxiliary pictures).
try:
    from pillow_heif import register_heif_opener as _register_heif_opener

    _register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
    _HEIF = ("HEIF",)
except ImportError:  # pragma: no cover - a dependency; without it a HEIC file is "not an image digitsum reads"
    _HEIF = ()
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP", "DIB", "AVIF", "JPEG2000", "PPM", "TGA", "PCX", "SGI", "IM") + _HEIF
# A progressive JPEG makes libjpeg walk every block once per scan, and empty scans are only a
# warning: 1,000 empty 10-byte scans made an 11 KB 4096x4096 file take 2.3 s to decode. Encoders
# write 1 (baseline) to about 10-20 (progressive); a file with more start-of-scan markers than
# this (thumbnails and an MPO's other pictures included) is refused before decoding.
MAX_JPEG_SCANS = 100
# Pillow decodes run-length-encoded BMPs in Python: a 16 KB 4096x4096 RLE4 file took 2.1 s. Larger
# ones (rare: drawing programs write RLE BMPs for small icons) are refused before decoding.
MAX_RLE_BMP_PIXELS = 1024 * 1024
IMAGE_SIZE = 28  # MNIST's field (model.IMAGE_SIZE; repeated so that preprocessing needs no torch)
DIGIT_BOX = 20  # MNIST fits the digit's longer side into 20 px ...
CENTRE = 14.0  # ... and puts its centre of mass here (row and column index; measured on MNIST: 13.99, 14.01)
NOISE_FLOOR = 0.1  # after stretching to [0, 1], fainter pixels are background noise (JPEG ringing, paper grain)
MIN_CONTRAST = 0.1  # an image whose ink differs from its background by less than this is blank
WORK_SIDE = 512  # the digit is found at under twice this resolution (bounded time and memory) ...
DETAIL_SIDE = 96  # ... and re-cut from the full-resolution image when it is smaller than this there
SMALL_SIDE = 48  # a smaller image is a cropped digit (MNIST is 28x28): no paper, light or ruling to remove
BORDER_PAPER = 0.06  # border pixels within this of the border's median are one paper level (noise, JPEG)
CROPPED_PAPER = 0.55  # where this share of the outermost ring is one light level, that is the paper (_ground_says_dark_ink)
# A one-level border darker than 0.4 is a dark ground (light ink) unless what lies below it reaches
# this far down and this many times further than what lies above: white paper photographed in a dim
# room (an independent generator's underexposed photos, paper at 20-40% grey: 26% right before).
DIM_INK_CONTRAST = 0.1
DIM_INK_MARGIN = 2.0
# The same with the sensor's noise taken off both sides (how far the border's own pixels stray
# below and above its level, where they stray about as far both ways): a dark, noisy photo's
# lightest noise reaches as far above the paper as its ink below it minus the noise (an independent
# generator's low-light photos, paper at 15-25% grey, heavy colour noise: 5 of 60 read as light
# ink). The ink must still lie this far below the paper's darkest noise.
DIM_INK_BEYOND_NOISE = 0.04
GLARE_INK = 0.12  # where glare lit the page (_lit), ink this faint still joins strokes (digit_mask)
GLARE_LIFT = 0.08  # glare: the page this much brighter than its median pixel (and near white, 0.9) ...
GLARE_SHARE = 0.35  # ... over at most this share of the image
STRONG_INK = 0.4  # ink at >= this fraction of the strongest ink is a stroke; fainter is an edge, a ruled line or shading
LINE_SPAN = 0.6  # a thin straight line from edge to edge covering this fraction of the image is ruled paper
FAINT_INK = 0.15  # ruled lines are looked for down to this (they are often fainter than the pen)
LINE_BAND = 3  # px a ruled line may wander across its direction (a photo's tilt) and its gap in a stroke
# Stroke width in the 20 px digit box (_stroke_width of the ink >= 0.5, x DIGIT_BOX / the box's longer
# side). MNIST's training digits, drawn 224 px tall: median 2.07, 80th percentile 2.41, 90th 2.86,
# 95th 3.23 (7% over 3.0). A wider pen (a marker) is thinned to THIN_TO before the layout (_thinned).
BOLD_STROKE = 3.0
THIN_TO = 2.5
# The same width by area / half perimeter (_area_width: sub-pixel widths of faint hairlines too), the
# same digits: 1st percentile 1.23, 5th 1.45, median 2.18. A pen under THIN_STROKE (a fine brush on a
# large canvas, a hairline that the scaling to 20 px would fade to specks) is widened to THICKEN_TO.
THIN_STROKE = 1.0
THICKEN_TO = 2.0
HAIRLINE = 8.0  # ... and only a pen at most this many px wide at working size (not ordinary strokes in a wide box)
QUAD_SHARE = 0.84  # a sheet's outline: its largest inscribed quadrilateral covers at least this share of its hull
QUAD_SHEET = 0.92  # ... and one this square is a sheet even where a bold digit notches a third of it away
POOL_SIDE = 4 * DIGIT_BOX  # a hairline digit is max-pooled to about this size before it is widened

# A path, the file's bytes (bytes/bytearray/memoryview), a binary file object (anything with
# .read(): an open file, io.BytesIO, a web framework's upload) or a Pillow image.
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]

# EXIF Orientation -> the Pillow transpose that shows the image upright (as ImageOps.exif_transpose does)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(DigitsumError):
    """An image could not be used: unreadable, truncated, too large or blank."""


class NotAnImageError(ImageError):
    """The bytes are not in any image format Pillow knows (HTTP 415 rather than 422)."""


# ----------------------------------------------------------------------------- reading


def _name(source: ImageSource) -> str:
    """How an error names the image: its path (control characters escaped, so that a newline in a
    file name cannot split the one-line error), an open file's name, or "image"."""
    if isinstance(source, (str, os.PathLike)):
        try:
            name = os.fsdecode(source)
        except TypeError:  # (a PathLike giving neither str nor bytes: _read_file names the problem)
            name = repr(source)
    else:
        name = getattr(source, "name", None)  # an open file knows its path
        name = name if isinstance(name, str) and name else "image"
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        name = "".join(repr(c)[1:-1] if ord(c) < 32 or ord(c) == 127 else c for c in name)
    return name


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:100] if text else type(error).__name__


MAX_FILE_BYTES = 128 * 1024 * 1024  # room for any 4096x4096 image, even uncompressed RGBA (64 MB)


def _read_file(path: str | os.PathLike, name: str) -> bytes:
    """The bytes of an image file. Checked before reading: a regular file (a FIFO would block,
    /dev/zero never ends) of at most MAX_FILE_BYTES; read with a bounded read (the file may grow)."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(f"{name}: is a folder, not an image")
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{name}: is not a regular file (a pipe, device or socket); give an image file")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError(
                f"{name}: is {info.st_size:,} bytes ({info.st_size / 2**20:,.0f} MB), over the "
                f"{MAX_FILE_BYTES // 2**20} MB limit for an image file"
            )
        # O_NONBLOCK: should the path have been swapped for a FIFO since the stat, open() must not hang.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(descriptor, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise ImageError(f"{name}: is not a regular file (a pipe, device or socket); give an image file")
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except OSError as error:
        raise ImageError(f"{name}: cannot be read ({error.strerror or error})") from None
    except (ValueError, TypeError) as error:  # a NUL byte in the path; a PathLike giving neither str nor bytes
        raise ImageError(f"{name}: is not a usable path ({_reason(error)})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{name}: is over the {MAX_FILE_BYTES // 2**20} MB limit for an image file")
    return data


def _source_bytes(source: ImageSource, name: str) -> bytes:
    """The encoded file behind a path, bytes-like object or binary file object (read to its end, at
    most MAX_FILE_BYTES); anything else is an ImageError naming its type."""
    if isinstance(source, bytes):
        return source
    if isinstance(source, (bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        return _read_file(source, name)
    if callable(getattr(source, "read", None)):
        try:
            data = source.read(MAX_FILE_BYTES + 1)
        except Exception as error:
            raise ImageError(f"{name}: cannot be read ({_reason(error)})") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(f"{name}: is a text stream; open the file in binary mode ('rb')")
        if len(data) > MAX_FILE_BYTES:
            raise ImageError(f"{name}: is over the {MAX_FILE_BYTES // 2**20} MB limit for an image file")
        return bytes(data)
    raise ImageError(
        f"{name}: a {type(source).__name__} is not an image; give a path, bytes, a binary file object or a PIL image"
    )


def open_image(source: ImageSource, max_decoded_side: int | None = None) -> Image.Image:
    """A fully decoded Pillow image (first frame) from a path, raw bytes, a binary file object or an Image.

    `max_decoded_side`: a JPEG larger than this is decoded at a reduced scale (DCT scaling: faster
    and smaller, never below this size), a colour one as grey; a PNG larger than this (8-bit or
    less, from bytes or a path) is decoded straight to grey with transparency flattened (see
    _png_as_grey). Every way a file can be wrong becomes an ImageError whose one-line message names it.
    """
    name = _name(source)
    data = None
    if isinstance(source, Image.Image):
        image = source
    else:
        data = _source_bytes(source, name)
        if not data:
            raise ImageError(f"{name}: is empty (0 bytes)")
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
        except UnidentifiedImageError:
            raise NotAnImageError(f"{name}: is not an image digitsum reads (PNG, JPEG, HEIC, BMP, GIF, WebP, TIFF)") from None
        except Image.DecompressionBombError:
            raise ImageError(
                f"{name}: is far larger than the {MAX_SIDE}x{MAX_SIDE} limit (decompression bomb guard); shrink it first"
            ) from None
        except Exception as error:  # Pillow's plugins raise many types for malformed headers
            raise ImageError(f"{name}: cannot be read as an image ({_reason(error)})") from None
    width, height = image.size
    if width > MAX_SIDE or height > MAX_SIDE:
        raise ImageError(
            f"{name}: is {width}x{height} pixels, larger than the "
            f"{MAX_SIDE}x{MAX_SIDE} limit (decompression bomb guard); shrink it first"
        )
    if max(width, height) > MAX_SIDE_WHOLE and image.mode not in _LARGE_MODES.get(image.format, ()):
        raise ImageError(
            f"{name}: is {width}x{height} pixels, larger than the {MAX_SIDE_WHOLE}x{MAX_SIDE_WHOLE} limit for this "
            f"{image.format} image (mode {image.mode}; {MAX_SIDE}x{MAX_SIDE} for JPEG, HEIC and 8-bit PNG, "
            "and opaque WebP, TIFF, BMP, GIF); shrink it first"
        )
    if width < 1 or height < 1:
        raise ImageError(f"{name}: has no pixels ({width}x{height})")
    if width * height > MAX_RLE_BMP_PIXELS and any(
        getattr(tile, "codec_name", None) == "bmp_rle" for tile in getattr(image, "tile", ())
    ):
        raise ImageError(f"{name}: is a run-length-encoded BMP over 1024x1024 pixels (slow to decode); re-save it as PNG")
    if image.format in ("JPEG", "MPO") and data is not None and data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise ImageError(f"{name}: is a JPEG of over {MAX_JPEG_SCANS} scans (encoders write at most about 20); re-save it")
    if max_decoded_side and image.format == "PNG" and max(width, height) > max_decoded_side:
        grey = _fast_grey(_png_as_grey, image, data)
        if grey is not None:
            return grey
    if max_decoded_side and max(width, height) > max_decoded_side:
        grey = _fast_grey(_webp_as_grey if image.format == "WEBP" else _raw_as_grey, image, data)
        if grey is None and image.format == "TIFF":
            grey = _fast_grey(_tiff_strips_as_grey, image, data)
        if grey is None and image.format == "HEIF":
            grey = _fast_grey(_heif_as_grey, image, data)
        if grey is not None:
            return grey
    try:
        if image.format != "HEIF":  # (a HEIF opens at its primary picture, which need not be its first)
            image.seek(0)  # GIF, animated WebP, multi-page TIFF: the first frame
        if max_decoded_side and image.format == "JPEG" and max(width, height) > max_decoded_side:
            shrink = max_decoded_side / max(width, height)
            # A colour JPEG straight to grey (its Y channel, = Pillow's RGB -> L within a level): libjpeg
            # then skips the colour planes' inverse DCT and the colour conversion (53 vs 58 ms CPU for a
            # 4096x4096 q90 photo).
            image.draft("L" if image.mode == "RGB" else image.mode, (math.ceil(width * shrink), math.ceil(height * shrink)))
        image.load()
    except Exception as error:  # truncated data, bad chunks, decoder errors of any plugin
        raise ImageError(f"{name}: is damaged or truncated ({_reason(error)})") from None
    return image


# The key in a large PNG's Image.info naming the decoder that read it: "libspng" (whole), "ISA-L +
# libspng" / "zlib-ng + libspng" / "zlib + libspng" (our inflate, then libspng in strips) or "libpng"
# (benchmarks/preprocess_cost.py reports it; absent where Pillow decoded).
DECODER_KEY = "digitsum.decoder"
# The PNG chunks libpng is given (torchvision's decode_png): those that make the pixels. Not the
# colour-space ones (gAMA, sRGB, cHRM, iCCP make libpng convert to grey in linear light, where
# Pillow, and so the rest of this module, converts the stored values), nor any other.
_PNG_PIXEL_CHUNKS = (b"IHDR", b"PLTE", b"tRNS", b"IDAT")
# Chunks that can carry an EXIF orientation; Pillow reads those after the pixels only by decoding.
_PNG_METADATA_CHUNKS = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")


def _png_as_grey(image: Image.Image, data: bytes | None) -> Image.Image | None:
    """A large 8-bit (or less) PNG decoded straight to grey, transparency flattened as grayscale()
    does: an "L" image carrying the header's metadata (EXIF), or None where only Pillow can (16-bit,
    animated, metadata after the pixels, the decoders missing or failing).

    Non-interlaced 8-bit grey, grey + alpha, RGB and RGBA go to libspng (pyspng): a flat opaque
    grey page whole (_spng_grey), the rest in strips of _STRIP_ROWS rows after our own inflate
    (_strips_grey), each strip turned to Pillow's grey and flattened at once, so that no buffer
    of the whole image wider than its grey is made. A palette, < 8 bits or interlacing go to
    libpng (torchvision's decode_png), which converts to grey while it decodes, after
    _stream_sound has checked what would make it crash. 4096x4096, whole preprocessing, median
    wall ms / +RSS MB, libpng for colour and alpha -> strips (benchmarks/preprocess_cost.py's
    inputs and child process, pinned to one core, machine load 1.3-2.1): RGB flat page 111/25 ->
    69/25, RGBA 155/54 -> 85/26, a transparent canvas (ink only in alpha) 197/54 -> 87/30, grainy
    RGB 408/34 -> 167/29; grainy grey (ISA-L + libspng whole before) 147/50 -> 124/28. (torchvision 0.29
    marks its image decoders deprecated in favour of TorchCodec; should they go, the import fails
    and Pillow decodes those as before.)
    """
    if data is None or len(data) < 33 or data[24] > 8 or getattr(image, "is_animated", False):
        return None  # data[24]: IHDR's bit depth
    # The header is read at its place below: the first chunk, as the standard has it. Pillow also
    # reads a file with another chunk first (it takes the IHDR wherever it comes), and bytes 16-29
    # were then that chunk's, read as a width and height of up to 2^32: a 3.6 KB file cost 29 s
    # and 6.8 GB, or a MemoryError (fuzzing). Such a file, or any header that is not Pillow's, is
    # Pillow's to decode.
    if (
        data[8:16] != b"\x00\x00\x00\x0dIHDR"
        or (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) != image.size
    ):
        return None
    alpha = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
    # The chunks (length, type, data, CRC) that decode the pixels: the header, palette,
    # transparency and IDATs. (Only these go to libpng: an ancillary or unknown chunk it would
    # refuse while reading the rows kills the process, see _stream_sound.)
    kept, at, pixels, count, previous = [memoryview(data)[:8]], 8, False, 0, b""
    idat = []
    while at + 12 <= len(data):
        length, kind = int.from_bytes(data[at : at + 4], "big"), bytes(data[at + 4 : at + 8])
        count += 1
        if (pixels and kind in _PNG_METADATA_CHUNKS) or count > 20_000:
            return None  # an orientation Pillow finds after the pixels; or a pathological chunk count
        if kind == b"IDAT" and pixels and previous != b"IDAT":
            return None  # IDATs split by another chunk: damaged (the standard has them consecutive)
        if kind in _PNG_PIXEL_CHUNKS and (kind == b"IDAT" or not pixels):  # (a palette after the pixels: ignored)
            kept.append(memoryview(data)[at : at + 12 + length])
        if kind == b"IDAT":
            idat.append(kept[-1])
        at, previous, pixels = at + 12 + length, kind, pixels or kind == b"IDAT"
    kept.append(memoryview(_PNG_END))
    header = data[16:29]
    decoded = None
    if not alpha and image.mode == "L":
        decoded = _spng_grey(header, idat)
    elif image.mode in ("RGB", "RGBA", "LA"):
        decoded = _strips_grey(header, idat)
    if decoded is not None:
        grey, decoder = decoded
    else:
        try:
            import torch
            from torchvision.io import ImageReadMode, decode_png
        except Exception:
            return None
        if not _stream_sound(header, idat):
            return None
        encoded = bytearray().join(kept)
        try:
            decoded = decode_png(
                torch.frombuffer(encoded, dtype=torch.uint8), ImageReadMode.GRAY_ALPHA if alpha else ImageReadMode.GRAY
            )
        except Exception:  # whatever libpng refuses, Pillow reads or explains
            return None
        del encoded, kept
        pairs = decoded.permute(1, 2, 0).numpy()  # (H, W, channels), as libpng wrote it
        grey, decoder = (pairs[..., 0] if not alpha else _flattened(pairs)), "libpng"
    result = grey if isinstance(grey, Image.Image) else Image.fromarray(np.ascontiguousarray(grey), mode="L")
    result.info = dict(image.info)  # EXIF / XMP orientation (getexif reads info)
    result.info[DECODER_KEY] = decoder
    return result


# Bits a pixel of the uncompressed ("raw") layouts _raw_as_grey reads; any other is left to Pillow.
_RAW_BITS = {"L": 8, "RGB": 24, "BGR": 24, "RGBX": 32, "BGRX": 32, "XRGB": 32, "XBGR": 32, "CMYK": 32}


def _fast_grey(decode, image: Image.Image, data: bytes | None) -> Image.Image | None:
    """A large image's grey by one of the fast decoders below (`decode`), or None where it does not
    apply - also where it fails in a way its checks did not foresee (fuzzing: a TIFF whose strip
    offsets' tag has the type UNDEFINED, which Pillow hands over as bytes, raised a TypeError):
    Pillow then decodes the file, or says in one line what is wrong with it."""
    try:
        return decode(image, data)
    except (ImageError, MemoryError):
        raise
    except Exception:
        return None


def _raw_as_grey(image: Image.Image, data: bytes | None) -> Image.Image | None:
    """A large uncompressed image (BMP, TIFF, TGA, PPM: pixels stored as they are, Pillow's "raw"
    tiles of whole rows) decoded to grey in strips straight from the file's bytes: an "L" image
    with the original's metadata and EXIF orientation, or None where Pillow decodes it whole
    (compressed, planar, alpha, palette, 16-bit, truncated). Each strip is unpacked by Pillow's
    own raw decoder (Image.frombuffer) and converted to grey at once, so no full-size colour copy
    is made (Pillow decodes RGB whole into 4 bytes a pixel: 64 MB at 4096x4096). Whole
    preprocessing of a grainy 4096x4096 RGB page (benchmarks/preprocess_cost.py): BMP 144 -> 67 ms,
    uncompressed TIFF 153 -> 61 ms, +45 MB.
    """
    if data is None or image.mode not in ("L", "RGB", "CMYK"):
        return None
    width, height = image.size
    strips = []  # (first row, end row, offset in the file, raw mode, bytes a row, rows stored bottom first)
    for tile in sorted(getattr(image, "tile", ()), key=lambda tile: tile.extents[1]):  # whole rows, in order, once
        args = (tile.args,) if isinstance(tile.args, str) else tuple(tile.args or ())
        top, bottom = tile.extents[1], tile.extents[3]
        if (
            tile.codec_name != "raw"
            or not isinstance(tile.offset, int)
            or not args
            or not all(isinstance(arg, int) for arg in args[1:])
            or args[0] not in _RAW_BITS
            or tile.extents != (0, strips[-1][1] if strips else 0, width, bottom)
            or bottom <= top
        ):
            return None
        stride = (args[1] if len(args) > 1 else 0) or (width * _RAW_BITS[args[0]] + 7) // 8
        if stride * 8 < width * _RAW_BITS[args[0]] or tile.offset < 0 or tile.offset + stride * (bottom - top) > len(data):
            return None  # (truncated or odd: Pillow says so)
        strips.append((top, bottom, tile.offset, args[0], stride, len(args) > 2 and args[2] < 0))  # (BMP, TGA: bottom first)
    if not strips or strips[-1][1] != height:
        return None
    try:
        grey = _raw_strips(image, data, strips)
    except (ValueError, OSError, MemoryError):  # whatever Pillow's raw decoder refuses, Pillow reads or explains
        return None
    return _with_metadata(grey, image, "raw strips")


def _with_metadata(grey: Image.Image, image: Image.Image, decoder: str) -> Image.Image:
    """`grey` carrying `image`'s info, its EXIF orientation (a TIFF's is a tag of its own, not in
    info: Pillow turns a TIFF upright as it loads it, which a grey read in strips was not) and the
    decoder's name."""
    grey.info = dict(image.info)
    orientation = _orientation(image)
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        grey.info["exif"] = exif.tobytes()
    grey.info[DECODER_KEY] = decoder
    return grey


def _heif_as_grey(image: Image.Image, data: bytes | None) -> Image.Image | None:
    """A large opaque HEIF/HEIC's primary picture decoded by libheif (pillow-heif's HeifFile, turned
    as its rotation/mirror properties say, as Pillow's plugin does) and turned grey strip by strip
    straight from libheif's RGB buffer: exactly the grey of Pillow's plugin, without its whole
    4-byte-a-pixel copy. An "L" image with the metadata, or None where the plugin decodes it (alpha,
    another picture than the plugin's, any failure). A 4096x4096 photo in one frame: +137 -> +88 MB
    for the decode, ~420 ms either way (libde265's HEVC decode; in iPhone-style 512x512 tiles, which
    libheif decodes on both cores, ~250 ms; AMD EPYC).
    """
    try:
        from pillow_heif import open_heif

        heif = open_heif(io.BytesIO(data), convert_hdr_to_8bit=True)
        picture = heif[heif.primary_index]
        if picture.mode not in ("RGB", "L") or picture.mode != image.mode or picture.size != image.size:
            return None
        # (picture.data decodes; its rows, `stride` bytes apart, are then raw rows as _raw_strips reads them)
        grey = _raw_strips(image, picture.data, [(0, image.height, 0, picture.mode, picture.stride, False)])
    except Exception:  # whatever libheif refuses, Pillow's plugin reads or explains
        return None
    return _with_metadata(grey, image, "libheif in strips")


# What _tiff_strips_as_grey reads: compressions libtiff decodes without loss, byte by byte; and the
# tags each group's TIFF copies (width, bits, compression, photometric, fill order, samples,
# planar configuration, predictor, extra samples, sample format: what its pixels need)
_TIFF_CODECS = ("tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits", "zstd")
_TIFF_PIXEL_TAGS = (256, 258, 259, 262, 266, 277, 284, 317, 338, 339)
_TIFF_GROUP_ROWS = 64  # (256: 79 vs 86 ms, but +73 vs +58 MB at 4096x4096: the threads' buffers)


def _tiff_strips_as_grey(image: Image.Image, data: bytes | None) -> Image.Image | None:
    """A large compressed (LZW, Deflate, PackBits, Zstd), 8-bit grey or RGB TIFF stored in strips,
    decoded to grey by groups of strips, two groups at a time: an "L" image with the original's
    metadata and orientation, or None where Pillow decodes it whole (tiles, planes, alpha, palette,
    16-bit, JPEG, damage, a single strip).

    Each group of about _TIFF_GROUP_ROWS rows becomes a small TIFF of its own - the pixel tags
    copied (Pillow's ImageFileDirectory_v2 writes them), its strips' bytes after them - which
    Pillow's libtiff decoder reads and Pillow turns grey: exactly Pillow's grey of the whole file,
    without the whole picture at 4 bytes a pixel (64 MB at 4096x4096), and in two threads, as
    libtiff's decode and the grey conversion release the GIL. A grainy 4096x4096 RGB LZW page
    (benchmarks/preprocess_cost.py, AMD EPYC): decode 91 -> 62 ms, whole preprocessing 119 -> 86 ms,
    +117 -> +58 MB.
    """
    tags = getattr(image, "tag_v2", None)
    if data is None or tags is None or image.mode not in ("L", "RGB") or getattr(image, "_compression", None) not in _TIFF_CODECS:
        return None
    try:
        grey = _tiff_groups(image, data, tags)
    except Exception:  # damage, odd tags, a codec libtiff lacks: Pillow reads the file whole or says what is wrong
        return None
    return None if grey is None else _with_metadata(grey, image, "libtiff in strips")


# The pixel tags' entries in the file as libtiff accepts them: SHORT or LONG, and how many values
_TIFF_ENTRY_COUNTS = {tag: (1,) for tag in (256, 257, 259, 262, 266, 277, 278, 284, 317)}


def _pixel_entries_sound(data: bytes, tags, samples: int, strips: int) -> bool:
    """Whether the first directory's entries for the pixel tags are as libtiff reads them, given the
    original file: each a SHORT or LONG with its number of values (BitsPerSample and SampleFormat
    one per sample, or SampleFormat one for all; the strips' offsets and sizes one per strip), and
    each one Pillow read. Pillow reads past what libtiff refuses (an entry of another type or
    count, skipped or cut to one value with a warning), where each group's clean TIFF would decode
    what Pillow's decode of the original file cannot, or decodes otherwise (fuzzing found both)."""
    order = {b"II": "little", b"MM": "big"}.get(bytes(data[:2]))
    if order is None or len(data) < 8:
        return False
    at = int.from_bytes(data[4:8], order)
    if at + 2 > len(data):
        return False
    counts = {**_TIFF_ENTRY_COUNTS, 258: (samples,), 339: (1, samples), 273: (strips,), 279: (strips,)}
    seen = set()
    for index in range(int.from_bytes(data[at : at + 2], order)):
        entry = data[at + 2 + 12 * index : at + 14 + 12 * index]
        if len(entry) < 12:
            return False
        tag, kind, number = (
            int.from_bytes(entry[0:2], order),
            int.from_bytes(entry[2:4], order),
            int.from_bytes(entry[4:8], order),
        )
        if tag in counts:
            if kind not in (3, 4) or number not in counts[tag] or tag in seen or tag not in tags:
                return False
            seen.add(tag)
    return True


def _tiff_groups(image: Image.Image, data: bytes, tags) -> Image.Image | None:
    """_tiff_strips_as_grey's decoding: the grey image, None where the layout does not apply, or an
    exception where a group fails."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL.TiffImagePlugin import ImageFileDirectory_v2
    from PIL.TiffTags import LONG

    # (The stored size: Pillow reports a TIFF's size as turned upright by its Orientation tag, which
    # _with_metadata carries on instead)
    width, height = tags.get(256), tags.get(257)
    if not isinstance(width, int) or not isinstance(height, int) or {width, height} != set(image.size):
        return None
    offsets, counts = tags.get(273), tags.get(279)
    rows = tags.get(278, height)
    bits, samples = tags.get(258), tags.get(277, 1)
    if (
        not isinstance(offsets, tuple)
        or not isinstance(counts, tuple)
        or not isinstance(rows, int)
        or not 1 <= rows < height
        or len(offsets) != len(counts)
        or len(offsets) != -(-height // rows)
        or 322 in tags  # (tiles)
        or tags.get(284, 1) != 1
        or tags.get(262) not in (0, 1, 2)
        or not isinstance(samples, int)
        or not isinstance(bits, tuple)
        or bits != (8,) * samples
        or any(offset < 0 or count < 0 or offset + count > len(data) for offset, count in zip(offsets, counts))
        # Each copied one-value tag as one value: Pillow reads a damaged count (a Predictor of 2 values)
        # where libtiff, given the original file, ignores the tag or refuses the file - the groups'
        # own clean TIFFs would then decode what Pillow's decode of the original does not
        or any(not isinstance(tags[tag], int) for tag in (256, 262, 266, 277, 284, 317) if tag in tags)
        or not _pixel_entries_sound(data, tags, samples, len(offsets))
    ):
        return None
    per_group = max(1, _TIFF_GROUP_ROWS // rows)
    view = memoryview(data)

    def group(first: int) -> tuple[int, Image.Image]:
        last = min(first + per_group, len(offsets))
        directory = ImageFileDirectory_v2(prefix=b"II")
        for tag in _TIFF_PIXEL_TAGS:
            if tag in tags:
                directory[tag] = tags[tag]
                directory.tagtype[tag] = tags.tagtype[tag]
        for tag, value in ((257, min(height, last * rows) - first * rows), (278, rows)):
            directory[tag] = value
            directory.tagtype[tag] = LONG
        # Strip offsets from the end of the directory (Pillow adds where that is when it writes them)
        starts = [sum(counts[first:index]) for index in range(first, last)]
        directory[273], directory[279] = tuple(starts), tuple(counts[first:last])
        directory.tagtype[273] = directory.tagtype[279] = LONG
        strips = [view[offsets[index] : offsets[index] + counts[index]] for index in range(first, last)]
        encoded = b"".join([b"II*\x00", (8).to_bytes(4, "little"), directory.tobytes(8), *strips])
        part = Image.open(io.BytesIO(encoded), formats=("TIFF",))
        if (
            part.size != (width, directory[257])
            or part.mode != image.mode
            or part.tag_v2[273][0] != len(encoded) - sum(counts[first:last])
        ):
            raise ValueError("the group's TIFF does not read as written")
        part.load()
        return first * rows, part if part.mode == "L" else part.convert("L")

    grey = Image.new("L", (width, height))
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="digitsum-tiff")
    try:
        for top, strip in pool.map(group, range(0, len(offsets), per_group)):
            grey.paste(strip, (0, top))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return grey


def _raw_strips(image: Image.Image, data: bytes, strips: list) -> Image.Image:
    """_raw_as_grey's decoding: the checked row ranges `strips` of `image`, 256 rows at a time, to one "L" image."""
    grey = Image.new("L", image.size)
    buffer = memoryview(data)
    for top, bottom, offset, rawmode, stride, upward in strips:
        for first in range(top, bottom, _STRIP_ROWS * 4):
            count = min(_STRIP_ROWS * 4, bottom - first)
            start = offset + ((bottom - first - count) if upward else (first - top)) * stride  # its first row in the file
            strip = Image.frombuffer(
                image.mode,
                (image.width, count),
                buffer[start : start + count * stride],
                "raw",
                rawmode,
                stride,
                -1 if upward else 1,
            )
            grey.paste(strip if strip.mode == "L" else strip.convert("L"), (0, first))
    return grey


def _webp_as_grey(image: Image.Image, data: bytes | None) -> Image.Image | None:
    """A large opaque still WebP as grey: a lossy one by its luma plane (_webp_luma), else decoded by
    torchvision's libwebp (`decode_webp`, to RGB) and turned grey in strips by Pillow. An "L" image
    carrying the metadata (EXIF), or None where Pillow decodes it (transparency, animation, the
    decoders missing or refusing). Pillow's WebP decoder hands over the whole picture as RGBA: the
    whole preprocessing of a grainy 4096x4096 page took 432 ms and +261 MB that way, 334 ms and +78
    MB through torchvision (Intel Xeon; benchmarks/preprocess_cost.py), 151 ms and +62 MB by the luma (AMD EPYC).
    """
    if data is None or image.mode != "RGB" or getattr(image, "is_animated", False):
        return None
    luma = _webp_luma(data, image.size)
    if luma is not None:
        result, decoder = Image.fromarray(luma, mode="L"), "libwebp luma (webp)"
    else:
        try:
            import torch
            from torchvision.io import ImageReadMode, decode_webp

            planes = decode_webp(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB).numpy()
        except Exception:  # whatever torchvision refuses, Pillow reads or explains
            return None
        if planes.shape != (3, image.height, image.width):
            return None
        result, decoder = Image.new("L", image.size), "libwebp (torchvision)"
        for top in range(0, image.height, _STRIP_ROWS * 4):  # (Pillow's own grey, a strip of interleaved RGB at a time)
            strip = np.ascontiguousarray(planes[:, top : top + _STRIP_ROWS * 4].transpose(1, 2, 0))
            result.paste(Image.fromarray(strip, mode="RGB").convert("L"), (0, top))
    result.info = dict(image.info)  # EXIF orientation (getexif reads info)
    result.info[DECODER_KEY] = decoder
    return result


# Pillow's grey of libwebp's RGB from a luma level: its YUV is BT.601's limited range (Y 16-235),
# whose RGB -> Y weights are 219/255 of Pillow's grey weights, so grey = (Y - 16) * 255 / 219
_LUMA_TO_GREY = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)


def _webp_luma(data: bytes, size: tuple[int, int]) -> np.ndarray | None:
    """uint8 (H, W) grey of an opaque, still, lossy (VP8) WebP of `size` from its luma plane, or None
    where that does not apply (lossless, alpha, animation, the `webp` package missing, libwebp refusing).

    libwebp decodes to YUV straight into arrays of ours (`webp`'s cffi binding of WebPDecode, its
    own second thread on): no RGB is made, and the luma, mapped by _LUMA_TO_GREY, is Pillow's grey
    of the decoded RGB up to rounding (the chroma terms of R, G and B cancel in Pillow's weights)
    and where that RGB clips: on a page with colour grain 0-1 level off for 98% of the pixels (mean
    0.3, at most 4, near white); over 500 random tinted, grainy pages of any quality at most 6 (mean
    <= 0.44; sharp edges, where the chroma's upsampling overshoots); more where saturated colours
    clip: up to 12 levels in random colour noise (0.4% of pixels over 2), 19 at the edges of pure
    red, green, blue and magenta squares on white (6% over 2). A grainy 4096x4096 q90 page: decode
    160 -> 131 ms, whole preprocessing 185 -> 151 ms, +107 -> +62 MB (torchvision's RGB, then
    Pillow's grey in strips, before; AMD EPYC, benchmarks/preprocess_cost.py).
    """
    try:
        from webp._webp import ffi, lib
    except Exception:
        return None
    try:
        return _webp_luma_decode(ffi, lib, data, size)
    except Exception:  # (cffi's type or overflow errors on an odd file: torchvision or Pillow decide)
        return None


def _webp_luma_decode(ffi, lib, data: bytes, size: tuple[int, int]) -> np.ndarray | None:
    """_webp_luma's decoding through the `webp` package's cffi `ffi` and `lib`."""
    config = ffi.new("WebPDecoderConfig*")
    if not lib.WebPInitDecoderConfig(config):
        return None
    features = config.input
    if (
        lib.WebPGetFeatures(data, len(data), ffi.addressof(config, "input")) != lib.VP8_STATUS_OK
        or features.format != 1  # (1: lossy; 2: lossless, 0: mixed, an animation)
        or features.has_alpha
        or features.has_animation
        or (features.width, features.height) != size
    ):
        return None
    width, height = size
    luma = np.empty((height, width), np.uint8)
    chroma = np.empty((2, (height + 1) // 2, (width + 1) // 2), np.uint8)  # (U and V: libwebp writes them too)
    output = config.output
    output.colorspace, output.is_external_memory = lib.MODE_YUV, 1
    planes = output.u.YUVA
    planes.y, planes.y_stride, planes.y_size = ffi.cast("uint8_t*", ffi.from_buffer(luma)), width, luma.size
    for plane, index in (("u", 0), ("v", 1)):
        setattr(planes, plane, ffi.cast("uint8_t*", ffi.from_buffer(chroma[index])))
        setattr(planes, f"{plane}_stride", chroma.shape[2])
        setattr(planes, f"{plane}_size", chroma[index].size)
    config.options.use_threads = 1
    status = lib.WebPDecode(data, len(data), config)
    lib.WebPFreeDecBuffer(ffi.addressof(config, "output"))  # (nothing of libwebp's to free: external memory)
    if status != lib.VP8_STATUS_OK:
        return None
    return _cv2.LUT(luma, _LUMA_TO_GREY, dst=luma) if _cv2 is not None else _LUMA_TO_GREY[luma]


# An IDAT stream larger than this fraction of its inflated size (paper grain, a photo: mostly
# literals) is inflated by ISA-L first: 50 vs 158 ms for zlib on a grainy 4096x4096 page, while on
# a flat page (long matches, ratio ~0.002) zlib inside libspng is the faster. Measured crossover for
# a 4096x4096 grey page with more and more grain: between ratios 0.04 (ISA-L route 58 ms, libspng
# alone 46) and 0.09 (59 vs 72).
_ISAL_RATIO = 0.06


def _spng_grey(header: bytes, idat: list) -> tuple[np.ndarray, str] | None:
    """uint8 (H, W) grey of an opaque 8-bit grey, non-interlaced PNG by libspng (pyspng) and the
    decoder's name, or None where that does not apply or fails (the caller falls back to libpng,
    then Pillow).

    Poorly compressed data (paper grain, a photo) where ISA-L is installed goes to _strips_grey
    instead (ISA-L inflates, libspng only copies and unfilters stored blocks, strip by strip):
    4096x4096 decode ~70 ms vs libspng's own 132 and, before strips, 102 for ISA-L + libspng on
    one whole stored PNG (which pyspng copies whole again). A flat page goes to libspng whole:
    14 vs 20 ms. `header`: IHDR's 13 bytes; `idat`: the IDAT chunks whole (length, type, data, CRC).
    """
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    if depth != 8 or colour != 0 or interlace != 0 or not idat:
        return None
    try:
        import pyspng
    except Exception:
        return None
    if _poorly_compressed(idat, height * (width + 1)) and _inflater(True).__name__ == "isal.isal_zlib":
        return _strips_grey(header, idat)
    try:
        # libspng is built to ignore CRCs and the Adler-32 (pyspng's SPNG_CRC_USE): checked
        # here, so that damage Pillow would refuse is refused (~5 ms for a flat page).
        if not _stream_sound(header, idat):
            return None
        png = b"".join([_PNG_SIGNATURE, _png_chunk(b"IHDR", bytes(header)), *idat, _PNG_END])
        pixels = pyspng.load(png, "L")
    except Exception:
        return None
    del png
    if pixels.shape != (height, width) or pixels.dtype != np.uint8:
        return None
    return pixels, "libspng"


def _crcs_right(chunks: list) -> bool:
    """Whether every chunk (length, type, data, CRC) is whole and its CRC-32 right."""
    try:
        from isal.isal_zlib import crc32  # ISA-L: ~10x zlib's CRC-32 (PCLMUL)
    except Exception:
        crc32 = zlib.crc32
    return all(len(chunk) >= 12 and crc32(chunk[4:-4]) == int.from_bytes(chunk[-4:], "big") for chunk in chunks)


# Adam7's passes: first column and row, column and row step
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _stream_sound(header: bytes, idat: list) -> bool:
    """Whether a decoder can read the pixels without an error. torchvision's decode_png (0.29) kills
    the process (SIGSEGV) on any libpng error while it reads the rows - an IDAT CRC error, a bad
    Adler-32, invalid deflate data, a bad filter type - where the one-line ImageError is due: so
    the IDAT chunks' CRCs are checked, and their zlib stream is inflated here, in 1 MB pieces that
    are thrown away (bounded memory), to its end and Adler-32, to exactly the bytes the header
    calls for, with a valid filter type (0-4) at the start of every row, and nothing after it.
    Cost at 4096x4096: ~7 ms for a flat RGBA page with zlib-ng, whose inflate is ~12x zlib's on
    such long runs; 72-98 ms for a grainy RGB page (15 MB of deflate, 48 MB inflated) with ISA-L,
    ~3x zlib's on mostly literals (libpng's decode of it takes ~300 ms)."""
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    if channels is None or not idat or not _crcs_right(idat):
        return False
    # Where each row's filter-type byte sits in the inflated stream
    rows = []
    for left, top, step_x, step_y in _ADAM7 if interlace else ((0, 0, 1, 1),):
        pass_width, pass_height = max(0, -(-(width - left) // step_x)), max(0, -(-(height - top) // step_y))
        if pass_width:
            rows += [(pass_width * channels * depth + 7) // 8 + 1] * pass_height
    starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
    expected = int(starts[-1])
    starts = starts[:-1]
    inflater = _inflater(_poorly_compressed(idat, expected)).decompressobj()
    done = 0
    try:
        for chunk in idat:
            pending = chunk[8:-4]
            while pending:
                piece = inflater.decompress(pending, 1 << 20)
                pending = inflater.unconsumed_tail
                if done + len(piece) > expected or (not piece and pending):
                    return False
                inside = starts[np.searchsorted(starts, done) : np.searchsorted(starts, done + len(piece))] - done
                if inside.size and int(np.frombuffer(piece, np.uint8)[inside].max()) > 4:
                    return False
                done += len(piece)
                if inflater.eof:
                    break
    except Exception:  # invalid deflate data or Adler-32
        return False
    return inflater.eof and done == expected and not inflater.unused_data  # (nothing after the stream's end)


def _poorly_compressed(idat: list, inflated: int) -> bool:
    """Whether the IDAT chunks' deflate data is over _ISAL_RATIO of the `inflated` bytes it holds
    (mostly literals: grain, a photo), where ISA-L inflates fastest."""
    return sum(len(chunk) - 12 for chunk in idat) > _ISAL_RATIO * inflated


def _inflater(poorly_compressed: bool):
    """The fastest zlib-compatible module installed for the data: ISA-L for mostly literals (grain,
    photos), zlib-ng for long runs (flat pages), else the standard library's zlib."""
    for name in ("isal.isal_zlib", "zlib_ng.zlib_ng") if poorly_compressed else ("zlib_ng.zlib_ng", "isal.isal_zlib"):
        try:
            return importlib.import_module(name)
        except Exception:
            continue
    return zlib


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


# A large colour, grey+alpha or poorly compressed grey PNG is decoded in strips of this many rows
# (see _spng_strips): each strip's buffers stay in the CPU caches and small (64 rows of 4096 RGBA
# pixels: 1 MB), instead of one 48-64 MB buffer of inflated rows and another of decoded pixels.
_STRIP_ROWS = 64


def _stored_blocks(pieces: list) -> list:
    """Deflate stored blocks (a header of 5 bytes, then the bytes) of `pieces` (each <= 65535 bytes),
    the last one marked final."""
    blocks = []
    for index, piece in enumerate(pieces):
        size = len(piece)
        last = 1 if index == len(pieces) - 1 else 0
        blocks += [bytes((last, size & 0xFF, size >> 8, ~size & 0xFF, (~size >> 8) & 0xFF)), piece]
    return blocks


def _spng_strips(header: bytes, idat: list):
    """Yield (first row, pixels) for each strip of _STRIP_ROWS rows of an 8-bit, non-interlaced
    grey, grey+alpha, RGB or RGBA PNG: uint8 (rows, W, channels), the PNG's own channels (grey +
    alpha as RGBA, the grey repeated: libspng has no 8-bit grey + alpha output).

    The IDAT stream is inflated here (ISA-L for poorly compressed data, zlib-ng for long runs, see
    _inflater) in pieces of at most one strip, and each strip is handed to libspng (pyspng) as a
    small PNG of stored deflate blocks, which it only copies and unfilters. A strip's rows may be
    filtered against the row above it (Up, Average, Paeth): the previous strip's last row, already
    unfiltered, goes first in the next strip with filter type None, and is dropped from the output.
    libspng skips CRCs and the Adler-32 (pyspng's SPNG_CRC_USE), so both are checked here, as
    Pillow and libpng would: any damage (a CRC, invalid deflate data, the Adler-32, a bad filter
    type, a stream shorter or longer than the image, data after its end) raises ValueError (or
    pyspng's RuntimeError) before the last strip is yielded, never anything that can crash.
    """
    import pyspng

    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    if depth != 8 or channels is None or interlace != 0 or not idat:
        raise ValueError("not an 8-bit non-interlaced grey/RGB PNG with or without alpha")
    if not _crcs_right(idat):
        raise ValueError("IDAT CRC")
    stride = width * channels + 1  # (a row's filter-type byte, then its pixels)
    strips = _ahead(_inflated_strips(idat, stride, height))
    previous = None  # the last row of the previous strip, unfiltered
    for top in range(0, height, _STRIP_ROWS):
        rows = min(_STRIP_ROWS, height - top)
        pieces = [b"\x00" + previous.tobytes()] if previous is not None else []
        for piece in next(strips):  # stored blocks hold at most 65535 bytes each
            view = memoryview(piece)
            pieces += [view[at : at + 65535] for at in range(0, len(view), 65535)]
        count = rows + (previous is not None)
        body = 2 + sum(len(piece) + 5 for piece in pieces) + 4
        png = b"".join(
            [
                _PNG_SIGNATURE,
                _png_chunk(b"IHDR", width.to_bytes(4, "big") + count.to_bytes(4, "big") + bytes(header[8:13])),
                body.to_bytes(4, "big"),
                b"IDAT\x78\x01",
                *_stored_blocks(pieces),
                bytes(8),  # Adler-32 and CRC: pyspng checks neither (the real ones were checked above)
                _PNG_END,
            ]
        )
        del pieces
        # (libspng has no output format for grey + alpha in 8 bits: as RGBA, grey repeated)
        pixels = pyspng.load(png, "RGBA" if colour == 4 else None)
        if pixels.shape[:2] != (count, width) or pixels.dtype != np.uint8:
            raise ValueError("libspng decoded another shape")
        pixels = pixels.reshape(count, width, -1)
        previous = pixels[-1] if colour != 4 else pixels[-1, :, 2:]  # (grey and alpha of grey, grey, grey, alpha)
        yield top, pixels[count - rows :]


_AHEAD = 4  # strips inflated ahead of the one libspng is unfiltering (~0.8-1 MB each at 4096 px wide)


def _ahead(items):
    """Yield what the iterator `items` yields, computed in a thread of its own up to _AHEAD items
    ahead; an exception it raises is raised here, at its place in the sequence.

    For the PNG strips: ISA-L and zlib-ng release the GIL while they inflate, and so does Pillow
    while it turns a strip grey, so the inflate of the next strips runs on the second core while
    this thread unfilters (libspng) and converts the last. A grainy 4096x4096 RGB page's decode
    (_strips_grey) 81 -> 57 ms, median of 7 in one process, AMD EPYC. When the consumer stops early
    (damage found, an error, the generator closed), the thread is told to stop and ends within
    one strip's inflate.
    """
    results: queue.Queue = queue.Queue(maxsize=_AHEAD)
    stop = threading.Event()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not hand_over((True, item)):
                    return
            hand_over((False, None))
        except BaseException as error:  # handed to the consumer, raised there
            hand_over((False, error))

    worker = threading.Thread(target=work, name="digitsum-inflate", daemon=True)
    worker.start()
    try:
        while True:
            more, item = results.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        worker.join()


def _inflated_strips(idat: list, stride: int, height: int):
    """Yield, for each strip of _STRIP_ROWS rows, a list of bytes objects that together are its
    rows (filter-type byte and pixels, `stride` bytes a row) as inflated from the IDAT chunks'
    zlib stream; ValueError (or the module's zlib error) where the stream is invalid, fails its
    Adler-32, ends before the image or runs past it, or data follows its end (checked before the
    last strip is given)."""
    inflater = _inflater(_poorly_compressed(idat, stride * height)).decompressobj()
    streams = iter([chunk[8:-4] for chunk in idat])
    pending, exhausted = b"", False

    def inflate(limit: int) -> bytes:
        """Up to `limit` more bytes of the stream; b"" only where it ends (or stalls) first. (zlib can
        hold output back after taking all its input - a match longer than the limit - which the
        next call gives, with or without new input.)"""
        nonlocal pending, exhausted
        while True:
            if not pending and not exhausted:
                following = next(streams, None)
                exhausted = following is None
                pending = following if following is not None else b""
                continue
            piece = inflater.decompress(pending, limit)
            stalled = len(inflater.unconsumed_tail) == len(pending)
            pending = inflater.unconsumed_tail
            if piece or inflater.eof or (exhausted and not pending) or stalled:
                return piece

    for top in range(0, height, _STRIP_ROWS):
        pieces, needed = [], min(_STRIP_ROWS, height - top) * stride
        while needed:
            piece = inflate(needed)
            if not piece:
                raise ValueError("the stream ends before the image")
            pieces.append(piece)
            needed -= len(piece)
        if top + _STRIP_ROWS >= height:  # the stream must end here: its Adler-32 checked, nothing after it
            while not inflater.eof:
                if inflate(1):
                    raise ValueError("the stream holds more than the image")
                if not inflater.eof:
                    raise ValueError("truncated stream")
            if pending or inflater.unused_data or any(len(rest) for rest in streams):
                raise ValueError("data after the stream's end")
        yield pieces


def _strips_grey(header: bytes, idat: list, speculate: bool = True) -> tuple[Image.Image, str] | None:
    """An "L" image of an 8-bit, non-interlaced grey, grey+alpha, RGB or RGBA PNG decoded in strips
    (_spng_strips), each turned to grey as Pillow's convert("L") does (the same integer weights,
    so exactly Pillow's grey) and pasted into the result; transparency flattened as _flattened
    does. And the decoders' names. None where pyspng is missing or the data is damaged (the
    caller leaves the file to Pillow, which reads it or says what is wrong).

    Transparency: the background (white under dark ink, black under light ink) depends on every
    visible pixel, but it is the same for all the strips of almost every image, and the visible
    grey's extrema so far decide it (see _composited): while they do (`speculate`), each strip is
    flattened at once, in the CPU caches, onto that background. Should a later strip contradict
    it (or the extrema not decide), the image is decoded again keeping its transparency, to be
    flattened when the whole is known (_composited). Extra memory: the grey result (1 byte a
    pixel), plus a few strips; in that second decode, the transparency (1 more).
    """
    try:
        import pyspng  # noqa: F401  (the strips' decoder)
    except Exception:
        return None
    width, height, colour = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big"), header[9]
    mode = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}.get(colour)
    if mode is None:
        return None
    grey = Image.new("L", (width, height), None)  # (not zero-filled first: every row is pasted)
    transparency = None  # (not speculating) made at the first strip that is not opaque
    layout = "RGBA" if mode == "LA" else mode  # (see _spng_strips)
    strip = None
    greys = (255, 0)  # the (darkest, lightest) grey of the strips with a visible pixel; none yet
    background = None  # (speculating) what the strips so far were flattened onto
    invisible = []  # (speculating) the strips without a visible pixel: (first row, rows)
    try:
        for top, pixels in _spng_strips(header, idat):
            if mode == "L":
                grey.paste(Image.frombuffer("L", (width, pixels.shape[0]), pixels, "raw", "L", 0, 1), (0, top))
                continue
            if strip is None or strip.height != pixels.shape[0]:
                strip = Image.new(layout, (width, pixels.shape[0]), None)
            strip.frombytes(pixels, "raw", layout)  # (into the same image each time: no new zero-filled one)
            if mode == "RGB":
                grey.paste(strip.convert("L"), (0, top))
                continue
            # Each RGBA pixel read as a little-endian 32-bit word is alpha * 2**24 + colour: the
            # words' extrema are the alphas' (numpy's, several times faster than getextrema).
            words = pixels.view("<u4")
            visible, opaque = words.max() >= 0x01000000, words.min() >= 0xFF000000
            colour = None  # a drawing app's canvas: one colour in every pixel of a strip, only alpha varies
            if speculate and not opaque:
                colours = words & 0x00FFFFFF
                colour = int(colours.min()) if colours.min() == colours.max() else None
            if colour is not None:  # its grey as Pillow's convert("L") computes it (a 1-pixel conversion)
                shade = (
                    Image.new("RGB", (1, 1), (colour & 0xFF, (colour >> 8) & 0xFF, colour >> 16)).convert("L").getpixel((0, 0))
                )
                strip_grey, darkest, lightest = None, shade, shade
            else:
                strip_grey = strip.convert("L") if mode == "RGBA" else strip.getchannel(0)
                values = np.asarray(strip_grey)
                darkest, lightest = int(values.min()), int(values.max())
            if visible:  # the grey's extrema where something is visible (see _composited)
                if (
                    colour is None
                    and not opaque
                    and _decided_background((min(darkest, greys[0]), max(lightest, greys[1]))) is None
                ):
                    # only the visible pixels count (light ink on a canvas that is black under alpha 0)
                    shown = (words >= 0x01000000).reshape(values.shape)
                    darkest, lightest = int(np.where(shown, values, 255).min()), int(np.multiply(values, shown).max())
                greys = (min(darkest, greys[0]), max(lightest, greys[1]))
            elif speculate:  # nothing visible: all background, whichever it turns out to be
                invisible.append((top, pixels.shape[0]))
                continue
            if speculate and (background is not None or not opaque):
                decided = _decided_background(greys)
                background = decided if background is None else background
                if decided is None or decided != background:
                    return _strips_grey(header, idat, speculate=False)
                if colour is not None:  # one shade: flattening it is a table on alpha
                    table = [(shade * alpha + background * (255 - alpha) + 127) // 255 for alpha in range(256)]
                    strip_grey = strip.getchannel("A").point(table)
                elif not opaque:
                    strip_grey.paste(background, mask=ImageChops.invert(strip.getchannel("A")))
            elif not opaque:
                if transparency is None:  # (0 = opaque: the strips never pasted into it)
                    transparency = Image.new("L", (width, height), 0)
                transparency.paste(ImageChops.invert(strip.getchannel("A")), (0, top))
            grey.paste(strip_grey, (0, top))
    except Exception:  # damage (see _spng_strips), or libspng refusing a strip
        return None
    channels = {"L": 1, "RGB": 3, "LA": 2, "RGBA": 4}[mode]
    inflater = _inflater(_poorly_compressed(idat, height * (width * channels + 1)))
    decoder = {"isal.isal_zlib": "ISA-L", "zlib_ng.zlib_ng": "zlib-ng"}.get(inflater.__name__, "zlib") + " + libspng"
    if transparency is not None:
        grey = _composited(grey, transparency, greys)
    for top, rows in invisible:
        grey.paste(255 if background is None else background, (0, top, width, top + rows))
    return grey, decoder


def _composited(grey: Image.Image, transparency: Image.Image, greys: tuple) -> Image.Image:
    """`grey` with its transparency (255 - alpha) flattened, in place, onto the background
    grayscale() would choose (white under dark ink, black under light ink, by the alpha-weighted
    mean of the visible pixels): round((grey * alpha + background * (255 - alpha)) / 255), the
    same integers as _flattened, by one paste of the background through the transparency as mask
    (Pillow rounds exactly so). `greys`: the darkest and lightest grey of (at least) every
    visible pixel, (255, 0) where none is. The mean needs no pass over the pixels where these
    decide it (_decided_background); else it is summed in strips (float32 products, exact to
    ~1e-6 of the mean)."""
    background = _decided_background(greys)
    if background is None:
        width, height = grey.size
        weighted = visible = 0.0
        for top in range(0, height, _STRIP_ROWS):
            box = (0, top, width, min(height, top + _STRIP_ROWS))
            alpha = 255.0 - np.asarray(transparency.crop(box), np.float32).ravel()
            weighted += float(np.dot(np.asarray(grey.crop(box), np.float32).ravel(), alpha))
            visible += float(alpha.sum(dtype=np.float64))
        background = 255 if visible == 0 or weighted / (255 * visible) < 0.5 else 0
    grey.paste(background, mask=transparency)
    return grey


def _decided_background(greys: tuple) -> int | None:
    """The background _flattened chooses, where the (darkest, lightest) grey of the visible pixels
    decide it: white where nothing is visible or all of it is below mid-grey (its alpha-weighted
    mean then is), black where all of it is above; None where only the mean can tell."""
    darkest, lightest = greys
    if darkest > lightest or lightest < 128:
        return 255
    return 0 if darkest >= 128 else None


def _flattened(pairs: np.ndarray) -> np.ndarray:
    """uint8 grey from (H, W, 2) uint8 (grey, alpha) pairs, composited onto the background
    grayscale() would choose (white under dark ink, black under light ink: by the alpha-weighted
    mean of the visible pixels), in strips of rows so that no full-size wider copy is made.
    Compositing commutes with the box average that follows (both linear), so this equals
    grayscale() of the reduced image to a grey level."""
    # Each pair read as a little-endian 16-bit word is grey + 256 * alpha: contiguous, where the
    # channels are strided (1.8x faster than uint32 channel copies for a 4096x4096 canvas). Opaque
    # after all (a canvas export saved as RGBA) when every word is >= 0xFF00.
    words = pairs.view("<u2")[..., 0]
    if words.min() >= 0xFF00:
        return pairs[..., 0]
    height, rows = words.shape[0], 64  # (strips of 0.5 MB: their temporaries add ~2 MB, not ~8)
    visible = weighted = 0
    for top in range(0, height, rows):
        alpha = words[top : top + rows] >> 8
        product = words[top : top + rows] & 0xFF
        product *= alpha  # <= 255 * 255: fits 16 bits
        weighted += int(product.sum(dtype=np.uint64))
        visible += int(alpha.sum(dtype=np.uint64))
    background = 255 if visible == 0 or weighted / (255 * visible) < 0.5 else 0
    flat = np.empty(words.shape, np.uint8)
    for top in range(0, height, rows):
        alpha = words[top : top + rows] >> 8
        value = words[top : top + rows] & 0xFF
        value *= alpha
        if background:
            np.subtract(255, alpha, out=alpha)
            alpha *= 255
            value += alpha
        value += 127  # (grey * alpha + background * (255 - alpha) + 127) // 255, at most 65152:
        value += (value >> 8) + 1  # x // 255 = (x + 1 + (x >> 8)) >> 8 for x < 65535, no division
        value >>= 8
        flat[top : top + rows] = value
    return flat


def _orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag (1 = upright when absent or unreadable)."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: show the pixels as stored, like most viewers
        return 1
    return value if value in _ORIENTATION else 1


# ----------------------------------------------------------------------------- pixels


def _workable(image: Image.Image) -> Image.Image:
    """The image in a mode that Image.reduce and the grey conversion handle, without losing depth."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA", "I", "F"):
        return image
    if mode in ("1",):
        return image.convert("L")
    if mode == "P" and "transparency" not in image.info:
        return _palette_grey(image)
    if mode in ("P", "PA"):
        return image.convert("LA" if mode == "PA" or "transparency" in image.info else "L")
    if mode in ("RGBa", "RGBX"):
        return image.convert("RGBA" if mode == "RGBa" else "RGB")
    if mode == "La":
        return image.convert("LA")
    if mode in ("YCbCr", "LAB"):
        return image.getchannel(0)  # Y (luma) and L* (lightness) are the grey already
    if mode.startswith("I;16") or mode.startswith("I;32") or mode == "I;8":
        # 16-bit scans: as 32-bit integers (Pillow's convert("L") would clip them at 255)
        return Image.fromarray(np.asarray(image).astype(np.int32), mode="I")
    if mode in ("CMYK", "HSV"):
        return image.convert("RGB")
    try:
        return image.convert("RGBA")
    except Exception as error:
        raise ImageError(f"pixels of mode {mode} cannot be converted ({_reason(error)})") from None


def _palette_grey(image: Image.Image) -> Image.Image:
    """An opaque palette image ("P") as grey, exactly Pillow's convert("L"): the grey of each of the
    256 palette entries (Pillow's own conversion of a 256x1 image of them, with the same palette),
    then looked up for every pixel (cv2.LUT; numpy where OpenCV is missing). A 4096x4096 GIF:
    16.5 -> 6-10 ms (AMD EPYC; Pillow computes the grey of a palette entry again at every pixel).
    """
    table = image.crop((0, 0, 1, 1)).resize((256, 1))  # (a copy of the palette, whatever its mode)
    table.putdata(range(256))
    greys = np.asarray(table.convert("L")).reshape(256)
    indices = np.asarray(image)
    return Image.fromarray(_cv2.LUT(indices, greys) if _cv2 is not None else greys[indices], mode="L")


def _reduced(image: Image.Image, side: int) -> Image.Image:
    """Box-average `image` by an integer factor so that its longer side is at most about `side`, in
    a mode _workable gives.

    Colour and transparency are reduced in strips of rows, each turned into luminance (and alpha)
    at once: Pillow holds RGB, RGBA and LA as 4 bytes a pixel and reduces RGBA through a
    premultiplied copy, so a whole-image conversion of a 4096x4096 picture would cost another
    16-64 MB on top of the decoded pixels.
    """
    factor = max(image.size) // side
    if factor < 2:
        return _workable(image)
    width, height = image.size
    rows = factor * 64  # strips of rows (64 reduced rows each)
    deep = image.mode.startswith(("I;16", "I;32")) or image.mode == "I;8"
    if deep or (image.mode == "P" and "transparency" not in image.info):
        # Converted (_workable) strip by strip: the whole 4096x4096 16-bit scan as 32-bit integers at
        # once cost +160 MB (its array, the int32 copy, the image of it); a GIF's grey (_palette_grey)
        # +32 MB over the decoded indices (their copy, the greys).
        reduced = Image.new("I" if deep else "L", ((width + factor - 1) // factor, (height + factor - 1) // factor))
        for top in range(0, height, rows):
            reduced.paste(_workable(image.crop((0, top, width, min(height, top + rows)))).reduce(factor), (0, top // factor))
        return reduced
    image = _workable(image)
    if image.mode not in ("RGB", "RGBA", "LA"):
        return image.reduce(factor)
    alpha = image.mode in ("RGBA", "LA")
    luminance = Image.new("L", ((width + factor - 1) // factor, (height + factor - 1) // factor))
    opacity = Image.new("L", luminance.size) if alpha else None
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        grey = strip.convert("L")
        if alpha:  # average colour weighted by opacity (premultiplied), as Pillow's own reduce does
            strip_alpha = strip.getchannel("A")
            grey = ImageChops.multiply(grey, strip_alpha)
            opacity.paste(strip_alpha.reduce(factor), (0, top // factor))
        luminance.paste(grey.reduce(factor), (0, top // factor))
    if not alpha:
        return luminance
    weights = np.asarray(opacity, np.float32)
    unpremultiplied = np.asarray(luminance, np.float32) * 255.0 / np.maximum(weights, 1.0)
    luminance = Image.fromarray(np.clip(np.round(unpremultiplied), 0, 255).astype(np.uint8))
    return Image.merge("LA", [luminance, opacity])


def _to_unit(values: np.ndarray, mode: str) -> np.ndarray:
    """float32 in [0, 1] from integer or float pixels of any range; NaN/inf made harmless."""
    values = values.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            return np.zeros(values.shape, np.float32)
        low, high = float(values[finite].min()), float(values[finite].max())
        values = np.nan_to_num(values, nan=float(np.median(values[finite])), posinf=high, neginf=low)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0 and mode == "F":
        return values  # float images in [0, 1]
    if low >= 0.0 and high <= 255.0:
        return values / 255.0
    if low >= 0.0 and high <= 65535.0:
        return values / 65535.0
    return (values - low) / (high - low) if high > low else np.zeros(values.shape, np.float32)


def grayscale(image: Image.Image) -> np.ndarray:
    """float32 (H, W) in [0, 1]: transparency flattened, colour to luminance, any bit depth."""
    image = _workable(image)
    if image.mode in ("I", "F"):
        return _to_unit(np.asarray(image), image.mode)
    has_alpha = image.mode in ("RGBA", "LA")
    if has_alpha and image.getchannel("A").getextrema()[0] == 255:  # opaque after all (e.g. a canvas export)
        has_alpha = False
    luminance = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if not has_alpha:
        return luminance
    alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
    # Put the drawing on a background that contrasts with it: dark strokes on a transparent
    # canvas go onto white, light strokes onto black. Alpha-weighted mean of what is visible.
    visible = alpha.sum()
    ink_is_dark = visible == 0 or float((luminance * alpha).sum() / visible) < 0.5
    background = 1.0 if ink_is_dark else 0.0
    return luminance * alpha + background * (1.0 - alpha)


def upright_grey(image: Image.Image, orientation: int = 1, side: int = WORK_SIDE) -> np.ndarray:
    """The decoded image reduced by an integer factor to under 2 x `side` px, turned upright as
    EXIF `orientation` says, as grey (H, W) in [0, 1]."""
    try:
        small = _reduced(image, side)
        if orientation != 1:
            small = small.transpose(_ORIENTATION[orientation])
        return grayscale(small)
    except ImageError:
        raise
    except (ValueError, OSError, TypeError, MemoryError) as error:  # exotic modes Pillow cannot handle
        raise ImageError(f"its pixels cannot be used ({_reason(error)})") from None


# ----------------------------------------------------------------------------- finding the ink


def ink_map(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """float32 (H, W) in [0, 1]: ink bright on black, lighting removed, only the digit kept.

    Raises ImageError for an image without ink (every pixel within MIN_CONTRAST of the paper).
    """
    if min(gray.shape) < SMALL_SIDE or _clean_canvas(gray):
        return _cropped_digit_ink(gray, name)
    canvas = _screen_canvas(gray)
    if canvas is not None:  # a screenshot: the drawing app's canvas alone, without its bars and buttons
        ink = np.zeros_like(gray)
        ink[canvas] = _cropped_digit_ink(gray[canvas], name)
        return ink
    ink = flat_field(gray, name)
    return ink * digit_mask(ink, _lit(gray, ink))


def _lit(gray: np.ndarray, ink: np.ndarray) -> np.ndarray | None:
    """Where glare or a flash lit the paper beyond the rest of the page: paper (no ink) whose 3x3
    mean is at least GLARE_LIFT above the median pixel - most of a page is paper - and near white
    (0.9), over at most GLARE_SHARE of the image (a spot, not a sheet on a desk nor the bright side
    of a gradient), grown by 5% of the image over the strokes it holds. A stroke there is visible
    but faint: the light is added to it and the paper clipped (an independent generator's glare
    centred on the digit: 78.3% right before, the faded part dropped as a separate piece or as no
    stroke at all). None where there is no such spot (a light digit is ink, not lit paper)."""
    level = max(0.9, float(np.median(gray[::4, ::4])) + GLARE_LIFT)  # (every 16th pixel: 0.1 vs 1.8 ms)
    if not (gray >= level).any():  # (a 3x3 mean reaches the level only where a pixel does)
        return None
    smooth = ndimage.uniform_filter(gray, 3, mode="nearest")
    bright = (smooth >= level) & (ink < GLARE_INK)
    if not bright.any() or bright.mean() > GLARE_SHARE:
        return None
    return _dilate(bright, max(2, min(gray.shape) // 20))


def _screen_canvas(gray: np.ndarray) -> tuple[slice, slice] | None:
    """Where a screenshot of a drawing app has its canvas: (rows, columns), or None for anything else.

    A canvas is one exact grey level (no sensor noise, no JPEG) over at least 40% of the image; its
    largest 4-connected region's bounding box, where that box runs the image's whole width or
    height (the app's bars above and below, or its tool strips at the sides, lie outside it) and
    every pixel of the box's border is the canvas's level (so the digit lies wholly inside, and a
    photo's clipped white, which the digit runs out of, is no canvas). Inside it, the clean
    canvas's reading (_cropped_digit_ink); outside, nothing. Before, a phone's screenshot (status
    bar, title bar, a row of colour dots and a "Clear" button) was read with its bars: the title,
    a dot or the button taken for the digit, or the white canvas for light ink (an independent
    generator's screenshots: 85.5% right, 200 renders)."""
    if min(gray.shape) < SMALL_SIDE:
        return None
    quantised = np.round(gray * 1023).astype(np.int32).ravel()  # (a level's pixels fall in one bin)
    counts = np.bincount(quantised, minlength=1024)
    mode = int(counts.argmax())
    if counts[mode] < 0.4 * gray.size:
        return None
    level = gray.ravel()[int(np.argmax(quantised == mode))]
    region = gray == level
    if region.mean() < 0.4:
        return None
    # The box found below runs the image's whole width (or height) with its border all at the
    # level, so one whole row (or column) is the level: without one, no labelling (a grainy photo's
    # one-level specks took 10-20 ms to label at 1024 px).
    if not (region.all(axis=1).any() or region.all(axis=0).any()):
        return None
    labels, count = ndimage.label(region)
    if count == 0:
        return None
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    # Its box from the rows and columns it occupies: ndimage.find_objects took 120 ms here for a
    # grainy 4096x4096 JPEG (tens of thousands of one-level specks labelled), this 2-3 ms.
    canvas = labels == largest
    occupied_rows, occupied_columns = np.flatnonzero(canvas.any(axis=1)), np.flatnonzero(canvas.any(axis=0))
    rows = slice(int(occupied_rows[0]), int(occupied_rows[-1]) + 1)
    columns = slice(int(occupied_columns[0]), int(occupied_columns[-1]) + 1)
    height, width = gray.shape
    full_width = columns.start == 0 and columns.stop == width
    full_height = rows.start == 0 and rows.stop == height
    if full_width == full_height or min(rows.stop - rows.start, columns.stop - columns.start) < SMALL_SIDE:
        return None  # (the whole image: not a screenshot's canvas, or _clean_canvas's case)
    box = gray[rows, columns]
    if not _clean_canvas(box):
        return None
    return rows, columns


def _clean_canvas(gray: np.ndarray) -> bool:
    """A drawing app's canvas (the web page's PNG): every border pixel the same exact value and at
    least half the image that value. Nothing there to flatten or filter, so the cheap global path
    reads it (about 1/10 of the photo path's time: what keeps `digitsum serve` fast for the page)."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return bool((border == border[0]).all() and (gray == border[0]).mean() >= 0.5)


def _cropped_digit_ink(gray: np.ndarray, name: str) -> np.ndarray:
    """Ink of an image too small to hold paper, light and a digit apart (MNIST itself, an icon):
    it is taken as a cropped digit on a uniform ground: the median pixel. Polarity: the side on which
    the image reaches further from that ground (a black digit on a mid-grey canvas, #777777, and a
    white one on #aaaaaa were "blank" when the median's side of 0.5 decided it); contrast stretched,
    faint pixels kept only next to real ink. (This is what makes a 28x28 MNIST image come back as it
    was - to one grey level where its brightest pixel is below 255.)"""
    background = float(np.median(gray))
    if background - float(gray.min()) > float(gray.max()) - background:  # dark ink
        ink, background = 1.0 - gray, 1.0 - background
    else:
        ink = gray
    contrast = float(ink.max()) - background
    if contrast < MIN_CONTRAST:
        raise ImageError(
            f"{name}: is blank (no ink: every pixel is within {100 * MIN_CONTRAST:.0f}% of the "
            "background); draw or photograph a digit"
        )
    ink = np.clip((ink - background) / contrast, 0.0, 1.0)
    ink = np.where(_dilate(ink >= NOISE_FLOOR, 1), ink, 0.0).astype(np.float32)
    return _without_marks(ink) if min(gray.shape) >= SMALL_SIDE else ink


def _without_marks(ink: np.ndarray) -> np.ndarray:
    """`ink` without a circle or box drawn around the digit (_rings) or a line drawn under it
    (_underlines): the one clean-up a clean canvas gets (a photo's digit_mask does the same)."""
    strong = ink >= STRONG_INK
    labels, count, mass, boxes = _components(strong, ink)
    if count == 0:
        return ink
    touched = _touched_ring(labels, boxes, mass)
    if touched is not None:
        ink = np.where(_dilate(touched, 1) & ~_dilate(strong & ~touched, 1), 0.0, ink).astype(np.float32)
        labels, count, mass, boxes = _components(ink >= STRONG_INK, ink)
    if count < 2:
        return ink
    keep = ~_rings(labels, boxes, mass, np.ones(count, bool))
    keep &= ~_underlines(boxes, mass, keep)
    if keep.all():
        return ink
    marks = np.isin(labels, np.flatnonzero(~keep) + 1)
    digit = np.isin(labels, np.flatnonzero(keep) + 1)
    return np.where(_dilate(marks, 2) & ~_dilate(digit, 2), 0.0, ink).astype(np.float32)


def flat_field(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """Ink strength in [0, 1] relative to the local paper brightness (1 = the strongest ink).

    Polarity: see _ink_is_dark. The paper's brightness is estimated per pixel by a grey-scale
    closing (the black top-hat method of document imaging) whose window is about three stroke
    widths: it removes the strokes and keeps everything wider - lighting gradients, shadows, a
    shadow's sharp edge. The stroke width is measured on the digit (digit_mask) that a first pass
    with a window of a third of the image finds. For dark ink, ink = 1 - pixel / paper (background
    division, the flat-field model observed = light x reflectance); for light ink on a dark ground
    (a chalkboard, a canvas export), ink = pixel - ground (subtraction: the ground is not lit paper).
    A sheet of paper photographed on a darker desk (_page) is read alone: the desk is painted over
    with the sheet's paper level first, so the sheet's edges are no strokes and the desk no paper.
    """
    page = _page(gray)
    if page is None:
        return _flat_field(gray, name)
    mask, paper, band = page
    try:
        ink = _flat_field(np.where(mask, gray, np.float32(paper)).astype(gray.dtype), name)
    except ImageError:
        ink = None
    # The sheet's outline is a guess. A reading whose digit lies mostly within a thumbnail cell of
    # the outline is no digit on a sheet (slivers of an edge: the bright region was the strokes of
    # a light digit on a dark ground); then, or with no digit at all, the whole image is read.
    # Where the digit runs up to the outline, the whole image is read too: if the digit found
    # there goes on beyond the sheet's edge band (a patch of light taken for a sheet cuts it),
    # that is the digit.
    if ink is not None:
        digit = digit_mask(ink) & (ink >= STRONG_INK)
        inner = _erode(mask, band // 3)  # one thumbnail cell (three were too many: a digit near a note's edge)
        if digit.any() and (digit & inner).sum() >= 0.5 * digit.sum():
            edge = mask & ~_erode(mask, 2)
            if not digit[edge].any():
                return ink
            whole = _flat_field(gray, name)
            found = digit_mask(whole) & (whole >= STRONG_INK)
            if found.mean() > 0.25:  # no digit: a dark desk's grain read against itself
                return ink
            beyond = found & ~_dilate(mask, band)
            return whole if beyond.sum() > 0.1 * max(1, int(found[mask].sum())) else ink
    return _flat_field(gray, name)


def _flat_field(gray: np.ndarray, name: str) -> np.ndarray:
    """flat_field's reading of `gray` as it is (no sheet looked for)."""
    height, width = gray.shape
    smooth = ndimage.uniform_filter(gray, 3, mode="nearest") if min(height, width) >= 3 else gray
    window = max(3, min(height, width) // 3)
    dark_ink = _ink_is_dark(gray, smooth)
    # The first pass only measures the stroke width: at half resolution where the image is large
    # enough (a quarter of the work).
    scale = 2 if min(height, width) >= 4 * SMALL_SIDE else 1
    coarse = _halved(gray) if scale == 2 else gray
    coarse_smooth = _halved(smooth) if scale == 2 else smooth
    ink, background = _ink_against_background(coarse, coarse_smooth, max(3, window // scale), dark_ink)
    level = _strong_level(ink)
    if level < MIN_CONTRAST:
        raise ImageError(f"{name}: is blank (no ink stands out from the background); draw or photograph a digit")
    strokes = digit_mask(np.clip(ink / level, 0.0, 1.0)) & (ink >= STRONG_INK * level)
    width = _stroke_width(strokes)
    if width > 4:
        width = _pen_width(strokes, ink >= SHADOW_HIGH * level, width)
    narrower = min(window, max(7, round(3 * scale * width) + 3))
    if narrower < window or scale == 2:
        ink, background = _ink_against_background(gray, smooth, narrower, dark_ink)
        level = _strong_level(ink)
    if level < MIN_CONTRAST:
        raise ImageError(f"{name}: is blank (no ink stands out from the background); draw or photograph a digit")
    if dark_ink:
        ink, background = _shadow_bands(gray, ink, background, level, scale * width)
    return np.clip(_filled_blobs(gray, ink, background, level, dark_ink) / level, 0.0, 1.0).astype(np.float32)


SHADOW_HIGH = 0.7  # the pen's own ink is at least this share of the strongest; a cast shadow is fainter
SHADOW_LOW = 0.15  # ... and darker than this share of it (fainter is paper grain, a soft edge)
SHADOW_FLAT = 0.08  # a shadow's plateau: within this share of the pen's strength of its median ...
SHADOW_PLATEAU = 0.55  # ... for at least this share of it


def _shadow_bands(gray, ink, background, level: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """(ink, background) with the hard-edged cast shadows that the closing took for ink put back
    into the background: a shadow band (a pen's, a phone's, a hand's edge) too narrow for the
    closing's window (about three stroke widths; a square one, so a diagonal band of 4 stroke widths
    is "narrow") is a plateau at SHADOW_LOW..SHADOW_HIGH of the pen's strength - wider than any
    stroke (more than 0.6 stroke widths from anything else, counting strokes that cross it as
    part of it) and coming in from the image's edge (it, or ink joined to it, lies within
    max(2 x that radius, 5%) of the edge: the edge-padded closing already took a band's part along
    the edge). Such a band is the paper in shadow: the background is multiplied there by its
    own relative level, spread (a box mean) over the strokes it holds, so that a stroke in the
    shadow is read against the shaded paper. A light pen's digit is not such a plateau (its own
    strokes set the pen's strength) and a pencil's grain is thinner than the radius. An independent
    generator's hard shadows (bands and polygons from the edge, 40-60% dark; 200 renders): 82.0% ->
    98.0% with _pen_width."""
    mid = (ink >= SHADOW_LOW * level) & (ink < SHADOW_HIGH * level)
    radius = max(3, int(round(0.6 * width)))
    pen = ink >= SHADOW_HIGH * level
    # (a stroke crossing a band is no edge of it; the image's edge is one: a stroke cut by it is no wider)
    # ... and its middle lies clear of the pen: a bold stroke's grey rim is no band, however wide the two together)
    core = (_distance(np.pad(mid | pen, 1))[1:-1, 1:-1] > radius) & mid
    if core.any():
        core &= _distance(~pen) > max(3, radius // 2)
    if not core.any():
        return ink, background
    bands = _dilate(core, 2 * radius + 1) & mid
    labels = ndimage.label(bands | pen)[0]  # (a stroke crossing a band joins its two parts)
    bands &= np.isin(labels, _edge_labels(labels, max(2 * radius, min(ink.shape) // 20)))
    if not bands.any():
        return ink, background
    # A shadow lies on the paper: most of what borders it is paper, where it crosses the digit
    # aside. A faint part of the digit itself (a marker's stroke thinned by the pen running dry,
    # the grey of a stroke at the image's edge) is bordered by its strokes.
    pieces, count = ndimage.label(bands)
    grown = ndimage.maximum_filter(pieces, size=5, mode="constant")
    ring = (grown > 0) & (pieces == 0)
    index = np.arange(1, count + 1)
    paper = ndimage.sum(ring & (ink < SHADOW_LOW * level), grown, index) / np.maximum(ndimage.sum(ring, grown, index), 1)
    # And a shadow is a plateau: most of it lies within SHADOW_FLAT of its median. The grey rim
    # of a blurred stroke (an MNIST digit drawn large, touching the edge) runs evenly from paper to
    # pen instead: at most 47% of it there (10,000 drawn-style renders), where a cast shadow is at
    # least 59% (232 hard shadow bands and polygons, 0.3-2 px soft).
    relative = (ink / level).astype(np.float32)
    middle = np.zeros(count + 1, np.float32)
    middle[1:] = ndimage.median(relative, pieces, index)
    flat = ndimage.mean(np.abs(relative - middle[pieces]) < SHADOW_FLAT, pieces, index)
    bands &= np.isin(pieces, index[(paper >= 0.5) & (flat >= SHADOW_PLATEAU)])
    if not bands.any():
        return ink, background
    relative = np.clip(1.0 - ink, 0.0, 1.0).astype(np.float32)
    size = 2 * radius + 1
    weight = ndimage.uniform_filter(bands.astype(np.float32), size, mode="nearest")
    shade = ndimage.uniform_filter(np.where(bands, relative, 0.0).astype(np.float32), size, mode="nearest")
    near = _dilate(bands, radius) & (weight > 0.01)
    shade = np.clip(np.where(near, shade / np.maximum(weight, 1e-6), 1.0), 0.2, 1.0)
    shade[bands] = relative[bands]
    background = background * shade
    return 1.0 - gray / np.maximum(background, 0.05), background


def _pen_width(strokes: np.ndarray, pen: np.ndarray, width: float) -> float:
    """The stroke width to size the closing by: `width` (that of `strokes`), or, where a cast shadow
    narrower than the first window was read as ink and joined to the digit (a wide plateau at about
    half the pen's strength), the width of the pen's own ink (`pen`: at least SHADOW_HIGH of the
    strongest). Then the strokes looked as wide as the shadow, the second window was as wide, and
    the shadow stayed "ink" (an independent generator's hard shadows: 82% right).

    Only where the pen's ink is a fair share of the strokes (not a grey digit in a screenshot beside
    black buttons) and the fainter part is wide (not a pencil's grainy edges): 1.25 x the pen's own
    width (its core is narrower than its antialiased edges)."""
    pen = strokes & pen
    if pen.sum() < 0.03 * strokes.sum():
        return width
    core = _stroke_width(pen)
    if core >= 0.5 * width or _stroke_width(strokes & ~pen) < 2 * core:
        return width
    return 1.25 * core


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 1] (256 bins): the level that best splits them into two classes.
    (Written out: OpenCV, which has it, is optional here, and scikit-image is no dependency.)"""
    counts, edges = np.histogram(values, 256, (0.0, 1.0))
    weight = np.cumsum(counts) / values.size
    mean = np.cumsum(counts * (edges[:-1] + edges[1:]) / 2) / values.size
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean[-1] * weight - mean) ** 2 / (weight * (1.0 - weight))
    return float(edges[int(np.argmax(np.nan_to_num(between[:-1]))) + 1])


def _page(gray: np.ndarray) -> tuple[np.ndarray, float, int] | None:
    """(mask, paper level, edge band px) of a sheet of paper (or a note) photographed on a darker
    surface, or None.

    On a ~64 px thumbnail, min-pooled (a cell is bright only where all of it is: the region stays
    on the sheet), Otsu's threshold splits the image in two. The largest bright region, its holes
    (the strokes) filled, is a sheet when it is 2-90% of the image; bright over at least 75% of
    its convex hull (a sheet, however turned, with a digit on it; a light digit's strokes on a dark
    ground are about 60%), or over at least half of it with holes of another level than the rest
    (ink, where a light digit's loops are of its ground) or of a hull that is nearly a
    quadrilateral (QUAD_SHEET: a bold digit notches it); no side of the image more than half
    bright (the desk lies all round it; around a bold digit cropped tightly, whose loops are bright
    regions too, the border is mostly paper) - one side may be, where its convex hull is nearly a
    quadrilateral (QUAD_SHEET: a screenshot's canvas, a sheet off the frame); its hull at least
    QUAD_SHARE a quadrilateral (_convex); at least 0.1 brighter than the rest; and its edge
    sharp (the brightness drops by at least 60% of that difference within 2 thumbnail pixels: not
    a vignette's slow falloff). The mask is its convex hull at full size, shrunk by half a cell and
    3 px (off the sheet's own blurred edge); the paper level is the median just inside it; the
    sheet's edge lies within the band (3 thumbnail pixels) outside the mask.
    """
    blocks, factor = _blocks(gray, 64)
    if min(blocks.shape[0], blocks.shape[2]) < 8:
        return None
    thumb = blocks.min(axis=(1, 3))
    bright = thumb > _otsu(thumb)
    labels, count = ndimage.label(bright)
    if not count:
        return None
    region = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    page = ndimage.binary_fill_holes(region)
    hull, quadrilateral = _convex(page)
    sides = [bright[0].mean(), bright[-1].mean(), bright[:, 0].mean(), bright[:, -1].mean()]
    # (One side mostly bright is allowed to a square outline: a drawing app's canvas in a
    # screenshot runs up to the window's edge where its toolbars are on the other sides.)
    mostly_bright = sum(side > 0.5 for side in sides)
    if mostly_bright > (1 if quadrilateral >= QUAD_SHEET else 0):
        return None
    if not 0.02 <= page.mean() <= 0.9 or region.sum() < 0.5 * hull.sum() or quadrilateral < QUAD_SHARE:
        return None
    paper, desk = float(np.median(thumb[page])), float(np.median(thumb[~page]))
    holes = page & ~region  # a sheet's: its ink; a light digit's on a dark ground: its loops, of that ground
    if (
        region.sum() < 0.75 * hull.sum()
        and quadrilateral < QUAD_SHEET
        and (not holes.any() or abs(float(np.median(thumb[holes])) - desk) < 0.08)
    ):
        return None
    inner = page & ~ndimage.binary_erosion(page, iterations=2)
    outer = ndimage.binary_dilation(page, iterations=2) & ~page
    if paper - desk < 0.1 or float(np.median(thumb[inner]) - np.median(thumb[outer])) < 0.6 * (paper - desk):
        return None
    full = np.repeat(np.repeat(hull, factor, axis=0), factor, axis=1)
    full = np.pad(full, ((0, gray.shape[0] - full.shape[0]), (0, gray.shape[1] - full.shape[1])), mode="edge")
    # (Shrunk from the desk only: where the sheet runs off the image, its edge is not in the picture.)
    mask = _erode(full, factor // 2 + 3)  # half a cell (the hull's cells reach past it) and 3 px of blurred edge
    if not mask.any():
        return None
    ring = mask & ~_erode(mask, factor)
    return mask, float(np.median(gray[ring if ring.any() else mask])), 3 * factor


def _convex(region: np.ndarray) -> tuple[np.ndarray, float]:
    """(the cells of `region`'s grid whose centres lie in the convex hull of its cells, the share
    of that hull's area the largest quadrilateral on its corners covers). A sheet is convex: a
    digit written up to its edge leaves a notch in the bright region, not in the sheet. And a
    sheet is a quadrilateral however it is turned or seen in perspective (0.84-1.0 measured over
    sheets and notes on desks, the digit and the light notching the bright region), where the
    curved outline of a bold light digit on a dark ground is not (0.67-0.90, median 0.79)."""
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(region)
    corners = np.concatenate([np.stack([ys + dy, xs + dx], axis=1) for dy in (0, 1) for dx in (0, 1)]).astype(float)
    try:
        outline = ConvexHull(corners)
    except QhullError:
        return region, 1.0
    # Inside the hull: on the inner side of every edge's line (qhull's equations: normal . p + offset
    # <= 0), with Delaunay.find_simplex's tolerance. (Not find_simplex itself, which answered the
    # same: its barycentric transforms go through LAPACK, whose OpenBLAS threads then spin for ~0.1 s
    # on the other core - the next image's read-ahead inflate lost it: 56 -> 83 ms, see _ahead.)
    rows, cols = np.indices(region.shape) + 0.5
    normals = outline.equations
    inside = np.ones(region.shape, bool)
    for normal_y, normal_x, offset in normals:
        inside &= normal_y * rows + normal_x * cols + offset <= 1e-9
    inside |= region
    return inside, _largest_quadrilateral(corners[outline.vertices]) / outline.volume  # (a 2-D hull's volume: its area)


def _largest_quadrilateral(vertices: np.ndarray) -> float:
    """The area of the largest quadrilateral whose corners are among a convex polygon's `vertices`
    (in order): for each diagonal (i, k), the farthest vertex on either side of it (n^3 triangles)."""
    edges = vertices[None, :, :] - vertices[:, None, :]  # edges[i, j] = v[j] - v[i]
    # triangles[i, j, k]: twice the area of (v[i], v[j], v[k])
    triangles = np.abs(edges[:, :, None, 0] * edges[:, None, :, 1] - edges[:, :, None, 1] * edges[:, None, :, 0])
    index = np.arange(len(vertices))
    between = (index[None, :, None] > index[:, None, None]) & (index[None, :, None] < index[None, None, :])
    inside = np.where(between, triangles, 0.0).max(axis=1)  # (i, k): the farthest vertex between i and k
    outside = np.where(between, 0.0, triangles).max(axis=1)  # ... and on the other side
    return float((inside + outside)[index[:, None] < index[None, :]].max(initial=0.0)) / 2


def _filled_blobs(gray: np.ndarray, ink: np.ndarray, background: np.ndarray, level: float, dark_ink: bool) -> np.ndarray:
    """`ink` with the insides of ink blobs wider than the closing window put back.

    A bold marker fills a digit's loops: the strokes merge into a blob, and where that blob is
    wider than the closing window the closing returns the blob's own grey as the "paper" there, so
    the digit comes out as a hollow outline. Real paper, lit unevenly or in shadow, stays much
    brighter than ink; a background estimate as dark as the strokes is no paper. Where the
    estimate, measured against the paper just outside the ink, is at least 3/4 as dark as the
    strokes' median, in a region that touches the strokes and not the image's edge (a shadow comes
    in from an edge), the pixels are read against that outside paper instead.
    """
    strong = ink >= STRONG_INK * level
    pens = gray[ink >= 0.8 * level]  # the pen's own ink, not its fainter edges
    if not pens.size:
        return ink
    pen = float(np.median(pens))
    # The test below, against the brightest (dark ink) or darkest background estimate instead of the
    # paper near the ink, can only find more: nowhere pen-dark there means nowhere at all (the
    # usual photo: a cheap exit, no labelling).
    paper_bound, blob_bound = (background.max(), background.min()) if dark_ink else (background.min(), background.max())
    if abs(float(paper_bound) - float(blob_bound)) < 0.75 * abs(float(paper_bound) - pen):
        return ink
    # The paper just outside the ink: 4-6 px from it, in the part of the image that reaches the
    # edge (a hollow blob's inside, even one with a crack, is closed off by the 3 px margin).
    labels = ndimage.label(~_dilate(strong, 3))[0]
    around = _dilate(strong, 6) & np.isin(labels, _edge_labels(labels))
    if not around.any():
        return ink
    paper = float(np.median(background[around]))
    if dark_ink:
        relative, blob = 1.0 - gray / max(paper, 0.05), 1.0 - background / max(paper, 0.05)
    else:
        relative, blob = gray - paper, background - paper
    stroke = 1.0 - pen / max(paper, 0.05) if dark_ink else pen - paper
    dark = blob >= 0.75 * stroke
    if stroke <= 0 or not dark.any():
        return ink
    labels = ndimage.label(dark)[0]
    touching = np.unique(labels[_dilate(strong, 1) & dark])
    inside = np.isin(labels, np.setdiff1d(touching, np.append(_edge_labels(labels), 0)))
    if not inside.any():
        return ink
    ink = ink.copy()
    ink[inside] = np.maximum(ink[inside], relative[inside])
    return ink


def _edge_labels(labels: np.ndarray, margin: int = 1) -> np.ndarray:
    """The labels (ndimage.label's, background 0 left out) of the regions that reach the image's edge
    (or come within `margin` - 1 px of it)."""
    strips = (labels[:margin], labels[-margin:], labels[:, :margin], labels[:, -margin:])
    edge = np.unique(np.concatenate([strip.ravel() for strip in strips]))
    return edge[edge > 0]


def _ink_is_dark(gray: np.ndarray, smooth: np.ndarray | None = None) -> bool:
    """Polarity: is the ink darker than the paper? `smooth` is `gray` after a 3x3 box mean (sensor
    noise a third as strong; `gray` itself where not given). Light ink (_ground_says_dark_ink) is
    dark ink after all where the border is a shadow over most of a lit page (_lit_beside_dark_ink).
    """
    smooth = gray if smooth is None else smooth
    if _ground_says_dark_ink(gray, smooth):
        return True
    return _lit_beside_dark_ink(smooth, float(np.median(_outer_ring(smooth))))


def _ground_says_dark_ink(gray: np.ndarray, smooth: np.ndarray) -> bool:
    """_ink_is_dark's reading of the border and of what is thin.

    Where most of the border is one level (the usual photo or scan, also a digit cropped so tightly
    that it crosses the edge), that level is the paper: light paper (>= 0.6) means dark ink; in
    between (a dim photo of white paper, a grey board) the side on which the image reaches further
    from the paper; dark paper (<= 0.4) light ink, unless the image reaches down from it at least
    DIM_INK_CONTRAST and DIM_INK_MARGIN times as far as up (white paper in a dim room). Otherwise
    (shadows, gradients): ink is thin, so it is what a median filter removes, while a median keeps
    the straight edges of shadows and lit patches. On a ~48 px thumbnail (min-pooled to see dark
    strokes, max-pooled to see light ones, so thin strokes are not averaged away) with a window of
    half its size: compare how much darker and how much lighter than its local median each one is.
    The median pixel alone is not the paper when a shadow covers most of the page."""
    frame = max(1, min(gray.shape) // 20)
    border = np.concatenate(
        [smooth[:frame].ravel(), smooth[-frame:].ravel(), smooth[:, :frame].ravel(), smooth[:, -frame:].ravel()]
    )
    low, paper, high = np.percentile(border, [10, 50, 90])
    # A bold digit crossing the edge spoils the 10-90% spread but leaves most of the outermost ring
    # of pixels at the paper's level; the median test below would read such a digit's loops, as
    # wide as its strokes, as the thin structure.
    one_level = high - low < 0.15
    if not one_level:
        edge = _outer_ring(smooth)
        paper = float(np.median(edge))
        one_level = (np.abs(edge - paper) <= BORDER_PAPER).mean() >= 0.75
    if not one_level:
        # A bold digit cropped to its edges (0-1 px of paper) crosses up to 40% of the ring, and
        # the 3x3 mean smears it further: most of the ring (the ring as it is, or smoothed against
        # noise) at one light level is paper with dark ink. (A shadow over less than half of it is
        # dark ink on the lit rest.) real_world's "cropped to the digit": 11 misreads in 500, 8 of them read
        # as light ink; 7 of the 11 are read right now.
        # The same holds for a bold light digit on a dark ground (chalk, a dark-mode canvas)
        # cropped to its edges: most of the ring at one dark level is the ground (the dark-paper
        # test below still tells white paper in a dim room). Light bold digits cropped with no
        # margin (a generator of this session's, 120-400 px, the seed-0 model): 53 of 200 misread
        # before (the ground between the strokes taken for thin dark ink), 14 after - 7 of them 1s,
        # whose crop is mostly ink, so no ring level is the ground.
        for ring in (_outer_ring(gray), _outer_ring(smooth)):
            for side in (ring[ring >= 0.6], ring[ring <= 0.4]):
                if side.size and (np.abs(ring - float(np.median(side))) <= BORDER_PAPER).mean() >= CROPPED_PAPER:
                    one_level, paper = True, float(np.median(side))
                    break
            if one_level:
                break
    if one_level:
        below, above = paper - float(smooth.min()), float(smooth.max()) - paper
        if 0.4 < paper < 0.6:
            return below > above
        if paper <= 0.4:  # dark ground, or white paper photographed in a dim room (underexposed)
            if below < DIM_INK_CONTRAST:
                return False
            if below > DIM_INK_MARGIN * above:
                return True
            down, up = paper - float(border.min()), float(border.max()) - paper
            beyond = below - down  # (a light object crossing the border - a sheet, chalk - is no noise)
            return up <= 2 * down and beyond >= DIM_INK_BEYOND_NOISE and beyond > DIM_INK_MARGIN * (above - up)
        return True
    blocks, factor = _blocks(gray, 48)
    darkest, lightest = (blocks.min(axis=(1, 3)), blocks.max(axis=(1, 3))) if factor > 1 else (gray, gray)
    size = max(3, min(darkest.shape) // 2) | 1
    darker = float(np.clip(_separable_median(darkest, size) - darkest - 0.05, 0, None).sum())
    lighter = float(np.clip(lightest - _separable_median(lightest, size) - 0.05, 0, None).sum())
    if darker == lighter:  # no thin structure at all: the median pixel is the paper
        return float(np.median(gray)) >= 0.5
    return darker > lighter


def _outer_ring(values: np.ndarray) -> np.ndarray:
    """The image's outermost ring of pixels, each once (top and bottom rows, then the columns between)."""
    return np.concatenate([values[0], values[-1], values[1:-1, 0], values[1:-1, -1]])


def _lit_beside_dark_ink(smooth: np.ndarray, level: float) -> bool:
    """Whether a border of dark `level` (its outermost ring's median) is a shadow over most of the
    page rather than a dark ground: ink well below that level (0.15) somewhere, and a lit area well
    above it that is wide, not a stroke (on a ~48 px thumbnail, min-pooled: a cell is lit only
    where all of it is; still there after a one-cell erosion). A board or a black canvas has
    nothing darker than itself under its light strokes. (A hard shadow over 60% of a page turned
    white paper into "light ink on a dark ground": 69% of such digits right in an independent
    generator's test, RESULTS.md 5.4.2.)"""
    if float(smooth.min()) > level - 0.15:
        return False
    darkest = _blocks(smooth, 48)[0].min(axis=(1, 3))
    return bool(ndimage.binary_erosion(darkest > level + 0.15).any())


def _blocks(values: np.ndarray, side: int) -> tuple[np.ndarray, int]:
    """(`values` cut into square blocks of `factor` px, as a (h, factor, w, factor) view - the last
    rows and columns that fill no block left out -, factor): factor = the longer side // `side`, at
    least 1. A min or max over axes (1, 3) pools it to a thumbnail of about `side` px."""
    factor = max(1, max(values.shape) // side)
    height, width = values.shape[0] // factor, values.shape[1] // factor
    return values[: height * factor, : width * factor].reshape(height, factor, width, factor), factor


def _halved(values: np.ndarray) -> np.ndarray:
    """2x2 box average (the odd last row or column dropped). Summed in the order numpy's mean over
    a (h, 2, w, 2) view uses, so bit for bit the same, without that view's slow strided reduction
    (0.4 vs 3.8 ms CPU for 512x512)."""
    height, width = values.shape[0] // 2 * 2, values.shape[1] // 2 * 2
    top, bottom = values[0:height:2, :width], values[1:height:2, :width]
    return ((top[:, 0::2] + top[:, 1::2]) + (bottom[:, 0::2] + bottom[:, 1::2])) / np.asarray(4, values.dtype)


def _separable_median(values: np.ndarray, size: int) -> np.ndarray:
    """A median along rows, then along columns: like a square median it removes thin lines of
    any direction and keeps straight edges, at O(size) rather than O(size^2) per pixel (measured
    5x faster than ndimage.median_filter for a 48x48 thumbnail and a 25 px window)."""
    rows = ndimage.median_filter(values, size=(1, size), mode="reflect")
    return ndimage.median_filter(rows, size=(size, 1), mode="reflect")


def _ink_against_background(gray, smooth, window: int, dark_ink: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ink (relative to the background) and the background: a grey closing (dark ink) or opening."""
    # The image is padded by repeating its edge first, so that beyond the border it goes on as at
    # the border: a shadow band along an edge is wide along the edge and stays background, while a
    # stroke crossing the edge is still thin. (ndimage's own mode="nearest" pads each stage of the
    # closing separately, which fills such a band.)
    pad = window // 2 + 1
    padded = np.pad(smooth, pad, mode="edge")
    if dark_ink:
        lighting = _grey_morphology(padded, window, closing=True)[pad:-pad, pad:-pad]
        return 1.0 - gray / np.maximum(lighting, 0.05), lighting
    ground = _grey_morphology(padded, window, closing=False)[pad:-pad, pad:-pad]
    return gray - ground, ground


def _grey_morphology(values: np.ndarray, window: int, closing: bool) -> np.ndarray:
    """ndimage.grey_closing (or grey_opening) of `values` with a flat window x window square, mode
    "nearest", computed by _extreme_filter (bit for bit). scipy's grey_dilation reflects its window,
    which moves an even one a place left of the erosion's: `reflected`."""
    dilate = {"size": (window, window), "maximum": True, "mode": "nearest", "reflected": True}
    erode = {"size": (window, window), "maximum": False, "mode": "nearest"}
    if closing:
        return _extreme_filter(_extreme_filter(values, **dilate), **erode)
    return _extreme_filter(_extreme_filter(values, **erode), **dilate)


_CV2_BORDERS = {"nearest": "BORDER_REPLICATE", "reflect": "BORDER_REFLECT", "constant": "BORDER_CONSTANT"}


def _extreme_filter(
    values: np.ndarray, size: tuple, maximum: bool, mode: str = "reflect", reflected: bool = False, footprint=None
):
    """ndimage.maximum_filter (or minimum_filter) of a 2-D array over a rows x cols rectangle, or
    over the True cells of a `footprint` of that size (origin 0, cval 0; `reflected`: the window
    grey_dilation uses) - bit for bit (max and min are
    exact; tests/test_preprocess.py) - by OpenCV where it is installed. Its SIMD row and column
    filters against scipy's (whose 1-D filter keeps a running list of minima, ~17 ns a pixel),
    one 684x684 float32 closing, Intel Xeon, OpenCV 5.0 (4.14): 2.0 / 3.4 / 7.6 ms (2.7 / 7.4 / 14.5)
    vs scipy's 17-24 ms for windows of 9 / 31 / 85 px. These filters (the paper's lighting, the
    ruled-line search, mask dilation) were about half of the photo path's time (docs/RESULTS.md 5.5)."""
    rows, cols = size
    window = np.ones(size, bool) if footprint is None else np.asarray(footprint, bool)
    if _cv2 is None or values.ndim != 2 or values.dtype not in (np.uint8, np.float32) or values.size == 0:
        origin = [-1 if reflected and not length % 2 else 0 for length in size]
        library = ndimage.maximum_filter if maximum else ndimage.minimum_filter
        if footprint is None:
            return library(values, size=size, mode=mode, origin=origin)
        return library(values, footprint=window, mode=mode, origin=origin)
    anchor = ((cols - 1) // 2, (rows - 1) // 2) if reflected else (cols // 2, rows // 2)  # OpenCV's (x, y)
    operation = _cv2.dilate if maximum else _cv2.erode
    border = getattr(_cv2, _CV2_BORDERS[mode])
    return operation(np.ascontiguousarray(values), window.astype(np.uint8), anchor=anchor, borderType=border, borderValue=0)


def _stroke_width(mask: np.ndarray) -> float:
    """Typical stroke width (px) of a mask: across a stroke of width w the distances to the
    background run evenly from 1 to w/2, so w is about four times their mean over the mask (an
    area-weighted measure: the rough edge and thin stubs of a stroke barely move it)."""
    if not mask.any():
        return 1.0
    if _cv2 is not None and not mask.all():
        # The same chessboard distances as scipy's distance_transform_cdt (integers; equal on 3,000
        # random masks), about 3x faster (512x512: 1.2 vs 3.6 ms).
        distance = _cv2.distanceTransform(mask.astype(np.uint8), _cv2.DIST_C, 3)
    else:
        distance = ndimage.distance_transform_cdt(mask, metric="chessboard")
    return max(1.0, 4.0 * float(distance[mask].mean()) - 1.0)


def _strong_level(ink: np.ndarray) -> float:
    """The ink strength that counts as full ink: a high order statistic, robust to a few hot pixels."""
    k = max(1, ink.size // 100_000)  # a thin digit 10 px tall in a 600x800 image has ~20 ink pixels
    flat = ink[ink > 0.02].ravel()  # (most pixels are paper: partition only the rest)
    if flat.size < k:
        return float(ink.max())
    return float(np.partition(flat, flat.size - k)[flat.size - k])


def digit_mask(ink: np.ndarray, lit: np.ndarray | None = None) -> np.ndarray:
    """bool (H, W): the digit's strokes and their antialiased edges; lines, borders and specks dropped.

    `lit` (optional, bool like `ink`): where glare lit the page (_lit). There, a stroke faded below
    STRONG_INK still belongs to the strokes it joins at GLARE_INK (hysteresis, as in Canny's edge
    linking): it joins pieces of the digit however far apart, and its faint ink is kept."""
    height, width = ink.shape
    strong = ink >= STRONG_INK
    lines, count = _counted_lines(ink >= FAINT_INK)  # (faint ruling breaks up at the strokes' threshold)
    # One straight line and next to no other ink is a thin '1' from edge to edge, not ruled paper
    # (which has several lines, or a digit beside its margin line) - unless it hugs an edge of the
    # image (within 5%): a scanner's dark margin beside a small digit. (One line, not one connected
    # piece of lines: a grid, or ruling crossed by a margin line, is one piece.)
    rest = float(ink[strong & ~lines].sum())
    if lines.any() and (rest == 0 or (rest < 0.25 * float(ink[lines].sum()) and count == 1 and not _hugs_an_edge(lines))):
        lines[:] = False
    strong &= ~lines
    labels, count, mass, boxes = _components(strong, ink)
    if count == 0:
        return np.zeros_like(strong)
    touched = _touched_ring(labels, boxes, mass)
    if touched is not None:  # a circle or box drawn around the digit and touching it: its line goes
        strong &= ~touched
        labels, count, mass, boxes = _components(strong, ink)
    area = np.bincount(labels[strong], minlength=count + 1)[1:]
    top, left, bottom, right = boxes.T
    # A page border or a shadow band along it: from edge to edge and thin next to its length
    # (ruled lines are gone already, see _straight_lines).
    # ... lying along that edge (a tightly cropped '1' also runs from edge to edge, in the middle).
    # Or over most of an edge's length and all of it within 5% of that edge (touching it: 10%): a
    # scanner's dark margin beside a page scanned a degree askew runs out before the far end.
    within_top_or_bottom = (bottom <= 0.05 * height) | (top >= 0.95 * height)  # (wholly within 5% of the edge)
    within_left_or_right = (right <= 0.05 * width) | (left >= 0.95 * width)
    near_top_or_bottom = within_top_or_bottom | (((top == 0) | (bottom == height)) & (bottom - top <= 0.1 * height))
    near_left_or_right = within_left_or_right | (((left == 0) | (right == width)) & (right - left <= 0.1 * width))
    along_top_or_bottom = ((left == 0) & (right == width) & ((top < 0.1 * height) | (bottom > 0.9 * height))) | (
        near_top_or_bottom & (right - left >= LINE_SPAN * width)
    )
    along_left_or_right = ((top == 0) & (bottom == height) & ((left < 0.1 * width) | (right > 0.9 * width))) | (
        near_left_or_right & (bottom - top >= LINE_SPAN * height)
    )
    edge_to_edge = along_top_or_bottom | along_left_or_right
    band = area <= 0.08 * min(height, width) * np.maximum(bottom - top, right - left)
    keep = ~(edge_to_edge & band) if min(height, width) >= 40 else np.ones(count, bool)
    if not keep.any():
        keep[:] = True  # only lines: better the lines than nothing (the user sees the view)
    keep &= ~_round_blobs(labels, boxes, mass, keep)  # (first: a ring's content must not be a hole)
    keep &= ~_rings(labels, boxes, mass, keep)
    keep &= ~_underlines(boxes, mass, keep)
    # Furniture along an edge: ink lying wholly within 5% of one edge of the image, or within 10%
    # and at least three times longer along it than across (a drawing app's toolbar in a
    # screenshot, a scanner's margin), is no digit where a real stroke (a tenth of its ink or
    # more) lies elsewhere.
    tall, wide = bottom - top >= 3 * (right - left), right - left >= 3 * (bottom - top)
    hugging = within_top_or_bottom | within_left_or_right
    hugging |= wide & ((bottom <= 0.1 * height) | (top >= 0.9 * height))
    hugging |= tall & ((right <= 0.1 * width) | (left >= 0.9 * width))
    if min(height, width) >= 40 and (keep & ~hugging & (mass >= 0.1 * mass[keep].max())).any():
        keep &= ~hugging
    keep &= ~_solid_objects(labels, boxes, mass, keep)
    main = np.flatnonzero(keep)[np.argmax(mass[keep])]
    # Pieces of the digit: a broken stroke's fragments right next to it, or a real stroke (a 4's
    # or 5's second stroke) a little further. Not specks, nor a chain of them.
    candidates = np.flatnonzero(keep & (mass >= 0.01 * mass[main]))
    if lit is not None:
        # (on a 5x5 mean too: grain at that level is no link; a faded stroke is)
        faint = (ink >= GLARE_INK) & (ndimage.uniform_filter(ink, 5, mode="nearest") >= GLARE_INK) & ~lines
        faint_labels = ndimage.label((faint & lit) | strong, structure=np.ones((3, 3), bool))[0]
        group = np.asarray(ndimage.maximum(faint_labels, labels, np.arange(1, count + 1)), np.int64).reshape(-1)
    chosen = {int(main)}
    box = list(boxes[main])
    grown = True
    while grown:
        grown = False
        size = max(box[2] - box[0], box[3] - box[1])
        for i in candidates:
            if i in chosen:
                continue
            c_top, c_left, c_bottom, c_right = boxes[i]
            gap = max(c_top - box[2], box[0] - c_bottom, c_left - box[3], box[1] - c_right, 0)
            linked = lit is not None and mass[i] >= 0.04 * mass[main] and group[i] in {int(group[j]) for j in chosen}
            if gap <= max(2.0, 0.06 * size) or (gap <= 0.3 * size and mass[i] >= 0.04 * mass[main]) or linked:
                chosen.add(int(i))
                box = [min(box[0], c_top), min(box[1], c_left), max(box[2], c_bottom), max(box[3], c_right)]
                grown = True
    strokes = np.isin(labels, np.array(sorted(chosen)) + 1)
    if lit is not None:  # the faded parts under the glare (not the faint edge of ink left out: a ring, a mark)
        held = np.isin(faint_labels, np.array(sorted({int(group[j]) for j in chosen})))
        left_out = labels.astype(bool) & ~strokes
        strokes |= held & lit & (ink < STRONG_INK) & ~_dilate(left_out, 2)
    if lines.any():  # where a stroke crosses a line, the crossing is the stroke's: close the gap
        strokes |= lines & _dilate(strokes, 2 * LINE_BAND)
    # The antialiased edge of a stroke is fainter than STRONG_INK: keep ink touching the strokes.
    return _dilate(strokes, 2) & (ink > 0)


OBJECT_BOLDER = 2.5  # a blob from the image's edge this many times bolder than a stroke elsewhere is an object


def _solid_objects(labels: np.ndarray, boxes: np.ndarray, mass: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """bool (count,): kept components that are an object coming in from the image's edge - a
    thumb or finger holding the paper - rather than the digit: touching the edge, and at least
    OBJECT_BOLDER times as wide in its "strokes" (_stroke_width) as the heaviest kept component
    away from the edge, which has at least a tenth of its ink (so `keep` keeps that one). A thumb's
    visible part, narrower than the lighting window, is one solid blob of ink: it was taken for a
    thin pen's digit where heavier, or joined to it as a piece (an independent generator's thumbs:
    3 of 250 misread, 1 of them a misdrawn digit; 4,200 real_world views and 3,299 of that
    generator's 3,300 predictions unchanged)."""
    height, width = labels.shape
    top, left, bottom, right = boxes.T
    edge = keep & ((top == 0) | (left == 0) | (bottom == height) | (right == width))
    inner = keep & ~edge
    found = np.zeros(len(mass), bool)
    if not edge.any() or not inner.any():
        return found
    other = int(np.flatnonzero(inner)[np.argmax(mass[inner])])
    if mass[other] < 0.1 * mass[edge].max():
        return found

    stroke = _stroke_width(_component(labels, boxes, other))
    for i in np.flatnonzero(edge):
        found[i] = _stroke_width(_component(labels, boxes, int(i))) >= OBJECT_BOLDER * stroke
    return found


def _component(labels: np.ndarray, boxes: np.ndarray, i: int) -> np.ndarray:
    """bool: component `i` (0-based, as in `boxes`) alone, in its bounding box."""
    top, left, bottom, right = boxes[i]
    return labels[top:bottom, left:right] == i + 1


BLOB_FILL = 0.7  # a component covering this share of its box (a disc: 0.79), about as wide as tall, ...
BLOB_BOLDER = 2.0  # ... and this many times bolder than a stroke elsewhere is a round blob, no digit


def _solid_round(labels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """bool (count,): the components that are solid and round (_round_blobs): no holes either (a
    dark note round a light digit read with the wrong polarity fills its box as well)."""
    top, left, bottom, right = boxes.T
    tall, wide = bottom - top, right - left
    area = np.bincount(labels.ravel(), minlength=len(boxes) + 1)[1:]
    solid = (area >= BLOB_FILL * tall * wide) & (np.minimum(tall, wide) >= 5)
    solid &= (tall <= 1.5 * wide) & (wide <= 1.5 * tall)
    for i in np.flatnonzero(solid):
        solid[i] = ndimage.binary_fill_holes(_component(labels, boxes, int(i))).sum() <= 1.02 * area[i]
    return solid


def _round_blobs(labels: np.ndarray, boxes: np.ndarray, mass: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """bool (count,): kept components that are solid round blobs - a binder's punched holes on a
    scanned page (the scanner's black lid seen through them), a magnet, a sticker - rather than a
    digit: filling BLOB_FILL of their box, its sides within 1.5x of each other, at least 5 px, and
    BLOB_BOLDER times as wide in their "strokes" (_stroke_width) as the heaviest kept component that
    is no such blob (away from the image's edge, where there is one), which has at least a tenth of
    their ink. A digit is strokes: even a marker's filled loop comes with its stem or tail in one
    piece. Darker and heavier than a fine pen's digit, a hole was taken for it (an independent
    generator's binder scans: 9 of 60 read as 0, with _rings' part below)."""
    top, left, bottom, right = boxes.T
    solid = keep & _solid_round(labels, boxes)
    found = np.zeros(len(mass), bool)
    strokes = keep & ~solid
    height, width = labels.shape
    inner = strokes & (top > 0) & (left > 0) & (bottom < height) & (right < width)
    strokes = inner if inner.any() else strokes  # (the scan's dark edges are no strokes to compare with)
    if not solid.any() or not strokes.any():
        return found
    other = int(np.flatnonzero(strokes)[np.argmax(mass[strokes])])
    if mass[other] < 0.1 * mass[solid].max():
        return found
    stroke = _stroke_width(_component(labels, boxes, other))
    for i in np.flatnonzero(solid):
        found[i] = _stroke_width(_component(labels, boxes, int(i))) >= BLOB_BOLDER * stroke
    return found


RING_CONTENT = 0.25  # a ring's content spans at least this share of the ring's longer side ...
RING_MASS = 0.03  # ... and has at least this share of its ink (a dotted zero's dot: 0.03-0.09, its extent guards it) ...
RING_AROUND = 0.75  # ... and the ring lies in this share of the directions from the content's centre ...
RING_SECTORS = 36
RING_GAP = 0.01  # ... and no nearer to it than this share of the ring's longer side (and 3 px) ...
RING_GAP_PX = 3.0
RING_PEN = 0.16  # ... and its strokes no wider than this share of it (drawn boxes 0.07-0.12; a dark note 0.2-0.3)
RING_CANDIDATES = 20  # components (by box area) tried as a ring, and lines (by length) as an underline


def _rings(labels: np.ndarray, boxes: np.ndarray, mass: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """bool per component: a circle or box drawn around the digit, not touching it.

    A ring is a component - or two: a circle drawn in two strokes, or split where the image's edge
    cuts it - whose bounding box holds other ink with a margin on every side, enough of it
    (RING_CONTENT, RING_MASS) to be a digit rather than a dot in a 0's loop, and that lies in
    RING_AROUND of the directions seen from that ink's centre: a circle, a box, also one left open
    by the pen or cut by the image's edge. A 7's cross-bar drawn apart lies inside the 7's box, but
    the 7 is above, right of and below it only: no ring. A ring is a pen's line (RING_PEN), clear
    of what it holds (RING_GAP): a fine pen's 8 broken into its two sides and its middle, or a dark
    note around a light digit, is none.
    """
    # A solid round blob is neither a ring nor what one holds: a scanned page's binder holes are
    # no digit that the real digit and the scan's dark edges ring round (_round_blobs; an
    # independent generator's binder scans: 8 of 60 read as a hole that way).
    significant = keep & (mass >= 0.01 * mass[keep].max()) & ~_solid_round(labels, boxes)
    if not significant.any():
        return np.zeros(len(boxes), bool)
    rings = np.zeros(len(boxes), bool)
    found = []  # (the ring's pieces, the box of the ink it holds)
    # A ring holds a digit: it is among the few largest boxes (bounded work on a page of noise).
    top, left, bottom, right = boxes.T
    area = np.where(significant & (bottom - top >= 8) & (right - left >= 8), (bottom - top) * (right - left), 0)
    for r in np.argsort(-area)[:RING_CANDIDATES]:
        if not area[r]:
            break
        content = _encloses(labels, boxes, mass, significant, [r])
        if content is not None:
            rings[r] = True
            found.append(([r], content))
    if not rings.any():  # two pieces, among the largest few (6 x 5 / 2 pairs at most)
        largest = [int(i) for i in np.argsort(-np.where(significant, mass, -1.0))[:6] if significant[i]]
        for i, first in enumerate(largest):
            for second in largest[i + 1 :]:
                content = None if rings[[first, second]].any() else _encloses(labels, boxes, mass, significant, [first, second])
                if content is not None:
                    rings[[first, second]] = True
                    found.append(([first, second], content))
    # More pieces of a ring that the image's edges cut up: ink in the ring's box, none of which
    # comes near the box of the ink it holds (within a tenth of that box's size).
    for members, (c_top, c_left, c_bottom, c_right) in found:
        margin = 0.1 * max(c_bottom - c_top, c_right - c_left)
        near = labels[
            max(0, int(c_top - margin)) : int(c_bottom + margin) + 1, max(0, int(c_left - margin)) : int(c_right + margin) + 1
        ]
        touching = np.zeros(len(boxes) + 1, bool)
        touching[np.unique(near)] = True
        rings |= significant & ~touching[1:] & _overlap(boxes, boxes[members])
    if rings.all() or not (keep & ~rings).any():
        return np.zeros_like(rings)
    return rings


RING_COVER = 0.85  # a touched ring's ink runs along this share of its convex hull's outline
RING_WOBBLE = 0.04  # a hand-drawn ring strays inside its hull by up to this share of its size (and 2 px)
RING_TOUCHED_CONTENT = 0.6  # what a touched ring holds spans this share of its size (an 8 alone: its crossing, 0.53-0.56) ...
RING_TOUCHED_MASS = 0.3  # ... and has this share of the line's pixels (held digits: 0.33-1.0; bold 8s' crossings: 0.2-0.31)
RING_CLEAR = 0.3  # this share of it lies over a pen's width from the line (bold 8s' crossings: 0-0.25; held digits: 0.36-0.87)
RING_HOLLOW = 0.05  # a ring encloses paper over this share of its box (round a digit: 0.1-0.22; a 7: none)


def _touched_ring(labels: np.ndarray, boxes: np.ndarray, mass: np.ndarray) -> np.ndarray | None:
    """bool (H, W): the line of a circle or box drawn around the digit and touching it (one
    component with the digit, which _rings cannot take apart), or None where there is none.

    A ring runs along the outline of its convex hull, all the way round (RING_COVER of the outline
    has its ink within a pen's width and a hand's wobble), and closes around what it holds; its
    line is the component's ink near that outline, and what lies deeper inside is the digit,
    which must be there with the extent and share of a digit (RING_TOUCHED_CONTENT,
    RING_TOUCHED_MASS), mostly clear of the line (RING_CLEAR); the line is a pen's (RING_PEN). A
    digit alone is no ring around anything: a 0 holds nothing inside its line, a 6's, 9's or wide
    8's outline has long stretches away from its hull (beside a 6's hook, an 8's waist), and where a
    bold 8's outline closes, it holds only its crossing, small and within a pen's width of it.
    Only the component with the largest box is tried, and only where it encloses paper
    (RING_HOLLOW of its box): most digits (1, 2, 3, 5, 7) are no more than that one labelling.
    """
    significant = mass >= 0.01 * mass.max()
    top, left, bottom, right = boxes.T
    area = np.where(significant & (np.minimum(bottom - top, right - left) >= 16), (bottom - top) * (right - left), 0)
    r = int(np.argmax(area))  # (a ring holding the digit is the largest thing there)
    if not area[r]:
        return None
    r_top, r_left, r_bottom, r_right = boxes[r]
    size = max(r_bottom - r_top, r_right - r_left)
    component = np.pad(labels[r_top:r_bottom, r_left:r_right] == r + 1, 1)
    if np.count_nonzero(_enclosed(component)) < RING_HOLLOW * component.size:
        return None
    pen = _stroke_width(component)
    if pen > RING_PEN * size:
        return None
    depth = _distance(_filled_hull(component))  # (0 outside the hull)
    reach = pen + max(2.0, RING_WOBBLE * size)
    outline = (depth > 0) & (depth <= 1.0)
    if np.count_nonzero(outline & (_distance(~component) <= reach)) < RING_COVER * np.count_nonzero(outline):
        return None
    line = component & (depth <= reach)
    inside = component & ~line
    ys, xs = np.nonzero(inside)
    if not len(ys) or len(ys) < RING_TOUCHED_MASS * np.count_nonzero(line):
        return None
    if max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 < RING_TOUCHED_CONTENT * size:
        return None
    # The line closes around what it holds: the outer strokes of a digit alone do not.
    if np.count_nonzero(inside & _enclosed(line)) < 0.9 * len(ys):
        return None
    # And what it holds lies clear of it but where they touch: a bold 8's closed outline holds its
    # crossing, all of it within a pen's width of that outline.
    if np.count_nonzero(_distance(~line)[inside] > pen) < RING_CLEAR * len(ys):
        return None
    ring = np.zeros(labels.shape, bool)
    ring[r_top:r_bottom, r_left:r_right] = line[1:-1, 1:-1]
    return ring


def _enclosed(mask: np.ndarray) -> np.ndarray:
    """bool: the pixels outside `mask` that `mask` (8-connected) closes off from its border (the
    border itself must be clear of `mask`: padded)."""
    # Equal to ndimage.binary_fill_holes(mask) & ~mask, and measured 4.5-4.9x faster (one labelling
    # instead of a dilation repeated until nothing changes: 400x400 0.9 vs 4.4 ms, 1000x1000 6 vs 27).
    regions = ndimage.label(~mask)[0]  # (4-connected: what an 8-connected line closes off)
    return ~mask & (regions != regions[0, 0])


def _distance(mask: np.ndarray) -> np.ndarray:
    """float32: each pixel's Euclidean distance to the nearest pixel outside `mask` (0 there):
    OpenCV's 5x5-mask approximation where installed (faster), else scipy's exact one."""
    if _cv2 is not None:
        return _cv2.distanceTransform(mask.astype(np.uint8), _cv2.DIST_L2, 5)
    return ndimage.distance_transform_edt(mask).astype(np.float32)


def _filled_hull(mask: np.ndarray) -> np.ndarray:
    """bool: the convex hull of `mask`'s pixels, filled (OpenCV's hull and polygon fill where
    installed, else _convex's)."""
    if _cv2 is None:
        return _convex(mask)[0]
    points = _cv2.findNonZero(mask.astype(np.uint8))
    filled = np.zeros(mask.shape, np.uint8)
    _cv2.fillConvexPoly(filled, _cv2.convexHull(points), 1)
    return filled.astype(bool) | mask


def _overlap(boxes: np.ndarray, pieces: np.ndarray) -> np.ndarray:
    """bool per box of `boxes` (top, left, bottom, right): whether it overlaps the box around all `pieces`."""
    if not len(pieces):
        return np.zeros(len(boxes), bool)
    top, left, bottom, right = boxes.T
    return (top < pieces[:, 2].max()) & (bottom > pieces[:, 0].min()) & (left < pieces[:, 3].max()) & (right > pieces[:, 1].min())


def _encloses(labels: np.ndarray, boxes: np.ndarray, mass: np.ndarray, significant: np.ndarray, members: list) -> tuple | None:
    """The box (top, left, bottom, right) of the significant ink that the components `members`
    together form a ring around (_rings), or None where they form none."""
    height, width = labels.shape
    top, left, bottom, right = boxes.T
    r_top, r_left, r_bottom, r_right = top[members].min(), left[members].min(), bottom[members].max(), right[members].max()
    if r_bottom - r_top < 8 or r_right - r_left < 8:
        return None
    inside = significant & (top > r_top) & (bottom < r_bottom) & (left > r_left) & (right < r_right)
    inside[members] = False
    if not inside.any() or mass[inside].sum() < RING_MASS * mass[members].sum():
        return None
    extent = max(bottom[inside].max() - top[inside].min(), right[inside].max() - left[inside].min())
    if extent < RING_CONTENT * max(r_bottom - r_top, r_right - r_left):
        return None
    region = labels[r_top:r_bottom, r_left:r_right]
    content_y, content_x = np.nonzero(np.isin(region, np.flatnonzero(inside) + 1))
    ring = np.isin(region, np.asarray(members) + 1)
    ring_y, ring_x = np.nonzero(ring)
    centre_y, centre_x = content_y.mean(), content_x.mean()
    # The directions from the content's centre in which the ring lies, in RING_SECTORS sectors;
    # a sector with no ring pixel counts too where its ray leaves the image, within the ring's
    # reach, through an edge that the ring runs up to (the ring goes on beyond the frame).
    sectors = np.zeros(RING_SECTORS, bool)
    angle = np.arctan2(ring_y - centre_y, ring_x - centre_x)
    sectors[((angle + np.pi) / (2 * np.pi) * RING_SECTORS).astype(int) % RING_SECTORS] = True
    reach = 1.15 * np.hypot(ring_y - centre_y, ring_x - centre_x).max()
    y, x = r_top + centre_y, r_left + centre_x  # (image coordinates)
    for sector in np.flatnonzero(~sectors):
        theta = (sector + 0.5) / RING_SECTORS * 2 * np.pi - np.pi
        dy, dx = np.sin(theta), np.cos(theta)
        exits = [
            ((height - y) / dy, r_bottom == height) if dy > 0 else (y / -dy, r_top == 0),
            ((width - x) / dx, r_right == width) if dx > 0 else (x / -dx, r_left == 0),
        ]
        distance, open_edge = min(exits)
        sectors[sector] = open_edge and distance <= reach
    if sectors.mean() < RING_AROUND:
        return None
    # Apart from what it holds, by a clear gap: the pieces of a digit broken by a fine pen lie
    # a pixel or two apart (an 8's two sides around its middle). And a line, not an area: a dark
    # note around a light digit is a ground, not a ring (`_page` and polarity deal with it).
    size = max(r_bottom - r_top, r_right - r_left)
    if ndimage.distance_transform_edt(~ring)[content_y, content_x].min() < max(RING_GAP_PX, RING_GAP * size):
        return None
    if _stroke_width(np.pad(ring, 1)) > RING_PEN * size:  # (padded: a box's sides are flush with its crop)
        return None
    return top[inside].min(), left[inside].min(), bottom[inside].max(), right[inside].max()


def _underlines(boxes: np.ndarray, mass: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """bool per component: a line drawn under the digit, not touching it.

    A straight stroke at least four times wider than tall, with other ink above it and none of
    that reaching below its top where it runs or a quarter of its length beyond its ends: a 5's
    flag or a 7's bar has the rest of the digit below it, a 4's separate bar has the stem going on
    below it, beside its end (a 2's base drawn apart would go).
    """
    top, left, bottom, right = boxes.T
    significant = keep & (mass >= 0.01 * mass[keep].max())
    thickness = bottom - top
    lines = significant & (right - left >= 4 * thickness) & (right - left >= 8)
    under = np.zeros(len(boxes), bool)
    for i in np.argsort(-np.where(lines, right - left, 0))[:RING_CANDIDATES]:
        if not lines[i]:
            break
        reach = 0.25 * (right[i] - left[i])  # (ink in its columns and a little beyond its ends)
        over = significant & ~lines & (right > left[i] - reach) & (left < right[i] + reach)
        above = over & (bottom <= top[i] + 0.5 * thickness[i])
        if above.any() and not (over & ~above).any() and mass[above].sum() >= 0.2 * mass[i]:
            under[i] = True
    if not (keep & ~under).any():
        return np.zeros_like(under)
    return under


def _components(strong: np.ndarray, ink: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """(labels, count, ink mass per component, boxes (count, 4) as top, left, bottom, right) of the
    8-connected components of `strong`."""
    labels, count = ndimage.label(strong, structure=np.ones((3, 3), bool))
    # (over the labelled pixels only: the same sums, without the paper's - most of a grainy photo)
    mass = np.bincount(labels[strong], weights=ink[strong], minlength=count + 1)[1:]
    boxes = np.array([(r.start, c.start, r.stop, c.stop) for r, c in ndimage.find_objects(labels)]).reshape(-1, 4)
    return labels, count, mass, boxes


def _hugs_an_edge(mask: np.ndarray) -> bool:
    """Whether all of `mask` lies within 5% of the image's height of its top or bottom edge, or
    within 5% of its width of its left or right edge."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    return bool(rows[-1] < 0.05 * height or rows[0] >= 0.95 * height or columns[-1] < 0.05 * width or columns[0] >= 0.95 * width)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` grown by `radius` px in every direction (a square max filter, _extreme_filter)."""
    return _extreme_filter(mask.astype(np.uint8), (2 * radius + 1,) * 2, maximum=True, mode="constant") > 0


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` shrunk by `radius` px from everything outside it, not from the image's edge (a
    square min filter, _extreme_filter, the border replicated)."""
    return _extreme_filter(mask.astype(np.uint8), (2 * radius + 1,) * 2, maximum=False, mode="nearest") > 0


def _straight_lines(mask: np.ndarray) -> np.ndarray:
    """bool (H, W): the pixels of `mask` on thin straight lines across the image (_counted_lines)."""
    return _counted_lines(mask)[0]


def _counted_lines(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(bool (H, W): the pixels of `mask` on thin straight lines that run across the image, within
    LINE_TILT of horizontal or vertical - ruled and squared paper, a notebook's margin line, page
    borders.

    Thin: what survives an opening with a small square is a stroke, not a line. The lines' tilt
    (a notebook photographed askew) is measured first (_tilt) and sheared out (_sheared), so that
    they run along the rows (or, for the vertical ones, the columns). Then a directional opening
    (erosion then dilation with a 1 x L line, L a third of the image, by _extreme_filter's min/max
    filters) finds runs of at least L pixels after the thin mask is thickened across the run by
    LINE_BAND px each way (what is left of the tilt, a slight curve). A digit crossing a line cuts
    it into pieces: collinear pieces that together cover LINE_SPAN of the image are a line.
    """
    height, width = mask.shape
    found, count = np.zeros_like(mask), 0
    if min(height, width) < 40:
        return found, count
    thin = None
    for vertical in (False, True):  # (the vertical lines: the horizontal ones of the transposed image)
        lines = mask.T if vertical else mask
        if lines.any(axis=0).mean() < LINE_SPAN:  # (no line across the columns at any tilt: most images)
            continue
        slope = _tilt(lines)
        sheared, rows = _sheared(lines, slope)
        # Cheap first: no band of rows holds LINE_SPAN of a line - no line (most images).
        band = _extreme_filter(sheared.astype(np.uint8), (2 * LINE_BAND + 1, 1), maximum=True)
        if band.sum(axis=1).max() < LINE_SPAN * lines.shape[1]:
            continue
        if thin is None:
            values = mask.astype(np.uint8)
            square = max(7, round(min(height, width) / 50)) | 1
            eroded = _extreme_filter(values, (square, square), maximum=False, mode="constant")
            opened = _extreme_filter(eroded, (square, square), maximum=True, mode="constant")
            thin = mask & (opened == 0)
        on, lines_found = _row_lines(_sheared(thin.T if vertical else thin, slope)[0])
        count += lines_found
        at, columns = np.nonzero(on)
        unsheared = np.zeros_like(lines)
        unsheared[at - rows[columns], columns] = True
        found |= unsheared.T if vertical else unsheared
    return found & mask, count


LINE_TILT = 0.18  # ruled lines are looked for up to this slope off the image's axes (about 10 degrees) ...
LINE_TILT_STEP = 0.01  # ... in these steps (the rest: LINE_BAND's tolerance)


def _tilt(mask: np.ndarray) -> float:
    """The slope (rows per column) of the long, nearly horizontal lines in `mask`, if any: the shear
    whose row profile is the most peaked (sum of squares: the projection-profile skew estimate of
    document imaging), on a copy max-pooled to ~128 px. 0 where the best is within 1.5 steps of 0
    (a tilt LINE_BAND takes up, so that straight ruling is read exactly as before)."""
    blocks, factor = _blocks(mask, 128)
    if factor == 1:
        pooled = mask
    elif _cv2 is not None:  # (the mean of each block, > 0 where any pixel is set: 0.14 vs 1.5 ms at 512 px)
        whole = np.ascontiguousarray(mask[: blocks.shape[0] * factor, : blocks.shape[2] * factor], np.float32)
        pooled = _cv2.resize(whole, (blocks.shape[2], blocks.shape[0]), interpolation=_cv2.INTER_AREA) > 0
    else:
        pooled = blocks.any(axis=3).any(axis=1)
    ys, xs = np.nonzero(pooled)
    if ys.size < 2:
        return 0.0
    slopes = np.arange(-LINE_TILT, LINE_TILT + LINE_TILT_STEP / 2, LINE_TILT_STEP)
    shifted = ys[None, :] - np.round(slopes[:, None] * xs[None, :]).astype(np.int64)
    shifted -= shifted.min(axis=1, keepdims=True)
    span = int(shifted.max()) + 1  # (every slope's row profile in one bincount)
    profiles = np.bincount((shifted + span * np.arange(len(slopes))[:, None]).ravel(), minlength=span * len(slopes))
    peaked = np.square(profiles.reshape(len(slopes), span).astype(np.float64)).sum(axis=1)
    best = float(slopes[int(np.argmax(peaked))])
    return 0.0 if abs(best) <= LINE_TILT_STEP * 1.5 else best


def _sheared(mask: np.ndarray, slope: float) -> tuple[np.ndarray, np.ndarray]:
    """(`mask` with column x moved up by slope * x rows - lines of that slope become rows -, each
    column's offset: pixel (y, x) goes to (y + offsets[x], x)). The image grows by the shear's span."""
    shift = np.round(slope * np.arange(mask.shape[1])).astype(np.int64)
    offsets = shift.max() - shift
    if not offsets.any():
        return mask, offsets
    sheared = np.zeros((mask.shape[0] + int(offsets.max()), mask.shape[1]), mask.dtype)
    ys, xs = np.nonzero(mask)
    sheared[ys + offsets[xs], xs] = mask[ys, xs]
    return sheared, offsets


def _row_lines(thin: np.ndarray) -> tuple[np.ndarray, int]:
    """(bool: the pixels of `thin` on straight lines along the rows that reach both side edges and
    cover LINE_SPAN of the width (see _straight_lines), how many such lines)."""
    height, width = thin.shape
    found, count = np.zeros_like(thin), 0
    band = 2 * LINE_BAND + 1
    thick = _extreme_filter(thin.astype(np.uint8), (band, 1), maximum=True)
    length = max(3, width // 3)
    runs = _extreme_filter(_extreme_filter(thick, (1, length), maximum=False), (1, length), maximum=True)
    if not runs.any():
        return found, count
    labels, _ = ndimage.label(runs)
    pieces = [(s[0].start, s[0].stop, s[1].stop - s[1].start, i) for i, s in enumerate(ndimage.find_objects(labels), start=1)]
    pieces.sort()
    tolerance = LINE_BAND  # the pieces of one tilted line, cut by a digit, sit a few px apart
    thin_rows, thin_columns = np.nonzero(thin)
    group: list = []
    for piece in pieces + [None]:
        if group and (piece is None or piece[0] > group[-1][1] + tolerance):
            # The whole line, also its short pieces next to the digit: the thin pixels within
            # LINE_BAND of the straight line fitted through its long runs. It must reach both
            # edges of the image and cover LINE_SPAN of it (a thin '1' ends inside).
            member = np.isin(labels, [p[3] for p in group]) & thin
            rows, columns = np.nonzero(member)
            if columns.size and np.ptp(columns) > 0:
                slope, offset = _line_fit(columns, rows)
                near = np.abs(thin_rows - (slope * thin_columns + offset)) <= LINE_BAND + 1
                covered = np.unique(thin_columns[near])
                if covered.size >= LINE_SPAN * width and covered[0] <= 0.05 * width and covered[-1] >= 0.95 * width - 1:
                    found[thin_rows[near], thin_columns[near]] = True
                    count += 1
            group = []
        if piece is not None:
            group.append(piece)
    return found, count


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and offset of the least-squares line y = slope * x + offset (x not all equal), as
    np.polyfit(x, y, 1) gives them, in closed form. np.polyfit goes through LAPACK, whose OpenBLAS
    threads then spin for ~0.1 s on the other core: the next image's read-ahead inflate (_ahead)
    lost that core, a grainy 4096x4096 PNG's decode right after a preprocessing 56 -> 83 ms (AMD EPYC).
    """
    x, y = x.astype(np.float64), y.astype(np.float64)
    x_mean, y_mean = x.mean(), y.mean()
    slope = float(((x - x_mean) * (y - y_mean)).sum() / ((x - x_mean) ** 2).sum())
    return slope, float(y_mean - slope * x_mean)


# ----------------------------------------------------------------------------- MNIST layout


def _thinned(ink: np.ndarray) -> np.ndarray:
    """`ink` with a marker's bold strokes thinned to an MNIST pen's width (stroke-width normalisation).

    The digit's stroke width is measured as it will be laid out (in the 20 px box); above
    BOLD_STROKE (wider than 93% of MNIST's digits) a grey-scale erosion by a disk narrows every
    stroke to about THIN_TO. A bold digit reads like the MNIST digits the model learned from:
    with _filled_blobs, benchmarks/real_world.py's thick-marker digits went from 96.8% to 98.4%
    (docs/RESULTS.md 5.4). Returns `ink` itself when nothing is thinned, or when the
    erosion would break the strokes into more pieces (or leave none).
    """
    rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    # The work below is on the ink's box with 1 px of paper around it: outside the box there is no
    # ink to measure, and the erosion leaves none (most of the image is paper: a fraction of the time).
    inside = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    box = np.pad(ink[inside], 1)
    width = _stroke_width(box >= 0.5) * DIGIT_BOX / extent
    # Eroding by r takes 2r off every stroke and off the box's longer side, which the layout then
    # scales to DIGIT_BOX: (w - 2r) / (extent - 2r) = THIN_TO / DIGIT_BOX for w = width x extent / DIGIT_BOX.
    radius = round((width - THIN_TO) / 2 * extent / (DIGIT_BOX - THIN_TO))
    if width <= BOLD_STROKE or radius < 1:
        return ink
    thinned = _disk_eroded(box.astype(np.float32), radius)
    # A pen of uneven width (a brush, a nib) would lose its thin parts: then the strokes fall apart
    # into more pieces, or a whole stroke goes and the box shrinks by more than the erosion's 2r
    # (up to 4r where a slanted stroke's square end meets the disk); such a digit stays as drawn.
    eight = np.ones((3, 3), bool)
    strong, kept = box >= STRONG_INK, thinned >= STRONG_INK
    pieces = ndimage.label(kept, structure=eight)[1]
    if not 0 < pieces <= ndimage.label(strong, structure=eight)[1]:
        return ink
    for axis in (0, 1):
        before, after = np.nonzero(strong.any(axis=axis))[0], np.nonzero(kept.any(axis=axis))[0]
        if after[-1] - after[0] < before[-1] - before[0] - 4 * radius - 2:
            return ink
    result = np.zeros_like(ink)
    result[inside] = thinned[1:-1, 1:-1]
    return result


THIN_RADIUS = 24  # a larger erosion disk is applied at a reduced scale (see _disk_eroded)


def _disk_eroded(values: np.ndarray, radius: int) -> np.ndarray:
    """Grey erosion of `values` by a disk of `radius` px (outside counts as 0). OpenCV's erosion by a
    disk costs the disk's area per pixel: a filled 1,005 px square on a 1,023 px canvas (a "stroke"
    of its own width) took a 623 px disk and 8-13 s (fuzzing). Above THIN_RADIUS the image is
    box-averaged by a factor that brings the disk to at most THIN_RADIUS, eroded there and scaled
    back up (bilinear): the layout scales the digit to 20 px anyway. Real marker digits at working
    size stay under it (every `real_world` render)."""
    factor = -(-radius // THIN_RADIUS)
    if factor > 1:
        height, width = values.shape
        small = Image.fromarray(values, mode="F").resize((max(1, width // factor), max(1, height // factor)), Image.BOX)
        eroded = _disk_eroded(np.asarray(small, np.float32), max(1, round(radius / factor)))
        return np.asarray(Image.fromarray(eroded, mode="F").resize((width, height), Image.BILINEAR), np.float32)
    disk = np.hypot(*np.ogrid[-radius : radius + 1, -radius : radius + 1]) <= radius
    return _extreme_filter(values, disk.shape, maximum=False, mode="constant", footprint=disk)


def _area_width(ink: np.ndarray) -> float:
    """Mean stroke width (px) of an ink map: ink area over half the perimeter (a stroke of width w
    and length L has area w L and perimeter 2 L). The area counts partial coverage, so a faint,
    antialiased line narrower than a pixel measures as narrow as it is; the perimeter is the
    4-neighbour boundary of the ink >= 1/4, times pi/4 (a staircase's length over a straight edge's,
    averaged over directions)."""
    mask = np.pad(ink >= 0.25, 1)
    edges = np.count_nonzero(mask[1:] != mask[:-1]) + np.count_nonzero(mask[:, 1:] != mask[:, :-1])
    return 2.0 * float(np.clip(ink, 0.0, 1.0).sum()) / max(1.0, math.pi / 4 * edges)


def _thickened(ink: np.ndarray) -> np.ndarray:
    """`ink` with a hairline digit widened to an MNIST pen's width (stroke-width normalisation).

    A 1-3 px pen on a 1,000 px canvas is under a tenth of a pixel wide once the digit is scaled to
    20 px: the layout's averaging fades it to scattered specks. Where the width in the 20 px box
    (_area_width) is under THIN_STROKE (narrower than over 99% of MNIST's digits) and the pen at
    most HAIRLINE px wide, the box of its strong ink is max-pooled to about POOL_SIDE px (a line
    keeps its full strength in every block it crosses) and grey-dilated by a disk to about
    THICKEN_TO. Returns `ink` itself when the pen is not that thin, else the widened box alone
    (mnist_layout reads only the ink's box).
    """
    strong = ink >= STRONG_INK  # (faint remains, a ruled line's, are neither measured nor widened)
    rows, cols = np.nonzero(strong.any(axis=1))[0], np.nonzero(strong.any(axis=0))[0]
    if not rows.size:
        return ink
    inside = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    pen = _area_width(ink[inside])
    # A digit of ordinary strokes whose box a thin line stretches (a ruled line it merges with) is
    # thin for its box, not in pixels: only a pen at most HAIRLINE px wide is widened.
    if pen > HAIRLINE or pen * DIGIT_BOX / (max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1) >= THIN_STROKE:
        return ink
    box = np.where(strong[inside], ink[inside], 0.0).astype(np.float32)
    factor = max(1, max(box.shape) // POOL_SIDE)
    if factor > 1:
        height, width = -(-box.shape[0] // factor) * factor, -(-box.shape[1] // factor) * factor
        padded = np.pad(box, ((0, height - box.shape[0]), (0, width - box.shape[1])))
        box = padded.reshape(height // factor, factor, width // factor, factor).max(axis=(1, 3))
    # Dilating by r adds 2r to the strokes' width w and to the box's longer side e, which the layout
    # scales to DIGIT_BOX: (w + 2r) / (e + 2r) = THICKEN_TO / DIGIT_BOX.
    extent = max(box.shape)
    radius = math.ceil((THICKEN_TO * extent / DIGIT_BOX - _area_width(box)) / (2 * (1 - THICKEN_TO / DIGIT_BOX)))
    if radius < 1:
        return ink
    disk = np.hypot(*np.ogrid[-radius : radius + 1, -radius : radius + 1]) <= radius
    box = np.pad(box.astype(np.float32), radius)
    return _extreme_filter(box, disk.shape, maximum=True, mode="constant", footprint=disk)


def _fit_box(crop: np.ndarray) -> np.ndarray:
    """The crop scaled so that its longer side is DIGIT_BOX px, as float in [0, 1] (Lanczos, antialiased)."""
    height, width = crop.shape
    scale = DIGIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # Pillow's (width, height)
    # A box that is already 20 px is returned unchanged, so MNIST round-trips exactly.
    box = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    box = np.clip(box, 0.0, 1.0)
    box = np.where(_dilate(box >= NOISE_FLOOR, 1), box, 0.0)  # LANCZOS ringing: faint specks off the strokes
    return np.where(box >= 0.5 / 255.0, box, 0.0)  # what rounds to 0 in the uint8 view is not ink


def _trim(box: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(box.any(axis=1))[0], np.nonzero(box.any(axis=0))[0]
    return box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def mnist_layout(ink: np.ndarray, name: str = "image") -> np.ndarray:
    """uint8 (28, 28): the ink's bounding box scaled to a longer side of 20 px, centre of mass centred.

    The view always has an ink box whose longer side is exactly 20 px and its centre of mass within
    1 px of (14, 14); ink too lopsided for that (its centre of mass within 5 px of one end of its
    box) is an ImageError rather than a digit pushed off-centre.
    """
    if not (ink > 0).any():
        raise ImageError(f"{name}: is blank (no ink); draw or photograph a digit")
    box = _trim(np.where(ink > 0, ink, 0.0).astype(np.float32))
    for _ in range(3):  # resampling can fade an edge row to nothing: fit the visible ink again
        box = _fit_box(box)
        if not box.any():
            raise ImageError(f"{name}: its ink is too faint or too small to read")
        trimmed = _trim(box)
        if max(trimmed.shape) == DIGIT_BOX and trimmed.shape == box.shape:
            break
        box = trimmed
    else:
        if max(box.shape) != DIGIT_BOX:
            raise ImageError(f"{name}: its ink cannot be laid out as a digit")
    box = np.round(box * 255.0) / 255.0  # centre the mass the uint8 view will have
    mass = box.sum()
    ys, xs = np.indices(box.shape)
    centre_y, centre_x = float((ys * box).sum() / mass), float((xs * box).sum() / mass)
    # Keep the box inside the field; that moves a lopsided digit's centre of mass by at most 1 px
    # (a '7' with a long bar), and ink more lopsided than that is no digit the model knows.
    top = min(max(round(CENTRE - centre_y), 0), IMAGE_SIZE - box.shape[0])
    left = min(max(round(CENTRE - centre_x), 0), IMAGE_SIZE - box.shape[1])
    if abs(top + centre_y - CENTRE) > 1.0 or abs(left + centre_x - CENTRE) > 1.0:
        raise ImageError(f"{name}: its ink is too lopsided to centre like an MNIST digit (crop the image to the digit)")
    field = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    field[top : top + box.shape[0], left : left + box.shape[1]] = box
    return np.round(field * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- the whole path


# For each EXIF orientation: stored (u, v) from upright (u, v), as fractions of the width and height
_STORED_FROM_UPRIGHT = {
    1: lambda u, v: (u, v),
    2: lambda u, v: (1 - u, v),
    3: lambda u, v: (1 - u, 1 - v),
    4: lambda u, v: (u, 1 - v),
    5: lambda u, v: (v, u),
    6: lambda u, v: (v, 1 - u),
    7: lambda u, v: (1 - v, 1 - u),
    8: lambda u, v: (1 - v, u),
}


def _detail(image: Image.Image, orientation: int, ink: np.ndarray, name: str) -> np.ndarray:
    """The digit's ink cut again from the full-resolution pixels when it is small at working size.

    A 40 px digit on a 2000 px canvas is 10 px after the reduction to WORK_SIDE: the digit is found
    there, then its neighbourhood is cropped from the decoded image (reduced only so that the digit
    is at most 2 x DETAIL_SIDE px) and read again. Returns `ink` when no re-cut is needed or possible.
    """
    rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    height, width = ink.shape
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    full = max(image.size) / max(height, width)  # decoded pixels per working pixel
    if extent >= DETAIL_SIDE or full < 1.5:
        return ink
    margin = 0.5 * extent + 2
    corners = [
        _STORED_FROM_UPRIGHT[orientation](u, v)
        for u in (max(0.0, cols[0] - margin) / width, min(width, cols[-1] + 1 + margin) / width)
        for v in (max(0.0, rows[0] - margin) / height, min(height, rows[-1] + 1 + margin) / height)
    ]
    us, vs = [u for u, _ in corners], [v for _, v in corners]
    box = (
        math.floor(min(us) * image.width),
        math.floor(min(vs) * image.height),
        math.ceil(max(us) * image.width),
        math.ceil(max(vs) * image.height),
    )
    factor = max(1, int(extent * full) // (2 * DETAIL_SIDE))
    try:
        crop = _workable(image.crop(box))
        crop = crop.reduce(factor) if factor > 1 else crop
        if orientation != 1:
            crop = crop.transpose(_ORIENTATION[orientation])
        gray = grayscale(crop)
        if min(gray.shape) < 8:
            return ink
        fine = flat_field(gray, name)
        mask = digit_mask(fine)
        return fine * mask if mask.any() else ink
    except (ImageError, ValueError, OSError):
        return ink


def preprocess_view(source: ImageSource) -> np.ndarray:
    """Any image (path, bytes or Pillow image) -> the 28x28 uint8 view the model sees.

    Raises ImageError (one line naming the image) for a missing, empty, non-image, truncated,
    oversized or blank file, or pixels that cannot be used.
    """
    name = _name(source)
    try:
        return _view(source, name)
    except MemoryError:  # (a decoder's allocation the limits above did not foresee: one line, never a traceback)
        raise ImageError(f"{name}: needs more memory to decode than this process can get") from None


def _view(source: ImageSource, name: str) -> np.ndarray:
    """preprocess_view's work."""
    image = open_image(source, max_decoded_side=2 * WORK_SIDE)
    orientation = _orientation(image)
    try:
        gray = upright_grey(image, orientation)
    except ImageError as error:
        raise ImageError(f"{name}: {error}") from None
    ink = ink_map(gray, name)
    if ink.any():
        ink = _detail(image, orientation, ink, name)
        if min(gray.shape) >= SMALL_SIDE:  # (a smaller image is at MNIST's scale: it stays as it is)
            ink = _thickened(_thinned(ink))
    return mnist_layout(ink, name)
