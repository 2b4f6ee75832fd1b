"""The one exception type for errors a user can cause (the CLI turns it into exit code 2)."""


class DigitsumError(Exception):
    """A problem with the user's input, files or environment, with a one-line message."""


class Interrupted(Exception):
    """Ctrl-C during a long job; the message says what was saved and how to continue."""
