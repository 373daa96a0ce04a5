"""The sink's hot path: TraceRecord bytes → record, without fastavro's generic reader.

Every delivery decodes one TraceRecord. fastavro's schemaless reader with its decimal and
timestamp logical types took ~37 µs per record, a sixth of the sink worker's own CPU per
delivery (``python -m bench.sink_micro``; rendering the JSON, the other sixth, was made cheaper
in :mod:`consumer.records` itself). The schema is small and fixed
(``schemas/trace_record.avsc``) and evolves only through the compatibility guard, so a reader
written for it is short.

:func:`decode_trace` returns exactly what :func:`consumer.records.decode_trace` returns (same
keys in schema order, equal values of the same types: ``Decimal`` at scale 8, ``datetime`` in
UTC); ``tests/unit/test_tracecodec.py`` holds it to that, property by property. A schema change
must update this reader in the same commit: the test that compares the field list with the
``.avsc`` fails otherwise.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, InvalidOperation
from typing import Any, Final

from consumer.records import DECIMAL_SCALE, to_json_bytes
from consumer.records import json_string as _json_string

#: (name, kind) in schema order; kinds: s string, ns null|string, e1 Side, d decimal, t
#: timestamp-millis, ne2 null|CloseReason.
FIELDS: Final = (
    ("event_id", "s"),
    ("trade_id", "s"),
    ("signal_id", "ns"),
    ("instrument", "s"),
    ("side", "e1"),
    ("volume", "d"),
    ("entry_price", "d"),
    ("exit_price", "d"),
    ("profit_loss", "d"),
    ("commission", "d"),
    ("swap", "d"),
    ("currency", "s"),
    ("open_time", "t"),
    ("close_time", "t"),
    ("close_reason", "ne2"),
)
SIDES: Final = ("BUY", "SELL")
CLOSE_REASONS: Final = ("TAKE_PROFIT", "STOP_LOSS", "MANUAL", "MARGIN_CALL", "EXPIRY")

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EXP: Final = -DECIMAL_SCALE
_MAX_UNSCALED: Final = 10**28
# Our own context: the thread's (which any library may change) must not round or trap here.
_CONTEXT: Final = Context(prec=28, traps=[InvalidOperation])
#: A long is at most 10 varint bytes; more is corrupt input, not a bigger number.
_MAX_VARINT: Final = 10


class _Reader:
    """A cursor over one record's bytes; every read checks the bounds."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def long(self) -> int:
        data, pos = self.data, self.pos
        try:
            byte = data[pos]
        except IndexError:
            raise ValueError("truncated TraceRecord") from None
        pos += 1
        if byte < 0x80:
            # One byte: the common case for lengths, union branches and enum indexes.
            self.pos = pos
            return (byte >> 1) ^ -(byte & 1)
        value = byte & 0x7F
        shift = 7
        while True:
            if shift >= 7 * _MAX_VARINT:
                raise ValueError("varint too long in TraceRecord")
            try:
                byte = data[pos]
            except IndexError:
                raise ValueError("truncated TraceRecord") from None
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        self.pos = pos
        return (value >> 1) ^ -(value & 1)

    def raw(self) -> bytes:
        size = self.long()
        start = self.pos
        end = start + size
        if size < 0 or end > len(self.data):
            raise ValueError("bad length in TraceRecord")
        self.pos = end
        return self.data[start:end]

    def string(self) -> str:
        return self.raw().decode("utf-8")

    def decimal(self) -> Decimal:
        unscaled = int.from_bytes(self.raw(), "big", signed=True)
        if not -_MAX_UNSCALED < unscaled < _MAX_UNSCALED:
            # Beyond precision 28 no encoder of ours wrote it: corrupt, not a bigger number.
            raise ValueError("decimal beyond precision 28 in TraceRecord")
        # Exact: 28 digits fit the context's precision, and scaleb only moves the exponent.
        return _CONTEXT.scaleb(Decimal(unscaled), _EXP)

    def time(self) -> datetime:
        try:
            return _EPOCH + timedelta(milliseconds=self.long())
        except OverflowError:
            # Beyond year 9999: no encoder of ours wrote it (and the sink's handling of bad
            # records catches ValueError, not OverflowError).
            raise ValueError("time out of range in TraceRecord") from None

    def branch(self, count: int) -> int:
        index = self.long()
        if not 0 <= index < count:
            raise ValueError("bad union or enum index in TraceRecord")
        return index


def decode_trace(data: bytes) -> dict[str, Any]:
    """Schemaless TraceRecord bytes as a record dict; ``ValueError`` on anything malformed.

    Written out field by field in schema order (a loop over :data:`FIELDS` with a branch per
    kind cost more than fastavro): :data:`FIELDS` is the list the tests check this against.
    """
    r = _Reader(data)
    string, decimal, time = r.string, r.decimal, r.time
    return {
        "event_id": string(),
        "trade_id": string(),
        "signal_id": string() if r.branch(2) else None,
        "instrument": string(),
        "side": SIDES[r.branch(2)],
        "volume": decimal(),
        "entry_price": decimal(),
        "exit_price": decimal(),
        "profit_loss": decimal(),
        "commission": decimal(),
        "swap": decimal(),
        "currency": string(),
        "open_time": time(),
        "close_time": time(),
        "close_reason": CLOSE_REASONS[r.branch(5)] if r.branch(2) else None,
    }


def trade_id_of(data: bytes) -> str | None:
    """The trade id of TraceRecord bytes (their second field), or None if they are not one.

    Internal topics carry it only in the record (a header on every record cost ingest and
    release a share of their CPU), so whatever wants it from a record reads it here: the sink
    when it dead-letters one, the demo, the chaos run. Reads two strings, not the record.
    """
    r = _Reader(data)
    try:
        r.raw()
        return r.string()
    except (ValueError, UnicodeDecodeError):
        return None


class _Unusual(Exception):
    """A value the one-pass renderer leaves to the general path (a year outside 1000-9999)."""


_SIDE_JSON: Final = tuple(f'"{side}"' for side in SIDES)
_REASON_JSON: Final = tuple(f'"{reason}"' for reason in CLOSE_REASONS)
_SCALE: Final = 10**DECIMAL_SCALE
_MINUTE_MS: Final = 60_000
#: The first and last minute (since the epoch) the renderer writes itself: the years
#: :func:`consumer.records.render_time` formats from fields (and ``datetime`` can hold).
_FIRST_MINUTE: Final = (datetime(1000, 1, 1, tzinfo=UTC) - _EPOCH) // timedelta(minutes=1)
_LAST_MINUTE: Final = (datetime(9999, 12, 31, 23, 59, tzinfo=UTC) - _EPOCH) // timedelta(minutes=1)
#: Texts already rendered, by minute (``"YYYY-MM-DDTHH:MM:``) and by a decimal's bytes: a
#: stream's times fall in few minutes, and volumes, fees and many prices repeat. Each is
#: emptied when it reaches its bound, so memory stays bounded whatever the input.
_MINUTE_TEXT: dict[int, str] = {}
_DECIMAL_TEXT: dict[bytes, str] = {}
_CACHE_MAX: Final = 8192


def _decimal_json(raw: bytes) -> str:
    """What ``render_decimal`` gives for the Avro decimal ``raw`` (scale 8), quoted."""
    text = _DECIMAL_TEXT.get(raw)
    if text is not None:
        return text
    unscaled = int.from_bytes(raw, "big", signed=True)
    if not -_MAX_UNSCALED < unscaled < _MAX_UNSCALED:
        raise ValueError("decimal beyond precision 28 in TraceRecord")
    whole, frac = divmod(-unscaled if unscaled < 0 else unscaled, _SCALE)
    digits = f"{frac:08d}".rstrip("0")
    if len(digits) < 2:
        digits = (digits + "00")[:2]
    text = f'"{"-" if unscaled < 0 else ""}{whole}.{digits}"'
    if len(_DECIMAL_TEXT) >= _CACHE_MAX:
        _DECIMAL_TEXT.clear()
    _DECIMAL_TEXT[raw] = text
    return text


def _time_json(ms: int) -> str:
    """What ``render_time`` gives for the time ``ms`` after the epoch, quoted."""
    minute, rest = divmod(ms, _MINUTE_MS)
    text = _MINUTE_TEXT.get(minute)
    if text is None:
        if not _FIRST_MINUTE <= minute <= _LAST_MINUTE:
            raise _Unusual
        moment = _EPOCH + timedelta(minutes=minute)
        text = (
            f'"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T'
            f"{moment.hour:02d}:{moment.minute:02d}:"
        )
        if len(_MINUTE_TEXT) >= _CACHE_MAX:
            _MINUTE_TEXT.clear()
        _MINUTE_TEXT[minute] = text
    return f'{text}{rest // 1000:02d}.{rest % 1000:03d}Z"'


def transcode_trace(data: bytes) -> tuple[bytes, str, int]:
    """TraceRecord bytes → (the record's JSON, its trade_id, its close_time in epoch ms).

    The webhook sink needs the JSON and those two values, not the record: decoding to Decimal
    and datetime objects and rendering them back was a third of its CPU per delivery
    (``python -m bench.sink_micro``). This writes the JSON in one pass, byte for byte what
    ``to_json_bytes(decode_trace(data))`` gives (``tests/unit/test_tracecodec.py`` holds it to
    that), and refuses the same inputs with ``ValueError``.
    """
    r = _Reader(data)
    string, long = r.string, r.long
    try:
        event_id = _json_string(string())
        trade_id = string()
        signal_id = _json_string(string()) if r.branch(2) else "null"
        instrument = _json_string(string())
        side = _SIDE_JSON[r.branch(2)]
        raw = r.raw
        volume = _decimal_json(raw())
        entry = _decimal_json(raw())
        exit_ = _decimal_json(raw())
        profit = _decimal_json(raw())
        commission = _decimal_json(raw())
        swap = _decimal_json(raw())
        currency = _json_string(string())
        open_time = _time_json(long())
        close_ms = long()
        close_time = _time_json(close_ms)
        close_reason = _REASON_JSON[r.branch(5)] if r.branch(2) else "null"
    except _Unusual:
        record = decode_trace(data)
        close = (record["close_time"] - _EPOCH) // timedelta(milliseconds=1)
        return to_json_bytes(record), record["trade_id"], close
    body = (
        f'{{"event_id":{event_id},"trade_id":{_json_string(trade_id)},"signal_id":{signal_id},'
        f'"instrument":{instrument},"side":{side},"volume":{volume},"entry_price":{entry},'
        f'"exit_price":{exit_},"profit_loss":{profit},"commission":{commission},"swap":{swap},'
        f'"currency":{currency},"open_time":{open_time},"close_time":{close_time},'
        f'"close_reason":{close_reason}}}'
    )
    return body.encode(), trade_id, close_ms


__all__ = ["FIELDS", "decode_trace", "transcode_trace"]
