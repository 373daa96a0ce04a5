"""Bytes from ``trade.closed`` to a validated :class:`~consumer.trade.TradeClosed`.

One decoder per input format (``input.format``): JSON, plain schemaless Avro, or Avro in the
Confluent wire format with the writer schema from a Schema Registry. Every failure is classified
here, where the foreign exceptions enter:

* :class:`~consumer.errors.DecodeError`: the bytes are not a record in the format (the ingest
  stage dead-letters them);
* :class:`~consumer.errors.InvalidRecord`: they are, but the record breaks the contract (same);
* :class:`RegistryUnavailable`: the registry could not answer. That is not the record's fault,
  and dead-lettering every record during a registry outage would empty the topic into the DLQ,
  so it is not an :class:`~consumer.errors.InputError`: the stage retries the record instead.

Error messages name the problem and never quote the bytes (they may hold personal data), nor
the text of a foreign exception (fastavro's and json's quote input bytes).
"""

from __future__ import annotations

import abc
import io
import json
from decimal import Decimal
from typing import Any

import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro.read import SchemaResolutionError

from consumer.config import InputSettings
from consumer.errors import AutoTraceError, ConfigError, DecodeError
from consumer.records import TRADE_CLOSED_SCHEMA, load_schema
from consumer.trade import TradeClosed, validate_trade

#: Records larger than this are refused before any parsing: a trade is well under 1 KiB, and a
#: parser fed megabytes of nesting or digits is a parser under attack.
DEFAULT_MAX_BYTES = 1024 * 1024

_MAGIC = 0
_CONFLUENT_HEADER = 5  # magic byte + 4-byte big-endian schema id


class RegistryUnavailable(AutoTraceError):
    """The Schema Registry did not answer usefully; retry the record later, never dead-letter it."""


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259), only a Python json extension.
    raise ValueError("NaN and Infinity are not JSON")


# Decimal for every JSON number with a fraction or exponent: exact, where pydantic's own JSON
# parser (model_validate_json) goes through a binary float and loses digits. Built once: json.loads
# with arguments builds a new decoder per call.
_JSON = json.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)


class Decoder(abc.ABC):
    """Turns one Kafka record value into a validated trade, or raises a classified error."""

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes

    def decode(self, value: bytes | None) -> TradeClosed:
        """The size is checked first, so no parser ever sees an oversized record."""
        if value is None:
            raise DecodeError("record has no value (a tombstone)")
        if len(value) > self.max_bytes:
            raise DecodeError(f"record is {len(value)} bytes, over the {self.max_bytes}-byte limit")
        if not value:
            raise DecodeError("record value is empty")
        return validate_trade(self._parse(value))

    @abc.abstractmethod
    def _parse(self, value: bytes) -> Any:
        """The record as Python values (a dict if well formed); DecodeError if not decodable."""


class JsonDecoder(Decoder):
    """A UTF-8 JSON object; decimals may be strings or numbers, both read exactly."""

    def _parse(self, value: bytes) -> Any:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("not UTF-8 text") from None
        try:
            data = _JSON.decode(text)
        except json.JSONDecodeError as exc:
            # exc.msg is json's fixed description; exc.doc (the input) is left out.
            raise DecodeError(
                f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        except ValueError:
            # NaN/Infinity, or an integer longer than Python's int-parsing limit.
            raise DecodeError("invalid JSON: a number that is not a finite JSON number") from None
        except RecursionError:
            raise DecodeError("invalid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise DecodeError(f"JSON value is {type(data).__name__}, not an object")
        return data


def _read_avro(buf: io.BytesIO, size: int, writer: Any, reader: Any, what: str) -> Any:
    try:
        record = fastavro.schemaless_reader(buf, writer, reader)
    except SchemaResolutionError:
        raise DecodeError(f"{what} does not resolve to {TRADE_CLOSED_SCHEMA}") from None
    # fastavro raises whatever its parsing hits on malformed bytes (EOFError, IndexError,
    # UnicodeDecodeError, ValueError, OverflowError, ...): every one means "not a record".
    # Only the type is kept: the messages of some quote input bytes.
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"not an Avro record of {what} ({type(exc).__name__})") from None
    if buf.tell() != size:
        # A shorter record plus garbage, or a different schema that happened to parse.
        raise DecodeError(f"{size - buf.tell()} bytes left over after the Avro record of {what}")
    return record


class AvroDecoder(Decoder):
    """Schemaless Avro (no header) written with ``schemas/trade_closed.avsc``."""

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(max_bytes=max_bytes)
        self._schema = load_schema(TRADE_CLOSED_SCHEMA)

    def _parse(self, value: bytes) -> Any:
        return _read_avro(io.BytesIO(value), len(value), self._schema, None, TRADE_CLOSED_SCHEMA)


class ConfluentAvroDecoder(Decoder):
    """Confluent wire format: ``0x00``, a 4-byte big-endian schema id, then the Avro body.

    The body is read with the writer's schema from the registry and resolved against our
    ``trade_closed.avsc``, so the platform can evolve its schema compatibly (add a field with a
    default, drop an optional one) without a release of auto-trace. Parsed writer schemas are
    cached per id for the life of the decoder: a registered schema id never changes.
    """

    def __init__(self, registry: Any, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(max_bytes=max_bytes)
        self._registry = registry
        self._reader = load_schema(TRADE_CLOSED_SCHEMA)
        # schema id -> (writer schema, reader schema or None when they are the same)
        self._schemas: dict[int, tuple[Any, Any]] = {}

    def _parse(self, value: bytes) -> Any:
        if len(value) < _CONFLUENT_HEADER or value[0] != _MAGIC:
            raise DecodeError("not in the Confluent wire format (magic byte 0 and schema id)")
        schema_id = int.from_bytes(value[1:_CONFLUENT_HEADER], "big")
        schemas = self._schemas.get(schema_id)
        if schemas is None:
            schemas = self._schemas[schema_id] = self._fetch(schema_id)
        buf = io.BytesIO(value)
        buf.seek(_CONFLUENT_HEADER)
        return _read_avro(buf, len(value), schemas[0], schemas[1], f"schema id {schema_id}")

    def _fetch(self, schema_id: int) -> tuple[Any, Any]:
        try:
            schema = self._registry.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise DecodeError(f"schema id {schema_id} is not in the registry") from None
            raise RegistryUnavailable(
                f"schema registry answered HTTP {exc.http_status_code} "
                f"(code {exc.error_code}) for schema id {schema_id}"
            ) from exc
        # Anything else (connection refused, timeout, TLS, OAuth, a garbled answer) is on the
        # registry's side: the only thing the record gave is the id. The client's transport
        # errors come from httpx or httpx2 depending on its version, so no narrower class fits.
        except Exception as exc:
            raise RegistryUnavailable(
                f"schema registry unreachable fetching schema id {schema_id} ({type(exc).__name__})"
            ) from exc
        if schema.schema_type not in (None, "AVRO"):
            raise DecodeError(f"schema id {schema_id} is a {schema.schema_type} schema, not Avro")
        if schema.references:
            raise DecodeError(f"schema id {schema_id} uses schema references (not supported)")
        try:
            writer = fastavro.parse_schema(json.loads(schema.schema_str))
        except Exception as exc:  # noqa: BLE001 - json or fastavro parse errors, any kind
            raise DecodeError(
                f"schema id {schema_id} is not a valid Avro schema ({type(exc).__name__})"
            ) from None
        # fastavro skips resolution when writer and reader are equal: the common, fast case.
        return writer, (None if writer == self._reader else self._reader)


def registry_client(settings: InputSettings) -> Any:
    """The Schema Registry client of the settings (``mock://`` gives confluent's in-memory one)."""
    conf: dict[str, Any] = {"url": settings.schema_registry_url}
    for key, ref in settings.schema_registry_secrets.items():
        conf[key] = ref.resolve().get_secret_value()
    try:
        return SchemaRegistryClient.new_client(conf)
    except (ValueError, TypeError) as exc:
        # confluent's messages name properties and the URL, never secret values.
        raise ConfigError(f"input.schema_registry_url / schema_registry_secrets: {exc}") from None


def make_decoder(
    settings: InputSettings,
    *,
    registry: Any = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Decoder:
    """The decoder for ``settings.format``; ``registry`` lets tests pass a client they built."""
    if settings.format == "json":
        return JsonDecoder(max_bytes=max_bytes)
    if settings.format == "avro":
        return AvroDecoder(max_bytes=max_bytes)
    if registry is None:
        registry = registry_client(settings)
    return ConfluentAvroDecoder(registry, max_bytes=max_bytes)


__all__ = [
    "DEFAULT_MAX_BYTES",
    "AvroDecoder",
    "ConfluentAvroDecoder",
    "Decoder",
    "JsonDecoder",
    "RegistryUnavailable",
    "make_decoder",
    "registry_client",
]
