"""Input the ingest stage must dead-letter, never publish, never crash on, and never quote.

Every poison record carries the Kafka header ``chaos-poison-id`` (the ingest DLQ keeps the
input's headers), so the check can find each one in ``<prefix>.dlq.ingest`` and compare bytes.
Most are built from a realistic trade and so hold personal values; those values are returned
with the record, and the check makes sure none of them shows up outside the ingest DLQ: a
reason that quoted the bad field, a log line or a metric label would be a leak.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from consumer.samples import PERSONAL_FIELDS, sample_trade, to_avro, to_json

Format = Literal["json", "avro"]

#: The header that names a poison record (kept by ingest on its dead letter).
POISON_HEADER = "chaos-poison-id"

KINDS = ("random-bytes", "truncated-avro", "schema-invalid", "oversized", "tombstone")

#: Ingest refuses input over 1 MiB before parsing; these are well over it.
OVERSIZED_BYTES = (1_200_000, 2_500_000)

#: Seed of the trades poison is made from: different from any valid trade's.
_POISON_SEED = 977


@dataclass
class Poison:
    pid: str
    kind: str
    #: Which variant of the kind (for schema-invalid: which rule it breaks).
    variant: str
    key: bytes | None
    value: bytes | None
    #: Personal values it holds, field -> value (the scan's needles).
    personal: dict[str, str] = field(default_factory=dict)


def _encode(trade: dict[str, Any], fmt: Format) -> bytes:
    return to_json(trade) if fmt == "json" else to_avro(trade)


def _personal(trade: dict[str, Any]) -> dict[str, str]:
    return {f: str(trade[f]) for f in PERSONAL_FIELDS if trade.get(f)}


# Each variant breaks one rule of the contract, several by putting a personal value where a
# published field belongs: the reason must name the field and the rule, never quote the value.
def _bad_currency(t: dict[str, Any]) -> None:
    t["currency"] = t["account_id"]


def _bad_event_id(t: dict[str, Any]) -> None:
    t["event_id"] = t["user_email"]


def _bad_volume(t: dict[str, Any]) -> None:
    t["volume"] = "-" + t["volume"]


def _close_before_open(t: dict[str, Any]) -> None:
    t["open_time"], t["close_time"] = t["close_time"], t["open_time"]


def _close_next_year(t: dict[str, Any]) -> None:
    year = t["close_time"][:4]
    t["close_time"] = str(int(year) + 1) + t["close_time"][4:]


def _empty_trade_id(t: dict[str, Any]) -> None:
    t["trade_id"] = " "


# JSON only: what Avro's encoder cannot even express.
def _bad_side(t: dict[str, Any]) -> None:
    t["side"] = t["user_name"]


def _missing_field(t: dict[str, Any]) -> None:
    del t["instrument"]


def _personal_as_price(t: dict[str, Any]) -> None:
    t["entry_price"] = t["user_id"]


def _too_many_decimals(t: dict[str, Any]) -> None:
    t["exit_price"] = t["exit_price"] + "123456789"


def _epoch_seconds(t: dict[str, Any]) -> None:
    t["close_time"] = 1_795_687_200


_VARIANTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "currency-is-personal": _bad_currency,
    "event-id-is-personal": _bad_event_id,
    "negative-volume": _bad_volume,
    "close-before-open": _close_before_open,
    "close-next-year": _close_next_year,
    "blank-trade-id": _empty_trade_id,
}
_JSON_VARIANTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "side-is-personal": _bad_side,
    "missing-field": _missing_field,
    "price-is-personal": _personal_as_price,
    "too-many-decimals": _too_many_decimals,
    "epoch-seconds": _epoch_seconds,
}


def make_poison(n: int, kind: str, rng: random.Random, fmt: Format, now_ms: int) -> Poison:
    """Poison record number ``n`` of ``kind``, from ``rng`` (reproducible for a seed)."""
    pid = f"P{n:05d}"
    trade = sample_trade(n, seed=_POISON_SEED, close_time_ms=now_ms)
    trade["trade_id"] = f"poison-{pid}"
    key = str(trade["signal_id"] or trade["trade_id"]).encode()
    if kind == "random-bytes":
        value = rng.randbytes(rng.randint(1, 3000))
        return Poison(pid, kind, "random", key if rng.random() < 0.5 else None, value)
    if kind == "truncated-avro":
        whole = to_avro(trade)
        return Poison(
            pid, kind, "avro", key, whole[: rng.randint(1, len(whole) - 1)], _personal(trade)
        )
    if kind == "schema-invalid":
        variants = dict(_VARIANTS)
        if fmt == "json":
            variants.update(_JSON_VARIANTS)
        name = rng.choice(sorted(variants))
        variants[name](trade)
        return Poison(pid, kind, name, key, _encode(trade, fmt), _personal(trade))
    if kind == "oversized":
        # A well-formed trade with an enormous comment: refused on size, never parsed.
        personal = _personal(trade)
        personal.pop("comment", None)
        trade["comment"] = (trade["comment"] or "") + " " + "x" * rng.randint(*OVERSIZED_BYTES)
        if fmt == "json" and rng.random() < 0.5:
            # Or an oversized JSON document of any shape.
            filler = [trade["user_email"]] * (OVERSIZED_BYTES[0] // 20)
            value = json.dumps({"user_email": trade["user_email"], "filler": filler}).encode()
            return Poison(pid, kind, "huge-document", key, value, personal)
        return Poison(pid, kind, "huge-comment", key, _encode(trade, fmt), personal)
    if kind == "tombstone":
        return Poison(pid, kind, "null-value", key, None)
    raise ValueError(f"unknown poison kind {kind!r}")


def plan_kinds(count: int, rng: random.Random) -> list[str]:
    """``count`` kinds in random order: every kind once when ``count`` allows, then the cheap
    kinds in turn, with oversized records (megabytes each through the broker) kept to at most 4.
    """
    cheap = [k for k in KINDS if k != "oversized"]
    if count < len(KINDS):
        kinds = list(KINDS[:count])
    else:
        oversized = min(4, max(1, count // 10))
        kinds = ["oversized"] * oversized + [
            cheap[i % len(cheap)] for i in range(count - oversized)
        ]
    rng.shuffle(kinds)
    return kinds


__all__ = ["KINDS", "POISON_HEADER", "Format", "Poison", "make_poison", "plan_kinds"]
