"""`python -m digitsum ...` is the `digitsum` command (torchrun needs a module: `torchrun -m digitsum train ...`)."""

import sys

from digitsum.cli import main

if __name__ == "__main__":
    sys.exit(main())
