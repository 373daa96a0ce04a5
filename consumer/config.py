"""Configuration: one settings root, read from a YAML file and ``AUTO_TRACE_*`` overrides.

Environment variables win over the file so that a Kubernetes Deployment can override one value
(``AUTO_TRACE_KAFKA__BOOTSTRAP_SERVERS``) without templating the whole file. Everything is
validated at start-up: a bad value raises :class:`ConfigError` naming the field's path, and the
CLI turns that into one line on stderr and exit status 2.
"""

from __future__ import annotations

import itertools
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from consumer.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> Any:
    """Accept ``500ms``, ``5s``, ``30m``, ``1h``, ``1d`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise TypeError("expected a duration such as 500ms, 5s, 30m or 1h")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    raise ValueError("expected a duration such as 500ms, 5s, 30m or 1h")


def format_duration(value: timedelta) -> str:
    """The shortest exact spelling of a duration, used in topic names and help output."""
    ms = round(value.total_seconds() * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Visible Latin-1 with inner spaces or tabs; empty is allowed.
_HEADER_VALUE = re.compile(r"(?:[!-~\xa0-\xff](?:[ \t!-~\xa0-\xff]*[!-~\xa0-\xff])?)?")


class _Section(BaseModel):
    # A typo in a key must fail at start-up, not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class SecretRef(_Section):
    """Where a secret comes from: an environment variable or a file (a mounted Secret)."""

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file'")
        return self

    def resolve(self) -> SecretStr:
        """Read the secret now; the error names the source, never the value."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise ConfigError(f"environment variable {self.env} is not set or empty")
            return SecretStr(value)
        assert self.file is not None
        try:
            text = self.file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {self.file}: {exc.strerror}") from exc
        if not text:
            raise ConfigError(f"secret file {self.file} is empty")
        return SecretStr(text)


class KafkaSettings(_Section):
    #: Comma-separated host:port list.
    bootstrap_servers: str = "localhost:9092"
    #: Passed verbatim to librdkafka (security.protocol, sasl.*, ssl.*, ...).
    client: dict[str, str | int | float | bool] = Field(default_factory=dict)
    #: librdkafka properties read from files (e.g. sasl.password from a mounted Secret).
    client_secrets: dict[str, SecretRef] = Field(default_factory=dict)

    def librdkafka(self) -> dict[str, Any]:
        """The common client configuration: bootstrap, the verbatim mapping, and secrets."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers, **self.client}
        for key, ref in self.client_secrets.items():
            conf[key] = ref.resolve().get_secret_value()
        return conf


class InputSettings(_Section):
    topic: str = "trade.closed"
    format: Literal["json", "avro", "avro-confluent"] = "json"
    #: Required when format is avro-confluent. ``mock://`` gives an in-memory registry (tests).
    schema_registry_url: str | None = None
    #: Extra Schema Registry client settings (e.g. basic.auth.user.info) read from secrets.
    schema_registry_secrets: dict[str, SecretRef] = Field(default_factory=dict)
    #: Consumer group of the ingest stage.
    group: str = "auto-trace-ingest"
    #: JSON input's accelerator (consumer/native.py): ``auto`` (native when installed, else
    #: Python), ``native`` (refuse to start without it), ``python``, or ``off`` (the pydantic
    #: path for every record). Each gives the same bytes; only the speed differs.
    fast_path: Literal["auto", "native", "python", "off"] = "auto"

    @model_validator(mode="after")
    def _registry_for_confluent(self) -> InputSettings:
        if self.format == "avro-confluent" and not self.schema_registry_url:
            raise ValueError("schema_registry_url is required when format is avro-confluent")
        return self


class TopicKind(_Section):
    """Partitions, replication and retention of one kind of topic."""

    #: None: the broker's default.
    partitions: int | None = Field(default=None, ge=1)
    replication_factor: int | None = Field(default=None, ge=1)
    #: None: the broker's default retention.
    retention: Duration | None = None


class TopicsSettings(_Section):
    prefix: str = Field(default="auto-trace", pattern=r"^[A-Za-z0-9._-]+$")
    #: Defaults for every kind below.
    partitions: int = Field(default=6, ge=1)
    #: None: the broker's default.replication.factor.
    replication_factor: int | None = Field(default=None, ge=1)
    delay: TopicKind = Field(default_factory=lambda: TopicKind(retention=timedelta(days=7)))
    sink: TopicKind = Field(default_factory=lambda: TopicKind(retention=timedelta(days=7)))
    retry: TopicKind = Field(default_factory=lambda: TopicKind(retention=timedelta(days=7)))
    dlq: TopicKind = Field(default_factory=lambda: TopicKind(retention=timedelta(days=30)))
    #: Holds raw input bytes, so personal data: keep its retention short.
    dlq_ingest: TopicKind = Field(default_factory=lambda: TopicKind(retention=timedelta(days=7)))


class DelaySettings(_Section):
    #: X in T+X: no trade is published before close_time + window.
    window: Duration = timedelta(minutes=5)
    #: A close_time further in the future than this is rejected (head-of-line blocking).
    max_clock_skew: Duration = timedelta(minutes=5)
    #: Consumer group of the release stage.
    group: str = "auto-trace-release"

    @field_validator("window", "max_clock_skew")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("must not be negative")
        return value


class RetrySettings(_Section):
    #: Delay of each retry tier, in order; each tier is a topic of its own.
    tiers: list[Duration] = Field(
        default_factory=lambda: [
            timedelta(seconds=5),
            timedelta(seconds=30),
            timedelta(minutes=5),
            timedelta(minutes=30),
            timedelta(hours=1),
        ]
    )

    @field_validator("tiers")
    @classmethod
    def _increasing(cls, tiers: list[timedelta]) -> list[timedelta]:
        if not tiers:
            raise ValueError("at least one tier is required")
        if any(t <= timedelta(0) for t in tiers):
            raise ValueError("every tier must be longer than 0")
        if any(b <= a for a, b in itertools.pairwise(tiers)):
            raise ValueError("tiers must be strictly increasing")
        return tiers


class CircuitSettings(_Section):
    """When failures are adapter-wide, pause the adapter instead of walking every record
    through the retry tiers into the DLQ."""

    #: Consecutive retriable failures (of different records) that open the circuit.
    failure_threshold: int = Field(default=5, ge=1)
    #: First wait before a probe; doubles after each failed probe up to max_probe_interval.
    probe_interval: Duration = timedelta(seconds=5)
    max_probe_interval: Duration = timedelta(minutes=5)


class _AdapterBase(_Section):
    #: Names the adapter's topics and consumer group: lower case, digits, '-' and '_'.
    name: str = Field(pattern=_NAME)
    #: A disabled adapter gets no records from release and runs no worker.
    enabled: bool = True
    #: Deliveries in flight at once (records of one key always go one at a time, in order).
    concurrency: int = Field(default=16, ge=1, le=1024)
    #: Timeout of one delivery call.
    timeout: Duration = timedelta(seconds=10)
    circuit: CircuitSettings = Field(default_factory=CircuitSettings)


class WebhookAdapterSettings(_AdapterBase):
    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://")
    #: Standard Webhooks secrets (``whsec_<base64>``); several during a rotation, newest first.
    secrets: list[SecretRef] = Field(min_length=1)
    #: Extra request headers (not secret: they are logged in config dumps).
    headers: dict[str, str] = Field(default_factory=dict)
    #: The HTTP client: ``builtin`` (the adapter's own HTTP/1.1 client; aiohttp when a proxy
    #: applies) or ``aiohttp`` always, a way back should a receiver disagree with the first.
    client: Literal["builtin", "aiohttp"] = "builtin"

    @field_validator("headers")
    @classmethod
    def _header_fields(cls, headers: dict[str, str]) -> dict[str, str]:
        # Checked here, not when a request is written: a line break in a value would end the
        # header early and let the rest be read as headers or a body of its own.
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name (RFC 9110 token)")
            if not _HEADER_VALUE.fullmatch(value):
                raise ValueError(
                    f"the value of {name!r} must be printable Latin-1 on one line, without "
                    "leading or trailing spaces"
                )
        return headers


class TrackerAdapterSettings(_AdapterBase):
    """A tracker's session API (Myfxbook style); see :mod:`consumer.adapters.tracker`."""

    type: Literal["tracker"]
    #: Prefix of every call, e.g. ``https://tracker.example/api``; no credentials, query or
    #: fragment (those belong in ``email``/``password``, which are never logged).
    base_url: str = Field(pattern=r"^https?://[^/?#@\s]+(/[^?#\s]*)?$")
    #: The account's login name, read at start-up (it identifies a person: never logged).
    email: SecretRef
    #: The account's password, read at start-up.
    password: SecretRef
    #: ``GET <base_url><login_path>?email=...&password=...`` answers the session.
    login_path: str = Field(default="/login.json", pattern=r"^/[^?#\s]*$")
    #: ``POST <base_url><post_path>?<session_param>=...`` with one trade as a JSON body.
    post_path: str = Field(default="/add-trade.json", pattern=r"^/[^?#\s]*$")
    #: ``GET <base_url><logout_path>?<session_param>=...``, called once on shutdown.
    logout_path: str = Field(default="/logout.json", pattern=r"^/[^?#\s]*$")
    #: Name of the query parameter carrying the session token (``session`` for Myfxbook).
    session_param: str = Field(default="session", pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class FileAdapterSettings(_AdapterBase):
    """JSON Lines files, exactly once; see :mod:`consumer.adapters.file`."""

    type: Literal["file"]
    #: A local directory (created if missing) or ``s3://bucket[/prefix]``.
    path: str
    #: A file is written when its batch (one per source partition, all dates together) holds
    #: this many records...
    max_records: int = Field(default=10_000, ge=1)
    #: ... or this many bytes of JSON Lines, whichever comes first.
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    #: Also write a batch that got no record for this long. Off by default: it makes batch
    #: boundaries depend on timing, which BREAKS the exactly-once guarantee (after a crash the
    #: replay may write the same records under other object names: duplicate lines, never lost
    #: ones). Without it a partial batch waits for more records, a rebalance or a shutdown.
    idle_flush: Duration | None = None
    #: For S3-compatible stores (MinIO, Ceph, moto, ...); None: AWS.
    s3_endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s?#]+$")
    #: None: from the environment or the AWS profile.
    s3_region: str | None = None
    #: Static credentials; when absent, boto3's default chain (environment, profile, IRSA,
    #: instance metadata). Key id and secret key go together; the session token needs both.
    s3_access_key_id: SecretRef | None = None
    s3_secret_access_key: SecretRef | None = None
    s3_session_token: SecretRef | None = None
    #: Objects at least this large are sent as a multipart upload...
    s3_multipart_threshold: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024)
    #: ... in parts of this size (S3 requires at least 5 MiB for every part but the last).
    s3_multipart_part_size: int = Field(
        default=8 * 1024 * 1024, ge=5 * 1024 * 1024, le=5 * 1024 * 1024 * 1024
    )

    @field_validator("idle_flush")
    @classmethod
    def _idle_positive(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError("must be longer than 0 (or null to turn it off)")
        return value

    @model_validator(mode="after")
    def _credentials_together(self) -> FileAdapterSettings:
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("give both s3_access_key_id and s3_secret_access_key, or neither")
        if self.s3_session_token is not None and self.s3_access_key_id is None:
            raise ValueError("s3_session_token needs s3_access_key_id and s3_secret_access_key")
        return self


AdapterSettings = Annotated[
    WebhookAdapterSettings | TrackerAdapterSettings | FileAdapterSettings,
    Field(discriminator="type"),
]


class SinkSettings(_Section):
    #: Records taken from Kafka but not finished, per worker, before it stops fetching.
    max_in_flight: int = Field(default=2000, ge=1)


class MetricsSettings(_Section):
    host: str = "0.0.0.0"
    #: /metrics, /healthz and /readyz. 0 disables the server.
    port: int = Field(default=9108, ge=0, le=65535)


class ShutdownSettings(_Section):
    #: After SIGTERM: how long in-flight work may take before it is abandoned (and redelivered).
    grace: Duration = timedelta(seconds=30)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class Settings(BaseSettings):
    """The whole configuration. See README "Configuration" for every key."""

    model_config = SettingsConfigDict(
        env_prefix="AUTO_TRACE_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    input: InputSettings = Field(default_factory=InputSettings)
    topics: TopicsSettings = Field(default_factory=TopicsSettings)
    delay: DelaySettings = Field(default_factory=DelaySettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    adapters: list[AdapterSettings] = Field(default_factory=list)
    sink: SinkSettings = Field(default_factory=SinkSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @field_validator("adapters")
    @classmethod
    def _unique_names(cls, adapters: list[Any]) -> list[Any]:
        names = [a.name for a in adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapter names must be unique; repeated: {', '.join(dupes)}")
        return adapters

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first so that it overrides the YAML file passed as init values.
        return env_settings, init_settings

    def adapter(self, name: str) -> AdapterSettings:
        for adapter in self.adapters:
            if adapter.name == name:
                return adapter
        known = ", ".join(a.name for a in self.adapters) or "none configured"
        raise ConfigError(f"adapters: no adapter named {name!r} (known: {known})")

    def enabled_adapters(self) -> list[AdapterSettings]:
        return [a for a in self.adapters if a.enabled]


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        path = ".".join(str(p) for p in item["loc"]) or "(root)"
        parts.append(f"{path}: {item['msg']}")
    return "; ".join(parts)


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read the YAML file (if any), apply ``AUTO_TRACE_*`` overrides, validate everything, and
    read every secret the configuration names (:func:`check_secrets` with no scope).

    ``overrides`` win over the file but not over the environment (tests use them).
    """
    settings = read_settings(path, **overrides)
    check_secrets(settings)
    return settings


def read_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """:func:`load_settings` without reading any secret: for a process that then checks only
    the secrets its own work needs (:func:`check_secrets` with a scope)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        data = loaded
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


#: What a process does, for :func:`check_secrets`: a stage role, or ``kafka`` for a process that
#: only talks to Kafka (``auto-trace dlq``, ``auto-trace topics create``).
SecretScope = Literal["ingest", "release", "sink", "all", "kafka"]


def secret_refs(
    settings: Settings, scope: SecretScope | None = None, adapter: str | None = None
) -> list[tuple[str, SecretRef]]:
    """The secrets a process reads, each with its place in the configuration.

    One configuration serves every Deployment, but a pod should hold only the credentials of
    its own work: ingest has no business with a tracker's password, nor a sink with another
    adapter's signing key. Kafka's secrets go to every scope; the Schema Registry's to ingest;
    an adapter's to its sink (``adapter``; when it is None, the only enabled adapter, which is
    what ``--role sink`` without ``--adapter`` runs). ``all`` runs every stage and so reads
    every enabled adapter's; no scope means everything configured, disabled adapters too
    (``load_settings``).
    """
    refs: list[tuple[str, SecretRef]] = [
        (f"kafka.client_secrets.{k}", v) for k, v in settings.kafka.client_secrets.items()
    ]
    if scope in (None, "ingest", "all"):
        refs += [
            (f"input.schema_registry_secrets.{k}", v)
            for k, v in settings.input.schema_registry_secrets.items()
        ]
    if scope == "sink" and adapter is None:
        enabled = settings.enabled_adapters()
        # Several enabled: the stage refuses to start without --adapter, and says so.
        adapter = enabled[0].name if len(enabled) == 1 else None

    def reads(cfg: AdapterSettings) -> bool:
        if scope is None:
            return True
        if scope == "all":
            return cfg.enabled
        return scope == "sink" and cfg.name == adapter

    for i, cfg in enumerate(settings.adapters):
        if not reads(cfg):
            continue
        if isinstance(cfg, WebhookAdapterSettings):
            refs += [(f"adapters.{i}.secrets.{j}", s) for j, s in enumerate(cfg.secrets)]
        elif isinstance(cfg, TrackerAdapterSettings):
            refs += [(f"adapters.{i}.email", cfg.email), (f"adapters.{i}.password", cfg.password)]
        elif isinstance(cfg, FileAdapterSettings):
            for name in ("s3_access_key_id", "s3_secret_access_key", "s3_session_token"):
                ref = getattr(cfg, name)
                if ref is not None:
                    refs.append((f"adapters.{i}.{name}", ref))
    return refs


def check_secrets(
    settings: Settings, scope: SecretScope | None = None, adapter: str | None = None
) -> None:
    """Read the secrets of :func:`secret_refs` once at start-up, so that a missing one fails
    now, naming its field, and not at the first delivery."""
    for path, ref in secret_refs(settings, scope, adapter):
        try:
            ref.resolve()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


__all__ = [
    "AdapterSettings",
    "Duration",
    "FileAdapterSettings",
    "SecretRef",
    "Settings",
    "TrackerAdapterSettings",
    "WebhookAdapterSettings",
    "check_secrets",
    "format_duration",
    "load_settings",
    "parse_duration",
    "read_settings",
    "secret_refs",
]
