"""The portable psutil path gives the same records as the procfs fast path (run here on Linux), once per
source where a test reads through the Sampler; process trees (Windows' groups) from in-memory tables."""

import os
import sys
import time

import psutil

from mem_exporter.config import validate_config
from mem_exporter.procfs import ProcfsReader
from mem_exporter.psutil_source import PsutilReader, TreeRecord, start_ticks, tree_roots
from mem_exporter.sampler import Sampler

MB = 1024 * 1024


def test_psutil_and_procfs_agree_on_a_spawned_group(spawn_group):
    hog = spawn_group("--mb", "50", "--children", "2", "--child-mb", "10")
    hog.wait_ready()
    fast = {p.pid: p for p in ProcfsReader().read_processes()[0] if p.pgid == hog.pgid}
    portable = {p.pid: p for p in PsutilReader().read_processes()[0] if p.pgid == hog.pgid}
    assert set(fast) == set(portable) and len(fast) == 3
    for pid, p in fast.items():
        q = portable[pid]
        assert (q.ppid, q.pgid, q.sid, q.uid, q.comm, q.cmdline) == (p.ppid, p.pgid, p.sid, p.uid, p.comm, p.cmdline)
        assert q.identity == p.identity  # start time in the same unit: identities agree across sources
        assert abs(q.rss_bytes - p.rss_bytes) < 2 * 1024 * 1024


def test_psutil_pss_matches_smaps_rollup(spawn_group):
    hog = spawn_group("--mb", "40")
    hog.wait_ready()
    (fast,) = ProcfsReader(pss=True).read_processes([hog.pid])[0]
    (portable,) = PsutilReader(pss=True).read_processes([hog.pid])[0]
    assert portable.pss_bytes is not None and abs(portable.pss_bytes - fast.pss_bytes) < 2 * MB
    assert portable.swap_bytes == fast.swap_bytes


def test_psutil_system_memory_matches_meminfo():
    a, b = ProcfsReader().read_system(), PsutilReader().read_system()
    assert a.total_bytes == b.total_bytes
    assert abs(a.available_bytes - b.available_bytes) < 0.05 * a.total_bytes


def test_reading_only_some_pids_counts_the_vanished():
    procs, skipped = PsutilReader().read_processes([os.getpid(), 2**22 + 1])
    assert [p.pid for p in procs] == [os.getpid()] and skipped == {"vanished": 1}


def test_kernel_threads_are_left_out_as_by_procfs():
    procs, skipped = PsutilReader().read_processes()
    assert all(p.pid != 2 and p.ppid != 2 for p in procs)
    assert skipped["kernel_thread"] == ProcfsReader().read_processes()[1]["kernel_thread"]


def test_start_ticks_inverts_psutils_create_time():
    me = psutil.Process()
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    assert start_ticks(me.create_time()) == ticks


# --- once per source, through the Sampler ------------------------------------------------------


def test_the_configured_source_is_used_and_reads_a_spawned_group(source, spawn_group):
    hog = spawn_group("--mb", "60", "--children", "2", "--child-mb", "20", "--setsid-child")
    kids = hog.wait_ready()
    s = Sampler(validate_config({"source": source, "gpu": {"backend": "none"}}))
    assert s.source_name == source
    sample = s.tick()
    assert sample.sources_up == {source: True} and sample.cpu_usage_ratio is None  # first tick: no CPU delta yet
    (g,) = [g for g in sample.groups if g.key == f"pgid:{hog.pgid}"]
    assert g.processes == 3 and {p.pid for p in g.members} == {hog.pid, *kids[:2]}
    assert 100 * MB <= g.rss_bytes <= 100 * MB * 1.5  # 60 + 2 x 20 MB touched, plus three interpreters
    setsid = next(p for p in sample.processes if p.pid == kids[2])
    assert setsid.ppid == hog.pid and setsid.sid == setsid.pgid == kids[2]
    time.sleep(0.2)  # CPU times move in clock ticks
    assert sample.system.total_bytes > 0 and 0 <= s.tick().cpu_usage_ratio <= 1


def test_source_auto_follows_procfs_presence(monkeypatch):
    """`auto`: procfs where /proc exists, psutil where it does not (macOS, Windows)."""
    import mem_exporter.facilities as facilities  # where procfs presence is probed

    assert Sampler(validate_config({"gpu": {"backend": "none"}})).source_name == "procfs"
    real_exists = os.path.exists
    monkeypatch.setattr(facilities.os.path, "exists", lambda p: False if str(p).startswith("/proc") else real_exists(p))
    s = Sampler(validate_config({"gpu": {"backend": "none"}}))
    assert s.source_name == "psutil"
    sample = s.tick()
    assert sample.sources_up == {"psutil": True} and any(p.pid == os.getpid() for p in sample.processes)


# --- process trees: how Windows groups are made ----------------------------------------------------


def rec(pid, ppid, name, t=100.0):
    return TreeRecord(pid, ppid, name, t)


WINDOWS_TABLE = [
    rec(0, 0, "System Idle Process", 0),
    rec(4, 0, "System", 1),
    rec(600, 4, "smss.exe", 2),
    rec(700, 600, "wininit.exe", 3),
    rec(800, 700, "services.exe", 4),
    rec(900, 800, "svchost.exe", 5),
    rec(950, 900, "WmiPrvSE.exe", 50),  # a service host's child: a tree of its own
    rec(1000, 800, "ollama.exe", 10),  # a service: its own tree
    rec(1010, 1000, "ollama_llama_server.exe", 60),  # ... with its runner
    rec(2000, 1990, "explorer.exe", 8),  # the desktop (its parent userinit.exe has exited)
    rec(2100, 2000, "WindowsTerminal.exe", 20),
    rec(2200, 2100, "pwsh.exe", 21),
    rec(2300, 2200, "bun.exe", 30),  # `bun test` typed in the shell: a tree
    rec(2310, 2300, "node.exe", 31),
    rec(2320, 2310, "node.exe", 32),  # grandchildren stay in it
    rec(2400, 2200, "python.exe", 40),  # a second command in the same shell: another tree
    rec(3000, 2000, "chrome.exe", 12),
    rec(3010, 3000, "chrome.exe", 13),
    rec(5000, 4242, "orphan.exe", 70),
    rec(5010, 5000, "child.exe", 71),  # parent gone: the orphan is a root
    rec(6000, 2300, "late.exe", 25),  # claims bun.exe (started at 30) as parent: a reused PID, not its parent
]


def test_each_child_of_a_shell_or_service_host_roots_a_tree():
    roots = tree_roots(WINDOWS_TABLE)
    assert {pid: roots[pid] for pid in (2300, 2310, 2320)} == {2300: 2300, 2310: 2300, 2320: 2300}
    assert roots[2400] == 2400  # another command of the same shell
    assert roots[3010] == roots[3000] == 3000  # launched from the desktop
    assert roots[1010] == roots[1000] == 1000  # a service and its children
    assert roots[950] == 950


def test_hosts_are_their_own_roots_and_never_join_a_tree():
    roots = tree_roots(WINDOWS_TABLE)
    for pid in (0, 4, 600, 700, 800, 900, 2000, 2100, 2200):
        assert roots[pid] == pid


def test_gone_or_reused_parents_start_a_tree():
    roots = tree_roots(WINDOWS_TABLE)
    assert roots[5010] == roots[5000] == 5000
    assert roots[6000] == 6000  # not pulled into bun's tree by a reused parent PID


def test_a_parent_cycle_does_not_hang():
    roots = tree_roots([rec(10, 11, "a.exe", 5), rec(11, 10, "b.exe", 5)])
    assert set(roots) == {10, 11} and roots[10] in (10, 11) and roots[11] in (10, 11)


def test_tree_mode_on_linux_groups_a_spawned_tree_with_its_setsid_child(spawn_group):
    """Tree grouping run for real: the test's own interpreter plays the shell, so the hog it starts roots a tree,
    and the child that left for a session of its own stays in it (a PGID would lose it)."""
    hog = spawn_group("--mb", "20", "--children", "1", "--child-mb", "5", "--setsid-child")
    kids = hog.wait_ready()
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    reader = PsutilReader(trees=True, is_host=lambda r: r.pid in mine)  # the test and its ancestors are the hosts
    procs = {p.pid: p for p in reader.read_processes()[0]}
    assert procs[hog.pid].pgid == procs[kids[0]].pgid == procs[kids[1]].pgid == hog.pid
    assert procs[os.getpid()].pgid == os.getpid()
    again = {p.pid: p for p in reader.read_processes([hog.pid, *kids])[0]}  # a read in part keeps the trees
    assert {again[p].pgid for p in (hog.pid, *kids)} == {hog.pid}
    s = Sampler(validate_config({"source": "psutil", "gpu": {"backend": "none"}}))
    s.reader = reader
    (g,) = [g for g in s.tick().groups if g.key == f"pgid:{hog.pid}"]
    assert g.processes == 3 and g.rss_bytes >= 30 * MB


def test_exe_is_read_only_when_asked():
    (plain,), _ = PsutilReader().read_processes([os.getpid()])
    (full,), _ = PsutilReader(exe=True).read_processes([os.getpid()])
    assert plain.exe is None and full.exe == os.path.realpath(sys.executable)
