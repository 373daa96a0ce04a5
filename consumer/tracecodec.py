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

from consumer.records import DECIMAL_SCALE

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
        return _EPOCH + timedelta(milliseconds=self.long())

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


__all__ = ["FIELDS", "decode_trace"]
