"""Runs one role (or all of them) until SIGTERM/SIGINT, then shuts down within the grace period.

``--role all`` runs every stage as a thread of one process: the stages spend their time in
librdkafka and network waits, which release the GIL, and one process is what development and
small installations want. In Kubernetes each role is its own Deployment (and process).
"""

from __future__ import annotations

import gc
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Literal, Protocol

from consumer import __version__
from consumer.config import Settings
from consumer.errors import ConfigError
from consumer.health import Health, HealthServer
from consumer.lag import LagMonitor
from consumer.log import get_logger
from consumer.metrics import Metrics

log = get_logger("runner")

Role = Literal["ingest", "release", "sink", "all"]


class Stage(Protocol):
    name: str

    def run(self, stop: threading.Event) -> None: ...


def build_stages(
    settings: Settings, role: Role, adapter: str | None, metrics: Metrics, health: Health
) -> list[Stage]:
    from consumer.ingest import IngestStage
    from consumer.release import ReleaseStage
    from consumer.sink import SinkWorker

    stages: list[Stage] = []
    if role in ("ingest", "all"):
        stages.append(IngestStage(settings, metrics, health))
    if role in ("release", "all"):
        stages.append(ReleaseStage(settings, metrics, health))
    if role == "sink":
        if adapter is None:
            enabled = settings.enabled_adapters()
            if len(enabled) != 1:
                raise ConfigError(
                    "--role sink needs --adapter NAME when several adapters are enabled"
                )
            adapter = enabled[0].name
        cfg = settings.adapter(adapter)
        if not cfg.enabled:
            raise ConfigError(f"adapters: adapter {adapter!r} is disabled")
        stages.append(SinkWorker(settings, cfg, metrics, health))
    if role == "all":
        stages += [SinkWorker(settings, a, metrics, health) for a in settings.enabled_adapters()]
    return stages


#: Allocations of container objects between two young-generation collections (CPython: 700).
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Fewer, cheaper cyclic collections for a process that lives on short-lived objects.

    Every consumed record, header list and delivery report is a container object the cyclic
    collector tracks, and reference counting frees nearly all of them. With CPython's default a
    young collection ran every ~100 records, walking the batch still in hand each time and
    promoting it to be walked again: ~5% of ingest's loop (py-spy). Freezing moves what start-up
    built (modules, settings, clients) out of every later collection.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


class Runner:
    """Owns the stop event, the stage threads and the health server of one process."""

    def __init__(self, settings: Settings, role: Role, adapter: str | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.metrics.build_info.info({"version": __version__, "role": role})
        self.health = Health()
        self.metrics.watch_health(self.health)
        self.stages = build_stages(settings, role, adapter, self.metrics, self.health)
        self.lag = LagMonitor(settings, self.metrics)
        self.stop = threading.Event()
        self.failed: list[str] = []
        self.server: HealthServer | None = None

    def _target(self, stage: Stage) -> Callable[[], None]:
        def run() -> None:
            try:
                stage.run(self.stop)
            except Exception:
                # A stage that dies takes the process down: Kubernetes restarts it, and the
                # uncommitted records are consumed again.
                log.exception("stage crashed", extra={"fields": {"stage": stage.name}})
                self.failed.append(stage.name)
                self.stop.set()

        return run

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal received; shutting down", extra={"fields": {"signal": signum}})
            self.stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> int:
        """Run until stopped; 0 on a clean stop, 1 when a stage crashed."""
        if self.settings.metrics.port:
            self.server = HealthServer(
                self.settings.metrics.host, self.settings.metrics.port, self.health, self.metrics
            )
            self.server.start()
        self.lag.start()
        tune_gc()
        threads = [
            threading.Thread(target=self._target(s), name=s.name, daemon=True) for s in self.stages
        ]
        for thread in threads:
            thread.start()
        log.info("running", extra={"fields": {"stages": [s.name for s in self.stages]}})
        while not self.stop.wait(0.5):
            pass
        deadline = time.monotonic() + self.settings.shutdown.grace.total_seconds()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            log.error(
                "stages did not stop within the grace period", extra={"fields": {"stages": stuck}}
            )
        self.lag.stop()
        if self.server is not None:
            self.server.stop()
        return 1 if self.failed or stuck else 0
