"""The chart's promises, checked on `helm template` output.

One Deployment per stage and per enabled adapter; secrets only by reference; probes and the
restricted security context everywhere; the topics hook Job; names that agree with the code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.config import SecretScope, Settings, secret_refs
from consumer.topics import delay_topic, sink_group, sink_topic
from tests.helm.conftest import (
    CHART,
    RELEASE,
    ROOT,
    SCENARIOS,
    RenderError,
    config_of,
    containers,
    of_kind,
    run_helm,
    scenario_args,
)

CONFIG_PATH = "/etc/auto-trace/config.yaml"
CI = CHART / "ci"


def name(suffix: str) -> str:
    return f"{RELEASE}-auto-trace-{suffix}"


def scenario(render: Any, stem: str) -> list[dict[str, Any]]:
    manifests: list[dict[str, Any]] = render(*scenario_args(CI / f"{stem}-values.yaml"))
    return manifests


def workloads(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] in ("Deployment", "Job")]


# --- lint ------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *SCENARIOS], ids=lambda p: p.stem if p else "defaults")
def test_chart_passes_helm_lint_strict(helm: str, values: Path | None) -> None:
    args = scenario_args(values) if values else []
    out = run_helm(helm, "lint", "--strict", str(CHART), *args)
    assert out.returncode == 0, out.stdout + out.stderr


# --- one Deployment per stage ----------------------------------------------------------------


def test_one_sink_deployment_per_enabled_adapter(render: Any) -> None:
    manifests = scenario(render, "several-adapters")
    deployments = of_kind(manifests, "Deployment")
    assert set(deployments) == {
        name("ingest"),
        name("release"),
        name("sink-mirror"),
        name("sink-myfxbook"),
        name("sink-audit-export"),  # adapter names may hold "_", Kubernetes names may not
        name("sink-archive"),
    }  # and none for the disabled adapter "paused"
    args = {n: containers(d)[0]["args"] for n, d in deployments.items()}
    assert args[name("ingest")] == ["run", "--role", "ingest", "--config", CONFIG_PATH]
    assert args[name("release")] == ["run", "--role", "release", "--config", CONFIG_PATH]
    assert args[name("sink-audit-export")] == [
        "run",
        "--role",
        "sink",
        "--adapter",
        "audit_export",
        "--config",
        CONFIG_PATH,
    ]
    for deployment in deployments.values():
        assert containers(deployment)[0]["command"] == ["auto-trace"]


def test_each_stage_has_its_own_replicas_resources_and_selector(render: Any) -> None:
    manifests = scenario(render, "several-adapters")
    deployments = of_kind(manifests, "Deployment")
    replicas = {n: d["spec"]["replicas"] for n, d in deployments.items()}
    assert replicas[name("ingest")] == 2
    assert replicas[name("sink-mirror")] == 2
    assert replicas[name("sink-myfxbook")] == 1
    limits = containers(deployments[name("sink-audit-export")])[0]["resources"]["limits"]
    assert limits == {"memory": "1Gi"}
    assert containers(deployments[name("sink-mirror")])[0]["resources"]["limits"] == {
        "memory": "512Mi"
    }
    # Only the adapter with a PVC gets it.
    mounts = containers(deployments[name("sink-audit-export")])[0]["volumeMounts"]
    assert {"name": "export", "mountPath": "/var/lib/auto-trace/export"} in mounts
    assert all(
        m["name"] != "export"
        for m in containers(deployments[name("sink-mirror")])[0]["volumeMounts"]
    )
    # Selectors never overlap: a pod belongs to exactly one Deployment.
    selectors = [
        tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for d in deployments.values()
    ]
    assert len(set(selectors)) == len(selectors)
    for deployment in deployments.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # `podDisruptionBudget.enabled: false` in an override does switch it off.
    pdbs = of_kind(manifests, "PodDisruptionBudget")
    assert name("sink-myfxbook") not in pdbs
    assert name("sink-mirror") in pdbs


def test_deployment_and_keda_names_agree_with_the_code(render: Any) -> None:
    """Consumer groups and topics the chart hands to KEDA are the ones auto-trace uses."""
    manifests = scenario(render, "everything")
    settings = Settings(**config_of(manifests))
    scaled = of_kind(manifests, "ScaledObject")
    triggers = {n: s["spec"]["triggers"][0]["metadata"] for n, s in scaled.items()}
    assert triggers[name("ingest")]["topic"] == settings.input.topic
    assert triggers[name("ingest")]["consumerGroup"] == settings.input.group
    assert triggers[name("release")]["topic"] == delay_topic(settings)
    assert triggers[name("release")]["consumerGroup"] == settings.delay.group
    assert triggers[name("sink-mirror")]["topic"] == sink_topic(settings, "mirror")
    assert triggers[name("sink-mirror")]["consumerGroup"] == sink_group(settings, "mirror")
    assert name("sink-myfxbook") not in scaled  # autoscaling switched off by its override
    for n, metadata in triggers.items():
        assert all(isinstance(v, str) for v in metadata.values()), n
        assert metadata["bootstrapServers"] == settings.kafka.bootstrap_servers
    deployments = of_kind(manifests, "Deployment")
    for n, deployment in deployments.items():
        # KEDA owns the replica count of a scaled Deployment; the others keep theirs.
        assert ("replicas" in deployment["spec"]) == (n not in scaled), n
        if n in scaled:
            assert scaled[n]["spec"]["scaleTargetRef"]["name"] == n


def test_sasl_trigger_authentication_is_passed_by_reference(render: Any) -> None:
    scaled = of_kind(scenario(render, "sasl-ssl"), "ScaledObject")
    trigger = scaled[name("ingest")]["spec"]["triggers"][0]
    assert trigger["authenticationRef"] == {"name": "auto-trace-kafka"}
    assert trigger["metadata"]["sasl"] == "scram_sha512"


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_rendered_configuration_is_accepted_by_auto_trace(render: Any, values: Path) -> None:
    manifests = render(*scenario_args(values))
    settings = Settings(**config_of(manifests))  # raises on any key auto-trace does not know
    sinks = {
        d["metadata"]["labels"]["auto-trace/adapter"]
        for d in of_kind(manifests, "Deployment").values()
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "sink"
    }
    assert sinks == {a.name for a in settings.enabled_adapters()}
    # The hook Job reads the same configuration as the Deployments.
    assert config_of(manifests, name("topics")) == config_of(manifests)


def test_auto_trace_starts_from_the_rendered_configuration_and_secret_env(
    render: Any, tmp_path: Path
) -> None:
    """The real CLI reads the ConfigMap's file and requires the secrets of its own work only:
    the topics Job runs without the webhook's signing key, which the sink stops without, at
    start-up, naming it."""
    manifests = scenario(render, "minimal")
    config = tmp_path / "config.yaml"
    config.write_text(of_kind(manifests, "ConfigMap")[name("")[:-1]]["data"]["config.yaml"])
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AUTO_TRACE_")}
    env.pop("MIRROR_WEBHOOK_SECRET", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "consumer", *args, "--config", str(config)]
        return subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=ROOT, check=False
        )

    out = cli("topics", "create", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "auto-trace.sink.mirror" in out.stdout
    out = cli("run", "--role", "sink", "--adapter", "mirror")
    assert out.returncode == 2
    assert "adapters.0.secrets.0: environment variable MIRROR_WEBHOOK_SECRET" in out.stderr


def test_config_defaults_in_values_are_auto_trace_defaults(render: Any) -> None:
    """values.yaml spells out auto-trace's defaults; it must not drift from the code's."""
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["config"]
    from_chart = Settings(**values).model_dump()
    defaults = Settings().model_dump()
    # The one deliberate difference: a Service name instead of localhost.
    from_chart["kafka"].pop("bootstrap_servers")
    defaults["kafka"].pop("bootstrap_servers")
    assert from_chart == defaults


def test_pods_roll_when_the_configuration_changes(render: Any) -> None:
    def checksums(*args: str) -> set[str]:
        deployments = of_kind(render(*args), "Deployment").values()
        return {
            d["spec"]["template"]["metadata"]["annotations"]["checksum/config"] for d in deployments
        }

    before = checksums(*scenario_args(CI / "minimal-values.yaml"))
    after = checksums(
        *scenario_args(CI / "minimal-values.yaml"), "--set", "config.delay.window=10m"
    )
    assert len(before) == 1
    assert before != after


# --- secrets ---------------------------------------------------------------------------------


def _secret_refs(node: Any) -> list[dict[str, str]]:
    if isinstance(node, dict):
        if len(node) == 1 and set(node) <= {"env", "file"}:
            return [node]
        return [r for v in node.values() for r in _secret_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _secret_refs(v)]
    return []


#: The component label of a workload -> the scope auto-trace checks its secrets in.
_SCOPES: dict[str, SecretScope] = {
    "ingest": "ingest",
    "release": "release",
    "sink": "sink",
    "topics": "kafka",
}


def _scope_refs(settings: Settings, workload: dict[str, Any]) -> list[dict[str, str]]:
    """The secret references auto-trace itself reads at start-up in this workload
    (:func:`consumer.config.secret_refs`), so that the chart and the code cannot drift apart."""
    labels = workload["metadata"]["labels"]
    scope = _SCOPES[labels["app.kubernetes.io/component"]]
    refs = secret_refs(settings, scope, labels.get("auto-trace/adapter"))
    return [{"env": r.env} if r.env is not None else {"file": str(r.file)} for _, r in refs]


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_secrets_are_never_inlined(render: Any, values: Path) -> None:
    manifests = render(*scenario_args(values))
    assert not of_kind(manifests, "Secret"), "the chart must never create a Secret"
    given = yaml.safe_load(values.read_text())
    plain = {e["name"] for e in given.get("extraEnv", [])}
    secret_env = set(given.get("secretEnv", {}))
    config = config_of(manifests)
    refs = _secret_refs(config)
    named = {r["env"] for r in refs if "env" in r}
    settings = Settings(**config)
    for workload in workloads(manifests):
        own = _scope_refs(settings, workload)
        for container in containers(workload):
            env = {e["name"]: e for e in container.get("env", [])}
            for env_name, entry in env.items():
                if env_name in plain:
                    continue
                # Everything else comes from an existing Secret, never a value.
                assert set(entry) == {"name", "valueFrom"}, (workload["metadata"]["name"], entry)
                assert set(entry["valueFrom"]) == {"secretKeyRef"}
            # Exactly the secrets of its own work (auto-trace checks those at start-up), and
            # those the configuration does not name (meant for something else).
            from_secrets = {n for n in env if n not in plain}
            expected = {r["env"] for r in own if "env" in r} | (secret_env - named)
            assert from_secrets == expected, workload["metadata"]["name"]
            mounted = [m["mountPath"] for m in container["volumeMounts"]]
            for ref in own:
                if "file" in ref:
                    assert any(ref["file"].startswith(p + "/") for p in mounted), ref
            # A secret mount whose files only another stage reads is not there.
            for mount in given.get("secretMounts", {}).values():
                path = mount["mountPath"].rstrip("/") + "/"
                files = [r["file"] for r in refs if "file" in r]
                wanted = any(f.startswith(path) for f in files if {"file": f} in own) or not any(
                    f.startswith(path) for f in files
                )
                where = (workload["metadata"]["name"], path)
                assert (mount["mountPath"] in mounted) == wanted, where
    assert secret_env <= named | plain


def test_each_pod_holds_only_its_own_credentials(render: Any) -> None:
    """The several-adapters scenario spelled out: the tracker's login never reaches ingest,
    release, another adapter's sink or the topics Job."""
    manifests = scenario(render, "several-adapters")

    def secrets_of(workload: dict[str, Any]) -> tuple[set[str], set[str]]:
        container = containers(workload)[0]
        env = {e["name"] for e in container.get("env", []) if "valueFrom" in e}
        mounts = {m["name"] for m in container["volumeMounts"] if m["name"].startswith("secret-")}
        return env, mounts

    by_name = {w["metadata"]["name"]: w for w in workloads(manifests)}
    tracker = ({"MYFXBOOK_EMAIL"}, {"secret-myfxbook"})
    env, mounts = secrets_of(by_name[name("sink-myfxbook")])
    assert tracker[0] <= env and tracker[1] <= mounts
    for other in ("ingest", "release", "sink-mirror", "topics"):
        env, mounts = secrets_of(by_name[name(other)])
        assert not (env & tracker[0]) and not (mounts & tracker[1]), other
    env, _ = secrets_of(by_name[name("sink-mirror")])
    assert {"MIRROR_WEBHOOK_SECRET", "MIRROR_WEBHOOK_SECRET_OLD"} <= env
    assert "MIRROR_WEBHOOK_SECRET" not in secrets_of(by_name[name("ingest")])[0]


@pytest.mark.parametrize(
    ("flag", "setting", "message"),
    [
        ("--set", "config.kafka.client.sasl\\.password=hunter2", "looks like a secret"),
        ("--set", "config.kafka.client.ssl\\.key\\.password=hunter2", "looks like a secret"),
        (
            "--set",
            "config.kafka.client.sasl\\.oauthbearer\\.client\\.secret=s",
            "looks like a secret",
        ),
        (
            "--set",
            "config.input.schema_registry_url=https://u:pw@registry:8081",
            "carries credentials",
        ),
        ("--set", "config.adapters[0].headers.Authorization=Bearer x", "headers are not secret"),
        ("--set", "config.adapters[0].url=https://u:pw@tracker.example/h", "carries credentials"),
        ("--set", "secretEnv=null", "secretEnv has no entry for it"),
        (
            "--set-json",
            'config.adapters[0].secrets=[{"file": "/etc/hook/secret"}]',
            "no secretMounts entry mounts",
        ),
    ],
)
def test_a_secret_written_in_values_or_unbacked_is_refused(
    render: Any, flag: str, setting: str, message: str
) -> None:
    with pytest.raises(RenderError, match=message):
        render("-f", str(CI / "minimal-values.yaml"), flag, setting)


@pytest.mark.parametrize(
    ("flag", "setting", "message"),
    [
        ("--set", "sink.overrides.mirorr.replicas=1", "no adapter of that name"),
        ("--set", "config.metrics.host=127.0.0.1", "only reachable from inside the pod"),
        (
            "--set-json",
            'config.adapters[1]={"name": "export", "type": "file", "path": "/data/export"}',
            "no volume is mounted there",
        ),
    ],
)
def test_a_deployment_that_could_not_work_is_refused(
    render: Any, flag: str, setting: str, message: str
) -> None:
    with pytest.raises(RenderError, match=message):
        render("-f", str(CI / "minimal-values.yaml"), flag, setting)


# --- pods ------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_probes_and_restricted_security_context_everywhere(render: Any, values: Path) -> None:
    manifests = render(*scenario_args(values))
    config = config_of(manifests)
    for workload in workloads(manifests):
        pod = workload["spec"]["template"]["spec"]
        where = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["enableServiceLinks"] is False, where
        for container in containers(workload):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["runAsNonRoot"] is True, where
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], where
        if workload["kind"] != "Deployment":
            continue
        (container,) = containers(workload)
        assert container["ports"] == [
            {"name": "metrics", "containerPort": config["metrics"]["port"], "protocol": "TCP"}
        ]
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert pod["terminationGracePeriodSeconds"] > _seconds(config["shutdown"]["grace"])


def _seconds(value: str | float) -> float:
    from consumer.config import parse_duration

    result = parse_duration(value)
    assert isinstance(result, timedelta)
    return result.total_seconds()


@pytest.mark.parametrize(
    ("grace", "expected"), [("30s", 45), ("2m", 135), ("1500ms", 17), ("90", 105), ("0.5h", 1815)]
)
def test_termination_grace_period_is_above_the_shutdown_grace(
    render: Any, grace: str, expected: int
) -> None:
    manifests = render(
        "-f",
        str(CI / "minimal-values.yaml"),
        "--set-string" if grace != "90" else "--set",
        f"config.shutdown.grace={grace}",
    )
    for deployment in of_kind(manifests, "Deployment").values():
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == expected


def test_metrics_port_follows_the_configuration(render: Any) -> None:
    manifests = render("-f", str(CI / "minimal-values.yaml"), "--set", "config.metrics.port=9200")
    service = of_kind(manifests, "Service")[name("metrics")]
    assert service["spec"]["ports"][0]["port"] == 9200
    assert service["spec"]["clusterIP"] == "None"
    for deployment in of_kind(manifests, "Deployment").values():
        assert containers(deployment)[0]["ports"][0]["containerPort"] == 9200
    with pytest.raises(RenderError, match="port"):
        render("-f", str(CI / "minimal-values.yaml"), "--set", "config.metrics.port=0")


# --- the topics hook -------------------------------------------------------------------------


def test_topics_job_runs_topics_create_before_install_and_upgrade(render: Any) -> None:
    manifests = scenario(render, "sasl-ssl")
    job = of_kind(manifests, "Job")[name("topics")]
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    (container,) = containers(job)
    assert container["command"] == ["auto-trace"]
    assert container["args"] == ["topics", "create", "--config", CONFIG_PATH]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    # Hooks run before the release's resources exist: its ConfigMap and ServiceAccount are
    # hooks too, created first (lower weight).
    config_volume = next(
        v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    )
    hook_config = of_kind(manifests, "ConfigMap")[config_volume["configMap"]["name"]]
    sa = of_kind(manifests, "ServiceAccount")[job["spec"]["template"]["spec"]["serviceAccountName"]]
    for dependency in (hook_config, sa):
        hook = dependency["metadata"]["annotations"]
        assert hook["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert int(hook["helm.sh/hook-weight"]) < int(annotations["helm.sh/hook-weight"])
    # Kafka credentials reach the Job too (it talks to the broker).
    env = {e["name"] for e in container["env"]}
    assert "KAFKA_SASL_PASSWORD" in env
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/run/secrets/kafka-ca" in mounts


def test_topics_job_can_be_switched_off(render: Any) -> None:
    manifests = render("-f", str(CI / "minimal-values.yaml"), "--set", "topicsJob.enabled=false")
    assert not of_kind(manifests, "Job")
    assert name("topics") not in of_kind(manifests, "ConfigMap")


# --- optional parts --------------------------------------------------------------------------


def test_optional_parts_are_off_by_default(render: Any) -> None:
    kinds = {m["kind"] for m in scenario(render, "minimal")}
    assert kinds == {
        "ConfigMap",
        "ServiceAccount",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "Job",
    }


def test_everything_scenario_renders_every_optional_part(render: Any) -> None:
    kinds = {m["kind"] for m in scenario(render, "everything")}
    assert {"ServiceMonitor", "ScaledObject", "NetworkPolicy"} <= kinds


def test_service_monitor_scrapes_the_metrics_service(render: Any) -> None:
    manifests = scenario(render, "everything")
    (monitor,) = of_kind(manifests, "ServiceMonitor").values()
    service = of_kind(manifests, "Service")[name("metrics")]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # job="auto-trace" whatever the release is called: the alert rules select on it.
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert service["metadata"]["labels"]["app.kubernetes.io/name"] == "auto-trace"
    # The Service selects the stages' pods, not the topics Job's.
    selected = service["spec"]["selector"].items()
    for deployment in of_kind(manifests, "Deployment").values():
        assert selected <= deployment["spec"]["template"]["metadata"]["labels"].items()
    for job in of_kind(manifests, "Job").values():
        assert not selected <= job["spec"]["template"]["metadata"]["labels"].items()


def test_network_policy_admits_only_the_metrics_port(render: Any) -> None:
    manifests = scenario(render, "everything")
    (policy,) = of_kind(manifests, "NetworkPolicy").values()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress["from"][0]["namespaceSelector"]
    egress_ports = [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]]
    assert egress_ports == [53, 53, 9092, 443]


def test_dashboards_and_alert_rules_come_from_the_chart_files(
    render: Any, chart_with_sample_files: Path
) -> None:
    manifests = render("-f", str(CI / "everything-values.yaml"), chart=chart_with_sample_files)
    dashboards = [
        m
        for m in of_kind(manifests, "ConfigMap").values()
        if m["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    (dashboard,) = dashboards
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Trading"}
    assert dashboard["data"]["sample-overview.json"] == (
        chart_with_sample_files / "files" / "dashboards" / "sample-overview.json"
    ).read_text().rstrip("\n")
    (rule,) = of_kind(manifests, "PrometheusRule").values()
    expected = yaml.safe_load(
        (chart_with_sample_files / "files" / "alerts" / "auto-trace.rules.yaml").read_text()
    )
    assert rule["spec"] == expected  # `{{ $labels.adapter }}` reaches Prometheus untouched
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_chart_refuses_to_enable_rules_it_does_not_have(
    render: Any, chart_with_sample_files: Path
) -> None:
    (chart_with_sample_files / "files" / "alerts" / "auto-trace.rules.yaml").unlink()
    with pytest.raises(RenderError, match=r"has no files/alerts/auto-trace\.rules\.yaml"):
        render("--set", "prometheusRule.enabled=true", chart=chart_with_sample_files)


def test_the_chart_ships_its_real_dashboards_and_rules(render: Any) -> None:
    dashboard_files = sorted((CHART / "files" / "dashboards").glob("*.json"))
    if not dashboard_files and not (CHART / "files" / "alerts" / "auto-trace.rules.yaml").exists():
        pytest.skip("files/dashboards and files/alerts are still empty")
    manifests = render(*scenario_args(CI / "everything-values.yaml"))
    shipped = {
        key
        for m in of_kind(manifests, "ConfigMap").values()
        if m["metadata"]["labels"].get("grafana_dashboard") == "1"
        for key in m["data"]
    }
    assert shipped == {p.name for p in dashboard_files}
    for path in dashboard_files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), f"{path.name} is not JSON"
    rules_file = CHART / "files" / "alerts" / "auto-trace.rules.yaml"
    if rules_file.exists():
        (rule,) = of_kind(manifests, "PrometheusRule").values()
        assert rule["spec"]["groups"] == yaml.safe_load(rules_file.read_text())["groups"]


# --- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        "ingest.replicaz=2",  # a typo
        "config.adapters[0].name=Not_Valid",
        "config.adapters[0].type=carrier-pigeon",
        "config.delay.window=soon",
        "image.pullPolicy=Sometimes",
        "secretEnv.MIRROR_WEBHOOK_SECRET.key=null",
    ],
)
def test_values_schema_refuses_bad_values(render: Any, setting: str) -> None:
    with pytest.raises(RenderError):
        render("-f", str(CI / "minimal-values.yaml"), "--set", setting)


#: Blocks documented as a whole by the comment above them (Kubernetes objects passed through).
_OPAQUE = re.compile(
    r"^(podSecurityContext|securityContext|probes\.\w+|\w+\.resources|sink\.overrides)\."
)


def test_every_value_has_a_comment_above_it() -> None:
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    path: list[tuple[int, str]] = []
    missing = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while path and path[-1][0] >= indent:
            path.pop()
        path.append((indent, key))
        dotted = ".".join(k for _, k in path)
        if _OPAQUE.match(dotted):
            continue
        if not lines[number - 1].lstrip().startswith("#"):
            missing.append(dotted)
    assert not missing, f"values without a comment above them: {missing}"


def test_notes_name_every_deployment(render: Any, tmp_path: Path) -> None:
    # `helm install --dry-run` insists on a cluster; render NOTES.txt through a template instead.
    chart = tmp_path / "auto-trace"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ include "auto-trace/templates/NOTES.txt" . | toJson }}}\n'
    )
    manifests = render("-f", str(CI / "several-adapters-values.yaml"), chart=chart)
    notes = of_kind(manifests, "ConfigMap")["notes"]["data"]["notes"]
    for suffix in ("ingest", "release", "sink-mirror", "sink-audit-export"):
        assert f"{name(suffix)}: auto-trace run --role" in notes
    assert "sink-paused" not in notes
    assert "15m" in notes  # the configured window
