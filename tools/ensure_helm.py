#!/usr/bin/env python3
"""Print the path of a pinned `helm`, building it once with `go install` if needed.

Helm comes from the Go module proxy (no other download works here), built into
``$AUTO_TRACE_CACHE_DIR`` (default ``~/.cache/auto-trace``) under ``helm-<version>/``, so a
second run finds it at once. ``$HELM`` pointing at a binary skips all of that.

    python3 tools/ensure_helm.py          # prints e.g. /root/.cache/auto-trace/helm-v3.22.0/helm

The first build takes several minutes on two cores (it compiles Kubernetes' client libraries);
the module and build caches (``go env GOMODCACHE GOCACHE``) make a rebuild after a version bump
faster. Exit status 3 when there is no helm and no Go toolchain to build it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HELM_MODULE = "helm.sh/helm/v3/cmd/helm"
HELM_VERSION = "v3.22.0"
#: The Kubernetes version helm assumes without a cluster (`helm template`, `helm lint`): the
#: official build stamps it from the k8s.io/client-go it is built with (v0.37.0 for v3.22.0, see
#: its go.mod); a bare `go install` would leave helm's fallback, 1.20, and refuse our kubeVersion.
KUBE_VERSION_MINOR = "37"
_LDFLAGS = " ".join(
    [
        "-s -w",
        f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
        *(
            f"-X helm.sh/helm/v3/pkg/{pkg}.k8sVersion{part}={value}"
            for pkg in ("lint/rules", "chartutil")
            for part, value in (("Major", "1"), ("Minor", KUBE_VERSION_MINOR))
        ),
    ]
)


def cache_dir() -> Path:
    base = os.environ.get("AUTO_TRACE_CACHE_DIR") or Path.home() / ".cache" / "auto-trace"
    return Path(base) / f"helm-{HELM_VERSION}"


def _works(binary: Path) -> bool:
    try:
        out = subprocess.run(
            [str(binary), "version", "--template", "{{.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.strip() == HELM_VERSION


def ensure_helm() -> Path:
    override = os.environ.get("HELM")
    if override:
        return Path(override)
    target_dir = cache_dir()
    binary = target_dir / "helm"
    if _works(binary):
        return binary
    go = shutil.which("go")
    if go is None:
        sys.stderr.write("ensure_helm: no helm in the cache and no `go` to build it" + "\n")
        raise SystemExit(3)
    target_dir.mkdir(parents=True, exist_ok=True)
    with (target_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and reuse it
        if _works(binary):
            return binary
        env = dict(os.environ, GOBIN=str(target_dir))
        env["GOFLAGS"] = f"{env.get('GOFLAGS', '')} -mod=mod".strip()
        sys.stderr.write(f"ensure_helm: building helm {HELM_VERSION} with go (once)..." + "\n")
        started = time.monotonic()
        subprocess.run(
            [go, "install", f"-ldflags={_LDFLAGS}", f"{HELM_MODULE}@{HELM_VERSION}"],
            env=env,
            check=True,
        )
        sys.stderr.write(f"ensure_helm: built in {time.monotonic() - started:.0f}s" + "\n")
    if not _works(binary):
        sys.stderr.write(f"ensure_helm: {binary} does not report {HELM_VERSION}" + "\n")
        raise SystemExit(1)
    return binary


if __name__ == "__main__":
    sys.stdout.write(f"{ensure_helm()}\n")
