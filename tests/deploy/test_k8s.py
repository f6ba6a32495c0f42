"""The Kubernetes manifests parse, wire together, and probe /health."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
MANIFESTS = sorted(K8S.rglob("*.yaml"))


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def objects() -> dict[str, dict]:
    """The app's objects (what kustomization.yaml applies), by kind."""
    resources = load(K8S / "kustomization.yaml")[0]["resources"]
    return {doc["kind"]: doc for name in resources for doc in load(K8S / name)}


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(K8S)) for p in MANIFESTS])
def test_yaml_parses(path):
    docs = load(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_kustomization_lists_every_app_manifest():
    resources = load(K8S / "kustomization.yaml")[0]["resources"]
    top_level = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == top_level


def test_probes_point_to_health():
    (container,) = objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert get["port"] in port_names, probe
    startup = container["startupProbe"]
    # the first model conversion + kernel build must fit
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_deployment_secrets_and_draining():
    deployment = objects()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("OPTISERVE_API_KEY", "OPTISERVE_ADMIN_TOKEN"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    drain = float(container["args"][container["args"].index("--drain-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] > drain
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])


def test_service_monitor_and_hpa_wiring():
    objs = objects()
    pod_labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objs["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = objs["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    hpa = objs["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == objs["Deployment"]["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "optiserve_num_requests_waiting"


def test_adapter_rule_exposes_the_hpa_metric_identically_in_both_forms():
    configmap = load(K8S / "prometheus-adapter" / "configmap.yaml")[0]
    rules_cm = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    rules_helm = load(K8S / "prometheus-adapter" / "values.yaml")[0]["rules"]["custom"]
    assert rules_cm == rules_helm
    (rule,) = rules_cm
    assert rule["seriesQuery"].startswith("optiserve:num_requests_waiting{")
    assert rule["name"]["as"] == "optiserve_num_requests_waiting"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
