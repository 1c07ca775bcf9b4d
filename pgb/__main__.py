"""``python -m pgb``: the same as the ``pgb`` command."""

import sys

from .cli import main

sys.exit(main())
