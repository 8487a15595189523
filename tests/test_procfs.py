"""The procfs reader against synthetic and captured trees."""

import gc
import os
import re
import time
from pathlib import Path

import pytest
from helpers.procfs_builder import FakeProc

from mem_exporter.procfs import PAGE_SIZE, ProcfsReader, parse_cgroup, parse_smaps_rollup, parse_stat

CAPTURED = Path(__file__).parent / "fixtures" / "proc-captured"


def test_reads_processes_with_identity_and_memory(tmp_path):
    fp = FakeProc(tmp_path)
    fp.add(100, "bun", cmdline="bun test --watch", rss_kb=40_000, start=5000)
    fp.add(101, "node worker", ppid=100, pgid=100, rss_kb=20_000)  # a comm with a space
    procs, skipped = ProcfsReader(str(tmp_path)).read_processes()
    by_pid = {p.pid: p for p in procs}
    assert set(by_pid) == {100, 101} and not skipped
    bun = by_pid[100]
    assert (bun.comm, bun.cmdline, bun.pgid, bun.start_time) == ("bun", "bun test --watch", 100, 5000)
    assert bun.rss_bytes == 40_000 * 1024 // PAGE_SIZE * PAGE_SIZE
    assert by_pid[101].comm == "node worker" and by_pid[101].ppid == 100
    assert bun.uid == os.getuid()


def test_zombies_kernel_threads_and_vanished_are_counted_not_fatal(tmp_path):
    fp = FakeProc(tmp_path)
    fp.add(10, "ok")
    fp.add(11, "defunct", state="Z")
    fp.add(2, "kthreadd", flags=0x00208040)
    (tmp_path / "12").mkdir()  # exited between listdir and open: no files left
    gone = fp.add(13, "racing")
    (gone / "statm").unlink()  # exited between reading stat and statm
    procs, skipped = ProcfsReader(str(tmp_path)).read_processes()
    assert [p.pid for p in procs] == [10]
    assert skipped == {"zombie": 1, "kernel_thread": 1, "vanished": 2}


def _read_as_nobody(root: str) -> str:
    """Read a tree in a forked child that dropped root, since root reads everything."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.setgid(65534)
            os.setuid(65534)
            procs, skipped = ProcfsReader(root, pss=True).read_processes()
            os.write(w, f"{sorted(p.pid for p in procs)} {dict(skipped)}".encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create files an unprivileged reader cannot read")
def test_permission_errors_are_counted(tmp_path):
    fp = FakeProc(tmp_path)
    fp.add(10, "mine")
    fp.add(11, "secret", pss_kb=10, swap_kb=0)
    d = fp.add(12, "hidden")
    os.chmod(d / "statm", 0)
    os.chmod(tmp_path / "11" / "smaps_rollup", 0)
    (tmp_path / "10" / "smaps_rollup").write_text("Pss: 1 kB\n")
    for p in [tmp_path, *tmp_path.parents]:
        os.chmod(p, os.stat(p).st_mode | 0o005)  # let the unprivileged child traverse
    # 12: statm unreadable, left out; 11: smaps_rollup unreadable, kept by RSS alone
    assert _read_as_nobody(str(tmp_path)) == "[10, 11] {'permission': 2}"


def test_static_fields_are_cached_until_exec(tmp_path):
    fp = FakeProc(tmp_path)
    fp.add(10, "sh", cmdline="sh -c x")
    reader = ProcfsReader(str(tmp_path))
    assert reader.read_processes()[0][0].cmdline == "sh -c x"
    (tmp_path / "10" / "cmdline").write_bytes(b"changed\0")
    assert reader.read_processes()[0][0].cmdline == "sh -c x"  # cached: same pid, start time, comm
    fp.add(10, "python3", cmdline="python3 app.py")  # exec: new comm
    assert reader.read_processes()[0][0].cmdline == "python3 app.py"
    fp.add(10, "python3", cmdline="python3 other.py", exec_at=0x7FFD0000)  # exec: same comm, new exec fields
    assert reader.read_processes()[0][0].cmdline == "python3 other.py"
    fp.add(10, "python3", cmdline="reused pid", start=9999)  # pid reuse: new start time
    assert reader.read_processes()[0][0].cmdline == "reused pid"


def test_without_the_exec_fields_the_command_line_is_read_again_when_the_process_ran(tmp_path):
    """stat shows a reader without ptrace access zeros where the exec fields are: the command line
    is read again whenever stat or statm changed (an exec faults pages in: stat counts them)."""
    fp = FakeProc(tmp_path)
    fp.add(10, "sh", cmdline="sh -c x", exec_at=None)
    reader = ProcfsReader(str(tmp_path))
    assert reader.read_processes()[0][0].cmdline == "sh -c x"
    fp.add(10, "sh", cmdline="sh -c y", exec_at=None, rss_kb=2048)  # exec'd: same comm, new memory
    assert reader.read_processes()[0][0].cmdline == "sh -c y"


def test_system_memory_and_cpu(tmp_path):
    FakeProc(tmp_path, total_kb=8_000_000, available_kb=1_000_000, free_kb=500_000, swap_total_kb=100, swap_free_kb=40)
    r = ProcfsReader(str(tmp_path))
    m = r.read_system()
    assert (m.total_bytes, m.available_bytes, m.free_bytes) == (8_000_000 * 1024, 1_000_000 * 1024, 500_000 * 1024)
    assert (m.swap_total_bytes, m.swap_used_bytes) == (100 * 1024, 60 * 1024)
    assert m.used_bytes == 7_000_000 * 1024
    assert r.read_cpu_times() == (200, 1000)


def test_pss_and_swap_from_smaps_rollup(tmp_path):
    fp = FakeProc(tmp_path)
    fp.add(10, "a", rss_kb=4000, pss_kb=3000, swap_kb=500)
    (p,), _ = ProcfsReader(str(tmp_path), pss=True).read_processes()
    assert (p.pss_bytes, p.swap_bytes) == (3000 * 1024, 500 * 1024)


def test_captured_real_files_parse():
    comm, fields = parse_stat((CAPTURED / "4242" / "stat").read_bytes())
    assert comm == "python3" and fields[0] == b"R" and int(fields[2]) == 5888
    pss, swap = parse_smaps_rollup((CAPTURED / "4242" / "smaps_rollup").read_bytes())
    assert (pss, swap) == (12262 * 1024, 0)
    assert parse_cgroup((CAPTURED / "4242" / "cgroup").read_bytes()) == "/process_api/42f86b31469145644ab2a032b306b691"
    reader = ProcfsReader(str(CAPTURED), pss=True, cgroup=True)
    (p,), skipped = reader.read_processes()
    assert p.pid == 4242 and p.rss_bytes == 3398 * PAGE_SIZE and p.pss_bytes == 12262 * 1024
    assert reader.read_system().total_bytes == 24683656 * 1024


def test_cgroup_layouts():
    assert parse_cgroup(b"0::/system.slice/ollama.service\n") == "/system.slice/ollama.service"
    assert parse_cgroup(b"4:memory:/docker/abc\n1:cpu:/docker/abc\n") == "/docker/abc"
    assert parse_cgroup(b"4:memory:/docker/abc\n0::/\n") == "/docker/abc"  # hybrid: v2 root says nothing


def test_reads_the_live_proc():
    procs, _ = ProcfsReader("/proc").read_processes()
    me = next(p for p in procs if p.pid == os.getpid())
    assert me.pgid == os.getpgid(0) and me.rss_bytes > 1_000_000


def kept_descriptors() -> dict[int, str]:
    """This process's descriptors open on a process's stat or statm (what a reader keeps), by number."""
    kept = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed since
        if re.fullmatch(r"/proc/\d+/stat(m)?", target):
            kept[int(name)] = target
    return kept


def test_kept_descriptors_follow_processes_and_close_when_they_exit(spawn_group):
    hog = spawn_group("--mb", "1")
    hog.wait_ready()
    gc.collect()  # readers an earlier test left to the collector close theirs now, not mid-test
    reader = ProcfsReader("/proc")
    before = kept_descriptors()
    procs, _ = reader.read_processes()
    assert hog.pid in {p.pid for p in procs} and reader.keeps_open(hog.pid)
    assert f"/proc/{hog.pid}/stat" in kept_descriptors().values()
    hog.kill()  # exited and reaped: its kept descriptors now fail with ESRCH
    procs, _ = reader.read_processes()
    assert hog.pid not in {p.pid for p in procs} and not reader.keeps_open(hog.pid)
    mine = {fd: t for fd, t in kept_descriptors().items() if before.get(fd) != t}
    assert len(mine) == 2 * reader._open_count > 0
    assert not any(t.startswith(f"/proc/{hog.pid}/") for t in mine.values())
    reader.close()
    assert not set(kept_descriptors().items()) - set(before.items())


def test_partial_reads_keep_nothing_open_and_the_budget_is_a_fallback_not_a_limit():
    reader = ProcfsReader("/proc")
    reader.read_processes([os.getpid()])
    assert reader._open_count == 0
    from mem_exporter.procfs import DescriptorBudget

    reader._budget = DescriptorBudget()
    reader._budget.pairs = 0
    procs, _ = reader.read_processes()
    assert any(p.pid == os.getpid() for p in procs) and reader._open_count == 0


def test_a_process_that_did_not_run_since_the_last_walk_is_not_parsed_again(monkeypatch, spawn_group):
    """A full walk keeps each process's stat and statm open; when both read as they did, the last
    record stands as it is. A process whose memory changed is parsed and its record rebuilt."""
    import mem_exporter.procfs as procfs

    idle = spawn_group("--mb", "5")
    growing = spawn_group("--mb", "5", "--grow", "20", "--max-mb", "200")
    idle.wait_ready()
    growing.wait_ready()
    built: list[int] = []
    real = procfs.ProcessInfo
    monkeypatch.setattr(procfs, "ProcessInfo", lambda pid, *rest: (built.append(pid), real(pid, *rest))[1])
    reader = ProcfsReader("/proc")
    first = {p.pid: p for p in reader.read_processes()[0]}
    assert idle.pid in built and growing.pid in built
    built.clear()
    time.sleep(0.3)  # the growing hog grows meanwhile, the idle one sleeps
    second = {p.pid: p for p in reader.read_processes()[0]}
    assert idle.pid not in built and second[idle.pid] is first[idle.pid]
    assert growing.pid in built and second[growing.pid].rss_bytes > first[growing.pid].rss_bytes
