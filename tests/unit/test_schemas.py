"""The Avro schemas: they parse, TraceRecord stays an allow-list, and evolution stays compatible."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.read import SchemaResolutionError
from fastavro.utils import generate_many

from consumer.records import TRACE_RECORD_SCHEMA, TRADE_CLOSED_SCHEMA, schemas_dir
from consumer.samples import sample_trade, to_avro_dict
from consumer.trade import PERSONAL_FIELDS, TRACE_FIELDS, TradeClosed, project, validate_trade

# Written out here, not imported: changing what auto-trace publishes must change this test too,
# in a diff a reviewer sees (DESIGN.md "Personal data").
TRACE_ALLOW_LIST = {
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
}


def _raw(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _field_names(schema: Any) -> list[str]:
    return [field["name"] for field in schema["fields"]]


def _all_schema_files() -> list[Path]:
    return sorted(schemas_dir().rglob("*.avsc"))


def _history_files() -> list[Path]:
    return sorted((schemas_dir() / "history").glob("*.avsc"))


def _current_for(history_file: Path) -> Path:
    """``history/trace_record.v1.avsc`` -> ``trace_record.avsc``."""
    return schemas_dir() / (history_file.name.split(".v")[0] + ".avsc")


def test_schema_files_exist() -> None:
    names = {p.name for p in _all_schema_files()}
    assert {TRACE_RECORD_SCHEMA, TRADE_CLOSED_SCHEMA} <= names
    assert _history_files(), "schemas/history/ holds every published version"


@pytest.mark.parametrize("path", _all_schema_files(), ids=lambda p: p.name)
def test_every_schema_parses(path: Path) -> None:
    fastavro.parse_schema(_raw(path), named_schemas={})


def test_trace_record_is_exactly_the_allow_list() -> None:
    fields = _field_names(_raw(schemas_dir() / TRACE_RECORD_SCHEMA))
    assert set(fields) == TRACE_ALLOW_LIST
    assert len(fields) == len(set(fields))
    assert tuple(fields) == TRACE_FIELDS  # the projection copies exactly these, in this order


def test_trace_record_has_no_personal_field() -> None:
    for path in [schemas_dir() / TRACE_RECORD_SCHEMA, *_history_files()]:
        if path.name.startswith("trace_record"):
            assert not set(_field_names(_raw(path))) & set(PERSONAL_FIELDS), path.name


def test_personal_fields_are_the_ones_the_contract_marks() -> None:
    contract = _raw(schemas_dir() / TRADE_CLOSED_SCHEMA)
    marked = {f["name"] for f in contract["fields"] if "PERSONAL" in f.get("doc", "")}
    assert marked == set(PERSONAL_FIELDS)


def test_model_mirrors_the_contract() -> None:
    contract = _field_names(_raw(schemas_dir() / TRADE_CLOSED_SCHEMA))
    assert list(TradeClosed.model_fields) == contract


# --- schema evolution guard --------------------------------------------------------------------


def _resolve(writer: Any, reader: Any, records: list[dict[str, Any]]) -> list[Any]:
    """Write with one schema, read with another: what a consumer on the new schema does."""
    parsed_writer = fastavro.parse_schema(writer, named_schemas={})
    parsed_reader = fastavro.parse_schema(reader, named_schemas={})
    out = []
    for record in records:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed_writer, record)
        buf.seek(0)
        out.append(fastavro.schemaless_reader(buf, parsed_writer, parsed_reader))
    return out


def _generated(schema: Any, count: int) -> list[dict[str, Any]]:
    """Arbitrary records of any schema, reproducibly (fastavro draws from the global random)."""
    state = random.getstate()
    random.seed(20261126)
    try:
        return list(generate_many(fastavro.parse_schema(schema, named_schemas={}), count))
    finally:
        random.setstate(state)


def _realistic(schema: Any) -> Iterator[dict[str, Any]]:
    """Sample trades, as far as the old schema has their fields (others take its defaults)."""
    names = set(_field_names(schema))
    for i in range(20):
        trade = sample_trade(i)
        full = (
            project(validate_trade(trade))
            if schema["name"] == "TraceRecord"
            else to_avro_dict(trade)
        )
        yield {k: v for k, v in full.items() if k in names}


@pytest.mark.parametrize("history_file", _history_files(), ids=lambda p: p.name)
def test_old_schema_records_read_with_current_schema(history_file: Path) -> None:
    old = _raw(history_file)
    current = _raw(_current_for(history_file))
    records = _generated(old, 50)
    current_types = {f["name"]: f["type"] for f in current["fields"]}
    if all(current_types.get(f["name"]) == f["type"] for f in old["fields"]):
        # Today's samples fit the old schema: check realistic values too, not only random ones.
        records += list(_realistic(old))
    read = _resolve(old, current, records)
    assert len(read) == len(records)
    current_names = set(_field_names(current))
    assert all(set(r) == current_names for r in read)


def test_every_current_schema_has_a_history_version() -> None:
    """A schema change without a history entry would leave the evolution guard blind to it."""
    for name in (TRACE_RECORD_SCHEMA, TRADE_CLOSED_SCHEMA):
        versions = [p for p in _history_files() if _current_for(p).name == name]
        assert versions, f"no schemas/history/ version of {name}"


def test_guard_catches_an_added_required_field() -> None:
    old = _raw(schemas_dir() / "history" / "trace_record.v1.avsc")
    incompatible = _raw(schemas_dir() / TRACE_RECORD_SCHEMA)
    incompatible["fields"].append({"name": "strategy", "type": "string"})  # no default
    with pytest.raises(SchemaResolutionError):
        _resolve(old, incompatible, _generated(old, 1))


def test_guard_catches_a_changed_field_type() -> None:
    old = _raw(schemas_dir() / "history" / "trade_closed.v1.avsc")
    incompatible = _raw(schemas_dir() / TRADE_CLOSED_SCHEMA)
    for field in incompatible["fields"]:
        if field["name"] == "trade_id":
            field["type"] = "long"
    with pytest.raises(SchemaResolutionError):
        _resolve(old, incompatible, _generated(old, 1))


def test_guard_accepts_an_added_field_with_a_default() -> None:
    old = _raw(schemas_dir() / "history" / "trace_record.v1.avsc")
    evolved = _raw(schemas_dir() / TRACE_RECORD_SCHEMA)
    evolved["fields"].append({"name": "strategy", "type": ["null", "string"], "default": None})
    (read,) = _resolve(old, evolved, _generated(old, 1))
    assert read["strategy"] is None
