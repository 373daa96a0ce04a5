from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta

from consumer.circuit import CircuitBreaker
from consumer.config import CircuitSettings
from consumer.errors import AdapterUnavailable, FatalDeliveryError, RetriableDeliveryError


def _breaker(now: list[float], states: list[str]) -> CircuitBreaker:
    settings = CircuitSettings(
        failure_threshold=3,
        probe_interval=timedelta(seconds=1),
        max_probe_interval=timedelta(seconds=4),
    )
    return CircuitBreaker("hook", settings, on_change=states.append, clock=lambda: now[0])


def test_consecutive_retriable_failures_open_the_circuit_and_a_probe_closes_it() -> None:
    async def scenario() -> None:
        now, states = [0.0], []
        breaker = _breaker(now, states)
        error = RetriableDeliveryError("HTTP 503")
        assert await breaker.failure(error, probe=False, record="a") is False  # to the tiers
        assert await breaker.failure(error, probe=False, record="a") is False  # same record
        assert await breaker.failure(error, probe=False, record="b") is False
        assert await breaker.failure(error, probe=False, record="c") is True  # 3 records: open
        assert breaker.state == "open"
        now[0] = 1.0
        assert await breaker.admit() is True  # one probe after the interval
        assert breaker.state == "half_open"
        await breaker.success(probe=True)
        assert breaker.closed and states == ["open", "half_open", "closed"]

    asyncio.run(scenario())


def test_a_failed_probe_doubles_the_interval_up_to_the_maximum() -> None:
    async def scenario() -> None:
        now, states = [0.0], []
        breaker = _breaker(now, states)
        await breaker.failure(AdapterUnavailable("credentials rejected"), probe=False)
        probes = []
        for _ in range(4):
            waiter = asyncio.ensure_future(breaker.admit())
            await asyncio.sleep(0)
            assert not waiter.done()  # not before the interval
            now[0] = breaker._probe_at
            await breaker._notify()  # the fake clock moved: wake the waiter now
            assert await waiter is True
            probes.append(now[0])
            await breaker.failure(RetriableDeliveryError("HTTP 503"), probe=True)
        gaps = [b - a for a, b in itertools.pairwise(probes)]
        assert gaps == [2.0, 4.0, 4.0]

    asyncio.run(scenario())


def test_credentials_rejected_opens_at_once_and_fatal_errors_never_do() -> None:
    async def scenario() -> None:
        breaker = _breaker([0.0], [])
        for _ in range(10):
            assert await breaker.failure(FatalDeliveryError("HTTP 400"), probe=False) is False
        assert breaker.closed
        assert await breaker.failure(AdapterUnavailable("login refused"), probe=False) is True
        assert breaker.state == "open"

    asyncio.run(scenario())


def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    async def scenario() -> None:
        breaker = _breaker([0.0], [])
        error = RetriableDeliveryError("HTTP 503")
        for record in "ab":
            await breaker.failure(error, probe=False, record=record)
        await breaker.success(probe=False)
        for record in "ab":
            assert await breaker.failure(error, probe=False, record=record) is False
        assert breaker.closed

    asyncio.run(scenario())
