"""`auto-trace dlq` without a broker: argument parsing (exit 2 with a clear message), filters,
the token bucket, replay headers and the progress committed with offsets."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from confluent_kafka import TopicPartition

from consumer import dlq
from consumer import headers as h

NOW = int(datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp() * 1000)


def _dead(**fields: object) -> dlq.DeadLetter:
    base: dict[str, object] = {
        "partition": 0,
        "offset": 7,
        "timestamp_ms": NOW,
        "adapter": "hook",
        "error_class": "FatalDeliveryError",
        "error_message": "HTTP 422",
        "attempts": 1,
        "first_failure_ms": NOW - 1000,
        "last_failure_ms": NOW - 1000,
        "trade_id": "T-1",
        "origin_topic": "auto-trace.sink.hook",
        "origin_partition": 2,
        "origin_offset": 40,
        "source_group": "auto-trace-sink-hook",
        "replay_id": None,
    }
    base.update(fields)
    return dlq.DeadLetter(**base)  # type: ignore[arg-type]


# -- times, rates, positions, ids ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", NOW - 7_200_000),
        ("30m", NOW - 1_800_000),
        ("1d", NOW - 86_400_000),
        ("500ms", NOW - 500),
        ("2026-11-26", NOW - 12 * 3_600_000),
        ("2026-11-26T10:00:00Z", NOW - 2 * 3_600_000),
        ("2026-11-26T11:00:00+01:00", NOW - 2 * 3_600_000),
        ("2026-11-26T10:00:00.250Z", NOW - 2 * 3_600_000 + 250),
        (str(NOW - 5), NOW - 5),
    ],
)
def test_times_are_durations_ago_dates_rfc3339_or_epoch_ms(text: str, expected: int) -> None:
    parsed = dlq.parse_time(text, NOW)
    assert (parsed.ms, parsed.spelled) == (expected, text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-11-26T10:00:00", "add a UTC offset"),
        ("1795690200", "milliseconds"),
        ("yesterday", "expected a duration ago"),
        ("2h ago", "expected a duration ago"),
    ],
)
def test_ambiguous_or_unknown_times_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dlq.parse_time(text, NOW)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("20", 20.0), ("20/s", 20.0), ("600/m", 10.0), ("3600/h", 1.0), ("0.5", 0.5), (" 5 / s ", 5)],
)
def test_rates(text: str, per_second: float) -> None:
    assert dlq.parse_rate(text) == per_second


@pytest.mark.parametrize("text", ["0", "0/s", "fast", "-3", "20/d", "1e3"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        dlq.parse_rate(text)


def test_positions_and_replay_ids() -> None:
    assert dlq.parse_position("3:1042") == (3, 1042)
    for bad in ("3", "a:1", "3:-1", "1:2:3", ""):
        with pytest.raises(ValueError, match="PARTITION:OFFSET"):
            dlq.parse_position(bad)
    assert dlq.parse_replay_id("fix-2026.11_26") == "fix-2026.11_26"
    for bad in ("", "-x", "a b", "x" * 101, "ä"):
        with pytest.raises(ValueError, match="replay id"):
            dlq.parse_replay_id(bad)
    generated = dlq.new_replay_id(NOW)
    assert generated.startswith("20261126T120000z-") and dlq.parse_replay_id(generated)


# -- the command line: bad arguments exit 2 and say why ---------------------------------------


def _main(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    try:
        code = dlq.main(list(argv), out=io.StringIO(), err=err)
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    return code, err.getvalue()


@pytest.mark.parametrize(
    "argv",
    [
        ["list", "--since", "2026-11-26T10:00:00"],
        ["list", "--output", "yaml"],
        ["list", "--limit", "0"],
        ["show", "3"],
        ["show"],
        ["replay", "--rate", "fast"],
        ["replay", "--replay-id", "no spaces"],
        ["unknown"],
        [],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _main(*argv)
    assert code == 2
    assert "error:" in capsys.readouterr().err


def test_since_after_until_exits_2_before_contacting_a_broker() -> None:
    code, err = _main("replay", "--since", "1h", "--until", "2h")
    assert code == 2
    assert "--since 1h is not before --until 2h" in err


def test_a_bad_configuration_exits_2() -> None:
    code, err = _main("list", "--config", "/nonexistent/auto-trace.yaml")
    assert code == 2 and "configuration error" in err


def test_every_action_has_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("list", "stats", "show", "replay", "history"):
        with pytest.raises(SystemExit) as exc:
            dlq.main([action, "--help"])
        assert exc.value.code == 0
        assert "examples:" in capsys.readouterr().out


def test_the_top_level_help_lists_dlq_without_importing_it() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from consumer.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()) as o:\n"
        "    main(['--help'])\n"
        "assert 'dlq' in o.getvalue()\n"
        "print('consumer.dlq' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# -- filters ------------------------------------------------------------------------------------


def _filter(*argv: str) -> dlq.Filter:
    args = dlq.build_parser().parse_args(["list", *argv])
    assert isinstance(args, argparse.Namespace)
    return dlq.Filter.from_args(args)


def test_filters_combine_with_and_and_repeat_with_or() -> None:
    filt = _filter("--adapter", "hook", "--adapter", "other", "--error-class", "FatalDeliveryError")
    assert filt.matches(_dead())
    assert filt.matches(_dead(adapter="other"))
    assert not filt.matches(_dead(adapter="third"))
    assert not filt.matches(_dead(error_class="RetriableDeliveryError"))
    assert _filter("--trade-id", "T-1").matches(_dead())
    assert not _filter("--trade-id", "T-2").matches(_dead())
    assert _filter().matches(_dead(adapter=None, error_class=None))


def test_since_is_inclusive_and_until_exclusive_on_the_last_failure() -> None:
    at = NOW - 1000
    assert _filter("--since", str(at)).matches(_dead())
    assert not _filter("--until", str(at)).matches(_dead())
    assert _filter("--until", str(at + 1)).matches(_dead())
    # Without failure headers, the record's own timestamp counts.
    assert not _filter("--since", str(NOW + 1)).matches(_dead(last_failure_ms=None))


def test_a_filter_round_trips_through_the_audit_record_keeping_resolved_times() -> None:
    filt = _filter("--adapter", "b", "--adapter", "a", "--since", "2h", "--trade-id", "T-9")
    stored = dlq.Filter.from_json(filt.to_json())
    assert stored == filt
    assert stored.spelled() == {
        "adapter": ["a", "b"],
        "error_class": [],
        "trade_id": ["T-9"],
        "since": "2h",
        "until": None,
    }
    # Spelled the same later, it is the same filter (relative times stay as first resolved).
    again = _filter("--adapter", "a", "--adapter", "b", "--trade-id", "T-9", "--since", "2h")
    assert again.spelled() == stored.spelled()
    assert stored.as_flags() == "--adapter a --adapter b --trade-id T-9 --since 2h"


# -- replay pieces ------------------------------------------------------------------------------


def test_the_token_bucket_paces_after_a_small_burst() -> None:
    clock = [0.0]
    bucket = dlq.TokenBucket(rate=10.0, capacity=2.5, clock=lambda: clock[0])
    assert bucket.delay() == 0.0  # one token to start with: no initial burst
    bucket.take()
    assert bucket.delay() == pytest.approx(0.1)
    clock[0] = 10.0  # a long pause saves up at most `capacity` tokens
    sent = 0
    while bucket.delay() == 0.0:
        bucket.take()
        sent += 1
    assert sent == 2
    # Over a long run the rate holds: with half a token left, 100 more take 9.95 s.
    waited = 0.0
    for _ in range(100):
        wait = bucket.delay()
        clock[0] += wait
        waited += wait
        bucket.take()
    assert waited == pytest.approx((100 - 0.5) / 10.0)


def test_replayed_headers_drop_the_failure_and_keep_due_trade_and_origin() -> None:
    original: h.Headers = [
        (h.DUE_MS, b"1000"),
        (h.TRADE_ID, b"T-1"),
        (h.ATTEMPTS, b"4"),
        (h.RETRY_DUE_MS, b"5000"),
        (h.ERROR_CLASS, b"RetriableDeliveryError"),
        (h.ERROR_MESSAGE, b"HTTP 503"),
        (h.FIRST_FAILURE_MS, b"1100"),
        (h.LAST_FAILURE_MS, b"4900"),
        (h.ADAPTER, b"hook"),
        (h.ORIGIN_TOPIC, b"p.sink.hook"),
        (h.REPLAY_ID, b"an-earlier-replay"),
    ]
    out = dlq.replay_headers(original, "fix-1", 7000, ("p.dlq", 2, 17))
    assert h.get(out, h.DUE_MS) == "1000" and h.get(out, h.TRADE_ID) == "T-1"
    assert h.get(out, h.ORIGIN_TOPIC) == "p.sink.hook"
    assert all(h.get(out, name) is None for name in dlq.FAILURE_HEADERS)
    assert h.get(out, h.REPLAY_ID) == "fix-1"
    assert h.get(out, h.REPLAY_MS) == "7000"
    assert h.get(out, h.REPLAY_OF) == "p.dlq:2:17"
    assert [k for k, _ in out].count(h.REPLAY_ID) == 1


def test_progress_counts_ride_in_the_committed_offsets_metadata() -> None:
    progress = dlq.PartitionProgress(offset=42, matched=7, sent=6, skipped=1)
    tp = TopicPartition("p.dlq", 0, 42, metadata=progress.metadata())
    assert dlq.PartitionProgress.from_committed(tp) == progress
    # Metadata from something else: offsets still count, counts start at 0.
    assert dlq.PartitionProgress.from_committed(
        TopicPartition("p.dlq", 0, 5, metadata="not json")
    ) == dlq.PartitionProgress(5)


def test_progress_is_a_bar_on_a_terminal_and_periodic_lines_otherwise() -> None:
    clock = [0.0]
    stream = io.StringIO()
    bar = dlq.Progress(stream, 100, label="replay x", tty=False, clock=lambda: clock[0])
    for i in range(1, 101):
        clock[0] = i * 0.1
        bar.update(i, i // 2)
    lines = stream.getvalue().splitlines()
    assert 1 <= len(lines) <= 3 and lines[0].startswith("replay x: ")
    tty = io.StringIO()
    bar = dlq.Progress(tty, 10, label="replay x", tty=True, clock=lambda: clock[0])
    bar.update(5, 5, force=True)
    bar.close()
    assert tty.getvalue().startswith("\rreplay x [###############---------------]  50% 5/10")


def test_a_dead_letter_lists_as_one_table_line_without_a_body() -> None:
    line = dlq.table_line(_dead())
    assert line.split() == [
        "0:7",
        "hook",
        "FatalDeliveryError",
        "1",
        "2026-11-26T11:59:59Z",
        "2026-11-26T11:59:59Z",
        "T-1",
        "auto-trace.sink.hook:2:40",
    ]
    assert dlq.table_header().split()[0] == "position"
