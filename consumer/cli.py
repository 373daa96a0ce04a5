"""The ``auto-trace`` command line. Every sub-command's ``--help`` says what it needs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import timedelta

from consumer import __version__, demo
from consumer.config import (
    SecretScope,
    Settings,
    check_secrets,
    format_duration,
    read_settings,
)
from consumer.errors import ConfigError

EXIT_USAGE = 2

DESCRIPTION = """\
Publishes each closed trade from the trading platform's trade.closed topic to independent
performance trackers, never before close_time + window, with every personal field removed.

Stages (one program, one role each): ingest (validate, strip personal data) -> release (hold
until due) -> sink (one worker per adapter: webhook, tracker, file) with tiered retries and a
dead-letter topic.
"""

EPILOG = """\
configuration:
  --config FILE (or AUTO_TRACE_CONFIG) names a YAML file; any value can be overridden by an
  environment variable AUTO_TRACE_<SECTION>__<KEY>, e.g. AUTO_TRACE_DELAY__WINDOW=10m.
  A bad setting exits with status 2 and names the field.

examples:
  auto-trace demo
  auto-trace topics create --dry-run --config auto-trace.yaml
  auto-trace topics create --config auto-trace.yaml
  auto-trace run --role all --config auto-trace.yaml
  auto-trace run --role sink --adapter my-webhook --config auto-trace.yaml
  auto-trace dlq stats --config auto-trace.yaml
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auto-trace",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"auto-trace {__version__}")
    config_help = "YAML configuration file (default: $AUTO_TRACE_CONFIG; none: defaults + env)"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="FILE", default=os.environ.get("AUTO_TRACE_CONFIG"), help=config_help
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run a stage until SIGTERM/SIGINT",
        description="Run one stage, or every stage in one process (--role all), until "
        "SIGTERM or SIGINT; then stop fetching, finish or hand back in-flight work, commit "
        "and exit 0 within shutdown.grace. Serves /metrics, /healthz and /readyz on "
        "metrics.port.",
    )
    run.add_argument(
        "--role",
        required=True,
        choices=["ingest", "release", "sink", "all"],
        help="ingest: trade.closed -> delay topic; release: delay topic -> sink topics when "
        "due; sink: one adapter's deliveries and retries; all: every stage as threads",
    )
    run.add_argument(
        "--adapter",
        metavar="NAME",
        help="with --role sink: which adapter (required when several are enabled)",
    )

    topics = sub.add_parser("topics", help="manage the topics the configuration implies")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    create = topics_sub.add_parser(
        "create",
        parents=[common],
        help="create every topic (idempotent)",
        description="Create every topic the configuration implies (delay; per adapter a "
        "sink topic and one retry topic per tier; the DLQ; the ingest DLQ), with partitions, "
        "replication and retention from config. Existing topics are left as they are.",
    )
    create.add_argument(
        "--dry-run", action="store_true", help="list the topics without contacting a broker"
    )

    demo_parser = sub.add_parser(
        "demo",
        help="watch sample trades go through the whole pipeline on this machine",
        description=demo.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)

    # Only listed here: `auto-trace dlq ...` is handed to consumer.dlq before this parser runs,
    # so its Kafka clients are imported only when it is used.
    sub.add_parser(
        "dlq",
        help="list, inspect and replay dead letters (auto-trace dlq --help)",
        add_help=False,
    )

    sub.add_parser(
        "local-broker",
        help="start a local Apache Kafka broker for development (KRaft, loopback)",
        description="Start the official Apache Kafka broker on loopback (resolved once with "
        "Maven into ~/.cache/auto-trace), or use $KAFKA_BOOTSTRAP_SERVERS / a Docker engine when "
        "present; print the bootstrap servers and run until Ctrl-C.",
    )
    return parser


def _settings(
    path: str | None, scope: SecretScope = "kafka", adapter: str | None = None
) -> Settings:
    """The configuration, with only the secrets of ``scope`` read (and required)."""
    settings = read_settings(path)
    check_secrets(settings, scope, adapter)
    return settings


def _topics_create(args: argparse.Namespace) -> int:
    from consumer.topics import create_topics, planned_topics

    settings = _settings(args.config)
    if args.dry_run:
        out = sys.stdout
        out.write(f"{'topic':<48} {'kind':<10} {'partitions':>10} {'replicas':>8}  retention\n")
        for spec in planned_topics(settings):
            retention = spec.config.get("retention.ms")
            if retention is None:
                shown = "broker default"
            elif int(retention) < 0:
                shown = "forever"
            else:
                shown = format_duration(timedelta(milliseconds=int(retention)))
            replicas = "default" if spec.replication_factor < 0 else str(spec.replication_factor)
            out.write(
                f"{spec.name:<48} {spec.kind:<10} {spec.partitions:>10} {replicas:>8}  {shown}\n"
            )
        return 0
    for spec, outcome in create_topics(settings):
        sys.stdout.write(f"{outcome:<8} {spec.name}\n")
    return 0


def _run(args: argparse.Namespace) -> int:
    from consumer import log
    from consumer.runner import Runner

    settings = _settings(args.config, args.role, args.adapter)
    log.configure(settings.logging.level, settings.logging.format)
    runner = Runner(settings, args.role, args.adapter)
    runner.install_signal_handlers()
    return runner.run()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["local-broker"]:
        # The broker has its own options and --help; hand them over untouched.
        from consumer import broker

        return broker.main(argv[1:])
    if argv[:1] == ["dlq"]:
        # Its own parser and --help, with sub-commands; imported only when used.
        from consumer import dlq

        return dlq.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "topics":
            return _topics_create(args)
        if args.command == "demo":
            return demo.main(args)
    except ConfigError as exc:
        sys.stderr.write(f"auto-trace: configuration error: {exc}\n")
        return EXIT_USAGE
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE
