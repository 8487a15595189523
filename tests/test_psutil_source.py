"""The portable psutil path gives the same records as the procfs fast path (run here on Linux)."""
import os

from mem_exporter.config import validate_config
from mem_exporter.procfs import ProcfsReader
from mem_exporter.psutil_source import PsutilReader
from mem_exporter.sampler import Sampler


def test_psutil_and_procfs_agree_on_a_spawned_group(spawn_group):
    hog = spawn_group("--mb", "50", "--children", "2", "--child-mb", "10")
    hog.wait_ready()
    fast = {p.pid: p for p in ProcfsReader().read_processes()[0] if p.pgid == hog.pgid}
    portable = {p.pid: p for p in PsutilReader().read_processes()[0] if p.pgid == hog.pgid}
    assert set(fast) == set(portable) and len(fast) == 3
    for pid, p in fast.items():
        q = portable[pid]
        assert (q.ppid, q.pgid, q.sid, q.uid, q.comm, q.cmdline) == (p.ppid, p.pgid, p.sid, p.uid, p.comm, p.cmdline)
        assert abs(q.rss_bytes - p.rss_bytes) < 2 * 1024 * 1024


def test_psutil_system_memory_matches_meminfo():
    a, b = ProcfsReader().read_system(), PsutilReader().read_system()
    assert a.total_bytes == b.total_bytes
    assert abs(a.available_bytes - b.available_bytes) < 0.05 * a.total_bytes


def test_reading_only_some_pids_counts_the_vanished():
    procs, skipped = PsutilReader().read_processes([os.getpid(), 2**22 + 1])
    assert [p.pid for p in procs] == [os.getpid()] and skipped == {"vanished": 1}


def test_sampler_falls_back_to_psutil_without_procfs(monkeypatch):
    """Where no procfs is mounted (macOS, BSD) the sampler picks psutil."""
    import mem_exporter.sampler as sampler_module
    real_exists = os.path.exists
    monkeypatch.setattr(sampler_module.os.path, "exists",
                        lambda p: False if str(p).startswith("/proc") else real_exists(p))
    s = Sampler(validate_config({"gpu": {"backend": "none"}}))
    assert s.source_name == "psutil"
    sample = s.tick()
    assert sample.sources_up == {"psutil": True} and any(p.pid == os.getpid() for p in sample.processes)
