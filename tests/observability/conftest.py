"""Fixtures of the observability tests: Prometheus' own binaries (found, or installed from
Debian's package once per session)."""

from __future__ import annotations

import pytest

from tests.observability.prom import Binaries, find_or_install


@pytest.fixture(scope="session")
def prometheus_binaries() -> Binaries:
    try:
        return find_or_install()
    except RuntimeError as exc:
        pytest.fail(f"Prometheus is needed and could not be installed: {exc}", pytrace=False)
