"""``python -m consumer`` is the same program as ``auto-trace``."""

from __future__ import annotations

import sys

from consumer.cli import main

if __name__ == "__main__":
    sys.exit(main())
