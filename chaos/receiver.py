"""A webhook receiver process for the chaos run that records *everything* it is sent.

``python -m consumer.receiver`` prints the webhook-id and the parsed payload of each request;
the chaos checks need more: every header (``Idempotency-Key`` must be the same on every attempt
of a trade, and no header may carry a personal value) and the exact body bytes (scanned for
personal values as sent, before any JSON parsing). So this module runs the same
:class:`~consumer.receiver.WebhookReceiver` with the same failure policy, and prints one JSON
line per request with the headers and the body in base64 on stdout.

    python -m chaos.receiver --port N --secret-env VAR [--fail-fraction P --fail-status S]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from consumer.receiver import Policy, Received, WebhookReceiver, fail_fraction


def line_of(received: Received) -> str:
    """One request as a JSON line (the parser is :func:`chaos.run.parse_request_line`)."""
    return (
        json.dumps(
            {
                "seq": received.seq,
                "wall_ms": received.wall_ms,
                "status": received.status,
                "verified": received.verified,
                "headers": received.headers,
                "body_b64": base64.b64encode(received.body).decode("ascii"),
            },
            separators=(",", ":"),
        )
        + "\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.receiver",
        description="A webhook receiver printing every request (headers, body) as a JSON line.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret-env", metavar="VAR", required=True)
    parser.add_argument("--fail-fraction", type=float, default=0.0, metavar="P")
    parser.add_argument("--fail-status", type=int, default=503)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    secret = os.environ.get(args.secret_env)
    if not secret:
        sys.stderr.write(f"environment variable {args.secret_env} is not set or empty\n")
        return 2
    policy: Policy | None = None
    if args.fail_fraction:
        policy = fail_fraction(args.fail_fraction, args.seed, status=args.fail_status)

    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def emit(received: Received) -> None:
        # Called in the receiver's one server thread: lines never interleave.
        sys.stdout.write(line_of(received))
        sys.stdout.flush()

    with WebhookReceiver(
        secret, fail=policy, host=args.host, port=args.port, keep=False, on_receive=emit
    ) as receiver:
        sys.stderr.write(json.dumps({"listening": receiver.url}) + "\n")
        sys.stderr.flush()
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
