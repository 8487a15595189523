"""`max_footprint` (macOS) and `max_private` (Windows): a group rule on the number the OS shows its users,
as `run -t` limits it there. Real process groups, the psutil source with the platform forced and the
OS's call answered at its seam."""

from __future__ import annotations

import json

import pytest
from helpers.processes import pid_alive
from helpers.waiting import wait_for

from mem_exporter import platforms
from mem_exporter.config import ConfigError, validate_config
from mem_exporter.platforms import macos, windows

MB = 10**6


@pytest.mark.parametrize("platform,key", [("darwin", "max_footprint"), ("win32", "max_private")])
def test_a_rule_on_the_oss_own_number_kills_a_group_whose_rss_is_small(
    enforcer, spawn_group, tag, tmp_path, monkeypatch, platform, key
):
    """30 MB resident, 400 MB of footprint (compressed pages) or commit (reserved, never touched): over a
    300 MB limit on the OS's number, under it by RSS."""
    hog = spawn_group("--mb", "30", "--tag", tag)
    hog.wait_ready()
    monkeypatch.setattr(platforms, "PLATFORM", platform)
    if platform == "darwin":
        monkeypatch.setattr(macos, "footprint", lambda pid: 400 * MB if pid == hog.pid else None)
        monkeypatch.setattr(macos, "pressure_level", lambda: 1)
    else:
        monkeypatch.setattr(windows, "private_bytes", lambda pid, info: 400 * MB if pid == hog.pid else None)
        monkeypatch.setattr(windows, "commit", lambda: None)
    enforcer([{"name": "native", "match": {"cmdline": tag}, key: "300MB", "grace": "1s"}], source="psutil")
    events = tmp_path / "events.jsonl"

    def killed():
        lines = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
        return next((e for e in lines if e.get("outcome") == "dead"), None)

    ev = wait_for(killed, 30, what="the kill event")
    judged = (ev["rule"], ev["condition"], ev["pgid"], ev["value"], ev["limit"])
    assert judged == ("native", key, hog.pgid, 400 * MB, 300 * MB)  # `value`: the number the rule limits
    wait_for(lambda: not pid_alive(hog.pid), 10, what="the group gone")


@pytest.mark.parametrize("key,os_name", [("max_footprint", "macOS"), ("max_private", "Windows")])
def test_on_another_os_the_rule_is_refused_not_judged_on_rss(key, os_name):
    with pytest.raises(ConfigError) as e:
        validate_config({"enforcer": {"rules": [{"name": "r", "match": {"all": True}, key: "1GB"}]}})
    assert e.value.problems == [f"<config>: enforcer.rules[0].{key}: is read on {os_name} only; use max_rss here"]
