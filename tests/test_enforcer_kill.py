"""The enforcer for real, in-process, against process groups this test starts (tests/hog.py).

Every rule selects only this test's own hogs by a unique `--tag`, so nothing else is ever at risk.
"""

import functools
import json
import os
import time

import pytest
from helpers.processes import pid_alive
from helpers.waiting import wait_for

from mem_exporter.config import validate_config


@pytest.fixture
def enforcer(enforcer, source):
    """Every test here runs once per source: procfs, and the portable psutil path (forced on Linux)."""
    return functools.partial(enforcer, source=source)


def event_for(enf, pgid, actions=("term", "kill")):
    return next((e for e in list(enf.events) if e.get("pgid") == pgid and e["action"] in actions), None)


def sel(tag):
    return {"cmdline": rf"hog\.py.*--tag {tag}"}


def test_a_group_growing_past_its_limit_dies_completely(enforcer, spawn_group, tag, tmp_path):
    hog = spawn_group("--grow", "150", "--max-mb", "2000", "--children", "2", "--setsid-grandchild", "--tag", tag)
    kids = hog.wait_ready()
    grandchild = int((tmp_path / "ready-0.child0").read_text().split()[0])
    everyone = [hog.pid, *kids, grandchild]
    assert all(pid_alive(p) for p in everyone)
    assert os.getpgid(grandchild) != hog.pgid  # it left the group (setsid)
    enf = enforcer([{"name": "grow", "match": sel(tag), "max_rss": "250MiB", "grace": "2s"}])
    ev = wait_for(lambda: event_for(enf, hog.pgid), 40, what="the kill event")
    assert ev["outcome"] == "dead", ev
    assert ev["rule"] == "grow" and ev["processes"] == 3 and ev["memory_bytes"] > 250 * 2**20
    assert {m["pid"] for m in ev["members"]} == {hog.pid, *kids}
    assert grandchild in {p["pid"] for p in ev["signalled"]}
    assert ev["time_to_death_seconds"] is not None
    wait_for(lambda: not any(pid_alive(p) for p in everyone), 10, what="every process of the group gone")
    assert enf.tally.kills["grow"] == 1
    assert any(x["pgid"] == hog.pgid and x["action"] == "term" for x in written(tmp_path, hog.pgid))


def test_under_the_limit_and_protected_groups_survive(enforcer, spawn_group, tag):
    small = spawn_group("--mb", "20", "--tag", tag + "small")
    shielded = spawn_group("--mb", "200", "--tag", tag + "shielded")
    small.wait_ready()
    shielded.wait_ready()
    enf = enforcer(
        [{"name": "cap", "match": sel(tag), "max_rss": "100MiB"}], protect=[{"cmdline": f"--tag {tag}shielded"}]
    )
    ev = wait_for(lambda: event_for(enf, shielded.pgid, ("skipped_protected",)), 20, what="the skipped_protected event")
    assert "protected by config" in ev["reason"]
    seen = enf.fast_reads
    time.sleep(1.0)  # a few more full samples (and fast-lane reads, if any)
    assert not any(event_for(enf, g.pgid) for g in (small, shielded))
    assert pid_alive(small.pid) and pid_alive(shielded.pid)
    assert enf.tally.kills["cap"] == 0 and seen >= 0


def test_a_member_ignoring_sigterm_gets_sigkill_after_the_grace_period(enforcer, spawn_group, tag):
    hog = spawn_group("--mb", "150", "--children", "1", "--ignore", "SIGTERM", "--tag", tag)
    kids = hog.wait_ready()
    enf = enforcer(
        [{"name": "stubborn", "match": sel(tag), "max_rss": "100MiB", "grace": "1s", "hard_ceiling": "100%"}]
    )
    ev = wait_for(lambda: event_for(enf, hog.pgid), 30, what="the kill event")
    assert ev["action"] == "kill" and ev["outcome"] == "dead" and ev["hard_ceiling"] is False, ev
    assert [s["signal"] for s in ev["signals_sent"]] == ["SIGTERM", "SIGKILL"]
    assert ev["signals_sent"][1]["at_seconds"] >= 1.0  # the grace period was kept
    wait_for(lambda: not any(pid_alive(p) for p in [hog.pid, *kids]), 10, what="the group gone")


@pytest.mark.slow
def test_hard_ceiling_kills_a_sigterm_ignoring_grower_during_the_grace_period(enforcer, spawn_group, tag):
    hog = spawn_group("--grow", "200", "--max-mb", "3000", "--ignore", "SIGTERM", "--tag", tag)
    hog.wait_ready()
    enf = enforcer([{"name": "ceiling", "match": sel(tag), "max_rss": "300MiB", "grace": "60s"}])
    ev = wait_for(lambda: event_for(enf, hog.pgid), 40, what="the kill event")
    assert ev["hard_ceiling"] is True and ev["action"] == "kill" and ev["outcome"] == "dead", ev
    assert ev["ceiling"] == pytest.approx(300 * 2**20 * 1.1)
    assert ev["signals_sent"][-1]["at_seconds"] < 60
    wait_for(lambda: not pid_alive(hog.pid), 10, what="the hog gone")


def written(tmp_path, pgid: int) -> list[dict]:
    """The event log's records of a group, once there is one (the log is written on a thread of its own)."""

    def records() -> list[dict]:
        lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
        return [x for x in lines if x["pgid"] == pgid]

    return wait_for(records, 10, what="the group's events in the event log")


def test_dry_run_kills_nothing_and_logs_the_would_be_victim(enforcer, spawn_group, tag, tmp_path):
    hog = spawn_group("--mb", "150", "--children", "1", "--tag", tag)
    kids = hog.wait_ready()
    enf = enforcer([{"name": "dry", "match": sel(tag), "max_rss": "100MiB", "grace": "0.5s"}], dry_run=True)
    ev = wait_for(lambda: event_for(enf, hog.pgid, ("dry_run",)), 20, what="the dry_run event")
    assert {p["pid"] for p in ev["would_signal"]} == {hog.pid, *kids}
    assert ev["signals"] == ["SIGTERM", "SIGKILL"] and ev["outcome"] == "not_killed"
    time.sleep(1.5)  # longer than the grace period would have been
    assert pid_alive(hog.pid) and all(pid_alive(k) for k in kids)
    assert enf.tally.kills["dry"] == 0
    assert [x["action"] for x in written(tmp_path, hog.pgid)] == ["dry_run"]  # once, then the cooldown


@pytest.mark.slow
def test_stop_waits_for_a_kill_in_progress(enforcer, spawn_group, tag):
    hog = spawn_group("--mb", "150", "--ignore", "SIGTERM", "--tag", tag)
    hog.wait_ready()
    enf = enforcer([{"name": "slow", "match": sel(tag), "max_rss": "100MiB", "grace": "2s", "hard_ceiling": "100%"}])
    wait_for(lambda: enf.kills_in_progress(), 20, what="a kill in progress")
    enf.stop()
    assert enf.kills_in_progress() == 0
    assert event_for(enf, hog.pgid)["outcome"] == "dead"
    assert not pid_alive(hog.pid)


def test_configure_swaps_rules_in_place(enforcer, spawn_group, tag):
    hog = spawn_group("--mb", "150", "--tag", tag)
    hog.wait_ready()
    enf = enforcer([{"name": "loose", "match": sel(tag), "max_rss": "1GiB"}])
    wait_for(lambda: enf.latest is not None and enf.limit_series, 10, what="a first sample")
    time.sleep(0.5)
    assert pid_alive(hog.pid)
    tight = {"name": "tight", "match": sel(tag), "max_rss": "100MiB", "grace": "1s"}
    cfg = validate_config({"interval": "0.3s", "gpu": {"backend": "none"}, "enforcer": {"rules": [tight]}})
    enf.configure(cfg)
    ev = wait_for(lambda: event_for(enf, hog.pgid), 20, what="a kill under the new rule")
    assert ev["rule"] == "tight"
