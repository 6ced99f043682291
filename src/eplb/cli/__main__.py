"""``python -m eplb.cli``: the same as the ``eplb`` command (and ``python -m eplb``)."""

import sys

from eplb.cli import main

if __name__ == "__main__":
    sys.exit(main())
