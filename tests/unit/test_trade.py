"""The trade.closed contract: what is accepted, what is rejected and how, and the projection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from consumer.config import InputSettings
from consumer.decode import make_decoder
from consumer.errors import InvalidRecord
from consumer.records import decode_trace, encode_trace, to_json_bytes, to_json_dict
from consumer.samples import sample_trade, to_avro, to_json
from consumer.trade import (
    ISO_4217_CODES,
    PERSONAL_FIELDS,
    TRACE_FIELDS,
    TradeClosed,
    epoch_ms,
    project,
    record_key,
    validate_not_future,
    validate_trade,
)

CONTRACT_FIELDS = tuple(TradeClosed.model_fields)
JSON = make_decoder(InputSettings(format="json"))
AVRO = make_decoder(InputSettings(format="avro"))


def trade(**changes: Any) -> dict[str, Any]:
    data = sample_trade(7)
    data.update(changes)
    return data


def reason(**changes: Any) -> str:
    with pytest.raises(InvalidRecord) as info:
        validate_trade(trade(**changes))
    return str(info.value)


# --- accepted ----------------------------------------------------------------------------------


def test_samples_are_valid() -> None:
    for i in range(500):
        validate_trade(sample_trade(i, seed=i % 3))


def test_unknown_fields_are_dropped_not_stored() -> None:
    parsed = validate_trade(trade(referrer="partner-campaign-42", **{"nested": {"a": 1}}))
    assert "referrer" not in parsed.model_dump()
    assert parsed.model_extra is None
    assert not hasattr(parsed, "referrer")


def test_optional_fields_may_be_missing() -> None:
    data = trade()
    for name in ("signal_id", "client_ip", "close_reason", "comment"):
        del data[name]
    parsed = validate_trade(data)
    assert parsed.signal_id is parsed.client_ip is parsed.close_reason is parsed.comment is None


def test_repr_shows_no_personal_field() -> None:
    data = trade()
    text = repr(validate_trade(data)) + str(validate_trade(data))
    for name in PERSONAL_FIELDS:
        if data[name]:
            assert data[name] not in text


# --- decimals ----------------------------------------------------------------------------------


def test_decimal_string_is_kept_exactly() -> None:
    parsed = validate_trade(trade(entry_price="1950.50"))
    assert parsed.entry_price == Decimal("1950.50")
    record = project(parsed)
    assert record["entry_price"] == Decimal("1950.50")
    assert to_json_dict(record)["entry_price"] == "1950.50"
    assert decode_trace(encode_trace(record))["entry_price"] == Decimal("1950.50")


def test_largest_decimal_survives_end_to_end() -> None:
    biggest = "12345678901234567890.12345678"  # 20 integer digits, 8 fractional: precision 28
    data = trade(profit_loss=biggest, commission="-" + biggest)
    for raw, decoder in ((to_json(data), JSON), (to_avro(data), AVRO)):
        back = decode_trace(encode_trace(project(decoder.decode(raw))))
        assert back["profit_loss"] == Decimal(biggest)
        assert back["commission"] == -Decimal(biggest)


@pytest.mark.parametrize(
    "value",
    [
        "1.123456789",
        "0.000000001",
        "12345678901234567890.123456789",
        "1e-9",
        Decimal("1.000000001"),
    ],
)
def test_more_than_eight_fractional_digits_is_rejected_not_rounded(value: Any) -> None:
    assert reason(swap=value) == "swap: more than 8 fractional digits"


def test_zeros_beyond_the_scale_are_not_rounding() -> None:
    assert validate_trade(trade(swap="1.500000000000")).swap == Decimal("1.5")


@pytest.mark.parametrize("value", ["123456789012345678901", "1e20", 10**20, "-1E+25"])
def test_more_than_twenty_integer_digits_is_rejected(value: Any) -> None:
    assert reason(profit_loss=value) == "profit_loss: more than 20 integer digits"


@pytest.mark.parametrize("value", ["NaN", "nan", "sNaN", "Infinity", "-Infinity", "inf"])
def test_nan_and_infinity_text_is_rejected(value: str) -> None:
    assert reason(exit_price=value) == "exit_price: not a decimal number"


@pytest.mark.parametrize("value", [Decimal("NaN"), Decimal("-Infinity"), Decimal("sNaN")])
def test_nan_and_infinity_decimal_is_rejected(value: Decimal) -> None:
    assert reason(exit_price=value) == "exit_price: not a finite number (NaN or Infinity)"


def test_binary_float_is_rejected() -> None:
    # Whoever built a dict with a float already lost the exact value: refuse to guess it.
    assert reason(volume=0.1).startswith("volume: binary float")


def test_json_numbers_are_exact() -> None:
    exact = b"12345678901234.12345678"  # a binary float keeps only 17 significant digits
    raw = to_json(trade(entry_price=exact.decode())).replace(b'"%s"' % exact, exact)
    assert b'"entry_price":12345678901234.12345678,' in raw
    assert JSON.decode(raw).entry_price == Decimal(exact.decode())
    assert JSON.decode(to_json(trade(volume=3, swap=Decimal("0.1")))).volume == Decimal(3)


def test_pydantic_json_parsing_would_lose_digits() -> None:
    """Why decode.py parses JSON itself: pydantic reads JSON numbers through a binary float.

    If the first assertion starts failing, pydantic became exact and decode.py could use
    model_validate_json.
    """

    class Plain(BaseModel):
        x: Decimal

    assert Plain.model_validate_json(b'{"x":12345678901234.12345678}').x != Decimal(
        "12345678901234.12345678"
    )
    # And if someone calls model_validate_json on the model anyway, it refuses, never rounds.
    raw = to_json(trade(entry_price="12345678901234.12345678"))
    raw = raw.replace(b'"12345678901234.12345678"', b"12345678901234.12345678")
    with pytest.raises(ValidationError):
        TradeClosed.model_validate_json(raw)


def test_every_format_gives_the_same_decimal_scale() -> None:
    data = trade(volume="2", swap="-0.5")
    from_json, from_avro = JSON.decode(to_json(data)), AVRO.decode(to_avro(data))
    assert from_json.volume.as_tuple() == from_avro.volume.as_tuple()
    assert from_json.swap.as_tuple() == from_avro.swap.as_tuple()


def test_projection_quantizes_to_the_schema_scale() -> None:
    record = project(validate_trade(trade(volume=2, swap="-0.5")))
    assert record["volume"].as_tuple().exponent == -8
    assert record["volume"] == 2
    assert record["swap"] == Decimal("-0.5")


# --- times -------------------------------------------------------------------------------------


def test_rfc3339_with_z() -> None:
    parsed = validate_trade(trade(close_time="2026-11-26T10:15:00.250Z"))
    assert parsed.close_time == datetime(2026, 11, 26, 10, 15, 0, 250_000, tzinfo=UTC)
    assert parsed.close_time.utcoffset() == timedelta(0)


def test_rfc3339_with_offset_is_converted_to_utc() -> None:
    parsed = validate_trade(
        trade(open_time="2026-11-26T09:00:00+02:00", close_time="2026-11-26T10:15:00.250+02:00")
    )
    assert parsed.close_time == datetime(2026, 11, 26, 8, 15, 0, 250_000, tzinfo=UTC)
    assert parsed.close_time.tzinfo is UTC


def test_epoch_milliseconds() -> None:
    ms = 1_795_688_100_250
    parsed = validate_trade(trade(open_time=ms - 60_000, close_time=ms))
    assert parsed.close_time == datetime(2026, 11, 26, 10, 15, 0, 250_000, tzinfo=UTC)
    assert epoch_ms(parsed.close_time) == ms


def test_epoch_seconds_are_rejected() -> None:
    # Read as milliseconds they would date the trade to 1970 and release it at once.
    text = reason(open_time=1_795_688_000, close_time=1_795_688_100)
    assert "open_time: epoch milliseconds before 2000" in text
    assert "close_time: epoch milliseconds before 2000" in text


@pytest.mark.parametrize("value", ["2026-11-26T10:15:00", "2026-11-26T10:15:00.250"])
def test_naive_time_is_rejected(value: str) -> None:
    assert reason(close_time=value) == "close_time: timezone offset required"


def test_naive_datetime_is_rejected() -> None:
    assert reason(close_time=datetime(2026, 11, 26, 10, 15)) == (
        "close_time: timezone offset required"
    )


def test_aware_datetime_from_avro_is_accepted() -> None:
    moment = datetime(2026, 11, 26, 12, 15, tzinfo=timezone(timedelta(hours=2)))
    parsed = validate_trade(trade(open_time=moment, close_time=moment))
    assert parsed.close_time == moment
    assert parsed.close_time.tzinfo is UTC


def test_time_is_kept_to_the_millisecond() -> None:
    parsed = validate_trade(trade(close_time="2026-11-26T10:15:00.123999+00:00"))
    assert parsed.close_time.microsecond == 123_000
    assert (
        project(parsed)["close_time"] == decode_trace(encode_trace(project(parsed)))["close_time"]
    )


@pytest.mark.parametrize(
    "value",
    ["26/11/2026 10:15", "2026-11-26", "2026-13-01T00:00:00Z", "2026-11-26T10:15:00+25:00", 1.5e12],
)
def test_malformed_time_is_rejected(value: Any) -> None:
    text = reason(close_time=value)
    assert text.startswith("close_time: ")
    assert str(value) not in text


def test_close_before_open_is_rejected() -> None:
    assert reason(open_time="2026-11-26T10:15:00.001Z", close_time="2026-11-26T10:15:00Z") == (
        "close_time: earlier than open_time"
    )


def test_close_equal_to_open_is_accepted() -> None:
    validate_trade(trade(open_time="2026-11-26T10:15:00Z", close_time="2026-11-26T12:15:00+02:00"))


def test_close_time_in_the_future_beyond_the_skew_is_rejected() -> None:
    parsed = validate_trade(trade())
    close = epoch_ms(parsed.close_time)
    validate_not_future(parsed, now_ms=close - 300_000, skew_ms=300_000)  # exactly at the limit
    validate_not_future(parsed, now_ms=close + 86_400_000, skew_ms=0)  # the past is fine
    with pytest.raises(InvalidRecord, match=r"^close_time: further in the future"):
        validate_not_future(parsed, now_ms=close - 300_001, skew_ms=300_000)


# --- every other rule, and what a reason may say ----------------------------------------------

RULES = [
    ("event_id", "not-a-uuid-at-all", "event_id: not a UUID"),
    ("event_id", "{3f2b8c1e-4a5d-4e6f-8a9b-0c1d2e3f4a5b}", "event_id: not a UUID"),
    ("trade_id", "", "trade_id: must not be empty"),
    ("trade_id", "    ", "trade_id: must not be empty"),
    ("trade_id", 123456789, "trade_id: expected a string"),
    ("trade_id", "bad\ud800surrogate", "trade_id: not valid Unicode text"),
    ("instrument", "", "instrument: must not be empty"),
    ("account_id", "", "account_id: must not be empty"),
    ("user_id", "", "user_id: must not be empty"),
    ("client_id", "", "client_id: must not be empty"),
    ("user_email", "", "user_email: must not be empty"),
    ("user_name", "", "user_name: must not be empty"),
    ("user_email", None, "user_email: expected a string"),
    ("client_ip", 192168001001, "client_ip: expected a string"),
    ("comment", ["secret", "list"], "comment: expected a string"),
    ("side", "HOLD_POSITION", "side: Input should be 'BUY' or 'SELL'"),
    ("side", "buy", "side: Input should be 'BUY' or 'SELL'"),
    ("close_reason", "LIQUIDATED", "close_reason: Input should be 'TAKE_PROFIT'"),
    ("volume", "0", "volume: must be greater than 0"),
    ("volume", "-0.010", "volume: must be greater than 0"),
    ("volume", "1,50", "volume: not a decimal number"),
    ("volume", "1_000.5", "volume: not a decimal number"),
    ("volume", " 1.5", "volume: not a decimal number"),
    ("entry_price", "\u0661\u0662\u0663", "entry_price: not a decimal number"),
    ("entry_price", True, "entry_price: expected a decimal"),
    ("entry_price", None, "entry_price: expected a decimal"),
    ("currency", "usd", "currency: not an ISO 4217 code"),
    ("currency", "BTC", "currency: not an ISO 4217 code"),
    ("currency", "XXX", "currency: not an ISO 4217 code"),
    ("currency", "DEM", "currency: not an ISO 4217 code"),
    ("currency", "US Dollar", "currency: not an ISO 4217 code"),
]


@pytest.mark.parametrize(("field", "value", "expected"), RULES)
def test_rule_reason_names_the_field_and_never_the_value(
    field: str, value: Any, expected: str
) -> None:
    text = reason(**{field: value})
    assert text.startswith(expected)
    if isinstance(value, str) and len(value.strip()) >= 3:
        assert value not in text
        assert value.lower() not in text.lower() or value.lower() in expected.lower()


@pytest.mark.parametrize(
    "field",
    [f for f in CONTRACT_FIELDS if f not in {"signal_id", "client_ip", "close_reason", "comment"}],
)
def test_missing_required_field(field: str) -> None:
    data = trade()
    del data[field]
    with pytest.raises(InvalidRecord) as info:
        validate_trade(data)
    assert str(info.value) == f"{field}: field required"


def test_reason_lists_every_problem_within_bounds() -> None:
    with pytest.raises(InvalidRecord) as info:
        validate_trade({"x" * 10_000: "y" * 10_000})
    text = str(info.value)
    assert text.startswith("event_id: field required; trade_id: field required")
    assert len(text) <= 500
    assert "x" * 20 not in text and "y" * 20 not in text


def test_not_a_mapping() -> None:
    with pytest.raises(InvalidRecord, match=r"^expected a JSON object"):
        validate_trade(["a", "list"])


def test_rejection_does_not_chain_the_validation_error() -> None:
    """pydantic's own error text quotes the input: it must not ride along in a traceback."""
    with pytest.raises(InvalidRecord) as info:
        validate_trade(trade(currency="usd", user_email=""))
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_iso_4217_table() -> None:
    assert {"USD", "EUR", "JPY", "GBP", "CHF", "XAU", "XCG", "ZWG", "SLE", "VED"} <= ISO_4217_CODES
    assert not {"ANG", "BGN", "HRK", "ZWL", "SLL", "CUC", "XTS", "XXX"} & ISO_4217_CODES
    assert all(len(c) == 3 and c.isascii() and c.isupper() for c in ISO_4217_CODES)


# --- projection and key ------------------------------------------------------------------------


def test_projection_is_the_allow_list() -> None:
    record = project(validate_trade(trade()))
    assert tuple(record) == TRACE_FIELDS
    assert not set(record) & set(PERSONAL_FIELDS)
    assert isinstance(record["volume"], Decimal)
    assert isinstance(record["close_time"], datetime)
    assert record["close_time"].tzinfo is UTC
    assert record["side"] in ("BUY", "SELL")


def test_record_key_is_the_signal_else_the_trade() -> None:
    assert record_key(validate_trade(trade(signal_id="sig-0001"))) == b"sig-0001"
    assert record_key(validate_trade(trade(signal_id=None, trade_id="T-9"))) == b"T-9"
    empty = validate_trade(trade(signal_id="", trade_id="T-9"))
    assert record_key(empty) == b"T-9"
    assert project(empty)["signal_id"] is None
    assert record_key(validate_trade(trade(signal_id="sigé"))) == "sigé".encode()


# --- no personal value reaches an output, whatever it holds -------------------------------------

_secret = st.text(min_size=6, max_size=40)
_extra_key = st.text(min_size=6, max_size=20).filter(lambda k: k not in CONTRACT_FIELDS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    i=st.integers(min_value=0, max_value=10_000),
    personal=st.fixed_dictionaries({name: _secret for name in PERSONAL_FIELDS}),
    extras=st.dictionaries(_extra_key, _secret, max_size=4),
)
def test_no_personal_or_unknown_value_reaches_the_output(
    i: int, personal: dict[str, str], extras: dict[str, str]
) -> None:
    base = sample_trade(i)
    baseline = project(JSON.decode(to_json(base)))
    baseline_avro, baseline_json = encode_trace(baseline), to_json_bytes(baseline)
    secrets = [*personal.values(), *extras, *extras.values()]
    for secret in secrets:
        # A value that is already part of the non-personal content proves nothing.
        assume(secret.encode() not in baseline_avro and secret.encode() not in baseline_json)

    data = {**base, **personal, **extras}
    for decoded in (JSON.decode(to_json(data)), AVRO.decode(to_avro(data))):
        record = project(decoded)
        avro, as_json = encode_trace(record), to_json_bytes(record)
        # Stronger than "not found": personal data has no influence on the output at all.
        assert avro == baseline_avro
        assert as_json == baseline_json
        for secret in secrets:
            assert secret.encode() not in avro
            assert secret.encode() not in as_json


@pytest.mark.parametrize("negative_zero", ["-0.00", "-0", "-0.00000000", "-0E+3"])
def test_negative_zero_reads_as_zero_on_every_path(negative_zero: str) -> None:
    # Avro's two's-complement decimal cannot carry -0: the JSON path must not either, or the
    # same trade would render "-0.00" before the delay topic and "0.00" after it.
    record = project(validate_trade(trade(profit_loss=negative_zero)))
    assert record["profit_loss"].as_tuple() == Decimal("0E-8").as_tuple()
    assert to_json_dict(record)["profit_loss"] == "0.00"
    assert decode_trace(encode_trace(record)) == record
