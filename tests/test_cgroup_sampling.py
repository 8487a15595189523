"""Group memory from the cgroups' own accounts (`groups.by: cgroup | container`): fixture trees for v2
and v1 memory files, a real v1 memory cgroup here, and every path with the accounts absent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers.paths import HOG
from helpers.procfs_builder import FakeProc
from helpers.waiting import wait_for

from mem_exporter.cgroupfs_reader import CgroupAccounts
from mem_exporter.config import validate_config
from mem_exporter.sampler import Sampler

KB = 1024


def _config(procfs: Path, cgroupfs: Path | str, by: str = "cgroup", **groups) -> object:
    return validate_config(
        {
            "gpu": {"backend": "none"},
            "source": "procfs",
            "groups": {"by": by, "min_memory": 0, **groups},
            "paths": {"procfs": str(procfs), "cgroupfs": str(cgroupfs)},
        }
    )


def _cgroup(root: Path, path: str, stat: dict[str, int], procs: list[int], swap: int | None = None) -> Path:
    d = root / path.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.stat").write_text("".join(f"{k} {v}\n" for k, v in stat.items()))
    (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in procs))
    if swap is not None:
        (d / "memory.swap.current").write_text(f"{swap}\n")
    return d


@pytest.fixture
def v2(tmp_path):
    """A /proc with three processes in a v2 service cgroup and one in the root; a cgroup2 tree with memory."""
    proc, cg = FakeProc(tmp_path / "proc"), tmp_path / "cgroup"
    cg.mkdir()
    (cg / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for pid in (101, 102, 103):
        proc.add(pid, "worker", rss_kb=100_000, cgroup="0::/system.slice/app.service\n")
    proc.add(200, "sshd", rss_kb=5_000, cgroup="0::/\n")
    (cg / "cgroup.procs").write_text("200\n")  # the root cgroup's own processes
    d = _cgroup(
        cg,
        "/system.slice/app.service",
        {"anon": 150_000 * KB, "file": 900_000 * KB, "file_mapped": 20_000 * KB, "shmem": 0},
        [101, 102, 103],
        swap=7 * KB,
    )
    return proc, cg, d


def _group(sample, key):
    return next(g for g in sample.groups if g.key == key)


def test_v2_group_memory_is_the_cgroups_anon_plus_file_mapped(v2, tmp_path):
    proc, cg, d = v2
    s = Sampler(_config(tmp_path / "proc", cg))
    assert s.cgroups is not None and s.cgroups.accounts.version == 2
    g = _group(s.tick(), "cgroup:/system.slice/app.service")
    # not the 3 x 100 MB summed RSS: shared pages count once, unmapped page cache (`file`) not at all
    assert g.rss_bytes == 170_000 * KB and g.swap_bytes == 7 * KB and g.processes == 3
    assert {p.pid for p in g.members} == {101, 102, 103} and g.label == "/system.slice/app.service"
    root = _group(s.tick(), "cgroup:/")  # the root cgroup has no accounts of its own: summed
    assert root.rss_bytes == 5_000 * KB


def test_each_tick_reads_the_accounts_and_only_newcomers_processes(v2, tmp_path):
    proc, cg, d = v2
    s = Sampler(_config(tmp_path / "proc", cg))
    s.tick()
    first = s.cgroups.first_sight_reads
    (d / "memory.stat").write_text(f"anon {300_000 * KB}\nfile_mapped 0\n")
    proc.add(104, "worker", rss_kb=1, cgroup="0::/system.slice/app.service\n")
    (d / "cgroup.procs").write_text("101\n102\n103\n104\n")
    g = _group(s.tick(), "cgroup:/system.slice/app.service")
    assert g.rss_bytes == 300_000 * KB and g.processes == 4
    assert s.cgroups.first_sight_reads == first + 1  # only the newcomer was read
    # a process that moved to another cgroup is found in that cgroup's cgroup.procs
    other = _cgroup(cg, "/system.slice/other.service", {"anon": 1_000 * KB, "file_mapped": 0}, [104])
    (proc.root / "104" / "cgroup").write_text("0::/system.slice/other.service\n")
    (d / "cgroup.procs").write_text("101\n102\n103\n")
    sample = s.tick()
    assert _group(sample, "cgroup:/system.slice/other.service").processes == 1
    assert _group(sample, "cgroup:/system.slice/app.service").processes == 3
    assert other.exists()
    # gone processes leave their group
    import shutil

    shutil.rmtree(proc.root / "103")
    (d / "cgroup.procs").write_text("101\n102\n")
    assert _group(s.tick(), "cgroup:/system.slice/app.service").processes == 2


def test_v1_uses_the_cgroups_own_rss_plus_mapped_file(tmp_path):
    proc, cg = FakeProc(tmp_path / "proc"), tmp_path / "cgroup"
    (cg / "memory").mkdir(parents=True)
    (cg / "memory" / "memory.stat").write_text("rss 1\n")
    for pid in (301, 302):
        proc.add(pid, "job", rss_kb=80_000, cgroup="4:memory:/jobs/a\n2:cpu:/\n0::/\n")
    stat = {"cache": 500_000 * KB, "rss": 60_000 * KB, "mapped_file": 4_000 * KB, "swap": 2 * KB}
    stat |= {"total_rss": 999_000 * KB, "total_mapped_file": 9 * KB}  # the subtree's: not this cgroup's own
    _cgroup(cg / "memory", "/jobs/a", stat, [301, 302])
    s = Sampler(_config(tmp_path / "proc", cg))
    assert s.cgroups.accounts.version == 1
    g = _group(s.tick(), "cgroup:/jobs/a")
    assert g.rss_bytes == 64_000 * KB and g.swap_bytes == 2 * KB and g.processes == 2


def test_by_container_reads_the_containers_accounts_and_sums_host_processes(tmp_path):
    cid = "3f4e9a1c2b7d8e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7"
    proc, cg = FakeProc(tmp_path / "proc"), tmp_path / "cgroup"
    cg.mkdir()
    (cg / "cgroup.controllers").write_text("memory\n")
    path = f"/system.slice/docker-{cid}.scope"
    proc.add(401, "postgres", rss_kb=50_000, cgroup=f"0::{path}\n")
    proc.add(402, "postgres", pgid=401, rss_kb=50_000, cgroup=f"0::{path}\n")
    proc.add(500, "bash", rss_kb=3_000, cgroup="0::/user.slice/user-1000.slice/session-1.scope\n")
    _cgroup(cg, "/user.slice/user-1000.slice/session-1.scope", {"anon": 3_000 * KB, "file_mapped": 0}, [500])
    _cgroup(cg, path, {"anon": 70_000 * KB, "file_mapped": 1_000 * KB}, [401, 402])
    sample = Sampler(_config(tmp_path / "proc", cg, by="container")).tick()
    c = _group(sample, f"container:docker/{cid[:12]}")
    assert c.rss_bytes == 71_000 * KB and c.processes == 2
    assert _group(sample, "pgid:500").rss_bytes == 3_000 * KB  # a session is no container: its PGID, summed


@pytest.mark.parametrize("absent", ["no memory controller", "unreadable cgroup", "forced off"])
def test_without_the_accounts_groups_sum_their_processes(v2, tmp_path, absent):
    proc, cg, d = v2
    extra = {}
    if absent == "no memory controller":
        (cg / "cgroup.controllers").write_text("cpu pids\n")
    elif absent == "unreadable cgroup":
        (d / "memory.stat").unlink()
    else:
        extra = {"memory_from": "processes"}
    s = Sampler(_config(tmp_path / "proc", cg, **extra))
    assert (s.cgroups is None) == (absent != "unreadable cgroup")
    g = _group(s.tick(), "cgroup:/system.slice/app.service")
    assert g.rss_bytes == 300_000 * KB and g.processes == 3  # 3 x 100 MB, as today


def _own_v1_memory_cgroup() -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    try:
        line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in x)
    except (OSError, StopIteration):
        return None
    d = root / line.split(":", 2)[2].lstrip("/")
    return d if os.access(d, os.W_OK) and (root / "memory.stat").exists() else None


@pytest.fixture
def v1_cgroup():
    parent = _own_v1_memory_cgroup()
    if parent is None:
        pytest.skip("no writable cgroup v1 memory hierarchy here")
    d = parent / f"me-test-{uuid.uuid4().hex[:10]}"
    d.mkdir()
    started: list[subprocess.Popen] = []
    try:
        yield d, started
    finally:
        for p in started:  # each the leader of a session of its own: its group is the hog and its children
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        wait_for(lambda: not (d / "cgroup.procs").read_text().strip(), 10, what="an empty cgroup")
        d.rmdir()


def test_a_real_v1_memory_cgroup(v1_cgroup, tmp_path):
    d, started = v1_cgroup
    ready = tmp_path / "ready"
    # the hog joins the cgroup before it allocates: its memory is charged there
    code = f"open('{d}/cgroup.procs', 'w').write('0'); import os; os.execv(sys.executable, sys.argv[1:])"
    cmd = [sys.executable, "-c", "import sys; " + code, sys.executable, HOG, "--mb", "60", "--children", "2"]
    started.append(subprocess.Popen(cmd + ["--child-mb", "20", "--ready", str(ready)], start_new_session=True))
    wait_for(ready.exists, 30, what="the hog")
    s = Sampler(_config(Path("/proc"), "/sys/fs/cgroup"))
    assert s.cgroups is not None and s.cgroups.accounts.version == 1
    rel = "/" + str(d.relative_to("/sys/fs/cgroup/memory"))
    g = _group(s.tick(), f"cgroup:{rel}")
    stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
    own = int(stat["rss"]) + int(stat["mapped_file"])
    assert g.processes == 3
    assert g.rss_bytes >= 100 * 10**6 and abs(g.rss_bytes - own) < 8 * 2**20
    summed = sum(
        int(Path(f"/proc/{p.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") for p in g.members
    )
    assert summed > g.rss_bytes  # the interpreter's shared pages are counted per process there, once here
    assert CgroupAccounts("/sys/fs/cgroup").procs(rel) is not None


def test_the_enforcers_re_reads_measure_a_cgroup_group_as_the_sampler_does(v2, tmp_path):
    """Between full samples a group is re-read alone: by its accounts too, not by summing its processes
    (a limit must not be judged on two different numbers)."""
    from mem_exporter.sampler import GroupReader

    proc, cg, d = v2
    cfg = _config(tmp_path / "proc", cg)
    g = _group(Sampler(cfg).tick(), "cgroup:/system.slice/app.service")
    (d / "memory.stat").write_text(f"anon {400_000 * KB}\nfile_mapped {1_000 * KB}\n")
    again = GroupReader(cfg).refresh_group(g)
    assert again is not None and again.rss_bytes == 401_000 * KB and again.processes == 3
    (cg / "cgroup.controllers").write_text("cpu\n")  # no accounts: summed, as the sampler would then
    assert GroupReader(cfg).refresh_group(g).rss_bytes == 300_000 * KB


def test_a_cgroup_group_over_its_limit_is_killed_and_its_event_shows_members_read_now(v1_cgroup, tmp_path, tag):
    """by: cgroup with a max_rss rule: the group is judged on its account and killed; the event's top
    processes are read at the kill, not the first-sight records (20 MB when first seen)."""
    from mem_exporter.enforcer import Enforcer
    from mem_exporter.sampler import SamplingLoop

    d, started = v1_cgroup
    ready = tmp_path / "ready"
    code = f"open('{d}/cgroup.procs', 'w').write('0'); import os; os.execv(sys.executable, sys.argv[1:])"
    cmd = [sys.executable, "-c", "import sys; " + code, sys.executable, HOG, "--mb", "20", "--tag", tag]
    cmd += ["--grow", "2000", "--max-mb", "300", "--grow-on-signal", "--ready", str(ready)]
    started.append(subprocess.Popen(cmd, start_new_session=True))
    wait_for(ready.exists, 30, what="the hog")
    cfg = validate_config(
        {
            "interval": "0.2s",
            "gpu": {"backend": "none"},
            "groups": {"by": "cgroup"},
            "enforcer": {
                "event_log": str(tmp_path / "events.jsonl"),
                "rules": [{"name": "cap", "max_rss": "150MB", "match": {"cmdline": f"--tag {tag}"}, "grace": "1s"}],
            },
        }
    )
    sampler = Sampler(cfg)
    assert sampler.cgroups is not None
    loop = SamplingLoop(sampler)
    enf = Enforcer(cfg)
    loop.consumers.append(enf.on_sample)
    loop.start()
    try:
        wait_for(lambda: loop.latest, 10, what="the first sample")
        time.sleep(0.5)
        os.kill(started[0].pid, signal.SIGUSR1)
        kill = wait_for(lambda: next((e for e in enf.events if e["action"] in ("term", "kill")), None), 20, what="kill")
    finally:
        loop.stop()
        enf.stop(30)
    assert kill["group"] == "/" + str(d.relative_to("/sys/fs/cgroup/memory"))
    assert kill["memory_bytes"] > 150 * 10**6
    assert kill["members"][0]["memory_bytes"] > 100 * 10**6  # read at the kill, not the 20 MB first seen
    wait_for(lambda: not (d / "cgroup.procs").read_text().strip(), 10, what="the cgroup emptied by the kill")


def test_a_process_gone_as_another_comes_leaves_no_stale_record(v2, tmp_path):
    import shutil

    proc, cg, d = v2
    s = Sampler(_config(tmp_path / "proc", cg))
    s.tick()
    shutil.rmtree(proc.root / "103")
    proc.add(105, "worker", rss_kb=1, cgroup="0::/system.slice/app.service\n")
    (d / "cgroup.procs").write_text("101\n102\n105\n")
    sample = s.tick()
    assert {p.pid for p in _group(sample, "cgroup:/system.slice/app.service").members} == {101, 102, 105}
    assert sorted(p.pid for p in sample.processes) == [101, 102, 105, 200]


def test_hostile_cgroup_files_neither_hang_nor_break_a_tick(v2, tmp_path):
    proc, cg, d = v2
    (d / "cgroup.procs").unlink()
    os.mkfifo(d / "cgroup.procs")  # opened without O_NONBLOCK this would wait for a writer forever
    weird = _cgroup(cg, "/weird.service", {"anon": 1}, [])
    (weird / "cgroup.procs").write_text("not a pid\n")
    (cg / "loop").symlink_to(cg)  # a link back to the root is not followed
    sample = Sampler(_config(tmp_path / "proc", cg)).tick()
    assert _group(sample, "cgroup:/").rss_bytes == 5_000 * KB
    assert not any(g.key.startswith("cgroup:/system.slice") for g in sample.groups)
