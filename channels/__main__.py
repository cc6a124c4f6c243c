"""``python -m channels``: the same command as ``channels-broker``."""

import sys

from .cli import main

sys.exit(main())
