"""The shipped bundle against the real servers, all on 127.0.0.1.

The real Debian `prometheus` runs the shipped prometheus.yml and alert rules, the real
`prometheus-alertmanager` the shipped alertmanager.yml, next to `mem-exporter serve`,
`mem-exporter enforce` and a webhook receiver. Rewritten: addresses, and the shipped timings
compressed so the whole test takes well under a minute (scrape and evaluation every 1 s,
Alertmanager group_wait 1 s). Nothing else of those files changes.

A process group this test spawns grows past its limit: the enforcer kills it, its pushed alert
reaches the webhook through Alertmanager, the kill counter rises in Prometheus and the
MemExporterEnforcerKilled rule fires and is delivered too. Every PromQL expression of every
dashboard panel then returns data from that Prometheus.
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

from alertmanager_helpers import Alertmanager, WebhookReceiver
from conftest import Daemon, free_port, pid_alive, wait_for
from deploy_helpers import DEPLOY, dashboard_queries
from tools import PROMETHEUS

ROOT = Path(__file__).resolve().parents[1]
DEMO_GPU = ROOT / "mem_exporter" / "gpu" / "scenarios" / "demo-12gb.yaml"


def prometheus_config(tmp: Path, exporter: str, enforcer: str, alertmanager: str, own: str) -> Path:
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    for old, new in (("exporter:9713", exporter), ("enforcer:9714", enforcer), ("alertmanager:9093", alertmanager),
                     ("localhost:9090", own)):
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
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def query(self, expr: str) -> list:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
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


@pytest.fixture
def stack(tmp_path, spawn_group):
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
        common = ["--config", str(cfg), "--gpu-backend", f"fake:{DEMO_GPU}"]
        env_phase = {"MEM_EXPORTER_PHASE_FILE": str(phase_file)}
        exporter = Daemon("serve", *common, cwd=tmp_path, env=env_phase)
        enforcer = Daemon("enforce", *common, cwd=tmp_path, env=env_phase)
        prom_port = free_port()
        prom = Prometheus(tmp_path, prometheus_config(tmp_path, f"127.0.0.1:{exporter.port}",
                                                      f"127.0.0.1:{enforcer.port}", am.url[len("http://"):],
                                                      f"127.0.0.1:{prom_port}"), prom_port)
        try:
            exporter.wait_healthy()
            enforcer.wait_healthy()
            wait_for(prom.ready, 30, what="prometheus ready")
            yield {"tag": tag, "hook": hook, "am": am, "prom": prom, "events": events, "phase_file": phase_file,
                   "exporter": exporter, "enforcer": enforcer}
        finally:
            prom.stop()
            exporter.stop()
            enforcer.stop()


def test_kill_alerts_counters_and_every_dashboard_query(stack, spawn_group):
    began = time.monotonic()
    prom, hook = stack["prom"], stack["hook"]
    subprocess.run([sys.executable, "-m", "mem_exporter", "phase", "Model-Active"], cwd=ROOT, check=True,
                   env={**__import__("os").environ, "MEM_EXPORTER_PHASE_FILE": str(stack["phase_file"])})
    steady = spawn_group("--mb", "40", "--tag", stack["tag"])  # under the limit: draws the limit line
    steady.wait_ready()
    # the counter must be in Prometheus at 0 before the kill, or increase() has nothing to compare
    wait_for(lambda: prom.query('mem_exporter_enforcer_kills_total{rule="integration"} == 0'), 20,
             what="the kill counter at 0 in Prometheus")
    hog = spawn_group("--mb", "20", "--grow", "100", "--max-mb", "2000", "--tag", stack["tag"])
    hog.wait_ready()

    wait_for(lambda: not pid_alive(hog.pid), 30, what="the enforcer to kill the hog")
    assert pid_alive(steady.pid)

    pushed = hook.wait_for(lambda body: any(a["labels"].get("rule") == "integration" and
                                            a["labels"].get("alertname") != "MemExporterEnforcerKilled"
                                            for a in body.get("alerts", [])), 20)
    assert any(a["labels"]["group"].endswith(f"-{hog.pgid}") for a in pushed["alerts"])

    wait_for(lambda: prom.query('increase(mem_exporter_enforcer_kills_total{rule="integration"}[1m]) > 0'), 20,
             what="the kill counter's increase in Prometheus")
    fired = hook.wait_for(lambda body: any(a["labels"].get("alertname") == "MemExporterEnforcerKilled"
                                           for a in body.get("alerts", [])), 30)
    assert fired["alerts"][0]["labels"]["rule"] == "integration"

    queries = dashboard_queries({"instance": ".+", "job": "mem-exporter", "group": ".+"})
    assert len(queries) > 20

    def empty_queries():
        return [(uid, title, expr) for uid, title, expr in queries if not prom.query(expr)]
    missing = empty_queries()
    deadline = time.monotonic() + 15
    while missing and time.monotonic() < deadline:  # rate() and friends need a few points
        time.sleep(1)
        missing = empty_queries()
    assert not missing, "dashboard queries without data:\n" + "\n".join(f"{u} / {t}: {e}" for u, t, e in missing)
    assert time.monotonic() - began < 60
