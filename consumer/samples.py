"""Deterministic, realistic ``trade.closed`` events for tests, the demo and the benchmarks.

The same ``(i, seed)`` always gives the same event, so a failing test or a benchmark run can be
reproduced exactly. Personal fields are filled with fake-but-plausible values (reserved
``example.*`` mail domains, documentation IP ranges) so that tests exercise realistic lengths
and characters and a leak would be visible, without any real person's data in the repository.

Events are returned in their JSON shape (decimals as strings, times as RFC 3339 text), which is
what the platform publishes and what tests most often edit; the Avro encoders convert.
"""

from __future__ import annotations

import io
import json
import random
import unicodedata
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import fastavro

from consumer.records import (
    DECIMAL_FIELDS,
    TRADE_CLOSED_SCHEMA,
    load_schema,
    render_time,
    schemas_dir,
)
from consumer.trade import PERSONAL_FIELDS

#: Close time of event 0 when none is given: 2026-11-26T10:00:00Z.
DEFAULT_START_MS = 1_795_687_200_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Close times of consecutive events are this far apart when none is given.
DEFAULT_STEP_MS = 1_000


# symbol, quote currency, price range, price decimals, contract size, commission per lot
_INSTRUMENTS = (
    ("XAUUSD", "USD", (1800, 2700), 2, 100, Decimal("7.00")),
    ("EURUSD", "USD", (1.02, 1.18), 5, 100_000, Decimal("7.00")),
    ("GBPUSD", "USD", (1.20, 1.35), 5, 100_000, Decimal("7.00")),
    ("USDJPY", "JPY", (140, 160), 3, 100_000, Decimal("1000")),
    ("BTCUSD", "USD", (30_000, 100_000), 2, 1, Decimal("0.00")),
    ("US30", "USD", (33_000, 45_000), 1, 1, Decimal("0.00")),
)
_VOLUMES = ("0.01", "0.02", "0.05", "0.10", "0.20", "0.50", "1.00", "2.00", "5.00")
_REASONS = ("TAKE_PROFIT", "STOP_LOSS", "MANUAL", "MARGIN_CALL", "EXPIRY", None)
_REASON_WEIGHTS = (30, 30, 30, 2, 3, 5)
_FIRST = ("Amelia", "Jonas", "Sofía", "Mateus", "Chloé", "Ravi", "Yuki", "Olumide", "Zoë", "Lars")
_LAST = ("Okafor", "Lindqvist", "García", "Novak", "Tanaka", "Müller", "Haddad", "Smith", "Rossi")
_DOMAINS = ("example.com", "example.org", "example.net", "mail.example")
_COMMENTS = (
    "closed by EA scalper v2",
    "manual close before news",
    "partial TP hit, rest trailed",
    "hedge leg closed for {first}",
    "copy of signal from {first}'s desk",
    "SL moved to breakeven at +40 pips",
)


def _rng(i: int, seed: int) -> random.Random:
    # An int seed is hashed the same way on every run and platform (unlike str hashing).
    return random.Random((seed << 40) ^ i)


def _ip(rng: random.Random) -> str | None:
    kind = rng.random()
    if kind < 0.1:
        return None
    if kind < 0.25:
        return f"2001:db8:{rng.randrange(0x10000):x}::{rng.randrange(1, 0x10000):x}"
    net = rng.choice(("192.0.2", "198.51.100", "203.0.113"))
    return f"{net}.{rng.randrange(1, 255)}"


def _ascii(name: str) -> str:
    """Zoë -> zoe: most mailboxes are plain ASCII."""
    return unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()


def _fmt(value: Decimal, places: int) -> str:
    return f"{value.quantize(Decimal(1).scaleb(-places)):f}"


def sample_trade(
    i: int,
    *,
    seed: int = 0,
    close_time_ms: int | None = None,
    start_ms: int = DEFAULT_START_MS,
    step_ms: int = DEFAULT_STEP_MS,
) -> dict[str, Any]:
    """Event number ``i`` of a stream, every field filled, in its JSON shape.

    The close time is ``close_time_ms`` if given, else ``start_ms + i * step_ms``, so a stream
    of events has increasing close times; pass ``close_time_ms=now`` to get events that are due
    one delay window from now.
    """
    rng = _rng(i, seed)
    symbol, currency, (low, high), places, contract, fee = rng.choice(_INSTRUMENTS)
    side = rng.choice(("BUY", "SELL"))
    volume = Decimal(rng.choice(_VOLUMES))
    entry = Decimal(_fmt(Decimal(str(rng.uniform(low, high))), places))
    move = entry * Decimal(str(rng.uniform(-0.01, 0.01)))
    exit_ = Decimal(_fmt(entry + move, places))
    direction = 1 if side == "BUY" else -1
    profit = (exit_ - entry) * volume * contract * direction
    commission = -(fee * volume)
    swap = Decimal(rng.randint(-300, 100)) / 100 if rng.random() < 0.3 else Decimal(0)

    close_ms = start_ms + i * step_ms if close_time_ms is None else close_time_ms
    close = _EPOCH + timedelta(milliseconds=close_ms)
    open_ = close - timedelta(milliseconds=rng.randint(30_000, 3 * 86_400_000))

    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    comment = rng.choice((*_COMMENTS, None)) if rng.random() < 0.7 else None
    signal = None if rng.random() < 0.1 else f"sig-{rng.randint(1, 40):04d}"
    return {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "trade_id": f"T{seed:03d}-{i:010d}",
        "signal_id": signal,
        "account_id": f"ACC-{rng.randint(10_000_000, 99_999_999)}",
        "user_id": f"usr_{rng.getrandbits(48):012x}",
        "client_id": f"CL-{rng.randint(100_000, 999_999)}",
        "user_email": f"{_ascii(first)}.{_ascii(last)}{rng.randint(1, 99)}@{rng.choice(_DOMAINS)}",
        "user_name": f"{first} {last}",
        "client_ip": _ip(rng),
        "instrument": symbol,
        "side": side,
        "volume": f"{volume:f}",
        "entry_price": f"{entry:f}",
        "exit_price": f"{exit_:f}",
        "profit_loss": _fmt(profit, 2),
        "commission": _fmt(commission, 2),
        "swap": _fmt(swap, 2),
        "currency": currency,
        "open_time": render_time(open_),
        "close_time": render_time(close),
        "close_reason": rng.choices(_REASONS, _REASON_WEIGHTS)[0],
        "comment": comment.format(first=first) if comment else None,
    }


def to_json(trade: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, as the platform publishes it (about 350 bytes for a sample)."""
    return json.dumps(
        trade, separators=(",", ":"), ensure_ascii=False, default=_json_default
    ).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, datetime):
        return render_time(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _avro_time(value: Any) -> Any:
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    return value  # epoch ms (int) or datetime: fastavro takes both


def to_avro_dict(trade: dict[str, Any]) -> dict[str, Any]:
    """The event with Avro-ready values: Decimal decimals, datetime times."""
    out = dict(trade)
    for name in DECIMAL_FIELDS:
        value = out.get(name)
        if isinstance(value, str | int) and not isinstance(value, bool):
            out[name] = Decimal(value)
    for name in ("open_time", "close_time"):
        if name in out:
            out[name] = _avro_time(out[name])
    return out


def to_avro(trade: dict[str, Any]) -> bytes:
    """Schemaless Avro written with ``schemas/trade_closed.avsc`` (fields not in it are dropped)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, load_schema(TRADE_CLOSED_SCHEMA), to_avro_dict(trade))
    return buf.getvalue()


# Serializers hold the client they were made for, so the id() in the key cannot be reused.
_SERIALIZERS: dict[tuple[int, str], tuple[Any, Any]] = {}


def to_confluent(trade: dict[str, Any], registry_client: Any, subject: str) -> bytes:
    """Confluent wire format, produced by Confluent's own ``AvroSerializer``.

    Using the vendor's serializer (not our own framing) is the point: a decoder test that reads
    these bytes proves interoperability with what real producers write. The schema is registered
    under ``subject`` on first use.
    """
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    key = (id(registry_client), subject)
    if key not in _SERIALIZERS:
        schema_str = (schemas_dir() / TRADE_CLOSED_SCHEMA).read_text(encoding="utf-8")
        serializer = AvroSerializer(
            registry_client,
            schema_str,
            to_dict=lambda obj, _ctx: to_avro_dict(obj),
            conf={"auto.register.schemas": True, "subject.name.strategy": lambda _c, _n: subject},
        )
        _SERIALIZERS[key] = (registry_client, serializer)
    serializer = _SERIALIZERS[key][1]
    data: bytes = serializer(trade, SerializationContext(subject, MessageField.VALUE))
    return data


__all__ = [
    "DEFAULT_START_MS",
    "DEFAULT_STEP_MS",
    "PERSONAL_FIELDS",
    "sample_trade",
    "to_avro",
    "to_avro_dict",
    "to_confluent",
    "to_json",
]
