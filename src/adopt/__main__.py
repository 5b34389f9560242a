"""``python -m adopt``: the same command line as the ``adopt`` script."""

import sys

from adopt.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m adopt"))
