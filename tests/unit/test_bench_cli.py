"""``python -m bench`` checks its settings before it starts a broker: a typo fails at once."""

from __future__ import annotations

import pytest

from bench.run import main


def test_help_prints_the_method_and_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m bench")
    for setting in ("BENCH_SCALE", "BENCH_ROUNDS", "BENCH_ONLY", "BENCH_PROFILE"):
        assert setting in out


def test_an_argument_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["R1"]) == 2
    assert "takes no arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("BENCH_ROUNDS", "0", "BENCH_ROUNDS must be a whole number"),
        ("BENCH_ROUNDS", "two", "BENCH_ROUNDS must be a whole number"),
        ("BENCH_SCALE", "-1", "BENCH_SCALE must be greater than 0"),
        ("BENCH_ONLY", "R1,R9", "unknown scenarios ['R9']"),
    ],
)
def test_a_bad_setting_fails_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(name, value)
    assert main([]) == 2
    assert message in capsys.readouterr().err
