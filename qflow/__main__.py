"""``python -m qflow``: the ``qflow`` command (torchrun starts it this way)."""

import sys

from qflow.cli.main import main

sys.exit(main())
