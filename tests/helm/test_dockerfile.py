"""The Dockerfile, checked without a container engine (none here: FACTS.md "Containers").

tools/check_dockerfile.py does the work: the static test checks what the image copies and how
it runs; the install test executes the build stage's own RUN lines on this machine and starts
the installed entrypoint from elsewhere, with the image's environment.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helm.conftest import ROOT

TOOL = str(ROOT / "tools" / "check_dockerfile.py")


def test_dockerfile_copies_only_existing_unignored_paths_and_runs_unprivileged() -> None:
    out = subprocess.run([sys.executable, TOOL], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


# pip resolves and installs every dependency from the index (its cache helps): 1-3 minutes.
@pytest.mark.timeout(900)
def test_dockerfile_install_steps_produce_a_working_auto_trace() -> None:
    out = subprocess.run(
        [sys.executable, TOOL, "--install"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "topics create --dry-run" in out.stdout
    assert "auto-trace.sink.hook" in out.stdout
