"""preprocess.py on what people really upload: EXIF orientation, uneven light, ruled paper, specks,
every Pillow mode and pixel type - property-based (hypothesis) where the inputs are open-ended."""

from __future__ import annotations

import functools
import io
import itertools
import json
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from budget import examples  # fewer examples in the fast subset
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter
from PIL.PngImagePlugin import PngInfo
from scipy import ndimage

from digitsum import cli, preprocess
from digitsum.preprocess import ImageError, NotAnImageError, preprocess_view
from test_predict import encoded, ink_box

ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
# ^ for each EXIF value, how a camera stores upright pixels so that the tag turns them back upright


def seven(size=(280, 280), ink=0, paper=255, width=22, offset=(0, 0)) -> Image.Image:
    """A '7' drawn with dark strokes on a light canvas (the web page's style)."""
    image = Image.new("L", size, paper)
    kx, ky = size[0] / 280, size[1] / 280
    k = min(kx, ky)
    dx, dy = offset
    points = [(70 * k + dx, 60 * k + dy), (210 * k + dx, 60 * k + dy), (120 * k + dx, 230 * k + dy)]
    ImageDraw.Draw(image).line(points, fill=ink, width=max(1, round(width * k)), joint="curve")
    return image


def centre_of_mass(view: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(view.shape)
    mass = view.astype(float).sum()
    return float((ys * view).sum() / mass), float((xs * view).sum() / mass)


def assert_error_or_mnist_view(source) -> None:
    """The any-image property: `source` gives a one-line ImageError or a 28x28 uint8 view whose ink
    box's longer side is 20 px with its centre of mass within 1 px of (14, 14)."""
    try:
        view = preprocess_view(source)
    except ImageError as error:
        assert "\n" not in str(error) and str(error)
        return
    assert view.shape == (28, 28) and view.dtype == np.uint8
    assert max(ink_box(view)) == 20
    centre_y, centre_x = centre_of_mass(view)
    assert abs(centre_y - 14) <= 1 and abs(centre_x - 14) <= 1


def similar(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two views (1 = the same picture), the best over shifts of up to 1 px
    (a rounding of the centre of mass moves a view by one pixel)."""
    a = a.astype(float)
    padded = np.pad(b.astype(float), 1)
    return max(
        float(np.corrcoef(a.ravel(), padded[1 + dy : 29 + dy, 1 + dx : 29 + dx].ravel())[0, 1])
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    )


REFERENCE = preprocess_view(seven())


# ----------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("format", ["JPEG", "PNG", "TIFF", "WEBP", "HEIF"])  # (HEIF: as rotation/mirror properties)
def test_every_exif_orientation_is_applied_before_anything_else(orientation, format):
    upright = seven((280, 360)).convert("RGB")
    stored = upright.transpose(ORIENTATIONS[orientation]) if orientation != 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    view = preprocess_view(encoded(stored, format, exif=exif.tobytes()))
    assert similar(view, preprocess_view(upright)) > 0.95


def test_a_heic_photo_reads_as_the_same_picture_saved_as_png():
    # what an iPhone saves: HEIF/HEIC (libheif through pillow-heif); a lit page, a large one too
    for size in ((360, 280), (1500, 1200)):
        photo = lit(seven(size), 0.4).convert("RGB")
        data = encoded(photo, "HEIF", quality=80)
        assert preprocess.open_image(data).format == "HEIF"
        assert similar(preprocess_view(data), preprocess_view(encoded(photo, "PNG"))) > 0.95


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["L", "RGB", "RGBA"]),
    size=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    content=st.sampled_from(["noise", "flat", "strokes"]),
    orientation=st.integers(0, 12),  # 0 and 9..12 are invalid values
    seed=st.integers(0, 2**32 - 1),
)
def test_any_heic_gives_an_image_error_or_an_mnist_style_view(mode, size, content, orientation, seed):
    # the any-image property for HEIF (kept apart: x265 takes seconds to encode the large images
    # of the general one)
    rng = np.random.default_rng(seed)
    gray = np.full(size[::-1], int(rng.integers(0, 256)), np.uint8)
    if content == "noise":
        gray = rng.integers(0, 256, size[::-1], dtype=np.uint8)
    elif content == "strokes":
        picture = Image.fromarray(gray)
        ends = [tuple(int(value) for value in rng.integers(0, size)) for _ in range(2)]
        ImageDraw.Draw(picture).line(ends, fill=0, width=int(rng.integers(1, 20)))
        gray = np.asarray(picture)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(Image.fromarray(gray).convert(mode), "HEIF", exif=exif.tobytes())
    assert_error_or_mnist_view(data)


@pytest.mark.parametrize("orientation", [1, 6, 7])
def test_a_large_heic_is_read_in_strips_as_pillows_plugin_reads_it_turned_upright(orientation):
    upright = lit(seven((1300, 1100)), 0.3).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(ORIENTATIONS[orientation]) if orientation != 1 else upright
    data = encoded(stored, "HEIF", quality=80, exif=exif.tobytes())
    image = preprocess.open_image(data, max_decoded_side=1024)
    assert image.info[preprocess.DECODER_KEY] == "libheif in strips" and image.size == upright.size
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data)).convert("L")))
    assert similar(preprocess_view(data), preprocess_view(encoded(upright, "PNG"))) > 0.95


@pytest.mark.parametrize("max_decoded_side", [16, None])
def test_a_heic_whose_primary_picture_is_not_its_first_reads_the_primary(max_decoded_side):
    # (a HEIF opens at its primary picture; the first-frame rule of GIF and TIFF must not move it)
    black, white = Image.new("RGB", (64, 48), 0), Image.new("RGB", (64, 48), (255, 255, 255))
    buffer = io.BytesIO()
    black.save(buffer, "HEIF", save_all=True, append_images=[white], primary_index=1)
    image = preprocess.open_image(buffer.getvalue(), max_decoded_side=max_decoded_side)
    assert np.asarray(image.convert("L")).mean() > 250


def test_a_large_heic_with_transparency_is_left_to_pillows_plugin():
    canvas = seven((1300, 1100)).convert("RGBA")
    canvas.putalpha(seven((1300, 1100)).point(lambda v: 255 - v))
    data = encoded(canvas, "HEIF", quality=90)
    assert preprocess.DECODER_KEY not in preprocess.open_image(data, max_decoded_side=1024).info
    assert similar(preprocess_view(data), REFERENCE) > 0.9


@pytest.mark.parametrize("damage", ["truncated", "garbage in the middle", "garbage in the header"])
def test_a_damaged_heic_is_a_one_line_error_or_a_view(damage):
    data = bytearray(encoded(seven((500, 400)).convert("RGB"), "HEIF", quality=70))
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        at = len(data) // 2 if damage == "garbage in the middle" else 24
        data[at : at + 64] = bytes(range(64))
    try:
        view = preprocess_view(bytes(data))
    except ImageError as error:
        assert "\n" not in str(error) and str(error)
    else:  # (libde265 decodes damaged HEVC data to some picture without complaint)
        assert view.shape == (28, 28) and view.dtype == np.uint8


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_damaged_exif_block_reads_the_pixels_as_stored():
    image = seven().convert("RGB")
    data = encoded(image, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12")  # truncated IFD
    assert similar(preprocess_view(data), preprocess_view(image)) > 0.95


# ----------------------------------------------------------------------------- light, paper, marks


def lit(image: Image.Image, depth: float, direction: str = "x") -> Image.Image:
    """The picture under light that falls linearly by `depth` across it (a desk lamp or a window)."""
    values = np.asarray(image, np.float32)
    ramp = np.linspace(1.0, 1.0 - depth, values.shape[1 if direction == "x" else 0], dtype=np.float32)
    light = ramp[None, :] if direction == "x" else ramp[:, None]
    return Image.fromarray(np.round(values * light).astype(np.uint8))


@pytest.mark.parametrize("depth", [0.3, 0.5])
@pytest.mark.parametrize("direction", ["x", "y"])
def test_a_lighting_gradient_of_up_to_half_the_paper_brightness_is_not_ink(depth, direction):
    view = preprocess_view(lit(seven(), depth, direction))
    assert similar(view, REFERENCE) > 0.9


def test_a_shadow_edge_across_the_page_is_not_ink():
    values = np.asarray(seven(), np.float32)
    values[:, 150:] *= 0.55  # a hard shadow over the right part of the page and of the digit
    view = preprocess_view(Image.fromarray(values.astype(np.uint8)))
    assert similar(view, REFERENCE) > 0.9


@pytest.mark.parametrize("colour", [(150, 190, 235), (60, 60, 60)])
def test_ruled_lines_spanning_the_page_are_not_the_digit(colour):
    page = seven((400, 400), width=14).convert("RGB")
    draw = ImageDraw.Draw(page)
    for y in range(30, 400, 45):
        draw.line([(0, y), (399, y + 6)], fill=colour, width=2)  # slightly tilted, as in a photo
    view = preprocess_view(page)
    assert similar(view, preprocess_view(seven((400, 400), width=14))) > 0.9


def test_squared_paper_is_not_the_digit():
    page = seven((400, 400), width=14).convert("RGB")
    draw = ImageDraw.Draw(page)
    for k in range(0, 400, 25):
        draw.line([(k, 0), (k, 399)], fill=(170, 170, 175), width=1)
        draw.line([(0, k), (399, k)], fill=(170, 170, 175), width=1)
    page = Image.composite(
        seven((400, 400), width=14).convert("RGB"), page, seven((400, 400), width=14).point(lambda v: 255 if v < 128 else 0)
    )  # the pen goes over the grid
    view = preprocess_view(page)
    assert similar(view, preprocess_view(seven((400, 400), width=14))) > 0.9


def notebook_page(degrees: float, margin_gap: int, squared: bool = False) -> Image.Image:
    """A thin-pen 7 on notebook paper photographed askew: blue ruling (or a grey grid) and a red
    margin line 4 px wide `margin_gap` px left of the 7, all turned by `degrees`."""
    page = Image.new("RGB", (560, 560), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    for k in range(-40, 600, 24 if squared else 45):
        draw.line([(-40, k), (600, k)], fill=(170, 170, 175) if squared else (150, 190, 235), width=2)
        if squared:
            draw.line([(k, -40), (k, 600)], fill=(170, 170, 175), width=2)
    draw.line([(190 - margin_gap, -40), (190 - margin_gap, 600)], fill=(220, 80, 90), width=4)
    ImageDraw.Draw(page).line([(190, 180), (330, 180), (240, 360)], fill=(20, 20, 30), width=8, joint="curve")
    return page.rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255)).crop((80, 80, 480, 480))


@pytest.mark.parametrize("degrees", [-8, -4, 3, 6])
@pytest.mark.parametrize("squared", [False, True])
def test_a_notebooks_ruling_and_margin_line_photographed_askew_are_not_the_digit(degrees, squared):
    # An independent generator's ruled pages turned up to 5 degrees, the red margin line 3-35% of
    # the digit's height left of it: 24 of 60 read as the margin line ("1") or a digit shrunk beside
    # it. The line search ran along the rows and columns only (a degree or two of tilt).
    page = notebook_page(degrees, margin_gap=30, squared=squared)
    alone = Image.new("RGB", (560, 560), (255, 255, 255))
    ImageDraw.Draw(alone).line([(190, 180), (330, 180), (240, 360)], fill=(20, 20, 30), width=8, joint="curve")
    alone = alone.rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255)).crop((80, 80, 480, 480))
    assert similar(preprocess_view(page), preprocess_view(alone)) > 0.85  # (0.5-0.66 before)


@pytest.mark.parametrize("degrees", [0.0, 2.0, 5.0, -9.0])
def test_a_tilted_line_from_edge_to_edge_is_found_and_a_tilted_stroke_inside_is_not(degrees):
    mask = np.zeros((300, 400), bool)
    slope = np.tan(np.radians(degrees))
    columns = np.arange(400)
    mask[np.round(150 + slope * (columns - 200)).astype(int), columns] = True  # across the whole width
    rows = np.arange(40, 260)
    mask[rows, np.round(100 + slope * (rows - 150)).astype(int)] = True  # a long stroke ending inside
    mask = preprocess._dilate(mask, 1)
    lines = preprocess._straight_lines(mask)
    assert lines[:, 150:250].sum() >= 0.9 * mask[:, 150:250].sum() - mask[40:260, 95:106].sum()
    crossing = round(150 - 100 * slope)  # (where the line crosses the stroke)
    assert not lines[60 : crossing - 12, 90:110].any() and not lines[crossing + 12 : 240, 90:110].any()


def scanned_page(holes: int, pen: int, turn: float, wedges: bool = True) -> Image.Image:
    """A scan of a punched page: `holes` black holes (the scanner's lid) down the left margin, the
    page `turn` degrees askew (black wedges at its edges, or none), the page's edge a dark band
    at the bottom, and a 7 drawn with a `pen` px pen in the middle."""
    page = Image.new("L", (420, 594), 245)
    draw = ImageDraw.Draw(page)
    for k in range(holes):
        y = 594 * (k + 1) // (holes + 1)
        draw.ellipse([10, y - 11, 32, y + 11], fill=15)
    draw.line([(170, 250), (270, 250), (205, 380)], fill=30, width=pen, joint="curve")
    page = page.rotate(turn, resample=Image.Resampling.BICUBIC, fillcolor=0 if wedges else 245)
    ImageDraw.Draw(page).rectangle([0, 585, 419, 593], fill=25)
    return page


@pytest.mark.parametrize("holes", [2, 4])
@pytest.mark.parametrize("pen", [2, 10])
@pytest.mark.parametrize("turn", [-2.0, 1.0])
def test_a_scanned_pages_binder_holes_are_not_the_digit(holes, pen, turn):
    # An independent generator's binder scans: 9 of 60 read as a hole ("0") - darker and heavier
    # than a fine pen's digit, or held in a "ring" of the digit and the scan's dark edges (_rings).
    # (Before _round_blobs, 123 of 288 such pages - 2-4 holes, 2-10 px pens, turns, places - read
    # a hole; 0 after.)
    clean = scanned_page(0, pen, turn, wedges=False)
    assert similar(preprocess_view(scanned_page(holes, pen, turn)), preprocess_view(clean)) > 0.9


def test_a_marker_digit_with_a_filled_loop_is_still_the_digit():
    # The other side of _round_blobs: a solid round blob is dropped only beside much thinner
    # strokes. A marker 9 whose loop filled up is one component with its tail: no blob.
    page = Image.new("L", (400, 400), 250)
    draw = ImageDraw.Draw(page)
    draw.ellipse([140, 80, 260, 200], fill=20)
    draw.line([(255, 140), (225, 340)], fill=20, width=24)
    view = preprocess_view(page)
    assert view.sum() > 0 and view[4:14].sum() > 0.3 * view.sum()  # the loop is there, at the top


def test_dark_specks_and_stray_marks_away_from_the_digit_are_ignored():
    page = seven((400, 400))
    draw = ImageDraw.Draw(page)
    rng = np.random.default_rng(0)
    for _ in range(40):
        x, y = rng.integers(0, 400, 2)
        if 60 < x < 330 and 50 < y < 350:
            continue
        draw.ellipse([x, y, x + rng.integers(1, 5), y + rng.integers(1, 5)], fill=int(rng.integers(0, 100)))
    draw.line([(350, 380), (390, 385)], fill=0, width=3)  # a stray pen mark in a corner
    assert similar(preprocess_view(page), preprocess_view(seven((400, 400)))) > 0.97


def bold_eight(paper: float = 255, inside: float | None = None) -> Image.Image:
    """An '8' drawn with a felt marker so wide that its loops closed: two overlapping discs of ink
    (the lower one 250 px across, wider than any closing window a third of the image allows), or,
    with `inside`, the same two rings drawn with a normal pen whose insides have that grey. A photo:
    sensor noise on every pixel (a drawing app's exact-colour canvas is read without lighting)."""
    image = Image.new("L", (400, 400), int(paper))
    draw = ImageDraw.Draw(image)
    for box in ([110, 20, 290, 170], [75, 140, 325, 390]):
        if inside is None:
            draw.ellipse(box, fill=30)
        else:
            draw.ellipse(box, fill=int(inside), outline=30, width=12)
    noise = np.random.default_rng(0).normal(0, 3, (400, 400))
    return Image.fromarray(np.clip(np.asarray(image, np.float64) + noise, 0, 255).round().astype(np.uint8))


def test_a_marker_blob_wider_than_the_lighting_window_is_ink_not_paper():
    view = preprocess_view(encoded(bold_eight()))
    assert view[15:19, 12:16].min() > 200  # the lower blob's middle is ink, not a hollow outline's paper
    assert (view > 128).mean() > 0.15


@pytest.mark.parametrize("shade", [0.5, 0.7])
def test_a_wide_loop_whose_inside_is_in_shade_keeps_the_inside_as_paper(shade):
    # The lower ring's inside, wider than the lighting window, shaded to half the paper's
    # brightness: not as dark as the pen, so not a marker's blob (_filled_blobs leaves it).
    view = preprocess_view(encoded(bold_eight(inside=255 * shade)))
    assert view[16:20, 12:16].max() < 60 and view[17:19].max() > 100  # paper inside, ink around


def test_a_marker_stroke_is_thinned_to_an_mnist_pen_width():
    bold, plain = seven((400, 400), width=48), seven((400, 400), width=24)
    widths = {}
    for name, image in (("bold", bold), ("plain", plain)):
        gray = np.asarray(image, np.float32) / 255
        ink = preprocess.ink_map(gray)
        rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
        extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
        width = preprocess._stroke_width(ink >= 0.5) * preprocess.DIGIT_BOX / extent
        thinned = preprocess._thinned(ink)
        t_rows, t_cols = np.nonzero(thinned.any(axis=1))[0], np.nonzero(thinned.any(axis=0))[0]
        t_extent = max(t_rows[-1] - t_rows[0], t_cols[-1] - t_cols[0]) + 1
        widths[name] = (width, preprocess._stroke_width(thinned >= 0.5) * preprocess.DIGIT_BOX / t_extent, thinned is ink)
    width, after, unchanged = widths["bold"]
    assert width > preprocess.BOLD_STROKE and not unchanged
    assert abs(after - preprocess.THIN_TO) < 0.5  # about an MNIST pen's width in the 20 px box
    width, after, unchanged = widths["plain"]
    assert width <= preprocess.BOLD_STROKE and unchanged  # an ordinary pen is left alone
    assert similar(preprocess_view(bold), preprocess_view(plain)) > 0.9  # the marker's 7 reads like the pen's


def test_a_digit_whose_thin_stroke_would_vanish_is_not_thinned():
    # A '7' with a bold bar and a hairline diagonal (a brush): eroding the bar to a pen's width
    # would erase the diagonal, so nothing is thinned.
    page = Image.new("L", (400, 400), 255)
    draw = ImageDraw.Draw(page)
    draw.line([(90, 80), (310, 80)], fill=0, width=70)
    draw.line([(300, 110), (170, 360)], fill=0, width=6)
    ink = preprocess.ink_map(np.asarray(page, np.float32) / 255)
    assert preprocess._thinned(ink) is ink


def stroke_lists(max_pen: int):
    """Up to 4 straight strokes, ends anywhere (fractions of the map's size), pens 1..max_pen px."""
    return st.lists(
        st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.integers(1, max_pen)),
        min_size=1,
        max_size=4,
    )


def stroke_map(height: int, width: int, strokes) -> np.ndarray:
    """An ink map (float32, 1 = ink) of `strokes` drawn on a height x width field."""
    page = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(page)
    for x0, y0, x1, y1, pen in strokes:
        draw.line([(x0 * width, y0 * height), (x1 * width, y1 * height)], fill=255, width=pen)
    return np.asarray(page, np.float32) / 255


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(48, 200), st.integers(48, 200), stroke_lists(40))
def test_thinning_only_ever_removes_ink_and_never_splits_the_strokes(height, width, strokes):
    # Any ink map of strokes of any width: _thinned gives the map back, or one of the same shape
    # with no pixel stronger than before, strong ink left, and no more strong pieces than before.
    ink = stroke_map(height, width, strokes)
    if not ink.any():
        return
    thinned = preprocess._thinned(ink)
    if thinned is ink:
        return
    eight = np.ones((3, 3), bool)
    assert thinned.shape == ink.shape and thinned.dtype == ink.dtype and (thinned <= ink).all()
    pieces = ndimage.label(thinned >= preprocess.STRONG_INK, structure=eight)[1]
    assert 0 < pieces <= ndimage.label(ink >= preprocess.STRONG_INK, structure=eight)[1]


def test_a_hairline_digit_on_a_large_canvas_is_widened_to_a_pen():
    # A 1-3 px brush on a 1,500 px canvas: scaled to 20 px, the strokes would fade to specks.
    for pen in (1, 3):
        hairline = seven((1500, 1500), width=pen * 280 / 1500)
        view = preprocess_view(encoded(hairline))
        assert similar(view, REFERENCE) > 0.9
        box = view[view.any(axis=1)][:, view.any(axis=0)].astype(np.float32) / 255
        assert preprocess._area_width(box) >= preprocess.THIN_STROKE
        assert ndimage.label(view >= 100, structure=np.ones((3, 3)))[1] == 1  # one stroke, not specks


def test_an_ordinary_pen_is_not_widened():
    ink = preprocess.ink_map(np.asarray(seven((400, 400), width=24), np.float32) / 255)
    assert preprocess._thickened(ink) is ink


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(48, 600), st.integers(48, 600), stroke_lists(12))
def test_widening_never_splits_the_strokes_and_leaves_them_at_least_a_thin_pens_width(height, width, strokes):
    # Any ink map of strokes: _thickened gives the map back, or a box no stronger than the ink, in
    # no more pieces, whose strokes are at least THIN_STROKE wide at the 20 px scale.
    ink = stroke_map(height, width, strokes)
    if not ink.any():
        return
    widened = preprocess._thickened(ink)
    if widened is ink:
        return
    eight = np.ones((3, 3), bool)
    assert widened.dtype == np.float32 and widened.max() <= ink.max()
    assert 0 < ndimage.label(widened >= preprocess.STRONG_INK, structure=eight)[1] <= ndimage.label(ink > 0, structure=eight)[1]
    box = widened[widened.any(axis=1)][:, widened.any(axis=0)]
    assert preprocess._area_width(box) * preprocess.DIGIT_BOX / max(box.shape) >= preprocess.THIN_STROKE


def test_a_bold_digit_cropped_to_its_edges_reads_as_with_paper_around_it():
    # An '8' in a marker, its loops as wide as its strokes, cut out so tightly that it crosses the
    # image's edge: the border is still mostly paper, so the paper (not the loops) is the ground.
    page = Image.new("L", (400, 400), 250)
    draw = ImageDraw.Draw(page)
    draw.ellipse([125, 30, 275, 180], outline=25, width=45)
    draw.ellipse([105, 160, 295, 370], outline=25, width=45)
    noise = np.random.default_rng(0).normal(0, 2, (400, 400))
    page = Image.fromarray(np.clip(np.asarray(page, np.float64) + noise, 0, 255).round().astype(np.uint8))
    tight = page.crop((107, 32, 293, 368))  # 2 px inside the ink's box: strokes cut at all four sides
    assert similar(preprocess_view(encoded(tight, "JPEG", quality=90)), preprocess_view(encoded(page))) > 0.9


def on_desk(sheet: Image.Image, desk: int, size=(640, 480), at=(150, 90), turn: float = 3.0) -> bytes:
    """A phone photo of `sheet` lying on a desk of grey `desk`, turned a little, with sensor noise."""
    photo = Image.new("L", size, desk)
    photo.paste(sheet, at)
    photo = photo.rotate(turn, resample=Image.Resampling.BICUBIC, fillcolor=desk)
    noisy = np.asarray(photo, np.float64) + np.random.default_rng(0).normal(0, 3, photo.size[::-1])
    return encoded(Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8)), "JPEG", quality=88)


@pytest.mark.parametrize("desk", [30, 90, 130])
def test_a_sheet_photographed_on_a_darker_desk_is_read_without_the_desk_or_its_edges(desk):
    # The desk all round made the desk the "paper" (light ink on it: everything inverted), and the
    # sheet's edges were strokes around the digit.
    view = preprocess_view(on_desk(seven((300, 280), ink=20, paper=245), desk))
    assert similar(view, REFERENCE) > 0.9


@settings(max_examples=examples(30), deadline=None)
@given(
    desk=st.integers(0, 150),
    paper=st.integers(215, 255),
    sheet=st.tuples(st.integers(240, 360), st.integers(240, 420)),
    where=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    turn=st.floats(-6, 6),
    digit=st.tuples(st.floats(0.45, 0.75), st.floats(0.2, 0.8), st.floats(0.2, 0.8)),
)
def test_a_sheet_anywhere_on_any_darker_desk_reads_as_its_digit(desk, paper, sheet, where, turn, digit):
    # A sheet of any size and paper, at any place on a desk of any darker grey, turned a little,
    # with a '7' of any size on it (not run up to its edge): the view is that of the same photo with
    # the desk the sheet's own colour (the desk and the sheet's edges are not ink).
    height, width = sheet
    size, dy, dx = digit
    side = round(size * min(height, width))
    page = Image.new("L", (width, height), paper)
    page.paste(seven((side, side), ink=20, paper=paper), (round(dx * (width - side)), round(dy * (height - side))))
    at = (45 + round(where[0] * (640 - width - 90)), 45 + round(where[1] * (480 - height - 90)))  # in the frame once turned
    view = preprocess_view(on_desk(page, desk, at=at, turn=turn))
    assert similar(view, preprocess_view(on_desk(page, paper, at=at, turn=turn))) > 0.9


def test_a_patch_of_light_is_no_sheet_whose_edge_cuts_the_digit():
    # A patch of sunlight: a bright rectangle with sharp straight edges on a darker ground, like a
    # sheet on a desk. The digit crosses its edge: it is not taken for a sheet (the strokes notch
    # it), or the lit part alone holds no digit (or a cut one): the whole page is read.
    page = np.asarray(seven((480, 480), ink=20, paper=240), np.float64)
    y, x = np.mgrid[0:480, 0:480]
    page *= np.where((x >= 80) & (x < 420) & (y >= 40) & (y < 250), 1.0, 0.55)
    view = preprocess_view(encoded(Image.fromarray(page.round().astype(np.uint8)), "JPEG", quality=90))
    assert similar(view, REFERENCE) > 0.9


def test_a_bold_light_ring_on_black_is_no_sheet():
    # A bold white '0' on black: its strokes are a bright region filling over 75% of its hull, like a
    # sheet with a digit on it; read as one, the dark hole was "the digit" (a filled blob). Its
    # outline is an ellipse, no quadrilateral (the largest one inside covers 2/pi of it).
    ring = Image.new("L", (300, 300), 0)
    ImageDraw.Draw(ring).ellipse((80, 40, 220, 260), outline=255, width=50)
    gray = np.asarray(ring, np.float32) / 255
    assert preprocess._page(gray) is None
    view = preprocess_view(encoded(ring))
    assert view[14, 14] < 60 and view[14, 6:11].max() > 200  # a ring: dark centre, bright stroke


def test_a_sheet_seen_at_an_angle_with_a_bold_digit_near_its_edge_reads_as_the_digit():
    # A phone held at an angle: the sheet is a trapezoid; a bold '7' written near its right edge
    # notches a third of the bright region away, and its strokes are as dark as the desk.
    sheet = seven((300, 300), ink=25, paper=240, width=55, offset=(40, 0))
    photo = Image.new("L", (640, 480), 35)
    photo.paste(sheet, (170, 90))
    coefficients = Image.Transform.PERSPECTIVE
    matrix = (1.0, 0.12, -30.0, 0.0, 1.1, -20.0, 0.0, 0.0002, 1.0)  # output -> input: a keystoned view
    photo = np.asarray(photo.transform(photo.size, coefficients, matrix, Image.Resampling.BICUBIC, fillcolor=35), np.float64)
    photo += np.random.default_rng(0).normal(0, 3, photo.shape)  # a camera's noise (no drawing app's exact colours)
    view = preprocess_view(encoded(Image.fromarray(np.clip(photo, 0, 255).round().astype(np.uint8)), "JPEG", quality=88))
    assert similar(view, REFERENCE) > 0.8  # (0.16 before: the sheet itself was read as light ink)


@pytest.mark.parametrize("chrome", [30, 70])
def test_a_screenshot_of_a_drawing_app_reads_the_canvas_not_its_toolbars(chrome):
    # Dark window chrome with light icons on three sides (a toolbar, a palette), the white canvas
    # running up to the window's right edge: the canvas is the sheet (a square outline; one side of
    # the image mostly bright is allowed to it). Before: the chrome and icons were read with the
    # digit ("too lopsided to centre").
    image = Image.new("L", (800, 600), chrome)
    draw = ImageDraw.Draw(image)
    for k in range(12):
        draw.rectangle((12, 70 + 38 * k, 40, 96 + 38 * k), outline=200, width=3)
        draw.ellipse((90 + 55 * k, 560, 120 + 55 * k, 590), fill=200)
    image.paste(seven((748, 490), ink=20, paper=255, width=30), (52, 50))
    pixels = np.asarray(image, np.float64) + np.random.default_rng(0).normal(0, 2, (600, 800))  # (not exact colours)
    view = preprocess_view(encoded(Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))))
    assert similar(view, REFERENCE) > 0.9


@pytest.mark.parametrize("where", ["left", "bottom"])
def test_a_toolbar_drawn_on_the_canvas_along_an_edge_is_not_the_digit(where):
    # A light screenshot: the tool strip (a ladder of icon boxes, more ink than a thin digit) lies
    # on the white canvas itself within 10% of an edge, so no sheet's outline leaves it out.
    # Before: the strip on the left was read as a '1' (the one along the bottom was not).
    def page(toolbar: bool) -> bytes:
        image = Image.new("L", (800, 600), 250)
        image.paste(seven((200, 200), ink=40, paper=250, width=14), (330, 200))
        draw = ImageDraw.Draw(image)
        for k in range(14 if toolbar else 0):
            box = (14, 40 + 36 * k, 52, 76 + 36 * k) if where == "left" else (60 + 48 * k, 552, 108 + 48 * k, 588)
            draw.rectangle(box, outline=60, width=4)
        return encoded(lit(image, 0.15), "JPEG", quality=90)

    assert similar(preprocess_view(page(toolbar=True)), preprocess_view(page(toolbar=False))) > 0.9


def phone_screenshot(theme: str, ink: int = 90) -> Image.Image:
    """A drawing app on a 1080x2340 phone screen: status bar, title bar with its title, a white
    canvas holding a grey 7, a bottom bar of colour dots (one black) and a "Clear" button."""
    bar, text = (40, 230) if theme == "dark" else (235, 30)
    screen = Image.new("L", (1080, 2340), 255)
    draw = ImageDraw.Draw(screen)
    draw.rectangle((0, 0, 1080, 190), fill=bar)
    draw.text((40, 20), "12:34", fill=text, font_size=40)
    draw.text((90, 110), "Canvas", fill=text, font_size=56)
    draw.rectangle((0, 2140, 1080, 2340), fill=bar)
    for k, dot in enumerate((0, 90, 130, 170, 250)):
        draw.ellipse((40 + 130 * k, 2190, 130 + 130 * k, 2280), fill=dot)
    draw.text((860, 2200), "Clear", fill=text, font_size=56)
    screen.paste(seven((600, 600), ink=ink, width=12), (240, 800))
    return screen


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_a_screenshot_of_a_drawing_app_is_read_by_its_canvas(theme):
    # Before: the title, a colour dot or "Clear" was taken for the digit, or the canvas for light ink.
    screen = phone_screenshot(theme)
    assert preprocess._screen_canvas(preprocess.upright_grey(screen)) is not None
    assert similar(preprocess_view(encoded(screen)), preprocess_view(seven((600, 600), ink=90, width=12))) > 0.95


def test_clipped_white_that_a_digit_runs_out_of_is_no_canvas():
    # A photo's overexposed paper: one exact level over most of the image, but the digit crosses the
    # region's edge into the lit paper below it, so the region's box is no canvas (the photo path reads it).
    page = np.full((800, 600), 255.0)
    page[500:] = np.linspace(250, 200, 300)[:, None]
    page = np.minimum(page, np.asarray(seven((600, 800), ink=30, width=14), np.float64))
    gray = preprocess.upright_grey(Image.fromarray(page.round().astype(np.uint8)))
    assert preprocess._screen_canvas(gray) is None


def test_a_small_digit_near_an_edge_with_nothing_else_is_still_read():
    page = Image.new("L", (900, 700), 245)
    page.paste(seven((60, 60), ink=30, paper=245, width=20), (4, 320))  # wholly within 10% of the left edge
    view = preprocess_view(encoded(lit(page, 0.2), "JPEG", quality=90))
    assert similar(view, REFERENCE) > 0.85


def test_a_hard_shadow_over_most_of_the_page_is_not_a_dark_ground():
    # A shadow at 45% light covers the whole border and most of the page (a hand, a phone); the
    # digit lies in it, a lit patch above. The border's one level is the shadow, not the paper.
    page = np.asarray(seven((400, 400), ink=20, paper=240, offset=(0, 60)), np.float64)
    y, x = np.mgrid[0:400, 0:400]
    page *= np.where((y > 40) & (y < 150) & (x > 60) & (x < 340), 1.0, 0.45)
    gray = np.clip(page, 0, 255).round().astype(np.uint8)
    assert preprocess._ink_is_dark(gray.astype(np.float32) / 255)
    assert similar(preprocess_view(encoded(Image.fromarray(gray), "JPEG", quality=90)), REFERENCE) > 0.9


@pytest.mark.parametrize(
    "band", [((600, 0), (330, 300)), ((0, 80), (330, 330)), ((600, 520), (200, 200)), ((300, 600), (330, 250))]
)
@pytest.mark.parametrize("width", [60, 90])
def test_a_cast_shadow_band_narrower_than_the_lighting_window_is_not_ink(band, width):
    # The shadow of a pen or a phone's edge: a hard-edged band at 45% light from the image's edge,
    # 3-4 stroke widths wide, often diagonal, ending on the page, crossing or beside the digit.
    # Before: the closing (a square window of about three stroke widths) took it for ink.
    page = np.asarray(seven((600, 600), ink=25, paper=235, width=10), np.float64)
    shadow = Image.new("L", (600, 600), 0)
    ImageDraw.Draw(shadow).line(band, fill=255, width=width)
    shaded = page * np.where(np.asarray(shadow) > 0, 0.45, 1.0)
    view = preprocess_view(encoded(Image.fromarray(np.clip(shaded, 0, 255).round().astype(np.uint8)), "JPEG", quality=90))
    clean = preprocess_view(encoded(Image.fromarray(page.astype(np.uint8)), "JPEG", quality=90))
    assert similar(view, clean) > 0.95


def test_a_scanners_dark_margin_beside_a_small_digit_is_no_stroke():
    # A page scanned a little askew: a thin dark line along the bottom edge, over most of it (not
    # touching the far side nor the bottom), next to a small digit in a corner. It has more ink
    # than the digit, and one straight line with little other ink would be a thin '1'.
    page = Image.new("L", (1400, 2000), 250)
    page.paste(seven((90, 90), ink=30, paper=250, width=22), (1150, 150))
    ImageDraw.Draw(page).line([(0, 1985), (1100, 1993)], fill=60, width=4)  # (the margin runs out)
    view = preprocess_view(encoded(page, "JPEG", quality=90))
    assert similar(view, REFERENCE) > 0.9


def marked(kind: str, size=(400, 400), width: int = 12) -> Image.Image:
    """seven(size) with a mark drawn by the same pen around or under it, not touching it."""
    page = seven(size, width=width)
    draw = ImageDraw.Draw(page)
    k = min(size) / 400
    if kind == "circle":  # (a hand's circle: not quite closed)
        draw.arc([20 * k, 10 * k, 380 * k, 390 * k], 100, 75, fill=0, width=width)
    elif kind == "circle cut by the frame":
        draw.arc([5 * k, 5 * k, 395 * k, 600 * k], 0, 360, fill=0, width=width)
    elif kind == "box":
        draw.rectangle([50 * k, 40 * k, 350 * k, 370 * k], outline=0, width=width)
    else:
        for y in (360, 385) if kind == "double underline" else (365,):
            draw.line([(70 * k, y * k), (330 * k, (y + 6) * k)], fill=0, width=width)
    return page


@pytest.mark.parametrize("kind", ["circle", "circle cut by the frame", "box", "underline", "double underline"])
@pytest.mark.parametrize("canvas", ["photo", "clean canvas"])
def test_a_circle_box_or_underline_drawn_around_the_digit_is_not_the_digit(kind, canvas):
    page, plain = marked(kind), seven((400, 400), width=12)
    if canvas == "photo":  # (the photo path: uneven light, grain, JPEG)
        page, plain = (encoded(lit(p, 0.3).filter(ImageFilter.GaussianBlur(1)), "JPEG", quality=85) for p in (page, plain))
    assert similar(preprocess_view(page), preprocess_view(plain)) > 0.95


@settings(max_examples=examples(60), deadline=None)
@given(
    kind=st.sampled_from(["circle", "box", "underline", "double underline"]),
    side=st.integers(120, 400),
    pen=st.integers(2, 14),
    gap=st.floats(0.08, 0.4),
    opening=st.floats(0, 40),
    where=st.tuples(st.floats(0.2, 0.8), st.floats(0.2, 0.8)),
    photo=st.booleans(),
)
def test_any_mark_drawn_around_or_under_a_digit_without_touching_it_is_dropped(kind, side, pen, gap, opening, where, photo):
    size = (int(side * 2.6), int(side * 2.2))
    # A pen of at least 2 px at working size (a page over 1,024 px is halved first): a 1 px line
    # breaks into pieces there, and a ring or underline in pieces is not found (ARCHITECTURE 9).
    assume(pen / max(1, max(size) // preprocess.WORK_SIDE) >= 2)
    digit = seven((side, side), ink=0, paper=255, width=pen * 280 / side)  # (the mark's pen: `pen` px)
    page = Image.new("L", size, 250)
    left, top = int(where[0] * (size[0] - side)), int(where[1] * (size[1] - side))
    page.paste(digit, (left, top), mask=digit.point(lambda v: 255 - v))
    box = [
        left + 0.25 * side - gap * side,
        top + 0.21 * side - gap * side,
        left + 0.75 * side + gap * side,
        top + 0.82 * side + gap * side,
    ]
    mark = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mark)
    if kind == "circle":
        wider = [box[0] - 0.2 * side, box[1] - 0.15 * side, box[2] + 0.2 * side, box[3] + 0.15 * side]
        draw.arc(wider, 90 + opening / 2, 90 - opening / 2 + 360, fill=255, width=pen)
    elif kind == "box":
        draw.rectangle(box, outline=255, width=pen)
    else:
        for k in range(2 if kind == "double underline" else 1):
            y = box[3] + k * 3 * pen
            draw.line([(box[0], y), (box[2], y + 0.03 * side)], fill=255, width=pen)
    # Clear of the digit: RING_GAP_PX (3 px) at working size, where a page over 1,024 px is halved.
    near = ndimage.binary_dilation(np.asarray(page) < 200, iterations=7)
    assume(not (near & (np.asarray(mark) > 0)).any())  # (touching, the mark is part of the digit)
    marked_page = Image.composite(Image.new("L", size, 0), page, mark)
    if photo:  # uneven light, blur, JPEG
        marked_page, page = (
            encoded(lit(p, 0.25).filter(ImageFilter.GaussianBlur(1)), "JPEG", quality=88) for p in (marked_page, page)
        )
    assert similar(preprocess_view(marked_page), preprocess_view(page)) > 0.9


def strokes(size, *shapes) -> np.ndarray:
    """An ink map (1 = ink) of lines, arcs and dots drawn 8 px wide."""
    image = Image.new("L", size, 0)
    draw = ImageDraw.Draw(image)
    for kind, *where in shapes:
        if kind == "line":
            draw.line(where, fill=255, width=8)
        elif kind == "arc":  # (a whole ellipse's outline)
            draw.arc(where, 0, 360, fill=255, width=8)
        else:  # a dot
            draw.ellipse(where, fill=255)
    return np.asarray(image, np.float32) / 255


def test_a_fine_pens_eight_broken_into_its_sides_and_middle_is_no_ring():
    # The two sides of an 8's outline (split at its top and bottom) hold its middle cross 2-3 px
    # from them: without RING_GAP's clear gap they would be a ring around a digit.
    y, x = np.mgrid[0:400, 0:400].astype(np.float32)
    outline = np.abs(np.hypot((x - 200) / 90, (y - 200) / 170) - 1) * 90 < 1.5
    outline &= np.abs(x - 200) > 6
    cross = np.minimum(np.abs((y - 200) - 1.6 * (x - 200)), np.abs((y - 200) + 1.6 * (x - 200))) < 1.5
    cross &= ndimage.distance_transform_edt(~outline) > 2.5
    ink = (outline | cross).astype(np.float32)
    assert ndimage.label(ink > 0, structure=np.ones((3, 3), bool))[1] >= 3
    assert (preprocess.digit_mask(ink) >= (ink > 0.5)).all()


def test_a_dark_note_around_a_light_digit_is_no_ring():
    # Read with the wrong polarity (as flat_field's first readings may), a dark note with a light 0
    # on it is an area with a 0-shaped cut holding the 0's inside: no pen draws that (RING_PEN).
    y, x = np.mgrid[0:400, 0:400].astype(np.float32)
    note = (np.abs(x - 200) < 140) & (np.abs(y - 200) < 140)
    zero = np.abs(np.hypot((x - 200) / 60, (y - 200) / 100) - 1) * 60 < 6
    ink = (note & ~zero).astype(np.float32)
    assert (preprocess.digit_mask(ink) >= (ink > 0.5)).all()


@pytest.mark.parametrize(
    "name, pieces",
    [
        # a dotted zero: the dot is a speck in the 0's loop, not a digit the 0 circles
        ("dotted zero", [("arc", 120, 60, 280, 340), ("dot", 188, 188, 212, 212)]),
        # a 7 whose cross-bar was drawn apart: the bar lies in the 7's box, but nothing of the 7 is left of it
        ("seven with a cross-bar", [("line", (80, 60), (320, 60), (160, 340)), ("line", (120, 200), (215, 200))]),
        # a 5's flag, a separate straight stroke with the rest of the 5 below it
        ("five with a flag", [("line", (150, 60), (300, 60)), ("line", (150, 80), (140, 180)), ("arc", 110, 170, 290, 340)]),
        # a 4's bar drawn apart from the rest, with the stem going on below it just beyond its end
        ("four with a bar", [("line", (200, 40), (70, 230)), ("line", (85, 245), (215, 245)), ("line", (235, 40), (235, 360))]),
    ],
)
def test_a_digits_own_separate_strokes_are_no_ring_and_no_underline(name, pieces):
    ink = strokes((400, 400), *pieces)
    assert (preprocess.digit_mask(ink) >= (ink > 0.5)).all()  # every stroke kept


def touching(kind: str) -> Image.Image:
    """seven((400, 400)) with a circle or box drawn around it by the same pen, touching it: the
    circle and the box at the stem's end."""
    page = seven((400, 400), width=12)
    draw = ImageDraw.Draw(page)
    if kind == "circle":
        draw.ellipse([30, 25, 370, 340], outline=0, width=12)
    else:
        draw.rectangle([55, 45, 335, 338], outline=0, width=12)
    return page


@pytest.mark.parametrize("kind", ["circle", "box"])
@pytest.mark.parametrize("canvas", ["photo", "clean canvas"])
def test_a_circle_or_box_touching_the_digit_is_not_the_digit(kind, canvas):
    page, plain = touching(kind), seven((400, 400), width=12)
    assert ndimage.label(np.asarray(page) < 128, structure=np.ones((3, 3), bool))[1] == 1  # one component
    if canvas == "photo":
        page, plain = (encoded(lit(p, 0.3).filter(ImageFilter.GaussianBlur(1)), "JPEG", quality=85) for p in (page, plain))
    # (where they touch, the 7 loses the tip that lies in the ring's line: a little less alike)
    assert similar(preprocess_view(page), preprocess_view(plain)) > 0.9


def test_a_touching_circle_is_dropped_without_opencv_too(monkeypatch):
    with_opencv = preprocess_view(touching("circle"))
    monkeypatch.setattr(preprocess, "_cv2", None)  # scipy's distances and hull instead
    assert similar(preprocess_view(touching("circle")), with_opencv) > 0.98


def figure_eight(width: float, height: float, pen: int = 8) -> np.ndarray:
    """An ink map of an 8 drawn in one stroke (its loops crossing in the middle), 400x400."""
    t = np.linspace(0, 2 * np.pi, 400)
    points = list(zip(200 + width / 2 * np.sin(2 * t), 200 + height / 2 * np.sin(t)))
    image = Image.new("L", (400, 400), 0)
    ImageDraw.Draw(image).line(points, fill=255, width=pen, joint="curve")
    return np.asarray(image, np.float32) / 255


@pytest.mark.parametrize(
    "name, ink",
    [
        # a narrow 8 and a wide one, drawn in one stroke: their outlines leave the hull at the waist
        ("narrow eight", lambda: figure_eight(110, 330)),
        ("eight", lambda: figure_eight(200, 320)),
        # a 0 whose stroke runs on into its loop
        ("zero with a tail", lambda: strokes((400, 400), ("arc", 110, 50, 290, 350), ("line", (200, 54), (230, 200)))),
        ("zero", lambda: strokes((400, 400), ("arc", 110, 50, 290, 350))),
        # a bold 8: its outline runs along its hull and round its middle, but does not close round it
        ("bold eight", lambda: figure_eight(120, 300, 36)),
        # a bold narrow 8: its outline closes round its crossing, all of which lies within a pen of it
        ("bold narrow eight", lambda: figure_eight(65, 300, 46)),
        # a square 0 whose stroke runs on two thirds of the way down its inside: a stroke that long
        # in a ring is a circled 1's length, but too little ink next to the ring's (RING_TOUCHED_MASS)
        (
            "square zero with a long tail",
            lambda: strokes(
                (400, 400), ("line", (60, 60), (340, 60), (340, 340), (60, 340), (60, 60)), ("line", (200, 64), (200, 254))
            ),
        ),
        # a 6 and a 9: a loop with a hook (the outline runs away from the hull beside the hook)
        ("six", lambda: strokes((400, 400), ("arc", 110, 180, 290, 350), ("line", (260, 50), (130, 150), (112, 265)))),
        ("nine", lambda: strokes((400, 400), ("arc", 110, 50, 290, 220), ("line", (288, 130), (270, 250), (150, 350)))),
    ],
)
def test_a_digit_alone_is_no_ring_touching_a_digit(name, ink):
    ink = ink()
    assert ndimage.label(ink > 0.5, structure=np.ones((3, 3), bool))[1] == 1
    assert preprocess._touched_ring(*_components_of(ink)) is None
    assert (preprocess.digit_mask(ink) >= (ink > 0.5)).all()  # every stroke kept


def _components_of(ink: np.ndarray) -> tuple:
    labels, _count, mass, boxes = preprocess._components(ink >= preprocess.STRONG_INK, ink)
    return labels, boxes, mass


def test_a_dim_grainy_photo_of_white_paper_has_dark_ink():
    # Paper at 47% grey (a dim room, underexposed) with sensor noise: a uniform border whose level
    # is neither clearly light nor clearly dark; the ink reaches far below it, nothing far above.
    page = np.asarray(seven((400, 400), ink=10, paper=120), np.float64)
    page += np.random.default_rng(0).normal(0, 9, page.shape)
    view = preprocess_view(encoded(Image.fromarray(np.clip(page, 0, 255).round().astype(np.uint8)), "JPEG", quality=85))
    assert similar(view, REFERENCE) > 0.9


@pytest.mark.parametrize("paper", [50, 75, 100])
def test_an_underexposed_photo_of_white_paper_has_dark_ink(paper):
    # White paper in a dim room: the border is one level at 20-40% grey, below the 0.4 that meant a
    # dark ground; the ink reaches far below it, nothing reaches above (before: read as light ink,
    # the brighter middle of the page became the "digit").
    page = np.asarray(seven((400, 400), ink=paper // 6, paper=paper), np.float64)
    y, x = np.mgrid[0:400, 0:400]
    page *= 1.0 + 0.08 * np.exp(-((x - 200.0) ** 2 + (y - 200.0) ** 2) / 2e4)  # a little brighter in the middle
    page += np.random.default_rng(paper).normal(0, 4, page.shape)
    view = preprocess_view(encoded(Image.fromarray(np.clip(page, 0, 255).round().astype(np.uint8)), "JPEG", quality=85))
    assert similar(view, REFERENCE) > 0.9


@pytest.mark.parametrize("seed", range(4))
def test_a_dark_noisy_low_light_photo_has_dark_ink(seed):
    # Paper at 19-28% grey with strong sensor noise (sigma 5% of full scale) and a 30% gradient:
    # the lightest noise reaches about as far above the paper as the ink, less the noise, reaches
    # below it, so "below > 2 x above" said light ink (3 of these 4 before; an independent
    # generator's low-light photos: 6 of 60).
    rng = np.random.default_rng(seed)
    page = np.asarray(seven((400, 500), ink=2, paper=48 + 8 * seed, width=18), np.float64)
    page *= np.linspace(1.0, 0.7, 400)[None, :]
    page += rng.normal(0, 13, page.shape)
    gray = np.clip(page, 0, 255).round().astype(np.uint8)
    unit = gray.astype(np.float32) / 255
    assert preprocess._ink_is_dark(unit, ndimage.uniform_filter(unit, 3))
    view = preprocess_view(encoded(Image.fromarray(gray), "JPEG", quality=80))
    assert similar(view, preprocess_view(seven(width=18 * 280 / 400))) > 0.7


@pytest.mark.parametrize("crossing", [False, True])
def test_noisy_light_chalk_on_a_dark_board_stays_light_ink(crossing):
    # The counterpart with the same noise: light strokes on a board at 20% grey, the strokes within
    # the image or crossing its border (then the border strays far up: no noise level to subtract).
    board = np.asarray(seven((400, 500), ink=200, paper=50, width=18), np.float64)
    if crossing:
        board[:, :12] = np.where(np.arange(500)[:, None] % 90 < 20, 200, board[:, :12])
    board += np.random.default_rng(1).normal(0, 16, board.shape)
    gray = np.clip(board, 0, 255).round().astype(np.float32) / 255
    assert not preprocess._ink_is_dark(gray, ndimage.uniform_filter(gray, 3))


@pytest.mark.parametrize(("across", "strength"), [(200, 160), (280, 160), (280, 190)])
def test_glare_over_part_of_a_stroke_keeps_the_stroke(across, strength):
    # A lamp's or a whiteboard's reflection: a bright spot added over the 7's bar (the paper clipped
    # to white), the bar still visible but fainter than STRONG_INK: it was dropped, or kept as a
    # far piece too small to join, and the 7 read as a 1 (similarity 0.73-0.74 here; a fifth
    # generator's glare centred on the digit: 78.3% right).
    y, x = np.mgrid[0:400, 0:400].astype(np.float64)
    page = np.asarray(seven((400, 400), ink=40, paper=215, width=20), np.float64)
    page += strength * np.exp(-(((y - 86) / 40.0) ** 2 + ((x - across) / 90.0) ** 2))
    gray = Image.fromarray(np.clip(page, 0, 255).round().astype(np.uint8))
    assert similar(preprocess_view(encoded(gray, "JPEG", quality=90)), preprocess_view(seven(width=14))) > 0.82


def test_glare_is_only_where_the_page_is_lit_beyond_its_paper():
    # A white page evenly lit (a scan) has no glare; a spot 30% brighter than the rest has.
    page = np.full((300, 300), 0.95, np.float32)
    no_ink = np.zeros_like(page)
    assert preprocess._lit(page, no_ink) is None
    page[:] = 0.7
    page[100:140, 100:160] = 1.0
    lit = preprocess._lit(page, no_ink)
    assert lit is not None and lit[120, 130] and not lit[10, 10]
    # ... but a light digit on a dark ground is ink, not a lit spot; and a lit half is no spot
    assert preprocess._lit(page, (page > 0.8).astype(np.float32)) is None
    page[:, :160] = 1.0
    assert preprocess._lit(page, no_ink) is None


@pytest.mark.parametrize(("chalk", "width", "smudge"), [(180, 22, 0), (102, 10, 36)])
def test_light_chalk_on_a_dark_board_stays_light_ink(chalk, width, smudge):
    # The counterpart: a board at 30% grey with light strokes, bold, or faint (0.1 above the board)
    # beside a smudge darker than the board (0.14 below it: under DIM_INK_MARGIN times the chalk's
    # reach, so light ink, as before; with a margin of 1 this board reads as dark ink).
    board = np.asarray(seven((400, 400), ink=chalk, paper=76, width=width), np.float64)
    board[330:360, 30:60] = 76 - smudge
    board += np.random.default_rng(smudge).normal(0, 2, board.shape)
    gray = np.clip(board, 0, 255).round().astype(np.uint8)
    assert not preprocess._ink_is_dark(gray.astype(np.float32) / 255)
    assert similar(preprocess_view(Image.fromarray(gray)), preprocess_view(seven(width=width * 0.7))) > 0.8


@pytest.mark.parametrize(("canvas", "ink"), [(0x77, 0), (0x55, 0), (0xAA, 255), (0x99, 255), (0x80, 0), (0x64, 255)])
def test_a_digit_on_a_flat_mid_grey_canvas_is_read_whichever_side_of_half_the_canvas_is(canvas, ink):
    # A drawing app's canvas of one exact grey (the cheap clean-canvas path): a black digit on
    # #777777 and a white one on #aaaaaa were "blank" when the canvas's side of 0.5 chose the polarity.
    assert similar(preprocess_view(seven(ink=ink, paper=canvas)), REFERENCE) > 0.95


def test_a_small_digit_off_centre_on_a_large_canvas_is_found():
    canvas = Image.new("L", (1800, 1400), 255)
    canvas.paste(seven((60, 60), width=22), (1500, 200))
    assert similar(preprocess_view(canvas), REFERENCE) > 0.9


def test_a_large_image_is_reduced_before_float_conversion_and_reads_the_same():
    big = seven((4096, 4096))
    assert similar(preprocess_view(encoded(big)), REFERENCE) > 0.95
    assert similar(preprocess_view(encoded(big.convert("RGB"), "JPEG", quality=90)), REFERENCE) > 0.95


def test_mnist_style_input_comes_out_unchanged():
    view = preprocess_view(seven())
    assert np.array_equal(preprocess_view(Image.fromarray(view)), view)


# ----------------------------------------------------------------------------- every mode, never a crash


def _mode_image(mode: str, gray: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """`gray` (uint8, dark ink on light) in Pillow mode `mode`, with that mode's odd values."""
    base = Image.fromarray(gray)
    if mode in ("1", "L", "RGB", "CMYK", "YCbCr", "HSV"):
        return base.convert(mode) if mode != "HSV" else base.convert("RGB").convert("HSV")
    if mode == "LA":
        return Image.merge("LA", [base, Image.fromarray(rng.integers(0, 256, gray.shape, dtype=np.uint8))])
    if mode == "RGBA":
        return Image.merge("RGBA", [base] * 3 + [Image.fromarray(rng.integers(0, 256, gray.shape, dtype=np.uint8))])
    if mode in ("P", "P+transparency"):
        image = base.convert("RGB").convert("P")
        if mode == "P+transparency":
            image.info["transparency"] = int(rng.integers(0, 256))
        return image
    if mode == "LAB":
        return Image.merge("LAB", [base, Image.new("L", base.size, 128), Image.new("L", base.size, 128)])
    if mode == "I":
        return Image.fromarray(gray.astype(np.int32) * int(rng.integers(-70000, 70000)))
    if mode.startswith("I;16"):
        values = gray.astype(np.uint16) * 257
        order = ">u2" if mode == "I;16B" else "<u2"
        return Image.frombytes(mode, base.size[:2], values.astype(order).tobytes())
    if mode == "F":
        values = gray.astype(np.float32) * float(rng.choice([1 / 255, 1.0, 1000.0, -3.0]))
        if gray.size:
            flat = values.ravel()
            holes = rng.integers(0, flat.size, max(1, flat.size // 10))
            flat[holes] = rng.choice([np.nan, np.inf, -np.inf], holes.size)
        return Image.fromarray(values)
    raise AssertionError(mode)


MODES = ["1", "L", "LA", "P", "P+transparency", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "I;16L", "F"]
FORMATS = {
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"},
    "TIFF": set(MODES) - {"HSV", "P+transparency"},
    "JPEG": {"L", "RGB", "CMYK"},
    "WEBP": {"RGB", "RGBA"},
    "BMP": {"1", "L", "P", "RGB"},
    "GIF": {"L", "P"},
}


@st.composite
def any_image(draw):
    """A Pillow image or its encoded file: any mode, 1x1 up to 1500 px, random content, random EXIF tag."""
    mode = draw(st.sampled_from(MODES))
    width = draw(st.one_of(st.integers(1, 40), st.integers(41, 400), st.integers(401, 1500)))
    height = draw(st.one_of(st.integers(1, 40), st.integers(41, 400), st.integers(401, 1500)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    content = draw(st.sampled_from(["noise", "flat", "strokes", "blocks", "gradient"]))
    gray = np.full((height, width), int(rng.integers(0, 256)), np.uint8)
    if content == "noise":
        gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
    elif content == "gradient":
        gray = np.linspace(rng.integers(0, 256), rng.integers(0, 256), width * height).reshape(height, width)
        gray = gray.astype(np.uint8)
    elif content in ("strokes", "blocks"):
        image = Image.fromarray(gray)
        pen = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 6))):
            box = sorted(rng.integers(0, width, 2)) + sorted(rng.integers(0, height, 2))
            fill = int(rng.integers(0, 256))
            if content == "blocks":
                pen.rectangle([box[0], box[2], box[1], box[3]], fill=fill)
            else:
                pen.line([(box[0], box[2]), (box[1], box[3])], fill=fill, width=int(rng.integers(1, 30)))
        gray = np.asarray(image)
    image = _mode_image(mode, gray, rng)
    formats = [f for f, modes in FORMATS.items() if mode in modes]
    target = draw(st.sampled_from(["image"] + formats))
    if target == "image":
        return image
    exif = Image.Exif()
    exif[0x0112] = draw(st.integers(0, 12))  # 0 and 9..12 are invalid values
    options = {"exif": exif.tobytes()} if target in ("PNG", "TIFF", "JPEG", "WEBP") else {}
    try:
        return encoded(image, target, **options)
    except (OSError, ValueError, KeyError):  # a combination Pillow cannot write: use the image itself
        return image


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(any_image())
def test_any_image_gives_an_image_error_or_an_mnist_style_view(source):
    assert_error_or_mnist_view(source)


def test_a_png_whose_first_chunk_is_not_its_header_is_read_without_taking_that_chunk_for_one():
    # Fuzzing: a text chunk before IHDR (Pillow reads such a file) had its bytes read as the header,
    # a width and height of up to 2^32: 29 s and 6.8 GB for a 3.6 KB file, or a MemoryError.
    page = seven((1300, 1100)).convert("LA")
    data = encoded(page)
    # (an EXIF chunk whose bytes, where IHDR's would be, read as 1,229,531,648 x 402,653,184 px)
    text = b"II*\x00" + (402653184).to_bytes(4, "big") + bytes([1, 0, 16, 1, 3]) + bytes(13)
    chunk = len(text).to_bytes(4, "big") + b"eXIf" + text + zlib.crc32(b"eXIf" + text).to_bytes(4, "big")
    odd = data[:8] + chunk + data[8:]
    assert Image.open(io.BytesIO(odd)).size == (1300, 1100)
    assert np.array_equal(preprocess_view(odd), preprocess_view(data))


def test_running_out_of_memory_while_decoding_is_a_one_line_image_error(monkeypatch, tmp_path):
    def exhausted(*args, **kwargs):
        raise MemoryError

    seven().save(tmp_path / "page.png")
    monkeypatch.setattr(preprocess, "upright_grey", exhausted)
    with pytest.raises(ImageError, match="page.png: needs more memory to decode than this process can get"):
        preprocess_view(tmp_path / "page.png")


def test_a_tiff_whose_strip_offsets_are_of_an_odd_type_is_an_error_or_a_view_not_a_crash():
    # Fuzzing: StripOffsets of type UNDEFINED, which Pillow hands over as bytes, raised a TypeError
    # (a traceback, HTTP 500) in the uncompressed-TIFF fast path.
    data = bytearray(encoded(seven((1300, 1100)).convert("RGB"), "TIFF"))
    ifd = int.from_bytes(data[4:8], "little")
    for k in range(int.from_bytes(data[ifd : ifd + 2], "little")):
        entry = ifd + 2 + 12 * k
        if int.from_bytes(data[entry : entry + 2], "little") == 273:
            data[entry + 2 : entry + 4] = (7).to_bytes(2, "little")
    assert isinstance(Image.open(io.BytesIO(bytes(data))).tile[0].offset, bytes)
    try:
        view = preprocess_view(bytes(data))
    except ImageError as error:
        assert "\n" not in str(error)
    else:
        assert view.shape == (28, 28)


def test_an_unforeseen_failure_of_a_fast_decoder_leaves_the_file_to_pillow(monkeypatch):
    def broken(image, data):
        raise TypeError("an odd field")

    page = encoded(seven((1300, 1100)).convert("RGB"), "BMP")
    want = preprocess_view(page)
    monkeypatch.setattr(preprocess, "_raw_as_grey", broken)
    assert np.array_equal(preprocess_view(page), want)


def test_a_large_erosion_disk_is_applied_at_a_reduced_scale_close_to_the_exact_one():
    # Fuzzing: a filled square on a 1,023 px canvas is a "stroke" 1,005 px wide; _thinned eroded it
    # by a 623 px disk at full scale (8-13 s). Above THIN_RADIUS the erosion runs on a reduced copy.
    ink = np.zeros((300, 300), np.float32)
    ImageDraw.Draw(canvas := Image.fromarray(ink, mode="F")).ellipse((20, 30, 280, 260), fill=1.0)
    ink = np.asarray(canvas, np.float32)
    radius = 3 * preprocess.THIN_RADIUS
    disk = np.hypot(*np.ogrid[-radius : radius + 1, -radius : radius + 1]) <= radius
    exact = ndimage.grey_erosion(ink, footprint=disk, mode="constant", cval=0.0)
    reduced = preprocess._disk_eroded(ink, radius)
    assert reduced.shape == ink.shape
    assert np.abs(reduced - exact).mean() < 0.02 and ((reduced >= 0.5) != (exact >= 0.5)).mean() < 0.01
    page = Image.new("L", (1023, 1023), 255)
    ImageDraw.Draw(page).rectangle((10, 10, 1012, 1012), fill=0)
    assert preprocess_view(page).max() == 255


def test_a_cielab_tiff_is_read_by_its_lightness():
    lab = _mode_image("LAB", np.asarray(seven()), np.random.default_rng(0))
    assert similar(preprocess_view(encoded(lab, "TIFF")), REFERENCE) > 0.95


def test_a_float_tiff_with_nan_and_inf_is_read_not_crashed():
    values = np.asarray(seven(), np.float32) / 255
    values[:5, :5] = np.nan
    values[-5:, -5:] = np.inf
    values[:5, -5:] = -np.inf
    assert similar(preprocess_view(encoded(Image.fromarray(values), "TIFF")), REFERENCE) > 0.95


def test_a_float_tiff_of_only_nan_is_blank():
    with pytest.raises(ImageError, match="blank"):
        preprocess_view(encoded(Image.fromarray(np.full((50, 50), np.nan, np.float32)), "TIFF"))


def _split_palette_png() -> bytes:
    """A 1100x1100 palette PNG (striped) whose two IDATs have a tIME chunk between them: damaged (the
    IDATs must be consecutive); libpng's error in torchvision's decoder killed the process (fuzzing)."""
    width = height = 1100
    stream = zlib.compress(b"".join(b"\x00" + bytes(x // 100 % 2 for x in range(width)) for _ in range(height)))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 3, 0, 0, 0])
    chunks = [(b"IHDR", header), (b"PLTE", bytes([255, 255, 255, 0, 0, 0])), (b"IDAT", stream[:100])]
    chunks += [(b"tIME", bytes([7, 208, 1, 1, 0, 0, 0])), (b"IDAT", stream[100:]), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(_png_chunk(kind, payload) for kind, payload in chunks)


def test_the_command_reads_the_crash_cases_and_still_predicts_the_others(tmp_path, capsys):
    from model_files import random_checkpoint

    model = random_checkpoint(tmp_path / "model.pt")
    lab = tmp_path / "lab.tif"
    lab.write_bytes(encoded(_mode_image("LAB", np.asarray(seven()), np.random.default_rng(0)), "TIFF"))
    nan = tmp_path / "nan.tif"
    values = np.asarray(seven(), np.float32)
    values[:3] = np.nan
    nan.write_bytes(encoded(Image.fromarray(values), "TIFF"))
    blank = tmp_path / "blank.tif"
    blank.write_bytes(encoded(Image.fromarray(np.full((40, 40), np.nan, np.float32)), "TIFF"))
    split = tmp_path / "split.png"
    split.write_bytes(_split_palette_png())
    good = tmp_path / "seven.png"
    seven().save(good)
    images = [str(path) for path in (lab, nan, blank, split, good)]
    code = cli.main(["predict", *images, "--number", "3", "--checkpoint", str(model), "--json"])
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert code == 2  # the blank one and the damaged one
    assert [("digit" in r) for r in results] == [True, True, False, False, True]
    assert "damaged or truncated" in results[3]["error"]
    assert captured.err.count("\n") == 2 and "blank.tif" in captured.err and "Traceback" not in captured.err


def test_the_command_reads_a_phones_heic_and_a_large_lzw_tiff_and_webp(tmp_path, capsys):
    from model_files import random_checkpoint

    model = random_checkpoint(tmp_path / "model.pt")
    page = lit(seven((1300, 1100)), 0.3).convert("RGB")
    files = {
        "IMG_0001.HEIC": ("HEIF", {"quality": 80}),
        "scan.tif": ("TIFF", {"compression": "tiff_lzw"}),
        "photo.webp": ("WEBP", {"quality": 80}),
    }
    for name, (fmt, options) in files.items():
        (tmp_path / name).write_bytes(encoded(page, fmt, **options))
    code = cli.main(["predict", *(str(tmp_path / name) for name in files), "--number", "3", "--checkpoint", str(model), "--json"])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    results = json.loads(captured.out)
    assert [r["number"] for r in results] == [3, 3, 3] and all(0 <= r["digit"] <= 9 for r in results)


def test_a_tall_thin_one_is_a_digit_not_a_ruled_line():
    page = Image.new("L", (300, 400), 255)
    ImageDraw.Draw(page).line([(150, 40), (155, 360)], fill=0, width=4)  # 80% of the height, straight
    view = preprocess_view(page)
    assert ink_box(view)[0] == 20 and view.max() > 100  # thin at 20 px, as MNIST would draw it


# ----------------------------------------------------------------------------- MNIST digits on real-world backgrounds


@pytest.fixture(scope="module")
def mnist_and_model(real_root, trained_pt):
    import torch

    from digitsum.checkpoint import load_model
    from digitsum.data import load_split, normalize

    model = load_model(trained_pt)[0]
    test = load_split("test", real_root, limit=2000)

    def classes(views: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            inputs = normalize(torch.from_numpy(views))
            return model(inputs, torch.zeros(len(views), dtype=torch.long))[0].argmax(1).numpy()

    return test.images.numpy(), classes


def pasted_digits(seed: int, count: int = 500) -> list:
    """`count` placements drawn from `seed`: (test image index, digit height, canvas size, place,
    background, paper, gradient depth, gradient angle, ink). Hypothesis draws the seed: 500
    placements drawn one by one overflow its per-example data limit."""
    rng = np.random.default_rng(seed)
    return [
        (
            int(rng.integers(0, 2000)),
            int(rng.integers(40, 221)),
            (int(rng.integers(240, 601)), int(rng.integers(240, 601))),
            (float(rng.random()), float(rng.random())),
            str(rng.choice(["uniform", "gradient"])),
            int(rng.integers(150, 256)),
            float(rng.uniform(0.0, 0.5)),
            float(rng.uniform(0, 6.283)),
            int(rng.integers(0, 61)),
        )
        for _ in range(count)
    ]


@pytest.mark.slow
@settings(
    # 2 x 500 placements, the same ones every run: the fast test model agrees on ~99.6% (1,500
    # placements measured), so with 100 a run failed now and then on two unlucky misses; 500 give the
    # 99% a margin of ~3 misses. No shrinking (it spent minutes on a statistical assertion).
    max_examples=2,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(st.integers(0, 2**32 - 1))
def test_an_mnist_digit_pasted_anywhere_on_a_uniform_or_gradient_background_keeps_its_class(mnist_and_model, seed):
    images, classes = mnist_and_model
    cases = pasted_digits(seed)
    views, originals = [], []
    for index, height, (width, canvas_height), (u, v), background, paper, depth, angle, ink in cases:
        digit = images[index]
        rows, cols = np.nonzero(digit.any(axis=1))[0], np.nonzero(digit.any(axis=0))[0]
        crop = Image.fromarray(digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
        height = min(height, canvas_height - 2)
        scale = height / crop.height
        crop = crop.resize((max(1, min(width - 2, round(crop.width * scale))), height), Image.Resampling.BICUBIC)
        coverage = np.zeros((canvas_height, width), np.float32)
        top, left = round(v * (canvas_height - crop.height)), round(u * (width - crop.width))
        coverage[top : top + crop.height, left : left + crop.width] = np.asarray(crop, np.float32) / 255
        light = np.ones_like(coverage)
        if background == "gradient":
            y, x = np.mgrid[0:canvas_height, 0:width]
            ramp = np.cos(angle) * x / width + np.sin(angle) * y / canvas_height
            light = 1 - depth * (ramp - ramp.min()) / max(1e-6, np.ptp(ramp))
        pixels = (paper * (1 - coverage) + ink * coverage) * light
        views.append(preprocess_view(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))))
        originals.append(digit)
    agree = classes(np.stack(views)) == classes(np.stack(originals))
    assert agree.mean() >= 0.99


def test_a_tightly_cropped_one_from_edge_to_edge_is_the_digit_not_a_page_border():
    rng = np.random.default_rng(0)
    for stroke in (slice(95, 107), slice(98, 101)):  # a marker and a thin pen
        page = (225 + rng.integers(0, 20, (200, 200))).astype(np.uint8)  # grainy paper
        page[:, stroke] = 30
        page[150:156, 30:36] = 30  # and a speck of dust
        view = preprocess_view(Image.fromarray(page))
        height, width = ink_box(view)
        assert height == 20 and width <= 4


def test_transparent_pixels_colour_does_not_leak_into_a_large_canvas():
    views = []
    for hidden in (255, 0):  # the colour stored under alpha 0 differs between apps
        canvas = np.zeros((2400, 2400, 4), np.uint8)
        canvas[..., :3] = hidden
        stroke = np.asarray(seven((2400, 2400), width=40), np.uint8) < 128
        canvas[stroke] = (0, 0, 0, 255)
        views.append(preprocess_view(Image.fromarray(canvas, "RGBA")))
    assert similar(views[0], views[1]) > 0.95


# ----------------------------------------------------------------------------- large PNGs: libpng straight to grey


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


@functools.cache  # made once (about 1 s of PNG encoding), not once per parameter; bytes are immutable
def _large_pngs() -> dict[str, bytes]:
    """A '7' on a 1100x1300 page (over the 1024 px decode limit) in every 8-bit PNG colour type (READ-ONLY)."""
    grey = seven((1100, 1300), ink=40, paper=235, width=30)
    ink = np.asarray(grey) < 128
    rgb = np.full((1300, 1100, 3), (250, 240, 200), np.uint8)  # yellowish paper, blue ink
    rgb[ink] = (30, 60, 160)
    transparent = np.zeros((1300, 1100, 4), np.uint8)  # a drawing app's canvas: strokes on nothing
    transparent[..., :3] = 255
    transparent[ink] = (20, 20, 20, 255)
    light = transparent.copy()  # chalk: light strokes on a transparent canvas
    light[..., :3] = 0
    light[ink] = (240, 240, 240, 255)
    palette = Image.fromarray(rgb).quantize(4)
    gamma = PngInfo()
    gamma.add(b"gAMA", (45455).to_bytes(4, "big"))  # libpng would convert in linear light
    gamma.add(b"sRGB", b"\x00")
    return {
        "L": encoded(grey),
        "1": encoded(grey.convert("1")),
        "RGB": encoded(Image.fromarray(rgb)),
        "RGB sRGB": encoded(Image.fromarray(rgb), pnginfo=gamma),
        "RGB interlaced": _interlaced_png(rgb),
        "RGBA": encoded(Image.fromarray(transparent, "RGBA")),
        "RGBA light": encoded(Image.fromarray(light, "RGBA")),
        "RGBA opaque": encoded(Image.fromarray(rgb).convert("RGBA")),
        "LA": encoded(Image.fromarray(transparent, "RGBA").convert("LA")),
        "P": encoded(palette),
        "P transparent": encoded(palette, transparency=0),
        "L tRNS": encoded(grey, transparency=235),
        "L grain": encoded(Image.fromarray(_grainy_seven())),
        "RGB grain": encoded(Image.fromarray(_grainy_seven()).convert("RGB")),
    }


def _interlaced_png(pixels: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG (Pillow writes none): each pass's rows, filter type 0."""
    height, width, _ = pixels.shape
    passes = [pixels[top::step_y, left::step_x] for left, top, step_x, step_y in preprocess._ADAM7]
    raw = b"".join(b"\x00" + row.tobytes() for image in passes if image.shape[1] for row in image)
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 1])
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def _grainy_seven(size=(1100, 1300)) -> np.ndarray:
    """A '7' on paper with grain (+-6 levels): poorly compressed, like a scan or a photo."""
    page = np.asarray(seven(size, ink=40, paper=235, width=30), np.int16)
    return np.clip(page + np.random.default_rng(0).integers(-6, 7, page.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", list(_large_pngs()))
def test_a_large_png_decoded_straight_to_grey_reads_as_pillow_reads_it(kind, monkeypatch):
    data = _large_pngs()[kind]
    decoded = preprocess.open_image(data, max_decoded_side=1024)
    assert decoded.mode == "L" and decoded.format is None  # libpng's grey, not Pillow's PngImageFile
    view = preprocess_view(data)
    monkeypatch.setattr(preprocess, "_png_as_grey", lambda image, data: None)  # Pillow's decoder instead
    pillow = preprocess_view(data)
    assert np.abs(view.astype(int) - pillow).max() <= 3
    assert similar(view, REFERENCE) > 0.9


def test_a_16_bit_or_animated_large_png_is_left_to_pillow():
    deep = Image.fromarray(np.asarray(seven((1100, 1300)), np.uint16) * 257)
    frames = [seven((1100, 1300)), seven((1100, 1300), ink=80)]
    animated = io.BytesIO()
    frames[0].save(animated, "PNG", save_all=True, append_images=frames[1:])
    for data in (encoded(deep), animated.getvalue()):
        assert preprocess.open_image(data, max_decoded_side=1024).format == "PNG"
        assert similar(preprocess_view(data), REFERENCE) > 0.95


def _uncompressed(fmt: str, mode: str, size=(1101, 1203), **options) -> bytes:
    """A grainy page with a 7 (odd sizes: BMP pads its rows) as an uncompressed file."""
    rng = np.random.default_rng(len(fmt) + len(mode))
    page = np.asarray(seven(size).convert("RGB"), np.int16) + rng.integers(-30, 31, (size[1], size[0], 3))
    image = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)).convert(mode)
    return encoded(image, fmt, **options)


@pytest.mark.parametrize(
    "fmt, mode, options",
    [
        ("BMP", "RGB", {}),
        ("BMP", "L", {}),
        ("TIFF", "RGB", {}),
        ("TIFF", "L", {}),
        ("TIFF", "CMYK", {}),
        ("TIFF", "RGB", {"tiffinfo": {278: 50}}),  # 25 strips of 50 rows (RowsPerStrip)
        ("TGA", "RGB", {}),
        ("PPM", "RGB", {}),
        ("PPM", "L", {}),
    ],
)
def test_a_large_uncompressed_image_is_read_in_strips_as_pillow_reads_it(fmt, mode, options):
    data = _uncompressed(fmt, mode, **options)
    image = preprocess.open_image(data, max_decoded_side=1024)
    assert image.info[preprocess.DECODER_KEY] == "raw strips"
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data)).convert("L")))


@pytest.mark.parametrize(
    "fmt, mode, options",
    [
        ("TIFF", "RGB", {"compression": "tiff_lzw", "tiffinfo": {278: 2000}}),  # (one strip: nothing to split)
        ("TIFF", "RGBA", {"compression": "tiff_lzw"}),
        ("TIFF", "I;16", {"compression": "tiff_adobe_deflate"}),
        ("TIFF", "RGB", {"compression": "jpeg"}),
        ("TGA", "RGB", {"compression": "tga_rle"}),
        ("BMP", "P", {}),
        ("TIFF", "RGBA", {}),
        ("SGI", "RGB", {}),  # (planar: one tile per colour)
        ("TIFF", "I;16", {}),
    ],
)
def test_compressed_planar_palette_alpha_or_deep_images_are_left_to_pillow(fmt, mode, options):
    data = _uncompressed(fmt, mode, **options)
    assert preprocess.DECODER_KEY not in preprocess.open_image(data, max_decoded_side=1024).info
    assert similar(preprocess_view(data), REFERENCE) > 0.9


@pytest.mark.parametrize("compression", ["tiff_lzw", "tiff_adobe_deflate", "packbits", "zstd"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("rows, predictor", [(7, 2), (1, 1), (50, 2), (300, 1)])
def test_a_large_compressed_tiff_is_read_in_groups_of_strips_as_pillow_reads_it(compression, mode, rows, predictor):
    # each group of strips becomes a TIFF of its own for libtiff: every codec, horizontal
    # differencing, a strip height that does not divide the groups' or the image's
    data = _uncompressed("TIFF", mode, compression=compression, tiffinfo={278: rows, 317: predictor})
    image = preprocess.open_image(data, max_decoded_side=1024)
    assert image.info[preprocess.DECODER_KEY] == "libtiff in strips"
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data)).convert("L")))


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["L", "RGB"]),
    shape=st.tuples(st.integers(17, 90), st.integers(17, 90)),
    compression=st.sampled_from(["tiff_lzw", "tiff_adobe_deflate", "packbits"]),
    rows=st.integers(1, 30),
    predictor=st.sampled_from([1, 2]),
    group_rows=st.integers(1, 40),
    levels=st.integers(1, 256),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_compressed_tiff_read_in_groups_of_strips_is_pillows_grey(
    mode, shape, compression, rows, predictor, group_rows, levels, seed
):
    # any size, strip height, group height, codec and content, small enough to be quick: open_image
    # reads a TIFF over max_decoded_side through the groups
    pixels = np.random.default_rng(seed).integers(0, levels, (*shape, 3)) * (255 // max(1, levels - 1))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)
    data = encoded(image, "TIFF", compression=compression, tiffinfo={278: rows, 317: predictor})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preprocess, "_TIFF_GROUP_ROWS", group_rows)
        decoded = preprocess.open_image(data, max_decoded_side=16)
    if rows < shape[0]:  # (one strip: left to Pillow, which gives the image in its own mode)
        assert decoded.info[preprocess.DECODER_KEY] == "libtiff in strips"
    assert np.array_equal(np.asarray(decoded.convert("L")), np.asarray(Image.open(io.BytesIO(data)).convert("L")))


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(17, 120), st.integers(17, 120)),
    quality=st.integers(1, 100),
    tint=st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(0, 60)),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_lossy_webp_read_by_its_luma_is_pillows_grey_within_rounding(shape, quality, tint, seed):
    # a grey page with a tint and grain, any size (odd sizes: chroma planes of half size rounded up),
    # any quality: the luma path gives Pillow's grey of the decoded RGB up to rounding, a few levels
    # more where the decoded RGB clips (at sharp edges, the chroma's upsampling overshoots)
    rng = np.random.default_rng(seed)
    grey = rng.integers(40, 216, (shape[0] // 8 + 1, shape[1] // 8 + 1))
    grey = np.kron(grey, np.ones((8, 8)))[: shape[0], : shape[1], None] + rng.integers(-10, 11, (*shape, 1))
    pixels = np.clip(grey + np.array(tint) - 30, 0, 255).astype(np.uint8)
    data = encoded(Image.fromarray(pixels), "WEBP", quality=quality)
    decoded = preprocess.open_image(data, max_decoded_side=16)
    assert decoded.info[preprocess.DECODER_KEY] == "libwebp luma (webp)"
    pillow = np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.int16)
    difference = np.abs(np.asarray(decoded, np.int16) - pillow)
    assert difference.max() <= 8 and difference.mean() < 0.6


def _with_entry(data: bytes, tag: int, count: int | None = None, kind: int | None = None) -> bytes:
    """A little-endian TIFF with the first directory's entry for `tag` given another count or type."""
    changed = bytearray(data)
    directory = int.from_bytes(changed[4:8], "little")
    for index in range(int.from_bytes(changed[directory : directory + 2], "little")):
        at = directory + 2 + 12 * index
        if int.from_bytes(changed[at : at + 2], "little") == tag:
            if kind is not None:
                changed[at + 2 : at + 4] = kind.to_bytes(2, "little")
            if count is not None:
                changed[at + 4 : at + 8] = count.to_bytes(4, "little")
            return bytes(changed)
    raise KeyError(tag)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("damage", ["Predictor of 2 values", "PlanarConfiguration of 2 values", "PlanarConfiguration of no type"])
def test_a_tiff_whose_pixel_tags_libtiff_would_refuse_reads_as_pillow_reads_it(damage):
    # Pillow reads past such an entry (cut to one value, or skipped) where libtiff, given the file,
    # ignores the tag or refuses it; the groups' clean TIFFs would decode it otherwise (found by
    # fuzzing: the same file read differently by size), so such a file is left to Pillow
    pixels = np.random.default_rng(0).integers(0, 256, (120, 40, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(pixels), "TIFF", compression="tiff_adobe_deflate", tiffinfo={278: 7, 317: 2})
    tag = 317 if damage.startswith("Predictor") else 284
    data = _with_entry(data, tag, count=2) if "2 values" in damage else _with_entry(data, tag, kind=31747)
    try:
        pillow = Image.open(io.BytesIO(data))
        pillow.load()
        expected = np.asarray(pillow.convert("L"))
    except Exception:
        expected = None
    try:
        ours = preprocess.open_image(data, max_decoded_side=16)
    except ImageError as error:
        assert expected is None and "damaged or truncated" in str(error)
        return
    assert preprocess.DECODER_KEY not in ours.info
    assert expected is not None and np.array_equal(np.asarray(ours.convert("L")), expected)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_large_compressed_tiff_keeps_its_orientation(orientation):
    # (not square: Pillow reports a turned TIFF's size turned, the strips are stored the other way)
    upright = seven((1300, 1100)).convert("RGB")
    turned = upright.transpose(ORIENTATIONS[orientation])
    data = encoded(turned, "TIFF", compression="tiff_lzw", tiffinfo={274: orientation, 278: 16})
    assert preprocess.open_image(data, max_decoded_side=1024).info[preprocess.DECODER_KEY] == "libtiff in strips"
    assert np.array_equal(preprocess_view(data), preprocess_view(encoded(upright, "TIFF", compression="tiff_lzw")))


@pytest.mark.parametrize("where", [0.05, 0.5, 0.95])
def test_a_compressed_tiff_with_damaged_strips_reads_as_pillow_reads_it_and_leaves_no_thread(where):
    import threading

    data = bytearray(_uncompressed("TIFF", "RGB", compression="tiff_lzw", tiffinfo={278: 8}))
    directory = int.from_bytes(data[4:8], "little")  # (Pillow writes the strips first, the directory after them)
    at = 8 + int(where * (directory - 8 - 5000))
    data[at : at + 5000] = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    try:
        ours = np.asarray(preprocess.open_image(bytes(data), max_decoded_side=1024))
    except ImageError as error:
        ours = str(error)
    try:
        pillow = Image.open(io.BytesIO(bytes(data)))
        pillow.load()
        pillow = np.asarray(pillow.convert("L"))
    except Exception:
        pillow = None
    if pillow is None:  # Pillow's word on it, from its own decode of the whole file
        assert isinstance(ours, str) and "damaged or truncated" in ours
    else:  # (libtiff may decode garbage codes without complaint: the same pixels, then)
        assert np.array_equal(ours, pillow)
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("digitsum-tiff")]


@pytest.mark.parametrize(
    "options, decoder", [({"quality": 90}, "libwebp luma (webp)"), ({"lossless": True}, "libwebp (torchvision)")]
)
def test_a_large_opaque_webp_is_decoded_by_libwebp_to_pillows_grey(options, decoder):
    # lossy: its luma plane (no RGB made); lossless (no luma plane): RGB, turned grey by Pillow
    data = _uncompressed("WEBP", "RGB", **options)
    image = preprocess.open_image(data, max_decoded_side=1024)
    assert image.info[preprocess.DECODER_KEY] == decoder
    difference = np.abs(np.asarray(image, np.int16) - np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.int16))
    if decoder.startswith("libwebp luma"):  # (a few levels off where RGB clips: grain on white paper)
        assert np.percentile(difference, 99) <= 2 and difference.max() <= 8 and difference.mean() < 1
    else:
        assert difference.max() <= 2  # (two builds of libwebp: the same levels so far)


def test_a_large_lossy_webp_in_colour_reads_as_pillows_decode_of_it():
    # coloured ink on coloured paper, saturated enough that RGB clips: the luma is a level or a few
    # off Pillow's grey there, and what the model sees is the same
    rng = np.random.default_rng(5)
    ink = np.asarray(seven((1150, 1250), width=40), np.float32)[..., None] / 255
    page = ink * np.array([235, 225, 120]) + (1 - ink) * np.array([200, 20, 40]) + rng.normal(0, 8, (1250, 1150, 3))
    data = encoded(Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)), "WEBP", quality=80)
    image = preprocess.open_image(data, max_decoded_side=1024)
    assert image.info[preprocess.DECODER_KEY] == "libwebp luma (webp)"
    pillow = Image.open(io.BytesIO(data)).convert("RGB")
    difference = np.abs(np.asarray(image, np.int16) - np.asarray(pillow.convert("L"), np.int16))
    assert np.percentile(difference, 99) <= 2 and difference.max() <= 30
    assert similar(preprocess_view(data), preprocess_view(pillow)) > 0.98


def test_without_the_webp_package_a_large_lossy_webp_goes_to_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "webp._webp", None)  # its import raises ImportError
    data = _uncompressed("WEBP", "RGB", quality=90)
    assert preprocess.open_image(data, max_decoded_side=1024).info[preprocess.DECODER_KEY] == "libwebp (torchvision)"


def test_a_large_webp_keeps_its_exif_orientation():
    upright = seven((1200, 1100)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(upright.transpose(ORIENTATIONS[6]), "WEBP", quality=90, exif=exif.tobytes())
    assert preprocess.open_image(data, max_decoded_side=1024).info[preprocess.DECODER_KEY] == "libwebp luma (webp)"
    assert similar(preprocess_view(data), preprocess_view(encoded(upright, "WEBP", quality=90))) > 0.98


def test_a_transparent_animated_or_damaged_large_webp_is_left_to_pillow():
    frames = [seven((1100, 1300)).convert("RGB"), seven((1100, 1300), ink=80).convert("RGB")]
    animated = io.BytesIO()
    frames[0].save(animated, "WEBP", save_all=True, append_images=frames[1:])
    canvas = Image.new("RGBA", (1100, 1300), (0, 0, 0, 0))  # a drawing app's transparent canvas
    canvas.putalpha(seven((1100, 1300)).point(lambda v: 255 - v))
    for data in (encoded(canvas, "WEBP", lossless=True), animated.getvalue()):
        assert preprocess.DECODER_KEY not in preprocess.open_image(data, max_decoded_side=1024).info
        assert similar(preprocess_view(data), REFERENCE) > 0.9
    data = _uncompressed("WEBP", "RGB", quality=90)
    with pytest.raises(ImageError, match="cannot be read|damaged or truncated"):  # (Pillow's word on it)
        preprocess_view(data[: len(data) // 2])


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_large_uncompressed_tiff_keeps_its_orientation(orientation):
    # Pillow turns a TIFF upright as it loads it; read in strips, the tag goes on to preprocess.
    upright = seven((1200, 1200)).convert("RGB")
    data = encoded(upright.transpose(ORIENTATIONS[orientation]), "TIFF", tiffinfo={274: orientation})
    assert preprocess.open_image(data, max_decoded_side=1024).info[preprocess.DECODER_KEY] == "raw strips"
    assert np.array_equal(preprocess_view(data), preprocess_view(encoded(upright, "TIFF")))


def test_a_truncated_uncompressed_image_is_one_line_error():
    data = _uncompressed("BMP", "RGB")
    with pytest.raises(ImageError, match="damaged or truncated"):
        preprocess_view(data[: len(data) // 2])


@pytest.mark.parametrize("where", ["before the pixels", "after the pixels"])
def test_a_large_png_keeps_its_exif_orientation_wherever_the_chunk_is(where):
    upright = seven((1100, 1300)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = upright.transpose(ORIENTATIONS[6])
    if where == "before the pixels":
        data = encoded(stored, exif=exif.tobytes())
        assert preprocess.open_image(data, max_decoded_side=1024).format is None  # libpng decoded it
    else:  # allowed by the PNG spec; Pillow finds it only by decoding the pixels
        plain = encoded(stored)
        end = plain.rindex(b"IEND") - 4
        data = plain[:end] + _png_chunk(b"eXIf", exif.tobytes()[6:]) + plain[end:]
        assert preprocess.open_image(data, max_decoded_side=1024).format == "PNG"  # left to Pillow
    assert similar(preprocess_view(data), preprocess_view(encoded(upright))) > 0.95


# What reads each large PNG: libspng a flat opaque 8-bit grey one whole; libspng in strips what
# else is 8-bit grey, grey + alpha, RGB or RGBA and not interlaced, inflated first by ISA-L (poorly
# compressed) or zlib-ng (flat); libpng (torchvision) what has a palette, < 8 bits or interlacing.
DECODERS = {
    "L": "libspng",
    "L grain": "ISA-L + libspng",
    "L tRNS": "libspng",
    "RGB": "zlib-ng + libspng",
    "RGB sRGB": "zlib-ng + libspng",
    "RGB grain": "ISA-L + libspng",
    "RGB interlaced": "libpng",
    "1": "libpng",
    "RGBA": "zlib-ng + libspng",
    "RGBA light": "zlib-ng + libspng",
    "RGBA opaque": "zlib-ng + libspng",
    "LA": "zlib-ng + libspng",
    "P": "libpng",
    "P transparent": "libpng",
}


def _pillows_grey(data: bytes) -> np.ndarray:
    """The grey Pillow's decoder gives a PNG, transparency flattened as _flattened does."""
    image = Image.open(io.BytesIO(data))
    if image.mode in ("RGBA", "LA"):
        return preprocess._flattened(np.asarray(image.convert("LA")))
    return np.asarray(image.convert("L"))


@pytest.mark.parametrize("kind", list(DECODERS))
def test_each_large_png_goes_to_its_decoder_and_libspng_gives_pillows_grey_exactly(kind):
    pytest.importorskip("pyspng")  # (a dependency where PyPI has its wheel; else libpng reads all)
    pytest.importorskip("isal")
    data = _large_pngs()[kind]
    decoded = preprocess.open_image(data, max_decoded_side=1024)
    assert decoded.info[preprocess.DECODER_KEY] == DECODERS[kind]
    if DECODERS[kind] != "libpng":  # grey as Pillow's convert("L") computes it, to the level
        assert np.array_equal(np.asarray(decoded), _pillows_grey(data))


@pytest.mark.parametrize("missing", [("pyspng", "isal", "zlib_ng"), ("isal",)])
def test_without_the_fast_decoders_large_pngs_are_read_by_libpng_or_plain_libspng(missing, monkeypatch):
    modules = {"pyspng": ["pyspng"], "isal": ["isal", "isal.isal_zlib"], "zlib_ng": ["zlib_ng", "zlib_ng.zlib_ng"]}
    for name in missing:
        for module in modules[name]:
            monkeypatch.setitem(sys.modules, module, None)  # its import raises ImportError
    pngs = _large_pngs()
    for kind in ("L", "L grain", "RGB", "RGBA", "RGB grain"):
        decoded = preprocess.open_image(pngs[kind], max_decoded_side=1024)
        if "pyspng" in missing:
            expected = "libpng"
        else:  # (zlib-ng inflates what ISA-L would)
            expected = "libspng" if kind.startswith("L") else "zlib-ng + libspng"
        assert decoded.info[preprocess.DECODER_KEY] == expected
        pillow = _pillows_grey(pngs[kind]).astype(int)
        assert np.abs(np.asarray(decoded, int) - pillow).max() <= (8 if expected == "libpng" and kind.startswith("RGB") else 0)


def _filtered_png(pixels: np.ndarray, chunk_sizes=None) -> bytes:
    """An 8-bit PNG of `pixels` ((H, W) grey or (H, W, 2|3|4)) whose row r uses filter type r % 5
    (None, Sub, Up, Average, Paeth: Pillow's encoder picks its own), its zlib stream cut into IDAT
    chunks of `chunk_sizes` bytes in turn (one chunk when None; 0 makes an empty chunk)."""
    image = pixels.reshape(pixels.shape[0], pixels.shape[1], -1).astype(np.int32)
    height, width, channels = image.shape
    flat = image.reshape(height, width * channels)
    left = np.zeros_like(flat)
    left[:, channels:] = flat[:, :-channels]
    up = np.zeros_like(flat)
    up[1:] = flat[:-1]
    upper_left = np.zeros_like(flat)
    upper_left[:, channels:] = up[:, :-channels]
    estimate = left + up - upper_left
    near_left, near_up, near_corner = np.abs(estimate - left), np.abs(estimate - up), np.abs(estimate - upper_left)
    paeth = np.where((near_left <= near_up) & (near_left <= near_corner), left, np.where(near_up <= near_corner, up, upper_left))
    predictions = [np.zeros_like(flat), left, up, (left + up) // 2, paeth]
    rows = [bytes([r % 5]) + ((flat[r] - predictions[r % 5][r]) % 256).astype(np.uint8).tobytes() for r in range(height)]
    stream = zlib.compress(b"".join(rows))
    sizes = itertools.cycle(chunk_sizes or [len(stream)])
    chunks, at = [], 0
    while at < len(stream):
        size = next(sizes)
        chunks.append(_png_chunk(b"IDAT", stream[at : at + size]))
        at += size
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, colour, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + b"".join(chunks) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("grain", [0, 40])  # flat (zlib-ng inflates) and grainy (ISA-L)
def test_libspng_in_strips_reads_every_filter_type_across_strip_edges_as_pillow(channels, grain):
    # 1100 x 1233: not a whole number of strips; rows filtered Up/Average/Paeth against the row
    # above also at each strip's first row (the previous strip's last row is carried over)
    rng = np.random.default_rng(channels)
    base = np.asarray(seven((1100, 1233), ink=30, paper=220, width=30), np.int16)[..., None]
    pixels = base + np.arange(channels, dtype=np.int16) * 7 + rng.integers(-grain, grain + 1, (1233, 1100, channels))
    if channels in (2, 4):  # every alpha value somewhere
        pixels[..., -1] = rng.integers(0, 256, (1233, 1100))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    data = _filtered_png(pixels)
    decoded = preprocess.open_image(data, max_decoded_side=1024)
    assert "libspng" in decoded.info[preprocess.DECODER_KEY]
    assert np.array_equal(np.asarray(decoded), _pillows_grey(data))


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.sampled_from([1, 2, 3, 4]),
    shape=st.tuples(st.integers(17, 90), st.integers(17, 90)),
    levels=st.integers(1, 256),  # few levels: long runs (flat, zlib-ng); many: literals (ISA-L)
    strip_rows=st.integers(1, 9),
    level=st.integers(0, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_8_bit_png_decoded_in_strips_is_pillows_grey(channels, shape, levels, strip_rows, level, seed):
    # any size, strip height, compression and pixels (every alpha), small enough to be quick:
    # open_image decodes a PNG over max_decoded_side through the fast path
    pixels = np.random.default_rng(seed).integers(0, levels, (*shape, channels)) * (255 // max(1, levels - 1))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels])
    data = encoded(image, compress_level=level)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preprocess, "_STRIP_ROWS", strip_rows)
        decoded = preprocess.open_image(data, max_decoded_side=16)
    assert decoded.info[preprocess.DECODER_KEY].endswith("libspng")
    assert np.array_equal(np.asarray(decoded), _pillows_grey(data))


@pytest.mark.parametrize("kind, sizes", [("RGB", [1]), ("RGB grain", [0, 7, 1, 4096]), ("RGB grain", [65535, 3])])
def test_a_stream_split_into_many_idat_chunks_reads_as_pillow(kind, sizes):
    # chunks of one byte, empty ones, a strip's worth: zlib may hold output back across them
    data = _filtered_png(np.asarray(Image.open(io.BytesIO(_large_pngs()[kind]))), sizes)
    assert data.count(b"IDAT") < 20_000  # (more is left to Pillow)
    decoded = preprocess.open_image(data, max_decoded_side=1024)
    assert "libspng" in decoded.info[preprocess.DECODER_KEY]
    assert np.array_equal(np.asarray(decoded), _pillows_grey(data))


@pytest.mark.parametrize(
    "layout",
    [
        "light ink under transparent strips",
        "dark ink, then light",
        "opaque top",
        "mean decides",
        "opaque bottom",
        "one dark colour, only alpha drawn",
        "one light colour, only alpha drawn",
    ],
)
def test_a_transparent_png_is_flattened_onto_the_background_the_whole_image_decides(layout):
    # Strips are flattened as they come onto the background the visible grey so far decides;
    # these make later strips contradict that guess (or only the mean decide): the result must
    # still be _flattened's of the whole image.
    rgba = np.zeros((1300, 1100, 4), np.uint8)
    ink = np.asarray(seven((1100, 1300), width=30)) < 128
    if layout.startswith("one"):  # a drawing app's canvas: the colour everywhere, antialiased strokes in alpha
        rgba[..., :3] = (30, 60, 160) if "dark" in layout else (250, 240, 200)
        rgba[..., 3] = np.asarray(seven((1100, 1300), width=30).filter(ImageFilter.GaussianBlur(3))) ^ 0xFF
    elif layout == "light ink under transparent strips":  # chalk: nothing visible in the top strips
        rgba[ink] = (240, 240, 240, 255)
    elif layout == "dark ink, then light":  # white wins: most of the visible grey is dark
        rgba[ink] = (250, 250, 250, 200)
        rgba[100:700, 100:1000] = (10, 10, 10, 255)
    elif layout == "opaque top":  # an opaque light band, then dark ink on transparency
        rgba[ink] = (20, 20, 20, 180)
        rgba[:200] = (230, 230, 230, 255)
    else:  # visible greys on both sides of mid-grey, every alpha (over the top strips only: "opaque bottom")
        rgba[..., :3] = np.random.default_rng(0).integers(0, 256, (1300, 1100, 1))
        rgba[..., 3] = np.random.default_rng(1).integers(0, 256, (1300, 1100))
        if layout == "opaque bottom":
            rgba[300:, 3] = 255
    data = encoded(Image.fromarray(rgba, "RGBA"))
    decoded = preprocess.open_image(data, max_decoded_side=1024)
    assert decoded.info[preprocess.DECODER_KEY].endswith("libspng")
    assert np.array_equal(np.asarray(decoded), _pillows_grey(data))


@pytest.mark.parametrize("case", ["dark ink", "light ink", "mixed", "opaque", "invisible"])
def test_compositing_whole_images_equals_flattening_every_pair(case):
    # every (grey, alpha) pair, plus a block that decides the background
    grey, alpha = np.meshgrid(np.arange(256), np.arange(256))
    grey, alpha = np.tile(grey, (2, 1)), np.tile(alpha, (2, 1))
    if case == "dark ink":  # grey below mid-grey everywhere: decided by the extrema
        grey = grey // 2
    elif case == "light ink":
        grey = 128 + grey // 2
    elif case == "mixed":  # decided by the alpha-weighted mean: dark ink, fully opaque, in the second half
        grey[256:], alpha[256:] = 10, 255
    elif case == "opaque":
        alpha[:] = 255
    else:
        alpha[:] = 0
    pairs = np.stack([grey, alpha], axis=-1).astype(np.uint8)
    visible = pairs[..., 0][pairs[..., 1] > 0]
    greys = (int(visible.min()), int(visible.max())) if visible.size else (255, 0)
    composited = preprocess._composited(Image.fromarray(pairs[..., 0]), Image.fromarray(255 - pairs[..., 1]), greys)
    assert np.array_equal(np.asarray(composited), preprocess._flattened(pairs))


@pytest.mark.parametrize("ink", ["dark", "light"])
def test_flattening_grey_alpha_pairs_is_exact_for_every_pair(ink):
    # every (grey, alpha) pair once, composited in integers onto white (dark ink) or black (light ink)
    grey, alpha = np.meshgrid(np.arange(256), np.arange(256))
    grey = grey if ink == "light" else 255 - grey
    grey[:, :128] = 255 if ink == "light" else 0  # the ink: decides the background
    alpha[:, :128] = 255
    background = 0 if ink == "light" else 255
    expected = (grey * alpha + background * (255 - alpha) + 127) // 255
    pairs = np.stack([grey, alpha], axis=-1).astype(np.uint8)
    assert np.array_equal(preprocess._flattened(pairs), expected)
    assert np.array_equal(preprocess._flattened(pairs[:, :, :].copy()[:, :128]), grey[:, :128])  # opaque: as it is


def _with_stream(data: bytes, stream: bytes, crc: bool = True, between: bytes = b"") -> bytes:
    """`data` (a PNG) with its IDAT chunks replaced by one holding `stream` (CRC right or not), or
    by two holding its halves with the chunk `between` them."""
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        chunks.append((data[at + 4 : at + 8], data[at : at + 12 + length]))
        at += 12 + length
    first = next(i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT")
    idat = _png_chunk(b"IDAT", stream)
    if between:
        idat = _png_chunk(b"IDAT", stream[: len(stream) // 2]) + between + _png_chunk(b"IDAT", stream[len(stream) // 2 :])
    if not crc:
        idat = idat[:-4] + bytes(4)
    rest = [whole for kind, whole in chunks if kind != b"IDAT"]
    return data[:8] + b"".join(rest[: first - 0]) + idat + b"".join(rest[first:])


def _inflated(data: bytes) -> bytes:
    at, stream = 8, b""
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        if data[at + 4 : at + 8] == b"IDAT":
            stream += data[at + 8 : at + 8 + length]
        at += 12 + length
    return zlib.decompress(stream)


def _read_both_ways(data: bytes, monkeypatch) -> tuple:
    """(what open_image gives, what Pillow alone gives): an "L" array or the ImageError's message."""
    results = []
    for fast in (True, False):
        with monkeypatch.context() as patch:
            if not fast:
                patch.setattr(preprocess, "_png_as_grey", lambda image, data: None)
            try:
                image = preprocess.open_image(data, max_decoded_side=1024)
                if image.mode in ("RGBA", "LA"):  # Pillow's pixels, transparency flattened as ours is
                    results.append(preprocess._flattened(np.asarray(image.convert("LA"))).astype(int))
                else:
                    results.append(np.asarray(image.convert("L"), int))
            except ImageError as error:
                assert "\n" not in str(error)
                results.append(str(error))
    return tuple(results)


# ISA-L + libspng (strips), libspng, zlib-ng + libspng (strips), libpng, ISA-L/zlib-ng + libspng (strips)
@pytest.mark.parametrize("kind", ["L grain", "L", "RGB", "P", "RGB grain", "RGBA", "LA"])
@pytest.mark.parametrize(
    "damage",
    [
        "CRC",
        "deflate data",
        "Adler-32",
        "filter type",
        "data after the stream",
        "truncated stream",
        "truncated file",
        "tIME between the IDATs",
        "unknown chunk between the IDATs",
        "unknown critical chunk after the IDATs",
    ],
)
def test_a_damaged_large_png_reads_as_pillow_reads_it_and_never_crashes(kind, damage, monkeypatch):
    # torchvision's decode_png kills the process (SIGSEGV) on an IDAT CRC error, a bad Adler-32,
    # invalid deflate data or filter type, or IDATs split by another chunk (found by fuzzing: a
    # palette PNG over 1024 px with a tIME chunk among its IDATs): these must never reach it, nor
    # any chunk libpng does not need. Pillow decides instead:
    # an ImageError for a broken stream; the pixels where it ignores the damage (a CRC, an
    # Adler-32 it stops reading before).
    data = _large_pngs()[kind]
    raw = _inflated(data)
    stream = zlib.compress(raw)
    middle = len(stream) // 2
    if damage == "CRC":
        damaged = _with_stream(data, stream, crc=False)
    elif damage == "deflate data":
        damaged = _with_stream(data, stream[:middle] + bytes([stream[middle] ^ 0x55]) + stream[middle + 1 :])
    elif damage == "Adler-32":
        damaged = _with_stream(data, stream[:-4] + bytes(b ^ 0xFF for b in stream[-4:]))
    elif damage == "filter type":
        row = len(raw) // 1300  # every image here is 1300 rows high, not interlaced
        damaged = _with_stream(data, zlib.compress(raw[: 600 * row] + b"\x07" + raw[600 * row + 1 :]))
    elif damage == "data after the stream":
        damaged = _with_stream(data, stream + bytes(range(200)))
    elif damage == "truncated stream":
        damaged = _with_stream(data, stream[:middle])
    elif damage == "tIME between the IDATs":
        damaged = _with_stream(data, stream, between=_png_chunk(b"tIME", bytes([7, 208, 1, 1, 0, 0, 0])))
    elif damage == "unknown chunk between the IDATs":
        damaged = _with_stream(data, stream, between=_png_chunk(b"abCd", b"x"))
    elif damage == "unknown critical chunk after the IDATs":  # (libpng refuses it; Pillow stops before it)
        damaged = data.replace(preprocess._PNG_END, _png_chunk(b"ABCD", b"x") + preprocess._PNG_END)
    else:
        damaged = data[: len(data) // 2]
    ours, pillow = _read_both_ways(damaged, monkeypatch)
    if isinstance(pillow, str):
        assert ours == pillow and "damaged or truncated" in ours
    else:  # (libpng's RGB -> grey weights differ from Pillow's by a few levels)
        assert not isinstance(ours, str) and np.abs(ours - pillow).max() <= (8 if kind == "P" else 0)


def _inflating_threads() -> list:
    import threading

    return [thread for thread in threading.enumerate() if thread.name == "digitsum-inflate"]


def test_read_ahead_gives_every_item_in_order_raises_where_the_source_fails_and_stops_its_thread():
    assert list(preprocess._ahead(iter(range(100)))) == list(range(100))  # (more than _AHEAD: the thread waits)

    def failing():
        yield from range(7)
        raise ValueError("the stream ends before the image")

    got = []
    with pytest.raises(ValueError, match="ends before"):
        for item in preprocess._ahead(failing()):
            got.append(item)
    assert got == list(range(7))  # everything before the failure, then the failure itself
    endless = preprocess._ahead(itertools.count())
    assert [next(endless) for _ in range(3)] == [0, 1, 2]
    endless.close()  # a consumer that stops early (damage found in a strip): the thread must end
    assert not _inflating_threads()


@pytest.mark.parametrize("damage", ["deflate data", "truncated stream"])
def test_a_damaged_grainy_png_read_in_strips_leaves_no_thread_behind(damage):
    data = _large_pngs()["RGB grain"]
    stream = zlib.compress(_inflated(data))
    middle = len(stream) // 2
    if damage == "deflate data":
        damaged = _with_stream(data, stream[:middle] + bytes([stream[middle] ^ 0x55]) + stream[middle + 1 :])
    else:
        damaged = _with_stream(data, stream[:middle])
    with pytest.raises(ImageError, match="damaged or truncated"):
        preprocess.open_image(damaged, max_decoded_side=1024)
    assert not _inflating_threads()


@settings(max_examples=examples(100), deadline=None)
@given(
    palette_mode=st.sampled_from(["RGB", "RGBA"]),
    entries=st.integers(1, 256),
    shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    seed=st.integers(0, 2**32 - 1),
)
def test_an_opaque_palette_image_turns_grey_exactly_as_pillow_converts_it(palette_mode, entries, shape, seed):
    # _palette_grey looks the palette's greys up in a table instead of Pillow's per-pixel conversion;
    # any palette (short ones: indices past its end), any indices
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), "P")
    image.putpalette(rng.integers(0, 256, entries * len(palette_mode)).astype(np.uint8).tobytes(), palette_mode)
    grey = preprocess._workable(image)
    assert grey.mode == "L" and np.array_equal(np.asarray(grey), np.asarray(image.convert("L")))


@pytest.mark.parametrize("kind", ["L grain", "L", "RGBA"])
def test_a_large_png_whose_stream_inflates_past_the_image_reads_as_pillow_reads_it(kind, monkeypatch):
    # 64 MB more than the header calls for (a deflate bomb): the fast paths stop at the image's size
    data = _large_pngs()[kind]
    compress = zlib.compressobj()
    extra = b"".join(compress.compress(bytes(1 << 20)) for _ in range(64))
    stream = compress.compress(_inflated(data)) + extra + compress.flush()
    ours, pillow = _read_both_ways(_with_stream(data, stream), monkeypatch)
    assert type(ours) is type(pillow) and np.array_equal(ours, pillow)


@pytest.mark.parametrize("shape", [(6, 8), (7, 9), (64, 33)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_halving_is_exactly_the_mean_of_each_2x2_block(shape, dtype):
    values = np.random.default_rng(0).random(shape).astype(dtype) ** 3
    height, width = shape[0] // 2 * 2, shape[1] // 2 * 2
    expected = values[:height, :width].reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))
    halved = preprocess._halved(values)
    assert halved.dtype == expected.dtype and np.array_equal(halved, expected)


@settings(max_examples=examples(300), deadline=None)
@given(
    shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    size=st.tuples(st.integers(1, 45), st.integers(1, 45)),
    dtype=st.sampled_from([np.uint8, np.float32]),
    mode=st.sampled_from(["nearest", "reflect", "constant"]),
    maximum=st.booleans(),
    reflected=st.booleans(),
    levels=st.sampled_from([2, 5, 256]),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_fast_min_and_max_filters_are_scipys_bit_for_bit(shape, size, dtype, mode, maximum, reflected, levels, seed):
    # OpenCV computes them (where installed); scipy's are the definition: maximum_filter / minimum_filter
    # at origin 0, or with grey_dilation's reflected window (origin -1 on an even side). Few levels: ties.
    values = (np.random.default_rng(seed).integers(0, levels, shape) * (255 // (levels - 1))).astype(dtype)
    if dtype == np.float32:
        values /= 255
    origin = [-1 if reflected and not side % 2 else 0 for side in size]
    library = ndimage.maximum_filter if maximum else ndimage.minimum_filter
    expected = library(values, size=size, mode=mode, origin=origin)
    got = preprocess._extreme_filter(values, size, maximum, mode, reflected)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


@settings(max_examples=examples(200), deadline=None)
@given(shape=st.tuples(st.integers(1, 60), st.integers(1, 60)), window=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_the_paper_lighting_closing_and_opening_are_scipys_bit_for_bit(shape, window, seed):
    values = np.random.default_rng(seed).random(shape, dtype=np.float32)
    for closing, library in ((True, ndimage.grey_closing), (False, ndimage.grey_opening)):
        expected = library(values, size=(window, window), mode="nearest")
        assert np.array_equal(preprocess._grey_morphology(values, window, closing), expected)


def test_opencv_computes_the_filters_here():
    # A dependency (pyproject.toml): without it the filters fall back to scipy's, several times slower.
    assert preprocess._cv2 is not None


# ----------------------------------------------------------------------------- what a caller may hand over


def test_bytes_like_and_binary_file_objects_read_as_the_bytes_do(tmp_path):
    data = encoded(seven(), "PNG")
    expected = preprocess_view(data)
    path = tmp_path / "seven.png"
    path.write_bytes(data)
    with open(path, "rb") as file:
        from_file = preprocess_view(file)
    for source in (bytearray(data), memoryview(data), io.BytesIO(data)):
        assert np.array_equal(preprocess_view(source), expected)
    assert np.array_equal(from_file, expected)


@pytest.mark.parametrize("format", ["ICO", "DDS", "BLP", "QOI"])
def test_formats_decoded_while_opening_or_in_python_are_not_read(format):
    # ICO, ICNS, BLP decode a whole embedded image inside Image.open, before the size check (a 256x256
    # ICO holding a 13000x13000 PNG: +646 MB); DDS, QOI decode in Python (seconds for 2 MB): never identified
    image = seven((64, 64)).convert("P" if format == "BLP" else "RGB")
    with pytest.raises(NotAnImageError, match="is not an image digitsum reads") as caught:
        preprocess_view(encoded(image, format))
    assert "\n" not in str(caught.value)


def _progressive_jpeg(scans: int) -> bytes:
    """A 64x64 progressive grey JPEG of one DC scan and `scans` empty AC scans (a "scan bomb": libjpeg
    walks every block once per scan and only warns about empty ones)."""
    codes = bytes([1] + [0] * 15) + b"\x00"  # a Huffman table of one code, of length 1, for symbol 0
    parts = [
        b"\xff\xd8",
        b"\xff\xdb" + (67).to_bytes(2, "big") + b"\x00" + bytes([1] * 64),
        b"\xff\xc2" + (11).to_bytes(2, "big") + bytes([8, 0, 64, 0, 64, 1, 1, 0x11, 0]),
        b"\xff\xc4" + (20).to_bytes(2, "big") + b"\x00" + codes,  # DC table 0
        b"\xff\xc4" + (20).to_bytes(2, "big") + b"\x10" + codes,  # AC table 0
        b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0x00, 0, 0, 0]) + b"\x00",
    ]
    parts += [b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0x00, 1, 63, 0]) + b"\x00"] * scans
    return b"".join(parts) + b"\xff\xd9"


def _rle8_bmp(width: int, height: int) -> bytes:
    """An 8-bit run-length-encoded BMP (BI_RLE8) of a black bar down the middle of white: runs of at
    most 255 pixels of index 0 (white) or 1 (black), each row ended by an end-of-line code."""

    def runs(index: int, count: int) -> bytes:
        return b"".join(bytes([min(255, count - at), index]) for at in range(0, count, 255))

    bar = runs(0, width // 2) + runs(1, width // 20) + runs(0, width - width // 2 - width // 20)
    rows = b"".join((bar if height // 3 <= y < 2 * height // 3 else runs(0, width)) + b"\x00\x00" for y in range(height))
    rows += b"\x00\x01"
    palette = bytes([255, 255, 255, 0, 0, 0, 0, 0]) + bytes(4 * 254)
    info = (40).to_bytes(4, "little") + width.to_bytes(4, "little") + height.to_bytes(4, "little")
    info += (1).to_bytes(2, "little") + (8).to_bytes(2, "little") + (1).to_bytes(4, "little")  # planes, bits, BI_RLE8
    info += len(rows).to_bytes(4, "little") + bytes(8) + (256).to_bytes(4, "little") + bytes(4)
    offset = 14 + len(info) + len(palette)
    header = b"BM" + (offset + len(rows)).to_bytes(4, "little") + bytes(4) + offset.to_bytes(4, "little")
    return header + info + palette + rows


def test_a_large_run_length_encoded_bmp_is_refused_before_decoding_and_a_small_one_is_read():
    # Pillow decodes RLE BMPs in Python (a 16 KB 4096x4096 file: 2.1 s)
    assert Image.open(io.BytesIO(_rle8_bmp(4096, 4096))).tile[0].codec_name == "bmp_rle"
    with pytest.raises(ImageError, match="run-length-encoded BMP over 1024x1024") as caught:
        preprocess_view(_rle8_bmp(4096, 4096))
    assert "\n" not in str(caught.value)
    bar = Image.new("L", (300, 300), 255)
    bar.paste(0, (150, 100, 165, 200))
    assert similar(preprocess_view(_rle8_bmp(300, 300)), preprocess_view(bar)) > 0.9


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding_and_a_real_progressive_one_is_read():
    assert Image.open(io.BytesIO(_progressive_jpeg(3))).size == (64, 64)  # the generator makes a JPEG
    with pytest.raises(ImageError, match="over 100 scans") as caught:
        preprocess_view(_progressive_jpeg(preprocess.MAX_JPEG_SCANS))  # its DC scan makes one more
    assert "\n" not in str(caught.value)
    progressive = encoded(seven((400, 300)).convert("RGB"), "JPEG", quality=90, progressive=True)
    assert similar(preprocess_view(progressive), REFERENCE) > 0.9


def test_what_is_not_an_image_source_is_a_one_line_image_error(tmp_path):
    path = tmp_path / "seven.png"
    path.write_bytes(b"not an image at all")
    with open(path, "rb") as file, pytest.raises(ImageError, match=str(path)):  # an open file's errors name it
        preprocess_view(file)
    with open(path) as text, pytest.raises(ImageError, match="binary mode"):
        preprocess_view(text)
    with pytest.raises(ImageError, match="int is not an image") as caught:
        preprocess_view(7)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "index, longer, left, top",
    [
        (1472, 105, 7, 32),
        (2532, 136, 125, 144),
        (3967, 98, 70, 4),
        (6561, 191, 94, 82),
        (6568, 233, 114, 3),
        (6596, 189, 186, 14),
    ],
)
def test_the_grey_rim_of_a_large_blurred_digit_is_no_cast_shadow(real_root, index, longer, left, top):
    # MNIST test digits drawn large (benchmarks/preprocess_agreement.py's drawn style: dark on a
    # white 280x280 canvas, JPEG q75), some at the canvas's edge. Upscaled, MNIST's antialiased edge
    # is a wide grey rim; _shadow_bands took parts of it for a cast shadow and lightened them away
    # (similarity to the digit's own view 0.11-0.65 before). A shadow is a plateau; a rim is a ramp.
    from digitsum.data import load_split

    image = load_split("test", real_root, limit=index + 1).images[index].numpy()
    rows, cols = np.nonzero(image.any(axis=1))[0], np.nonzero(image.any(axis=0))[0]
    digit = Image.fromarray(255 - image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    scale = longer / max(digit.size)
    digit = digit.resize((max(1, round(digit.width * scale)), max(1, round(digit.height * scale))), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (280, 280), 255)
    canvas.paste(digit, (left, top))
    view = preprocess_view(encoded(canvas.convert("RGB"), "JPEG", quality=75))
    assert similar(view, preprocess_view(encoded(Image.fromarray(image), "PNG"))) > 0.8


def _bold_seven_cropped(margin: int, ink: int = 15, paper: int = 255) -> Image.Image:
    """A marker-bold 7, slightly blurred, cropped to its strokes with `margin` px of paper round it."""
    image = Image.new("L", (110, 130), paper)
    draw = ImageDraw.Draw(image)
    draw.line([(0, 16), (100, 16)], fill=ink, width=32)
    draw.line([(96, 10), (40, 130)], fill=ink, width=34)
    image = image.filter(ImageFilter.GaussianBlur(2))
    strokes = np.abs(np.asarray(image, np.int16) - paper) > abs(ink - paper) // 2
    rows, cols = np.flatnonzero(strokes.any(1)), np.flatnonzero(strokes.any(0))
    crop = image.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
    framed = Image.new("L", (crop.width + 2 * margin, crop.height + 2 * margin), paper)
    framed.paste(crop, (margin, margin))
    return framed


@pytest.mark.parametrize("margin", [0, 1])
def test_a_bold_digit_cropped_to_its_edges_is_dark_ink_on_paper(margin):
    # real_world's "cropped to the digit": the strokes cross up to 40% of the outermost ring (and
    # the 3x3 mean smears them over more), so the ring was no one paper level and a bold 7 was read
    # as light ink - the paper between its strokes taken for the digit (11 misreads in 500; 2 left).
    gray = np.asarray(_bold_seven_cropped(margin), np.float32) / 255
    assert preprocess._ink_is_dark(gray)
    view = preprocess_view(_bold_seven_cropped(margin))
    assert similar(view, preprocess_view(_bold_seven_cropped(30))) > 0.9
    # The counterpart: the same in light on a dark ground (chalk, a dark-mode canvas) is light ink,
    # also with no margin at all (the thin-structure test read that as dark ink: the ground between
    # the strokes taken for the digit). With no margin the top bar, running along the edge at half
    # its strength there, comes out fainter: the opening's ground under it is lifted (subtraction,
    # where dark ink's division forgives it), so that view is less alike (0.76 vs 0.98).
    light = _bold_seven_cropped(margin, ink=240, paper=20)
    assert not preprocess._ink_is_dark(np.asarray(light, np.float32) / 255)
    alike = 0.9 if margin else 0.7
    assert similar(preprocess_view(light), preprocess_view(_bold_seven_cropped(30, ink=240, paper=20))) > alike
    assert similar(preprocess_view(light), view) > alike


@pytest.mark.parametrize("side", ["left", "right", "bottom"])
def test_a_thumb_coming_in_from_the_edge_is_not_the_digit(side):
    # A dark thumb holding the paper, its visible part about 11% of the side: narrower than the
    # lighting window, it was one solid blob of ink, heavier than the thin pen's 7, and taken for
    # the digit (an independent generator: 3 of 250). Shaded, brighter towards its middle.
    width, height = 504, 672
    page = np.asarray(seven((width, height), ink=25, paper=235, width=9), np.float64)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    if side == "bottom":
        r = np.hypot((x - 0.5 * width) / 80, (y - height) / 56)
    else:
        r = np.hypot((x - (0 if side == "left" else width)) / 56, (y - 0.82 * height) / 80)
    thumb = np.clip((1 - r) * 25, 0, 1)
    skin = 100 * (0.55 + 0.45 * np.sqrt(np.clip(1 - r, 0, 1)))
    page = page * (1 - thumb) + skin * thumb
    gray = np.clip(page + np.random.default_rng(1).normal(0, 2, page.shape), 0, 255).round().astype(np.uint8)
    view = preprocess_view(encoded(Image.fromarray(gray), "JPEG", quality=90))
    assert similar(view, preprocess_view(seven((width, height), ink=25, paper=235, width=9))) > 0.85
