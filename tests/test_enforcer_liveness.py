"""The enforcer keeps deciding and killing when what it writes to cannot take it, and when descriptors run out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.metrics import metric_value
from helpers.net import free_port, http_get
from helpers.paths import ROOT
from helpers.processes import pid_alive
from helpers.waiting import wait_for

from mem_exporter.outbox import QUEUE_SIZE


def fill(fd: int) -> int:
    """Write into a pipe until it takes not one more byte; the bytes written. Through a file description
    of its own (O_NONBLOCK on `fd` itself would make the reader's other writers non-blocking too)."""
    own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
    total = 0
    try:
        for size in (4096, 1):
            try:
                while True:
                    total += os.write(own, b"x" * size)
            except BlockingIOError:
                pass
    finally:
        os.close(own)
    return total


@pytest.mark.slow
@pytest.mark.integration
def test_a_stderr_nobody_reads_stops_no_kill(tmp_path, spawn_group, tag):
    """stderr is a pipe, full, never read. A system rule with no victim logs a line every second from the
    enforcer's thread: that write used to block the thread, and the hog after it lived on."""
    port = free_port()
    cfg = tmp_path / "enforce.yaml"
    cfg.write_text(
        "interval: 0.3s\ngpu: {backend: none}\n"
        f"enforcer:\n  event_log: {tmp_path / 'events.jsonl'}\n  rules:\n"
        f"    - {{name: hogs, match: {{cmdline: '{tag}-hog'}}, max_rss: 150MB, grace: 1s}}\n"
        # below the threshold always; its match selects nothing, so it only ever logs `no_victim`
        f"    - {{name: lonely, match: {{cmdline: '{tag}-nothing'}}, system_available_below: 99%, cooldown: 0s}}\n"
    )
    r, w = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mem_exporter",
            "--log-level",
            "debug",
            "enforce",
            "-c",
            str(cfg),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        stdout=w,
        stderr=w,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _healthy(port), 20, what="the enforcer's /healthz")
        assert fill(w) > 0  # from now on every write to the enforcer's stderr would block
        time.sleep(2.5)  # `no_victim` lines are due meanwhile (one a second)
        hog = spawn_group("--mb", "250", "--tag", f"{tag}-hog")
        wait_for(lambda: hog.proc.poll() is not None, 15, what="the hog killed while stderr is blocked")
        assert hog.proc.returncode == -signal.SIGTERM
        for _ in range(QUEUE_SIZE + 100):  # each request is a debug line: more than the queue holds
            assert _healthy(port)

        def dropped() -> float | None:  # /metrics is rendered once per sample: the drops show by the next one
            body = http_get(f"http://127.0.0.1:{port}/metrics")[1]
            return metric_value(body, "mem_exporter_enforcer_events_dropped_total", sink="stderr")

        assert wait_for(dropped, 5, what="the dropped log lines counted") > 0
        _, body = http_get(f"http://127.0.0.1:{port}/metrics")
        assert metric_value(body, "mem_exporter_enforcer_kills_total", rule="hogs") == 1
        assert metric_value(body, "mem_exporter_enforcer_events_dropped_total", sink="event_log") == 0
        events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
        assert any(e["rule"] == "hogs" and e["outcome"] == "dead" for e in events)  # the file sink goes on
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        os.close(r)
        os.close(w)


def _healthy(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/healthz", timeout=1)[0] == 200
    except OSError:
        return False


# A process group of one leader and SLEEPERS children, all ignoring SIGTERM; the leader grows by GROW_MB
# once it gets SIGUSR1, and writes its children's pids to the ready file first.
SLEEPERS = 300
LEADER = """
import os, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the children through exec
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
kids = [subprocess.Popen(["sleep", "3600"]).pid for _ in range(int(sys.argv[2]))]
with open(sys.argv[3] + ".tmp", "w") as f:
    f.write(" ".join(map(str, kids)))
os.rename(sys.argv[3] + ".tmp", sys.argv[3])
signal.sigwait({signal.SIGUSR1})
hold = bytearray(int(sys.argv[4]) * 2**20)
hold[::4096] = b"x" * len(range(0, len(hold), 4096))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
while True:
    signal.pause()
"""


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@pytest.mark.slow
@pytest.mark.integration
def test_out_of_descriptors_a_kill_of_many_sigterm_ignoring_processes_still_reaches_sigkill(tmp_path, tag):
    """`ulimit -n 330`, 30 idle HTTP connections held open, a group of 300 processes ignoring SIGTERM: the
    kill spent the descriptors on pidfds, then failed for want of one and never sent SIGKILL; all lived."""
    import resource
    import socket

    ready = tmp_path / "ready"
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER, tag, str(SLEEPERS), str(ready), "300"], start_new_session=True
    )
    port = free_port()
    enforcer = None
    conns: list[socket.socket] = []
    try:
        wait_for(ready.exists, 60, what="the 300 children")
        kids = [int(x) for x in ready.read_text().split()]
        assert len(kids) == SLEEPERS
        base = sum(_rss(p) for p in [leader.pid, *kids])
        limit = base + 150 * 2**20  # crossed only once the leader grows by 300 MiB (and below the 50 % ceiling)
        cfg = tmp_path / "enforce.yaml"
        cfg.write_text(
            "interval: 0.5s\ngpu: {backend: none}\nweb: {timeout: 600s}\n"
            f"enforcer:\n  event_log: {tmp_path / 'events.jsonl'}\n"
            f"  rules:\n    - {{name: many, match: {{cmdline: '{tag}'}}, max_rss: {limit}, grace: 2s,"
            " hard_ceiling: 50%}\n"
        )

        def low_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (330, 330))

        enforcer = subprocess.Popen(
            [sys.executable, "-m", "mem_exporter", "enforce", "-c", str(cfg), "--listen", f"127.0.0.1:{port}"],
            cwd=ROOT,
            stdout=open(tmp_path / "enforce.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=low_limit,
        )
        wait_for(lambda: _healthy(port), 30, what="the enforcer's /healthz")
        for _ in range(30):  # idle clients: each holds a descriptor of the enforcer's
            conns.append(socket.create_connection(("127.0.0.1", port)))
        wait_for(lambda: len(os.listdir(f"/proc/{enforcer.pid}/fd")) >= 30, 10, what="the connections accepted")
        spare = 330 - len(os.listdir(f"/proc/{enforcer.pid}/fd"))
        assert spare < SLEEPERS, f"only {spare} descriptors left: fewer than the processes to kill"
        os.kill(leader.pid, signal.SIGUSR1)
        everyone = [leader.pid, *kids]
        deadline = time.monotonic() + 40
        while any(pid_alive(p) for p in everyone) and time.monotonic() < deadline:
            time.sleep(0.2)
        log = (tmp_path / "enforce.log").read_text()
        survivors = [p for p in everyone if pid_alive(p)]
        assert not survivors, f"{len(survivors)} of 301 alive; the enforcer's log: {log[-3000:]}"
        assert leader.wait(5) == -signal.SIGKILL
        wait_for(lambda: (tmp_path / "events.jsonl").read_text().strip(), 10, what="the kill's event")
        (event,) = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
        assert (event["action"], event["outcome"], event["survivors"]) == ("kill", "dead", [])
        assert [s["signal"] for s in event["signals_sent"]] == ["SIGTERM", "SIGKILL"], event["signals_sent"]
        assert not event["hard_ceiling"]  # the whole grace was spent with the descriptors short
        assert "kill of" not in log and "Traceback" not in log, log[-3000:]
    finally:
        for c in conns:
            c.close()
        try:
            os.killpg(leader.pid, signal.SIGKILL)  # the group this test started
        except ProcessLookupError:
            pass
        leader.wait(10)
        if enforcer is not None:
            os.killpg(enforcer.pid, signal.SIGKILL)
            enforcer.wait(10)


def test_per_group_state_is_bounded_by_the_live_groups(enforcer, tag):
    """Rounds of short-lived groups over a limit (dry run): root's get a `dry_run` (and a cooldown each),
    another user's a `skipped_other_user` (and a note each). Once they are gone nothing of them stays in
    the rule state or the match memo, which grew by every group ever seen, in locked memory; while they
    live, their cooldowns hold (no group is acted on twice)."""
    from mem_exporter.enforcer import policy

    per_round, rounds = 40, 3
    rule = {"name": "short", "match": {"cmdline": tag}, "max_rss": "1KB", "cooldown": "10min"}
    enf = enforcer([rule], dry_run=True)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    seen: set[tuple[int, int]] = set()

    def keys() -> set[str]:
        rs = enf.state.rules.get("short")
        return set(rs.last_action) | {k for k, _ in rs.noted} if rs else set()

    for _ in range(rounds):
        procs = [
            subprocess.Popen([*(nobody if i % 2 else []), "sh", "-c", "sleep 60; :", tag], start_new_session=True)
            for i in range(per_round)
        ]
        try:
            ours = {f"pgid:{p.pid}" for p in procs}
            wait_for(lambda ours=ours: ours <= keys(), 20, what="every group acted on")
            seen |= {(p.pid, _start_time(p.pid)) for p in procs}
        finally:
            for p in procs:  # the groups this test started
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        wait_for(lambda: not keys(), 10, what="the state of the dead groups forgotten")
    acted = [(e["group"], e["action"]) for e in enf.events if e["action"] in ("dry_run", "skipped_other_user")]
    assert len(acted) >= rounds * per_round and len(set(acted)) == len(acted), "a group was acted on twice"
    memoized = {(k[0], k[1]) for memo in policy._MEMO.values() for k in memo}
    assert not memoized & seen, "matches of dead processes are still memoized"


def _start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


def test_forgetting_keeps_live_groups_rule_wide_keys_and_what_came_after_the_sample():
    from test_enforcer_policy import rule

    from mem_exporter.enforcer.policy import PolicyState

    big = rule(name="big", max_rss=100, cooldown=30.0)
    low = rule(name="low", system_available_below=0.1, cooldown=30.0)
    state = PolicyState()
    b, w = state.for_rule("big"), state.for_rule("low")
    b.last_action = {"pgid:1": 95.0, "pgid:2": 95.0, "pgid:3": 50.0, "pgid:9": 99.5}
    b.noted = {("pgid:2", "skipped_other_user"): 95.0, ("pgid:1", "skipped_protected"): 95.0}
    w.last_action = {"system": 95.0}
    w.noted = {("pgid:7", "skipped_protected"): 95.0, ("system", "no_victim"): 95.0, ("pgid:1", "x"): 10.0}
    state.forget_gone({"pgid:1"}, now=100.0, rules=[big, low], started=99.0)
    assert b.last_action == {"pgid:1": 95.0, "pgid:9": 99.5}  # pgid:3's cooldown is over; pgid:9 came after
    assert b.noted == {("pgid:1", "skipped_protected"): 95.0}
    assert w.last_action == {"system": 95.0}  # rule-wide: kept for its window
    assert w.noted == {("system", "no_victim"): 95.0}
