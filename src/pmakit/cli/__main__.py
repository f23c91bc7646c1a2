"""``python -m pmakit.cli``: the ``pmakit`` command."""

import sys

from . import main


sys.exit(main())
