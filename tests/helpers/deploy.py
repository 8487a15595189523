"""Shared helpers for the deploy tests: repository paths, the known metric names,
the alert rules, the dashboards' PromQL and the runbook's anchors."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from helpers.paths import ROOT

DEPLOY = ROOT / "deploy"
RULES_DIR = DEPLOY / "prometheus" / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.rules.yml"))  # what the lab's prometheus.yml loads (rules/*.rules.yml)
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.test.yml"))
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_BASE = "https://github.com/mem-exporter/mem-exporter/blob/main/docs/runbook.md"

# Every metric the exporter and the enforcer publish, plus Prometheus's own series.
METRICS = frozenset(
    """
mem_exporter_system_memory_total_bytes mem_exporter_system_memory_available_bytes
mem_exporter_system_memory_free_bytes mem_exporter_system_swap_total_bytes mem_exporter_system_swap_used_bytes
mem_exporter_system_cpu_usage_ratio mem_exporter_processes
mem_exporter_group_memory_bytes mem_exporter_group_processes mem_exporter_group_gpu_memory_bytes
mem_exporter_gpu_info mem_exporter_gpu_memory_total_bytes mem_exporter_gpu_memory_used_bytes
mem_exporter_gpu_memory_free_bytes mem_exporter_gpu_utilization_ratio mem_exporter_gpu_memory_utilization_ratio
mem_exporter_gpu_temperature_celsius mem_exporter_gpu_power_watts mem_exporter_gpu_power_limit_watts
mem_exporter_gpu_energy_joules_total mem_exporter_gpu_clock_hertz mem_exporter_gpu_clock_max_hertz
mem_exporter_enforcer_kills_total mem_exporter_enforcer_actions_total mem_exporter_enforcer_limit_bytes
mem_exporter_sample_duration_seconds mem_exporter_last_sample_timestamp_seconds mem_exporter_source_up
mem_exporter_sample_errors_total mem_exporter_phase_info mem_exporter_sample_interval_seconds
mem_exporter_enforcer_dry_run mem_exporter_enforcer_rules mem_exporter_enforcer_last_kill_timestamp_seconds
mem_exporter_enforcer_kills_in_progress mem_exporter_enforcer_fast_lane_groups
mem_exporter_gpu_throttle_active mem_exporter_gpu_xid_errors_total mem_exporter_gpu_ecc_errors_total
mem_exporter_gpu_performance_state mem_exporter_gpu_gtt_memory_used_bytes
mem_exporter_enforcer_memory_locked mem_exporter_system_memory_pressure_ratio
mem_exporter_gpu_last_xid mem_exporter_gpu_gtt_memory_total_bytes mem_exporter_gpu_mig_memory_used_bytes
mem_exporter_gpu_mig_memory_total_bytes mem_exporter_group_gpu_gtt_memory_bytes mem_exporter_gpu_unreadable_processes
mem_exporter_system_memory_pressure_stall_seconds_total mem_exporter_enforcer_oom_score_adj
mem_exporter_enforcer_events_dropped_total
up ALERTS
""".split()
)

# Values for the dashboards' template variables when their queries run outside Grafana.
DEFAULT_VARIABLES = {
    "instance": ".+",
    "job": "mem-exporter",
    "group": ".+",
    "gpu": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}

_FUNCTIONS = frozenset(
    """
abs absent absent_over_time avg avg_over_time bottomk ceil changes clamp clamp_max clamp_min count
count_over_time count_values delta deriv exp floor group histogram_quantile holt_winters idelta increase
irate label_join label_replace last_over_time ln log10 log2 max max_over_time min min_over_time
predict_linear quantile quantile_over_time rate resets round scalar sgn sort sort_desc sqrt stddev
stdvar sum sum_over_time time timestamp topk vector by without on ignoring group_left group_right
and or unless bool offset
""".split()
)


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a tool from the repository root and capture its output as text."""
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def rule_groups() -> list[dict]:
    return [group for path in RULE_FILES for group in load_yaml(path)["groups"]]


def alert_rules() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def recording_rules() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"] if "record" in rule]


def recorded_names() -> frozenset[str]:
    """Series the shipped recording rules make; dashboards and alerts may read them like metrics."""
    return frozenset(rule["record"] for rule in recording_rules())


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def iter_panels(panels: list[dict]):
    """Every panel, rows' nested panels included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for template variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)


def dashboard_queries(variables: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title or annotation name, PromQL with template variables substituted)
    for every query in every dashboard: panel targets, annotations and variable queries
    (`label_values(...)` becomes its inner selector, `query_result(...)` its inner expression)."""
    out = []
    for path in DASHBOARDS:
        dash = load_dashboard(path)
        uid = dash["uid"]
        for panel in iter_panels(dash["panels"]):
            for target in panel.get("targets", []):
                out.append((uid, panel["title"], substitute(target["expr"], variables)))
        for ann in dash["annotations"]["list"]:
            if "expr" in ann:
                out.append((uid, ann["name"], substitute(ann["expr"], variables)))
        for var in dash["templating"]["list"]:
            if var["type"] != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)|query_result\((.+)\)", query)
            inner = (m.group(1) or m.group(2)) if m else query
            out.append((uid, f"variable {var['name']}", substitute(inner, variables)))
    return out


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that name series (not functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors and subqueries
    expr = re.sub(r"\boffset\s+-?[0-9a-z]+", "", expr)  # offsets, negative ones too
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {n for n in names if n not in _FUNCTIONS and not re.fullmatch(r"\d.*|e|inf|nan", n, re.I)}


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", RUNBOOK.read_text(), re.M)}
