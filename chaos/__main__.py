"""``python -m chaos``: see :mod:`chaos.run`."""

import sys

from chaos.run import main

sys.exit(main())
