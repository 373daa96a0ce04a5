"""``/metrics``, ``/healthz`` and ``/readyz`` on one port, from a daemon thread.

``/healthz`` answers 200 while the process's stages are alive (their loops keep turning);
``/readyz`` answers 200 once every stage has its partitions assigned and reaches the broker.
Kubernetes restarts on the first and routes (and KEDA scales) on the second.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.metrics import Metrics


class Health:
    """Liveness and readiness of the stages of one process."""

    def __init__(self, stall_after_s: float = 120.0) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._beats: dict[str, float] = {}
        self._ready: dict[str, bool] = {}
        self._stall_after_s = stall_after_s

    def register(self, stage: str) -> None:
        with self._lock:
            self._beats[stage] = time.monotonic()
            self._ready[stage] = False

    def beat(self, stage: str) -> None:
        """Called every loop turn: a stage that stops turning is not alive."""
        self._beats[stage] = time.monotonic()

    def set_ready(self, stage: str, ready: bool) -> None:
        with self._lock:
            self._ready[stage] = ready
            self._changed.notify_all()

    def wait_changed(self, timeout: float) -> None:
        """Block until a readiness changes or ``timeout`` passes (for tests and start-up)."""
        with self._changed:
            self._changed.wait(timeout)

    def alive(self) -> tuple[bool, dict[str, float]]:
        now = time.monotonic()
        with self._lock:
            ages = {s: round(now - t, 3) for s, t in self._beats.items()}
        return all(a < self._stall_after_s for a in ages.values()), ages

    def ready(self) -> tuple[bool, dict[str, bool]]:
        with self._lock:
            state = dict(self._ready)
        return bool(state) and all(state.values()), state


class HealthServer:
    def __init__(self, host: str, port: int, health: Health, metrics: Metrics) -> None:
        handler = _make_handler(health, metrics)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _make_handler(health: Health, metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    import json

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok, ages = health.alive()
                self._json(200 if ok else 503, {"alive": ok, "last_loop_age_s": ages})
            elif self.path == "/readyz":
                ok, state = health.ready()
                self._json(200 if ok else 503, {"ready": ok, "stages": state})
            else:
                self._send(404, b"not found\n", "text/plain")

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body).encode() + b"\n", "application/json")

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes every few seconds would drown the structured log."""

    return Handler
