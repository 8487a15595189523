"""VRAM rules for real: the fake GPU reports real spawned processes as holding VRAM, and the
enforcer kills the right process group. Only this test's own hogs are selected (by a unique tag)."""

import json
import uuid

import pytest
from helpers.processes import pid_alive
from helpers.waiting import wait_for

GIB = 1024**3


def scenario(path, holders):
    procs = ", ".join(f"{{pid: {pid}, gpu_memory: {gib}GiB}}" for pid, gib in holders)
    path.write_text(f"""driver_version: "550.54.15"
cards:
  - {{name: NVIDIA GeForce RTX 3060, uuid: GPU-3060, memory_total: 12GiB}}
steps:
  - at: 0
    cards:
      0: {{utilization: 90%, temperature: 70, processes: [{procs}]}}
""")


def config(path, tag, rule, events):
    path.write_text(f"""interval: 0.3s
enforcer:
  event_log: {events}
  rules:
    - name: {rule["name"]}
      match: {{cmdline: 'hog\\.py.*--tag {tag}'}}
      grace: 1s
      {rule["condition"]}
""")


def kills(events):
    if not events.exists():
        return []
    return [e for e in map(json.loads, events.read_text().splitlines()) if e["action"] in ("term", "kill")]


@pytest.mark.integration
def test_a_group_over_its_vram_limit_is_killed(daemon, spawn_group, tmp_path):
    tag = "g" + uuid.uuid4().hex[:10]
    hog = spawn_group("--mb", "5", "--children", "1", "--tag", tag)
    kids = hog.wait_ready()
    small = spawn_group("--mb", "5", "--tag", tag)
    small.wait_ready()
    scenario(tmp_path / "gpu.yaml", [(kids[0], 6), (small.pid, 1)])  # the child holds the VRAM
    events = tmp_path / "events.jsonl"
    config(tmp_path / "c.yaml", tag, {"name": "vram-hog", "condition": "max_gpu_memory: 4GiB"}, events)
    d = daemon("enforce", "--config", str(tmp_path / "c.yaml"), "--gpu-backend", f"fake:{tmp_path / 'gpu.yaml'}")
    d.wait_healthy()
    wait_for(lambda: not pid_alive(hog.pid) and not pid_alive(kids[0]), 20, what="the VRAM hog's whole group to die")
    (event,) = wait_for(lambda: kills(events), 10, what="the kill event")
    assert event["rule"] == "vram-hog" and event["pgid"] == hog.pgid
    assert pid_alive(small.pid)  # 1 GiB: under the limit


@pytest.mark.integration
def test_a_full_card_loses_its_largest_vram_user(daemon, spawn_group, tmp_path):
    tag = "g" + uuid.uuid4().hex[:10]
    big = spawn_group("--mb", "5", "--tag", tag)
    big.wait_ready()
    other = spawn_group("--mb", "50", "--tag", tag)  # more RAM, less VRAM: not the victim
    other.wait_ready()
    scenario(tmp_path / "gpu.yaml", [(big.pid, 7), (other.pid, 3.5)])  # 10.5 of 12 GiB: 87.5 %
    events = tmp_path / "events.jsonl"
    config(tmp_path / "c.yaml", tag, {"name": "gpu-critical", "condition": "gpu_memory_above: 83%"}, events)
    d = daemon("enforce", "--config", str(tmp_path / "c.yaml"), "--gpu-backend", f"fake:{tmp_path / 'gpu.yaml'}")
    d.wait_healthy()
    wait_for(lambda: not pid_alive(big.pid), 20, what="the largest VRAM user to die")
    (event,) = wait_for(lambda: kills(events), 10, what="the kill event")
    assert event["rule"] == "gpu-critical" and event["pgid"] == big.pgid
    assert pid_alive(other.pid)
