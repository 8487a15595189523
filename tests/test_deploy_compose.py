"""The docker-compose lab, the Dockerfile and the lab's mem-exporter config."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from helpers.daemons import Daemon
from helpers.deploy import DEPLOY, ROOT, load_yaml, run
from helpers.metrics import metric_value
from helpers.tools import DOCKER_COMPOSE, HADOLINT
from helpers.waiting import wait_for

from mem_exporter.config import load_config

COMPOSE = DEPLOY / "docker-compose.yml"
NVIDIA = DEPLOY / "docker-compose.nvidia.yml"
LAB_CONFIGS = sorted((DEPLOY / "config").glob("*.yaml"))
SITE_PACKAGES = "/usr/local/lib/python3.12/site-packages/"
DEMO_MARKER = "--mem-exporter-lab-demo"


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, NVIDIA]], ids=["lab", "lab+nvidia"])
def test_compose_file_passes_docker_compose_config(files):
    args = [arg for f in files for arg in ("-f", str(f))]
    result = run(DOCKER_COMPOSE, *args, "config", "-q")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint():
    result = run(HADOLINT, str(ROOT / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_mem_exporter_as_a_non_root_user():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert lines[0] == "FROM python:3.12-slim"
    assert 'ENTRYPOINT ["mem-exporter"]' in lines
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any("pip install ." in line for line in lines)


def test_dockerignore_keeps_the_build_context_small():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") + 1 :] and "!mem_exporter/" in lines and "!pyproject.toml" in lines


def _services():
    return load_yaml(COMPOSE)["services"]


def test_lab_has_exporter_enforcer_demo_prometheus_alertmanager_grafana():
    assert set(_services()) == {"exporter", "enforcer", "demo", "prometheus", "alertmanager", "grafana"}


def test_exporter_is_read_only_non_root_without_capabilities():
    exporter = _services()["exporter"]
    assert exporter["pid"] == "host" and exporter["read_only"] is True
    assert exporter["user"].split(":")[0] not in ("0", "root")
    assert exporter["cap_drop"] == ["ALL"] and "cap_add" not in exporter
    assert "no-new-privileges:true" in exporter["security_opt"]
    assert exporter["command"][:1] == ["serve"]


def test_enforcer_adds_only_the_kill_capability():
    enforcer = _services()["enforcer"]
    assert enforcer["pid"] == "host" and enforcer["read_only"] is True
    assert enforcer["cap_drop"] == ["ALL"] and enforcer["cap_add"] == ["KILL", "IPC_LOCK", "SYS_RESOURCE"]
    assert "no-new-privileges:true" in enforcer["security_opt"]
    assert enforcer["command"][:1] == ["enforce"]


def test_published_ports_bind_to_localhost_only():
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_services_use_the_lab_config_and_mounted_files_exist():
    for name in ("exporter", "enforcer"):
        command = _services()[name]["command"]
        path = command[command.index("--config") + 1]
        assert path.startswith("/etc/mem-exporter/")
        assert (DEPLOY / "config" / Path(path).name).is_file(), path
    for name, service in _services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, volume)


@pytest.mark.parametrize("path", LAB_CONFIGS, ids=[p.name for p in LAB_CONFIGS])
def test_lab_config_is_valid_and_kills_only_its_demo_workload(path):
    config = load_config(path)
    assert not config.enforcer.dry_run, "the lab demonstrates a real kill"
    assert [r.name for r in config.enforcer.rules] == ["lab-demo"]
    [rule] = config.enforcer.rules
    assert rule.max_rss and not rule.match.is_empty and rule.match.cmdline.endswith(f"{DEMO_MARKER}( |$)")
    assert (rule.match.comm, rule.match.exe, rule.match.user, rule.match.group) == (None, None, None, None)


def test_demo_service_runs_the_demo_workload_with_the_marker():
    demo = _services()["demo"]
    assert demo["entrypoint"] == ["python3", "/lab/demo-workload.py", DEMO_MARKER]
    assert "./lab:/lab:ro" in demo["volumes"] and (DEPLOY / "lab" / "demo-workload.py").is_file()
    assert demo["user"].split(":")[0] not in ("0", "root") and demo["cap_drop"] == ["ALL"]
    assert demo["restart"] == "unless-stopped"  # the kill repeats while the lab runs
    rule = load_config(DEPLOY / "config" / "mem-exporter.yaml").enforcer.rules[0]
    assert re.search(rule.match.cmdline, " ".join(demo["entrypoint"]))
    assert not re.search(rule.match.cmdline, "python3 /lab/demo-workload.py")  # without the marker: not selected


@pytest.mark.slow
@pytest.mark.integration
def test_lab_enforcer_kills_the_demo_workload_for_real(tmp_path):
    """The lab's config, rule and workload outside Docker: the workload grows (fast here), `mem-exporter enforce`
    with the lab's config kills it. The rule gets a second marker so it selects this run's workload alone."""
    tag = "lab" + uuid.uuid4().hex[:10]
    data = load_yaml(DEPLOY / "config" / "mem-exporter.yaml")
    [rule] = data["enforcer"]["rules"]
    lab_regex = rule["match"]["cmdline"]
    rule["match"]["cmdline"] = f"(?=.*--tag {tag}( |$)){lab_regex}"
    data["enforcer"]["event_log"] = str(tmp_path / "events.jsonl")
    data["enforcer"]["notify"] = {}
    data["gpu"] = {"backend": "none"}
    config = tmp_path / "lab.yaml"
    config.write_text(yaml.safe_dump(data))
    workload = subprocess.Popen(
        [
            sys.executable,
            str(DEPLOY / "lab" / "demo-workload.py"),
            DEMO_MARKER,
            "--grow-mb-per-s",
            "60",
            "--max-mb",
            "450",
            "--tag",
            tag,
        ],
        start_new_session=True,
        stderr=subprocess.DEVNULL,
    )
    enforcer = Daemon("enforce", "--config", str(config), cwd=tmp_path)
    try:
        cmdline = (Path("/proc") / str(workload.pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert re.search(lab_regex, cmdline), cmdline  # the lab's own rule selects the workload
        enforcer.wait_healthy()
        wait_for(lambda: workload.poll() is not None, 60, what="the lab enforcer to kill the demo workload")
        assert workload.returncode in (-signal.SIGTERM, -signal.SIGKILL)

        def lab_kills() -> list[dict]:  # the event log is written on a thread of its own: shortly after
            events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
            return [e for e in events if e.get("rule") == "lab-demo" and e.get("action") in ("term", "kill")]

        kills = wait_for(lab_kills, 10, what="the lab kill in the event log")
        assert all(e["group"].endswith(f"-{workload.pid}") for e in kills), kills
        # the counter is rendered with the next sample after the kill is confirmed
        wait_for(
            lambda: metric_value(enforcer.metrics(), "mem_exporter_enforcer_kills_total", rule="lab-demo") == 1,
            15,
            what="the lab rule's kill counter at 1",
        )
    finally:
        if workload.poll() is None:
            os.killpg(workload.pid, signal.SIGKILL)
            workload.wait()
        enforcer.stop()


def _fake_scenarios():
    for path in LAB_CONFIGS:
        backend = load_config(path).gpu.backend
        if backend.startswith("fake:"):
            yield backend.removeprefix("fake:")


def test_fake_gpu_scenario_ships_in_the_package():
    scenarios = list(_fake_scenarios())
    assert scenarios, "the lab should run on the fake GPU"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["mem_exporter"]
    for scenario in scenarios:
        assert scenario.startswith(SITE_PACKAGES + "mem_exporter/"), scenario
        relative = scenario.removeprefix(SITE_PACKAGES)
        assert (ROOT / relative).is_file(), f"{relative} is missing from the repository"
        inside = relative.removeprefix("mem_exporter/")
        assert any(fnmatch.fnmatch(inside, p) for p in patterns), (
            f"pyproject package-data for mem_exporter ({patterns}) does not ship {inside}"
        )
