"""Writing files so that a failure never leaves a half-written one (every module that writes uses this)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from digitsum.errors import DigitsumError


class WriteError(DigitsumError):
    """A file could not be written (disk full, read-only or missing folder, no permission)."""


def write_error(path: str | os.PathLike, error: OSError) -> WriteError:
    """One line naming the file and the reason, e.g. 'cannot write runs/x/last.pt: No space left on device'."""
    reason = error.strerror or str(error) or type(error).__name__
    failure = WriteError(f"cannot write {path}: {reason} (any previous version of it is unchanged)")
    failure.reason = reason
    return failure


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
