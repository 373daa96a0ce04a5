"""The benchmark receiver's bookkeeping, which R4 and R6 time their legs by."""

from __future__ import annotations

import json

from bench.server import _FAIL, _OK, State


def test_fail_first_answers_503_once_per_webhook_id_and_times_both_phases() -> None:
    state = State()
    state.reset(fail_first=True)
    assert state.delivery(b"a", True, 10) == _FAIL
    assert state.delivery(b"b", True, 10) == _FAIL
    assert state.delivery(b"a", True, 10) == _OK
    assert state.delivery(b"b", False, 10) == _OK
    stats = json.loads(state.stats())
    assert (stats["failed"], stats["ok"], stats["distinct_ok"], stats["unsigned"]) == (2, 2, 2, 1)
    assert stats["first_ms"] <= stats["last_failed_ms"] <= stats["first_ok_ms"]
    assert stats["first_ok_ms"] <= stats["last_ok_ms"]


def test_reset_forgets_the_ids_and_the_times() -> None:
    state = State()
    state.reset(fail_first=True)
    state.delivery(b"a", True, 10)
    state.reset(fail_first=False)
    assert state.delivery(b"a", True, 10) == _OK
    stats = json.loads(state.stats())
    assert stats["failed"] == 0
    assert stats["last_failed_ms"] is None
    assert stats["first_ok_ms"] == stats["last_ok_ms"]
