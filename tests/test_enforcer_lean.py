"""`enforce` reads only what its rules need: real process groups, a real enforcer in this process.

With no group rule, every process is read only at `walk_interval` (for the metrics) and when a
victim must be chosen; with group rules, the selected groups are re-read each interval by the lane
and newcomers come from the kernel's process events (or, with them off, from listing /proc)."""

from __future__ import annotations

import os
import time

import pytest
from helpers.processes import pid_alive
from helpers.waiting import wait_for

from mem_exporter.config import validate_config
from mem_exporter.enforcer import Enforcer
from mem_exporter.procconnector import ProcConnector
from mem_exporter.sampler import Sampler, SamplingLoop


def connector_works() -> bool:
    connector = ProcConnector.open()
    if connector is None:
        return False
    connector.close()
    return True


# Between slow walks a group rule rests on process events: without them it walks every interval.
needs_events = pytest.mark.skipif(not connector_works(), reason="no process events (root in the host's namespaces)")


@pytest.fixture
def lean(tmp_path):
    """lean(rules, **enforcer_keys): a sampling loop and an `enforce`-style Enforcer (walks as the rules need)."""
    started = []

    def start(rules, interval="0.2s", dry_run=False, **enforcer_keys):
        cfg = validate_config(
            {
                "interval": interval,
                "gpu": {"backend": "none"},
                "enforcer": {"event_log": str(tmp_path / "events.jsonl"), "rules": rules, **enforcer_keys},
            }
        )
        sampler = Sampler(cfg)
        loop = SamplingLoop(sampler)
        enf = Enforcer(cfg, dry_run=dry_run, lean=True)
        loop.walk_period = enf.walk_period
        loop.consumers.append(enf.on_sample)
        loop.start()
        started.append((loop, enf))
        return enf, sampler, loop

    yield start
    for loop, enf in started:
        loop.stop()
        enf.stop(timeout=30)


@pytest.mark.slow
def test_no_group_rule_walks_only_at_the_walk_interval(lean, tag):
    """A system rule that never fires: ticks every 0.2 s read /proc/meminfo, not every process."""
    rule = {"name": "low", "system_available_below": "1MB", "match": {"cmdline": tag}}
    enf, sampler, loop = lean([rule], walk_interval="30s")
    wait_for(lambda: loop.latest, 10, what="the first sample")
    ticks0 = loop.latest.monotonic
    time.sleep(2.0)
    assert loop.latest.monotonic - ticks0 > 1.0  # ticks went on
    assert loop.latest.light
    assert sampler.walks == 1
    assert enf.victim_walks == 0


def test_a_victim_is_chosen_from_a_fresh_walk(lean, tag, spawn_group):
    """A group born after the only walk is what the system rule must choose: only a walk at the moment of
    choosing can see it (dry run: named, never signalled)."""
    rule = {"name": "low", "system_available_below": "99%", "match": {"cmdline": f"--tag {tag}"}, "cooldown": "0.5s"}
    enf, sampler, loop = lean([rule], walk_interval="1h", dry_run=True)
    wait_for(lambda: loop.latest, 10, what="the first sample")
    hog = spawn_group("--mb", "30", "--tag", tag)
    hog.wait_ready()
    ev = wait_for(
        lambda: next((e for e in enf.events if e.get("pgid") == hog.pgid), None), 10, what=f"the event {enf.events}"
    )
    assert ev["action"] == "dry_run" and ev["rule"] == "low"
    assert sampler.walks == 1  # chosen from what was read at that moment (a walk, or the newcomers)
    assert pid_alive(hog.pid)


@pytest.mark.slow
@pytest.mark.parametrize("events", ["auto", "off"])
def test_one_group_rule_kills_a_newcomer_between_slow_walks(lean, tag, spawn_group, events):
    """A group born after the walk grows past its limit: found by process events, kept in the lane, killed
    long before the next walk. Without events (off, or not root in the host's namespaces) only a walk sees
    a program exec in place, so group rules walk every interval, as `serve` does: killed all the same."""
    rule = {"name": "cap", "max_rss": "150MB", "match": {"cmdline": f"--tag {tag}"}, "grace": "1s"}
    enf, sampler, loop = lean([rule], walk_interval="1h", process_events=events)
    # events come where the kernel delivers them (root in the host's namespaces); elsewhere the listing
    assert enf.process_events == (events == "auto" and connector_works())
    wait_for(lambda: loop.latest, 10, what="the first sample")
    assert enf.walk_period() == (3600 if enf.process_events else 0)
    hog = spawn_group("--mb", "20", "--tag", tag)
    hog.wait_ready()
    time.sleep(1.0)  # it is read and kept in the lane while still small
    assert pid_alive(hog.pid)
    grower = spawn_group("--mb", "20", "--grow", "100", "--max-mb", "400", "--tag", tag)
    wait_for(lambda: not pid_alive(grower.pid), 20, what="the kill of the growing group")
    if enf.process_events:
        assert sampler.walks == 1

    def kills() -> list[dict]:  # the kill's event is counted once its thread has confirmed the death
        return [e for e in enf.events if e["action"] in ("term", "kill") and e.get("pgid") == grower.pgid]

    (kill, *_) = wait_for(kills, 10, what=f"the kill event of {grower.pgid}")
    assert kill["memory_bytes"] > 150 * 10**6
    assert pid_alive(hog.pid)  # the small one is spared


@needs_events
def test_a_known_group_that_starts_growing_is_read_each_interval(lean, tag, spawn_group):
    """Seen small by the one walk, then growing: the lane keeps every selected group between walks."""
    rule = {"name": "cap", "max_rss": "150MB", "match": {"cmdline": f"--tag {tag}"}, "grace": "1s"}
    hog = spawn_group("--mb", "20", "--grow", "100", "--max-mb", "400", "--grow-on-signal", "--tag", tag)
    hog.wait_ready()
    enf, sampler, loop = lean([rule], walk_interval="1h")
    wait_for(lambda: loop.latest, 10, what="the first sample")
    time.sleep(0.5)
    os.kill(hog.pid, 10)  # SIGUSR1: start growing
    wait_for(lambda: not pid_alive(hog.pid), 20, what="the kill")
    assert sampler.walks == 1


def test_serve_with_the_enforcer_still_walks_every_interval(tmp_path, tag):
    cfg = validate_config(
        {
            "interval": "0.2s",
            "gpu": {"backend": "none"},
            "enforcer": {"rules": [{"name": "low", "system_available_below": "1MB", "match": {"cmdline": tag}}]},
        }
    )
    sampler = Sampler(cfg)
    loop = SamplingLoop(sampler)
    enf = Enforcer(cfg)  # as `serve` makes it
    loop.walk_period = enf.walk_period
    loop.consumers.append(enf.on_sample)
    loop.start()
    try:
        time.sleep(1.5)
        assert sampler.walks >= 4
    finally:
        loop.stop()
        enf.stop(10)


def test_walk_interval_0_is_todays_path(lean, tag):
    rule = {"name": "low", "system_available_below": "1MB", "match": {"cmdline": tag}}
    enf, sampler, loop = lean([rule], walk_interval=0)
    time.sleep(1.5)
    assert sampler.walks >= 4


@needs_events
def test_between_slow_walks_a_watched_groups_gauges_and_limit_stay_fresh(lean, tag, spawn_group):
    """A group born after the only walk, under its limit: its memory (as the lane reads it) and its limit
    are in every light sample, so the alerts' join of group gauges and limits holds between walks."""
    rule = {"name": "watch", "match": {"cmdline": f"--tag {tag}"}, "max_rss": "500MB"}
    enf, sampler, loop = lean([rule], walk_interval="1h")
    sampler.fresh_groups = enf.watched_groups  # as `enforce` wires it (service.Service)
    wait_for(lambda: loop.latest, 10, what="the first sample")
    hog = spawn_group("--mb", "60", "--tag", tag)
    hog.wait_ready()

    def exported():
        sample = loop.latest
        group = next((g for g in sample.exported if g.pgid == hog.pgid), None) if sample.light else None
        return group if group is not None and group.rss_bytes > 50 * 2**20 else None

    group = wait_for(exported, 10, what="the newcomer's group, all 60 MB of it, in a light sample")
    assert sampler.walks == 1  # no walk saw it: the lane's reading did
    assert ("watch", group.label, "rss", 500_000_000) in enf.current_limits()
