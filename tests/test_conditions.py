"""A rule condition is one class (enforcer/conditions.py): a class registered there, and nothing edited
elsewhere, is a config key with its checks, judged by decide(), routed to its lane by the enforcer, and
acted on for real.

The extra condition is registered in a Python of its own before the config is imported (config.Rule is
built from the registered conditions once), so the rest of the suite never sees it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# max_processes: a group with more processes than this. Its lane is the fast one, so a group that grows
# past it between two full samples (30 s apart here) is caught by the newcomers' scan, not by a sample.
EXTRA = r"""
import json, os, sys, time
from mem_exporter.enforcer import conditions


@conditions.condition
class MaxProcesses(conditions.GroupLimit):
    field = "max_processes"
    annotation = int | None
    description = "kill a group with more processes than this"
    lane = conditions.FAST
    memtype = "processes"

    def group_value(self, group):
        return group.processes


from mem_exporter.config import ConfigError, json_schema, validate_config
from mem_exporter.enforcer import Enforcer
from mem_exporter.enforcer.policy import Context, PolicyState, decide
from mem_exporter.sampler import Sampler, SamplingLoop

tag = os.environ["EXTRA_TAG"]  # not in this command line: only the test's group is selected
trigger, events = sys.argv[1:3]
out = {}


def problems(rule):
    try:
        validate_config({"enforcer": {"rules": [{"name": "r", "match": {"all": True}, **rule}]}}, "extra.yaml")
    except ConfigError as e:
        return e.problems
    return []


out["bad value"] = problems({"max_processes": "many"})
out["two conditions"] = problems({"max_processes": 3, "max_rss": "1GB"})
out["in the schema"] = json_schema()["$defs"]["Rule"]["properties"]["max_processes"]["description"]

cfg = validate_config({
    "interval": "30s",
    "gpu": {"backend": "none"},
    "enforcer": {
        "event_log": events,
        "rules": [{"name": "crowd", "match": {"cmdline": tag}, "max_processes": 3, "grace": "1s"}],
    },
})
rule = cfg.enforcer.rules[0]
out["condition"] = rule.condition

# decide() on a real sample of the group (two processes now, under the limit), and on the same
# sample against a limit of one: a dry run of the group
sample = Sampler(cfg).tick()
ours = [g for g in sample.groups if any(tag in p.cmdline for p in g.members)]
ctx = Context(uid=os.getuid(), pid=os.getpid(), pgid=os.getpgrp(), dry_run=True)
out["under"] = [a.kind for a in decide(sample, [rule], PolicyState(), ctx)]
tight = rule.model_copy(update={"max_processes": 1})
out["over"] = [
    (a.kind, a.condition, a.value, a.limit, a.group.pgid) for a in decide(sample, [tight], PolicyState(), ctx)
]

# the enforcer routes the rule by its condition's lane, and acts between samples
loop = SamplingLoop(Sampler(cfg))
enf = Enforcer(cfg)
out["lanes"] = [len(enf.group_rules), len(enf.system_rules), len(enf.pressure_rules)]
loop.consumers.append(enf.on_sample)
loop.start()
try:
    deadline = time.monotonic() + 20
    while enf.latest is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the first walk is taken in
    open(trigger, "w").close()  # the group forks past the limit now, 30 s before the next sample
    t0 = time.monotonic()
    while time.monotonic() < deadline and not list(enf.events):
        time.sleep(0.05)
    out["seconds to the kill"] = time.monotonic() - t0
finally:
    loop.stop()
    enf.stop(timeout=30)
print(json.dumps(out))
"""


GROUP = """
import os, subprocess, sys, time
kids = [subprocess.Popen(["sleep", "600"])]
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
kids += [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
for k in kids:
    k.wait()
"""


def _children(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return f.read().split()
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_condition_registered_in_one_class_is_parsed_judged_routed_and_enforced(tmp_path):
    tag = "extra" + uuid.uuid4().hex[:12]
    trigger, events = tmp_path / "go", tmp_path / "events.jsonl"
    # a process group of two (a leader and its sleep) until the trigger exists, then four
    group = subprocess.Popen([sys.executable, "-c", GROUP, str(trigger), tag], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not _children(group.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(_children(group.pid)) == 1
        script = tmp_path / "extra_condition.py"
        script.write_text(EXTRA)
        env = dict(os.environ, PYTHONPATH=str(ROOT), EXTRA_TAG=tag)
        done = subprocess.run(
            [sys.executable, str(script), str(trigger), str(events)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout.splitlines()[-1])

        # config: the key, its type's check, and the one-condition rule all know it
        assert out["bad value"] == [
            "extra.yaml: enforcer.rules[0].max_processes: Input should be a valid integer, unable to parse string "
            "as an integer (got 'many')"
        ]
        assert out["two conditions"] == [
            "extra.yaml: enforcer.rules[0]: a rule needs exactly one condition of max_rss, max_pss, max_footprint, "
            "max_private, max_gpu_memory, "
            "gpu_memory_above, system_available_below, memory_pressure_above, system_pressure_level, "
            "max_processes; got max_rss, max_processes"
        ]
        assert out["in the schema"] == "kill a group with more processes than this"
        assert out["condition"] == "max_processes"

        # decide(): nothing under the limit; over it, the group's own dry run, measured in processes
        assert out["under"] == []
        assert out["over"] == [["dry_run", "max_processes", 2, 1, group.pid]]

        # routing: the fast lane's rules, no other lane's
        assert out["lanes"] == [1, 0, 0]

        # the kill, between samples (the next one was 30 s away), of every process of the group
        assert out["seconds to the kill"] < 15
        group.wait(10)
        assert group.returncode == -signal.SIGTERM
        kills = [json.loads(line) for line in events.read_text().splitlines()]
        assert [(e["rule"], e["condition"], e["pgid"], e["value"], e["limit"], e["outcome"]) for e in kills] == [
            ("crowd", "max_processes", group.pid, 4, 3, "dead")
        ]
        deadline = time.monotonic() + 5
        while any(_alive(m["pid"]) for m in kills[0]["members"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(kills[0]["members"]) == 4 and not any(_alive(m["pid"]) for m in kills[0]["members"])
    finally:
        try:
            os.killpg(group.pid, signal.SIGKILL)  # the group this test started, whatever happened
        except ProcessLookupError:
            pass
        group.wait(10)


def test_the_enforcer_routes_the_built_in_conditions_by_their_lanes(tmp_path):
    from mem_exporter.config import Rule, validate_config
    from mem_exporter.enforcer import Enforcer, conditions

    every = {"all": True}
    cfg = validate_config(
        {
            "memory": "pss",
            "gpu": {"backend": "none"},
            "enforcer": {
                "dry_run": True,
                "event_log": str(tmp_path / "events.jsonl"),
                "rules": [
                    {"name": "rss", "match": every, "max_rss": "1TB"},
                    {"name": "pss", "match": every, "max_pss": "1TB"},
                    {"name": "gpu", "match": every, "max_gpu_memory": "1TB"},
                    {"name": "card", "match": every, "gpu_memory_above": "99%"},
                    {"name": "system", "match": every, "system_available_below": 1},
                    {"name": "psi", "match": every, "memory_pressure_above": "99%"},
                    {"name": "level", "match": every, "system_pressure_level": "critical"},
                ],
            },
        }
    )
    assert Rule.CONDITIONS == tuple(c.field for c in conditions.ALL)
    native = ("max_footprint", "max_private")  # each judged on its own OS only: test_native_limits.py
    assert [r.condition for r in cfg.enforcer.rules] == [c for c in Rule.CONDITIONS if c not in native]
    assert [r.name for r in cfg.enforcer.rules if conditions.of(r).per_group] == ["rss", "pss", "gpu"]
    enf = Enforcer(cfg, start_thread=lambda t: None)
    try:
        assert [r.name for r in enf.group_rules] == ["rss", "pss"]
        assert [r.name for r in enf.system_rules] == ["system"]
        assert [r.name for r in enf.pressure_rules] == ["psi"]
    finally:
        enf.stop(timeout=10)


def test_a_condition_registered_after_the_config_was_built_is_refused():
    from mem_exporter.config import Rule
    from mem_exporter.enforcer import conditions

    class Late(conditions.GroupLimit):
        field = "max_late"
        annotation = int | None
        description = "too late"

    with pytest.raises(RuntimeError, match="max_late.*after config.Rule was built"):
        conditions.condition(Late)
    assert "max_late" not in Rule.CONDITIONS and conditions.named("max_late") is None
