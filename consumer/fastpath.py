"""An accelerator for ingest: the common, well-formed JSON trade straight to TraceRecord bytes.

The pydantic path (:mod:`consumer.decode` → :mod:`consumer.trade` → :func:`encode_trace`) costs
~100-130 µs per record, most of it building ``Decimal``/``datetime`` objects and a model only to
take them apart again for fastavro. Here a C parser (msgspec) checks the JSON and the field
types, and the values go from their text to Avro bytes with integer arithmetic.

The pydantic path stays the single source of truth. This module may only *decline*: it accepts
a record only when every rule of the contract visibly holds for the plain forms it knows, and
then its output is byte for byte what the pydantic path would produce (tests/unit/
test_fastpath.py compares the two on generated, mutated and corrupted trades). Anything else (an
exponent, an offset other than UTC, more than 8 fractional digits, a bracket, any broken rule)
gives ``None``, the pydantic path runs, and it alone decides, and words, every rejection. So a
rejection never depends on which path saw the record, and this module never needs a reason.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any, Final

import msgspec

from consumer.records import DECIMAL_SCALE
from consumer.trade import ISO_4217_CODES, MAX_INTEGER_DIGITS, MIN_TIME_MS, UUID_TEXT

#: Larger records go the pydantic way. Bounds what the two JSON parsers could disagree on: an
#: integer over Python's 4,300-digit limit (stdlib json fails, msgspec skips it in an unknown
#: field) needs more bytes than this. A trade is ~350-650 bytes.
MAX_FAST_BYTES: Final = 4096

_MS_PER_DAY: Final = 86_400_000
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()
_SCALE: Final = 100_000_000  # 10 ** DECIMAL_SCALE
_MAX_WHOLE: Final = 10**MAX_INTEGER_DIGITS  # exclusive bound of the integer part
#: Zeros that bring 0..8 fractional digits to the scale; _PAD[len(fraction)].
_PAD: Final = ("00000000", "0000000", "000000", "00000", "0000", "000", "00", "0", "")

# At most 20 integer and 8 fractional digits: exact at scale 8 within precision 28, so nothing
# is left to check after it. re.ASCII: \d would otherwise match any script's digits.
_DECIMAL_TEXT = re.compile(
    rf"-?\d{{1,{MAX_INTEGER_DIGITS}}}(?:\.\d{{1,{DECIMAL_SCALE}}})?", re.ASCII
)

# Only the plain form: "2026-11-26T10:15:00.250Z" (1-9 fractional digits) or "+00:00". Hours,
# minutes and seconds are range-checked by the pattern, the date by date.fromisoformat (once per
# distinct minute). Groups: the minute, the seconds, the fraction.
_MS_TAIL = re.compile(r":[0-5]\d\.\d{3}Z", re.ASCII)  # ":00.250Z", the platform's own tail
_TIME_TEXT = re.compile(
    r"(\d{4}-\d{2}-\d{2}T(?:[01]\d|2[0-3]):[0-5]\d):([0-5]\d)(?:\.(\d{1,9}))?(?:Z|\+00:00)",
    re.ASCII,
)


class _Trade(msgspec.Struct, kw_only=True, gc=False):
    """The fields the contract reads, typed so that msgspec (in C) rejects wrong JSON types.

    Decimals and times are ``Any``: each may be a string or a number, checked below. Fields not
    listed are skipped, as the model's ``extra="ignore"`` drops them.
    """

    event_id: str
    trade_id: str
    signal_id: str | None = None
    account_id: str
    user_id: str
    client_id: str
    user_email: str
    user_name: str
    client_ip: str | None = None
    instrument: str
    side: str
    volume: Any
    entry_price: Any
    exit_price: Any
    profit_loss: Any
    commission: Any
    swap: Any
    currency: str
    open_time: Any
    close_time: Any
    close_reason: str | None = None
    comment: str | None = None


# float_hook=str: a JSON number with a fraction or an exponent arrives as its own text, never as
# a binary float. Its text always matches the decimal syntax the model takes from a string, and
# Decimal(text) is the same value either way, so number and string need no separate handling.
_DECODER: Final = msgspec.json.Decoder(_Trade, float_hook=str)
# DecodeError covers malformed JSON and wrong types (ValidationError is a subclass); ValueError
# and RecursionError are there because declining is always safe and a crash never is.
_PARSE_ERRORS: Final = (msgspec.DecodeError, ValueError, RecursionError)


def _zigzag_varint(n: int) -> bytes:
    """An Avro ``int``/``long``: zigzag, then 7 bits a byte, low first, high bit = "more"."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


#: Varint bytes for 14 bits, both with the "more" bit: the low four bytes of a six-byte long
#: (16,384 two-byte objects, ~0.7 MB, built once at import in a few ms).
_PAIRS: Final = tuple(bytes(((i & 0x7F) | 0x80, (i >> 7) | 0x80)) for i in range(1 << 14))
#: Bits 28..41 of a zigzag timestamp -> its last two bytes; they change every 37 hours, and
#: there are at most 2**14 of them.
_TOPS: dict[int, bytes] = {}


def _timestamp(ms: int) -> bytes:
    """A timestamp-millis long, without a Python loop over its bytes.

    Every time from 1970-07 to 2039 is six varint bytes (zigzag in 2**35..2**42): two table
    look-ups and a memo instead of a loop, 1.2 µs -> 0.4 µs on the project machine.
    """
    z = ms << 1
    if not (1 << 35) <= z < (1 << 42):
        return _zigzag_varint(ms)
    top = z >> 28
    tail = _TOPS.get(top)
    if tail is None:
        tail = _TOPS[top] = bytes(((top & 0x7F) | 0x80, top >> 7))
    return _PAIRS[z & 0x3FFF] + _PAIRS[(z >> 14) & 0x3FFF] + tail


#: Zigzag lengths 0..63, one byte each: every string and decimal of a normal trade.
_LENGTH: Final = tuple(bytes((2 * n,)) for n in range(64))
_UUID_LENGTH: Final = _LENGTH[36]  # what UUID_TEXT matches is 36 ASCII characters
_NULL: Final = b"\x00"  # union branch 0
_SOME: Final = b"\x02"  # union branch 1
_ZERO: Final = b"\x02\x00"  # a decimal 0 (and -0): one byte, 00
_SIDE: Final = {"BUY": b"\x00", "SELL": b"\x02"}
_CLOSE_REASON: Final = {
    None: _NULL,
    "TAKE_PROFIT": _SOME + b"\x00",
    "STOP_LOSS": _SOME + b"\x02",
    "MANUAL": _SOME + b"\x04",
    "MARGIN_CALL": _SOME + b"\x06",
    "EXPIRY": _SOME + b"\x08",
}
_CURRENCY: Final = {code: _LENGTH[len(code)] + code.encode() for code in ISO_4217_CODES}

# Bounded memo tables, cleared when full: a stream's trades open and close within days of each
# other, so a few thousand minutes serve it, and prices, volumes and fees repeat. Keys are only
# ever texts already checked in full, so a hit needs no check.
_MEMO_MAX: Final = 16_384
_MINUTES: dict[str, int] = {}  # "2026-11-26T10:15" -> epoch ms
_DECIMALS: dict[str, bytes] = {}  # decimal text -> its Avro bytes field


def _remember(memo: dict[str, Any], key: str, value: Any) -> None:
    if len(memo) >= _MEMO_MAX:
        memo.clear()
    memo[key] = value


def _string(text: str) -> bytes:
    data = text.encode()
    size = len(data)
    return (_LENGTH[size] if size < 64 else _zigzag_varint(size)) + data


def _decimal(value: Any) -> bytes | None:
    """The Avro ``bytes`` field of a decimal exact at scale 8 within precision 28, or None.

    Plain ``[-]digits[.digits]`` only; a form the model also takes (``+1``, ``.5``, ``5.``,
    ``1e3``, trailing zeros past the 8th place) is declined, not re-implemented. One function,
    not three: each Python call is ~0.1 µs here, and this runs six times a record.

    The size is fastavro's: ``(bit_length + 8) // 8`` bytes of the magnitude, one more than the
    minimum for negative powers of two (-128 is ``ff 80``, not ``80``).
    """
    if type(value) is str:
        field = _DECIMALS.get(value)
        if field is not None:
            return field
        if _DECIMAL_TEXT.fullmatch(value) is None:
            return None
        whole, _, fraction = value.partition(".")
        # "-0.5" -> int("-050000000"): the sign and leading zeros are int()'s to read.
        unscaled = int(whole + fraction + _PAD[len(fraction)])
    elif type(value) is int and -_MAX_WHOLE < value < _MAX_WHOLE:
        # type() is not isinstance(): True is an int to isinstance, not a decimal to the model.
        unscaled = value * _SCALE
    else:
        return None
    data = unscaled.to_bytes((unscaled.bit_length() + 8) >> 3, "big", signed=True)
    field = _LENGTH[len(data)] + data
    if type(value) is str:
        if len(_DECIMALS) >= _MEMO_MAX:
            _DECIMALS.clear()
        _DECIMALS[value] = field
    return field


def _positive(field: bytes) -> bool:
    """Whether a :func:`_decimal` field holds a value > 0: two's complement, sign in bit 7."""
    return field[1] < 0x80 and field != _ZERO


def _epoch_ms(value: Any) -> int | None:
    """Epoch ms of a time the model would read as the same millisecond; None to decline."""
    if type(value) is int:
        return value if value >= MIN_TIME_MS else None
    if type(value) is not str:
        return None
    if len(value) == 24 and _MS_TAIL.fullmatch(value, 16) is not None:
        # "2026-11-26T10:15" + ":00.250Z": a known minute (keys are only ever minutes that
        # passed _TIME_TEXT whole, from 2000 on) and a checked tail make a string _TIME_TEXT
        # matches; half the cost of the full pattern and its groups.
        minute = _MINUTES.get(value[:16])
        if minute is not None:
            return minute + int(value[17:19] + value[20:23])
    match = _TIME_TEXT.fullmatch(value)
    if match is None:
        return None
    minute_text, seconds, fraction = match.groups()
    minute = _MINUTES.get(minute_text)
    if minute is None:
        try:
            day = date.fromisoformat(minute_text[:10]).toordinal() - _EPOCH_ORDINAL
        except ValueError:  # 2026-02-30
            return None
        minute = day * _MS_PER_DAY + int(minute_text[11:13]) * 3_600_000
        minute += int(minute_text[14:16]) * 60_000
        if minute < MIN_TIME_MS:
            return None
        _remember(_MINUTES, minute_text, minute)
    # The model keeps whole milliseconds, truncating (fromisoformat keeps 6 digits, _utc_ms 3).
    if fraction:
        moment = minute + int(seconds + (fraction + "00")[:3])
    else:
        moment = minute + int(seconds) * 1000
    return moment


#: What ingest produces for an accepted trade, the same as the pydantic path gives: the
#: TraceRecord (schemaless Avro), the key, close_time in epoch ms, and the trade id as UTF-8.
#: A plain tuple: a NamedTuple's constructor is a Python call, ~0.3 µs a record.
FastRecord = tuple[bytes, bytes, int, bytes]


class JsonFastPath:
    """Callable on raw JSON bytes: a :class:`FastRecord`, or None for "let pydantic decide"."""

    def __init__(self, *, max_bytes: int, skew_ms: int) -> None:
        self._max_bytes = min(max_bytes, MAX_FAST_BYTES)
        self._skew_ms = skew_ms

    def __call__(self, raw: bytes, now_ms: int) -> FastRecord | None:
        if not raw or len(raw) > self._max_bytes:
            return None
        if not raw.isascii():
            # msgspec checks UTF-8 only in the strings it keeps; stdlib json checks all of it.
            try:
                raw.decode()
            except UnicodeDecodeError:
                return None
        if raw.find(b"{", 1) >= 0 or raw.find(b"[") >= 0:
            # Nothing nested (a bracket inside a string too goes the pydantic way): both parsers
            # give up on deep nesting with RecursionError, but not at exactly the same depth.
            # Two memchr scans; bytes.count would cost twice as much.
            return None
        try:
            t = _DECODER.decode(raw)
        except _PARSE_ERRORS:
            return None

        side = _SIDE.get(t.side)
        close_reason = _CLOSE_REASON.get(t.close_reason)
        currency = _CURRENCY.get(t.currency)
        if side is None or close_reason is None or currency is None:
            return None
        event_id = t.event_id
        if UUID_TEXT.fullmatch(event_id) is None:
            return None
        trade_id_text = t.trade_id
        instrument = t.instrument
        signal = t.signal_id or None  # "" means no signal, as in the model
        # Published texts: not empty after strip() (isspace() is True exactly when strip()
        # leaves nothing). Personal fields: present, strings (msgspec checked), not empty; their
        # values are never read further.
        if not (
            trade_id_text
            and not trade_id_text.isspace()
            and instrument
            and not instrument.isspace()
            and (signal is None or not signal.isspace())
            and t.account_id
            and t.user_id
            and t.client_id
            and t.user_email
            and t.user_name
        ):
            return None

        close_ms = _epoch_ms(t.close_time)
        open_ms = _epoch_ms(t.open_time)
        if close_ms is None or open_ms is None:
            return None
        if close_ms < open_ms or close_ms > now_ms + self._skew_ms:
            return None

        volume = _decimal(t.volume)
        entry = _decimal(t.entry_price)
        exit_ = _decimal(t.exit_price)
        profit = _decimal(t.profit_loss)
        commission = _decimal(t.commission)
        swap = _decimal(t.swap)
        if (
            volume is None
            or not _positive(volume)
            or entry is None
            or exit_ is None
            or profit is None
            or commission is None
            or swap is None
        ):
            return None

        trade_id = trade_id_text.encode()
        value = b"".join(
            (
                _UUID_LENGTH,
                event_id.encode(),
                _LENGTH[len(trade_id)] + trade_id if len(trade_id) < 64 else _string(trade_id_text),
                _NULL if signal is None else _SOME + _string(signal),
                _string(instrument),
                side,
                volume,
                entry,
                exit_,
                profit,
                commission,
                swap,
                currency,
                _timestamp(open_ms),
                _timestamp(close_ms),
                close_reason,
            )
        )
        key = trade_id if signal is None else signal.encode()
        return value, key, close_ms, trade_id


__all__ = ["MAX_FAST_BYTES", "FastRecord", "JsonFastPath"]
