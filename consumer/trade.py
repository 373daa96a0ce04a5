"""The ``trade.closed`` contract, checked once at ingest, and its projection onto TraceRecord.

Everything after ingest trusts a TraceRecord, so every rule of the contract (DESIGN.md
"Contract with the platform") is enforced here, before anything is published:

* decimals stay exact: strings or JSON numbers are read as :class:`~decimal.Decimal`, never as a
  binary float, and a value that would need rounding to fit the schema (more than 8 fractional
  digits, more than 20 integer digits) is rejected rather than rounded;
* times carry their offset: a naive time could be any zone, so it is rejected rather than
  guessed; an integer is **epoch milliseconds**, never seconds (a time before 2000 is rejected,
  which catches every epoch-seconds value a platform could send by mistake: taken as
  milliseconds it would date the trade to 1970 and have it released at once, before its
  window);
* :func:`project` builds the TraceRecord from an explicit allow-list, so a personal field, an
  unknown extra field or the free-text comment cannot reach it even by accident.

Rejections raise :class:`~consumer.errors.InvalidRecord` whose reason names the fields and the
rules they broke but never quotes a value: the reason goes to DLQ headers, logs and metrics,
which must hold no personal data.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, Inexact, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from consumer.errors import InvalidRecord
from consumer.records import DECIMAL_SCALE

#: Fields of trade.closed that identify a person, or may (free text). They exist on the model
#: because the contract requires them, and nowhere else.
PERSONAL_FIELDS = (
    "account_id",
    "user_id",
    "client_id",
    "user_email",
    "user_name",
    "client_ip",
    "comment",
)

#: The TraceRecord fields, in schema order: the allow-list :func:`project` copies.
TRACE_FIELDS = (
    "event_id",
    "trade_id",
    "signal_id",
    "instrument",
    "side",
    "volume",
    "entry_price",
    "exit_price",
    "profit_loss",
    "commission",
    "swap",
    "currency",
    "open_time",
    "close_time",
    "close_reason",
)

#: Precision 28, scale 8 in both schemas: at most 20 digits before the point.
MAX_INTEGER_DIGITS = 28 - DECIMAL_SCALE

#: ISO 4217 list one, active alphabetic codes (SIX, checked against the 2026 list: XCG replaced
#: ANG in 2025, BGN left with Bulgaria's move to the euro in 2026, XAD was added in 2025).
#: XTS (testing) and XXX (no currency) are left out: a profit in them is not a profit.
ISO_4217_CODES = frozenset(
    # One code per word, as a table a reviewer can compare with the published list at a glance.
    """
    AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BOV BRL BSD BTN BWP
    BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN
    ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK
    JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD
    MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP
    PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP
    SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV
    WST XAD XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XUA YER ZAR ZMW ZWG
    """.split()  # noqa: SIM905
)

#: Earliest time accepted. Every epoch-seconds value up to the year 2286 is below this when read
#: as milliseconds, so the unit mix-up cannot pass.
MIN_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MIN_TIME_MS = int(MIN_TIME.timestamp() * 1000)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: Longest reason kept: a DLQ header and a log field, not a report.
MAX_REASON_CHARS = 500

_Q = Decimal(1).scaleb(-DECIMAL_SCALE)
# Precision 28 as in the schemas. Our own context, so that the thread's decimal context (which
# any library may change) can neither round silently nor loosen the limits.
_EXACT = Context(prec=28, traps=[InvalidOperation, Inexact])
# re.ASCII: \d would otherwise match any script's digits, which Decimal() accepts too.
_DECIMAL_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?P<offset>[Zz]|[+-]\d{2}:\d{2})?",
    re.ASCII,
)


_OWN = "auto_trace."


def _rule(kind: str, message: str) -> PydanticCustomError:
    # The message is a fixed text, formatted with no context, so no value can get in; the type's
    # prefix tells _describe that the message is one of ours and safe to pass on.
    return PydanticCustomError(_OWN + kind, message)


def _exact_decimal(value: Any) -> Decimal:
    """Read a decimal without ever going through a binary float, and refuse to round.

    The value is returned at the schema's scale (``1950.50`` as ``1950.50000000``, equal to it),
    as the Avro path delivers it, so a trade reads the same whichever format it came in. One
    quantize in a context that traps both signals checks both limits: Inexact means digits
    beyond the scale would be rounded away, InvalidOperation means more than 28 digits in all.
    """
    if isinstance(value, str):
        if not _DECIMAL_TEXT.fullmatch(value):
            # Also refuses what Decimal() alone would take: NaN, Infinity, "1_000", " 1".
            raise _rule("decimal_syntax", "not a decimal number")
        number = Decimal(value)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise _rule("decimal_not_finite", "not a finite number (NaN or Infinity)")
        number = value
    elif isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(value)
    elif isinstance(value, float):
        # Whoever built this dict already lost the exact value; JSON input never gets here.
        raise _rule("decimal_float", "binary float given; send a string or an exact number")
    else:
        raise _rule("decimal_type", "expected a decimal as a string or a number")
    try:
        exact = _EXACT.quantize(number, _Q)
    except Inexact:
        raise _rule("decimal_scale", f"more than {DECIMAL_SCALE} fractional digits") from None
    except InvalidOperation:
        raise _rule("decimal_too_large", f"more than {MAX_INTEGER_DIGITS} integer digits") from None
    # "-0.00" is zero: the Avro decimal (two's complement) has no negative zero, so without this
    # the same trade would read -0.00 on one path and 0.00 after the delay topic.
    return exact if exact else exact.copy_abs()


def _positive_decimal(value: Any) -> Decimal:
    number = _exact_decimal(value)
    if number <= 0:
        raise _rule("decimal_not_positive", "must be greater than 0")
    return number


def _utc_ms(moment: datetime) -> datetime:
    """UTC, truncated to the millisecond the Avro timestamp-millis keeps."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    below_ms = moment.microsecond % 1000
    return moment.replace(microsecond=moment.microsecond - below_ms) if below_ms else moment


def _timestamp(value: Any) -> datetime:
    """RFC 3339 with an offset, epoch milliseconds, or an aware datetime (fastavro's output)."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise _rule("time_naive", "timezone offset required")
        moment = _utc_ms(value)
    elif isinstance(value, str):
        match = _RFC3339.fullmatch(value)
        if match is None:
            raise _rule("time_syntax", "not an RFC 3339 time")
        if match.group("offset") is None:
            raise _rule("time_naive", "timezone offset required")
        try:
            # fromisoformat takes "Z" but not "z" nor a lower-case "t" (RFC 3339 allows both).
            moment = _utc_ms(datetime.fromisoformat(value if value.isupper() else value.upper()))
        except ValueError:
            # fromisoformat's message quotes the input: keep ours.
            raise _rule("time_range", "not a valid date and time") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        if value < MIN_TIME_MS:
            raise _rule(
                "time_too_early", "epoch milliseconds before 2000 (seconds given instead of ms?)"
            )
        try:
            moment = _EPOCH + timedelta(milliseconds=value)
        except OverflowError:
            raise _rule("time_range", "epoch milliseconds out of range") from None
    else:
        raise _rule("time_type", "expected an RFC 3339 string or integer epoch milliseconds")
    if moment < MIN_TIME:
        raise _rule("time_too_early", "before 2000-01-01T00:00:00Z")
    return moment


def _uuid_text(value: Any) -> str:
    if not isinstance(value, str):
        raise _rule("string_type", "expected a string")
    if not UUID_TEXT.fullmatch(value):
        raise _rule("uuid_syntax", "not a UUID (8-4-4-4-12 hex digits)")
    return value


def _published_text(value: Any) -> str:
    """A non-personal string that ends up in the TraceRecord, a Kafka key and HTTP bodies."""
    if not isinstance(value, str):
        raise _rule("string_type", "expected a string")
    if not value.strip():
        raise _rule("string_empty", "must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate from a JSON escape: it cannot be encoded downstream.
        raise _rule("string_unicode", "not valid Unicode text") from None
    return value


def _optional_signal(value: Any) -> str | None:
    """An empty signal id means "no signal": normalised to null so key and record agree."""
    if value is None or value == "":
        return None
    return _published_text(value)


def _personal_text(value: Any) -> str:
    if not isinstance(value, str):
        raise _rule("string_type", "expected a string")
    if not value:
        raise _rule("string_empty", "must not be empty")
    return value


def _currency(value: Any) -> str:
    if not isinstance(value, str):
        raise _rule("string_type", "expected a string")
    if value not in ISO_4217_CODES:
        raise _rule("currency_code", "not an ISO 4217 code")
    return value


ExactDecimal = Annotated[Decimal, PlainValidator(_exact_decimal)]
PositiveDecimal = Annotated[Decimal, PlainValidator(_positive_decimal)]
Timestamp = Annotated[datetime, PlainValidator(_timestamp)]
EventId = Annotated[str, PlainValidator(_uuid_text)]
PublishedText = Annotated[str, PlainValidator(_published_text)]
SignalId = Annotated[str | None, PlainValidator(_optional_signal)]
PersonalText = Annotated[str, PlainValidator(_personal_text)]
Currency = Annotated[str, PlainValidator(_currency)]
Side = Literal["BUY", "SELL"]
CloseReason = Literal["TAKE_PROFIT", "STOP_LOSS", "MANUAL", "MARGIN_CALL", "EXPIRY"]


class TradeClosed(BaseModel):
    """One validated ``trade.closed`` event. Holds personal data: never log or publish it."""

    # Unknown fields are dropped on input, not kept: they may hold anything, personal data too.
    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: EventId
    trade_id: PublishedText
    signal_id: SignalId = None
    account_id: PersonalText
    user_id: PersonalText
    client_id: PersonalText
    user_email: PersonalText
    user_name: PersonalText
    client_ip: str | None = None
    instrument: PublishedText
    side: Side
    volume: PositiveDecimal
    entry_price: ExactDecimal
    exit_price: ExactDecimal
    profit_loss: ExactDecimal
    commission: ExactDecimal
    swap: ExactDecimal
    currency: Currency
    open_time: Timestamp
    close_time: Timestamp
    close_reason: CloseReason | None = None
    comment: str | None = None

    def __repr__(self) -> str:
        # The default repr would print personal fields into any log or traceback that shows it.
        return f"TradeClosed(event_id={self.event_id!r}, trade_id={self.trade_id!r})"

    __str__ = __repr__

    @model_validator(mode="after")
    def _in_order(self) -> TradeClosed:
        # A model-level error has no field path, so the message names the field itself.
        if self.close_time < self.open_time:
            raise _rule("trade_rule", "close_time: earlier than open_time")
        return self


# pydantic's own error types that can occur here, with a text known to hold no input value.
_SAFE_MESSAGES = {
    "missing": "field required",
    "string_type": "expected a string",
    "literal_error": None,  # pydantic's own text: lists the allowed symbols only
    "model_type": "expected a JSON object / record",
    "model_attributes_type": "expected a JSON object / record",
    "dict_type": "expected a JSON object / record",
    "frozen_instance": "read-only",
}


def _describe(error: ValidationError) -> str:
    """One line naming each failing field and rule; never a value, at most MAX_REASON_CHARS."""
    parts: list[str] = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        kind = item["type"]
        if kind in _SAFE_MESSAGES:
            message = _SAFE_MESSAGES[kind] or item["msg"]
        elif kind.startswith(_OWN):
            message = item["msg"]
        else:
            # An error type we did not write and have not vetted may quote its input: name it.
            message = kind
        path = ".".join(str(p) for p in item["loc"] if isinstance(p, str))
        parts.append(f"{path}: {message}" if path else message)
    reason = "; ".join(parts) or "invalid record"
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 1] + "…"
    return reason


def validate_trade(data: Any) -> TradeClosed:
    """The decoded input as a :class:`TradeClosed`, or :class:`InvalidRecord` with a safe reason.

    ``data`` must already hold exact decimals (``Decimal``, ``int`` or ``str``); for JSON, parse
    with ``parse_float=Decimal`` (see :mod:`consumer.decode`), because pydantic's own JSON parser
    reads numbers as binary floats and would turn ``12345678901234.12345678`` into
    ``12345678901234.123``.
    """
    try:
        return TradeClosed.model_validate(data)
    except ValidationError as exc:
        # ``from None``: the ValidationError's text quotes the input, which holds personal data.
        raise InvalidRecord(_describe(exc)) from None


def validate_not_future(trade: TradeClosed, now_ms: int, skew_ms: int) -> None:
    """Reject a close_time further ahead than the allowed clock skew.

    A delayed topic waits for its head record, so a trade dated next year would hold back every
    record behind it for a year (DESIGN.md "Delayed topics"). ``now_ms`` is a parameter so that
    tests fix the clock.
    """
    if epoch_ms(trade.close_time) > now_ms + skew_ms:
        raise InvalidRecord("close_time: further in the future than max_clock_skew")


def epoch_ms(moment: datetime) -> int:
    """Exact integer milliseconds (no float round trip)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def project(trade: TradeClosed) -> dict[str, Any]:
    """The TraceRecord for a trade, built field by field from the allow-list.

    Never ``model_dump()`` followed by deletions: a field added to the contract later would
    then flow out by default. Here a field reaches the output only if it is written below.
    Values need no conversion: validation already put decimals at the schema's scale and times
    in UTC to the millisecond.
    """
    return {
        "event_id": trade.event_id,
        "trade_id": trade.trade_id,
        "signal_id": trade.signal_id,
        "instrument": trade.instrument,
        "side": trade.side,
        "volume": trade.volume,
        "entry_price": trade.entry_price,
        "exit_price": trade.exit_price,
        "profit_loss": trade.profit_loss,
        "commission": trade.commission,
        "swap": trade.swap,
        "currency": trade.currency,
        "open_time": trade.open_time,
        "close_time": trade.close_time,
        "close_reason": trade.close_reason,
    }


def record_key(trade: TradeClosed) -> bytes:
    """The Kafka key: per signal, so one signal's trades keep their order; per trade if none."""
    return (trade.signal_id or trade.trade_id).encode("utf-8")


__all__ = [
    "ISO_4217_CODES",
    "MAX_INTEGER_DIGITS",
    "MIN_TIME_MS",
    "PERSONAL_FIELDS",
    "TRACE_FIELDS",
    "UUID_TEXT",
    "TradeClosed",
    "epoch_ms",
    "project",
    "record_key",
    "validate_not_future",
    "validate_trade",
]
