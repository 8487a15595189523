"""The shipped bundle against the real servers, all on 127.0.0.1.

The real Debian `prometheus` runs the shipped prometheus.yml and alert rules, the real
`prometheus-alertmanager` the shipped alertmanager.yml, next to `mem-exporter serve`,
`mem-exporter enforce` and a webhook receiver. Rewritten: addresses, and the shipped timings
compressed so the whole test takes well under a minute (scrape and evaluation every 1 s,
Alertmanager group_wait 1 s). Nothing else of those files changes.

A process group this test spawns grows past its limit: the enforcer kills it, its pushed alert
reaches the webhook through Alertmanager, the kill counter rises in Prometheus and the
MemExporterEnforcerKilled rule fires and is delivered too. Each kill panel, computed as Grafana
would (variables substituted, query_range over the dashboard's default range at the panel's
step), counts exactly that one kill, and still one after the enforcer restarts. Every PromQL
expression of every dashboard panel returns data from that Prometheus: with the fake GPU, and
with no GPU at all for every panel but the GPU ones.
"""

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from helpers.alertmanager import Alertmanager, WebhookReceiver
from helpers.daemons import Daemon
from helpers.deploy import DEPLOY, dashboard_queries, iter_panels, load_dashboard, substitute
from helpers.net import free_port
from helpers.processes import pid_alive
from helpers.tools import PROMETHEUS
from helpers.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
DEMO_GPU = ROOT / "mem_exporter" / "gpu" / "scenarios" / "demo-12gb.yaml"
# Panels on GPU health metrics that no GPU source here reports yet (throttle reasons, XID errors):
# their queries are valid (test_deploy_grafana) but return nothing on the fake demo card.
GPU_SERIES = re.compile(r"mem_exporter_gpu_|group_gpu_memory|instance_gpu:")
RANGE_S, DEFAULT_STEP_S = 3600, 15  # the dashboards' default range (now-1h); Grafana's step when a panel sets none


def prometheus_config(tmp: Path, exporter: str, enforcer: str, alertmanager: str, own: str) -> Path:
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    for old, new in (
        ("exporter:9713", exporter),
        ("enforcer:9714", enforcer),
        ("alertmanager:9093", alertmanager),
        ("localhost:9090", own),
    ):
        assert old in text, f"prometheus.yml no longer names {old}"
        text = text.replace(old, new)
    text = re.sub(r"(scrape_interval|evaluation_interval): \d+s", r"\1: 1s", text)
    shutil.copytree(DEPLOY / "prometheus" / "rules", tmp / "rules")
    (tmp / "prometheus.yml").write_text(text)
    return tmp / "prometheus.yml"


def alertmanager_config(hook_url: str) -> str:
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = hook_url + "/" + receiver["name"]
    for route in [config["route"], *config["route"].get("routes", [])]:
        if "group_wait" in route:
            route["group_wait"] = "1s"
        if "group_interval" in route:
            route["group_interval"] = "1s"
    return yaml.safe_dump(config)


class Prometheus:
    def __init__(self, tmp: Path, config: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(tmp / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def query(self, expr: str, at: float | None = None) -> list:
        params = {"query": expr, **({"time": at} if at is not None else {})}
        return self._get("/api/v1/query", params)

    def query_range(self, expr: str, start: float, end: float, step: float) -> list:
        return self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})

    def _get(self, path: str, params: dict) -> list:
        with urllib.request.urlopen(f"{self.url}{path}?" + urllib.parse.urlencode(params), timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def ready(self) -> bool:
        try:
            return urllib.request.urlopen(self.url + "/-/ready", timeout=1).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(params=[f"fake:{DEMO_GPU}", "none"], ids=["fake-gpu", "no-gpu"])
def stack(request, tmp_path, spawn_group):
    gpu_backend = request.param
    tag = "s" + uuid.uuid4().hex[:10]
    events = tmp_path / "events.jsonl"
    phase_file = tmp_path / "phase"
    with WebhookReceiver() as hook, Alertmanager(tmp_path, config_text=alertmanager_config(hook.url)) as am:
        cfg = tmp_path / "mem-exporter.yaml"
        cfg.write_text(f"""interval: 0.5s
memory: pss  # also gives per-group swap, which a dashboard panel shows
groups: {{min_memory: 5MB}}
enforcer:
  event_log: {events}
  rules:
    - name: integration
      match: {{cmdline: 'hog\\.py.*--tag {tag}'}}
      max_rss: 250MB
      grace: 1s
  notify:
    alertmanager_url: {am.url}
""")
        common = ["--config", str(cfg), "--gpu-backend", gpu_backend]
        env_phase = {"MEM_EXPORTER_PHASE_FILE": str(phase_file)}
        exporter = Daemon("serve", *common, cwd=tmp_path, env=env_phase)
        enforcer = Daemon("enforce", *common, cwd=tmp_path, env=env_phase)
        daemons = {"enforcer": enforcer}

        def restart_enforcer() -> Daemon:
            daemons["enforcer"].stop()
            daemons["enforcer"] = Daemon("enforce", *common, cwd=tmp_path, env=env_phase, port=enforcer.port)
            return daemons["enforcer"].wait_healthy()

        prom_port = free_port()
        prom = Prometheus(
            tmp_path,
            prometheus_config(
                tmp_path,
                f"127.0.0.1:{exporter.port}",
                f"127.0.0.1:{enforcer.port}",
                am.url[len("http://") :],
                f"127.0.0.1:{prom_port}",
            ),
            prom_port,
        )
        try:
            exporter.wait_healthy()
            enforcer.wait_healthy()
            wait_for(prom.ready, 30, what="prometheus ready")
            yield {
                "tag": tag,
                "hook": hook,
                "am": am,
                "prom": prom,
                "events": events,
                "phase_file": phase_file,
                "exporter": exporter,
                "restart_enforcer": restart_enforcer,
                "gpu": gpu_backend != "none",
            }
        finally:
            prom.stop()
            exporter.stop()
            daemons["enforcer"].stop()


@pytest.mark.slow
@pytest.mark.integration
def test_kill_alerts_counters_and_every_dashboard_query(stack, spawn_group):
    prom, hook = stack["prom"], stack["hook"]
    subprocess.run(
        [sys.executable, "-m", "mem_exporter", "phase", "Model-Active"],
        cwd=ROOT,
        check=True,
        env={**__import__("os").environ, "MEM_EXPORTER_PHASE_FILE": str(stack["phase_file"])},
    )
    steady = spawn_group("--mb", "40", "--tag", stack["tag"])  # under the limit: draws the limit line
    steady.wait_ready()
    # the counter must be in Prometheus at 0 before the kill, or increase() has nothing to compare
    wait_for(
        lambda: prom.query('mem_exporter_enforcer_kills_total{rule="integration"} == 0'),
        20,
        what="the kill counter at 0 in Prometheus",
    )
    hog = spawn_group("--mb", "20", "--grow", "100", "--max-mb", "2000", "--tag", stack["tag"])
    hog.wait_ready()

    wait_for(lambda: not pid_alive(hog.pid), 30, what="the enforcer to kill the hog")
    assert pid_alive(steady.pid)

    pushed = hook.wait_for(
        lambda body: any(
            a["labels"].get("rule") == "integration" and a["labels"].get("alertname") != "MemExporterEnforcerKilled"
            for a in body.get("alerts", [])
        ),
        20,
    )
    assert any(a["labels"]["group"].endswith(f"-{hog.pgid}") for a in pushed["alerts"])

    wait_for(
        lambda: prom.query('increase(mem_exporter_enforcer_kills_total{rule="integration"}[1m]) > 0'),
        20,
        what="the kill counter's increase in Prometheus",
    )
    fired = hook.wait_for(
        lambda body: any(a["labels"].get("alertname") == "MemExporterEnforcerKilled" for a in body.get("alerts", [])),
        30,
    )
    assert fired["alerts"][0]["labels"]["rule"] == "integration"

    kills = {"rule": "integration"}
    assert grafana_counts(prom, "enforcer_kills_total", kills) == {
        "Kills in range": 1,
        "Enforcer kills": 1,
        "annotation Enforcer kills": 1,
    }

    def expected_data(uid: str, title: str, expr: str) -> bool:
        return stack["gpu"] or not GPU_SERIES.search(expr) or title == "GPUs" and "vector(0)" in expr

    queries = [
        q for q in dashboard_queries({"instance": ".+", "job": "mem-exporter", "group": ".+"}) if expected_data(*q)
    ]
    assert len(queries) > 20

    def empty_queries():  # over the last minutes, as a panel (or an annotation, whose point is the kill's) shows it
        now = time.time()
        return [(uid, title, expr) for uid, title, expr in queries if not prom.query_range(expr, now - 300, now, 5)]

    missing = empty_queries()
    deadline = time.monotonic() + 15
    while missing and time.monotonic() < deadline:  # rate() and friends need a few points
        time.sleep(1)
        missing = empty_queries()
    assert not missing, "dashboard queries without data:\n" + "\n".join(f"{u} / {t}: {e}" for u, t, e in missing)
    if not stack["gpu"]:
        [gpus] = [e for _, t, e in queries if t == "GPUs" and "vector(0)" in e]
        assert [float(r["value"][1]) for r in prom.query(gpus)] == [0.0]

    # An enforcer restart starts every counter at 0 again: still exactly one kill, no false annotation.
    stack["restart_enforcer"]()
    wait_for(
        lambda: prom.query('resets(mem_exporter_enforcer_kills_total{rule="integration"}[10m]) > 0'),
        20,
        what="Prometheus to see the restarted enforcer's counter at 0",
    )
    assert grafana_counts(prom, "enforcer_kills_total", kills) == {
        "Kills in range": 1,
        "Enforcer kills": 1,
        "annotation Enforcer kills": 1,
    }

    # The action panels count the first action of each rule and action only where every action counter starts
    # at 0 (the enforcer's metric contract on main); before that contract the first `term` never shows.
    if not actions_start_at_zero(prom):
        pytest.xfail("enforcer without zero-started action counters: the first action cannot be counted")
    assert grafana_counts(prom, "enforcer_actions_total", {"rule": "integration", "action": "term"}) == {
        "Enforcer actions": 1,
        "Actions in range": 1,
    }


def actions_start_at_zero(prom: Prometheus) -> bool:
    """Whether the enforcer publishes an action it never took (no_victim of rule integration) at 0."""
    return bool(prom.query('mem_exporter_enforcer_actions_total{rule="integration", action="no_victim"}'))


def grafana_counts(prom: Prometheus, counter: str, labels: dict[str, str]) -> dict[str, float]:
    """{panel title: its count for the series with `labels`} for every overview panel and annotation on `counter`,
    computed as Grafana does: variables substituted, a stat's instant query at the end of the default range, a bar
    panel's query_range over the range at its step ($__interval, the panel's minimum interval), summed; an
    annotation's points (one annotation each) at its step, summed."""
    dash = load_dashboard(DEPLOY.parent / "grafana" / "dashboards" / "mem-exporter-overview.json")
    end = time.time()
    out: dict[str, float] = {}

    def matching(result: list) -> list:
        return [r for r in result if all(r["metric"].get(k) == v for k, v in labels.items())]

    def over_range(expr: str, step: int) -> float:
        start, stop = (end - RANGE_S) // step * step, end // step * step  # Grafana aligns the range to the step
        return sum(float(v) for r in matching(prom.query_range(expr, start, stop, step)) for _, v in r["values"])

    for panel in iter_panels(dash["panels"]):
        for t in panel.get("targets", []):
            if counter not in t["expr"]:
                continue
            step = seconds(t.get("interval", f"{DEFAULT_STEP_S}s"))
            expr = substitute(
                t["expr"], {"instance": ".+", "job": "mem-exporter", "__range": f"{RANGE_S}s", "__interval": f"{step}s"}
            )
            if t["instant"]:
                out[panel["title"]] = sum(float(r["value"][1]) for r in matching(prom.query(expr, at=end)))
            else:
                out[panel["title"]] = over_range(expr, step)
    for ann in dash["annotations"]["list"]:
        if counter in ann.get("expr", ""):
            step = seconds(ann["step"])
            out[f"annotation {ann['name']}"] = over_range(substitute(ann["expr"], {"instance": ".+"}), step)
    return out


def seconds(duration: str) -> int:
    """A Grafana interval such as `15s` or `1m` in seconds."""
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]
