"""The GPU health alert rules (deploy/prometheus/rules/mem-exporter-gpu-health.rules.yml): valid, unit-tested
for firing and for staying quiet, annotated, linked to docs/runbook.md, and written against series the
exporter publishes under exactly these names."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers.deploy import github_anchor, metric_names

ROOT = Path(__file__).resolve().parents[1]
RULES_FILE = ROOT / "deploy" / "prometheus" / "rules" / "mem-exporter-gpu-health.rules.yml"
RULE_TEST = ROOT / "deploy" / "prometheus" / "tests" / "gpu-health.test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_BASE = "https://github.com/mem-exporter/mem-exporter/blob/main/docs/runbook.md"
GOLDEN = ROOT / "tests" / "fixtures" / "golden" / "metrics-gpu-health.txt"
PROMTOOL = "/usr/bin/promtool"

ALERTS = [r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"] if "alert" in r]
NAMES = sorted({r["alert"] for r in ALERTS})


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=ROOT)


def test_rule_file_passes_promtool_check_rules():
    r = promtool("check", "rules", str(RULES_FILE))
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_unit_tests_pass_promtool_test_rules():
    r = promtool("test", "rules", str(RULE_TEST))
    assert r.returncode == 0 and "FAILED" not in r.stdout + r.stderr, r.stdout + r.stderr


def _cases() -> dict[str, list[list]]:
    cases: dict[str, list[list]] = {}
    for test in yaml.safe_load(RULE_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(case.get("exp_alerts") or [])
    return cases


@pytest.mark.parametrize("name", NAMES)
def test_every_alert_fires_in_one_test_stays_quiet_in_another_and_every_severity_fires(name):
    cases = _cases().get(name, [])
    assert any(cases) and not all(cases), f"{name}: needs a firing and a quiet case"
    fired = {a["exp_labels"]["severity"] for expected in cases for a in expected}
    assert {r["labels"]["severity"] for r in ALERTS if r["alert"] == name} <= fired


@pytest.mark.parametrize("rule", ALERTS, ids=[f"{r['alert']}-{r['labels']['severity']}" for r in ALERTS])
def test_alert_is_annotated_and_links_to_its_runbook_section(rule):
    a = rule["annotations"]
    assert rule["labels"]["severity"] in {"info", "warning", "critical"}
    assert a["summary"].strip() and "{{" in a["description"]
    base, _, anchor = a["runbook_url"].partition("#")
    assert (base, anchor) == (RUNBOOK_BASE, rule["alert"].lower())
    anchors = {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", RUNBOOK.read_text(), re.M)}
    assert anchor in anchors, f"docs/runbook.md has no section for #{anchor}"


@pytest.mark.parametrize("rule", ALERTS, ids=[f"{r['alert']}-{r['labels']['severity']}" for r in ALERTS])
def test_alert_uses_series_the_exporter_publishes(rule):
    published = set(re.findall(r"^# TYPE (\S+) (\w+)", GOLDEN.read_text(), re.M))
    names = {n for n, kind in published} | {n + "_total" for n, kind in published if kind == "counter"}
    unknown = metric_names(rule["expr"]) - names
    assert not unknown, f"{rule['alert']}: not in /metrics: {sorted(unknown)}"


def test_lab_prometheus_loads_the_gpu_health_rules():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert any(Path(RULES_FILE.name).match(Path(g).name) for g in config["rule_files"])
