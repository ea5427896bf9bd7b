"""``python -m swapfs.cli``: the command line, as the ``swapfs`` script runs it."""

import sys

from swapfs.cli import main

sys.exit(main())
