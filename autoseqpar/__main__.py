"""``python -m autoseqpar explain ...``: see :mod:`autoseqpar.cli`."""
import sys

from .cli import main

sys.exit(main())
