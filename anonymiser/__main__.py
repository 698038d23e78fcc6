"""``python -m anonymiser`` is the ``anonymise`` command."""

import sys

from .cli import main

sys.exit(main())
