"""The Grafana dashboards and provisioning: valid JSON, stable unique uids, every panel on
the $datasource variable, every query on published metrics and valid PromQL."""
from __future__ import annotations

import re

import pytest
import yaml

from deploy_helpers import (DASHBOARDS, METRICS, ROOT, dashboard_queries, iter_panels, load_dashboard,
                            metric_names, run)
from tools import PROMTOOL

EXPECTED = {"mem-exporter-overview.json": "mem-exporter-overview", "mem-exporter-groups.json": "mem-exporter-groups"}
PROVISIONING = ROOT / "grafana" / "provisioning"
QUERIES = dashboard_queries()


def _dashboards():
    return {path.name: load_dashboard(path) for path in DASHBOARDS}


def test_dashboards_are_the_expected_files_with_stable_uids():
    assert {name: d["uid"] for name, d in _dashboards().items()} == EXPECTED


def test_dashboard_ids_are_left_to_grafana():
    for name, dash in _dashboards().items():
        assert dash.get("id") is None, name


def test_panel_ids_are_unique_within_a_dashboard():
    for name, dash in _dashboards().items():
        ids = [p["id"] for p in iter_panels(dash["panels"])]
        assert len(ids) == len(set(ids)), name


def test_every_panel_and_query_uses_the_datasource_variable():
    for name, dash in _dashboards().items():
        for panel in iter_panels(dash["panels"]):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", (name, panel["title"])
        for ann in dash["annotations"]["list"]:
            if "expr" in ann:
                assert ann["datasource"]["uid"] == "${datasource}", (name, ann["name"])
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                assert var["datasource"]["uid"] == "${datasource}", (name, var["name"])


def test_datasource_and_instance_are_template_variables():
    for name, dash in _dashboards().items():
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["instance"]["type"] == "query"
    groups = {v["name"]: v for v in _dashboards()["mem-exporter-groups.json"]["templating"]["list"]}
    assert groups["group"]["multi"] and groups["group"]["includeAll"]


def test_every_query_filters_by_instance():
    for name, dash in _dashboards().items():
        for panel in iter_panels(dash["panels"]):
            for target in panel.get("targets", []):
                if target["expr"].startswith("ALERTS{"):
                    continue
                assert 'instance=~"$instance"' in target["expr"], (name, panel["title"], target["expr"])


@pytest.mark.parametrize("uid, title, expr", QUERIES, ids=[f"{u}:{t}:{i}" for i, (u, t, _) in enumerate(QUERIES)])
def test_queries_use_only_published_metrics(uid, title, expr):
    unknown = metric_names(expr) - METRICS
    assert not unknown, f"{uid} / {title}: unknown metrics {sorted(unknown)} in {expr}"


def test_every_query_is_valid_promql(tmp_path):
    """promtool parses each expression as a recording rule (2.42 has no standalone expression check)."""
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, _, expr) in enumerate(QUERIES)]}]}
    path = tmp_path / "dashboard-queries.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run(PROMTOOL, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(QUERIES)} rules found" in result.stdout


def test_overview_shows_every_required_view():
    dash = _dashboards()["mem-exporter-overview.json"]
    exprs = " ".join(t["expr"] for p in iter_panels(dash["panels"]) for t in p.get("targets", []))
    for metric in ("mem_exporter_system_memory_available_bytes", "mem_exporter_system_swap_used_bytes",
                   "mem_exporter_gpu_memory_used_bytes", "mem_exporter_gpu_utilization_ratio",
                   "mem_exporter_gpu_temperature_celsius", "mem_exporter_gpu_power_watts",
                   "mem_exporter_gpu_clock_hertz", "mem_exporter_group_memory_bytes",
                   "mem_exporter_group_gpu_memory_bytes", "ALERTS", "mem_exporter_phase_info"):
        assert metric in exprs, metric
    annotation_exprs = [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    assert any("mem_exporter_enforcer_kills_total" in e for e in annotation_exprs)


def _steps(panel):
    return [(s["value"], s["color"]) for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]


def test_ram_and_gpu_panels_show_the_alert_zones():
    panels = {p["title"]: p for p in iter_panels(_dashboards()["mem-exporter-overview.json"]["panels"])}
    ram = [(None, "green"), (0.67, "yellow"), (0.85, "red")]
    assert _steps(panels["RAM used"]) == ram
    assert _steps(panels["RAM used (share of total)"]) == ram
    assert panels["RAM used (share of total)"]["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line+area"
    assert _steps(panels["GPU memory used (share of total)"]) == [(None, "green"), (0.67, "yellow"), (0.83, "red")]


def test_group_panel_draws_the_enforcer_limit():
    dash = _dashboards()["mem-exporter-groups.json"]
    repeated = [p for p in iter_panels(dash["panels"]) if p.get("repeat") == "group"]
    assert len(repeated) == 1
    exprs = [t["expr"] for t in repeated[0]["targets"]]
    assert any("mem_exporter_enforcer_limit_bytes" in e for e in exprs)
    assert any("mem_exporter_group_memory_bytes" in e for e in exprs)


def test_provisioning_points_at_the_dashboards_and_prometheus():
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    prometheus = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert len(prometheus) == 1 and prometheus[0]["isDefault"] and prometheus[0]["url"] == "http://prometheus:9090"
    uids = [d["uid"] for d in datasources["datasources"]]
    assert len(uids) == len(set(uids))

    providers = yaml.safe_load((PROVISIONING / "dashboards" / "mem-exporter.yml").read_text())
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{provider['options']['path']}:ro" in mounts
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/mem-exporter-overview.json"


def test_dashboard_queries_substitutes_every_variable():
    assert QUERIES
    for uid, title, expr in QUERIES:
        assert "$" not in expr, (uid, title, expr)
    custom = dashboard_queries({"instance": "lab", "group": "ollama"})
    assert any('instance=~"lab"' in e and 'group=~"ollama"' in e for _, _, e in custom)
    assert all(re.search(r"\[\d+[smh]\]", e) or "[" not in e for _, _, e in QUERIES)
