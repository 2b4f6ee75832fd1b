"""digitsum: an MNIST digit and a number 0..9 in, the digit and their sum out."""

__version__ = "0.1.0"
