"""Decoding the three input formats, and how each kind of bad input is classified."""

from __future__ import annotations

import contextlib
import io
import json
import random
import socket
import uuid
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from consumer.config import InputSettings
from consumer.decode import (
    DEFAULT_MAX_BYTES,
    AvroDecoder,
    ConfluentAvroDecoder,
    Decoder,
    JsonDecoder,
    RegistryUnavailable,
    make_decoder,
)
from consumer.errors import DecodeError, InputError, InvalidRecord
from consumer.records import TRADE_CLOSED_SCHEMA, encode_trace, schemas_dir
from consumer.samples import sample_trade, to_avro, to_avro_dict, to_confluent, to_json
from consumer.trade import project

SUBJECT = "trade.closed-value"


def _fresh() -> Any:
    return SchemaRegistryClient.new_client({"url": f"mock://{uuid.uuid4()}"})


@pytest.fixture
def registry() -> Any:
    return _fresh()


@pytest.fixture
def confluent(registry: Any) -> Decoder:
    settings = InputSettings(format="avro-confluent", schema_registry_url="mock://unused")
    return make_decoder(settings, registry=registry)


JSON = make_decoder(InputSettings(format="json"))
AVRO = make_decoder(InputSettings(format="avro"))


def _contract() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((schemas_dir() / TRADE_CLOSED_SCHEMA).read_text())
    return loaded


def _register(registry: Any, schema: dict[str, Any] | str, schema_type: str = "AVRO") -> int:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    schema_id: int = registry.register_schema(f"s-{uuid.uuid4()}", Schema(text, schema_type))
    return schema_id


def _frame(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def _avro_with(schema: dict[str, Any], trade: dict[str, Any]) -> bytes:
    """The trade written with another version of the contract (a platform on its own release)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(
        buf, fastavro.parse_schema(schema, named_schemas={}), to_avro_dict(trade)
    )
    return buf.getvalue()


def test_make_decoder_picks_the_format(registry: Any) -> None:
    assert isinstance(JSON, JsonDecoder)
    assert isinstance(AVRO, AvroDecoder)
    settings = InputSettings(format="avro-confluent", schema_registry_url="mock://x")
    assert isinstance(make_decoder(settings, registry=registry), ConfluentAvroDecoder)
    assert isinstance(make_decoder(settings), ConfluentAvroDecoder)  # builds its own client
    assert JSON.max_bytes == DEFAULT_MAX_BYTES == 1024 * 1024


def test_the_three_formats_project_to_identical_bytes(registry: Any, confluent: Decoder) -> None:
    for i in range(200):
        trade = sample_trade(i, seed=5)
        outputs = {
            encode_trace(project(JSON.decode(to_json(trade)))),
            encode_trace(project(AVRO.decode(to_avro(trade)))),
            encode_trace(project(confluent.decode(to_confluent(trade, registry, SUBJECT)))),
        }
        assert len(outputs) == 1, trade["trade_id"]


def test_json_numbers_and_epoch_ms_decode_like_strings() -> None:
    trade = sample_trade(3)
    as_strings = JSON.decode(to_json(trade))
    numeric = dict(trade)
    raw = to_json(numeric)
    for name in ("volume", "entry_price", "exit_price", "profit_loss", "commission", "swap"):
        raw = raw.replace(f'"{name}":"{trade[name]}"'.encode(), f'"{name}":{trade[name]}'.encode())
    raw = raw.replace(
        f'"close_time":"{trade["close_time"]}"'.encode(),
        f'"close_time":{int(as_strings.close_time.timestamp() * 1000)}'.encode(),
    )
    assert b'"volume":"' not in raw and b'"close_time":"' not in raw
    assert encode_trace(project(JSON.decode(raw))) == encode_trace(project(as_strings))


# --- not decodable -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, b""])
def test_no_value_is_a_decode_error(value: bytes | None, confluent: Decoder) -> None:
    for decoder in (JSON, AVRO, confluent):
        with pytest.raises(DecodeError):
            decoder.decode(value)


def test_oversized_record_is_refused_before_parsing() -> None:
    decoder = JsonDecoder(max_bytes=1000)
    small = to_json(sample_trade(1))
    decoder.decode(small)
    with pytest.raises(DecodeError, match="over the 1000-byte limit"):
        decoder.decode(small + b" " * (1001 - len(small)))  # valid JSON, but too big
    with pytest.raises(DecodeError, match="limit"):
        JSON.decode(b"[" * (DEFAULT_MAX_BYTES + 1))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"trade_id": "T1",', "invalid JSON"),
        (b"not json at all", "invalid JSON"),
        (b'["a", "list"]', "not an object"),
        (b'"a string"', "not an object"),
        (b"null", "not an object"),
        (b'{"volume": NaN}', "not a finite JSON number"),
        (b'{"volume": -Infinity}', "not a finite JSON number"),
        (b'{"volume": ' + b"9" * 5000 + b"}", "not a finite JSON number"),
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (b'{"user_name": "J\xf6rg"}', "not UTF-8"),
        (b'\xef\xbb\xbf{"a": 1}', "invalid JSON"),
        (b'{"a": 1} {"b": 2}', "invalid JSON"),
    ],
)
def test_undecodable_json(raw: bytes, expected: str) -> None:
    with pytest.raises(DecodeError, match=expected) as info:
        JSON.decode(raw)
    assert not isinstance(info.value, InvalidRecord)
    for word in (b"J\xf6rg", b"trade_id", b"T1", b"a string"):
        assert word.decode("latin-1") not in str(info.value)


def test_random_bytes_are_decode_errors(confluent: Decoder) -> None:
    rng = random.Random(42)
    for _ in range(3000):
        raw = rng.randbytes(rng.randint(1, 600))
        for decoder in (JSON, AVRO, confluent):
            with pytest.raises(InputError):  # almost always DecodeError; never anything else
                decoder.decode(raw)


def test_every_truncation_of_an_avro_record_is_a_decode_error(
    registry: Any, confluent: Decoder
) -> None:
    plain = to_avro(sample_trade(11))
    framed = to_confluent(sample_trade(11), registry, SUBJECT)
    for cut in range(len(plain)):
        with pytest.raises(DecodeError):
            AVRO.decode(plain[:cut])
    for cut in range(len(framed)):
        with pytest.raises(DecodeError):
            confluent.decode(framed[:cut])


def test_trailing_bytes_after_an_avro_record_are_a_decode_error(
    registry: Any, confluent: Decoder
) -> None:
    with pytest.raises(DecodeError, match="left over"):
        AVRO.decode(to_avro(sample_trade(1)) + b"\x00")
    with pytest.raises(DecodeError, match="left over"):
        confluent.decode(to_confluent(sample_trade(1), registry, SUBJECT) + b"\x02\x41")


def test_corrupted_avro_never_escapes_as_a_foreign_error() -> None:
    body = bytearray(to_avro(sample_trade(2)))
    rng = random.Random(7)
    for _ in range(5000):
        mutated = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        # A DecodeError, or an InvalidRecord when the bytes still parse; nothing else.
        with contextlib.suppress(InputError):
            AVRO.decode(bytes(mutated))


def test_avro_error_message_never_quotes_the_bytes() -> None:
    raw = to_avro(sample_trade(4, seed=1))
    with pytest.raises(DecodeError) as info:
        AVRO.decode(raw[:-30])
    assert "@example" not in str(info.value)
    assert len(str(info.value)) < 200


# --- Confluent wire format and the registry ----------------------------------------------------


def test_missing_magic_byte(confluent: Decoder) -> None:
    plain = to_avro(sample_trade(1))
    with pytest.raises(DecodeError, match="magic byte"):
        confluent.decode(plain)
    with pytest.raises(DecodeError, match="magic byte"):
        confluent.decode(b"\x00\x00\x01")
    with pytest.raises(DecodeError, match="magic byte"):
        confluent.decode(b"\x01" + to_confluent(sample_trade(1), _fresh(), SUBJECT)[1:])


def test_unknown_schema_id_is_a_decode_error(confluent: Decoder) -> None:
    with pytest.raises(DecodeError, match="schema id 4242 is not in the registry"):
        confluent.decode(_frame(4242, to_avro(sample_trade(1))))


def test_non_avro_schema_is_a_decode_error(registry: Any, confluent: Decoder) -> None:
    schema_id = _register(registry, '{"type": "object"}', "JSON")
    with pytest.raises(DecodeError, match="not Avro"):
        confluent.decode(_frame(schema_id, b"{}"))


def test_writer_schemas_are_fetched_once_per_id(registry: Any) -> None:
    calls: list[int] = []

    class Counting:
        def get_schema(self, schema_id: int) -> Any:
            calls.append(schema_id)
            return registry.get_schema(schema_id)

    decoder = ConfluentAvroDecoder(Counting())
    raw = to_confluent(sample_trade(1), registry, SUBJECT)
    for _ in range(5):
        decoder.decode(raw)
    assert len(calls) == 1


def test_older_writer_schema_resolves_with_defaults(registry: Any, confluent: Decoder) -> None:
    """A platform on an older contract without the optional fields is still read."""
    older = _contract()
    older["fields"] = [f for f in older["fields"] if f["name"] not in ("comment", "client_ip")]
    schema_id = _register(registry, older)
    trade = sample_trade(9)
    decoded = confluent.decode(_frame(schema_id, _avro_with(older, trade)))
    assert decoded.comment is None and decoded.client_ip is None
    assert encode_trace(project(decoded)) == encode_trace(project(JSON.decode(to_json(trade))))


def test_newer_writer_schema_with_an_extra_field_resolves(
    registry: Any, confluent: Decoder
) -> None:
    newer = _contract()
    newer["fields"].append({"name": "strategy_note", "type": "string", "default": ""})
    schema_id = _register(registry, newer)
    trade = {**sample_trade(2), "strategy_note": "private note about the client"}
    decoded = confluent.decode(_frame(schema_id, _avro_with(newer, trade)))
    assert b"private note" not in encode_trace(project(decoded))


def test_incompatible_writer_schema_is_a_decode_error(registry: Any, confluent: Decoder) -> None:
    incompatible = _contract()
    incompatible["fields"] = [f for f in incompatible["fields"] if f["name"] != "user_email"]
    schema_id = _register(registry, incompatible)
    raw = _frame(schema_id, _avro_with(incompatible, sample_trade(3)))
    with pytest.raises(DecodeError, match=f"schema id {schema_id} does not resolve"):
        confluent.decode(raw)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_registry_is_retriable_not_a_dead_letter() -> None:
    client = SchemaRegistryClient(
        {"url": f"http://127.0.0.1:{_closed_port()}", "max.retries": 0, "timeout": 2}
    )
    decoder = ConfluentAvroDecoder(client)
    with pytest.raises(RegistryUnavailable, match="unreachable") as info:
        decoder.decode(_frame(1, to_avro(sample_trade(1))))
    assert not isinstance(info.value, InputError)


@pytest.mark.parametrize("status", [500, 503, 401])
def test_registry_errors_other_than_not_found_are_retriable(status: int) -> None:
    class Failing:
        def get_schema(self, schema_id: int) -> Any:
            raise SchemaRegistryError(status, status * 100, "boom")

    decoder = ConfluentAvroDecoder(Failing())
    with pytest.raises(RegistryUnavailable, match=f"HTTP {status}"):
        decoder.decode(_frame(1, to_avro(sample_trade(1))))
