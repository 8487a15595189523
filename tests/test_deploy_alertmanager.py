"""The example Alertmanager config: valid, routes by severity, and a critical alert
inhibits the warning of the same alert on the same host (checked on a real Alertmanager)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import pytest
import yaml
from helpers.deploy import DEPLOY, run
from helpers.net import free_port
from helpers.tools import ALERTMANAGER, AMTOOL

CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"


def test_config_passes_amtool_check_config():
    result = run(AMTOOL, "check-config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "labels, receiver",
    [
        (["alertname=MemExporterSystemMemoryLow", "severity=critical"], "page"),
        (["alertname=MemExporterSystemMemoryLow", "severity=warning"], "team"),
        (["alertname=MemExporterEnforcerKilled", "severity=info"], "log"),
        (["alertname=SomethingElse"], "team"),
    ],
)
def test_alerts_route_by_severity(labels, receiver):
    result = run(
        AMTOOL, "config", "routes", "test", f"--config.file={CONFIG}", f"--verify.receivers={receiver}", *labels
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _get(url: str):
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


def _post(url: str, body) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=2):
        pass


@pytest.fixture
def alertmanager(tmp_path):
    """A real Alertmanager on 127.0.0.1 with the example config; webhooks point at a closed local port."""
    assert ALERTMANAGER, "prometheus-alertmanager is not installed"
    config = yaml.safe_load(CONFIG.read_text())
    dead = f"http://127.0.0.1:{free_port()}/"
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = dead
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"alertmanager did not start: {proc.communicate()[1][-2000:]}")
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _alert(name, severity, **labels):
    return {"labels": {"alertname": name, "severity": severity, **labels}, "annotations": {"summary": name}}


@pytest.mark.integration
def test_critical_inhibits_the_warning_of_the_same_alert_and_host_only(alertmanager):
    _post(
        f"{alertmanager}/api/v2/alerts",
        [
            _alert("MemExporterSystemMemoryLow", "critical", instance="a"),
            _alert("MemExporterSystemMemoryLow", "warning", instance="a"),
            _alert("MemExporterSystemMemoryLow", "warning", instance="b"),
            _alert("MemExporterGPUMemoryHigh", "critical", instance="a", gpu="0"),
            _alert("MemExporterGPUMemoryHigh", "warning", instance="a", gpu="1"),
        ],
    )
    deadline = time.monotonic() + 10
    while True:
        alerts = _get(f"{alertmanager}/api/v2/alerts")
        state = {
            (a["labels"]["alertname"], a["labels"]["severity"], a["labels"]["instance"], a["labels"].get("gpu")): a[
                "status"
            ]["state"]
            for a in alerts
        }
        if len(state) == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state == {
        ("MemExporterSystemMemoryLow", "critical", "a", None): "active",
        ("MemExporterSystemMemoryLow", "warning", "a", None): "suppressed",
        ("MemExporterSystemMemoryLow", "warning", "b", None): "active",
        ("MemExporterGPUMemoryHigh", "critical", "a", "0"): "active",
        ("MemExporterGPUMemoryHigh", "warning", "a", "1"): "active",
    }


@pytest.mark.integration
def test_a_down_target_inhibits_its_stale_samples_alert(alertmanager):
    _post(
        f"{alertmanager}/api/v2/alerts",
        [
            _alert("MemExporterDown", "critical", instance="a", job="mem-exporter"),
            _alert("MemExporterSamplesStale", "warning", instance="a", job="mem-exporter"),
            _alert("MemExporterSamplesStale", "warning", instance="a", job="mem-exporter-enforcer"),
        ],
    )
    deadline = time.monotonic() + 10
    while True:
        state = {
            (a["labels"]["alertname"], a["labels"]["job"]): a["status"]["state"]
            for a in _get(f"{alertmanager}/api/v2/alerts")
        }
        if len(state) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state == {
        ("MemExporterDown", "mem-exporter"): "active",
        ("MemExporterSamplesStale", "mem-exporter"): "suppressed",
        ("MemExporterSamplesStale", "mem-exporter-enforcer"): "active",
    }
