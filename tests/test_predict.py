"""predict.py and `digitsum predict`: MNIST-style preprocessing of real images, and bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from digitsum import cli
from digitsum.data import normalize
from digitsum.errors import DigitsumError
from digitsum.predict import ImageError, NotAnImageError, preprocess, predict
from model_files import random_checkpoint


def drawn_seven(size: int = 280, ink: int = 0, paper: int = 255, width: int = 22, offset=(0, 0)) -> Image.Image:
    """A '7' drawn like on the web page: dark strokes on a light square canvas."""
    image = Image.new("L", (size, size), paper)
    draw = ImageDraw.Draw(image)
    k = size / 280
    dx, dy = offset
    points = [(70 * k + dx, 60 * k + dy), (210 * k + dx, 60 * k + dy), (120 * k + dx, 230 * k + dy)]
    draw.line(points, fill=ink, width=round(width * k), joint="curve")
    return image


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def ink_box(view: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(view.any(axis=1))[0], np.nonzero(view.any(axis=0))[0]
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("predict") / "model.pt")


@pytest.fixture(scope="module")
def model(model_path):
    from digitsum.checkpoint import load_model

    return load_model(model_path)[0]


# ----------------------------------------------------------------------------- the MNIST layout


def test_preprocess_returns_a_normalised_batch_of_one_and_the_uint8_view():
    inputs, view = preprocess(drawn_seven())
    assert inputs.shape == (1, 1, 28, 28) and inputs.dtype == torch.float32
    assert view.shape == (28, 28) and view.dtype == np.uint8
    assert torch.equal(inputs, normalize(torch.from_numpy(view).unsqueeze(0)))


def test_the_ink_box_longer_side_becomes_20_pixels():
    assert max(ink_box(preprocess(drawn_seven())[1])) == 20


def test_the_aspect_ratio_of_the_ink_is_kept():
    image = Image.new("L", (200, 200), 255)
    ImageDraw.Draw(image).rectangle((90, 20, 110, 180), fill=0)  # 21 x 161 bar
    height, width = ink_box(preprocess(image)[1])
    assert height == 20 and width in (3, 4)


def test_the_centre_of_mass_is_moved_to_the_centre_of_the_field():
    view = preprocess(drawn_seven(offset=(-60, 40)))[1].astype(np.float64)
    ys, xs = np.indices(view.shape)
    assert abs((ys * view).sum() / view.sum() - 14) <= 0.5
    assert abs((xs * view).sum() / view.sum() - 14) <= 0.5


def test_the_position_and_size_of_the_digit_on_the_canvas_do_not_matter():
    small_corner = drawn_seven(size=560, offset=(-120, -100))
    assert np.abs(preprocess(small_corner)[1].astype(int) - preprocess(drawn_seven())[1]).max() <= 40


def test_dark_ink_on_light_paper_and_light_ink_on_dark_paper_give_the_same_view():
    dark_on_light = preprocess(drawn_seven(ink=0, paper=255))[1]
    light_on_dark = preprocess(drawn_seven(ink=255, paper=0))[1]
    assert np.array_equal(dark_on_light, light_on_dark)


def test_low_contrast_photos_are_stretched_to_full_range():
    faint = drawn_seven(ink=120, paper=170)
    assert preprocess(faint)[1].max() == 255
    assert np.abs(preprocess(faint)[1].astype(int) - preprocess(drawn_seven())[1]).max() <= 2


def test_strokes_on_a_transparent_canvas_are_read_like_strokes_on_white():
    rgba = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    rgba.putalpha(Image.eval(drawn_seven(), lambda v: 255 - v))  # black ink, opaque only where drawn
    assert np.array_equal(preprocess(rgba)[1], preprocess(drawn_seven())[1])


def test_faint_specks_away_from_the_digit_are_ignored():
    noisy = drawn_seven()
    draw = ImageDraw.Draw(noisy)
    for x, y in [(5, 5), (270, 10), (10, 270), (265, 265), (140, 275)]:
        draw.point((x, y), fill=240)  # 6% darker than the paper
    assert np.array_equal(preprocess(noisy)[1], preprocess(drawn_seven())[1])


def test_a_view_fed_back_in_comes_out_unchanged():
    view = preprocess(drawn_seven())[1]
    assert np.array_equal(preprocess(Image.fromarray(view))[1], view)


@pytest.mark.parametrize(
    "format, mode",
    [
        ("PNG", "L"),
        ("PNG", "RGB"),
        ("PNG", "RGBA"),
        ("PNG", "P"),
        ("PNG", "I;16"),
        ("JPEG", "RGB"),
        ("BMP", "RGB"),
        ("GIF", "P"),
        ("WEBP", "RGB"),
        ("TIFF", "L"),
    ],
)
def test_every_supported_format_and_mode_reads_as_the_same_digit(format, mode):
    reference = preprocess(drawn_seven())[1]
    image = drawn_seven()
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)  # 16-bit, full range
    else:
        image = image.convert(mode)
    view = preprocess(encoded(image, format))[1]
    assert np.abs(view.astype(int) - reference).mean() < 3  # lossy formats differ by a little noise


def test_only_the_first_frame_of_an_animated_gif_is_used():
    first, second = drawn_seven(), Image.new("L", (280, 280), 255)
    ImageDraw.Draw(second).line([(40, 140), (240, 140)], fill=0, width=22)
    animated = encoded(first.convert("P"), "GIF", save_all=True, append_images=[second.convert("P")])
    assert np.array_equal(preprocess(animated)[1], preprocess(first.convert("P"))[1])


# ----------------------------------------------------------------------------- unusable images


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ImageError, match="nope.png: no such file"):
        preprocess(tmp_path / "nope.png")


def test_an_empty_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png: is empty"):
        preprocess(tmp_path / "empty.png")


def test_a_file_that_is_not_an_image_is_an_error_naming_it(tmp_path):
    (tmp_path / "notes.png").write_text("these are not pixels")
    with pytest.raises(NotAnImageError, match="notes.png: is not an image"):
        preprocess(tmp_path / "notes.png")


def test_a_truncated_image_is_an_error_naming_it(tmp_path):
    data = encoded(drawn_seven().convert("RGB"), "PNG")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png: is damaged or truncated"):
        preprocess(tmp_path / "cut.png")


def test_an_image_larger_than_8192_pixels_is_refused_before_decoding(tmp_path):
    Image.new("L", (8193, 16), 255).save(tmp_path / "wide.png")
    with pytest.raises(ImageError, match=r"wide.png: is 8193x16 pixels, larger than the 8192x8192 limit"):
        preprocess(tmp_path / "wide.png")


def test_an_image_pillow_decodes_whole_keeps_the_4096_limit():
    # An 8192x8192 RGBA JPEG 2000 of 84 KB cost +1.6 GB (fuzzing): formats and modes without a
    # reduced or strip decode stay at 4096 px.
    buffer = io.BytesIO()
    Image.new("RGBA", (4100, 16), (255, 255, 255, 255)).save(buffer, format="JPEG2000")
    with pytest.raises(ImageError, match=r"4100x16 pixels, larger than the 4096x4096 limit for this JPEG2000 image"):
        preprocess(buffer.getvalue())


def test_a_50_megapixel_phone_photo_is_read():
    # 8160x6120, as 48-50 MP phone cameras save: refused before (the limit was 4096 per side).
    photo = Image.new("RGB", (8160, 6120), (235, 230, 220))
    ImageDraw.Draw(photo).line([(4000, 2000), (4100, 4200)], fill=(30, 30, 40), width=120)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=85)
    assert max(ink_box(preprocess(buffer.getvalue())[1])) == 20


def test_an_image_of_exactly_4096_pixels_is_accepted():
    image = Image.new("L", (4096, 4096), 255)
    ImageDraw.Draw(image).line([(2000, 1000), (2000, 3000)], fill=0, width=200)
    assert max(ink_box(preprocess(image)[1])) == 20


@pytest.mark.parametrize("colour", [0, 255, 128])
def test_a_blank_image_is_an_error_not_a_guess(colour):
    with pytest.raises(ImageError, match="is blank"):
        preprocess(Image.new("L", (100, 100), colour))


def test_a_fully_transparent_image_is_blank():
    with pytest.raises(ImageError, match="is blank"):
        preprocess(Image.new("RGBA", (100, 100), (0, 0, 0, 0)))


# ----------------------------------------------------------------------------- predict()


def test_predict_returns_the_documented_shape(model):
    [result] = predict(model, [drawn_seven()], 3)
    assert set(result) == {"image", "number", "digit", "digit_probability", "sum", "sum_probability", "top3"}
    assert result["number"] == 3 and 0 <= result["digit"] <= 9 and 0 <= result["sum"] <= 18
    assert [entry["value"] for entry in result["top3"]["digit"]][0] == result["digit"]
    assert len(result["top3"]["sum"]) == 3


def test_predict_reports_a_bad_image_and_still_predicts_the_others(model, tmp_path):
    drawn_seven().save(tmp_path / "seven.png")
    results = predict(model, [tmp_path / "missing.png", tmp_path / "seven.png"], [1, 2])
    assert results[0] == {"image": str(tmp_path / "missing.png"), "error": f"{tmp_path / 'missing.png'}: no such file"}
    assert results[1]["number"] == 2 and "digit" in results[1]


def test_predict_reports_a_number_outside_0_to_9_for_that_image_only(model):
    results = predict(model, [drawn_seven(), drawn_seven()], [12, 4])
    assert "number must be an integer in 0..9, got 12" in results[0]["error"]
    assert results[1]["number"] == 4


def test_predict_refuses_a_list_of_numbers_of_the_wrong_length(model):
    with pytest.raises(DigitsumError, match="2 numbers for 1 images"):
        predict(model, [drawn_seven()], [1, 2])


def test_predict_gives_the_same_answer_alone_and_in_a_batch(model):
    alone = predict(model, [drawn_seven()], [5])[0]
    batched = predict(model, [drawn_seven(ink=255, paper=0), drawn_seven()], [1, 5])[1]
    assert alone["top3"] == batched["top3"]


# ----------------------------------------------------------------------------- the command


def test_the_command_prints_one_line_per_image(model_path, tmp_path, capsys):
    drawn_seven().save(tmp_path / "seven.png")
    assert cli.main(["predict", str(tmp_path / "seven.png"), "--number", "3", "--checkpoint", str(model_path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tmp_path / 'seven.png'}: digit ") and " + 3 = " in line


def _cut_tiff() -> bytes:  # Pillow warns "Corrupt EXIF data" (twice), then fails
    buffer = io.BytesIO()
    Image.new("L", (40, 30), 200).save(buffer, format="TIFF")
    return buffer.getvalue()[:100]


def _damaged_deflate_tiff() -> bytes:  # libtiff printed "ZIPDecode: Decoding error at scanline 0, ..."
    buffer = io.BytesIO()
    Image.fromarray((np.arange(300 * 300) % 251).astype(np.uint8).reshape(300, 300)).save(
        buffer, format="TIFF", compression="tiff_deflate"
    )
    data = bytearray(buffer.getvalue())
    data[40:60] = bytes(byte ^ 0x55 for byte in data[40:60])  # inside the strip's deflate stream
    return bytes(data)


@pytest.mark.slow  # a fresh interpreter (pytest records warnings itself, so only a real process shows them)
@pytest.mark.parametrize("damaged", [_cut_tiff, _damaged_deflate_tiff], ids=["pillow-warns", "libtiff-prints"])
def test_a_damaged_tiff_is_one_line_on_stderr_without_the_decoders_warnings(model_path, tmp_path, damaged):
    (tmp_path / "cut.tif").write_bytes(damaged())
    drawn_seven().save(tmp_path / "seven.png")
    files = [str(tmp_path / "cut.tif"), str(tmp_path / "seven.png")]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    result = subprocess.run(
        [sys.executable, "-m", "digitsum", "predict", *files, "--number", "1", "--checkpoint", str(model_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cut.tif: is damaged or truncated" in result.stderr, result.stderr
    assert result.stdout.startswith(files[1])


def test_unusable_paths_are_error_entries_and_the_other_images_are_still_predicted(model):
    # Fuzzing: a NUL byte in a path raised ValueError out of predict() (the good image was lost); a
    # newline in a name split the one-line error.
    class IntPath(os.PathLike):
        def __fspath__(self):
            return 3

    results = predict(model, ["a\0b.png", "x\ny.png", IntPath(), drawn_seven()], 3)
    assert [set(result) >= {"image", "error"} for result in results[:3]] == [True, True, True]
    assert "a\\x00b.png: is not a usable path" in results[0]["error"]
    assert "\n" not in results[1]["error"] and "x\\ny.png: no such file" in results[1]["error"]
    assert "digit" in results[3]


@pytest.mark.slow  # a fresh interpreter with a strict UTF-8 stdout
def test_a_file_name_that_is_not_utf8_is_printed_escaped(model_path, tmp_path):
    name = os.fsencode(tmp_path) + b"/seven\xff.png"
    drawn_seven().save(os.fsdecode(name))
    result = subprocess.run(
        [sys.executable, "-m", "digitsum", "predict", os.fsdecode(name), "--number", "1", "--checkpoint", str(model_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 0, result.stderr
    assert "seven\\udcff.png: digit" in result.stdout


def test_the_command_prints_json_with_top3(model_path, tmp_path, capsys):
    drawn_seven().save(tmp_path / "seven.png")
    assert cli.main(["predict", str(tmp_path / "seven.png"), "--number", "3", "--json", "--checkpoint", str(model_path)]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["image"] == str(tmp_path / "seven.png") and set(result["top3"]) == {"digit", "sum"}


def test_the_command_exits_2_with_one_line_per_bad_file_and_predicts_the_rest(model_path, tmp_path, capsys):
    drawn_seven().save(tmp_path / "seven.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    Image.new("L", (64, 64), 255).save(tmp_path / "blank.png")
    files = [tmp_path / name for name in ("missing.png", "empty.png", "text.png", "blank.png", "seven.png")]
    code = cli.main(["predict", *map(str, files), "--number", "1", "--checkpoint", str(model_path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 4 and "Traceback" not in err
    for name in ("missing.png", "empty.png", "text.png", "blank.png"):
        assert name in err
    assert out.startswith(str(tmp_path / "seven.png"))


def test_the_command_exits_2_for_a_number_out_of_range(model_path, tmp_path, capsys):
    drawn_seven().save(tmp_path / "seven.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(tmp_path / "seven.png"), "--number", "10", "--checkpoint", str(model_path)])
    assert exit_info.value.code == 2 and "got 10" in capsys.readouterr().err


def test_the_command_takes_one_number_per_image(model_path, tmp_path, capsys):
    drawn_seven().save(tmp_path / "a.png")
    drawn_seven().save(tmp_path / "b.png")
    assert (
        cli.main(
            [
                "predict",
                str(tmp_path / "a.png"),
                str(tmp_path / "b.png"),
                "--numbers",
                "2,9",
                "--json",
                "--checkpoint",
                str(model_path),
            ]
        )
        == 0
    )
    assert [r["number"] for r in json.loads(capsys.readouterr().out)] == [2, 9]


def test_the_command_exits_2_for_a_missing_checkpoint(tmp_path, capsys):
    drawn_seven().save(tmp_path / "seven.png")
    assert cli.main(["predict", str(tmp_path / "seven.png"), "--number", "1", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_show_writes_the_28x28_view_next_to_the_image(model_path, tmp_path, capsys):
    drawn_seven().save(tmp_path / "seven.png")
    assert cli.main(["predict", str(tmp_path / "seven.png"), "--number", "1", "--show", "--checkpoint", str(model_path)]) == 0
    view = Image.open(tmp_path / "seven.png.28x28.png")
    assert view.size == (28, 28)
    assert np.array_equal(np.asarray(view), preprocess(tmp_path / "seven.png")[1])


# ----------------------------------------------------------------------------- with a trained model


@pytest.fixture(scope="module")
def trained_model(trained_pt):
    from digitsum.checkpoint import load_model

    return load_model(trained_pt)[0]


@pytest.mark.slow
def test_mnist_test_images_saved_as_png_get_the_tensor_paths_predictions(trained_model, real_root):
    from digitsum.data import load_split

    test = load_split("test", real_root, limit=500)
    with torch.inference_mode():
        tensor_digits = trained_model(normalize(test.images), test.numbers)[0].argmax(1)
    results = predict(trained_model, [encoded(Image.fromarray(image.numpy())) for image in test.images], test.numbers.tolist())
    agreement = np.mean([r["digit"] == int(d) for r, d in zip(results, tensor_digits)])
    assert agreement >= 0.998


@pytest.mark.slow
def test_a_drawn_seven_saved_as_jpeg_is_read_as_seven_and_added(trained_model):
    [result] = predict(trained_model, [encoded(drawn_seven().convert("RGB"), "JPEG", quality=75)], [5])
    assert (result["digit"], result["sum"]) == (7, 12)


def test_classify_in_chunks_and_in_bf16_matches_the_plain_model(model):
    from digitsum.model import inference_model
    from digitsum.predict import classify

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(10, 1, 28, 28, generator=generator)
    numbers = torch.randint(0, 10, (10,), generator=generator).tolist()
    fast = inference_model(model)
    with torch.no_grad():
        digit_logits, sum_logits = model(images, torch.tensor(numbers))
    chunked = classify(fast, images, numbers, chunk=3, bf16=False)
    assert torch.allclose(chunked[0], digit_logits.softmax(1), atol=1e-5)
    assert torch.allclose(chunked[1], sum_logits.softmax(1), atol=1e-5)
    bf16 = classify(fast, images, numbers, chunk=4, bf16=True)  # bf16 keeps ~3 significant digits
    assert torch.allclose(bf16[0], chunked[0], atol=0.05)
