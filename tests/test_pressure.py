"""Memory pressure (PSI): parsing, the kernel trigger's fallback on this kernel, and the rule's decisions
from fixture pressure files read by the real sampler."""

import dataclasses
import os
import threading
import time

import pytest
from helpers.procfs_builder import FakeProc
from helpers.waiting import wait_for

from mem_exporter.config import ConfigError, validate_config
from mem_exporter.enforcer.policy import Context, PolicyState, decide
from mem_exporter.pressure import (
    PressureWatch,
    StallWindow,
    Threshold,
    cgroup_pressure_path,
    parse_pressure,
    read_pressure,
)
from mem_exporter.sampler import Sampler

ME = Context(uid=os.geteuid(), pid=10, pgid=10)
HOST_PSI = "/proc/pressure/memory"


# --- parsing ------------------------------------------------------------------------------------


def test_parse_a_psi_file():
    p = parse_pressure(
        b"some avg10=12.50 avg60=3.00 avg300=0.25 total=1500000\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=250000\n"
    )
    assert (p.some.avg10, p.some.avg60, p.some.avg300, p.some.total_seconds) == (0.125, 0.03, 0.0025, 1.5)
    assert (p.full.avg10, p.full.total_seconds) == (0.01, 0.25)


def test_a_host_file_without_full_line_and_garbage():
    assert parse_pressure(b"some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n").full is None
    with pytest.raises(ValueError):
        parse_pressure(b"MemTotal: 1 kB\n")
    with pytest.raises(ValueError):
        parse_pressure(b"some avg10=x avg60=0 avg300=0 total=0\n")


@pytest.mark.skipif(not os.path.exists(HOST_PSI), reason="kernel without PSI")
def test_parse_the_real_host_file():
    with open(HOST_PSI, "rb") as f:
        raw = f.read()
    p = parse_pressure(raw)
    assert 0 <= p.some.avg10 <= 1 and 0 <= p.some.avg300 <= 1 and p.some.total_seconds >= 0
    assert p.full is not None and p.full.total_seconds <= p.some.total_seconds + 1e-6
    assert int(raw.split(b"total=")[1].split()[0]) / 1e6 == pytest.approx(p.some.total_seconds)


def test_missing_file_reads_as_none(tmp_path):
    assert read_pressure(str(tmp_path / "nope")) is None


def test_cgroup_path_relative_to_the_mount_or_its_unified_tree(tmp_path):
    (tmp_path / "unified" / "job").mkdir(parents=True)
    (tmp_path / "unified" / "job" / "memory.pressure").write_text("")
    assert cgroup_pressure_path("/job", str(tmp_path)) == str(tmp_path / "unified" / "job" / "memory.pressure")
    assert cgroup_pressure_path("other", str(tmp_path)) == str(tmp_path / "other" / "memory.pressure")


# --- the stall window -------------------------------------------------------------------------


def test_stall_window_from_frequent_and_sparse_readings():
    w = StallWindow(1.0)
    assert w.add(0.0, 10.0) is None
    for i in range(1, 11):  # 20 ms of stall every 100 ms: 200 ms per second
        value = w.add(i * 0.1, 10.0 + i * 0.02)
    assert value == pytest.approx(0.2)
    assert w.add(1.1, 10.0 + 0.2 + 0.3) == pytest.approx(0.48)  # 300 ms in the last 100 ms: the window holds 480
    sparse = StallWindow(1.0)
    sparse.add(0.0, 0.0)
    assert sparse.add(2.0, 0.5) == pytest.approx(0.25)  # two seconds apart: the average rate per window
    assert sparse.add(3.0, 0.2) is None  # counter went back (cgroup recreated): start over


# --- the watch: trigger where accepted, fallback where refused ---------------------------------


@pytest.mark.skipif(not os.path.exists(HOST_PSI), reason="kernel without PSI")
def test_watch_on_the_real_host_file_trigger_or_fallback():
    watch = PressureWatch(HOST_PSI, Threshold("some", stall=0.15, window=1.0))
    try:
        if watch.mode == "fallback":  # this machine: the kernel answers the trigger write with EINVAL
            assert "refused" in watch.refused, watch.refused
            before = watch.reads
            assert isinstance(watch.wait(0.25), bool)
            assert watch.reads > before and watch.last is not None  # it read the real file instead
        else:  # a kernel that accepts triggers: the wait is a poll() on the descriptor, no reads
            assert isinstance(watch.wait(0.25), bool) and watch.reads == 0
    finally:
        watch.close()


def test_fallback_wakes_on_a_stall_in_a_fixture_file(tmp_path):
    fp = FakeProc(tmp_path)
    path = fp.pressure(some=(0, 0, 0, 1_000_000))
    watch = PressureWatch(str(path), Threshold("some", stall=0.15, window=1.0), trigger=False, period=0.02)
    assert watch.mode == "fallback" and not watch.wait(0.1)  # the total stands still: no stall

    def stall_later():
        time.sleep(0.15)
        fp.pressure(some=(5, 1, 0, 1_000_000 + 300_000))  # 300 ms of stall appears

    t = threading.Thread(target=stall_later)
    t.start()
    try:
        assert watch.wait(5.0)
    finally:
        t.join()
        watch.close()


def test_fallback_avg10_threshold_on_full(tmp_path):
    fp = FakeProc(tmp_path)
    path = fp.pressure(some=(50, 0, 0, 0), full=(5, 0, 0, 0))
    assert not PressureWatch(str(path), Threshold("full", avg10=0.10), period=0.01).wait(0.05)
    fp.pressure(some=(50, 0, 0, 0), full=(15, 0, 0, 0))
    watch = PressureWatch(str(path), Threshold("full", avg10=0.10), period=0.01)
    assert watch.mode == "fallback" and watch.wait(0.05)


# --- config --------------------------------------------------------------------------------------


def test_config_forms_and_errors():
    cfg = validate_config(
        {
            "enforcer": {
                "rules": [
                    {"name": "a", "match": {"all": True}, "memory_pressure_above": "20%"},
                    {
                        "name": "b",
                        "match": {"all": True},
                        "memory_pressure_above": {"kind": "full", "stall": "150ms", "window": "1s", "cgroup": "/job"},
                    },
                ]
            }
        }
    )
    a, b = cfg.enforcer.rules
    assert a.condition == "memory_pressure_above" and a.memory_pressure_above.avg10 == 0.2
    assert (b.memory_pressure_above.kind, b.memory_pressure_above.stall, b.memory_pressure_above.source) == (
        "full",
        0.15,
        "/job",
    )
    for bad, words in [
        ({"stall": "2s", "window": "1s"}, "at most window"),
        ({"avg10": "10%", "stall": "1s"}, "exactly one of avg10, stall"),
        ({"stall": "100ms", "window": "20s"}, "window"),
        ({"kind": "most", "avg10": 0.1}, "kind"),
        ({"avg10": "0%"}, "avg10 must be above 0"),
    ]:
        with pytest.raises(ConfigError) as e:
            validate_config(
                {"enforcer": {"rules": [{"name": "p", "match": {"all": True}, "memory_pressure_above": bad}]}}, "c.yaml"
            )
        assert "c.yaml: enforcer.rules[0].memory_pressure_above" in str(e.value) and words in str(e.value)


# --- decisions from fixture pressure files, through the real sampler -----------------------------


def _tree(tmp_path):
    fp = FakeProc(tmp_path / "proc")  # the fixture's processes belong to the test's user, like ME
    fp.add(100, "small", rss_kb=10_000)
    fp.add(200, "big", rss_kb=500_000)
    fp.add(201, "big", ppid=200, pgid=200, rss_kb=100_000)
    return fp


def _sampler(tmp_path, rule: dict) -> Sampler:
    cfg = validate_config(
        {
            "paths": {"procfs": str(tmp_path / "proc"), "cgroupfs": str(tmp_path / "cg")},
            "gpu": {"backend": "none"},
            "enforcer": {"rules": [{"name": "psi", "match": {"all": True}, **rule}]},
        }
    )
    return Sampler(cfg)


def _decide(sampler: Sampler, state: PolicyState, at: float):
    sample = dataclasses.replace(sampler.tick(), monotonic=at)
    return sample, decide(sample, sampler.config.enforcer.rules, state, ME)


def test_avg10_rule_kills_the_largest_group_with_for_and_cooldown(tmp_path):
    fp = _tree(tmp_path)
    fp.pressure(some=(5, 1, 0, 10_000))
    s = _sampler(tmp_path, {"memory_pressure_above": {"avg10": "20%"}, "for": "2s", "cooldown": "30s"})
    st = PolicyState()
    sample, actions = _decide(s, st, 100.0)
    assert sample.pressure.some.avg10 == 0.05 and actions == []
    fp.pressure(some=(35, 10, 2, 900_000))
    assert _decide(s, st, 101.0)[1] == []  # above, but not yet for 2 s
    (a,) = _decide(s, st, 103.0)[1]
    assert (a.kind, a.condition, a.group.label) == ("kill", "memory_pressure_above", "big-200")
    assert (a.value, a.limit) == (0.35, 0.2)
    assert {p.pid for p in a.targets} == {200, 201}
    assert _decide(s, st, 110.0)[1] == []  # cooling down
    fp.pressure(some=(10, 10, 2, 900_000))
    assert _decide(s, st, 140.0)[1] == []  # back under: the `for` clock resets
    fp.pressure(some=(35, 10, 2, 900_000))
    assert _decide(s, st, 141.0)[1] == []


def test_stall_rule_from_totals_on_full_line(tmp_path):
    fp = _tree(tmp_path)
    fp.pressure(some=(0, 0, 0, 5_000_000), full=(0, 0, 0, 1_000_000))
    s = _sampler(tmp_path, {"memory_pressure_above": {"kind": "full", "stall": "150ms", "window": "1s"}})
    st = PolicyState()
    assert _decide(s, st, 100.0)[1] == []  # one reading: no window yet
    fp.pressure(some=(0, 0, 0, 6_000_000), full=(0, 0, 0, 1_100_000))
    assert _decide(s, st, 101.0)[1] == []  # 100 ms of full stall in a second: under 150 ms
    fp.pressure(some=(0, 0, 0, 6_000_000), full=(0, 0, 0, 1_300_000))
    (a,) = _decide(s, st, 102.0)[1]
    assert a.kind == "kill" and a.group.label == "big-200" and a.value == pytest.approx(0.2) and a.limit == 0.15


def test_cgroup_pressure_rule_reads_that_cgroups_file(tmp_path):
    fp = _tree(tmp_path)
    fp.pressure(some=(0, 0, 0, 0))  # the host is calm
    fp.pressure(some=(40, 0, 0, 0), path=tmp_path / "cg" / "job" / "memory.pressure")
    s = _sampler(tmp_path, {"memory_pressure_above": {"avg10": 0.3, "cgroup": "/job"}, "match": {"comm": "^small$"}})
    sample, (a,) = _decide(s, PolicyState(), 100.0)
    assert set(sample.cgroup_pressure) == {"/job"} and a.group.label == "small-100"
    (tmp_path / "cg" / "job" / "memory.pressure").unlink()  # the cgroup went away: nothing to judge
    assert _decide(s, PolicyState(), 101.0)[1] == []


def test_no_psi_no_action_and_no_metric(tmp_path):
    _tree(tmp_path)
    s = _sampler(tmp_path, {"memory_pressure_above": {"avg10": 0.01}})
    sample, actions = _decide(s, PolicyState(), 100.0)
    assert sample.pressure is None and actions == []


def test_dry_run_and_protected_victims(tmp_path):
    fp = _tree(tmp_path)
    fp.pressure(some=(90, 0, 0, 0))
    s = _sampler(tmp_path, {"memory_pressure_above": {"avg10": 0.5}})
    sample = s.tick()
    (a,) = decide(sample, s.config.enforcer.rules, PolicyState(), dataclasses.replace(ME, dry_run=True))
    assert a.kind == "dry_run" and a.group.label == "big-200"
    skipped, a = decide(sample, s.config.enforcer.rules, PolicyState(), dataclasses.replace(ME, pgid=200))
    assert skipped.kind == "skipped_protected" and skipped.group.label == "big-200"  # the enforcer's own group
    assert a.kind == "kill" and a.group.label == "small-100"  # so the next largest


def test_watches_from_a_config_wake_the_enforcer_and_refresh_the_sample(tmp_path):
    """What the enforcer thread does between full samples: wait on every pressure rule's watch at once, then
    judge the pressure rules on the latest sample with PSI read now."""
    from mem_exporter.pressure import PressureWatches

    fp = _tree(tmp_path)
    fp.pressure(some=(0, 0, 0, 0))
    cg = fp.pressure(some=(0, 0, 0, 2_000_000), path=tmp_path / "cg" / "job" / "memory.pressure")
    s = _sampler(tmp_path, {"memory_pressure_above": {"stall": "100ms", "window": "1s", "cgroup": "job"}})
    watches = PressureWatches.from_config(s.config, trigger=False)
    assert [w.mode for w in watches.watches] == ["fallback"] and watches
    latest = s.tick()
    st = PolicyState()
    assert decide(latest, s.config.enforcer.rules, st, ME) == []  # the first reading of the total
    assert not watches.wait(0.3)

    def stall_later():
        time.sleep(0.1)
        fp.pressure(some=(30, 5, 1, 2_400_000), path=cg)  # 400 ms of stall in the cgroup

    t = threading.Thread(target=stall_later)
    t.start()
    try:
        assert watches.wait(5.0)
    finally:
        t.join()
        watches.close()
    fresh = watches.refresh(latest)
    assert fresh.cgroup_pressure["job"].some.total_seconds == 2.4 and fresh.monotonic > latest.monotonic
    (a,) = decide(fresh, s.config.enforcer.rules, st, ME)
    assert a.kind == "kill" and a.condition == "memory_pressure_above" and a.group.label == "big-200"


def test_no_pressure_rules_no_watches(tmp_path):
    from mem_exporter.pressure import PressureWatches

    _tree(tmp_path)
    assert not PressureWatches.from_config(_sampler(tmp_path, {"max_rss": "1GB"}).config)


def test_the_enforcer_acts_on_pressure_between_full_samples(tmp_path):
    """The enforcer thread's pressure lane: a crossing in the fixture file is acted on (dry run: named, never
    signalled) long before the next full sample of a 60 s interval."""
    from mem_exporter.enforcer import Enforcer
    from mem_exporter.sampler import SamplingLoop

    fp = _tree(tmp_path)
    fp.pressure(some=(1, 1, 1, 0))
    s = _sampler(tmp_path, {"memory_pressure_above": "20%", "match": {"comm": "^(big|small)$"}})
    cfg = s.config.model_copy(update={"interval": 60.0})
    enf = Enforcer(cfg, dry_run=True)
    loop = SamplingLoop(Sampler(cfg))
    loop.consumers.append(enf.on_sample)
    loop.start()
    try:
        first = wait_for(lambda: enf.latest, 10, what="the first full sample")
        time.sleep(0.3)
        assert not enf.events
        fp.pressure(some=(35, 10, 2, 5_000_000))
        ev = wait_for(lambda: next(iter(enf.events), None), 10, what="the dry-run event")
        assert ev["action"] == "dry_run" and ev["condition"] == "memory_pressure_above" and ev["group"] == "big-200"
        assert enf.latest is first  # no second full sample: the pressure lane decided
    finally:
        loop.stop()
        enf.stop(5)
