"""The enforcer's policy is pure: Samples built from dataclasses in, actions out. No processes here."""

import dataclasses

import pytest

from mem_exporter.config import Matcher, ProtectMatcher, Rule
from mem_exporter.enforcer.policy import (
    FLOOR_RATE,
    MIN_PERIOD,
    Context,
    PolicyState,
    decide,
    descendants,
    limits,
    poll_period,
    protection,
)
from mem_exporter.grouping import make_group
from mem_exporter.sample import GpuCard, ProcessInfo, Sample, SystemMemory

MB = 1024 * 1024
GB = 1024 * MB
UID = 1000
UNREADABLE = "?"  # an executable this enforcer may not inspect (another user's process, no privilege)


def is_root(p):
    """trust.Inspector at its seam: uid 0 is root here (tests/test_protection.py tries the real one)."""
    return None if p.exe == UNREADABLE else p.uid == 0


def inspect_exe(p):
    """Root owns /usr and /sbin here, users own /home."""
    if p.exe == UNREADABLE:
        return None, None
    return p.exe, bool(p.exe) and p.exe.startswith(("/usr/", "/sbin/"))


def inspect_cgroup(p):
    """Root owns every cgroup here but those under user.slice."""
    return p.cgroup, bool(p.cgroup) and "user.slice" not in p.cgroup


ME = Context(
    uid=UID,
    pid=500,
    pgid=500,
    ancestors=frozenset({400, 300}),
    protect=(Matcher(comm="^precious$"), ProtectMatcher(cgroup="^/system.slice/postgresql")),
    is_root=is_root,
    inspect_exe=inspect_exe,
    inspect_cgroup=inspect_cgroup,
)
SSHD = "/usr/sbin/sshd"


def proc(
    pid,
    pgid=None,
    rss=10 * MB,
    comm="python3",
    cmdline="python3 job.py",
    uid=UID,
    ppid=300,
    start=None,
    exe="/usr/bin/python3.11",
    cgroup=None,
):
    return ProcessInfo(
        pid=pid,
        ppid=ppid,
        pgid=pgid or pid,
        sid=pgid or pid,
        uid=uid,
        comm=comm,
        cmdline=cmdline,
        start_time=start if start is not None else pid * 10,
        state="S",
        rss_bytes=rss,
        exe=exe,
        cgroup=cgroup,
    )


def group(*members, gpu=None):
    pgid = members[0].pgid
    return make_group(f"pgid:{pgid}", "pgid", list(members), "rss", gpu)


def sample(*groups, t=100.0, avail=8 * GB, total=16 * GB, gpus=(), extra=()):
    procs = tuple(p for g in groups for p in g.members) + tuple(extra)
    return Sample(
        timestamp=1_700_000_000 + t,
        monotonic=t,
        duration_seconds=0.01,
        system=SystemMemory(total, avail, avail, 0, 0),
        cpu_usage_ratio=None,
        process_count=len(procs),
        groups=tuple(sorted(groups, key=lambda g: g.rss_bytes, reverse=True)),
        processes=procs,
        gpus=gpus,
    )


def rule(**kw):
    kw.setdefault("name", "r")
    return Rule.model_validate(kw)


def kinds(actions):
    return [(a.kind, a.rule.name, a.group.label if a.group else None) for a in actions]


# --- conditions -------------------------------------------------------------------------------

CASES = [
    # (name, rule, groups' summed rss in MB, expected kinds of actions)
    ("under the limit", dict(max_rss="1GiB"), [900], []),
    ("at the limit exactly", dict(max_rss="1000MiB"), [1000], []),
    ("over the limit", dict(max_rss="1GiB"), [1100], ["kill"]),
    ("two over, one rule: both", dict(max_rss="1GiB"), [1100, 1500], ["kill", "kill"]),
    ("group regex misses", dict(max_rss="1GiB", match={"group": "^node-"}), [1100], []),
    ("group regex hits", dict(max_rss="1GiB", match={"group": "^python3-"}), [1100], ["kill"]),
    ("cmdline misses", dict(max_rss="1GiB", match={"cmdline": "bun test"}), [1100], []),
    ("cmdline hits", dict(max_rss="1GiB", match={"cmdline": "job\\.py"}), [1100], ["kill"]),
]


@pytest.mark.parametrize("name,r,sizes,expected", CASES, ids=[c[0] for c in CASES])
def test_group_limit_table(name, r, sizes, expected):
    groups = [group(proc(1000 + i, rss=mb * MB)) for i, mb in enumerate(sizes)]
    actions = decide(sample(*groups), [rule(**r)], PolicyState(), ME)
    assert [a.kind for a in actions] == expected
    for a in actions:
        assert a.condition == "max_rss" and a.limit == a.rule.max_rss and a.value > a.limit
        assert a.ceiling == pytest.approx(a.limit * 1.10)


def test_summed_over_members_and_all_members_selector():
    g = group(proc(1000, rss=600 * MB, cmdline="bash run.sh"), proc(1001, pgid=1000, rss=600 * MB, cmdline="bun test"))
    s = sample(g)
    assert kinds(decide(s, [rule(max_rss="1GiB", match={"cmdline": "bun test"})], PolicyState(), ME)) == [
        ("kill", "r", "python3-1000")
    ]
    every_member = rule(max_rss="1GiB", match={"cmdline": "bun test", "all_members": True})
    assert decide(s, [every_member], PolicyState(), ME) == []
    (a,) = decide(s, [rule(max_rss="1GiB")], PolicyState(), ME)
    assert {p.pid for p in a.targets} == {1000, 1001} and a.value == 1200 * MB


def test_for_must_hold_and_resets_when_it_stops():
    r = [rule(max_rss="1GiB", **{"for": "5s"})]
    st = PolicyState()
    big, small = group(proc(1000, rss=2 * GB)), group(proc(1000, rss=100 * MB))
    assert decide(sample(big, t=0), r, st, ME) == []
    assert decide(sample(big, t=4), r, st, ME) == []
    assert decide(sample(small, t=4.5), r, st, ME) == []  # dropped below: the clock restarts
    assert decide(sample(big, t=6), r, st, ME) == []
    assert kinds(decide(sample(big, t=11.1), r, st, ME)) == [("kill", "r", "python3-1000")]


def test_cooldown_stops_a_kill_loop_per_group_but_not_a_second_runaway():
    r = [rule(max_rss="1GiB", cooldown="30s")]
    st = PolicyState()
    a, b = group(proc(1000, rss=2 * GB)), group(proc(2000, rss=2 * GB))
    assert kinds(decide(sample(a, t=0), r, st, ME)) == [("kill", "r", "python3-1000")]
    assert decide(sample(a, t=1), r, st, ME) == []  # the same group again: cooling down
    assert kinds(decide(sample(a, b, t=2), r, st, ME)) == [("kill", "r", "python3-2000")]
    assert kinds(decide(sample(a, t=31), r, st, ME)) == [("kill", "r", "python3-1000")]


def test_busy_groups_are_left_alone_and_the_first_rule_wins():
    g = group(proc(1000, rss=2 * GB))
    st = PolicyState()
    st.busy.add(g.key)
    assert decide(sample(g), [rule(max_rss="1GiB")], st, ME) == []
    two = [rule(name="first", max_rss="1GiB"), rule(name="second", max_rss="1.5GiB")]
    assert kinds(decide(sample(g), two, PolicyState(), ME)) == [("kill", "first", "python3-1000")]


def test_several_rules_each_kill_names_its_rule():
    a = group(proc(1000, rss=2 * GB, cmdline="bun test"))
    b = group(proc(2000, rss=3 * GB, cmdline="cargo build"))
    rules = [
        rule(name="bun", max_rss="1GiB", match={"cmdline": "bun"}),
        rule(name="cargo", max_rss="1GiB", match={"cmdline": "cargo"}),
    ]
    assert sorted(kinds(decide(sample(a, b), rules, PolicyState(), ME))) == [
        ("kill", "bun", "python3-1000"),
        ("kill", "cargo", "python3-2000"),
    ]


def test_system_available_below_kills_the_largest_selected_group_once_per_cooldown():
    small, big = group(proc(1000, rss=1 * GB)), group(proc(2000, rss=5 * GB))
    other = group(proc(3000, rss=9 * GB, cmdline="postgres", comm="postgres"))
    r = [rule(system_available_below="10%", match={"comm": "python"})]
    st = PolicyState()
    assert decide(sample(small, big, other, avail=2 * GB), r, st, ME) == []  # 12.5 % available
    (a,) = decide(sample(small, big, other, avail=1 * GB, t=101), r, st, ME)
    assert (a.kind, a.group.label, a.value, a.limit) == ("kill", "python3-2000", 1 * GB, pytest.approx(1.6 * GB))
    assert a.ceiling == pytest.approx(1.6 * GB * 0.9)
    assert decide(sample(small, big, other, avail=1 * GB, t=102), r, st, ME) == []  # cooldown: no second victim yet
    (a,) = decide(sample(small, avail=1 * GB, t=140), r, st, ME)
    assert a.group.label == "python3-1000"
    (a,) = decide(sample(big, avail=int(1.5 * GB), t=200), [rule(system_available_below="1.6GiB")], PolicyState(), ME)
    assert a.kind == "kill"  # a size in bytes works too


def test_system_rule_passes_over_a_protected_group_to_the_next():
    sshd = group(proc(1000, rss=6 * GB, comm="sshd", exe=SSHD, uid=0))
    job = group(proc(2000, rss=2 * GB))
    actions = decide(sample(sshd, job, avail=GB), [rule(system_available_below="10%")], PolicyState(), ME)
    assert kinds(actions) == [("skipped_protected", "r", "sshd-1000"), ("kill", "r", "python3-2000")]


def test_system_rule_with_no_eligible_group_says_so():
    sshd = group(proc(1000, rss=6 * GB, comm="sshd", exe=SSHD, uid=0))
    low = rule(system_available_below="10%", match={"comm": "sshd"})
    actions = decide(sample(sshd, avail=GB), [low], PolicyState(), ME)
    assert [a.kind for a in actions] == ["skipped_protected", "no_victim"]


def _card(index, used_ratio, procs=()):
    return GpuCard(
        index=index,
        uuid=f"GPU-{index}",
        name="Fake",
        driver_version="1",
        memory_total_bytes=80 * GB,
        memory_used_bytes=int(used_ratio * 80 * GB),
        processes=procs,
    )


def test_gpu_memory_above_kills_the_largest_vram_user_on_that_card():
    a = group(proc(1000, rss=GB), gpu={0: 30 * GB, 1: 70 * GB})
    b = group(proc(2000, rss=2 * GB), gpu={0: 40 * GB})
    c = group(proc(3000, rss=3 * GB))
    r = [rule(gpu_memory_above="83%")]
    (x,) = decide(sample(a, b, c, gpus=(_card(0, 0.9), _card(1, 0.5))), r, PolicyState(), ME)
    assert (x.kind, x.group.label, x.gpu, x.value) == ("kill", "python3-2000", 0, pytest.approx(0.9))
    assert decide(sample(a, b, c, gpus=(_card(0, 0.8), _card(1, 0.5))), r, PolicyState(), ME) == []


def test_max_gpu_memory_on_summed_vram_and_quiet_without_a_gpu():
    g = group(proc(1000, rss=GB), proc(1001, pgid=1000), gpu={0: 6 * GB, 1: 6 * GB})
    r = [rule(max_gpu_memory="10GiB")]
    (x,) = decide(sample(g), r, PolicyState(), ME)
    assert (x.kind, x.condition, x.value, x.ceiling) == ("kill", "max_gpu_memory", 12 * GB, None)
    assert decide(sample(group(proc(1000, rss=20 * GB))), r, PolicyState(), ME) == []


# DRM cards (AMD, Intel) go through the same grouping and policy as NVIDIA ones: (vendor, card used ratio,
# the big process's VRAM and GTT, rule, expected victim or None)
VENDOR_CASES = [
    ("nvidia", 0.9, 6 * GB, None, dict(max_gpu_memory="4GiB"), "python3-1000"),
    ("amd", 0.9, 6 * GB, 8 * MB, dict(max_gpu_memory="4GiB"), "python3-1000"),
    ("intel", 0.9, 6 * GB, 12 * MB, dict(max_gpu_memory="4GiB"), "python3-1000"),
    ("amd", 0.9, 6 * GB, None, dict(gpu_memory_above="83%"), "python3-1000"),
    ("intel", None, 6 * GB, None, dict(gpu_memory_above="83%"), None),  # xe: no VRAM used in sysfs, no ratio
    ("amd", 0.1, 100 * MB, 3 * GB, dict(max_gpu_memory="1GiB"), None),  # an APU: GTT is not VRAM
]


@pytest.mark.parametrize(
    "vendor,used,vram,gtt,r,victim",
    VENDOR_CASES,
    ids=[f"{c[0]}-{next(iter(c[4]))}-{c[5] or 'none'}" for c in VENDOR_CASES],
)
def test_vram_rules_treat_every_vendor_alike(vendor, used, vram, gtt, r, victim):
    from mem_exporter.config import Groups
    from mem_exporter.grouping import group_processes
    from mem_exporter.sample import GpuProcess

    kind = "compute" if vendor == "nvidia" else "drm"
    card = GpuCard(
        index=0,
        uuid="u",
        name=vendor,
        driver_version="1",
        vendor=vendor,
        memory_total_bytes=80 * GB,
        memory_used_bytes=None if used is None else int(used * 80 * GB),
        processes=(GpuProcess(1000, vram, kind, gtt), GpuProcess(2000, GB, kind, None)),
    )
    procs = [proc(1000, rss=GB), proc(1001, pgid=1000), proc(2000, rss=3 * GB)]
    groups = group_processes(procs, Groups(), "rss", (card,))
    s = Sample(
        timestamp=1_700_000_100,
        monotonic=100.0,
        duration_seconds=0.01,
        system=SystemMemory(16 * GB, 8 * GB, 8 * GB, 0, 0),
        cpu_usage_ratio=None,
        process_count=3,
        groups=groups,
        processes=tuple(procs),
        gpus=(card,),
    )
    actions = decide(s, [rule(**r)], PolicyState(), ME)
    assert [a.group.label for a in actions if a.kind == "kill"] == ([victim] if victim else [])


def test_partial_samples_only_evaluate_group_limits():
    g = group(proc(1000, rss=2 * GB))
    r = [rule(name="sys", system_available_below="50%"), rule(name="lim", max_rss="1GiB")]
    assert kinds(decide(sample(g, avail=GB), r, PolicyState(), ME, full=False)) == [("kill", "lim", "python3-1000")]


def test_dry_run_decides_the_same_victim_and_marks_it():
    g = group(proc(1000, rss=2 * GB), proc(1001, pgid=1000))
    (a,) = decide(sample(g), [rule(max_rss="1GiB")], PolicyState(), Context(**{**ME.__dict__, "dry_run": True}))
    assert a.kind == "dry_run" and {p.pid for p in a.targets} == {1000, 1001}


# --- safety -----------------------------------------------------------------------------------

SAFETY = [
    # (what, a member beside an ordinary 3 GB one (pid 7001), expected action, pids signalled). Protection
    # spares processes, never their group: the other member dies unless it is spared too. Other users'
    # processes may be signalled here (other_users: true) unless a row says otherwise.
    ("pid 1", proc(1, pgid=1, comm="bash", ppid=0), "kill", {7001}),
    ("kernel thread", proc(7000, ppid=2, comm="kworker/0:1"), "kill", {7001}),
    ("the enforcer's own group", proc(7000, pgid=500), "skipped_protected", set()),
    ("the enforcer itself", proc(500, pgid=7000), "kill", {7001}),
    ("an ancestor of the enforcer", proc(400, pgid=7000, comm="bash"), "kill", {7001}),
    ("sshd run by root (built in)", proc(7000, uid=0, comm="sshd", exe=SSHD), "kill", {7001}),
    (
        "containerd-shim (built in)",
        proc(7000, uid=0, comm="containerd-shim", exe="/usr/bin/containerd-shim-runc-v2"),
        "kill",
        {7001},
    ),
    ("kubelet (built in)", proc(7000, uid=0, comm="kubelet", exe="/usr/bin/kubelet"), "kill", {7001}),
    ("systemd (built in)", proc(7000, uid=0, comm="systemd", exe="/usr/lib/systemd/systemd"), "kill", {7001}),
    (
        "a root process in sshd's unit (built in)",
        proc(7000, uid=0, comm="sshd-auth", exe="/usr/lib/openssh/sshd-auth", cgroup="/system.slice/ssh.service"),
        "kill",
        {7001},
    ),
    (
        "a user's process left in sshd's unit",
        proc(7000, comm="bash", exe="/usr/bin/bash", cgroup="/system.slice/ssh.service"),
        "kill",
        {7000, 7001},
    ),
    (
        "a unit name in a user's own cgroup",
        proc(7000, uid=0, comm="x", exe="/usr/bin/x", cgroup="/user.slice/u/system.slice/ssh.service"),
        "kill",
        {7000, 7001},
    ),
    (
        "root's process with the exporter in its command line",
        proc(7000, uid=0, cmdline="bash -c mem-exporter phase Loading; python3 hog.py"),
        "kill",
        {7000, 7001},
    ),
    (
        "mem-exporter binary run by root",
        proc(7000, uid=0, cmdline="/usr/local/bin/mem-exporter enforce"),
        "kill",
        {7000, 7001},
    ),
    ("sshd run by a user", proc(7000, comm="sshd", exe=SSHD), "kill", {7000, 7001}),
    ("systemd run by a user", proc(7000, comm="systemd", exe="/usr/lib/systemd/systemd"), "kill", {7000, 7001}),
    (
        "root's sshd that cannot be inspected",
        proc(7000, uid=0, comm="sshd", exe=UNREADABLE),
        "kill",
        {7001},
    ),
    ("a user's sshd that cannot be inspected", proc(7000, comm="sshd", exe=UNREADABLE), "kill", {7000, 7001}),
    (
        "a hog run through a symlink named sshd",
        proc(7000, uid=0, comm="sshd", exe="/usr/bin/python3.11"),
        "kill",
        {7000, 7001},
    ),
    (
        "a copy of a program named sshd in a user's directory",
        proc(7000, uid=0, comm="sshd", exe="/home/u/sshd"),
        "kill",
        {7000, 7001},
    ),
    ("an unresolvable executable named sshd", proc(7000, uid=0, comm="sshd", exe=None), "kill", {7000, 7001}),
    (
        "mem-exporter in a user's arguments",
        proc(7000, cmdline="python3 hog.py -m mem_exporter mem-exporter"),
        "kill",
        {7000, 7001},
    ),
    ("protect: in the config", proc(7000, comm="precious"), "kill", {7001}),
    ("protect: cgroup in the config", proc(7000, cgroup="/system.slice/postgresql.service"), "kill", {7001}),
    ("protect: cgroup a user owns", proc(7000, cgroup="/user.slice/system.slice/postgresql"), "kill", {7000, 7001}),
    ("a plain job", proc(7000), "kill", {7000, 7001}),
    (
        "a job in a checkout named mem-exporter",
        proc(7000, cmdline="python3 /src/mem-exporter/tests/hog.py"),
        "kill",
        {7000, 7001},
    ),
]


@pytest.mark.parametrize("what,member,expected,signalled", SAFETY, ids=[s[0] for s in SAFETY])
def test_safety_table(what, member, expected, signalled):
    g = group(member, proc(7001, pgid=member.pgid, rss=3 * GB))
    (a,) = decide(sample(g), [rule(max_rss="1GiB", other_users=True)], PolicyState(), ME)
    assert a.kind == expected, a.reason
    assert {p.pid for p in a.targets} == signalled
    assert {p.pid for p in a.spared} == {member.pid, 7001} - signalled
    if a.spared:
        assert a.reason


def test_an_ancestors_pid_taken_by_a_later_process_protects_nothing():
    """The enforcer's ancestors are known by pid. One that exits frees its pid; a process that gets it
    later started after the enforcer did, which no ancestor can have."""
    ctx = dataclasses.replace(ME, started=5000)
    ancestor, taker = proc(400, pgid=7000, comm="bash", start=4000), proc(400, pgid=7000, comm="bash", start=6000)
    for member, spared in ((ancestor, {400}), (taker, set())):
        g = group(member, proc(7001, pgid=7000, rss=3 * GB))
        (a,) = decide(sample(g), [rule(max_rss="1GiB", other_users=True)], PolicyState(), ctx)
        assert {p.pid for p in a.spared} == spared and 7001 in {p.pid for p in a.targets}


def test_another_users_member_is_spared_unless_the_rule_asks_for_other_users():
    g = group(proc(7000, uid=0, rss=GB), proc(7001, pgid=7000, rss=3 * GB))
    (a,) = decide(sample(g), [rule(max_rss="1GiB")], PolicyState(), ME)
    assert (a.kind, {p.pid for p in a.targets}, {p.pid for p in a.spared}) == ("kill", {7001}, {7000})
    (a,) = decide(sample(group(proc(7000, uid=0, rss=3 * GB))), [rule(max_rss="1GiB")], PolicyState(), ME)
    assert a.kind == "skipped_other_user" and a.targets == ()


def test_a_system_rule_weighs_groups_by_what_it_may_kill():
    """A protected member's memory is not freed by killing its group: the 5 GB group whose 4.5 GB belong to
    root's sshd frees less than a 1 GB job, and the choice looks no further than it must."""
    shielded = group(proc(1000, rss=int(4.5 * GB), uid=0, comm="sshd", exe=SSHD), proc(1001, pgid=1000, rss=GB // 2))
    job = group(proc(2000, rss=GB))
    small = group(proc(3000, rss=GB // 4))
    r = [rule(system_available_below="10%", other_users=True)]
    (a,) = decide(sample(shielded, job, small, avail=GB), r, PolicyState(), ME)
    assert (a.kind, a.group.label, [p.pid for p in a.targets]) == ("kill", "python3-2000", [2000])
    hog_beside_sshd = group(proc(1000, rss=GB // 2, uid=0, comm="sshd", exe=SSHD), proc(1001, pgid=1000, rss=3 * GB))
    (a,) = decide(sample(hog_beside_sshd, job, avail=GB), r, PolicyState(), ME)
    assert (a.kind, a.group.label, [p.pid for p in a.targets], [p.pid for p in a.spared]) == (
        "kill",
        "sshd-1000",
        [1001],
        [1000],
    )


def test_a_vram_rule_weighs_groups_by_the_vram_it_may_free():
    from mem_exporter.sample import GpuProcess

    sshd = proc(1000, uid=0, comm="sshd", exe=SSHD)  # root's sshd holding 30 GB of VRAM (say)
    shielded = group(sshd, proc(1001, pgid=1000), gpu={0: 31 * GB})
    job = group(proc(2000), gpu={0: 10 * GB})
    card = GpuCard(
        index=0,
        uuid="GPU-0",
        name="Fake",
        driver_version="1",
        memory_total_bytes=80 * GB,
        memory_used_bytes=72 * GB,
        processes=(GpuProcess(1000, 30 * GB), GpuProcess(1001, GB), GpuProcess(2000, 10 * GB)),
    )
    r = [rule(gpu_memory_above="83%", other_users=True)]
    (a,) = decide(sample(shielded, job, gpus=(card,)), r, PolicyState(), ME)
    assert (a.kind, a.group.label, [p.pid for p in a.targets]) == ("kill", "python3-2000", [2000])


def test_other_users_true_allows_another_uid():
    g = group(proc(7000, uid=0, rss=3 * GB))
    (a,) = decide(sample(g), [rule(max_rss="1GiB", other_users=True)], PolicyState(), ME)
    assert a.kind == "kill"


def test_skips_are_reported_once_per_cooldown():
    g = group(proc(7000, comm="sshd", rss=3 * GB, exe=SSHD, uid=0))
    r = [rule(max_rss="1GiB", cooldown="30s")]
    st = PolicyState()
    assert [a.kind for a in decide(sample(g, t=0), r, st, ME)] == ["skipped_protected"]
    assert decide(sample(g, t=1), r, st, ME) == []
    assert [a.kind for a in decide(sample(g, t=31), r, st, ME)] == ["skipped_protected"]


def test_descendants_that_left_the_group_are_targets_unless_protected():
    leader = proc(1000, rss=2 * GB)
    child = proc(1001, pgid=1000, ppid=1000)
    grandchild = proc(1002, pgid=1002, ppid=1001)  # called setsid
    great = proc(1003, pgid=1002, ppid=1002)
    shielded = proc(1004, pgid=1004, ppid=1000, comm="precious")
    foreign = proc(1005, pgid=1005, ppid=1000, uid=0)
    unrelated = proc(1006, pgid=1006, ppid=300)
    g = group(leader, child)
    s = sample(g, extra=(grandchild, great, shielded, foreign, unrelated))
    assert {p.pid for p in descendants(s, g)} == {1002, 1003, 1004, 1005}
    (a,) = decide(s, [rule(max_rss="1GiB")], PolicyState(), ME)
    assert {p.pid for p in a.targets} == {1000, 1001, 1002, 1003}


def test_protection_reasons():
    assert protection(proc(1, ppid=0), ME) == "pid 1"
    assert protection(proc(9000), ME) is None


def test_limits_lists_watched_groups():
    a, b = group(proc(1000, rss=GB)), group(proc(2000, rss=GB, cmdline="other"))
    r = [rule(name="x", max_rss="2GiB", match={"cmdline": "job"}), rule(name="s", system_available_below="5%")]
    assert [(rr.name, g.label, lim) for rr, g, lim in limits(sample(a, b), r)] == [("x", "python3-1000", 2 * GB)]


@pytest.mark.parametrize(
    "headroom,rate,expected",
    [
        (10 * GB, 0, 2.0),  # far away, not growing: the normal interval
        (50 * MB, 0, 0.5),  # near, no growth seen: FLOOR_RATE decides
        (500 * MB, 500 * MB, 0.5),  # growing: headroom at twice the rate
        (100 * MB, 500 * MB, 0.1),  # near and growing: the regular fast lane
        (10 * MB, 500 * MB, 0.025),  # about to cross: one read just after the predicted crossing
        (1 * MB, 500 * MB, 0.01),  # never closer than 10 ms
        (10 * MB, 1 * MB, 0.1),  # hovering below the limit: no prediction from noise
        (-1, 0, MIN_PERIOD),  # over the limit (a `for:` running): as fast as allowed
    ],
)
def test_poll_period_adapts_to_headroom(headroom, rate, expected):
    assert FLOOR_RATE == 100 * MB
    assert poll_period(headroom, rate, 2.0) == pytest.approx(expected)
