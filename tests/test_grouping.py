"""Grouping: PGID by default, named groups first-match-wins, capping into `other`, GPU attribution."""

from mem_exporter.config import Groups
from mem_exporter.grouping import cap_groups, group_processes
from mem_exporter.sample import GpuCard, GpuProcess, ProcessInfo

MB = 1024 * 1024


def proc(pid, comm, pgid=None, rss_mb=10, cmdline=None, uid=0, pss_mb=None):
    return ProcessInfo(
        pid=pid,
        ppid=1,
        pgid=pgid or pid,
        sid=pgid or pid,
        uid=uid,
        comm=comm,
        cmdline=cmdline or comm,
        start_time=pid,
        state="S",
        rss_bytes=int(rss_mb * MB),
        pss_bytes=None if pss_mb is None else int(pss_mb * MB),
    )


def test_groups_by_pgid_sum_members_and_label_by_leader():
    procs = [proc(100, "bun", rss_mb=50), proc(101, "node", pgid=100, rss_mb=200), proc(200, "sshd", rss_mb=5)]
    groups = group_processes(procs, Groups())
    assert [(g.label, g.rss_bytes, g.processes) for g in groups] == [("bun-100", 250 * MB, 2), ("sshd-200", 5 * MB, 1)]
    assert groups[0].members[0].pid == 101  # largest member first
    assert groups[0].key == "pgid:100" and groups[0].pgid == 100


def test_label_falls_back_when_leader_has_exited():
    groups = group_processes([proc(301, "worker", pgid=300), proc(302, "worker2", pgid=300)], Groups())
    assert groups[0].label == "worker-300"


def test_named_groups_first_match_wins_across_pgids():
    cfg = Groups.model_validate(
        {
            "named": [
                {"name": "ollama", "match": {"comm": "^ollama"}},
                {"name": "anything-serve", "match": {"cmdline": "serve"}},
                {"name": "root-python", "match": {"comm": "^python", "user": "^root$"}},
            ]
        }
    )
    procs = [
        proc(10, "ollama", cmdline="ollama serve"),
        proc(20, "ollama_llama_se", rss_mb=3000),
        proc(30, "python3", cmdline="python3 -m http.server"),
        proc(35, "python3", cmdline="python3 app.py"),
        proc(40, "python3", uid=65534),
    ]
    labels = {g.label: g for g in group_processes(procs, cfg)}
    assert labels["ollama"].processes == 2 and labels["ollama"].rss_bytes == 3010 * MB
    assert [m.pid for m in labels["anything-serve"].members] == [30]  # also root python, but the earlier rule won
    assert [m.pid for m in labels["root-python"].members] == [35]
    assert "python3-40" in labels  # nobody's python matches no named group


def test_cap_groups_sums_the_rest_into_other_and_keeps_named():
    cfg = Groups.model_validate({"named": [{"name": "tiny", "match": {"comm": "^tiny$"}}]})
    procs = [proc(i, f"p{i}", rss_mb=i) for i in range(1, 31)] + [proc(99, "tiny", rss_mb=0.1)]
    groups = group_processes(procs, cfg)
    capped = cap_groups(groups, max_groups=5, min_memory=20 * MB)
    labels = [g.label for g in capped]
    assert labels[:5] == ["p30-30", "p29-29", "p28-28", "p27-27", "p26-26"]
    assert "tiny" in labels and labels[-1] == "other"
    other = capped[-1]
    assert other.processes == 25 and other.rss_bytes == sum(range(1, 26)) * MB
    assert sum(g.rss_bytes for g in capped) == sum(g.rss_bytes for g in groups)


def test_min_memory_sends_small_groups_to_other():
    groups = group_processes([proc(1, "a", rss_mb=50), proc(2, "b", rss_mb=5)], Groups())
    assert [g.label for g in cap_groups(groups, 50, 10 * MB)] == ["a-1", "other"]


def test_gpu_memory_is_attributed_to_groups_and_vram_hogs_never_hide_in_other():
    card = GpuCard(
        index=0,
        uuid="GPU-x",
        name="fake",
        driver_version="1",
        processes=(
            GpuProcess(pid=11, gpu_memory_bytes=3000 * MB),
            GpuProcess(pid=12, gpu_memory_bytes=1000 * MB),
            GpuProcess(pid=777, gpu_memory_bytes=5 * MB),
        ),
    )
    procs = [
        proc(10, "leader", rss_mb=1),
        proc(11, "cuda", pgid=10, rss_mb=1),
        proc(12, "other-user", rss_mb=1),
        proc(20, "big", rss_mb=900),
    ]
    groups = group_processes(procs, Groups(), gpus=[card])
    by_label = {g.label: g for g in groups}
    assert dict(by_label["leader-10"].gpu_memory_bytes) == {0: 3000 * MB}
    assert dict(by_label["other-user-12"].gpu_memory_bytes) == {0: 1000 * MB}
    capped = cap_groups(groups, max_groups=1, min_memory=100 * MB)
    assert {g.label for g in capped} == {"big-20", "leader-10", "other"}  # only one by RAM, but VRAM users kept


def test_pss_ranks_groups_when_configured():
    procs = [proc(1, "a", rss_mb=100, pss_mb=10), proc(2, "b", rss_mb=50, pss_mb=40)]
    assert [g.label for g in group_processes(procs, Groups(), memtype="pss")] == ["b-2", "a-1"]
    assert group_processes(procs, Groups(), memtype="pss")[0].pss_bytes == 40 * MB


def test_a_member_whose_footprint_or_commit_is_unreadable_counts_with_its_rss():
    """macOS gives no footprint of another user's process: it counts with its RSS, as docs/run.md says,
    not as nothing (300 MB of footprint beside a 500 MB unreadable process is 800 MB, not 300)."""
    from mem_exporter.run.tree import tree_group

    mine = proc(100, "bun", rss_mb=120)._replace(footprint_bytes=300 * MB, private_bytes=310 * MB)
    other = proc(101, "ollama", pgid=100, rss_mb=500)
    for group in (group_processes([mine, other], Groups())[0], tree_group([mine, other], 100, "bun", "footprint")):
        assert group.memory_bytes("footprint") == 800 * MB
        assert group.memory_bytes("private") == 810 * MB
    big, small = proc(200, "llama", rss_mb=2000), proc(300, "sh", rss_mb=7)
    capped = cap_groups(group_processes([mine, other, big, small], Groups()), 1, 0)
    assert [g.label for g in capped] == ["llama-200", "other"]
    assert capped[1].memory_bytes("footprint") == 807 * MB  # groups summed alike: one without the number by RSS
    plain = group_processes([proc(400, "linux", rss_mb=40)], Groups())[0]
    assert (plain.footprint_bytes, plain.memory_bytes("footprint")) == (None, 40 * MB)  # another OS: RSS
