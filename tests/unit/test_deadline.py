"""Coarse per-call limits: an overdue call is cancelled and reported as this limit's doing,
never confused with a cancellation from elsewhere (shutdown) or with an outer limit."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from consumer.deadline import Deadlines


async def _bounded(deadlines: Deadlines, waits_on: asyncio.Future[None]) -> str:
    task = deadlines.start()
    try:
        await waits_on
    except asyncio.CancelledError:
        if deadlines.expired(task):
            return "timed out"
        raise
    finally:
        deadlines.end(task)
    return "done"


def test_an_overdue_call_is_cancelled_within_limit_plus_period_and_reported_expired() -> None:
    async def main() -> tuple[str, float, int]:
        deadlines = Deadlines(0.1)
        started = time.monotonic()
        outcome = await _bounded(deadlines, asyncio.get_running_loop().create_future())
        task = asyncio.current_task()
        assert task is not None
        return outcome, time.monotonic() - started, task.cancelling()

    outcome, took, cancelling = asyncio.run(main())
    assert outcome == "timed out"
    assert 0.1 <= took < 0.1 + 0.025 + 0.5  # limit + period, with room for a slow machine
    assert cancelling == 0  # the task is not left half-cancelled


def test_a_call_that_finishes_in_time_is_untouched() -> None:
    async def main() -> str:
        deadlines = Deadlines(5.0)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.call_soon(future.set_result, None)
        return await _bounded(deadlines, future)

    assert asyncio.run(main()) == "done"


def test_a_cancellation_from_elsewhere_is_not_taken_for_a_timeout() -> None:
    async def main() -> None:
        deadlines = Deadlines(60.0)
        loop = asyncio.get_running_loop()
        task = loop.create_task(_bounded(deadlines, loop.create_future()))
        await asyncio.sleep(0)  # let it start waiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_an_inner_limit_fires_alone_and_an_outer_one_does_not_see_it() -> None:
    async def main() -> tuple[str, int]:
        outer, inner = Deadlines(30.0), Deadlines(0.05)
        task = outer.start()
        try:
            result = await _bounded(inner, asyncio.get_running_loop().create_future())
        except asyncio.CancelledError:
            result = "outer cancelled"
        finally:
            outer.end(task)
        return result, task.cancelling()

    assert asyncio.run(main()) == ("timed out", 0)


def test_a_call_that_swallows_the_cancellation_leaves_its_task_clean() -> None:
    async def stubborn(deadlines: Deadlines) -> int:
        task = deadlines.start()
        try:
            # A misbehaving call: swallows the cancellation and finishes anyway.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.get_running_loop().create_future()
        finally:
            deadlines.end(task)
        return task.cancelling()

    assert asyncio.run(stubborn(Deadlines(0.05))) == 0
