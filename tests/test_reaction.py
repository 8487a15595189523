"""Reaction between full samples, for real: a group born just after a full sample is killed before
the next one (the newcomer scan), and a system-memory rule acts between full samples on fresh
readings (the system lane). The interval is long (5 s) so that "between samples" is unambiguous;
every rule selects only this test's own hogs by a unique tag."""

import signal

import pytest
from helpers.processes import pid_alive
from helpers.waiting import wait_for

MB = 1024 * 1024


def meminfo_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


def next_full_sample(enf, after: float | None = None) -> float:
    """The timestamp of the first full sample the enforcer has taken in after `after`."""
    return wait_for(
        lambda: enf.latest is not None and (after is None or enf.latest.timestamp > after) and enf.latest.timestamp,
        20,
        0.005,
        what="a full sample",
    )


def kills_seen(enf) -> list[tuple[dict, float]]:
    """Each kill event with the timestamp of the latest full sample at the moment it was recorded."""
    seen: list[tuple[dict, float]] = []
    enf.listeners.append(
        lambda ev: seen.append((ev, enf.latest.timestamp)) if ev["action"] in ("term", "kill") else None
    )
    return seen


@pytest.mark.slow
def test_group_born_after_a_full_sample_dies_before_the_next(enforcer, spawn_group, tag):
    enf = enforcer(
        [{"name": "newborn", "match": {"cmdline": f"--tag {tag}"}, "max_rss": "150MB", "grace": "1s"}], interval="5s"
    )
    seen = kills_seen(enf)
    first = next_full_sample(enf)
    born_after = next_full_sample(enf, first)  # right after a full sample: the longest wait for the next one
    hog = spawn_group("--grow", "200", "--max-mb", "1000", "--tag", tag, ready=False)
    wait_for(lambda: not pid_alive(hog.pid), 20, what="the new group killed")
    ev, latest_then = wait_for(lambda: seen and seen[0], 10, what="the kill event")
    assert ev["pgid"] == hog.pgid and ev["rule"] == "newborn" and ev["outcome"] == "dead"
    assert latest_then == born_after  # no full sample came between its birth and its death
    assert all(p.pid != hog.pid for p in enf.latest.processes)


@pytest.mark.slow
def test_system_rule_kills_the_largest_matching_group_between_full_samples(enforcer, spawn_group, tag):
    from mem_exporter.config import validate_config

    small = spawn_group("--mb", "30", "--tag", tag)
    big = spawn_group("--mb", "60", "--grow", "200", "--max-mb", "2500", "--grow-on-signal", "--tag", tag)
    small.wait_ready()
    big.wait_ready()

    def rules(threshold: int) -> list[dict]:
        return [
            {
                "name": "low-memory",
                "match": {"cmdline": f"--tag {tag}"},
                "system_available_below": threshold,
                "grace": "1s",
            }
        ]

    enf = enforcer(rules(1), interval="5s")  # never crossed until the real threshold comes in
    seen = kills_seen(enf)
    first = next_full_sample(enf)
    started_after = next_full_sample(enf, first)
    before = {g.pgid: g.rss_bytes for g in enf.latest.groups if g.pgid in (small.pgid, big.pgid)}
    assert before.keys() == {small.pgid, big.pgid}
    # right after a full sample, a few hundred MiB below what is available now (other load on the machine
    # moves it; only this test's hogs are selected, and the big one is the largest whatever the amounts)
    threshold = meminfo_available() - 400 * MB
    events = enf.config.enforcer.event_log
    enf.configure(
        validate_config(
            {"interval": "5s", "gpu": {"backend": "none"}, "enforcer": {"event_log": events, "rules": rules(threshold)}}
        )
    )
    big.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: not pid_alive(big.pid), 30, what="the largest matching group killed")
    ev, latest_then = wait_for(lambda: seen and seen[0], 10, what="the kill event")
    assert ev["pgid"] == big.pgid and ev["rule"] == "low-memory" and ev["condition"] == "system_available_below"
    assert ev["value"] < threshold and ev["outcome"] == "dead"
    assert latest_then == started_after  # decided and done between two full samples
    assert ev["memory_bytes"] > before[big.pgid]  # chosen on a fresh reading, not the full sample's
    assert pid_alive(small.pid) and len(seen) == 1


# --- the newcomer scan's cheap parts, on fixture trees and on this machine's /proc --------------


def test_new_processes_reports_the_pids_it_will_never_watch(tmp_path):
    from helpers.procfs_builder import FakeProc

    from mem_exporter.config import validate_config
    from mem_exporter.sampler import GroupReader

    fake = FakeProc(tmp_path / "proc")
    fake.add(100, "bash", rss_kb=4096)
    fake.add(200, "kworker/0:1", ppid=2, flags=0x00200040, rss_kb=0)  # PF_KTHREAD
    fake.add(300, "defunct", state="Z", rss_kb=0)
    reader = GroupReader(validate_config({"paths": {"procfs": str(fake.root)}, "gpu": {"backend": "none"}}))
    unwatched: set[int] = set()
    procs = reader.new_processes(set(), unwatched)
    assert [p.pid for p in procs] == [100] and unwatched == {200, 300}
    assert reader.new_processes({100, 200, 300}, unwatched) == []


def test_pid_watch_follows_loadavg_only_in_its_own_pid_namespace(tmp_path, spawn_group):
    from mem_exporter.enforcer.lane import PidWatch

    watch = PidWatch("/proc")  # this machine's own namespace
    assert watch.moved()  # the first look always does
    spawn_group("--tag", "pidwatch").wait_ready()
    assert watch.moved()  # a process started since
    outer = tmp_path / "outer"  # a procfs that shows an outer namespace (NSpid with two pids)
    (outer / "self").mkdir(parents=True)
    (outer / "self" / "status").write_text("Name:\tx\nNSpid:\t4242\t7\n")
    (outer / "loadavg").write_text("0.00 0.00 0.00 1/100 4242\n")
    outside = PidWatch(str(outer))
    assert outside.moved() and outside.moved()  # cannot tell: always lists


def test_system_period_reads_sooner_near_the_threshold_and_just_after_a_predicted_crossing():
    from mem_exporter.enforcer.lane import SYSTEM_MIN_PERIOD, SYSTEM_MIN_SPACING, system_period

    mib = 1024 * 1024
    assert system_period(20_000 * mib, 0, 2.0) == 2.0  # far from it: the interval
    assert system_period(600 * mib, 0, 2.0) < 0.2  # at earlyoom's fastest fill rate, 6000 KiB/ms
    assert system_period(5 * mib, 0, 2.0) == SYSTEM_MIN_PERIOD  # close, nothing growing: the floor
    growing = system_period(5 * mib, 500 * mib, 2.0)  # close and filling at 500 MiB/s: just after the crossing
    assert SYSTEM_MIN_SPACING <= growing < SYSTEM_MIN_PERIOD and growing > 5 / 500
    assert system_period(-1, 500 * mib, 2.0) == SYSTEM_MIN_PERIOD  # below: act, then the next look


def test_system_lane_below_the_threshold_keeps_the_cooldown_and_keeps_running(enforcer, spawn_group, tag, caplog):
    first = spawn_group("--mb", "20", "--tag", tag)
    first.wait_ready()
    always = meminfo_kib_total() * 1024  # MemAvailable is always below MemTotal: the condition always holds
    enf = enforcer(
        [
            {
                "name": "low-memory",
                "match": {"cmdline": f"--tag {tag}"},
                "system_available_below": always,
                "grace": "1s",
                "cooldown": "10min",
            }
        ]
    )
    wait_for(lambda: not pid_alive(first.pid), 20, what="the first matching group killed")
    second = spawn_group("--mb", "20", "--tag", tag)
    second.wait_ready()
    reads, seen = enf.system_reads, next_full_sample(enf)
    for _ in range(3):  # full samples and system-lane reads go on below the threshold, during the cooldown
        seen = next_full_sample(enf, seen)
    wait_for(lambda: enf.system_reads >= reads + 3, 20, what="more system-lane reads")
    assert pid_alive(second.pid)
    assert enf.tally.kills.get("low-memory") == 1
    assert "enforcer pass failed" not in caplog.text


def meminfo_kib_total() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1])
