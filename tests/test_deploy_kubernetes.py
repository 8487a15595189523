"""The Kubernetes manifests: schema-valid (kubernetes-validate --strict for built-in kinds;
the Prometheus Operator kinds checked here, since kubernetes-validate has no schema for
them), least privilege, and a PrometheusRule that carries exactly the rule file."""

from __future__ import annotations

import sys

import pytest
import yaml
from helpers.deploy import DEPLOY, load_yaml, rule_groups, run
from helpers.tools import KUBERNETES_VALIDATE, PROMTOOL

from mem_exporter.config import load_config

KUBE = DEPLOY / "kubernetes"
KUSTOMIZATION = load_yaml(KUBE / "kustomization.yaml")
MANIFESTS = [KUBE / name for name in KUSTOMIZATION["resources"]]
BUILTIN = [p for p in MANIFESTS if load_yaml(p)["apiVersion"] != "monitoring.coreos.com/v1"]
OPERATOR = [p for p in MANIFESTS if p not in BUILTIN]


def _containers():
    pod = load_yaml(KUBE / "daemonset.yaml")["spec"]["template"]["spec"]
    return pod, {c["name"]: c for c in pod["containers"]}


@pytest.mark.parametrize("path", BUILTIN, ids=[p.name for p in BUILTIN])
def test_builtin_manifest_passes_kubernetes_validate_strict(path):
    result = run(KUBERNETES_VALIDATE, "--strict", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed for resource" in result.stdout + result.stderr


def test_generated_configmap_passes_kubernetes_validate_strict(tmp_path):
    [generator] = KUSTOMIZATION["configMapGenerator"]
    data = {f.split("/")[-1]: (KUBE / f).read_text() for f in generator["files"]}
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": generator["name"], "namespace": KUSTOMIZATION["namespace"]},
        "data": data,
    }
    path = tmp_path / "configmap.yaml"
    path.write_text(yaml.safe_dump(manifest))
    result = run(KUBERNETES_VALIDATE, "--strict", str(path))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "passed for resource" in output, output


@pytest.mark.parametrize("path", OPERATOR, ids=[p.name for p in OPERATOR])
def test_kubernetes_validate_has_no_schema_for_operator_kinds(path):
    """Documents the gap: kubernetes-validate passes these unchecked, so the tests below check them."""
    result = run(KUBERNETES_VALIDATE, "--strict", str(path))
    assert result.returncode == 0
    assert "Couldn't find schema" in result.stdout + result.stderr


def test_kubernetes_config_is_valid():
    config = load_config(KUBE / "config" / "mem-exporter.yaml")
    assert config.enforcer.dry_run


def test_pod_shares_the_host_pid_namespace_and_tolerates_gpu_nodes():
    pod, containers = _containers()
    assert pod["hostPID"] is True
    assert set(containers) == {"exporter", "enforcer"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    [generator] = KUSTOMIZATION["configMapGenerator"]
    assert {"name": "config", "configMap": {"name": generator["name"]}} in pod["volumes"]


def test_exporter_is_read_only_non_root_without_capabilities():
    _, containers = _containers()
    ctx = containers["exporter"]["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}


def test_enforcer_adds_only_the_kill_capability():
    _, containers = _containers()
    ctx = containers["enforcer"]["securityContext"]
    assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["KILL", "IPC_LOCK"]}
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False


def test_every_container_has_resources():
    _, containers = _containers()
    for name, container in containers.items():
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], name


def test_servicemonitor_scrapes_both_service_ports_as_the_expected_jobs():
    service = load_yaml(KUBE / "service.yaml")
    monitor = load_yaml(KUBE / "servicemonitor.yaml")
    assert monitor["kind"] == "ServiceMonitor"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "jobLabel", "namespaceSelector"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    jobs = {}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports
        assert set(endpoint) <= {"port", "interval", "path", "relabelings", "metricRelabelings", "scrapeTimeout"}
        for relabel in endpoint.get("relabelings", []):
            assert set(relabel) <= {"sourceLabels", "targetLabel", "replacement", "regex", "action", "separator"}
            if relabel["targetLabel"] == "job":
                jobs[endpoint["port"]] = relabel["replacement"]
    assert jobs == {"metrics": "mem-exporter", "enforcer": "mem-exporter-enforcer"}


def test_prometheusrule_matches_the_rule_file():
    result = run(sys.executable, str(KUBE / "gen_prometheusrule.py"), "--check")
    assert result.returncode == 0, result.stderr
    resource = load_yaml(KUBE / "prometheusrule.yaml")
    assert resource["kind"] == "PrometheusRule" and set(resource["spec"]) == {"groups"}
    assert resource["spec"] == {"groups": rule_groups()}  # every file in deploy/prometheus/rules/


def test_prometheusrule_spec_passes_promtool_check_rules(tmp_path):
    path = tmp_path / "spec.rules.yml"
    path.write_text(yaml.safe_dump(load_yaml(KUBE / "prometheusrule.yaml")["spec"]))
    result = run(PROMTOOL, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_probes_ask_healthz_which_reports_stale_sampling():
    _, containers = _containers()
    for name, container in containers.items():
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/healthz", (name, probe)
