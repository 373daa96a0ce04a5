"""Every rendered manifest is valid for the Kubernetes versions the chart supports.

Built-in kinds: the strict JSON schemas of the `kubernetes-validate` package (PyPI; generated
from Kubernetes' OpenAPI, unknown fields rejected), for the oldest version in Chart.yaml's
kubeVersion and the newest the package knows. Custom resources (ServiceMonitor, PrometheusRule,
ScaledObject): the schemas in helm/schemas/crds/, extracted from the projects' CRDs by
tools/fetch_crd_schemas.py (sources and versions recorded there and in each file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.helm.conftest import CHART, ROOT, SCENARIOS, scenario_args

CRD_SCHEMAS = ROOT / "helm" / "schemas" / "crds"
#: The oldest (Chart.yaml kubeVersion >=1.25) and the newest Kubernetes the package covers.
KUBERNETES_VERSIONS = ["1.25", kubernetes_validate.latest_version()]
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
}


@cache
def crd_validator(file: str) -> jsonschema.Draft4Validator:
    # openAPIV3Schema is OpenAPI 3.0's dialect, closest to draft 4 (boolean exclusiveMinimum).
    schema = json.loads((CRD_SCHEMAS / file).read_text(encoding="utf-8"))
    return jsonschema.Draft4Validator(schema)


def validate(manifest: dict[str, Any]) -> list[str]:
    kind = (manifest["apiVersion"], manifest["kind"])
    where = f"{manifest['kind']}/{manifest['metadata']['name']}"
    if kind in CUSTOM_KINDS:
        return [
            f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(CUSTOM_KINDS[kind]).iter_errors(manifest)
        ]
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.absolute_path))
            problems.append(f"{where} (Kubernetes {version}): {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc.message}")
    return problems


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_every_rendered_manifest_is_valid_kubernetes(render: Any, values: Path) -> None:
    manifests = render(*scenario_args(values))
    assert manifests
    problems = [p for m in manifests for p in validate(m)]
    assert not problems, "\n".join(problems)


def test_rules_and_dashboards_from_the_chart_files_are_valid(
    render: Any, chart_with_sample_files: Path
) -> None:
    """The PrometheusRule and dashboard ConfigMaps, even before files/ holds the real ones."""
    manifests = render(
        "-f", str(CHART / "ci" / "everything-values.yaml"), chart=chart_with_sample_files
    )
    assert {"PrometheusRule", "ConfigMap"} <= {m["kind"] for m in manifests}
    problems = [p for m in manifests for p in validate(m)]
    assert not problems, "\n".join(problems)


def test_validation_catches_a_broken_manifest(render: Any) -> None:
    """The validators are strict: a misspelt field and a wrong type are both reported."""
    manifests = render(*scenario_args(CHART / "ci" / "everything-values.yaml"))
    deployment = next(m for m in manifests if m["kind"] == "Deployment")
    deployment["spec"]["replicaz"] = 2
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    assert len(validate(deployment)) >= 2
    scaled = next(m for m in manifests if m["kind"] == "ScaledObject")
    scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 100  # KEDA wants strings
    scaled["spec"]["minReplicaCountt"] = 1
    assert len(validate(scaled)) >= 2
    deployment["spec"].pop("replicaz")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 9108


def test_crd_schemas_match_their_sources() -> None:
    """helm/schemas/crds/ is what tools/fetch_crd_schemas.py makes from the pinned modules."""
    if shutil.which("go") is None:
        if os.environ.get("CI"):
            pytest.fail("go is needed to fetch the CRD sources")
        pytest.skip("go is needed to fetch the CRD sources")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fetch_crd_schemas.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
