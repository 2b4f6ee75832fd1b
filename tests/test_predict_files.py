"""`digitsum predict` and the files it is given: what is not a regular file or is far too large is
refused before it is read, and the 28x28 views (--show, --show-dir) never clash or lose predictions."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from digitsum import cli
from digitsum.predict import MAX_FILE_BYTES, ImageError, preprocess
from model_files import random_checkpoint


def drawn_seven() -> Image.Image:
    image = Image.new("L", (280, 280), 255)
    ImageDraw.Draw(image).line([(70, 60), (210, 60), (120, 230)], fill=0, width=22, joint="curve")
    return image


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("predict-files") / "model.pt")


# ----------------------------------------------------------------------------- C: what is read


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_without_hanging(tmp_path, model_path, capsys):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    drawn_seven().save(tmp_path / "seven.png")
    outcome = []
    # In a daemon thread, so that a hang fails this test instead of stalling the whole run.
    worker = threading.Thread(
        target=lambda: outcome.append(
            cli.main(["predict", str(fifo), str(tmp_path / "seven.png"), "--number", "1", "--checkpoint", str(model_path)])
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "digitsum predict hung on a FIFO"
    captured = capsys.readouterr()
    assert outcome == [2] and f"{fifo}: is not a regular file" in captured.err
    assert "seven.png: digit" in captured.out  # the other image is still predicted


def test_dev_zero_is_refused_as_not_a_regular_file():
    with pytest.raises(ImageError, match="/dev/zero: is not a regular file"):
        preprocess("/dev/zero")


def test_a_huge_sparse_file_is_refused_by_its_size_without_reading_it(tmp_path):
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as file:
        file.truncate(3 * 1024**3)  # 3 GB that take no disk space; reading them would take 3 GB of memory
    with pytest.raises(ImageError, match=r"huge.png: is 3,221,225,472 bytes \(3,072 MB\), over the 128 MB limit"):
        preprocess(huge)


def test_a_file_just_over_the_cap_is_refused_and_one_at_the_cap_is_read(tmp_path):
    over = tmp_path / "over.png"
    with open(over, "wb") as file:
        file.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ImageError, match="over the 128 MB limit"):
        preprocess(over)
    at_cap = tmp_path / "at_cap.png"
    drawn_seven().save(at_cap)
    with open(at_cap, "ab") as file:  # trailing bytes after the PNG's end: Pillow ignores them
        file.truncate(MAX_FILE_BYTES)
    assert preprocess(at_cap)[1].shape == (28, 28)


def test_missing_files_and_folders_keep_their_messages(tmp_path):
    with pytest.raises(ImageError, match="nothing.png: no such file"):
        preprocess(tmp_path / "nothing.png")
    with pytest.raises(ImageError, match="is a folder, not an image"):
        preprocess(tmp_path)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageError, match="dangling.png: no such file"):
        preprocess(tmp_path / "dangling.png")


# ----------------------------------------------------------------------------- B: the 28x28 views


def test_show_gives_x_png_and_x_jpg_their_own_views(tmp_path, model_path, capsys):
    drawn_seven().save(tmp_path / "x.png")
    drawn_seven().rotate(90).convert("RGB").save(tmp_path / "x.jpg", quality=95)
    assert (
        cli.main(
            [
                "predict",
                str(tmp_path / "x.png"),
                str(tmp_path / "x.jpg"),
                "--number",
                "1",
                "--show",
                "--checkpoint",
                str(model_path),
            ]
        )
        == 0
    )
    for name in ("x.png", "x.jpg"):
        view = np.asarray(Image.open(tmp_path / f"{name}.28x28.png"))
        assert np.array_equal(view, preprocess(tmp_path / name)[1])
    assert not np.array_equal(
        np.asarray(Image.open(tmp_path / "x.png.28x28.png")), np.asarray(Image.open(tmp_path / "x.jpg.28x28.png"))
    )


def predict_with_views(images, views, checkpoint, *extra: str) -> int:
    """`digitsum predict IMAGES --number 1 --show-dir VIEWS [EXTRA] --checkpoint CHECKPOINT`'s exit code."""
    return cli.main(
        ["predict", *map(str, images), "--number", "1", "--show-dir", str(views), *extra, "--checkpoint", str(checkpoint)]
    )


def test_show_dir_numbers_views_of_same_named_images_from_different_folders(tmp_path, model_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    drawn_seven().save(tmp_path / "a" / "x.png")
    drawn_seven().rotate(90).save(tmp_path / "b" / "x.png")
    views = tmp_path / "views"
    assert predict_with_views([tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"], views, model_path, "--json") == 0
    results = json.loads(capsys.readouterr().out)
    assert [Path(result["view"]).name for result in results] == ["x.png.28x28.png", "x.png-2.28x28.png"]
    assert np.array_equal(np.asarray(Image.open(views / "x.png-2.28x28.png")), preprocess(tmp_path / "b" / "x.png")[1])


def test_a_view_never_overwrites_an_input_image(tmp_path, model_path):
    views = tmp_path / "views"
    views.mkdir()
    drawn_seven().save(views / "x.png.28x28.png")  # an input that sits where x.png's view would go
    drawn_seven().save(tmp_path / "x.png")
    before = (views / "x.png.28x28.png").read_bytes()
    assert predict_with_views([views / "x.png.28x28.png", tmp_path / "x.png"], views, model_path) == 0
    assert (views / "x.png.28x28.png").read_bytes() == before
    assert (views / "x.png-2.28x28.png").exists()


@pytest.mark.parametrize("kind", ["a file", "under a file", "not creatable"])
def test_a_bad_show_dir_is_one_line_exit_2_before_any_work(tmp_path, model_path, capsys, kind):
    drawn_seven().save(tmp_path / "x.png")
    (tmp_path / "file").write_text("not a folder")
    show_dir = {
        "a file": tmp_path / "file",
        "under a file": tmp_path / "file" / "views",
        "not creatable": Path("/proc/digitsum-views"),
    }[kind]
    # A missing checkpoint would fail the loading: the folder check must come first.
    assert predict_with_views([tmp_path / "x.png"], show_dir, tmp_path / "none.pt") == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"digitsum predict: error: --show-dir {show_dir}")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into read-only folders")
def test_a_read_only_show_dir_is_refused_before_any_work(tmp_path, model_path, capsys):
    drawn_seven().save(tmp_path / "x.png")
    views = tmp_path / "views"
    views.mkdir(mode=0o555)
    assert predict_with_views([tmp_path / "x.png"], views, model_path) == 2
    assert "is not writable" in capsys.readouterr().err


def test_a_view_that_cannot_be_written_is_that_image_s_error_and_every_prediction_is_printed(tmp_path, model_path, capsys):
    drawn_seven().save(tmp_path / "x.png")
    drawn_seven().save(tmp_path / "y.png")
    (tmp_path / "x.png.28x28.png").mkdir()  # the view's name is taken by a folder: saving it fails
    assert (
        cli.main(
            [
                "predict",
                str(tmp_path / "x.png"),
                str(tmp_path / "y.png"),
                "--number",
                "1",
                "--show",
                "--checkpoint",
                str(model_path),
            ]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert f"{tmp_path / 'x.png'}: digit" in captured.out and f"{tmp_path / 'y.png'}: digit" in captured.out
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and "x.png: cannot write its 28x28 view" in errors[0]
    assert (tmp_path / "y.png.28x28.png").is_file()


def test_a_symbolic_link_where_a_view_goes_is_replaced_not_written_through(tmp_path, model_path):
    # An old link in the views folder named like x.png's view, pointing at another file (here an
    # input image elsewhere): the view replaces the link; the file it pointed at is untouched.
    # Before, Pillow's save followed the link and overwrote that file with the 28x28 view.
    (tmp_path / "photos").mkdir()
    drawn_seven().save(tmp_path / "photos" / "x.png")
    kept = tmp_path / "photos" / "keep.png"
    drawn_seven().rotate(90).save(kept)
    before = kept.read_bytes()
    views = tmp_path / "views"
    views.mkdir()
    (views / "x.png.28x28.png").symlink_to(kept)
    assert predict_with_views([tmp_path / "photos" / "x.png"], views, model_path) == 0
    assert kept.read_bytes() == before
    view = views / "x.png.28x28.png"
    assert not view.is_symlink() and np.array_equal(np.asarray(Image.open(view)), preprocess(tmp_path / "photos" / "x.png")[1])
    assert [p.name for p in views.iterdir()] == ["x.png.28x28.png"]  # no temporary file left behind
