"""The circuit breaker of one sink worker: an outage must not become thousands of dead letters.

    closed ──(AdapterUnavailable, or N consecutive retriable failures)──► open
    open ──(probe interval passed: one waiting record is let through)──► half-open
    half-open ──(probe delivered)──► closed      half-open ──(probe failed)──► open, interval x2

While the circuit is not closed the worker pauses all its partitions (sink and retry tiers)
and the records already taken wait here, outside the concurrency limit, instead of being sent
to the next tier. Record-level failures (fatal errors, or retriable ones while the circuit is
closed and below the threshold) still follow the tiers and the DLQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Literal

from consumer.config import CircuitSettings
from consumer.errors import AdapterUnavailable, DeliveryError
from consumer.log import get_logger

log = get_logger("circuit")

State = Literal["closed", "open", "half_open"]
STATE_VALUE: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    def __init__(
        self,
        adapter: str,
        settings: CircuitSettings,
        *,
        on_change: Callable[[State], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.adapter = adapter
        self._threshold = settings.failure_threshold
        self._base = settings.probe_interval.total_seconds()
        self._max = settings.max_probe_interval.total_seconds()
        self._interval = self._base
        self._clock = clock
        self._on_change = on_change
        self.state: State = "closed"
        #: Records that failed retriably since the last success: one bad record retried many
        #: times must not look like an outage.
        self._failing: set[str] = set()
        self._probe_at = 0.0
        self._probing = False
        self._changed = asyncio.Condition()
        self.opened_count = 0

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    @property
    def quiet(self) -> bool:
        """Closed with no failure counted: a success has nothing to reset or announce."""
        return self.state == "closed" and not self._failing

    def _set(self, state: State, reason: str) -> None:
        if state == self.state:
            return
        self.state = state
        if state == "open":
            self.opened_count += 1
        log.warning(
            "circuit state changed",
            extra={
                "fields": {
                    "state": state,
                    "adapter": self.adapter,
                    "reason": reason,
                    "next_probe_s": round(self._interval, 3) if state == "open" else None,
                }
            },
        )
        if self._on_change is not None:
            self._on_change(state)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def success(self, probe: bool) -> None:
        self._failing.clear()
        if probe:
            self._probing = False
        if not self.closed:
            self._interval = self._base
            self._set("closed", "a delivery succeeded")
            await self._notify()

    async def failure(self, error: DeliveryError, probe: bool, record: str = "") -> bool:
        """Count a failure of ``record``; True when it is adapter-wide (the record must wait,
        not go to the next tier)."""
        if probe:
            self._probing = False
        adapter_wide = isinstance(error, AdapterUnavailable)
        if error.retriable and not adapter_wide and self.closed:
            self._failing.add(record)
            adapter_wide = len(self._failing) >= self._threshold
        elif error.retriable and not self.closed:
            adapter_wide = True
        if not adapter_wide:
            return False
        if probe:
            self._interval = min(self._interval * 2, self._max)
        self._probe_at = self._clock() + self._interval
        reason = type(error).__name__ if probe or self.closed else "still failing"
        self._set("open", f"{reason}: {error}"[:200])
        await self._notify()
        return True

    async def admit(self) -> bool:
        """Wait until a delivery may be attempted; True when this attempt is the probe."""
        async with self._changed:
            while True:
                if self.closed:
                    return False
                now = self._clock()
                if not self._probing and now >= self._probe_at:
                    self._probing = True
                    self._set("half_open", "probing with one record")
                    return True
                wait = max(0.001, self._probe_at - now) if not self._probing else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=wait)
