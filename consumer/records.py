"""The Avro schemas on disk, and the TraceRecord codec every stage after ingest shares.

``schemas/`` at the top of the repository is the source of truth; the package reads it from
there (or from ``AUTO_TRACE_SCHEMAS_DIR``, which the container image sets).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from json.encoder import encode_basestring as _encode_string
from pathlib import Path
from typing import Any, Final

import fastavro

TRACE_RECORD_SCHEMA = "trace_record.avsc"
TRADE_CLOSED_SCHEMA = "trade_closed.avsc"

#: Every decimal of both schemas has this scale (and precision 28).
DECIMAL_SCALE = 8

#: The TraceRecord fields that hold exact decimals, in schema order.
DECIMAL_FIELDS = ("volume", "entry_price", "exit_price", "profit_loss", "commission", "swap")


def schemas_dir() -> Path:
    override = os.environ.get("AUTO_TRACE_SCHEMAS_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "schemas"


@cache
def load_schema(name: str) -> Any:
    """A parsed fastavro schema from ``schemas/``, parsed once per process."""
    with (schemas_dir() / name).open(encoding="utf-8") as fh:
        return fastavro.parse_schema(json.load(fh))


def encode_trace(record: dict[str, Any]) -> bytes:
    """Schemaless Avro (no container header): the value format of every internal topic."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, load_schema(TRACE_RECORD_SCHEMA), record)
    return buf.getvalue()


def decode_trace(data: bytes) -> dict[str, Any]:
    result = fastavro.schemaless_reader(io.BytesIO(data), load_schema(TRACE_RECORD_SCHEMA), None)
    if not isinstance(result, dict):
        raise TypeError("not a TraceRecord")
    return result


def render_decimal(value: Decimal) -> str:
    """Exact text of a decimal: at least two fractional digits, trailing zeros beyond dropped.

    Inputs are quantized to 8 places for the Avro schemas; this gives the form people wrote
    (``1950.50`` stays ``1950.50``, ``1.23456`` stays ``1.23456``) without ever rounding.
    """
    text = format(value, "f")
    if "." not in text:
        return text + ".00"
    whole, frac = text.split(".")
    frac = frac.rstrip("0")
    if len(frac) < 2:
        frac = frac.ljust(2, "0")
    return f"{whole}.{frac}"


def render_time(value: datetime) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-11-26T10:15:00.250Z``.

    Every delivery renders two of these: a UTC time (what the codecs give) is formatted from its
    fields, ~4 times cheaper than ``astimezone`` + ``strftime``, which stays for other zones and for
    years below 1000 (``%Y`` does not pad them).
    """
    if value.tzinfo is not UTC or value.year < 1000:
        return (
            value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            + f"{value.microsecond // 1000:03d}Z"
        )
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
        f"{value.minute:02d}:{value.second:02d}.{value.microsecond // 1000:03d}Z"
    )


def to_json_dict(record: dict[str, Any]) -> dict[str, Any]:
    """The JSON form receivers get: decimals as strings, times as RFC 3339 UTC, enums as names."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, str) or value is None:
            out[key] = value
        elif isinstance(value, Decimal):
            out[key] = render_decimal(value)
        elif isinstance(value, datetime):
            out[key] = render_time(value)
        else:
            out[key] = value
    return out


_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
#: A ``str`` as JSON text, quoted and escaped exactly as the encoder above writes it.
json_string: Final = _encode_string

#: ``"key":`` as the encoder above writes it, per key seen; bounded, as keys come from data.
_KEY_TEXT: dict[str, str] = {}
_KEY_TEXT_MAX = 256


def to_json_bytes(record: dict[str, Any]) -> bytes:
    """The exact bytes ``_ENCODE(to_json_dict(record))`` gives, assembled directly.

    Every delivery renders one record (a sixth of the sink worker's CPU per delivery): building
    the intermediate dict and walking it again in the encoder cost ~a quarter more than writing
    the text here. Strings go through the encoder's own escaping function, so the bytes cannot
    drift from it; a value of any other type (or a key that is not a ``str``) sends the whole
    record through the encoder itself. ``tests/unit/test_tracecodec.py`` compares both.
    """
    parts: list[str] = []
    append = parts.append
    keys = _KEY_TEXT
    for key, value in record.items():
        prefix = keys.get(key)
        if prefix is None:
            if type(key) is not str:
                return _ENCODE(to_json_dict(record)).encode()
            prefix = _encode_string(key) + ":"
            if len(keys) < _KEY_TEXT_MAX:
                keys[key] = prefix
        kind = type(value)
        if kind is str:
            append(prefix + _encode_string(value))
        elif kind is Decimal:
            append(f'{prefix}"{render_decimal(value)}"')
        elif kind is datetime:
            append(f'{prefix}"{render_time(value)}"')
        elif value is None:
            append(prefix + "null")
        else:
            return _ENCODE(to_json_dict(record)).encode()
    return ("{" + ",".join(parts) + "}").encode()


def idempotency_key(trade_id: str, adapter: str) -> str:
    """Stable for a trade and an adapter across retries, replays and re-publications.

    A hash rather than the plain ids so that the key is fixed-length and URL-safe whatever the
    platform's trade ids look like.
    """
    digest = hashlib.sha256(f"{adapter}\x00{trade_id}".encode()).hexdigest()
    return f"at_{digest[:32]}"
