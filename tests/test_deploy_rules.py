"""The Prometheus alert rules: valid, unit-tested for firing and for staying quiet,
annotated, linked to the runbook; the lab's Prometheus config is valid."""

from __future__ import annotations

import re

import pytest
from helpers.deploy import (
    DEPLOY,
    METRICS,
    RULE_FILES,
    RULE_TESTS,
    RUNBOOK_BASE,
    alert_rules,
    load_yaml,
    metric_names,
    recorded_names,
    recording_rules,
    run,
    runbook_anchors,
)
from helpers.tools import PROMTOOL

from mem_exporter.zones import DEFAULT_ZONES

ALERTS = alert_rules()
ALERT_NAMES = sorted({rule["alert"] for rule in ALERTS})


def _ids(rules):
    return [f"{r['alert']}-{r['labels']['severity']}" for r in rules]


def test_rule_files_pass_promtool_check_rules():
    assert RULE_FILES
    result = run(PROMTOOL, "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_load_every_rule_file():
    for path in RULE_TESTS:
        assert load_yaml(path)["rule_files"] == ["../rules/*.rules.yml"], path.name


@pytest.mark.parametrize("rule", recording_rules(), ids=[r["record"] for r in recording_rules()])
def test_every_recording_rule_has_a_unit_test_and_uses_published_metrics(rule):
    tested = {
        case["expr"]
        for path in RULE_TESTS
        for test in load_yaml(path)["tests"]
        for case in test.get("promql_expr_test", [])
    }
    assert any(rule["record"] in expr for expr in tested), f"no promql_expr_test reads {rule['record']}"
    unknown = metric_names(rule["expr"]) - METRICS
    assert not unknown, f"{rule['record']}: unknown metrics {sorted(unknown)}"


@pytest.mark.slow
def test_rule_unit_tests_pass_promtool_test_rules():
    assert RULE_TESTS, "no deploy/prometheus/tests/*.test.yml"
    result = run(PROMTOOL, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


def _alert_cases():
    """alertname -> list of (test name, expected alerts) over every rule unit test."""
    cases: dict[str, list[tuple[str, list]]] = {}
    for path in RULE_TESTS:
        for test in load_yaml(path)["tests"]:
            for case in test.get("alert_rule_test", []):
                expected = case.get("exp_alerts") or []
                cases.setdefault(case["alertname"], []).append((test.get("name", path.name), expected))
    return cases


@pytest.mark.parametrize("alertname", ALERT_NAMES)
def test_every_alert_has_a_firing_test_and_a_quiet_test(alertname):
    cases = _alert_cases().get(alertname, [])
    assert any(expected for _, expected in cases), f"{alertname}: no test where it fires"
    assert any(not expected for _, expected in cases), f"{alertname}: no test where it stays quiet"


@pytest.mark.parametrize("alertname", ALERT_NAMES)
def test_every_severity_of_an_alert_is_seen_firing(alertname):
    severities = {r["labels"]["severity"] for r in ALERTS if r["alert"] == alertname}
    fired = {alert["exp_labels"]["severity"] for _, expected in _alert_cases().get(alertname, []) for alert in expected}
    assert severities <= fired, f"{alertname}: no firing test for severity {sorted(severities - fired)}"


def test_every_unit_test_is_named_after_a_behaviour():
    for path in RULE_TESTS:
        names = [t.get("name", "") for t in load_yaml(path)["tests"]]
        assert all(len(n.split()) >= 4 for n in names), f"{path.name}: unnamed or terse test in {names}"
        assert len(names) == len(set(names)), f"{path.name}: repeated test names"


@pytest.mark.parametrize("rule", ALERTS, ids=_ids(ALERTS))
def test_alert_has_severity_summary_description_and_runbook(rule):
    assert rule["labels"].get("severity") in {"info", "warning", "critical"}
    annotations = rule.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key, "").strip(), f"{rule['alert']}: no {key}"
    if not rule["expr"].startswith("absent("):  # an absent() alert has no value or labels to show
        assert "{{" in annotations["description"], f"{rule['alert']}: description shows no value or label"


@pytest.mark.parametrize("rule", ALERTS, ids=_ids(ALERTS))
def test_runbook_url_points_at_an_existing_runbook_section(rule):
    url = rule["annotations"]["runbook_url"]
    base, _, anchor = url.partition("#")
    assert base == RUNBOOK_BASE
    assert anchor == rule["alert"].lower()
    assert anchor in runbook_anchors(), f"docs/runbook.md has no section for #{anchor}"


def test_alerts_of_one_name_differ_only_in_severity_and_threshold():
    for name in ALERT_NAMES:
        rules = [r for r in ALERTS if r["alert"] == name]
        severities = [r["labels"]["severity"] for r in rules]
        assert len(severities) == len(set(severities)), f"{name}: two rules with one severity"
        assert len({r["annotations"]["runbook_url"] for r in rules}) == 1


@pytest.mark.parametrize("rule", ALERTS, ids=_ids(ALERTS))
def test_alert_uses_only_published_metrics(rule):
    unknown = metric_names(rule["expr"]) - METRICS - recorded_names()
    assert not unknown, f"{rule['alert']}: unknown metrics {sorted(unknown)}"


def test_alert_thresholds_match_the_documented_zones():
    """The alerts read the recorded ratios against the default zones of mem_exporter/zones.py."""
    exprs = {(r["alert"], r["labels"]["severity"]): re.sub(r"\s+", " ", r["expr"]).strip() for r in ALERTS}
    ram, gpu = DEFAULT_ZONES.system_memory, DEFAULT_ZONES.gpu_memory
    ram_ratio = "instance:mem_exporter_memory_utilisation:ratio"
    assert exprs[("MemExporterSystemMemoryLow", "warning")] == f"{ram_ratio} > {ram.caution:.2f}"
    assert exprs[("MemExporterSystemMemoryLow", "critical")] == f"{ram_ratio} > {ram.critical:.2f}"
    gpu_ratio = "instance_gpu:mem_exporter_gpu_memory_utilisation:ratio"
    assert exprs[("MemExporterGPUMemoryHigh", "warning")] == f"{gpu_ratio} > {gpu.caution:.2f}"
    assert exprs[("MemExporterGPUMemoryHigh", "critical")] == f"{gpu_ratio} > {gpu.critical:.2f}"
    assert exprs[("MemExporterGroupAboveLimit", "warning")] == "instance_group:mem_exporter_group_limit_usage:ratio > 1"
    assert "predict_linear(" in exprs[("MemExporterGroupNearLimit", "warning")]
    assert "[10m], 600)" in exprs[("MemExporterGroupNearLimit", "warning")]


def test_lab_prometheus_config_passes_promtool_check_config():
    result = run(PROMTOOL, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(RULE_FILES)} rule files found" in result.stdout + result.stderr
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert config["rule_files"] == ["rules/*.rules.yml"]  # every file there, the GPU health rules included


def test_stale_alert_is_relative_to_the_sampling_interval():
    [stale] = [r for r in ALERTS if r["alert"] == "MemExporterSamplesStale"]
    assert "3 * mem_exporter_sample_interval_seconds" in stale["expr"]


def test_an_info_alert_uses_the_log_route():
    assert any(r["labels"]["severity"] == "info" for r in ALERTS)


def test_lab_prometheus_scrapes_exporter_and_enforcer_and_alerts_to_alertmanager():
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]] for job in config["scrape_configs"]
    }
    assert targets["mem-exporter"] == ["exporter:9713"]
    assert targets["mem-exporter-enforcer"] == ["enforcer:9714"]
    am = [t for a in config["alerting"]["alertmanagers"] for sc in a["static_configs"] for t in sc["targets"]]
    assert am == ["alertmanager:9093"]
