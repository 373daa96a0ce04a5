"""Choosing ingest's fast path (``input.fast_path``) and the native module's own edges.

The native fast path's byte-for-byte agreement with the pydantic path is proven by
tests/unit/test_fastpath.py, which runs every property against both fast paths.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from consumer import native
from consumer.config import load_settings
from consumer.errors import ConfigError
from consumer.fastpath import JsonFastPath
from consumer.health import Health
from consumer.ingest import IngestStage
from consumer.metrics import Metrics
from consumer.samples import sample_trade, to_json

#: make test sets this from NATIVE (default 1): a missing module is then a failure, not a skip.
REQUIRED = os.environ.get("AUTO_TRACE_REQUIRE_NATIVE", "0") != "0"


def native_module() -> ModuleType:
    try:
        return importlib.import_module(native.MODULE)
    except ImportError:
        if REQUIRED:
            pytest.fail(
                f"{native.MODULE} is not installed (make install builds it; NATIVE=0 skips)"
            )
        pytest.skip(f"{native.MODULE} is not installed")


def test_the_native_module_is_installed_unless_left_out_on_purpose() -> None:
    assert native_module().FastPath is not None


def _without_native(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def refuse(name: str, *args: Any) -> ModuleType:
        if name == native.MODULE:
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", refuse)


def test_auto_takes_the_native_fast_path_when_installed() -> None:
    native_module()
    name, fast = native.choose_fast_path("auto", max_bytes=1 << 20, skew_ms=0)
    assert name == "native"
    assert fast is not None and not isinstance(fast, JsonFastPath)


def test_auto_falls_back_to_python_without_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_native(monkeypatch)
    name, fast = native.choose_fast_path("auto", max_bytes=1 << 20, skew_ms=0)
    assert name == "python"
    assert isinstance(fast, JsonFastPath)


def test_native_without_the_module_fails_at_start_up_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without_native(monkeypatch)
    with pytest.raises(ConfigError, match=r"input\.fast_path: native.*not installed"):
        native.choose_fast_path("native", max_bytes=1 << 20, skew_ms=0)


class _OlderFastPath:
    """A native module built before the delay topic's records kept only their due header: it
    takes ``header_names`` and knows no ``due_header``, as pyo3 checks keyword arguments."""

    def __init__(self, *, header_names: tuple[str, ...], **kwargs: object) -> None:
        if "due_header" in kwargs:
            raise TypeError("got an unexpected keyword argument 'due_header'")


def test_a_native_module_of_another_version_is_left_out_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = importlib.import_module

    def older(name: str, *args: Any) -> Any:
        return SimpleNamespace(FastPath=_OlderFastPath) if name == native.MODULE else real(name)

    monkeypatch.setattr(importlib, "import_module", older)
    with caplog.at_level(logging.WARNING, logger="auto_trace.native"):
        name, fast = native.choose_fast_path("auto", max_bytes=1 << 20, skew_ms=0)
    assert name == "python" and isinstance(fast, JsonFastPath)
    assert any("another version" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=r"input\.fast_path: native.*another version"):
        native.choose_fast_path("native", max_bytes=1 << 20, skew_ms=0)


def test_python_and_off_are_what_they_say() -> None:
    name, fast = native.choose_fast_path("python", max_bytes=1 << 20, skew_ms=0)
    assert name == "python" and isinstance(fast, JsonFastPath)
    assert native.choose_fast_path("off", max_bytes=1 << 20, skew_ms=0) == ("off", None)


def test_both_fast_paths_give_the_same_bytes_for_a_sample() -> None:
    native_module()
    raw = to_json(sample_trade(4))
    now = 2**62
    python = JsonFastPath(max_bytes=1 << 20, skew_ms=0)(raw, now)
    fast = native.load_native(max_bytes=1 << 20, skew_ms=0)
    assert fast is not None
    assert python is not None
    assert fast(raw, now) == python


@pytest.mark.parametrize(
    ("integer_digits", "scale"), [(0, 8), (30, 8), (20, 19)], ids=["none", "too many", "scale"]
)
def test_the_native_module_refuses_limits_it_cannot_hold_exactly(
    integer_digits: int, scale: int
) -> None:
    module = native_module()
    with pytest.raises(ValueError, match="integer_digits"):
        module.FastPath(
            max_bytes=4096,
            skew_ms=0,
            min_time_ms=0,
            integer_digits=integer_digits,
            scale=scale,
            currencies={"USD"},
            due_header="due",
        )


@pytest.mark.parametrize("choice", ["off", "python", "auto"])
def test_ingest_runs_the_fast_path_its_setting_names(choice: str) -> None:
    settings = load_settings(None, metrics={"port": 0}, input={"fast_path": choice})
    stage = IngestStage(settings, Metrics(), Health())
    expected = {"off": "off", "python": "python", "auto": "native"}[choice]
    if expected == "native":
        native_module()
    assert stage.fast_path_name == expected
    assert stage._started()["fast_path"] == expected
    assert (stage.fast_path is None) == (choice == "off")
