from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from consumer.cli import main
from consumer.config import (
    SecretScope,
    check_secrets,
    format_duration,
    load_settings,
    parse_duration,
    read_settings,
    secret_refs,
)
from consumer.errors import ConfigError

WEBHOOK = """
adapters:
  - name: hook
    type: webhook
    url: http://127.0.0.1:9/hook
    secrets: [{env: TEST_HOOK_SECRET}]
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TEST_HOOK_SECRET", "whsec_c2VjcmV0")
    path = tmp_path / "auto-trace.yaml"
    path.write_text("kafka: {bootstrap_servers: 'file:1'}\ndelay: {window: 10s}\n" + WEBHOOK)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("5s", timedelta(seconds=5)),
        ("30m", timedelta(minutes=30)),
        ("1h", timedelta(hours=1)),
        ("1.5s", timedelta(seconds=1.5)),
        (7, timedelta(seconds=7)),
    ],
)
def test_durations_are_read_in_every_documented_spelling(text: object, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["5", "5 minutes", "-1s", "", True])
def test_a_bad_duration_is_rejected(text: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_duration(text)


def test_durations_format_back_to_their_shortest_spelling() -> None:
    assert [
        format_duration(parse_duration(t)) for t in ["5s", "30s", "5m", "30m", "1h", "500ms"]
    ] == [
        "5s",
        "30s",
        "5m",
        "30m",
        "1h",
        "500ms",
    ]


def test_defaults_match_the_design() -> None:
    settings = load_settings()
    assert settings.input.topic == "trade.closed"
    assert settings.topics.prefix == "auto-trace"
    assert settings.delay.window == timedelta(minutes=5)
    assert [format_duration(t) for t in settings.retry.tiers] == ["5s", "30s", "5m", "30m", "1h"]


def test_environment_overrides_the_file_and_keeps_the_rest(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTO_TRACE_KAFKA__BOOTSTRAP_SERVERS", "env:2")
    monkeypatch.setenv("AUTO_TRACE_DELAY__MAX_CLOCK_SKEW", "1m")
    settings = load_settings(config_file)
    assert settings.kafka.bootstrap_servers == "env:2"
    assert settings.delay.window == timedelta(seconds=10)  # from the file
    assert settings.delay.max_clock_skew == timedelta(minutes=1)  # from the environment
    assert settings.adapters[0].name == "hook"


@pytest.mark.parametrize(
    ("yaml_text", "path_in_message"),
    [
        ("delay: {window: soon}", "delay.window"),
        ("input: {format: xml}", "input.format"),
        ("retry: {tiers: [30s, 5s]}", "retry.tiers"),
        ("kafka: {bootstrap_servers: a, unknown_key: 1}", "kafka.unknown_key"),
        ("adapters: [{name: x, type: carrier-pigeon}]", "adapters.0"),
        (
            "adapters: [{name: Bad Name, type: webhook, url: 'http://x', secrets: [{env: A}]}]",
            "adapters.0.webhook.name",
        ),
        ("input: {format: avro-confluent}", "input"),
        (
            "adapters: [{name: h, type: webhook, url: 'http://x', secrets: [{env: A}], "
            'headers: {"X-Team": "a\\r\\nX-Injected: 1"}}]',
            "adapters.0.webhook.headers",
        ),
        (
            "adapters: [{name: h, type: webhook, url: 'http://x', secrets: [{env: A}], "
            'headers: {"X Team": "a"}}]',
            "adapters.0.webhook.headers",
        ),
        (
            "adapters: [{name: h, type: webhook, url: 'http://x', secrets: [{env: A}], "
            "client: curl}]",
            "adapters.0.webhook.client",
        ),
    ],
)
def test_a_bad_setting_names_its_field(
    tmp_path: Path, yaml_text: str, path_in_message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert path_in_message in str(info.value)


def test_a_missing_secret_fails_at_start_up_naming_the_field_not_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_HOOK_SECRET", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(WEBHOOK)
    with pytest.raises(
        ConfigError, match=r"adapters\.0\.secrets\.0: environment variable TEST_HOOK_SECRET"
    ):
        load_settings(path)


def test_secret_values_never_appear_in_the_settings_repr(config_file: Path) -> None:
    settings = load_settings(config_file)
    secret = settings.adapters[0].secrets[0].resolve()  # type: ignore[union-attr]
    assert secret.get_secret_value() == "whsec_c2VjcmV0"
    assert "c2VjcmV0" not in repr(secret)


def test_cli_exits_2_with_one_line_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("delay: {window: soon}\n")
    assert main(["topics", "create", "--dry-run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("auto-trace: configuration error: delay.window")
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_rejects_a_file_that_is_not_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kafka: [unclosed\n")
    assert main(["topics", "create", "--dry-run", "--config", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_topics_dry_run_lists_every_topic_without_a_broker(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["topics", "create", "--dry-run", "--config", str(config_file)]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == [
        "auto-trace.delay",
        "auto-trace.sink.hook",
        "auto-trace.retry.hook.5s",
        "auto-trace.retry.hook.30s",
        "auto-trace.retry.hook.5m",
        "auto-trace.retry.hook.30m",
        "auto-trace.retry.hook.1h",
        "auto-trace.dlq",
        "auto-trace.dlq.ingest",
        "auto-trace.dlq.audit",
    ]


SCOPED = """
kafka:
  bootstrap_servers: 'file:1'
  client_secrets: {sasl.password: {env: T_KAFKA}}
input:
  schema_registry_url: http://127.0.0.1:9
  schema_registry_secrets: {basic.auth.user.info: {env: T_REGISTRY}}
adapters:
  - {name: hook, type: webhook, url: 'http://127.0.0.1:9/h', secrets: [{env: T_HOOK}]}
  - name: fx
    type: tracker
    base_url: http://127.0.0.1:9
    email: {env: T_FX_EMAIL}
    password: {env: T_FX_PASSWORD}
  - {name: old, type: webhook, url: 'http://127.0.0.1:9/o', secrets: [{env: T_OLD}],
     enabled: false}
"""

#: Scope -> the secret environment variables a process of that scope needs.
NEEDED = {
    ("ingest", None): {"T_KAFKA", "T_REGISTRY"},
    ("release", None): {"T_KAFKA"},
    ("kafka", None): {"T_KAFKA"},
    ("sink", "hook"): {"T_KAFKA", "T_HOOK"},
    ("sink", "fx"): {"T_KAFKA", "T_FX_EMAIL", "T_FX_PASSWORD"},
    ("all", None): {"T_KAFKA", "T_REGISTRY", "T_HOOK", "T_FX_EMAIL", "T_FX_PASSWORD"},
    (None, None): {"T_KAFKA", "T_REGISTRY", "T_HOOK", "T_FX_EMAIL", "T_FX_PASSWORD", "T_OLD"},
}


@pytest.mark.parametrize(("scope", "adapter"), list(NEEDED))
def test_each_process_reads_only_the_secrets_of_its_own_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scope: SecretScope | None,
    adapter: str | None,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SCOPED)
    settings = read_settings(path)
    needed = NEEDED[(scope, adapter)]
    assert {ref.env for _, ref in secret_refs(settings, scope, adapter)} == needed
    # Only those set: the check passes; without any one of them, it fails naming that one.
    for name in needed:
        monkeypatch.setenv(name, "x")
    check_secrets(settings, scope, adapter)
    for name in sorted(needed):
        monkeypatch.delenv(name)
        with pytest.raises(ConfigError, match=f"environment variable {name} "):
            check_secrets(settings, scope, adapter)
        monkeypatch.setenv(name, "x")


def test_a_lone_sink_without_adapter_reads_the_one_enabled_adapters_secrets(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kafka: {bootstrap_servers: 'file:1'}\n" + WEBHOOK)
    refs = secret_refs(read_settings(path), "sink")
    assert [(where, ref.env) for where, ref in refs] == [
        ("adapters.0.secrets.0", "TEST_HOOK_SECRET")
    ]
    # With several enabled, none: the stage itself refuses to start without --adapter.
    path.write_text(SCOPED)
    assert [ref.env for _, ref in secret_refs(read_settings(path), "sink")] == ["T_KAFKA"]


def test_dlq_starts_without_any_adapters_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from consumer import dlq

    path = tmp_path / "c.yaml"
    path.write_text(SCOPED)
    for name in ("T_REGISTRY", "T_HOOK", "T_FX_EMAIL", "T_FX_PASSWORD", "T_OLD"):
        monkeypatch.delenv(name, raising=False)
    # The command itself is not what is tested here: only what start-up requires.
    monkeypatch.setitem(dlq.COMMANDS, "list", lambda *_: 0)
    monkeypatch.setenv("T_KAFKA", "x")
    assert dlq.main(["list", "--config", str(path)]) == 0
    monkeypatch.delenv("T_KAFKA")
    assert dlq.main(["list", "--config", str(path)]) == 2
    assert "kafka.client_secrets.sasl.password: environment variable T_KAFKA" in (
        capsys.readouterr().err
    )


def test_run_checks_the_secrets_of_its_role(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consumer.cli import _settings

    path = tmp_path / "c.yaml"
    path.write_text(SCOPED)
    for name in ("T_REGISTRY", "T_HOOK", "T_FX_EMAIL", "T_FX_PASSWORD", "T_OLD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("T_KAFKA", "x")
    assert _settings(str(path), "release").adapters[0].name == "hook"
    with pytest.raises(ConfigError, match=r"adapters\.0\.secrets\.0: environment variable T_HOOK"):
        _settings(str(path), "sink", "hook")
    with pytest.raises(ConfigError, match=r"input\.schema_registry_secrets"):
        _settings(str(path), "ingest")
