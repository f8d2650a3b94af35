"""``python -m steering_opt``: the same as the ``steering-opt`` command."""

import sys

from .cli import main

sys.exit(main())
