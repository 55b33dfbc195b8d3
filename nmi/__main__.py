"""``python -m nmi``: the same as the ``nmi`` console script."""

import sys

from .cli import main

sys.exit(main())
