"""Kills that cannot fail: descriptors above 1023, no descriptor left, a name that mimics a daemon,
a main thread that exited, a kill thread that cannot start. Every process here is one this test spawned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.daemons import RUN, run_to_the_kill
from helpers.paths import HOG, ROOT
from helpers.processes import pid_alive
from helpers.waiting import wait_for


def event_for(enf, pgid, actions=("term", "kill")):
    return next((e for e in list(enf.events) if e.get("pgid") == pgid and e["action"] in actions), None)


def sel(tag):
    return {"cmdline": rf"--tag {tag}"}


def test_a_kill_waits_with_descriptors_above_1023(enforcer, spawn_group, tag):
    """select() refuses descriptors above 1023, which a busy host's sampler reaches: the kill must not care."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        hog = spawn_group(
            "--mb", "20", "--grow", "200", "--max-mb", "1000", "--ignore", "SIGTERM", "--children", "1", "--tag", tag
        )
        (child,) = hog.wait_ready()
        enf = enforcer([{"name": "fd", "match": sel(tag), "max_rss": "150MiB", "grace": "1s"}])
        ev = wait_for(lambda: event_for(enf, hog.pgid, ("kill",)), 30, what="SIGKILL after the grace")
        assert ev["outcome"] == "dead", ev
        assert [s["signal"] for s in ev["signals_sent"]][:1] == ["SIGTERM"]
        wait_for(lambda: not pid_alive(hog.pid) and not pid_alive(child), 10, what="the group gone")
        assert enf.tally.kills["fd"] == 1
    finally:
        for fd in held:
            os.close(fd)


def test_signals_still_go_out_when_no_descriptor_is_left(spawn_group, tmp_path):
    """A process that has used up RLIMIT_NOFILE still verifies identity and signals: the reserve."""
    hog = spawn_group("--mb", "10")
    hog.wait_ready()
    script = textwrap.dedent(f"""
        import os, resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from mem_exporter.enforcer.actuator import ProcfsActuator as Actuator
        from mem_exporter.procfs import ProcfsReader
        (target,), _ = ProcfsReader("/proc").read_processes([{hog.pid}])
        act = Actuator()
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as e:
            assert e.errno == 24, e
        d = act.signal_all([target], signal.SIGKILL, pgid={hog.pgid})
        print("sent" if d.sent == [{hog.pid}] else f"not sent: {{d}}")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "sent", out.stderr
    wait_for(lambda: not pid_alive(hog.pid), 10, what="the hog gone")


def test_a_hog_that_calls_itself_sshd_is_killed_by_the_enforcer(enforcer, spawn_group, tag):
    hog = spawn_group("--mb", "200", "--comm", "sshd", "--tag", tag)
    hog.wait_ready()
    assert Path(f"/proc/{hog.pid}/comm").read_text().strip() == "sshd"
    enf = enforcer([{"name": "spoof", "match": sel(tag), "max_rss": "100MiB", "grace": "1s"}])
    ev = wait_for(lambda: event_for(enf, hog.pgid, ("term", "kill", "skipped_protected")), 20, what="an event")
    assert ev["action"] in ("term", "kill") and ev["outcome"] == "dead", ev
    wait_for(lambda: not pid_alive(hog.pid), 10, what="the spoofed sshd gone")


def test_a_hog_run_through_a_symlink_named_sshd_is_killed_by_run(tmp_path):
    """`run` exempts nothing in its own tree, and never reports a kill that did not happen."""
    link = tmp_path / "sshd"
    link.symlink_to(sys.executable)
    ready = tmp_path / "ready"
    sshd = [str(link), HOG, "--mb", "20", "--grow", "200", "--max-mb", "600", "--tag", "mem-exporter"]
    records = run_to_the_kill(tmp_path / "run.jsonl", ["-t", "100", "-i", "0.3"], sshd + ["--ready", str(ready)])
    pid = int(ready.read_text().split()[0]) if ready.read_text().split() else None
    (event,) = [r for r in records if r.get("type") == "event"]
    assert event["outcome"] == "dead" and event["survivors"] == []
    leader = event["signalled"][0]["pid"]
    assert not pid_alive(leader) and (pid is None or not pid_alive(pid))


MAIN_THREAD_EXIT = textwrap.dedent("""
    import ctypes, sys, threading, time
    mb = int(sys.argv[1])
    def hold():
        block = bytearray(mb * 2**20)  # zero-filled: every page touched
        open(sys.argv[2], "w").write("ready")
        while True:
            time.sleep(1)
    threading.Thread(target=hold).start()
    time.sleep(0.5)
    ctypes.CDLL(None).pthread_exit(None)  # the main thread ends; the process lives on in its worker
""")


def test_a_process_whose_main_thread_exited_is_seen_and_killed(tmp_path):
    ready = tmp_path / "ready"
    script = tmp_path / "main_exit.py"
    script.write_text(MAIN_THREAD_EXIT)
    command = [sys.executable, str(script), "400", str(ready)]
    # no cgroup: its kernel limit may kill the 400 MB worker first, and this is about what `run` itself reads
    records = run_to_the_kill(tmp_path / "run.jsonl", ["-t", "150", "-i", "0.3", "--no-cgroup"], command)
    (event,) = [r for r in records if r.get("type") == "event"]
    assert event["outcome"] == "dead" and event["memory_bytes"] > event["limit"], event
    assert all(not pid_alive(p["pid"]) for p in event["signalled"])


def test_the_zombie_leader_is_read_through_a_live_thread(tmp_path):
    from mem_exporter.procfs import ProcfsReader

    ready = tmp_path / "ready"
    script = tmp_path / "main_exit.py"
    script.write_text(MAIN_THREAD_EXIT)
    proc = subprocess.Popen([sys.executable, str(script), "100", str(ready)], start_new_session=True)
    try:
        wait_for(lambda: ready.exists(), 20, what="the worker's memory")
        time.sleep(0.7)
        assert Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        (p,), skipped = ProcfsReader("/proc").read_processes([proc.pid])
        assert p.rss_bytes > 100 * 2**20 and not skipped
        from mem_exporter.enforcer.actuator import ProcfsActuator as Actuator

        assert Actuator().alive(p)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_a_kill_thread_that_cannot_start_still_kills(enforcer, spawn_group, tag):
    def no_threads(thread):
        raise RuntimeError("can't start new thread")

    hog = spawn_group("--mb", "200", "--tag", tag)
    hog.wait_ready()
    enf = enforcer(
        [{"name": "nothread", "match": sel(tag), "max_rss": "100MiB", "grace": "1s"}], start_thread=no_threads
    )
    ev = wait_for(lambda: event_for(enf, hog.pgid), 20, what="the kill, on the enforcer thread")
    assert ev["outcome"] == "dead"
    assert enf.state.busy == set() and enf.kills_in_progress() == 0


@pytest.mark.parametrize("flag", ["--listen"])
def test_run_listen_exports_the_enforcer_contract(tmp_path, flag):
    """`run --listen` limit series carry memtype, as the alert rules join on; counters start at 0."""
    from helpers.metrics import metric_value
    from helpers.net import free_port, http_get

    port = free_port()
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        RUN
        + [
            "-t",
            "1GiB",
            "-i",
            "0.3",
            flag,
            f"127.0.0.1:{port}",
            "--",
            sys.executable,
            HOG,
            "--mb",
            "10",
            "--ready",
            str(ready),
        ],
        cwd=ROOT,
        start_new_session=True,
        stderr=subprocess.DEVNULL,
    )
    try:

        def scraped():
            try:
                body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=2)[1]
            except OSError:
                return None
            return body if "mem_exporter_enforcer_limit_bytes" in body else None

        body = wait_for(scraped, 20, what="a scrape")
        name = os.path.basename(sys.executable)
        assert metric_value(body, "mem_exporter_enforcer_limit_bytes", rule="run", group=name, memtype="rss") == 2**30
        assert metric_value(body, "mem_exporter_enforcer_kills_total", rule="run") == 0
        assert metric_value(body, "mem_exporter_enforcer_actions_total", rule="run", action="kill") == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_run_uses_the_hard_ceiling(tmp_path):
    """A tree that ignores SIGTERM and keeps growing gets SIGKILL at limit + 10 %, long before a 30 s grace ends."""
    log = tmp_path / "run.jsonl"
    started = time.monotonic()
    hog = [sys.executable, HOG, "--mb", "20", "--grow", "200", "--max-mb", "2000", "--ignore", "SIGTERM"]
    records = run_to_the_kill(log, ["-t", "100", "-i", "0.3", "--grace", "30"], hog)
    assert time.monotonic() - started < 25
    (event,) = [r for r in records if r.get("type") == "event"]
    assert event["hard_ceiling"] is True and event["outcome"] == "dead"
    assert [s["signal"] for s in event["signals_sent"]] == ["SIGTERM", "SIGKILL"]


def test_the_lane_readers_cache_stays_as_big_as_the_process_table():
    """A reader that never walks fully (the fast lane, kills) must not keep every short-lived process."""
    from mem_exporter.config import validate_config
    from mem_exporter.sampler import GroupReader

    reader = GroupReader(validate_config({}))
    for _ in range(5):
        procs = [subprocess.Popen(["/bin/sleep", "0.05"]) for _ in range(40)]
        assert reader.new_processes(set())  # reads them, and everything else, as newcomers
        for p in procs:
            p.wait()
    reader.new_processes(set())
    live = len([d for d in os.listdir("/proc") if d.isdigit()])
    assert len(reader.reader._known) <= live + 5  # the 200 short-lived ones are forgotten


def test_a_reload_never_closes_descriptors_a_tick_is_reading():
    """SIGHUP's configure() swaps the reader and closes the old one: it must wait for a tick in progress."""
    import threading

    from mem_exporter.config import validate_config
    from mem_exporter.sampler import Sampler

    cfg = validate_config({"gpu": {"backend": "none"}})
    sampler = Sampler(cfg)
    reader = sampler.reader
    read = reader.read_processes
    waited, reloads = [], []

    def read_during_a_reload(*args, **kwargs):
        reload = threading.Thread(target=sampler.configure, args=(cfg,))
        reloads.append(reload)
        reload.start()
        reload.join(0.3)
        waited.append(reload.is_alive())  # still waiting for this tick: nothing closed under it
        return read(*args, **kwargs)

    reader.read_processes = read_during_a_reload
    sample = sampler.tick()
    reloads[0].join(10)
    assert waited == [True] and all(sample.sources_up.values())
    assert sampler.reader is not reader  # the reload went through once the tick was done


def test_run_with_the_psutil_source_kills_the_whole_tree(tmp_path):
    """`--source psutil` (what macOS and Windows use), forced on Linux: same exit, same dead tree."""
    log = tmp_path / "run.jsonl"
    ready = tmp_path / "ready"
    tree = [sys.executable, HOG, "--mb", "20", "--grow", "150", "--max-mb", "800", "--children", "1", "--setsid-child"]
    records = run_to_the_kill(log, ["-t", "200", "-i", "0.3", "--source", "psutil"], tree + ["--ready", str(ready)])
    (event,) = [r for r in records if r.get("type") == "event"]
    assert event["outcome"] == "dead" and len(event["signalled"]) >= 3, event
    assert all(not pid_alive(p["pid"]) for p in event["signalled"])
