"""`mem-exporter enforce` for real: a kill shows in the event log, in a real scrape, in a real
Alertmanager (which delivers it to a webhook served here), and at a generic webhook; SIGHUP with a
bad config keeps the old rules; SIGTERM stops cleanly."""

import json
import signal
import uuid

import pytest
from helpers.alertmanager import Alertmanager, WebhookReceiver
from helpers.metrics import metric_value
from helpers.processes import pid_alive
from helpers.waiting import wait_for


@pytest.mark.slow
@pytest.mark.integration
def test_enforce_daemon_kills_logs_counts_and_notifies(daemon, spawn_group, tmp_path):
    tag = "d" + uuid.uuid4().hex[:12]
    events = tmp_path / "events.jsonl"
    with WebhookReceiver() as hook, Alertmanager(tmp_path, hook.url.replace("/hook", "/am")) as am:
        cfg = tmp_path / "enforce.yaml"
        cfg.write_text(f"""
enforcer:
  event_log: {events}
  rules:
    - name: runaway
      match: {{cmdline: 'hog\\.py.*--tag {tag}'}}
      max_rss: 200MiB
      grace: 1s
  notify:
    alertmanager_url: {am.url}
    webhook_url: {hook.url}
""")
        steady = spawn_group("--mb", "30", "--tag", tag + "steady")
        steady.wait_ready()
        d = daemon("enforce", "--config", str(cfg), "--interval", "0.5s", "--gpu-backend", "none").wait_healthy()

        def steady_limit():
            text = d.metrics()
            from prometheus_client.parser import text_string_to_metric_families

            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name == "mem_exporter_enforcer_limit_bytes" and s.labels["group"].endswith(f"-{steady.pgid}"):
                        return s

        s = wait_for(steady_limit, 15, what="the limit line of the steady group")
        assert s.labels["rule"] == "runaway" and s.value == 200 * 2**20
        assert metric_value(d.metrics(), "mem_exporter_enforcer_kills_total", rule="runaway") == 0

        hog = spawn_group("--grow", "150", "--max-mb", "2000", "--children", "1", "--tag", tag)
        kids = hog.wait_ready()

        def logged():
            if not events.exists():
                return None
            lines = [json.loads(x) for x in events.read_text().splitlines()]
            return next((x for x in lines if x["pgid"] == hog.pgid and x["action"] in ("term", "kill")), None)

        ev = wait_for(logged, 40, what=f"the kill event in {events}")
        assert ev["rule"] == "runaway" and ev["outcome"] == "dead" and ev["limit"] == 200 * 2**20
        assert ev["timestamp"].endswith("Z") and ev["memory_bytes"] > 200 * 2**20 and ev["processes"] == 2
        wait_for(lambda: not pid_alive(hog.pid) and not any(pid_alive(k) for k in kids), 10, what="the group gone")
        assert pid_alive(steady.pid)

        # /metrics is rendered once per sample: the kill shows by the next one
        def counted():
            t = d.metrics()
            return t if metric_value(t, "mem_exporter_enforcer_kills_total", rule="runaway") == 1 else None

        text = wait_for(counted, 10, what="kills_total 1 in a scrape")
        assert metric_value(text, "mem_exporter_enforcer_actions_total", rule="runaway", action=ev["action"]) == 1
        assert metric_value(text, "mem_exporter_system_memory_total_bytes") > 0  # the samples it acted on, too

        delivered = hook.wait_for(lambda b: isinstance(b, dict) and b.get("receiver") == "test-hook", 40)
        (alert,) = [a for a in delivered["alerts"] if a["labels"].get("group") == ev["group"]]
        assert alert["labels"]["alertname"] == "MemExporterEnforcerKill"
        assert alert["labels"]["rule"] == "runaway" and alert["labels"]["severity"] == "critical"
        assert alert["labels"]["instance"]
        generic = hook.wait_for(lambda b: isinstance(b, dict) and b.get("pgid") == hog.pgid, 10)
        assert generic["action"] == ev["action"] and generic["rule"] == "runaway"

        # SIGHUP with a broken config: rejected, the old rules stay, the daemon runs on
        cfg.write_text(cfg.read_text().replace("max_rss: 200MiB", "max_rss: 200MiB\n      max_gpu_memory: 1GiB"))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload rejected" in d.output(), 10, what="the rejected reload in the log")
        assert d.proc.poll() is None
        assert metric_value(d.metrics(), "mem_exporter_enforcer_rules") == 1
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(20) == 0
