"""The webhook adapter against a real HTTP receiver on loopback, over each transport."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from consumer.adapters import build_adapter
from consumer.adapters.base import Delivery
from consumer.adapters.webhook import WebhookAdapter, parse_retry_after
from consumer.config import SecretRef, WebhookAdapterSettings
from consumer.errors import (
    ConfigError,
    DeliveryError,
    FatalDeliveryError,
    RetriableDeliveryError,
)
from consumer.receiver import (
    Received,
    Reply,
    WebhookReceiver,
    always,
    fail_first,
    fail_fraction,
    slow,
)
from consumer.records import idempotency_key

SECRET = "whsec_" + base64.b64encode(b"the-current-signing-key-32-bytes").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"the-previous-signing-key-32bytes").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"somebody-else-s-signing-key-0000").decode()
URL_TOKEN = "tok-8f3a9c2e71"
BODY_MARK = "receiver-said-something-private"

TRANSPORTS = pytest.mark.parametrize("transport", ["builtin", "aiohttp", "httpx"])


def trace_record() -> dict[str, Any]:
    return {
        "event_id": "3f0c6a52-8d1e-4b7a-9a43-0f2d8f1c2b7e",
        "trade_id": "T-2026-000417",
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


def delivery(attempt: int = 1) -> Delivery:
    record = trace_record()
    return Delivery(
        record=record,
        idempotency_key=idempotency_key(record["trade_id"], "hook"),
        attempt=attempt,
        due_ms=1_795_000_000_000,
    )


@pytest.fixture
def make_settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    def make(
        url: str,
        *,
        secrets: tuple[str, ...] = (SECRET,),
        timeout: str = "2s",
        headers: dict[str, str] | None = None,
    ) -> WebhookAdapterSettings:
        refs = []
        for i, secret in enumerate(secrets):
            monkeypatch.setenv(f"TEST_WEBHOOK_SECRET_{i}", secret)
            refs.append(SecretRef(env=f"TEST_WEBHOOK_SECRET_{i}"))
        return WebhookAdapterSettings.model_validate(
            {
                "type": "webhook",
                "name": "hook",
                "url": url,
                "secrets": refs,
                "timeout": timeout,
                "concurrency": 4,
                "headers": headers or {},
            }
        )

    return make


def run(
    settings: WebhookAdapterSettings, *deliveries: Delivery, transport: str = "builtin"
) -> list[DeliveryError | None]:
    """Deliver each in turn through one adapter; the outcome of each (None: delivered)."""

    async def go() -> list[DeliveryError | None]:
        adapter = WebhookAdapter(settings, transport=transport)  # type: ignore[arg-type]
        await adapter.start()
        outcomes: list[DeliveryError | None] = []
        try:
            for d in deliveries:
                try:
                    await adapter.deliver(d)
                except DeliveryError as exc:
                    outcomes.append(exc)
                else:
                    outcomes.append(None)
        finally:
            await adapter.close()
        return outcomes

    return asyncio.run(go())


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- signing -----------------------------------------------------------------------------------


@TRANSPORTS
def test_signature_verifies_with_the_secret_and_not_with_another(
    make_settings: Any, transport: str
) -> None:
    with WebhookReceiver(SECRET) as receiver:
        assert run(make_settings(receiver.url), delivery(), transport=transport) == [None]
        (got,) = receiver.received
    assert got.verified is True
    Webhook(SECRET).verify(got.body, got.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(got.body, got.headers)


def test_two_secrets_give_two_signatures_both_verifiable(make_settings: Any) -> None:
    with WebhookReceiver(OLD_SECRET) as receiver:
        run(make_settings(receiver.url, secrets=(SECRET, OLD_SECRET)), delivery())
        (got,) = receiver.received
    signatures = got.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(s.startswith("v1,") for s in signatures)
    assert got.verified is True
    for secret in (SECRET, OLD_SECRET):
        Webhook(secret).verify(got.body, got.headers)


def test_ids_match_the_idempotency_key_and_stay_stable_across_attempts(
    make_settings: Any,
) -> None:
    with WebhookReceiver(SECRET, fail=fail_first(1)) as receiver:
        outcomes = run(make_settings(receiver.url), delivery(1), delivery(2))
        first, second = receiver.received
    assert isinstance(outcomes[0], RetriableDeliveryError)
    assert outcomes[1] is None
    key = delivery().idempotency_key
    for got in (first, second):
        assert got.headers["webhook-id"] == key
        assert got.headers["idempotency-key"] == key
        assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 5
        assert got.verified is True
    assert (first.status, second.status) == (503, 200)


@TRANSPORTS
def test_body_is_json_with_exact_decimals_and_rfc3339_times(
    make_settings: Any, transport: str
) -> None:
    with WebhookReceiver(SECRET) as receiver:
        run(
            make_settings(receiver.url, headers={"X-Tenant": "demo"}),
            delivery(),
            transport=transport,
        )
        (got,) = receiver.received
    assert got.method == "POST"
    assert got.headers["content-type"] == "application/json"
    assert got.headers["x-tenant"] == "demo"
    assert int(got.headers["content-length"]) == len(got.body)
    payload = json.loads(got.body)
    assert payload["entry_price"] == "1950.50"
    assert payload["exit_price"] == "1962.125"
    assert payload["commission"] == "-3.50"
    assert payload["swap"] == "0.00"
    assert payload["close_time"] == "2026-11-26T10:15:00.250Z"
    assert payload["side"] == "BUY"


# -- outcomes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_2xx_is_delivered(make_settings: Any, status: int) -> None:
    with WebhookReceiver(fail=always(status)) as receiver:
        assert run(make_settings(receiver.url), delivery()) == [None]


@TRANSPORTS
@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_temporary_statuses_are_retriable(make_settings: Any, transport: str, status: int) -> None:
    with WebhookReceiver(fail=always(status)) as receiver:
        (err,) = run(make_settings(receiver.url), delivery(), transport=transport)
    assert isinstance(err, RetriableDeliveryError)
    assert str(err) == f"HTTP {status} from webhook"
    assert err.retry_after is None


def test_retry_after_seconds_is_passed_on(make_settings: Any) -> None:
    with WebhookReceiver(fail=always(429, retry_after=7)) as receiver:
        (err,) = run(make_settings(receiver.url), delivery())
    assert isinstance(err, RetriableDeliveryError)
    assert err.retry_after == 7


def test_retry_after_http_date_is_passed_on(make_settings: Any) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    with WebhookReceiver(fail=always(503, retry_after=when)) as receiver:
        (err,) = run(make_settings(receiver.url), delivery())
    assert isinstance(err, RetriableDeliveryError)
    assert err.retry_after is not None
    assert 27 <= err.retry_after <= 31


def test_retry_after_parsing() -> None:
    now = datetime(2026, 11, 26, 10, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("0", now=now) == 0
    assert parse_retry_after(" 120 ", now=now) == 120
    assert parse_retry_after("Thu, 26 Nov 2026 10:01:30 GMT", now=now) == 90
    assert parse_retry_after("Thu, 26 Nov 2026 09:00:00 GMT", now=now) == 0  # past: now
    for unreadable in ("-5", "1.5", "soon", "", "Thu, 99 Foo 2026"):
        assert parse_retry_after(unreadable, now=now) is None
    assert parse_retry_after(None) is None


@TRANSPORTS
@pytest.mark.parametrize("status", [301, 400, 401, 404, 410, 422])
def test_other_statuses_are_fatal(make_settings: Any, transport: str, status: int) -> None:
    with WebhookReceiver(fail=always(status, retry_after=7)) as receiver:
        (err,) = run(make_settings(receiver.url), delivery(), transport=transport)
    assert isinstance(err, FatalDeliveryError)
    assert str(err) == f"HTTP {status} from webhook"


@TRANSPORTS
def test_connection_refused_is_retriable(make_settings: Any, transport: str) -> None:
    url = f"http://127.0.0.1:{closed_port()}/webhook"
    (err,) = run(make_settings(url), delivery(), transport=transport)
    assert isinstance(err, RetriableDeliveryError)
    assert str(err).startswith("connection error: ")
    assert err.__cause__ is not None


@TRANSPORTS
def test_a_receiver_slower_than_the_timeout_is_retriable(
    make_settings: Any, transport: str
) -> None:
    with WebhookReceiver(fail=slow(5)) as receiver:
        started = time.monotonic()
        (err,) = run(make_settings(receiver.url, timeout="200ms"), delivery(), transport=transport)
        elapsed = time.monotonic() - started
        assert receiver.wait_for(1, timeout=1)
    assert isinstance(err, RetriableDeliveryError)
    assert str(err) == "timeout after 200ms"
    assert elapsed < 1.5


@TRANSPORTS
def test_no_error_message_quotes_a_secret_the_body_or_the_url(
    make_settings: Any, transport: str
) -> None:
    def noisy(_: Received) -> Reply:
        return Reply(503, {"Retry-After": "soon", "X-Echo": SECRET}, f"{BODY_MARK}".encode())

    errors: list[DeliveryError | None] = []
    with WebhookReceiver(fail=noisy) as receiver:
        url = receiver.url.replace("http://", "http://user:pa55@") + f"?token={URL_TOKEN}"
        errors += run(make_settings(url), delivery(), transport=transport)
        got = receiver.received[0]
        receiver.set_policy(slow(5))
        errors += run(make_settings(url, timeout="100ms"), delivery(), transport=transport)
    assert got.path.endswith(f"token={URL_TOKEN}")  # the token did reach the receiver
    refused = f"http://user:pa55@127.0.0.1:{closed_port()}/webhook?token={URL_TOKEN}"
    errors += run(make_settings(refused), delivery(), transport=transport)
    assert all(isinstance(e, RetriableDeliveryError) for e in errors)
    forbidden = [SECRET, SECRET[6:], URL_TOKEN, "pa55", BODY_MARK, "1950.50", "127.0.0.1"]
    for err in errors:
        text = f"{err} {err!r}"
        assert not [f for f in forbidden if f in text], text


@TRANSPORTS
def test_credentials_in_the_url_are_sent_as_basic_auth(make_settings: Any, transport: str) -> None:
    with WebhookReceiver() as receiver:
        url = receiver.url.replace("http://", "http://us%40er:pa55@")
        assert run(make_settings(url), delivery(), transport=transport) == [None]
        (got,) = receiver.received
    assert got.headers["authorization"] == "Basic " + base64.b64encode(b"us@er:pa55").decode()


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["c2VjcmV0LWtleQ==", "whsec_", "whsec_not base64!", "WHSEC_c2VjcmV0LWtleQ=="]
)
def test_a_malformed_secret_fails_at_construction_without_its_value(
    make_settings: Any, bad: str
) -> None:
    settings = make_settings("http://127.0.0.1:9/webhook", secrets=(SECRET, bad))
    with pytest.raises(ConfigError) as info:
        WebhookAdapter(settings)
    assert str(info.value) == (
        "adapters.hook.secrets.1: expected a Standard Webhooks secret 'whsec_<base64>'"
    )


def test_a_missing_secret_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_WEBHOOK_UNSET", raising=False)
    settings = WebhookAdapterSettings.model_validate(
        {
            "type": "webhook",
            "name": "hook",
            "url": "http://127.0.0.1:9/",
            "secrets": [{"env": "TEST_WEBHOOK_UNSET"}],
        }
    )
    with pytest.raises(ConfigError, match=r"^adapters\.hook\.secrets\.0: .*TEST_WEBHOOK_UNSET"):
        WebhookAdapter(settings)


def test_extra_headers_cannot_replace_signed_ones(make_settings: Any) -> None:
    settings = make_settings("http://127.0.0.1:9/", headers={"Webhook-Id": "x"})
    with pytest.raises(ConfigError, match=r"^adapters\.hook\.headers: Webhook-Id"):
        WebhookAdapter(settings)


# -- the receiver itself -----------------------------------------------------------------------


def test_receiver_policies_swap_and_wait_for_uses_a_deadline() -> None:
    threads_before = threading.active_count()
    with WebhookReceiver(fail=always(500)) as receiver:
        with httpx.Client() as client:
            assert client.post(receiver.url, content=b"{}").status_code == 500
            receiver.set_policy(fail_first(2, 409))
            statuses = [
                client.post(receiver.url, headers={"webhook-id": "a"}).status_code for _ in range(3)
            ]
            receiver.set_policy(None)
            assert client.post(receiver.url, content=b"not json").status_code == 200
        assert statuses == [409, 409, 200]
        assert receiver.wait_for(5, timeout=1)
        assert receiver.wait_for(lambda got: got[-1].payload is None, timeout=1)
        started = time.monotonic()
        assert not receiver.wait_for(6, timeout=0.1)
        assert 0.09 <= time.monotonic() - started < 0.5
        got = receiver.received
        assert [r.seq for r in got] == [1, 2, 3, 4, 5]
        assert got[0].payload == {} and got[0].verified is None
        assert got[0].monotonic_ms <= got[-1].monotonic_ms
    assert threading.active_count() == threads_before


def test_fail_fraction_is_reproducible() -> None:
    def outcomes() -> list[bool]:
        policy = fail_fraction(0.3, seed=42)
        dummy = Received(1, 0.0, 0, "POST", "/", "?", {}, b"", None, 200, None)
        return [policy(dummy) is not None for _ in range(200)]

    first = outcomes()
    assert first == outcomes()
    assert 30 < sum(first) < 90


def test_receiver_runs_as_a_process_printing_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_RECEIVER_SECRET", SECRET)
    command = [
        sys.executable,
        "-m",
        "consumer.receiver",
        "--secret-env",
        "TEST_RECEIVER_SECRET",
        "--fail-first",
        "1",
        "--retry-after",
        "3",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stderr is not None and proc.stdout is not None
            url = json.loads(proc.stderr.readline())["listening"]
            with httpx.Client() as client:
                first = client.post(url, content=b'{"a":"1.10"}', headers={"webhook-id": "m1"})
                second = client.post(url, content=b'{"a":"1.10"}', headers={"webhook-id": "m1"})
            assert (first.status_code, first.headers["retry-after"]) == (503, "3")
            assert second.status_code == 200
            lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
        finally:
            proc.terminate()
            proc.wait(timeout=5)
    assert proc.returncode == 0
    assert [line["status"] for line in lines] == [503, 200]
    assert lines[0]["webhook_id"] == "m1"
    assert lines[0]["payload"] == {"a": "1.10"}
    assert lines[0]["verified"] is False  # unsigned


@TRANSPORTS
def test_path_and_query_are_sent_byte_for_byte_over_one_kept_alive_connection(
    make_settings: Any, transport: str
) -> None:
    with WebhookReceiver() as receiver:
        url = receiver.url + "/a%20b/c?token=t%2Fk&x=1"
        assert run(make_settings(url), delivery(), delivery(2), transport=transport) == [None, None]
        first, second = receiver.received
    assert first.path == second.path == "/webhook/a%20b/c?token=t%2Fk&x=1"
    assert first.peer == second.peer  # the second request reused the first one's connection
    assert first.headers["host"] == receiver.url.split("/")[2]
    assert first.headers["user-agent"].startswith("auto-trace/")
    assert first.headers["content-length"] == str(len(first.body))


def test_a_receiver_that_closes_after_each_answer_still_gets_every_delivery(
    make_settings: Any,
) -> None:
    closing = Reply(200, headers={"Connection": "close"})
    with WebhookReceiver(fail=lambda _: closing) as receiver:
        outcomes = run(make_settings(receiver.url), *(delivery(i) for i in range(1, 4)))
        assert outcomes == [None, None, None]
        assert len({r.peer for r in receiver.received}) == 3


@pytest.mark.parametrize("client", ["builtin", "aiohttp"])
def test_the_configured_client_is_the_one_that_posts(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    settings = make_settings("http://127.0.0.1:9/hook").model_copy(update={"client": client})
    adapter = build_adapter(settings)
    assert isinstance(adapter, WebhookAdapter)

    async def started() -> tuple[bool, bool]:
        await adapter.start()
        try:
            return adapter._pool is not None, adapter._session is not None
        finally:
            await adapter.close()

    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    assert asyncio.run(started()) == (client == "builtin", client == "aiohttp")


# -- proxies -----------------------------------------------------------------------------------


def test_the_proxy_from_the_environment_carries_the_request(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver stands in for a forward proxy: a proxied plain-HTTP request reaches it with
    # the destination's absolute URL, and the proxy's credentials as Proxy-Authorization.
    with WebhookReceiver() as proxy:
        where = proxy.url.split("/")[2]
        monkeypatch.setenv("HTTP_PROXY", f"http://px:s3cret@{where}")
        monkeypatch.delenv("http_proxy", raising=False)
        monkeypatch.setenv("NO_PROXY", "")
        monkeypatch.delenv("no_proxy", raising=False)
        assert run(make_settings("http://tracker.invalid/webhook"), delivery()) == [None]
        (got,) = proxy.received
    assert got.headers["host"] == "tracker.invalid"
    assert got.path == "/webhook"
    assert got.headers["proxy-authorization"] == "Basic " + base64.b64encode(b"px:s3cret").decode()


def test_no_proxy_sends_straight_to_the_receiver(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("no_proxy", raising=False)
    with WebhookReceiver() as receiver:
        assert run(make_settings(receiver.url), delivery()) == [None]
        assert len(receiver.received) == 1
    # And without the exemption the (closed) proxy is really used: the call fails.
    monkeypatch.setenv("NO_PROXY", "")
    with WebhookReceiver() as receiver:
        (err,) = run(make_settings(receiver.url), delivery())
        assert isinstance(err, RetriableDeliveryError)
        assert receiver.received == []
