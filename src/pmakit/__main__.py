"""``python -m pmakit``: the ``pmakit`` command (as ``python -m pmakit.cli``)."""

import sys

from .cli import main


sys.exit(main())
