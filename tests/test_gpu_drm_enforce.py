"""VRAM rules on an AMD card, for real: `mem-exporter enforce --dry-run` as a subprocess over fixture /proc
and /sys trees (--path.procfs, --path.sysfs). The event log names the group the rule would kill.

The fixture's PIDs are above the kernel's PID_MAX_LIMIT (4194304): no live process can have them, and a
dry run signals nothing anyway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.metrics import metric_value
from helpers.procfs_builder import FakeProc
from helpers.sysfs_builder import FakeSys, add_fd, add_plain_fds
from helpers.waiting import wait_for

GIB = 1024**3
GAME, TRAIN = 5_000_100, 5_000_200  # never live PIDs


def amd_box(root: Path) -> tuple[Path, Path]:
    proc, sys_ = root / "proc", root / "sys"
    FakeSys(sys_).add_card("amd-discrete")
    fp = FakeProc(proc)
    game = fp.add(GAME, "game", rss_kb=900_000)  # more RAM, less VRAM: not the victim
    add_plain_fds(game, 12)
    add_fd(game, 40, "/dev/dri/renderD128", "amdgpu-client42.fdinfo")  # 2 GiB VRAM
    train = fp.add(TRAIN, "python3", cmdline="python3 train.py", rss_kb=300_000)
    add_plain_fds(train, 30)
    add_fd(train, 31, "/dev/dri/renderD128", "amdgpu-client43.fdinfo")  # 6 GiB VRAM
    add_plain_fds(fp.add(TRAIN + 1, "python3", ppid=TRAIN, pgid=TRAIN, rss_kb=200_000), 8)
    return proc, sys_


def events_of(path: Path, action: str) -> list[dict]:
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["action"] == action]


@pytest.mark.integration
@pytest.mark.parametrize("condition", ["max_gpu_memory: 4GiB", "gpu_memory_above: 30%"])
def test_a_vram_rule_on_an_amd_card_names_the_group_holding_the_vram(daemon, tmp_path, condition):
    proc, sys_ = amd_box(tmp_path)
    events = tmp_path / "events.jsonl"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"interval: 0.3s\ngpu: {{backend: auto}}\nenforcer:\n  event_log: {events}\n"
        f"  rules:\n    - name: vram\n      match: {{all: true}}\n      {condition}\n      grace: 1s\n"
    )
    d = daemon("enforce", "--dry-run", "--config", str(cfg), "--path.procfs", str(proc), "--path.sysfs", str(sys_))
    d.wait_healthy()
    (event,) = wait_for(lambda: events_of(events, "dry_run"), 15, what="the dry_run event")[:1]
    assert event["rule"] == "vram" and event["group"] == f"python3-{TRAIN}" and event["pgid"] == TRAIN
    assert sorted(w["pid"] for w in event["would_signal"]) == [TRAIN, TRAIN + 1]
    if condition.startswith("gpu_memory_above"):
        assert event["gpu"] == 0 and event["gpu_memory_bytes"] == 6 * GIB
        assert event["value"] == pytest.approx(9126805504 / 25753026560)  # the card's own mem_info_vram_used
    else:
        assert event["value"] == 6 * GIB
    assert all(e["group"] != f"game-{GAME}" for e in events_of(events, "dry_run"))


@pytest.mark.integration
def test_serve_on_fixture_trees_shows_the_amd_card_and_group_vram(daemon, tmp_path):
    proc, sys_ = amd_box(tmp_path)
    d = daemon("serve", "--interval", "0.3s", "--path.procfs", str(proc), "--path.sysfs", str(sys_)).wait_healthy()
    text = wait_for(
        lambda: next((t for t in [d.metrics()] if "mem_exporter_gpu_info" in t), None), 10, what="the card in /metrics"
    )
    assert 'vendor="amd"' in text and 'pci_bus_id="0000:03:00.0"' in text
    assert metric_value(text, "mem_exporter_group_gpu_memory_bytes", group=f"python3-{TRAIN}", gpu="0") == 6 * GIB
    assert metric_value(text, "mem_exporter_gpu_gtt_memory_total_bytes", gpu="0") == 33554432000
    assert metric_value(text, "mem_exporter_source_up", source="gpu") == 1
