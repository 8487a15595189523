"""Self-protection for real: mlockall and oom_score_adj in child processes (never in the test process itself),
applied when permitted, reported (and 0 in the metric) when not."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.metrics import metric_value
from helpers.waiting import wait_for

from mem_exporter.selfprotect import CAP_IPC_LOCK, CAP_SYS_RESOURCE, has_capability, should_write_oom_score_adj

ROOT = Path(__file__).parents[1]
SETPRIV = "/usr/bin/setpriv"

# Applies SelfProtection in a fresh interpreter and prints what holds, what the kernel says and the metrics.
PROBE = """
import json, logging, sys
from prometheus_client import CollectorRegistry, generate_latest
from mem_exporter.selfprotect import SelfProtection, SelfProtectionCollector
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
p = SelfProtection(mlock=True, oom_score_adj=int(sys.argv[1])).apply()
reg = CollectorRegistry(auto_describe=False)
reg.register(SelfProtectionCollector(p))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"locked": p.memory_locked, "adj": p.oom_score_adj_now, "problems": p.problems,
                  "vmlck_kb": int(status["VmLck"].split()[0]),
                  "kernel_adj": int(open("/proc/self/oom_score_adj").read()),
                  "metrics": generate_latest(reg).decode()}))
"""


def probe(adj: int, preexec=None, prefix=()) -> dict:
    r = subprocess.run(
        [*prefix, sys.executable, "-c", PROBE, str(adj)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=preexec,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    out["log"] = r.stderr
    return out


def _capabilities_and_memlock_cut():
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))


@pytest.mark.skipif(not has_capability(CAP_IPC_LOCK), reason="needs CAP_IPC_LOCK to show the permitted case")
def test_memory_locked_when_permitted():
    out = probe(500)  # raising oom_score_adj needs no privilege
    assert out["locked"] and out["vmlck_kb"] > 0
    assert out["kernel_adj"] == out["adj"] == 500
    assert metric_value(out["metrics"], "mem_exporter_enforcer_memory_locked") == 1
    assert metric_value(out["metrics"], "mem_exporter_enforcer_oom_score_adj") == 500


def test_lowering_oom_score_adj_applied_or_reported():
    """-900 needs CAP_SYS_RESOURCE: applied where the process has it, reported where it has not (as here in
    a container that drops it)."""
    out = probe(-900)
    if has_capability(CAP_SYS_RESOURCE):
        assert out["kernel_adj"] == -900 and not any("oom_score_adj" in p for p in out["problems"])
    else:
        assert out["kernel_adj"] == out["adj"] == 0
        assert any("needs CAP_SYS_RESOURCE" in p for p in out["problems"])
        assert metric_value(out["metrics"], "mem_exporter_enforcer_oom_score_adj") == 0


@pytest.mark.skipif(
    not os.path.exists(SETPRIV) or os.geteuid() != 0, reason="needs root and setpriv to drop capabilities"
)
def test_reported_without_the_capabilities_and_with_memlock_zero():
    out = probe(
        -900,
        preexec=_capabilities_and_memlock_cut,
        prefix=(SETPRIV, "--bounding-set=-ipc_lock,-sys_resource", "--inh-caps=-ipc_lock,-sys_resource"),
    )
    assert not out["locked"] and out["vmlck_kb"] == 0
    assert any("no CAP_IPC_LOCK and RLIMIT_MEMLOCK is 0 bytes" in p for p in out["problems"]), out["problems"]
    assert any("needs CAP_SYS_RESOURCE" in p for p in out["problems"])
    assert out["kernel_adj"] == 0
    assert metric_value(out["metrics"], "mem_exporter_enforcer_memory_locked") == 0
    assert out["log"].count("self-protection:") == 2  # one line per refusal, and the process goes on


@pytest.mark.parametrize(
    "current,asked,write",
    [
        (0, -900, True),
        (0, 500, True),
        (300, -900, True),
        (-500, -900, True),
        (-997, -900, False),  # kubelet's Guaranteed pod value: raising it would weaken the protection
        (-1000, 0, False),
        (None, -900, True),
    ],
)
def test_a_lower_value_from_a_privileged_parent_is_kept(current, asked, write):
    assert should_write_oom_score_adj(current, asked) is write


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


@pytest.mark.integration
@pytest.mark.skipif(not has_capability(CAP_IPC_LOCK), reason="needs CAP_IPC_LOCK")
def test_enforce_locks_itself_and_plain_serve_does_not(daemon, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gpu: {backend: none}\nenforcer: {oom_score_adj: 300}\n")
    enforcer = daemon("enforce", "-c", str(cfg), "--interval", "0.5s").wait_healthy()
    exporter = daemon("serve", "-c", str(cfg), "--interval", "0.5s").wait_healthy()
    text = wait_for(
        lambda: next((t for t in [enforcer.metrics()] if "mem_exporter_enforcer_memory_locked" in t), None),
        what="the self-protection gauges",
    )
    assert metric_value(text, "mem_exporter_enforcer_memory_locked") == 1
    assert metric_value(text, "mem_exporter_enforcer_oom_score_adj") == 300
    assert _status(enforcer.proc.pid, "VmLck") > 0
    with open(f"/proc/{enforcer.proc.pid}/oom_score_adj") as f:
        assert int(f.read()) == 300
    assert "mem_exporter_enforcer_memory_locked" not in exporter.metrics()
    assert _status(exporter.proc.pid, "VmLck") == 0
    with open(f"/proc/{exporter.proc.pid}/oom_score_adj") as f:
        assert int(f.read()) == 0
