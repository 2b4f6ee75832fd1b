"""Test-only entry point for torchrun: the `digitsum` CLI (exactly `python -m digitsum`) with two hooks.

- $DIGITSUM_TEST_MNIST_TABLE: a JSON file of the synthetic MNIST's (size, md5) table, which the
  in-process tests patch into digitsum.mnist (a torchrun child cannot inherit a monkeypatch).
- $DIGITSUM_TEST_SUMMARY_DIR: each rank writes train()'s summary (with its weights' SHA-256) to
  rank<RANK>.json there, so the test can compare the ranks' weights.
- $DIGITSUM_TEST_STOP_AFTER: passed to train() as stop_after (a stopped, resumable run).
"""

import json
import os
import sys

from digitsum import cli, mnist
from digitsum import train as train_module

if os.environ.get("DIGITSUM_TEST_MNIST_TABLE"):
    with open(os.environ["DIGITSUM_TEST_MNIST_TABLE"]) as table:
        mnist.MNIST_FILES = {name: tuple(entry) for name, entry in json.load(table).items()}

_train = train_module.train


def recording_train(*args, **kwargs):
    if os.environ.get("DIGITSUM_TEST_STOP_AFTER"):
        kwargs["stop_after"] = int(os.environ["DIGITSUM_TEST_STOP_AFTER"])
    summary = _train(*args, **kwargs)
    folder = os.environ.get("DIGITSUM_TEST_SUMMARY_DIR")
    if folder:
        with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.json"), "w") as out:
            json.dump({k: v for k, v in summary.items() if k != "metrics"}, out, default=str)
    return summary


train_module.train = recording_train

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
