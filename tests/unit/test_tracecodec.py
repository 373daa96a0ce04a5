"""The sink's TraceRecord reader against fastavro, and the JSON renderer's fast time path
against the strftime rendering it replaced, and the one-pass JSON transcoder against both."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer import headers as h
from consumer import records, tracecodec
from consumer.adapters.base import Delivery
from consumer.records import TRACE_RECORD_SCHEMA, encode_trace, schemas_dir
from consumer.samples import sample_trade
from consumer.trade import project, validate_trade

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Precision 28, scale 8: every value the schema can hold, and the edges of it.
decimals = st.one_of(
    st.integers(min_value=-(10**28) + 1, max_value=10**28 - 1),
    st.sampled_from([0, 1, -1, 10**8, -(10**8), 10**28 - 1, -(10**28) + 1, 127, 128, -128, -129]),
).map(lambda unscaled: Decimal(unscaled).scaleb(-8))
times = st.integers(min_value=-(2**40), max_value=2**45).map(
    lambda ms: _EPOCH + timedelta(milliseconds=ms)
)
text = st.text(max_size=40)
trace_records = st.fixed_dictionaries(
    {
        "event_id": text,
        "trade_id": text,
        "signal_id": st.none() | text,
        "instrument": text,
        "side": st.sampled_from(tracecodec.SIDES),
        "volume": decimals,
        "entry_price": decimals,
        "exit_price": decimals,
        "profit_loss": decimals,
        "commission": decimals,
        "swap": decimals,
        "currency": text,
        "open_time": times,
        "close_time": times,
        "close_reason": st.none() | st.sampled_from(tracecodec.CLOSE_REASONS),
    }
)


def _reference_json(record: dict[str, Any]) -> bytes:
    """The rendering before the fast path: astimezone + strftime for every time."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Decimal):
            out[key] = records.render_decimal(value)
        elif isinstance(value, datetime):
            out[key] = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
                f"{value.microsecond // 1000:03d}Z"
            )
        else:
            out[key] = value
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Equal, with the same key order, value types, decimal digits and time zones."""
    assert list(a) == list(b)
    for key in a:
        assert type(a[key]) is type(b[key]), key
        assert a[key] == b[key], key
        if isinstance(a[key], Decimal):
            assert a[key].as_tuple() == b[key].as_tuple(), key
        if isinstance(a[key], datetime):
            assert a[key].utcoffset() == b[key].utcoffset() == timedelta(0), key


def test_the_field_list_is_the_schema() -> None:
    # A schema change must change the hand-written reader in the same commit.
    schema = json.loads((schemas_dir() / TRACE_RECORD_SCHEMA).read_text())
    assert [f["name"] for f in schema["fields"]] == [name for name, _ in tracecodec.FIELDS]
    types = {f["name"]: f["type"] for f in schema["fields"]}
    assert types["side"]["symbols"] == list(tracecodec.SIDES)
    assert types["close_reason"][1]["symbols"] == list(tracecodec.CLOSE_REASONS)


@settings(max_examples=200, deadline=None)
@given(trace_records)
def test_decodes_exactly_as_fastavro(record: dict[str, Any]) -> None:
    data = encode_trace(record)
    _same(tracecodec.decode_trace(data), records.decode_trace(data))


@pytest.mark.parametrize("seed", range(40))
def test_realistic_records_decode_and_render_as_before(seed: int) -> None:
    trade = validate_trade(sample_trade(seed, seed=seed))
    data = encode_trace(project(trade))
    fast, slow = tracecodec.decode_trace(data), records.decode_trace(data)
    _same(fast, slow)
    assert records.to_json_bytes(fast) == _reference_json(slow)


@settings(max_examples=150, deadline=None)
@given(trace_records)
def test_renders_exactly_as_records(record: dict[str, Any]) -> None:
    assert records.to_json_bytes(record) == _reference_json(record)


def test_renders_times_in_other_zones_and_short_decimals_as_records() -> None:
    record = {
        "when": datetime(2026, 1, 2, 3, 4, 5, 678999, tzinfo=timezone(timedelta(hours=5))),
        "early": datetime(999, 1, 1, tzinfo=UTC),
        "amount": Decimal("1950.5"),
        "whole": Decimal("7"),
        "none": None,
        "text": "é\u2028",
    }
    assert records.to_json_bytes(record) == _reference_json(record)


class _Text(str):
    pass


@pytest.mark.parametrize(
    "record",
    [
        {},
        {"n": 1, "text": "a"},
        {"text": "a", "x": 1.5, "flag": True, "items": [1, "b", None]},
        {"nested": {"k": "v", "n": [1, 2]}},
        {1: "non-str key", "text": "a"},
        {"sub": _Text('a"b'), "text": "\x00\n"},
        {'\u00e9"\\key\ud7ff': "v", "inf": float("inf")},
    ],
)
def test_renders_other_values_exactly_as_the_encoder(record: dict[Any, Any]) -> None:
    """Values outside the TraceRecord's types fall back to the encoder: same bytes."""
    assert records.to_json_bytes(record) == _reference_json(record)


def test_renders_any_number_of_distinct_keys() -> None:
    record = {f"k{i}\u2029": str(i) for i in range(3 * records._KEY_TEXT_MAX)}
    assert records.to_json_bytes(record) == _reference_json(record)
    assert records.to_json_bytes(record) == _reference_json(record)
    assert len(records._KEY_TEXT) <= records._KEY_TEXT_MAX


@settings(max_examples=200, deadline=None)
@given(trace_records)
def test_trade_id_of_reads_the_records_trade_id(record: dict[str, Any]) -> None:
    assert tracecodec.trade_id_of(encode_trace(record)) == record["trade_id"]


@pytest.mark.parametrize("blob", [b"", b"\x01", b"\x02A", b"\x00\x06T-", b"\x00\x02\xff"])
def test_trade_id_of_a_truncated_or_corrupt_record_is_none(blob: bytes) -> None:
    # Never an exception: the sink asks it of whatever failed, undecodable records included.
    assert tracecodec.trade_id_of(blob) is None


@settings(max_examples=150, deadline=None)
@given(trace_records, st.data())
def test_truncated_records_are_refused(record: dict[str, Any], data: st.DataObject) -> None:
    encoded = encode_trace(record)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(ValueError):
        tracecodec.decode_trace(encoded[:cut])
    with pytest.raises(ValueError):
        tracecodec.transcode_trace(encoded[:cut])


@pytest.mark.parametrize(
    "corrupt",
    [
        b"",
        b"\x01",  # a negative string length
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a varint longer than a long
        b"\x00\x00\x04",  # signal_id's union branch 2 of 2
        b"\x00\x00\x00\x00\x04",  # Side index 2 of 2
        b"\x00\x00\x00\x00\x00\x3e" + b"\x7f" * 31,  # a decimal of 31 bytes: beyond 28 digits
        b"\x02\xff",  # not UTF-8
    ],
)
def test_corrupt_bytes_are_a_value_error(corrupt: bytes) -> None:
    with pytest.raises(ValueError):
        tracecodec.decode_trace(corrupt)
    with pytest.raises(ValueError):
        tracecodec.transcode_trace(corrupt)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_to_a_full_record_or_a_value_error(blob: bytes) -> None:
    # Anything else (IndexError, struct errors, ...) would escape the sink's handling.
    try:
        record = tracecodec.decode_trace(blob)
    except ValueError:
        return
    assert list(record) == [name for name, _ in tracecodec.FIELDS]


# -- headers.get_ints ----------------------------------------------------------------------------


header_values = st.one_of(
    st.none(),
    st.binary(max_size=6),
    st.integers(-(10**6), 10**6).map(lambda i: str(i).encode()),
    st.text(max_size=6),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "x"]), header_values),
        max_size=8,
    )
)
def test_get_ints_reads_as_get_int(raw: list[tuple[str, Any]]) -> None:
    assert h.get_ints(raw, "a", "b", "c") == [h.get_int(raw, n) for n in ("a", "b", "c")]
    as_dict = dict(raw)
    assert h.get_ints(as_dict, "a", "b") == [h.get_int(as_dict, n) for n in ("a", "b")]
    assert h.get_ints(None, "a") == [None]


# -- transcode_trace: the JSON in one pass -------------------------------------------------------


def _slow(data: bytes) -> tuple[bytes, str, int]:
    record = tracecodec.decode_trace(data)
    close = (record["close_time"] - _EPOCH) // timedelta(milliseconds=1)
    return records.to_json_bytes(record), record["trade_id"], close


@settings(max_examples=300, deadline=None)
@given(trace_records)
def test_transcodes_exactly_as_decode_then_render(record: dict[str, Any]) -> None:
    data = encode_trace(record)
    assert tracecodec.transcode_trace(data) == _slow(data)
    # Again: the second time the times and decimals come from the renderer's caches.
    assert tracecodec.transcode_trace(data) == _slow(data)


@pytest.mark.parametrize(
    "when",
    [
        datetime(1000, 1, 1, tzinfo=UTC),  # first minute written in one pass
        datetime(999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC),  # the general path
        datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 1000, tzinfo=UTC),  # before the epoch
        datetime(2028, 2, 29, 12, 0, tzinfo=UTC),
    ],
)
def test_transcodes_the_edges_of_time_as_the_renderer(when: datetime) -> None:
    record = validate_record_with(open_time=when, close_time=when)
    data = encode_trace(record)
    assert tracecodec.transcode_trace(data) == _slow(data)


def validate_record_with(**values: Any) -> dict[str, Any]:
    record = project(validate_trade(sample_trade(1, seed=1)))
    record.update(values)
    return record


@pytest.mark.parametrize("seed", range(40))
def test_realistic_records_transcode_as_they_render(seed: int) -> None:
    data = encode_trace(project(validate_trade(sample_trade(seed, seed=seed))))
    body, trade_id, close_ms = tracecodec.transcode_trace(data)
    record = tracecodec.decode_trace(data)
    assert body == records.to_json_bytes(record) == _reference_json(record)
    assert trade_id == record["trade_id"]
    assert close_ms == int(record["close_time"].timestamp() * 1000)


def _zigzag(n: int) -> bytes:
    """An Avro long."""
    value = (n << 1) ^ (n >> 63)
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_a_time_beyond_year_9999_is_a_value_error_for_both_readers() -> None:
    sentinel = datetime(2033, 5, 18, 3, 33, 20, 123_000, tzinfo=UTC)
    data = encode_trace(validate_record_with(open_time=sentinel, close_time=sentinel))
    sentinel_ms = (sentinel - _EPOCH) // timedelta(milliseconds=1)
    assert data.count(_zigzag(sentinel_ms)) == 2
    beyond_9999 = data.replace(_zigzag(sentinel_ms), _zigzag(2**60))
    with pytest.raises(ValueError, match="out of range"):
        tracecodec.decode_trace(beyond_9999)
    with pytest.raises(ValueError, match="out of range"):
        tracecodec.transcode_trace(beyond_9999)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_transcode_as_they_decode_or_are_a_value_error(blob: bytes) -> None:
    try:
        expected = _slow(blob)
    except ValueError:
        with pytest.raises(ValueError):
            tracecodec.transcode_trace(blob)
        return
    assert tracecodec.transcode_trace(blob) == expected


def test_a_delivery_from_trace_bytes_decodes_its_record_only_when_asked() -> None:
    record = validate_record_with()
    data = encode_trace(record)
    body, trade_id, close_ms = tracecodec.transcode_trace(data)
    delivery = Delivery.from_trace(data, body, close_ms, "at_x", 2, 5, ("t", 1, 9))
    assert delivery._record is None  # the webhook path never needs it
    assert delivery.json_body() is body and delivery.close_ms == close_ms
    _same(delivery.record, tracecodec.decode_trace(data))
    again = delivery.with_attempt(3)
    assert (again.attempt, delivery.attempt) == (3, 2)
    assert again.json_body() is body and again.source == ("t", 1, 9)
    # Built from a record, the JSON and close time come from it.
    plain = Delivery(tracecodec.decode_trace(data), "at_x", 1, 5)
    assert plain.json_body() == body and plain.close_ms == close_ms
    assert trade_id not in repr(plain)
