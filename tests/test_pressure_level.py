"""`system_pressure_level: warn|critical` (macOS): the kernel's own pressure verdict picks the largest selected
group, as `system_available_below` does; table tests on Samples, and one real kill with the level forced."""

from __future__ import annotations

import json

import pytest
from helpers.processes import pid_alive
from helpers.waiting import wait_for
from test_enforcer_policy import GB, ME, group, kinds, proc, rule

from mem_exporter import platforms
from mem_exporter.config import ConfigError, validate_config
from mem_exporter.enforcer.policy import PolicyState, decide
from mem_exporter.platforms import macos
from mem_exporter.sample import Sample, SystemMemory


def at(*groups, level, t=100.0):
    return Sample(
        timestamp=1_700_000_000 + t,
        monotonic=t,
        duration_seconds=0.01,
        system=SystemMemory(8 * GB, 6 * GB, 6 * GB, 0, 0, pressure_level=level),
        cpu_usage_ratio=None,
        process_count=sum(g.processes for g in groups),
        groups=tuple(groups),
        processes=tuple(p for g in groups for p in g.members),
    )


JOB = group(proc(2000, rss=2 * GB))
SMALL = group(proc(1000, rss=GB))


@pytest.mark.parametrize(
    "wanted,level,expected",
    [
        ("warn", None, []),  # not macOS: no level, never fires
        ("warn", 1, []),
        ("warn", 2, [("kill", "r", "python3-2000")]),
        ("warn", 4, [("kill", "r", "python3-2000")]),
        ("critical", 2, []),
        ("critical", 4, [("kill", "r", "python3-2000")]),
    ],
)
def test_the_level_against_the_rule(wanted, level, expected):
    r = [rule(system_pressure_level=wanted, match={"all": True})]
    assert kinds(decide(at(SMALL, JOB, level=level), r, PolicyState(), ME)) == expected


@pytest.mark.parametrize("platform,victim", [("darwin", "python3-4000"), ("linux", "python3-3000")])
def test_on_macos_the_victim_is_the_largest_by_footprint(monkeypatch, platform, victim):
    """A hog whose memory the compressor holds has a small RSS and a large footprint: on macOS the level's
    victim is chosen by the footprint, the number Activity Monitor shows; elsewhere by RSS."""
    monkeypatch.setattr(platforms, "PLATFORM", platform)
    resident = group(proc(3000, rss=2 * GB)._replace(footprint_bytes=GB // 2))
    compressed = group(proc(4000, rss=GB // 2)._replace(footprint_bytes=3 * GB))
    r = [rule(system_pressure_level="warn", match={"all": True})]
    assert kinds(decide(at(resident, compressed, level=2), r, PolicyState(), ME)) == [("kill", "r", victim)]


def test_value_limit_for_cooldown_and_only_selected_groups():
    r = [rule(system_pressure_level="warn", match={"comm": "python"}, **{"for": "2s"}, cooldown="30s")]
    db = group(proc(3000, rss=5 * GB, comm="postgres", cmdline="postgres"))
    st = PolicyState()
    assert decide(at(db, JOB, SMALL, level=2, t=100), r, st, ME) == []  # must hold 2 s first
    (a,) = decide(at(db, JOB, SMALL, level=2, t=102), r, st, ME)
    assert (a.kind, a.group.label, a.condition, a.value, a.limit) == (
        "kill",
        "python3-2000",
        "system_pressure_level",
        2,
        2,
    )
    assert decide(at(db, SMALL, level=4, t=110), r, st, ME) == []  # cooling down
    (a,) = decide(at(db, SMALL, level=4, t=140), r, st, ME)
    assert a.group.label == "python3-1000"
    assert decide(at(db, SMALL, level=1, t=200), r, st, ME) == [] and not st.for_rule("r").since


def test_config_takes_warn_or_critical_alone():
    ok = validate_config(
        {"enforcer": {"rules": [{"name": "p", "match": {"all": True}, "system_pressure_level": "critical"}]}}
    )
    assert ok.enforcer.rules[0].condition == "system_pressure_level"
    with pytest.raises(ConfigError, match=r"system_pressure_level: Input should be 'warn' or 'critical'"):
        validate_config(
            {"enforcer": {"rules": [{"name": "p", "match": {"all": True}, "system_pressure_level": "high"}]}}
        )
    with pytest.raises(ConfigError, match="exactly one condition"):
        validate_config(
            {
                "enforcer": {
                    "rules": [{"name": "p", "match": {"all": True}, "system_pressure_level": "warn", "max_rss": "1GB"}]
                }
            }
        )


def test_a_critical_level_kills_the_selected_group_for_real(enforcer, spawn_group, tag, tmp_path, monkeypatch):
    """The psutil source as on macOS (the level forced to critical): the enforcer kills the tagged hog's group."""
    monkeypatch.setattr(platforms, "PLATFORM", "darwin")
    monkeypatch.setattr(macos, "pressure_level", lambda: 4)
    monkeypatch.setattr(macos, "footprint", lambda pid: None)
    hog = spawn_group("--mb", "30", "--children", "1", "--tag", tag)
    kids = hog.wait_ready()
    enforcer(
        [{"name": "pressure", "match": {"cmdline": tag}, "system_pressure_level": "critical", "grace": "1s"}],
        source="psutil",
    )
    events = tmp_path / "events.jsonl"

    def killed():
        lines = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
        return next((e for e in lines if e.get("outcome") == "dead"), None)

    ev = wait_for(killed, 30, what="the kill event")
    assert (ev["rule"], ev["condition"], ev["pgid"], ev["value"], ev["limit"]) == (
        "pressure",
        "system_pressure_level",
        hog.pgid,
        4,
        4,
    )
    wait_for(lambda: not pid_alive(hog.pid) and not any(pid_alive(k) for k in kids), 10, what="the group gone")


def test_the_cooldown_outlives_the_full_samples_between_kills():
    """The level's cooldown is the rule's, like `system_available_below`'s: the enforcer's bounding of
    per-group state after each full sample must not drop it, or a second group dies within `cooldown`."""
    r = [rule(system_pressure_level="warn", match={"comm": "python"}, cooldown="30s")]
    st = PolicyState()
    (a,) = decide(at(JOB, SMALL, level=2, t=100), r, st, ME)
    assert a.group.label == "python3-2000"
    later = at(SMALL, level=2, t=105)
    st.forget_gone({g.key for g in later.groups}, now=105, rules=r, started=104.9)
    assert decide(later, r, st, ME) == []  # still cooling down
    assert [a.group.label for a in decide(at(SMALL, level=2, t=131), r, st, ME)] == ["python3-1000"]
