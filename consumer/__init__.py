"""auto-trace: publishes closed trades to independent trackers after T+X, without personal data."""

from __future__ import annotations

__version__ = "0.1.0"
