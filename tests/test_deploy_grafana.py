"""The Grafana dashboards and provisioning: valid JSON, stable unique uids, every panel on
the $datasource variable, every query on published metrics and valid PromQL."""

from __future__ import annotations

import re

import pytest
import yaml
from helpers.deploy import (
    DASHBOARDS,
    METRICS,
    ROOT,
    dashboard_queries,
    iter_panels,
    load_dashboard,
    metric_names,
    recorded_names,
    run,
)
from helpers.tools import PROMTOOL

from mem_exporter.zones import DEFAULT_ZONES

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
    for dash in _dashboards().values():
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
    unknown = metric_names(expr) - METRICS - recorded_names()
    assert not unknown, f"{uid} / {title}: unknown metrics {sorted(unknown)} in {expr}"


def test_every_query_is_valid_promql(tmp_path):
    """promtool parses each expression as a recording rule (2.42 has no standalone expression check)."""
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, _, expr) in enumerate(QUERIES)],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run(PROMTOOL, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(QUERIES)} rules found" in result.stdout


def test_overview_shows_every_required_view():
    dash = _dashboards()["mem-exporter-overview.json"]
    exprs = " ".join(t["expr"] for p in iter_panels(dash["panels"]) for t in p.get("targets", []))
    for metric in (
        "mem_exporter_system_memory_available_bytes",
        "mem_exporter_system_swap_used_bytes",
        "mem_exporter_gpu_memory_used_bytes",
        "mem_exporter_gpu_utilization_ratio",
        "mem_exporter_gpu_temperature_celsius",
        "mem_exporter_gpu_power_watts",
        "mem_exporter_gpu_clock_hertz",
        "mem_exporter_group_memory_bytes",
        "mem_exporter_group_gpu_memory_bytes",
        "ALERTS",
        "mem_exporter_phase_info",
    ):
        assert metric in exprs, metric
    annotation_exprs = [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    assert any("mem_exporter_enforcer_kills_total" in e for e in annotation_exprs)


def _steps(panel):
    return [(s["value"], s["color"]) for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]


def test_ram_and_gpu_panels_show_the_alert_zones():
    panels = {p["title"]: p for p in iter_panels(_dashboards()["mem-exporter-overview.json"]["panels"])}
    z = DEFAULT_ZONES
    ram = [(None, "green"), (z.system_memory.caution, "yellow"), (z.system_memory.critical, "red")]
    assert _steps(panels["RAM used"]) == ram
    assert _steps(panels["RAM used (share of total)"]) == ram
    ram_style = panels["RAM used (share of total)"]["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]
    assert ram_style["mode"] == "line+area"
    assert _steps(panels["GPU memory used (share of total)"]) == [
        (None, "green"),
        (z.gpu_memory.caution, "yellow"),
        (z.gpu_memory.critical, "red"),
    ]
    for title in ("RAM used", "RAM used (share of total)"):
        assert panels[title]["targets"][0]["expr"].startswith("instance:mem_exporter_memory_utilisation:ratio{")
    assert panels["GPU memory used (share of total)"]["targets"][0]["expr"].startswith(
        "instance_gpu:mem_exporter_gpu_memory_utilisation:ratio{"
    )
    groups = {p["title"]: p for p in iter_panels(_dashboards()["mem-exporter-groups.json"]["panels"])}
    assert _steps(groups["Share of limit"]) == [
        (None, "green"),
        (z.limit.caution, "yellow"),
        (z.limit.critical, "red"),
        (1, "dark-red"),
    ]


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
    assert all(re.search(r"\[\d+[smh]:?\]", e) or "[" not in e for _, _, e in QUERIES)


def _panels(name: str) -> list[dict]:
    return [p for p in iter_panels(_dashboards()[name]["panels"]) if p["type"] != "row"]


def test_every_panel_says_what_it_shows():
    for name in EXPECTED:
        for panel in _panels(name):
            assert len(panel.get("description", "").split()) >= 8, (name, panel["title"])


def _exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel["targets"]]


def test_kill_and_action_counts_are_exact():
    """Stats count over the whole range; bars over non-overlapping windows; no overlapping $__rate_interval
    windows and no changes() (which counts an enforcer restart as a kill)."""
    counted = {}
    for name in EXPECTED:
        for panel in _panels(name):
            for expr in _exprs(panel):
                if "enforcer_kills_total" in expr or "enforcer_actions_total" in expr:
                    counted[(name, panel["title"])] = expr
                    assert "$__rate_interval" not in expr and "changes(" not in expr, (panel["title"], expr)
                    if panel["type"] == "timeseries":
                        assert "[$__interval:] offset -$__interval" in expr, (panel["title"], expr)
                        assert all(t.get("interval") for t in panel["targets"]), panel["title"]
                    else:
                        assert "[$__range]" in expr and all(t["instant"] for t in panel["targets"]), panel["title"]
        for ann in _dashboards()[name]["annotations"]["list"]:
            if "expr" in ann:
                assert "increase(" in ann["expr"] and "changes(" not in ann["expr"], ann["expr"]
                assert "[1m:] offset -1m" in ann["expr"] and ann["step"] == "1m"
    titles = {title for _, title in counted}
    assert {"Kills in range", "Enforcer kills", "Enforcer actions", "Actions in range"} <= titles


def test_gpu_panels_say_when_there_is_no_gpu_and_name_the_vendor():
    variables = {v["name"]: v for v in _dashboards()["mem-exporter-overview.json"]["templating"]["list"]}
    assert variables["gpu"]["multi"] and variables["gpu"]["includeAll"]
    for panel in _panels("mem-exporter-overview.json"):
        exprs = " ".join(_exprs(panel))
        if "mem_exporter_gpu_" not in exprs and "group_gpu_memory" not in exprs:
            continue
        if panel["type"] == "stat":  # the card count
            assert exprs.endswith("or vector(0)"), panel["title"]
            continue
        assert panel["fieldConfig"]["defaults"].get("noValue"), panel["title"]
        assert "without a GPU" in panel["description"], panel["title"]
        if "group_gpu_memory" not in exprs:
            assert 'gpu=~"$gpu"' in exprs, panel["title"]
        if panel["type"] == "timeseries" and "group_gpu_memory" not in exprs and "xid" not in exprs:
            assert all("{{vendor}}" in t["legendFormat"] for t in panel["targets"]), panel["title"]


def test_overview_shows_dry_run_locking_pressure_throttling_and_xid_errors():
    exprs = " ".join(e for p in _panels("mem-exporter-overview.json") for e in _exprs(p))
    for metric in (
        "mem_exporter_enforcer_dry_run",
        "mem_exporter_gpu_throttle_active",
        "mem_exporter_gpu_xid_errors_total",
        "mem_exporter_sample_interval_seconds",
        "mem_exporter_enforcer_memory_locked",
        "mem_exporter_system_memory_pressure_ratio",
    ):
        assert metric in exprs, metric


def test_groups_dashboard_defaults_to_the_top_groups_and_bounds_every_panel():
    dash = _dashboards()["mem-exporter-groups.json"]
    group = next(v for v in dash["templating"]["list"] if v["name"] == "group")
    assert group["query"]["query"].startswith("query_result(topk(10, ")
    assert "allValue" not in group  # All means the groups the query found, not every group
    for panel in _panels("mem-exporter-groups.json"):
        if panel.get("repeat") == "group":
            continue
        for expr in _exprs(panel):
            assert expr.startswith("topk("), (panel["title"], expr)
