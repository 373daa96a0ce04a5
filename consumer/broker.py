"""A real Kafka broker for tests, the demo and local runs, started without asking anyone.

auto-trace's guarantees (never lost, never early, committed only when durable) are promises
about what a real broker does, so its tests run against one. :func:`kafka_cluster` picks it:

    KAFKA_BOOTSTRAP_SERVERS is set  →  that cluster, untouched ("external")
    a Docker engine answers         →  a throwaway KRaft container ("testcontainers")
    otherwise                       →  the official Apache Kafka broker run from Maven Central
                                       jars with the local JVM ("local", :class:`LocalBroker`)

The local path exists because many machines (CI runners, sandboxes, laptops without Docker
Desktop) have Java and Maven but no container engine, and no Linux distribution packages
Kafka. Its jars are resolved once into a cache (:func:`ensure_broker_jars`); every later start
is a JVM start, not a download.

``auto-trace local-broker`` (:func:`main`) runs the same broker in the foreground for the
demo and for development against a live cluster.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import fcntl
import gc
import hashlib
import importlib.resources
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Literal, TypeVar

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

__all__ = [
    "BrokerError",
    "Cluster",
    "LocalBroker",
    "ensure_broker_jars",
    "kafka_cluster",
    "main",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Points every test, the demo and ``local-broker`` at an existing cluster instead.
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
#: Where resolved broker jars live; defaults to ``~/.cache/auto-trace``.
CACHE_DIR_ENV = "AUTO_TRACE_CACHE_DIR"

#: The image testcontainers' KafkaContainer boot script is written for (Confluent layout);
#: KRaft needs 7.0 or later.
TESTCONTAINERS_IMAGE = "confluentinc/cp-kafka:7.6.0"

# Kafka 4 also carries log4j2, whose status logger complains on every JVM start that it has
# no configuration; the broker logs through reload4j (log4j.properties below) anyway.
_QUIET_LOG4J2 = "-Dlog4j2.statusLoggerLevel=OFF"
#: Heap and GC settings sized for a developer machine or a 2-core CI runner that also runs
#: the tests: the broker must not take the memory the test processes need. The GC flags are
#: the ones Kafka's own ``kafka-server-start.sh`` uses. ``TieredStopAtLevel=1`` keeps the JIT
#: at its quick tier: this broker lives for minutes, and the optimising tier kept compiling
#: for the whole of a ``make bench`` (its compiler threads at 30-65% of a core next to
#: 35-85% serving requests, on a machine with two cores). Measured side by side, the quick
#: tier halved the broker's CPU for the same copy (60% vs 105% of a core) and the release
#: lateness tail with it (p99 49-55 vs 132-248 ms).
JVM_OPTIONS: tuple[str, ...] = (
    "-Xms256m",
    "-Xmx1g",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
    _QUIET_LOG4J2,
)
#: ``StorageTool format`` is a short one-shot command; a big heap only slows its start.
_FORMAT_JVM_OPTIONS: tuple[str, ...] = ("-Xmx256m", "-Djava.awt.headless=true", _QUIET_LOG4J2)

_POM_NAMESPACE = "{http://maven.apache.org/POM/4.0.0}"
_MARKER_NAME = "COMPLETE"
_TAIL_LINES = 30

# The broker's own log4j output is a debugging aid, not a product log: keep the lines that say
# what the broker is doing (startup, shutdown, group rebalances) and drop the per-partition and
# per-request chatter that would bury them.
_LOG4J_PROPERTIES = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.org.apache.kafka=WARN
log4j.logger.org.apache.kafka.coordinator.group=INFO
log4j.logger.kafka=WARN
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
log4j.logger.kafka.server.ControllerServer=INFO
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
"""


class BrokerError(RuntimeError):
    """The development broker could not be provided: a tool is missing, or it failed to start.

    Deliberately outside :class:`consumer.errors.AutoTraceError`: this is a problem of the
    machine running tests or the demo, never of a record or a setting of the service.
    """


# --------------------------------------------------------------------------------------------
# Which cluster


@dataclass(frozen=True)
class Cluster:
    """The cluster a test session, the demo or a local run talks to."""

    bootstrap_servers: str
    kind: Literal["external", "testcontainers", "local"]
    #: The broker process when this session started one, for tests that stop or restart it.
    local: LocalBroker | None = None


@contextlib.contextmanager
def kafka_cluster() -> Iterator[Cluster]:
    """Provide a real cluster, starting one only when none is given; stop only what it started."""
    external = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if external:
        log.info("using the Kafka cluster at %s (%s)", external, BOOTSTRAP_ENV)
        yield Cluster(bootstrap_servers=external, kind="external")
        return

    if docker_engine_answers():
        container_cluster = _testcontainers_cluster()
        if container_cluster is not None:
            with container_cluster as cluster:
                yield cluster
            return

    with LocalBroker() as broker:
        yield Cluster(bootstrap_servers=broker.bootstrap_servers, kind="local", local=broker)


def docker_engine_answers(timeout: float = 2.0) -> bool:
    """Tell whether a Docker engine is usable, never raising: its absence is the common case.

    Without ``DOCKER_HOST`` and without the default socket there is nothing to ask, so the
    ``docker`` package (an optional dependency) is not even imported.
    """
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        answers = _ping_docker(timeout)
        if not answers:
            # A client that failed to connect leaves its socket in a reference cycle with the
            # exception. Collect it now, while its ResourceWarning is ignored, rather than in
            # some later test that turns warnings into errors.
            gc.collect()
        return answers


def _ping_docker(timeout: float) -> bool:
    try:
        import docker  # type: ignore[import-untyped]  # optional dependency
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=timeout)
    except Exception:  # noqa: BLE001  # any failure means "no usable engine"
        return False
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001  # any failure means "no usable engine"
        return False
    finally:
        client.close()


def _testcontainers_cluster() -> contextlib.AbstractContextManager[Cluster] | None:
    """A container-backed cluster, or None when the optional testcontainers is not installed."""
    try:
        from testcontainers.community.kafka import KafkaContainer  # optional dependency
    except ImportError:
        log.info("a Docker engine answers but testcontainers is not installed; using the JVM")
        return None

    @contextlib.contextmanager
    def run() -> Iterator[Cluster]:
        with KafkaContainer(TESTCONTAINERS_IMAGE).with_kraft() as container:
            servers = str(container.get_bootstrap_server())
            _wait_until_ready(servers, deadline=time.monotonic() + 60, describe=lambda: "")
            yield Cluster(bootstrap_servers=servers, kind="testcontainers")

    return run()


# --------------------------------------------------------------------------------------------
# Broker jars


def default_cache_dir() -> Path:
    """Keep downloads outside the repository so ``git clean`` does not cost another resolve."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "auto-trace"


def packaged_pom() -> bytes:
    """The pom shipped as package data, read through importlib so installed copies work too."""
    return (importlib.resources.files("consumer") / "broker-pom.xml").read_bytes()


def kafka_version(pom_xml: bytes) -> str:
    """Read the version from the pom so the cache folder changes when the pom's version does."""
    root = ET.fromstring(pom_xml)
    node = root.find(f"{_POM_NAMESPACE}properties/{_POM_NAMESPACE}kafka.version")
    if node is None or not (node.text or "").strip():
        raise BrokerError("the broker pom has no <properties><kafka.version>")
    return (node.text or "").strip()


def ensure_broker_jars(pom: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Return a folder holding every jar the broker needs, resolving it with Maven only once.

    The marker file is written last and holds the pom's digest, so an interrupted copy or a
    changed pom is resolved again, and a complete one is never touched (no ``mvn`` call, not
    even an offline one). The lock keeps two processes (pytest and the demo, say) from
    copying into the same folder at the same time; the second one waits and then finds the
    marker.
    """
    pom_bytes = pom.read_bytes() if pom is not None else packaged_pom()
    cache_dir = cache_dir or default_cache_dir()
    digest = hashlib.sha256(pom_bytes).hexdigest()
    version_dir = cache_dir / f"kafka-{kafka_version(pom_bytes)}"
    libs = version_dir / "libs"
    marker = version_dir / _MARKER_NAME

    if _is_complete(marker, digest):
        return libs

    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f"{version_dir.name}.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is resolving the broker jars; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(marker, digest):
            return libs
        _resolve_jars(pom_bytes, version_dir, libs)
        tmp_marker = marker.with_suffix(".tmp")
        tmp_marker.write_text(digest)
        tmp_marker.replace(marker)
    return libs


def _is_complete(marker: Path, digest: str) -> bool:
    try:
        return marker.read_text().strip() == digest
    except FileNotFoundError:
        return False


def _resolve_jars(pom_bytes: bytes, version_dir: Path, libs: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            "cannot start a local Kafka broker: `mvn` (Apache Maven) is not on PATH. "
            f"Install Maven and Java 17+, start Docker, or set {BOOTSTRAP_ENV}."
        )
    version_dir.mkdir(parents=True, exist_ok=True)
    # mvn writes target/ next to the pom it is given: copy the pom so that lands in the cache.
    pom_copy = version_dir / "pom.xml"
    pom_copy.write_bytes(pom_bytes)
    shutil.rmtree(libs, ignore_errors=True)
    command = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(pom_copy),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={libs}",
        "-DincludeScope=runtime",
    ]
    log.info(
        "resolving the Kafka broker jars into %s (once; up to a minute with an empty Maven cache)",
        libs,
    )
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            cwd=version_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.output if isinstance(exc.output, str) else ""
        raise BrokerError(
            f"`{' '.join(command)}` did not finish in {exc.timeout:.0f} s:\n{_tail(output)}"
        ) from exc
    if done.returncode != 0:
        raise BrokerError(
            f"`{' '.join(command)}` failed with exit code {done.returncode}:\n"
            f"{_tail(done.stdout or '')}"
        )
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise BrokerError(
            f"`{' '.join(command)}` succeeded but {libs} holds no kafka_2.13 jar:\n"
            f"{_tail(done.stdout or '')}"
        )
    log.info("resolved the broker jars in %.1f s", time.monotonic() - started)


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Local broker


def _free_ports(count: int) -> list[int]:
    """Ask the kernel for distinct free loopback ports (all held open at once, so distinct)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _require_free(port: int) -> None:
    """Say "port in use" in one line now, rather than in a JVM stack trace ten seconds later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise BrokerError(
                f"cannot start a Kafka broker on port {port}: {exc.strerror}"
            ) from exc


def _new_cluster_id() -> str:
    """16 random bytes, URL-safe base64, never starting with "-".

    Kafka's own ``Uuid.randomUuid()`` skips ids with a leading "-" too: command-line parsers,
    ``kafka-storage format -t`` among them, take such an id for an option (1 start in 64).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _die_with_parent() -> Callable[[], None] | None:
    """Make the JVM receive SIGTERM when the Python process dies, even by SIGKILL.

    A killed pytest run otherwise leaves a broker holding ports and memory until someone
    notices. Linux delivers the signal when the *thread* that started the child ends, so it
    is only armed from the main thread; brokers started elsewhere rely on :meth:`stop`.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def arm() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return arm


class LocalBroker:
    """One KRaft node (broker and controller) in a child JVM, on free loopback ports.

    Ports and the data folder are chosen at the first :meth:`start` and kept until
    :meth:`stop`, so :meth:`restart`, and :meth:`kill` followed by :meth:`start`, bring back
    the same cluster with the same data at the same address — what chaos tests need.
    """

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        port: int | None = None,
        keep: bool = False,
        jars: Path | None = None,
        startup_timeout: float = 120.0,
        stop_timeout: float = 30.0,
    ) -> None:
        """Configure; nothing runs until :meth:`start`.

        ``data_dir`` given means the caller owns it: it is never deleted. Otherwise a temporary
        folder is used and removed on :meth:`stop` unless ``keep`` is set.
        """
        self._given_dir = data_dir
        self._keep = keep or data_dir is not None
        self._wanted_port = port
        self._jars = jars
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._workdir: Path | None = None
        self._port: int | None = None
        self._controller_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- what callers read ------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self._require(self._port, 'port')}"

    @property
    def log_path(self) -> Path:
        """The broker's stdout and stderr, across restarts; kept when a start fails."""
        return self._require(self._workdir, "workdir") / "broker.log"

    @property
    def data_dir(self) -> Path:
        return self._require(self._workdir, "workdir")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the broker process to end; its exit code, or None if it still runs."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> LocalBroker:
        """Start the JVM and return once the broker answers metadata requests with itself."""
        if self.running:
            raise BrokerError(f"the broker at {self.bootstrap_servers} is already running")
        java = shutil.which("java")
        if java is None:
            raise BrokerError(
                "cannot start a local Kafka broker: `java` (17 or later) is not on PATH. "
                f"Install a JDK, start Docker, or set {BOOTSTRAP_ENV}."
            )
        jars = self._jars or ensure_broker_jars()
        self._prepare()
        self._format_storage(java, jars)
        started = time.monotonic()
        self._launch(java, jars)
        try:
            _wait_until_ready(
                self.bootstrap_servers,
                deadline=started + self._startup_timeout,
                describe=self.describe_failure,
                process=self._proc,
                cluster_id=self._cluster_id(),
            )
        except BrokerError:
            # Leave the folder for the post-mortem the error message points to.
            self._terminate(grace=5.0)
            raise
        except BaseException:
            # Interrupted (Ctrl-C): nothing to investigate, so leave nothing behind.
            self.stop()
            raise
        log.info(
            "Kafka broker ready at %s in %.1f s (log: %s)",
            self.bootstrap_servers,
            time.monotonic() - started,
            self.log_path,
        )
        return self

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM, then SIGKILL after the deadline) and forget the folder.

        A broker that had died by itself leaves its folder behind: its log is the only
        explanation there is.
        """
        crashed = self._terminate(grace=self._stop_timeout)
        if crashed and self._workdir is not None:
            log.warning("the Kafka broker had died by itself; its log is at %s", self.log_path)
        elif self._workdir is not None and not self._keep:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None
        self._port = None
        self._controller_port = None

    def restart(self) -> None:
        """Clean shutdown and start again on the same ports, with the same data."""
        self._terminate(grace=self._stop_timeout)
        self.start()

    def kill(self) -> None:
        """Crash the broker (SIGKILL): no flush, no controlled shutdown; :meth:`start` recovers."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _require(value: _T | None, what: str) -> _T:
        if value is None:
            raise BrokerError(f"the broker has no {what} until it is started")
        return value

    def _prepare(self) -> None:
        """Pick ports and folder on the first start only: later starts must find the same."""
        if self._port is None or self._controller_port is None:
            if self._wanted_port:
                _require_free(self._wanted_port)
            free = _free_ports(2)
            self._port = self._wanted_port or free[0]
            self._controller_port = free[1] if free[1] != self._port else free[0]
        if self._workdir is None:
            if self._given_dir is not None:
                self._given_dir.mkdir(parents=True, exist_ok=True)
                self._workdir = self._given_dir.resolve()
            else:
                self._workdir = Path(tempfile.mkdtemp(prefix="auto-trace-kafka-"))
        (self._workdir / "server.properties").write_text(self._server_properties())
        (self._workdir / "log4j.properties").write_text(_LOG4J_PROPERTIES)

    def _server_properties(self) -> str:
        port, controller = self._port, self._controller_port
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.quorum.voters": f"1@127.0.0.1:{controller}",
            "log.dirs": str(self.data_dir / "kraft"),
            "num.partitions": "1",
            # One node: internal topics cannot have more replicas than that.
            "offsets.topic.replication.factor": "1",
            # The first consumer group otherwise waits ~4 s for 50 offsets partitions.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Tests start a consumer and expect records now, not after the 3 s default wait.
            "group.initial.rebalance.delay.ms": "0",
            # After a crash (kill()) the restarted broker waits for its previous incarnation's
            # session to expire before it is unfenced: 9 s by default, 3 s here.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _cluster_id(self) -> str | None:
        """The id ``format`` wrote, read back because a restart does not format again."""
        try:
            lines = (self.data_dir / "kraft" / "meta.properties").read_text().splitlines()
        except FileNotFoundError:
            return None
        for line in lines:
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id":
                return value.strip()
        return None

    def _java_command(self, java: str, jars: Path, options: Sequence[str]) -> list[str]:
        return [
            java,
            *options,
            f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
            "-cp",
            f"{jars}/*",
        ]

    def _format_storage(self, java: str, jars: Path) -> None:
        """Format the data folder once; a restart finds it formatted and skips a JVM start."""
        if (self.data_dir / "kraft" / "meta.properties").exists():
            return
        command = [
            *self._java_command(java, jars, _FORMAT_JVM_OPTIONS),
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            f"--cluster-id={_new_cluster_id()}",
            f"--config={self.data_dir / 'server.properties'}",
        ]
        with self.log_path.open("ab") as out:
            out.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} format storage\n".encode())
            out.flush()
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            )
        if done.returncode != 0:
            raise BrokerError(
                f"formatting the broker storage failed with exit code {done.returncode} "
                f"(`{' '.join(command)}`). {self.describe_failure()}"
            )

    def _launch(self, java: str, jars: Path) -> None:
        command = [
            *self._java_command(java, jars, JVM_OPTIONS),
            "kafka.Kafka",
            str(self.data_dir / "server.properties"),
        ]
        with self.log_path.open("ab") as out:
            out.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} start broker\n".encode())
            out.flush()
            # A session of its own: Ctrl-C in a terminal reaches Python, which then stops the
            # broker in order, instead of the JVM dying mid-write alongside it.
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )

    def _terminate(self, grace: float) -> bool:
        """Stop the process; True when it had already died by itself with an error."""
        proc, self._proc = self._proc, None
        if proc is None:
            return False
        if proc.poll() is not None:
            return proc.returncode != 0
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("the broker ignored SIGTERM for %.0f s; killing it", grace)
            proc.kill()
            proc.wait()
        return False

    def describe_failure(self) -> str:
        """Where the broker's log is and how it ends: the start of any post-mortem."""
        if self._workdir is None:
            return ""
        return (
            f"Broker log: {self.log_path}\n"
            f"---- last {_TAIL_LINES} lines ----\n{_tail_of_file(self.log_path)}"
        )


def _tail_of_file(path: Path, lines: int = _TAIL_LINES) -> str:
    """Read only the end: a broker log that ran for hours must not be loaded whole."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            return _tail(fh.read().decode("utf-8", "replace"), lines)
    except FileNotFoundError:
        return "(no log written)"


def _wait_until_ready(
    bootstrap_servers: str,
    *,
    deadline: float,
    describe: Callable[[], str],
    process: subprocess.Popen[bytes] | None = None,
    cluster_id: str | None = None,
) -> None:
    """Poll until a metadata request lists a broker: a listening port is not yet a broker.

    With ``cluster_id``, only that cluster counts: a stray broker from an earlier run that
    still holds the port (``--port``) must not pass for the one just started.

    librdkafka's own log is switched off for the probe: refused connections during startup
    are expected, and a real failure is reported below with the broker's log instead.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 0})
    last_error = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerError(
                f"no Kafka broker answered at {bootstrap_servers} in time "
                f"(last error: {last_error}). {describe()}"
            )
        if process is not None:
            try:
                code = process.wait(timeout=min(0.2, remaining))
            except subprocess.TimeoutExpired:
                pass
            else:
                raise BrokerError(
                    f"the Kafka broker exited with code {code} while starting. {describe()}"
                )
        try:
            metadata = admin.list_topics(timeout=max(0.5, min(5.0, remaining)))
        except KafkaException as exc:
            last_error = str(exc)
            continue
        if cluster_id is not None and metadata.cluster_id != cluster_id:
            last_error = f"another cluster ({metadata.cluster_id}) answers on this address"
        elif metadata.brokers:
            return
        else:
            last_error = "metadata lists no broker yet"


# --------------------------------------------------------------------------------------------
# auto-trace local-broker


def main(argv: Sequence[str] | None = None) -> int:
    """Run a broker in the foreground until SIGINT or SIGTERM, then stop it cleanly."""
    parser = argparse.ArgumentParser(
        prog="auto-trace local-broker",
        description=(
            "Run a real Kafka broker for the demo and for development. Without options it "
            f"uses {BOOTSTRAP_ENV} if set, else a Docker container, else the local JVM."
        ),
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="keep the broker's data here across runs (implies the local JVM broker)",
    )
    parser.add_argument(
        "--port",
        type=int,
        help="listen on this loopback port (implies the local JVM broker; default: a free one)",
    )
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGTERM (docker stop, systemd, kill) takes the same orderly path as Ctrl-C; SIGINT is set
    # too because a shell starts background jobs with it ignored.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster_context: contextlib.AbstractContextManager[Cluster]
        if args.data_dir is not None or args.port is not None:
            cluster_context = _local_cluster(args.data_dir, args.port)
        else:
            cluster_context = kafka_cluster()
        with cluster_context as cluster:
            sys.stdout.write(f"bootstrap.servers={cluster.bootstrap_servers}\n")
            sys.stdout.write(f"kind={cluster.kind}\n")
            if cluster.local is not None:
                sys.stdout.write(f"log={cluster.local.log_path}\n")
                sys.stdout.write(f"data={cluster.local.data_dir}\n")
            sys.stdout.write("Ctrl-C stops it.\n")
            sys.stdout.flush()
            if cluster.local is None:
                signal.pause()
                return 0
            code = cluster.local.wait()
            sys.stderr.write(
                f"the broker exited by itself with code {code}. "
                f"{cluster.local.describe_failure()}\n"
            )
            return 1
    except KeyboardInterrupt:
        return 0
    except BrokerError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _local_cluster(data_dir: Path | None, port: int | None) -> Iterator[Cluster]:
    with LocalBroker(data_dir=data_dir, port=port) as broker:
        yield Cluster(bootstrap_servers=broker.bootstrap_servers, kind="local", local=broker)


if __name__ == "__main__":
    sys.exit(main())
