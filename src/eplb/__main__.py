"""``python -m eplb``: the same as the ``eplb`` command."""

import sys

from eplb.cli import main

if __name__ == "__main__":
    sys.exit(main())
