"""Ingest's fast paths may only decline or agree, byte for byte, with the pydantic path.

Every property runs against both fast paths: the Python one (:mod:`consumer.fastpath`) and the
native one (``native/``, when installed; tests/unit/test_native.py fails its absence under
``make test``). Where a test says a form must take the fast path, it must take both.

The reference is the pydantic path exactly as ingest runs it (JsonDecoder → validate_not_future
→ project → encode_trace, key and headers as ingest builds them). Inputs are JSON texts built
here field by field, so that numbers, escapes, duplicate keys and broken syntax can be written
as they would arrive; generated trades start from :func:`consumer.samples.sample_trade`.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bench.data import trade_pool, trade_records
from consumer import fastpath
from consumer.config import load_settings
from consumer.decode import JsonDecoder
from consumer.errors import InputError
from consumer.fastpath import JsonFastPath
from consumer.health import Health
from consumer.ingest import IngestStage, trace_headers, traced_path
from consumer.metrics import Metrics
from consumer.native import FastPath, load_native
from consumer.records import encode_trace
from consumer.samples import DEFAULT_START_MS, sample_trade, to_json
from consumer.trade import MIN_TIME_MS, epoch_ms, project, record_key, validate_not_future

SKEW_MS = 300_000
WINDOW_MS = 7_000
#: Ten days after the samples' first close time: samples 0..10**5 are all in the past.
NOW_MS = DEFAULT_START_MS + 10 * 86_400_000
#: An open time before every close time the tests write.
OPEN = "2026-11-01T00:00:00Z"
DECODER = JsonDecoder()
FAST = JsonFastPath(max_bytes=DECODER.max_bytes, skew_ms=SKEW_MS)
_NATIVE = load_native(max_bytes=DECODER.max_bytes, skew_ms=SKEW_MS, window_ms=WINDOW_MS)
#: Every fast path installed, by name.
FASTS: dict[str, FastPath] = {"python": FAST, **({"native": _NATIVE} if _NATIVE else {})}

Result = tuple[bytes, bytes, int, bytes]


def pydantic_path(raw: bytes, now: int = NOW_MS) -> Result | None:
    """What ingest's pydantic path produces for ``raw``, or None when it dead-letters it."""
    try:
        trade = DECODER.decode(raw)
        validate_not_future(trade, now, SKEW_MS)
        record = project(trade)
    except InputError:
        return None
    return (
        encode_trace(record),
        record_key(trade),
        epoch_ms(record["close_time"]),
        (record["trade_id"].encode()),
    )


def check(raw: bytes, now: int = NOW_MS) -> Result | None:
    """The property, for one input: every fast path declines, or gives the reference's output.

    Returns their common output when every fast path took the record, None when any declined.
    Each is called twice: the first call may fill the Python path's memo tables, the second
    reads them.
    """
    reference = pydantic_path(raw, now)
    results = []
    for name, fast in FASTS.items():
        traced = traced_path(fast, WINDOW_MS)
        assert traced is not None
        for _ in range(2):
            out = fast(raw, now)
            if out is not None:
                assert reference is not None, f"{name} fast path accepted what pydantic rejects"
                assert out == reference, name
            # What ingest really produces (the native module builds the headers itself).
            with_headers = traced(raw, now)
            if out is None:
                assert with_headers is None, name
            else:
                assert with_headers == (
                    out[0],
                    out[1],
                    trace_headers(out[2], WINDOW_MS),
                ), name
        results.append(out)
    return None if None in results else results[0]


def as_fields(trade: dict[str, Any], ensure_ascii: bool = False) -> list[tuple[str, str]]:
    """(key, JSON text of the value) pairs, to be edited and joined by :func:`json_text`."""
    return [(k, json.dumps(v, ensure_ascii=ensure_ascii)) for k, v in trade.items()]


def json_text(fields: list[tuple[str, str]], ensure_ascii: bool = False) -> bytes:
    body = ",".join(f"{json.dumps(k, ensure_ascii=ensure_ascii)}:{v}" for k, v in fields)
    return ("{" + body + "}").encode("utf-8", "surrogatepass")


def sample(i: int, close_time_ms: int | None = None, **changes: Any) -> dict[str, Any]:
    data = sample_trade(i, seed=11, close_time_ms=close_time_ms)
    data.update(changes)
    return data


def raw_sample(i: int = 3, **changes: Any) -> bytes:
    return to_json(sample(i, **changes))


# -- what the fast path must handle (or the speed-up is fictional) --------------------------


def test_every_benchmark_record_takes_the_fast_path_with_identical_output() -> None:
    close_start = NOW_MS - 10_000
    pool = trade_pool(close_start, size=300)
    for _key, raw, _headers in trade_records(pool, 1000, close_start):
        assert check(raw) is not None
        assert check(raw) == pydantic_path(raw)


def test_every_sample_trade_takes_the_fast_path() -> None:
    for i in range(2000):
        raw = to_json(sample_trade(i, seed=5))
        assert check(raw) is not None, i


@pytest.mark.parametrize(
    "changes",
    [
        {"volume": "0.01000000"},  # 8 fractional digits
        {"profit_loss": "-0.00"},  # negative zero
        {"profit_loss": "-0"},
        {"swap": "0"},
        {"commission": "-1.28"},  # negative power of two (fastavro's extra byte)
        {"commission": "-0.00000128"},
        {"entry_price": "99999999999999999999.99999999"},  # 28 digits
        {"exit_price": "-99999999999999999999.99999999"},
        {"entry_price": "00001950.5"},
        {"close_time": "2026-12-06T09:00:00Z", "open_time": OPEN},
        {"close_time": "2026-12-06T09:00:00.1Z", "open_time": OPEN},
        {"close_time": "2026-12-06T09:00:00.123456789Z", "open_time": OPEN},
        {"close_time": "2026-12-06T09:00:00.9999999Z", "open_time": OPEN},
        {"close_time": "2026-12-06T09:00:00+00:00", "open_time": OPEN},
        {"close_time": "2026-12-06T09:00:00.25Z", "open_time": "2026-12-06T09:00:00.250Z"},
        {"close_time": 1_795_687_200_123, "open_time": MIN_TIME_MS},
        {"open_time": "2024-02-29T23:59:59.999Z"},  # leap day
        {"signal_id": ""},
        {"signal_id": None},
        {"trade_id": " T-1 "},  # kept as given, not stripped
        {"trade_id": "T" * 200},  # a length over one varint byte
        {"instrument": "ÄÖÜ€😀"},
        {"user_name": " "},  # personal: only "not empty", never stripped
        {"comment": None, "client_ip": None},
        {"close_reason": None},
        {"close_reason": "EXPIRY", "side": "SELL"},
        {"unknown": "ignored", "another": 12345678901234567890123},
        {"event_id": "5F0C3A5E-8D4E-4B8A-9A7E-0A1B2C3D4E5F"},
    ],
)
def test_plain_variants_take_the_fast_path(changes: dict[str, Any]) -> None:
    raw = raw_sample(close_time_ms=NOW_MS - 1000, **changes)
    assert pydantic_path(raw) is not None
    assert check(raw) is not None


def test_json_numbers_for_decimals_take_the_fast_path() -> None:
    fields = dict(as_fields(sample(4)))
    fields.update(volume="0.5", entry_price="1950.50", exit_price="2", swap="-0.0", commission="-7")
    raw = json_text(list(fields.items()))
    assert check(raw) is not None


def test_escaped_text_and_ensure_ascii_json_take_the_fast_path() -> None:
    trade = sample(8, user_name="Zoë Müller", instrument="XAU\u00e9", trade_id='T"\\/1')
    raw = json_text(as_fields(trade, ensure_ascii=True), ensure_ascii=True)
    assert b"\\u00e9" in raw
    assert check(raw) is not None


def test_a_duplicate_key_counts_once_with_its_last_value_in_both_paths() -> None:
    fields = as_fields(sample(9))
    good = check(json_text([*fields, ("trade_id", '"T-last"')]))
    assert good is not None
    assert good[3] == b"T-last"
    # The last value broken: both must reject, whatever the first one was.
    assert check(json_text([*fields, ("volume", '"0"')])) is None
    assert pydantic_path(json_text([*fields, ("volume", '"0"')])) is None


# -- what the fast path must decline (the pydantic path decides) ----------------------------


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("not UTF-8 in an unknown field", raw_sample()[:-1] + b',"x":"\xff"}'),
        ("UTF-8 encoded surrogate", raw_sample()[:-1] + b',"x":"\xed\xa0\x80"}'),
        ("NaN in an unknown field", raw_sample()[:-1] + b',"x":NaN}'),
        ("Infinity in an unknown field", raw_sample()[:-1] + b',"x":-Infinity}'),
        ("over Python's int digit limit", raw_sample()[:-1] + b',"x":' + b"7" * 4400 + b"}"),
        ("nested too deep", raw_sample()[:-1] + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("byte order mark", b"\xef\xbb\xbf" + raw_sample()),
        ("trailing comma", raw_sample()[:-1] + b",}"),
        ("two documents", raw_sample() + b"{}"),
        ("empty", b""),
        ("array", b"[" + raw_sample() + b"]"),
    ],
)
def test_input_the_stdlib_parser_refuses_is_declined(name: str, raw: bytes) -> None:
    assert pydantic_path(raw) is None, name
    assert check(raw) is None, name


def _spaced(raw: bytes) -> bytes:
    """The same record with JSON's four whitespace characters between its tokens."""
    return (
        json.dumps(json.loads(raw), indent="\t", separators=(" ,", " : "))
        .replace("\n", "\r\n")
        .encode()
        + b" \n"
    )


_HEAD = raw_sample()[:-1]  # a valid record without its closing brace


@pytest.mark.parametrize(
    ("name", "raw", "valid"),
    [
        ("number forms", _HEAD + b',"x":-0,"y":1E5,"z":0.5e-3,"w":12.0E+2,"v":0}', True),
        ("literals", _HEAD + b',"x":true,"y":false,"z":null}', True),
        ("whitespace", _spaced(raw_sample()), True),
        ("an escape (the serde parse decides)", _HEAD + b',"x":"a\\"b"}', True),
        ("an empty key", _HEAD + b',"":1}', True),
        ("leading zero", _HEAD + b',"x":01}', False),
        ("no digit after the point", _HEAD + b',"x":1.}', False),
        ("a lone minus", _HEAD + b',"x":-}', False),
        ("no exponent digit", _HEAD + b',"x":1e}', False),
        ("no exponent digit after the sign", _HEAD + b',"x":1e+}', False),
        ("no digit before the point", _HEAD + b',"x":.5}', False),
        ("a plus sign", _HEAD + b',"x":+1}', False),
        ("two numbers", _HEAD + b',"x":1-2}', False),
        ("a short literal", _HEAD + b',"x":nul}', False),
        ("a long literal", _HEAD + b',"x":truex}', False),
        ("no colon", _HEAD + b',"x" 1}', False),
        ("no comma", _HEAD + b' "x":1}', False),
        ("a bare key", _HEAD + b",x:1}", False),
        ("a control character in a string", _HEAD + b',"x":"a\x01b"}', False),
        ("an unterminated string", _HEAD + b',"x":"abc', False),
        ("text after the object", raw_sample() + b"x", False),
    ],
)
def test_the_quick_scan_reads_json_as_the_stdlib_does(name: str, raw: bytes, valid: bool) -> None:
    # The native fast path reads the usual record in one pass of its own and leaves anything
    # else to serde_json: each form on either side of the grammar's edges.
    assert (pydantic_path(raw) is not None) == valid, name
    assert (check(raw) is not None) == valid, name


@pytest.mark.parametrize(
    ("stop", "valid"),
    [
        (b'\\"', True),  # an escaped quote: the serde parse decides
        (b"\\\\", True),  # an escaped backslash
        (b"\x1f", False),  # a control character
        (b"\x00", False),
        (b"\xc3\xa9", True),  # non-ASCII: no stop
        (b"\x7f", True),  # DEL is not a control character to JSON
        (b" ", True),  # the smallest byte that is not one
    ],
)
def test_a_string_ends_where_the_stdlib_says_at_any_offset(stop: bytes, valid: bool) -> None:
    # The native scan looks for a string's end sixteen bytes at a time while sixteen remain,
    # then eight, then one: put each kind of byte at every offset of a block, in a string at the
    # record's start (long blocks) and at its end (the short ones).
    for before in range(34):
        for field in ("instrument", "trade_id"):  # both are copied to the output
            pair = b'"' + field.encode() + b'":"' + b"a" * before + stop + b"b" * (before % 5)
            pair += b'Z"'
            for raw in (b"{" + pair + b"," + _HEAD[1:] + b"}", _HEAD + b"," + pair + b"}"):
                assert (pydantic_path(raw) is not None) == valid, (before, field, raw)
                assert (check(raw) is not None) == valid, (before, field, raw)


def test_an_event_id_is_a_uuid_in_every_position() -> None:
    # The native check reads the dashes and the hex digits separately: a wrong byte anywhere,
    # and a dash anywhere else, is declined by both sides.
    uuid = "5f0c3a5e-8d4e-4b8a-9a7e-0a1b2c3d4e5F"
    assert check(raw_sample(event_id=uuid)) is not None
    for i in range(len(uuid)):
        for wrong in ("g", "-", "/", ":", "@", "G", "`"):
            if uuid[i] == wrong:
                continue
            changed = uuid[:i] + wrong + uuid[i + 1 :]
            assert check(raw_sample(event_id=changed)) is None, changed
    assert check(raw_sample(event_id=uuid + "0")) is None
    assert check(raw_sample(event_id=uuid[:-1])) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"volume": "0"},
        {"volume": "-0.01"},
        {"volume": 0},
        {"volume": "-0.00032767"},  # first byte 0x80: negative
        {"volume": "-1.28"},
        {"entry_price": "1.123456789"},  # 9 fractional digits
        {"entry_price": "100000000000000000000"},  # 21 integer digits
        {"entry_price": 10**20},
        {"entry_price": True},
        {"entry_price": None},
        {"entry_price": "1,5"},
        {"entry_price": "١٢"},  # Arabic-Indic digits: Decimal() takes them, the contract not
        {"entry_price": " 1.5"},
        {"entry_price": "NaN"},
        {"entry_price": "1_000"},
        {"close_time": "2026-12-06T09:00:00", "open_time": OPEN},  # naive
        {"close_time": "2026-02-30T10:00:00Z", "open_time": "2026-01-01T00:00:00Z"},
        {"close_time": "2026-12-06T24:00:00Z", "open_time": OPEN},
        {"close_time": "2026-12-06T09:00:60Z", "open_time": OPEN},
        {"close_time": 946_684_799_999},  # 1999
        {"open_time": "1999-12-31T23:59:59.999Z"},
        {"close_time": 1_795_687_200},  # epoch seconds
        {"close_time": True},
        {"open_time": "2026-11-26T10:00:00.001Z", "close_time": "2026-11-26T10:00:00.000Z"},
        {"close_time_ms": NOW_MS + SKEW_MS + 1},  # further ahead than the skew
        {"event_id": "not-a-uuid"},
        {"event_id": "{5f0c3a5e-8d4e-4b8a-9a7e-0a1b2c3d4e5f}"},
        {"trade_id": ""},
        {"trade_id": " \u00a0\t"},
        {"trade_id": "\x1c\x1f"},  # space to Python's isspace(), not to Unicode's White_Space
        {"instrument": "\u3000\u2029"},
        {"trade_id": 17},
        {"signal_id": " "},
        {"signal_id": 5},
        {"instrument": ""},
        {"account_id": ""},
        {"user_email": None},
        {"user_id": 12345},
        {"client_ip": 1},
        {"comment": ["x"]},
        {"side": "buy"},
        {"side": "BUY "},
        {"close_reason": "take_profit"},
        {"close_reason": ""},
        {"currency": "usd"},
        {"currency": "XTS"},
    ],
)
def test_a_broken_rule_is_declined(changes: dict[str, Any]) -> None:
    close = changes.pop("close_time_ms", NOW_MS - 1000)
    raw = raw_sample(close_time_ms=close, **changes)
    assert pydantic_path(raw) is None
    assert check(raw) is None


@pytest.mark.parametrize(
    "tail", [":60.000Z", ":5a.000Z", ":00.0000", ":00,000Z", ":00.000+", ":00.00Z0", "+00.000Z"]
)
def test_a_known_minute_does_not_excuse_a_broken_tail(tail: str) -> None:
    minute = "2026-12-06T09:00"
    valid = raw_sample(close_time_ms=NOW_MS - 1000, close_time=minute + ":00.000Z", open_time=OPEN)
    assert check(valid) is not None  # the minute is now in the memo
    assert minute in fastpath._MINUTES
    broken = raw_sample(close_time_ms=NOW_MS - 1000, close_time=minute + tail, open_time=OPEN)
    assert pydantic_path(broken) is None
    assert check(broken) is None


@pytest.mark.parametrize("field", ["event_id", "trade_id", "account_id", "user_name", "side"])
def test_a_missing_required_field_is_declined(field: str) -> None:
    trade = sample(2)
    del trade[field]
    assert check(to_json(trade)) is None


def test_forms_left_to_pydantic_are_declined_even_when_valid() -> None:
    """Not a rule, a scope: these are valid, and the fast path leaves them to the model."""
    for changes in (
        {"volume": "1e-2"},
        {"volume": "+1"},
        {"volume": ".5"},
        {"close_time": "2026-12-06t09:00:00Z", "open_time": OPEN},
        {"close_time": "2026-12-06T10:00:00+01:00", "open_time": OPEN},
        {"close_time": "2026-12-06T09:00:00.250-00:00", "open_time": OPEN},
        {"comment": "has a { bracket"},
    ):
        raw = raw_sample(close_time_ms=NOW_MS - 1000, **changes)
        assert pydantic_path(raw) is not None, changes
        assert check(raw) is None, changes
    # A lone surrogate escape in a free-text field: stdlib json takes it, msgspec does not.
    fields = [*as_fields(sample(3, close_time_ms=NOW_MS - 1000)), ("comment", '"x \\ud800"')]
    raw = json_text(fields)
    assert pydantic_path(raw) is not None
    assert check(raw) is None


@pytest.mark.parametrize("kind", ["python", "native"])
def test_a_record_over_the_decoder_limit_is_declined(kind: str) -> None:
    raw = raw_sample(close_time_ms=NOW_MS - 1000)
    if kind not in FASTS:
        pytest.skip("the native fast path is not installed (tests/unit/test_native.py says why)")
    make = JsonFastPath if kind == "python" else load_native
    small, fits = (make(max_bytes=n, skew_ms=SKEW_MS) for n in (len(raw) - 1, len(raw)))
    assert small is not None and fits is not None
    assert small(raw, NOW_MS) is None
    assert fits(raw, NOW_MS) is not None


# -- properties ------------------------------------------------------------------------------

_DIGITS = st.text("0123456789", min_size=0, max_size=23)


@st.composite
def decimal_texts(draw: st.DrawFn) -> str:
    """Decimal-looking JSON texts: numbers and strings, valid and near-valid."""
    sign = draw(st.sampled_from(["", "", "-", "+"]))
    whole = draw(_DIGITS)
    frac = draw(st.none() | _DIGITS)
    exponent = draw(st.sampled_from(["", "", "", "e2", "E-3", "e+0"]))
    text = sign + whole + ("" if frac is None else "." + frac) + exponent
    if draw(st.booleans()):
        return json.dumps(text)
    try:
        json.loads(text)
    except ValueError:
        return json.dumps(text)
    return text  # a valid JSON number, written as one


@st.composite
def time_texts(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 4)) == 0:
        ms = draw(st.integers(MIN_TIME_MS - 5, NOW_MS + SKEW_MS + 5) | st.integers(-5, 10**14))
        return str(ms)
    year = draw(st.sampled_from([1999, 2000, 2024, 2026]))
    month = draw(st.integers(0, 13))
    day = draw(st.integers(0, 32))
    hour, minute, second = (
        draw(st.integers(0, 25)),
        draw(st.integers(0, 61)),
        draw(st.integers(0, 61)),
    )
    sep = draw(st.sampled_from(["T", "T", "t", " "]))
    frac = draw(
        st.sampled_from(["", ".", ".5", ".25", ".250", ".1234", ".123456789", ".1234567891"])
    )
    offset = draw(st.sampled_from(["Z", "Z", "z", "+00:00", "-00:00", "+01:00", "", "+0000"]))
    text = (
        f"{year:04d}-{month:02d}-{day:02d}{sep}{hour:02d}:{minute:02d}:{second:02d}{frac}{offset}"
    )
    return json.dumps(text)


_TEXTS = st.sampled_from(
    ["", " ", "\u00a0", "x", "T-1", " T ", "é", "😀", "\\ud800", "\\u00e9", 'a\\"b', "x" * 70]
).map(lambda s: '"' + s + '"') | st.sampled_from(["null", "0", "1.5", "true", "[]", "{}"])

_VALUES: dict[str, st.SearchStrategy[str]] = {
    "event_id": st.sampled_from(
        [
            '"5f0c3a5e-8d4e-4b8a-9a7e-0a1b2c3d4e5f"',
            '"5F0C3A5E-8D4E-4B8A-9A7E-0A1B2C3D4E5F"',
            '"5f0c3a5e8d4e4b8a9a7e0a1b2c3d4e5f"',
            '"5f0c3a5e-8d4e-4b8a-9a7e-0a1b2c3d4e5g"',
        ]
    )
    | _TEXTS,
    "side": st.sampled_from(['"BUY"', '"SELL"', '"buy"', '"HOLD"', "0", "null"]),
    "close_reason": st.sampled_from(
        ['"TAKE_PROFIT"', '"STOP_LOSS"', '"MANUAL"', '"MARGIN_CALL"', '"EXPIRY"', "null", '""']
    ),
    "currency": st.sampled_from(['"USD"', '"JPY"', '"usd"', '"XTS"', '"US"', "null", "1"]),
    "open_time": time_texts(),
    "close_time": time_texts(),
}
for _name in ("volume", "entry_price", "exit_price", "profit_loss", "commission", "swap"):
    _VALUES[_name] = decimal_texts() | st.sampled_from(["null", "true", '"NaN"', '" 1"', "1e400"])


@st.composite
def near_valid_json(draw: st.DrawFn) -> bytes:
    """A sample trade, with some fields rewritten, dropped, repeated or added."""
    i = draw(st.integers(0, 10**6))
    trade = sample_trade(i, seed=draw(st.integers(0, 3)), close_time_ms=NOW_MS - i)
    ascii_only = draw(st.booleans())
    fields = as_fields(trade, ensure_ascii=ascii_only)
    for _ in range(draw(st.integers(0, 4))):
        index = draw(st.integers(0, len(fields) - 1))
        name = fields[index][0]
        action = draw(st.sampled_from(["value", "value", "value", "drop", "repeat"]))
        if action == "drop":
            del fields[index]
        else:
            value = draw(_VALUES.get(name, _TEXTS))
            if action == "repeat":
                fields.insert(draw(st.integers(0, len(fields))), (name, value))
            else:
                fields[index] = (name, value)
    if draw(st.booleans()):
        extra = st.sampled_from(['"x"', "123456789012345678901234567890", "[1,{}]", '{"a":null}'])
        fields.append((draw(st.sampled_from(["extra", "nested", "note"])), draw(extra)))
    return json_text(fields, ensure_ascii=ascii_only)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid_json())
@example(json_text(as_fields(sample(1))))
def test_near_valid_trades_are_declined_or_encoded_exactly_as_pydantic_does(raw: bytes) -> None:
    check(raw)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 10**6),
    st.lists(
        st.tuples(
            st.integers(0, 10**4),
            st.sampled_from(["insert", "delete", "replace"]),
            st.binary(min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_corrupted_bytes_are_declined_or_encoded_exactly_as_pydantic_does(
    i: int, edits: list[tuple[int, str, bytes]]
) -> None:
    raw = bytearray(to_json(sample_trade(i, seed=1, close_time_ms=NOW_MS - 5)))
    for position, action, data in edits:
        at = position % (len(raw) + 1)
        if action == "insert":
            raw[at:at] = data
        elif action == "delete":
            del raw[at : at + len(data)]
        else:
            raw[at : at + len(data)] = data
    check(bytes(raw))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 10**6),
    st.integers(-(10**6), 10**6),
    st.sampled_from(["volume", "entry_price", "exit_price", "profit_loss", "commission", "swap"]),
    st.integers(-(10**28), 10**28),
)
def test_every_representable_decimal_encodes_as_fastavro_does(
    i: int, shift_ms: int, field: str, unscaled: int
) -> None:
    sign = "-" if unscaled < 0 else ""
    digits = f"{abs(unscaled):09d}"
    text = f"{sign}{digits[:-8]}.{digits[-8:]}"
    raw = raw_sample(i, close_time_ms=NOW_MS + shift_ms, **{field: text})
    result = check(raw)
    if abs(unscaled) < 10**28 and (field != "volume" or unscaled > 0) and shift_ms <= SKEW_MS:
        assert result is not None


# -- through the stage ---------------------------------------------------------------------


class _Msg:
    def __init__(self, value: bytes | None, offset: int) -> None:
        self._value, self._offset = value, offset

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return b"in-key"

    def topic(self) -> str:
        return "trade.closed"

    def partition(self) -> int:
        return 1

    def offset(self) -> int:
        return self._offset

    def headers(self) -> list[tuple[str, bytes]]:
        return [("h", b"v")]


class _Out:
    def __init__(self) -> None:
        self.produced: list[tuple[str, bytes | None, Any, Any]] = []

    def produce(
        self, topic: str, value: bytes | None, key: Any = None, headers: Any = None
    ) -> None:
        # The dead-letter time differs between runs; everything else must not.
        headers = [(k, v) for k, v in headers if k != "auto-trace-failed-at-ms"]
        self.produced.append((topic, value, key, headers))


def test_ingest_output_is_the_same_with_and_without_the_fast_path() -> None:
    settings_ = load_settings(
        None, delay={"window": "7s", "max_clock_skew": "5m"}, metrics={"port": 0}
    )
    stage = IngestStage(settings_, Metrics(), Health())
    assert stage.fast_path is not None
    rng = random.Random(3)
    raws: list[bytes | None] = []
    for i in range(300):
        raw = raw_sample(i, close_time_ms=NOW_MS - rng.randrange(10**6))
        kind = rng.randrange(6)
        if kind == 0:
            raw = raw.replace(b'"USD"', b'"usd"')
        elif kind == 1:
            raw = raw[:-5]
        raws.append(raw)
    raws.append(None)
    outputs = []
    for fast in (stage.fast_path, None):
        stage.fast_path = fast
        out = _Out()
        for offset, raw in enumerate(raws):
            out.produce(*stage._one(_Msg(raw, offset), NOW_MS))  # type: ignore[arg-type]
        outputs.append(out.produced)
    assert outputs[0] == outputs[1]
    delayed = [p for p in outputs[0] if p[0] == stage.delay_topic]
    assert 100 < len(delayed) < 300  # both kinds of outcome happened
    value, key, close_ms, _ = FAST(raws[0] or b"", NOW_MS) or pytest.fail("declined")
    assert delayed[0] == (
        stage.delay_topic,
        value,
        key,
        trace_headers(close_ms, WINDOW_MS),
    )
    assert trace_headers(close_ms, WINDOW_MS) == [
        ("auto-trace-due-ms", str(close_ms + WINDOW_MS).encode())
    ]


def test_ingest_takes_the_native_headers_only_when_built_for_its_window() -> None:
    if _NATIVE is None:
        pytest.skip("the native module is not installed (tests/unit/test_native.py says so)")
    assert traced_path(_NATIVE, WINDOW_MS) == _NATIVE.traced  # type: ignore[attr-defined]
    other = traced_path(_NATIVE, WINDOW_MS + 1)
    assert other is not None and other != _NATIVE.traced  # type: ignore[attr-defined]
    raw = raw_sample()
    value, key, close_ms, _ = _NATIVE(raw, NOW_MS) or pytest.fail("declined")
    assert other(raw, NOW_MS) == (value, key, trace_headers(close_ms, WINDOW_MS + 1))
    settings_ = load_settings(None, delay={"window": "7s"}, metrics={"port": 0})
    stage = IngestStage(settings_, Metrics(), Health())
    assert stage.fast_path_name == "native"
    assert stage._traced == stage.fast_path.traced  # type: ignore[union-attr]


@pytest.mark.parametrize("window_ms", [0, 1, 86_400_000, -NOW_MS, -(2**62)])
def test_the_native_header_digits_are_pythons(window_ms: int) -> None:
    # The due header's digits are written natively; a negative due never comes from settings
    # (the window is a positive duration) but the sign must still come out right.
    native = load_native(max_bytes=DECODER.max_bytes, skew_ms=SKEW_MS, window_ms=window_ms)
    if native is None:
        pytest.skip("the native module is not installed (tests/unit/test_native.py says so)")
    raw = raw_sample()
    value, key, close_ms, _ = native(raw, NOW_MS) or pytest.fail("declined")
    expected = (value, key, trace_headers(close_ms, window_ms))
    assert native.traced(raw, NOW_MS) == expected  # type: ignore[attr-defined]


def test_only_the_plain_json_decoder_gets_the_fast_path() -> None:
    class Stricter(JsonDecoder):
        def _parse(self, value: bytes) -> Any:
            raise InputError("refuses everything")

    settings_ = load_settings(None, metrics={"port": 0})
    assert IngestStage(settings_, Metrics(), Health(), decoder=Stricter()).fast_path is None


def test_memo_tables_stay_bounded() -> None:
    for k in range(fastpath._MEMO_MAX + 10):
        assert fastpath._decimal(f"1.{k:08d}") is not None
    assert 0 < len(fastpath._DECIMALS) <= fastpath._MEMO_MAX
    assert check(raw_sample(close_time_ms=NOW_MS - 1)) is not None


@settings(max_examples=300, deadline=None)
@given(
    st.integers(MIN_TIME_MS, NOW_MS + SKEW_MS),
    st.integers(0, 9),
    st.sampled_from(["Z", "+00:00", "int"]),
    st.integers(0, 10**6),
)
def test_every_plain_time_is_accepted_as_the_same_millisecond(
    ms: int, digits: int, offset: str, i: int
) -> None:
    if offset == "int":
        close: Any = ms
    else:
        seconds = datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        # Digits past the millisecond are noise the model truncates, never rounds.
        fraction = (f"{ms % 1000:03d}" + str(i).rjust(6, "9"))[:digits]
        close = seconds + ("." + fraction if fraction else "") + offset
    raw = raw_sample(i, close_time=close, open_time=MIN_TIME_MS)
    result = check(raw)
    assert result is not None
    kept = 1 if offset == "int" else 10 ** (3 - min(digits, 3))  # ms the text can hold
    assert result[2] == ms - ms % kept
