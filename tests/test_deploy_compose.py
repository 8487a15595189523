"""The docker-compose lab, the Dockerfile and the lab's mem-exporter config."""
from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from deploy_helpers import DEPLOY, ROOT, load_yaml, run
from mem_exporter.config import load_config
from tools import DOCKER_COMPOSE, HADOLINT

COMPOSE = DEPLOY / "docker-compose.yml"
NVIDIA = DEPLOY / "docker-compose.nvidia.yml"
LAB_CONFIGS = sorted((DEPLOY / "config").glob("*.yaml"))
SITE_PACKAGES = "/usr/local/lib/python3.12/site-packages/"


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
    assert "ENTRYPOINT [\"mem-exporter\"]" in lines
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any("pip install ." in line for line in lines)


def test_dockerignore_keeps_the_build_context_small():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") + 1:] and "!mem_exporter/" in lines and "!pyproject.toml" in lines


def _services():
    return load_yaml(COMPOSE)["services"]


def test_lab_has_exporter_enforcer_prometheus_alertmanager_grafana():
    assert set(_services()) == {"exporter", "enforcer", "prometheus", "alertmanager", "grafana"}


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
    assert enforcer["cap_drop"] == ["ALL"] and enforcer["cap_add"] == ["KILL"]
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
def test_lab_config_is_valid(path):
    config = load_config(path)
    assert config.enforcer.dry_run, "the lab enforcer watches the whole host: it must start in dry-run"


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
        assert any(fnmatch.fnmatch(inside, p) for p in patterns), \
            f"pyproject package-data for mem_exporter ({patterns}) does not ship {inside}"
