"""Which fast path ingest runs: native (Rust, ``native/``), Python (:mod:`consumer.fastpath`), or
none (the pydantic path for every record).

The native module is an optional wheel (``auto_trace_native``, built by ``make install`` and in
the image): a ``pip install`` without a Rust toolchain still gives a working ingest, only
slower. Both fast paths obey one rule, tested on the same inputs: decline, or produce byte for
byte what the pydantic path produces. ``input.fast_path`` picks one; ``native`` refuses to start
without the module, so a deployment that counts on it cannot lose it silently.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Literal

from consumer import headers as h
from consumer.errors import ConfigError
from consumer.fastpath import FastRecord, JsonFastPath
from consumer.log import get_logger
from consumer.records import DECIMAL_SCALE
from consumer.trade import ISO_4217_CODES, MAX_INTEGER_DIGITS, MIN_TIME_MS

#: Raw JSON bytes and now (epoch ms) → a :data:`FastRecord`, or None: "let pydantic decide".
FastPath = Callable[[bytes, int], FastRecord | None]
Choice = Literal["auto", "native", "python", "off"]

MODULE = "auto_trace_native"

log = get_logger("native")


def load_native(*, max_bytes: int, skew_ms: int, window_ms: int = 0) -> FastPath | None:
    """The native fast path with the contract's constants, or None if it is not installed or
    was built from another version of ``native/`` (its constructor then refuses these arguments:
    a warning says so, and ingest runs as without it rather than fail half-way).

    Every constant comes from :mod:`consumer.trade`, :mod:`consumer.records` and
    :mod:`consumer.headers`, so the native code holds no second copy of the contract's tables.
    ``window_ms`` only matters to its ``traced`` method (the delay topic's due header).
    """
    try:
        module = importlib.import_module(MODULE)
    except ImportError:
        return None
    try:
        fast: FastPath = module.FastPath(
            max_bytes=max_bytes,
            skew_ms=skew_ms,
            min_time_ms=MIN_TIME_MS,
            integer_digits=MAX_INTEGER_DIGITS,
            scale=DECIMAL_SCALE,
            currencies=set(ISO_4217_CODES),
            window_ms=window_ms,
            due_header=h.DUE_MS,
        )
    except TypeError as exc:
        log.warning(
            "native fast path built for another version of auto-trace; left out (rebuild it "
            "with `pip install ./native`, as make install does)",
            extra={"fields": {"module": MODULE, "error": str(exc)[:200]}},
        )
        return None
    return fast


def choose_fast_path(
    choice: Choice, *, max_bytes: int, skew_ms: int, window_ms: int = 0
) -> tuple[str, FastPath | None]:
    """``(name, fast path)`` for ``input.fast_path``; the name goes into ingest's start line."""
    if choice == "off":
        return "off", None
    if choice in ("auto", "native"):
        native = load_native(max_bytes=max_bytes, skew_ms=skew_ms, window_ms=window_ms)
        if native is not None:
            return "native", native
        if choice == "native":
            raise ConfigError(
                f"input.fast_path: native, but the {MODULE} module is not installed or was "
                "built for another version of auto-trace (build it with `pip install ./native`, "
                "which needs a Rust toolchain, or choose auto or python)"
            )
    return "python", JsonFastPath(max_bytes=max_bytes, skew_ms=skew_ms)


__all__ = ["Choice", "FastPath", "choose_fast_path", "load_native"]
