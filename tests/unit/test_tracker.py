"""The tracker adapter against a real session-enforcing tracker on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from consumer.adapters import build_adapter
from consumer.adapters.base import Delivery
from consumer.adapters.tracker import (
    REF_FIELD,
    TRACKER_FIELDS,
    TrackerAdapter,
    tracker_payload,
)
from consumer.config import TrackerAdapterSettings
from consumer.errors import (
    AdapterUnavailable,
    ConfigError,
    DeliveryError,
    FatalDeliveryError,
    RetriableDeliveryError,
)
from consumer.receiver import Received, Reply, WebhookReceiver
from consumer.records import idempotency_key
from consumer.tracker_server import TrackerServer, validate_trade

# Characters that break a careless query string: '+', '@', '&', '=', '%' and a space.
EMAIL = "trader+demo@example.com"
PASSWORD = "p&ss=w0rd+ %41"
TRANSPORTS = pytest.mark.parametrize("transport", ["aiohttp", "httpx"])

#: Personal values a TradeClosed event could carry; none may ever reach the tracker.
PERSONAL = {
    "account_id": "ACC-778812",
    "user_id": "U-55120",
    "client_id": "C-99812",
    "user_email": "jane.doe@example.org",
    "user_name": "Jane Doe",
    "client_ip": "203.0.113.77",
    "comment": "call me on +44 20 7946 0018",
}


def trace_record(trade_id: str = "T-2026-000417") -> dict[str, Any]:
    return {
        "event_id": "3f0c6a52-8d1e-4b7a-9a43-0f2d8f1c2b7e",
        "trade_id": trade_id,
        "signal_id": "gold-breakout",
        "instrument": "XAUUSD",
        "side": "BUY",
        "volume": Decimal("0.50"),
        "entry_price": Decimal("1950.50"),
        "exit_price": Decimal("1962.125"),
        "profit_loss": Decimal("581.25"),
        "commission": Decimal("-3.50"),
        "swap": Decimal("0"),
        "currency": "USD",
        "open_time": datetime(2026, 11, 26, 9, 0, 0, 500_000, tzinfo=UTC),
        "close_time": datetime(2026, 11, 26, 10, 15, 0, 250_000, tzinfo=UTC),
        "close_reason": "TAKE_PROFIT",
    }


def delivery(trade_id: str = "T-2026-000417", **changes: Any) -> Delivery:
    record = {**trace_record(trade_id), **changes}
    return Delivery(
        record=record,
        idempotency_key=idempotency_key(trade_id, "trk"),
        attempt=1,
        due_ms=1_795_000_000_000,
    )


@pytest.fixture
def make_settings(monkeypatch: pytest.MonkeyPatch) -> Callable[..., TrackerAdapterSettings]:
    monkeypatch.setenv("TEST_TRACKER_EMAIL", EMAIL)
    monkeypatch.setenv("TEST_TRACKER_PASSWORD", PASSWORD)

    def make(base_url: str, **extra: Any) -> TrackerAdapterSettings:
        return TrackerAdapterSettings.model_validate(
            {
                "type": "tracker",
                "name": "trk",
                "base_url": base_url,
                "email": {"env": "TEST_TRACKER_EMAIL"},
                "password": {"env": "TEST_TRACKER_PASSWORD"},
                "timeout": "2s",
                "concurrency": 16,
                **extra,
            }
        )

    return make


@pytest.fixture
def tracker() -> Iterator[TrackerServer]:
    with TrackerServer(EMAIL, PASSWORD) as server:
        yield server


Outcome = DeliveryError | None


async def _outcome(adapter: TrackerAdapter, d: Delivery) -> Outcome:
    try:
        await adapter.deliver(d)
    except DeliveryError as exc:
        return exc
    return None


def run(
    settings: TrackerAdapterSettings,
    *steps: Delivery | list[Delivery] | Callable[[], None],
    transport: str = "aiohttp",
) -> list[Outcome]:
    """Run the steps through one adapter, then close it: a Delivery is delivered, a list of
    them concurrently, a callable is called (to steer the server between deliveries)."""

    async def go() -> list[Outcome]:
        adapter = TrackerAdapter(settings, transport=transport)  # type: ignore[arg-type]
        await adapter.start()
        outcomes: list[Outcome] = []
        try:
            for step in steps:
                if isinstance(step, Delivery):
                    outcomes.append(await _outcome(adapter, step))
                elif isinstance(step, list):
                    outcomes += await asyncio.gather(*(_outcome(adapter, d) for d in step))
                else:
                    step()
        finally:
            await adapter.close()
        return outcomes

    return asyncio.run(go())


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- sessions ----------------------------------------------------------------------------------


@TRANSPORTS
def test_one_login_serves_every_post(
    tracker: TrackerServer, make_settings: Any, transport: str
) -> None:
    deliveries = [delivery(f"T-{i}") for i in range(6)]
    outcomes = run(make_settings(tracker.base_url), *deliveries, transport=transport)
    assert outcomes == [None] * 6
    counts = tracker.counts
    assert (counts.logins, counts.posts, counts.stored, counts.invalid_sessions) == (1, 6, 6, 0)


@TRANSPORTS
@pytest.mark.parametrize("expired_reply", ["401", "error"])
def test_an_expired_session_is_renewed_within_the_same_delivery(
    make_settings: Any, transport: str, expired_reply: Any
) -> None:
    with TrackerServer(EMAIL, PASSWORD, expired_reply=expired_reply) as tracker:
        outcomes = run(
            make_settings(tracker.base_url),
            delivery("T-1"),
            tracker.expire_sessions,
            delivery("T-2"),
            transport=transport,
        )
        counts = tracker.counts
        assert [t.payload["ticket"] for t in tracker.trades] == ["T-1", "T-2"]
    assert outcomes == [None, None]
    assert (counts.logins, counts.invalid_sessions, counts.posts) == (2, 1, 3)


def test_a_session_that_times_out_on_its_own_is_renewed(make_settings: Any) -> None:
    with TrackerServer(EMAIL, PASSWORD, session_ttl=0.3) as tracker:

        def wait_for_expiry() -> None:
            deadline = time.monotonic() + 5
            while tracker.sessions and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not tracker.sessions

        outcomes = run(
            make_settings(tracker.base_url), delivery("T-1"), wait_for_expiry, delivery("T-2")
        )
        assert outcomes == [None, None]
        assert tracker.counts.logins == 2


@TRANSPORTS
def test_sixteen_concurrent_deliveries_after_an_expiry_log_in_once(
    tracker: TrackerServer, make_settings: Any, transport: str
) -> None:
    wave = [delivery(f"T-wave-{i}") for i in range(16)]
    outcomes = run(
        make_settings(tracker.base_url),
        delivery("T-first"),
        tracker.expire_sessions,
        wave,
        transport=transport,
    )
    assert outcomes == [None] * 17
    counts = tracker.counts
    assert counts.logins == 2
    assert counts.stored == 17
    # Each of the 16 found the session expired and posted once more with the new one.
    assert counts.invalid_sessions == 16
    assert counts.posts == 1 + 16 + 16


def test_sixteen_concurrent_first_deliveries_log_in_once(
    tracker: TrackerServer, make_settings: Any
) -> None:
    outcomes = run(make_settings(tracker.base_url), [delivery(f"T-{i}") for i in range(16)])
    assert outcomes == [None] * 16
    assert tracker.counts.logins == 1


def test_a_session_rejected_right_after_login_makes_the_adapter_unavailable(
    tracker: TrackerServer, make_settings: Any
) -> None:
    # The session goes in a parameter the tracker does not read: every session looks invalid.
    (err,) = run(make_settings(tracker.base_url, session_param="sid"), delivery())
    assert isinstance(err, AdapterUnavailable)
    assert str(err) == "tracker rejected a session it had just issued"
    assert tracker.counts.logins == 2  # one re-login, never a loop


# -- credentials and login failures -----------------------------------------------------------


def test_a_wrong_password_makes_the_adapter_unavailable_not_the_record_fatal(
    make_settings: Any,
) -> None:
    with TrackerServer(EMAIL, "another-password") as tracker:
        (err,) = run(make_settings(tracker.base_url), delivery())
        counts = tracker.counts
    assert isinstance(err, AdapterUnavailable)
    assert not isinstance(err, FatalDeliveryError)
    assert err.retriable  # never dead-lettered: the engine pauses the adapter instead
    assert str(err) == "tracker rejected the credentials"
    assert (counts.failed_logins, counts.posts) == (1, 0)


def test_a_failed_login_is_shared_by_the_deliveries_that_waited_for_it(
    make_settings: Any,
) -> None:
    with TrackerServer(EMAIL, "another-password") as tracker:
        outcomes = run(make_settings(tracker.base_url), [delivery(f"T-{i}") for i in range(16)])
        failed = tracker.counts.failed_logins
    assert all(isinstance(e, AdapterUnavailable) for e in outcomes)
    assert len({id(e) for e in outcomes}) == 16  # each task raises its own instance
    assert failed == 1


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_login_refused_by_status_makes_the_adapter_unavailable(
    tracker: TrackerServer, make_settings: Any, status: int
) -> None:
    tracker.fail_next(1, status, endpoint="login")
    (err,) = run(make_settings(tracker.base_url), delivery())
    assert isinstance(err, AdapterUnavailable)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_login_failing_with_5xx_is_retriable_for_the_record(
    tracker: TrackerServer, make_settings: Any, status: int
) -> None:
    tracker.fail_next(1, status, endpoint="login")
    first, second = run(make_settings(tracker.base_url), delivery("T-1"), delivery("T-2"))
    assert type(first) is RetriableDeliveryError
    assert str(first) == f"HTTP {status} from tracker login"
    assert second is None  # the next delivery logs in again


def test_a_rate_limited_login_passes_retry_after_on(
    tracker: TrackerServer, make_settings: Any
) -> None:
    tracker.limit_next(1, 9, endpoint="login")
    (err,) = run(make_settings(tracker.base_url), delivery())
    assert type(err) is RetriableDeliveryError
    assert err.retry_after == 9


# -- outcomes of a post ------------------------------------------------------------------------


@TRANSPORTS
def test_429_is_retriable_with_retry_after(
    tracker: TrackerServer, make_settings: Any, transport: str
) -> None:
    tracker.limit_next(1, 7)
    first, second = run(
        make_settings(tracker.base_url), delivery("T-1"), delivery("T-1"), transport=transport
    )
    assert type(first) is RetriableDeliveryError
    assert str(first) == "HTTP 429 from tracker"
    assert first.retry_after == 7
    assert second is None


def test_a_steady_rate_limit_answers_429_with_retry_after(make_settings: Any) -> None:
    with TrackerServer(EMAIL, PASSWORD, rate_limit=2) as tracker:
        # The bucket holds 2: the login and the first post; the second post is over the rate
        # (and so is the logout).
        outcomes = run(make_settings(tracker.base_url), delivery("T-1"), delivery("T-2"))
        assert tracker.counts.rate_limited >= 1
    assert outcomes[0] is None
    err = outcomes[1]
    assert isinstance(err, RetriableDeliveryError)
    assert err.retry_after == 1


@TRANSPORTS
@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_5xx_is_retriable(
    tracker: TrackerServer, make_settings: Any, transport: str, status: int
) -> None:
    tracker.fail_next(1, status)
    (err,) = run(make_settings(tracker.base_url), delivery(), transport=transport)
    assert type(err) is RetriableDeliveryError
    assert str(err) == f"HTTP {status} from tracker"


@TRANSPORTS
def test_a_tracker_slower_than_the_timeout_is_retriable(
    tracker: TrackerServer, make_settings: Any, transport: str
) -> None:
    tracker.slow_next(1, 5)
    started = time.monotonic()
    (err,) = run(make_settings(tracker.base_url, timeout="200ms"), delivery(), transport=transport)
    assert time.monotonic() - started < 1.5
    assert type(err) is RetriableDeliveryError
    assert str(err) == "timeout after 200ms"


def test_a_slow_login_counts_against_the_same_timeout(
    tracker: TrackerServer, make_settings: Any
) -> None:
    tracker.slow_next(1, 5, endpoint="login")
    (err,) = run(make_settings(tracker.base_url, timeout="200ms"), delivery())
    assert type(err) is RetriableDeliveryError
    assert str(err) == "timeout after 200ms"


@TRANSPORTS
def test_connection_refused_is_retriable(make_settings: Any, transport: str) -> None:
    base = f"http://127.0.0.1:{closed_port()}/api"
    (err,) = run(make_settings(base), delivery(), transport=transport)
    assert type(err) is RetriableDeliveryError
    assert str(err).startswith("connection error during login: ")


@TRANSPORTS
@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"volume": Decimal("0")}, "lots: must be positive"),
        ({"currency": "usd"}, "currency: must be an ISO 4217 code"),
    ],
)
def test_a_400_about_the_record_is_fatal(
    tracker: TrackerServer,
    make_settings: Any,
    transport: str,
    change: dict[str, Any],
    problem: str,
) -> None:
    (err,) = run(make_settings(tracker.base_url), delivery(**change), transport=transport)
    assert type(err) is FatalDeliveryError
    assert str(err) == "HTTP 400 from tracker: the record was refused"
    assert problem not in str(err)  # the tracker's message is never repeated
    assert tracker.counts.rejected == 1


def test_error_true_with_200_about_the_record_is_fatal(make_settings: Any) -> None:
    with TrackerServer(EMAIL, PASSWORD, record_error_status=200) as tracker:
        (err,) = run(make_settings(tracker.base_url), delivery(currency="usd"))
        assert tracker.counts.logins == 1  # not mistaken for a session problem
    assert type(err) is FatalDeliveryError
    assert str(err) == "HTTP 200 from tracker: error about the record"


def test_a_record_without_a_required_field_is_fatal_before_any_request(
    tracker: TrackerServer, make_settings: Any
) -> None:
    (err,) = run(make_settings(tracker.base_url), delivery(exit_price=None))
    assert type(err) is FatalDeliveryError
    assert str(err) == "record has no exit_price"
    assert tracker.counts.posts == 0


@pytest.mark.parametrize("post_path", ["/no-such-call.json", "/logout.json"])
def test_an_endpoint_the_tracker_refuses_makes_the_adapter_unavailable(
    tracker: TrackerServer, make_settings: Any, post_path: str
) -> None:
    # 404 (no such path) and 405 (a GET-only path): a configuration problem, not the record's.
    (err,) = run(make_settings(tracker.base_url, post_path=post_path), delivery())
    assert isinstance(err, AdapterUnavailable)


def test_a_2xx_that_is_not_the_trackers_answer_is_retriable(make_settings: Any) -> None:
    def fake(received: Received) -> Reply:
        if received.path.startswith("/api/login.json"):
            return Reply(200, body=b'{"error": false, "message": "", "session": "s"}')
        return Reply(200, {"Content-Type": "text/html"}, b"<html>captive portal</html>")

    with WebhookReceiver(fail=fake) as receiver:
        base = receiver.url.removesuffix("/webhook") + "/api"
        (err,) = run(make_settings(base), delivery())
    assert type(err) is RetriableDeliveryError
    assert str(err) == "HTTP 200 from tracker with an unreadable answer"


def test_a_record_error_that_mentions_a_session_is_not_taken_for_an_expiry(
    make_settings: Any,
) -> None:
    logins: list[str] = []

    def fake(received: Received) -> Reply:
        if received.path.startswith("/api/login.json"):
            logins.append(received.path)
            return Reply(200, body=b'{"error": false, "message": "", "session": "s"}')
        return Reply(200, body=b'{"error": true, "message": "Trading session closed for XAUUSD"}')

    with WebhookReceiver(fail=fake) as receiver:
        base = receiver.url.removesuffix("/webhook") + "/api"
        (err,) = run(make_settings(base), delivery())
    assert type(err) is FatalDeliveryError
    assert len(logins) == 1


def test_a_repeated_delivery_is_accepted_and_stored_once(
    tracker: TrackerServer, make_settings: Any
) -> None:
    assert run(make_settings(tracker.base_url), delivery(), delivery()) == [None, None]
    counts = tracker.counts
    assert (counts.stored, counts.duplicates) == (1, 1)


# -- close -------------------------------------------------------------------------------------


@TRANSPORTS
def test_close_logs_out(tracker: TrackerServer, make_settings: Any, transport: str) -> None:
    seen: list[list[str]] = []
    run(
        make_settings(tracker.base_url),
        delivery(),
        lambda: seen.append(tracker.sessions),
        transport=transport,
    )
    assert len(seen[0]) == 1
    assert tracker.counts.logouts == 1
    assert tracker.sessions == []


def test_close_without_a_session_makes_no_request(
    tracker: TrackerServer, make_settings: Any
) -> None:
    run(make_settings(tracker.base_url))
    counts = tracker.counts
    assert (counts.logins, counts.logouts, counts.invalid_sessions) == (0, 0, 0)


def test_close_survives_a_failing_logout(tracker: TrackerServer, make_settings: Any) -> None:
    tracker.fail_next(1, 503, endpoint="logout")
    assert run(make_settings(tracker.base_url), delivery()) == [None]
    assert tracker.counts.logouts == 0


# -- the mapping -------------------------------------------------------------------------------


@TRANSPORTS
def test_the_body_holds_exactly_the_mapped_fields_and_no_personal_field(
    tracker: TrackerServer, make_settings: Any, transport: str
) -> None:
    # Even a record that (wrongly) carried personal fields could not leak them.
    d = delivery(**PERSONAL)
    assert run(make_settings(tracker.base_url), d, transport=transport) == [None]
    (trade,) = tracker.trades
    assert set(trade.payload) == set(TRACKER_FIELDS.values()) | {REF_FIELD}
    assert trade.payload == {
        "ticket": "T-2026-000417",
        "signal": "gold-breakout",
        "symbol": "XAUUSD",
        "action": "buy",
        "lots": "0.50",
        "openPrice": "1950.50",
        "closePrice": "1962.125",
        "profit": "581.25",
        "commission": "-3.50",
        "swap": "0.00",
        "currency": "USD",
        "openTime": "2026-11-26T09:00:00.500Z",
        "closeTime": "2026-11-26T10:15:00.250Z",
        "closeReason": "TAKE_PROFIT",
        "ref": d.idempotency_key,
    }
    assert trade.headers["idempotency-key"] == d.idempotency_key
    assert trade.headers["content-type"] == "application/json"
    sent = json.dumps(trade.payload) + json.dumps(trade.headers)
    assert not [v for v in PERSONAL.values() if v in sent]
    assert d.record["event_id"] not in sent


def test_optional_fields_go_as_null_and_sell_as_sell() -> None:
    record = {**trace_record(), "signal_id": None, "close_reason": None, "side": "SELL"}
    body = tracker_payload(record, "at_x")
    assert (body["signal"], body["closeReason"], body["action"]) == (None, None, "sell")
    assert validate_trade(body) is None


# -- secrets -----------------------------------------------------------------------------------


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every auto_trace log record, even after log.configure() stopped propagation."""
    logger = logging.getLogger("auto_trace")
    logger.addHandler(caplog.handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        logger.setLevel(level)
        logger.removeHandler(caplog.handler)


def test_no_error_or_log_line_holds_the_email_password_or_session(
    make_settings: Any, logs: pytest.LogCaptureFixture
) -> None:
    tokens: list[str] = []
    errors: list[Outcome] = []

    def keep_tokens() -> None:
        tokens.extend(server.sessions)

    with TrackerServer(EMAIL, PASSWORD) as server:
        settings = make_settings(server.base_url, timeout="300ms")
        errors += run(
            settings,
            delivery("T-1"),
            keep_tokens,
            server.expire_sessions,
            delivery("T-2"),  # re-login
            keep_tokens,
            lambda: server.fail_next(1, 500),
            delivery("T-3"),
            lambda: server.slow_next(1, 5),
            delivery("T-4"),  # timeout
            lambda: server.fail_next(1, 400),
            delivery("T-5"),
            delivery("T-6", currency="usd"),
            keep_tokens,
        )
        errors += run(make_settings(server.base_url, session_param="sid"), delivery("T-7"))
        server.slow_next(1, 5, endpoint="login")
        errors += run(settings, delivery("T-8"))
    with TrackerServer(EMAIL, "another-password") as wrong:
        errors += run(make_settings(wrong.base_url), delivery("T-9"))
    errors += run(make_settings(f"http://127.0.0.1:{closed_port()}/api"), delivery("T-10"))

    assert len(set(tokens)) >= 2
    failures = [e for e in errors if e is not None]
    assert len(failures) == 8
    forbidden = [EMAIL, quote(EMAIL, safe=""), PASSWORD, quote(PASSWORD, safe="")]
    forbidden += [t for token in tokens for t in (token, quote(token, safe=""))]
    for err in failures:
        # Foreign exceptions hold the URL: they must not ride along as cause or context.
        assert err.__cause__ is None and err.__context__ is None
        text = f"{err} {err!r} {err.args!r}"
        assert not [f for f in forbidden if f in text], text
    assert logs.records
    for record in logs.records:
        line = f"{record.getMessage()} {json.dumps(getattr(record, 'fields', {}), default=str)}"
        assert not [f for f in forbidden if f in line], line


def test_the_adapter_repr_shows_no_secret(tracker: TrackerServer, make_settings: Any) -> None:
    adapter = TrackerAdapter(make_settings(tracker.base_url))
    text = repr(vars(adapter))
    assert EMAIL not in text and PASSWORD not in text


# -- configuration -----------------------------------------------------------------------------


def test_build_adapter_builds_a_tracker_adapter(make_settings: Any) -> None:
    assert isinstance(build_adapter(make_settings("http://127.0.0.1:9/api")), TrackerAdapter)


def test_a_missing_password_names_the_field_only(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings("http://127.0.0.1:9/api")
    monkeypatch.delenv("TEST_TRACKER_PASSWORD")
    with pytest.raises(ConfigError, match=r"^adapters\.trk\.password: .*TEST_TRACKER_PASSWORD"):
        TrackerAdapter(settings)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("base_url", "http://user:secret@tracker.example/api"),
        ("base_url", "http://tracker.example/api?token=abc"),
        ("base_url", "tracker.example/api"),
        ("post_path", "add-trade.json"),
        ("login_path", "/login.json?email=x"),
        ("session_param", "a b"),
    ],
)
def test_bad_tracker_settings_are_refused(make_settings: Any, key: str, value: str) -> None:
    good: dict[str, Any] = {"base_url": "https://tracker.example/api"}
    with pytest.raises(ValueError, match=key):
        make_settings(**{**good, key: value})


# -- the tracker server itself -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"comment": "hi"}, "unknown fields: comment"),
        ({"ticket": None}, "missing fields: ticket"),
        ({"lots": 0.5}, "lots: must be a string"),
        ({"profit": "1e3"}, "profit: must be a decimal string"),
        ({"action": "BUY"}, "action: must be buy or sell"),
        ({"openTime": "2026-13-01T00:00:00Z"}, "openTime: must be an RFC 3339 time"),
        ({"closeTime": "1795000000000"}, "closeTime: must be an RFC 3339 time"),
        ({"closeTime": "2026-11-26T08:00:00.000Z"}, "closeTime: before openTime"),
        ({"closeReason": "BORED"}, "closeReason: unknown value"),
    ],
)
def test_the_server_validates_payloads(change: dict[str, Any], problem: str) -> None:
    body = {**tracker_payload(trace_record(), "at_x"), **change}
    assert validate_trade(body) == problem


def test_the_server_answers_like_myfxbook_and_waits_with_a_deadline() -> None:
    threads_before = threading.active_count()
    with TrackerServer(EMAIL, PASSWORD) as tracker, httpx.Client() as client:
        base = tracker.base_url
        wrong = client.get(f"{base}/login.json", params={"email": EMAIL, "password": "x"})
        assert (wrong.status_code, wrong.json()) == (
            200,
            {"error": True, "message": "Invalid credentials"},
        )
        ok = client.get(f"{base}/login.json", params={"email": EMAIL, "password": PASSWORD})
        answer = ok.json()
        assert answer["error"] is False and answer["message"] == ""
        assert "%3D" in answer["session"]  # URL-encoded, as Myfxbook answers it
        started = time.monotonic()
        assert not tracker.wait_for(1, timeout=0.1)
        assert 0.09 <= time.monotonic() - started < 0.5
        tracker.set_expired_reply("alternate")
        statuses = [
            client.post(f"{base}/add-trade.json", params={"session": "nope"}, json={}).status_code
            for _ in range(4)
        ]
        assert statuses == [401, 200, 401, 200]
    assert threading.active_count() == threads_before


def test_the_server_runs_as_a_process_printing_json_lines(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = [
        sys.executable,
        "-m",
        "consumer.tracker_server",
        "--port",
        "0",
        "--email-env",
        "TEST_TRACKER_EMAIL",
        "--password-env",
        "TEST_TRACKER_PASSWORD",
    ]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        try:
            base = json.loads(process.stderr.readline())["listening"]
            assert run(make_settings(base), delivery("T-1"), delivery("T-1")) == [None, None]
            line = json.loads(process.stdout.readline())
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=10)
    assert process.returncode == 0
    assert line["seq"] == 1 and line["trade"]["ticket"] == "T-1"
    assert line["ref"] == delivery("T-1").idempotency_key
    counts = json.loads(err.strip().splitlines()[-1])["counts"]
    assert (counts["stored"], counts["duplicates"], counts["logouts"]) == (1, 1, 1)
