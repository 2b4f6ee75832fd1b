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
    truncated TIFF) are not printed; what is wrong with an image is its ImageError, or nothing."""
    warnings.filterwarnings("ignore", module=r"(PIL|pillow_heif)(\.|$)")
