"""The one exception type for errors a user can cause (the CLI turns it into exit code 2), and
keeping the image decoders' warnings out of what a user reads."""

import warnings


class DigitsumError(Exception):
    """A problem with the user's input, files or environment, with a one-line message."""


class Interrupted(Exception):
    """Ctrl-C during a long job; the message says what was saved and how to continue."""


def quiet_decoder_warnings() -> None:
    """Process-wide, for the processes digitsum owns (the CLI, `serve`'s workers), never on import:
    the image decoders' own warnings (Pillow's "Corrupt EXIF data. Expecting to read 12 bytes but
    only got 6.", printed with its file and line as two more lines beside the one-line error of a
    truncated TIFF) are not printed, nor libtiff's (quiet_libtiff); what is wrong with an image is
    its ImageError, or nothing."""
    warnings.filterwarnings("ignore", module=r"(PIL|pillow_heif)(\.|$)")
    quiet_libtiff()


def quiet_libtiff() -> bool:
    """Turn off libtiff's own messages: its default handlers print "module: message" to stderr.

    A damaged compressed TIFF printed a line such as "ZIPDecode: Decoding error at scanline 0,
    incorrect data check." or "Fax4Decode: Bad code word at line 96 of strip 0" next to the
    one-line error (fuzzing: every Deflate and 1 in 2 LZW TIFFs with a few bytes changed), and into
    the server's log. Pillow turns every libtiff failure into an OSError, which preprocess words as
    one line, so the handlers are set to none (libtiff calls a handler only where one is set).
    Pillow offers no way to do this, so it is done through ctypes on the libtiff that Pillow's
    _imaging module loaded, found in /proc/self/maps (Linux; elsewhere libtiff keeps printing).
    Returns whether it was done."""
    try:
        import ctypes

        from PIL import _imaging  # noqa: F401 - loads the libtiff Pillow decodes with

        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "libtiff" in line.rsplit("/", 1)[-1]}
        for path in paths:
            library = ctypes.CDLL(path)  # the copy already loaded: dlopen returns its handle
            for name in ("TIFFSetWarningHandler", "TIFFSetErrorHandler"):
                setter = getattr(library, name)
                setter.restype, setter.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
                setter(None)
        return bool(paths)
    except (OSError, AttributeError, ImportError):  # no /proc, no libtiff, or a build without these
        return False
