"""How many examples a hypothesis property test runs: its full count in `make test` / plain
`pytest`, a tenth (at least 10) in the fast subset `pytest -m "not slow"` (conftest.py sets
DIGITSUM_TEST_EXAMPLES=quick there; set DIGITSUM_TEST_EXAMPLES=full to run the full count anyway)."""

from __future__ import annotations

import os


def examples(full: int) -> int:
    """`full`, or a tenth of it (at least 10, at most `full`) when the quick budget is in effect."""
    if os.environ.get("DIGITSUM_TEST_EXAMPLES") == "quick":
        return min(full, max(10, full // 10))
    return full
