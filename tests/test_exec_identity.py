"""What a rule matches is what the process is now: a command line changed by an exec that keeps pid,
start time and comm, and the identity of a group whose leader called pthread_exit(). Once per source,
with real processes this test starts, and through the enforcer that must select and kill them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.paths import ROOT
from helpers.processes import pid_alive
from helpers.waiting import wait_for

from mem_exporter.procfs import ProcfsReader

MB = 2**20

# python3 -> python3: the same comm, pid and start time; only the command line changes
BEFORE_EXEC = textwrap.dedent("""
    import os, sys, time  # BEFORE
    block = bytearray(int(sys.argv[1]) * 2**20)
    open(sys.argv[2], "w").write("ready")
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.05)
    after = [sys.executable, "-c", os.environ["AFTER_EXEC"], "--tag", os.environ["TAG"]]
    os.execv(sys.executable, after + sys.argv[1:])
""")
AFTER_EXEC = textwrap.dedent("""
    import sys, time
    block = bytearray(int(sys.argv[3]) * 2**20)
    open(sys.argv[4] + ".after", "w").write("ready")
    while True:
        time.sleep(1)
""")

MAIN_THREAD_EXIT = textwrap.dedent("""
    import ctypes, sys, threading, time
    def hold():
        block = bytearray(int(sys.argv[3]) * 2**20)  # zero-filled: every page touched
        open(sys.argv[4], "w").write("ready")
        while True:
            time.sleep(1)
    threading.Thread(target=hold).start()
    time.sleep(0.3)
    ctypes.CDLL(None).pthread_exit(None)  # the main thread ends; the process lives on in its worker
""")


class Exec:
    """A process group (leader only) that allocates `mb` and, once told to, execs into a second
    python3 that says `--tag TAG` on its command line and allocates `mb` again."""

    def __init__(self, tmp_path: Path, tag: str, mb: int):
        self.ready, self.go = tmp_path / "ready", tmp_path / "go"
        env = dict(os.environ, AFTER_EXEC=AFTER_EXEC, TAG=tag)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BEFORE_EXEC, str(mb), str(self.ready), str(self.go)], env=env, start_new_session=True
        )
        self.pid = self.proc.pid
        wait_for(lambda: self.ready.exists() or self.proc.poll() is not None, 20, what="the first program")
        assert self.proc.poll() is None

    def stat(self) -> tuple[str, str]:
        data = Path(f"/proc/{self.pid}/stat").read_text()
        return data[data.find("(") + 1 : data.rfind(")")], data.rsplit(")", 1)[1].split()[19]

    def exec(self, wait: bool = True) -> None:
        """Tell it to exec; with `wait`, until the second program holds its memory."""
        before = self.stat()
        self.go.touch()
        if not wait:
            return
        after = Path(str(self.ready) + ".after")
        wait_for(lambda: after.exists() or self.proc.poll() is not None, 20, what="the second program")
        assert self.proc.poll() is None
        assert self.stat() == before  # comm and start time as they were: only the exec fields tell

    def cmdline(self) -> str:
        return Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@pytest.fixture
def execer(tmp_path, tag):
    started: list[Exec] = []

    def start(mb: int) -> Exec:
        started.append(Exec(tmp_path, tag, mb))
        return started[-1]

    yield start
    for e in started:
        e.kill()


def event_for(enf, pgid):
    return next((e for e in list(enf.events) if e.get("pgid") == pgid and e["action"] in ("term", "kill")), None)


def test_the_procfs_reader_sees_a_new_command_line_after_an_exec_on_the_next_walk(execer, tag):
    e = execer(1)
    reader = ProcfsReader("/proc")
    for _ in range(2):  # cached by now
        (before,) = [p for p in reader.read_processes()[0] if p.pid == e.pid]
        assert f"--tag {tag}" not in before.cmdline
    e.exec()
    (after,) = [p for p in reader.read_processes()[0] if p.pid == e.pid]
    assert after.identity == before.identity and after.comm == before.comm
    assert after.cmdline == e.cmdline() and f"--tag {tag}" in after.cmdline


READ_AS_NOBODY = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from mem_exporter.procfs import ProcfsReader
    reader, pid = ProcfsReader("/proc"), int(sys.argv[2])
    def cmdline():
        return [p.cmdline for p in reader.read_processes()[0] if p.pid == pid][0]
    for line in sys.stdin:
        tail = open(f"/proc/{pid}/stat", "rb").read().rsplit(None, 8)[1:]
        print(json.dumps(cmdline() if tail == [b"0"] * 8 else "the exec fields are not hidden"), flush=True)
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to read as another user")
def test_a_reader_that_may_not_see_the_exec_fields_still_sees_the_new_command_line(execer, tag):
    """Without ptrace access the kernel shows stat's exec fields as zeros: the reader re-reads the
    command line itself."""
    e = execer(1)
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no system python3 for the unprivileged reader")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", READ_AS_NOBODY]
    reader = subprocess.Popen(
        nobody + [str(ROOT), str(e.pid)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
    )
    try:
        for _ in range(2):
            reader.stdin.write("\n")
            reader.stdin.flush()
            before = json.loads(reader.stdout.readline())
            assert "BEFORE" in before and f"--tag {tag}" not in before, before
        e.exec()
        reader.stdin.write("\n")
        reader.stdin.flush()
        assert json.loads(reader.stdout.readline()) == e.cmdline()
    finally:
        reader.kill()
        reader.wait()


@pytest.mark.slow
def test_a_cmdline_rule_selects_a_hog_that_exec_d_into_a_matching_command_line(execer, enforcer, tag, source):
    e = execer(150)
    enf = enforcer(
        [{"name": "exec", "match": {"cmdline": rf"--tag {tag}"}, "max_rss": "100MiB", "grace": "1s"}], source=source
    )
    time.sleep(1.5)  # several samples of the first program: over the limit, not selected
    assert event_for(enf, e.pid) is None
    e.exec(wait=False)  # the enforcer may act before the second program is done allocating
    ev = wait_for(lambda: event_for(enf, e.pid), 10, what="the exec'd hog selected")
    assert ev["outcome"] == "dead", ev
    wait_for(lambda: not pid_alive(e.pid), 10, what="the hog gone")


@pytest.mark.slow
@pytest.mark.parametrize("events", ["auto", "off"])
def test_enforce_between_slow_walks_sees_an_exec_in_place_within_an_interval(execer, tmp_path, tag, events):
    """`enforce` reads every process only at walk_interval. The exec in place keeps pid, start time and
    comm, so only the kernel's exec event tells between walks; without events (off, or not root in the
    host's namespaces) a group rule walks every interval instead, as `serve` does."""
    from mem_exporter.config import validate_config
    from mem_exporter.enforcer import Enforcer
    from mem_exporter.sampler import Sampler, SamplingLoop

    e = execer(150)
    rule = {"name": "exec", "match": {"cmdline": rf"--tag {tag}"}, "max_rss": "100MiB", "grace": "1s"}
    cfg = validate_config(
        {
            "interval": "0.3s",
            "gpu": {"backend": "none"},
            "enforcer": {
                "event_log": str(tmp_path / "events.jsonl"),
                "rules": [rule],
                "walk_interval": "1h",
                "process_events": events,
            },
        }
    )
    loop = SamplingLoop(Sampler(cfg))
    enf = Enforcer(cfg, lean=True)
    loop.walk_period = enf.walk_period
    loop.consumers.append(enf.on_sample)
    loop.start()
    try:
        time.sleep(1.5)  # several samples of the first program: over the limit, not selected
        assert event_for(enf, e.pid) is None
        e.exec(wait=False)
        ev = wait_for(lambda: event_for(enf, e.pid), 10, what="the exec'd hog selected between walks")
        assert ev["outcome"] == "dead", ev
    finally:
        loop.stop()
        enf.stop(timeout=30)


@pytest.fixture
def main_thread_exited(tmp_path, tag):
    """A process group whose leader's main thread called pthread_exit() while a worker holds 150 MB."""
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN_THREAD_EXIT, "--tag", tag, "150", str(ready)], start_new_session=True
    )
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 20, what="the worker's memory")
        wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 10)
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def test_both_sources_read_a_zombie_leaders_identity_through_a_live_thread(main_thread_exited, tag, source):
    from mem_exporter.psutil_source import PsutilReader

    pid = main_thread_exited.pid
    reader = ProcfsReader("/proc", exe=True) if source == "procfs" else PsutilReader(exe=True)
    for _ in range(2):  # the first walk and a cached one
        (p,) = [p for p in reader.read_processes()[0] if p.pid == pid]
        assert f"--tag {tag}" in p.cmdline and p.exe == os.path.realpath(sys.executable)
        assert p.rss_bytes > 150 * MB and p.state != "Z"


def test_a_cmdline_rule_selects_a_group_whose_leader_called_pthread_exit(main_thread_exited, enforcer, tag, source):
    pid = main_thread_exited.pid
    enf = enforcer(
        [{"name": "zombie", "match": {"cmdline": rf"--tag {tag}"}, "max_rss": "100MiB", "grace": "1s"}], source=source
    )
    ev = wait_for(lambda: event_for(enf, pid), 10, what="the group selected")
    assert ev["outcome"] == "dead", ev
    wait_for(lambda: not pid_alive(pid), 10, what="the group gone")
