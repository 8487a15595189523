"""Protection as a hostile local user meets it: real processes, real /proc, the user side as uid 65534.

Every group here is one this test starts (cleaned up with its process group); every rule selects only
this test's groups by a unique tag. The enforcer runs in this process, as root, with `other_users`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from helpers.net import free_port
from helpers.paths import HOG, ROOT
from helpers.processes import pid_alive
from helpers.waiting import wait_for

from mem_exporter.enforcer.trust import Inspector
from mem_exporter.procfs import ProcfsReader

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not sys.platform.startswith("linux") or not shutil.which("setpriv"),
    reason="needs root on Linux and setpriv, to play the unprivileged user (uid 65534) against a root enforcer",
)

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
PYTHON = "/usr/bin/python3"  # the system interpreter: the user needs nothing of this checkout but tests/hog.py
CGROUP2 = "/sys/fs/cgroup/unified"


class Groups:
    """Process groups started with `sh -c SCRIPT` in sessions of their own; all SIGKILLed at the end."""

    def __init__(self, shared: Path):
        self.shared = shared
        self.started: list[subprocess.Popen] = []

    def start(self, script: str, env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(["sh", "-c", script], start_new_session=True, env={**os.environ, **(env or {})})
        self.started.append(proc)
        return proc

    def ready(self, name: str, proc: subprocess.Popen, timeout: float = 30) -> int:
        """Wait until the hog that writes `shared/name` has touched its memory; its pid."""
        path = self.shared / name
        wait_for(lambda: path.exists() or proc.poll() is not None, timeout, what=name)
        assert proc.poll() is None, f"group exited early with {proc.returncode}"
        found = members(proc.pid, str(path)) or [proc.pid]  # not in its command line: the exec'd leader
        if len(found) > 1:  # a shell that names the hog in its own command line, and the hog
            found.remove(proc.pid)
        assert len(found) == 1, found
        return found[0]

    def hog(self, name: str, mb: int, tag: str) -> str:
        """Shell words for tests/hog.py run by the unprivileged user."""
        return " ".join([*NOBODY, PYTHON, HOG, "--mb", str(mb), "--tag", tag, "--ready", str(self.shared / name)])

    def cleanup(self) -> None:
        for proc in self.started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


@pytest.fixture
def groups():
    shared = Path(tempfile.mkdtemp(prefix="mem-exporter-protect-"))
    shared.chmod(0o777)  # the unprivileged user writes its ready files here
    g = Groups(shared)
    try:
        yield g
    finally:
        g.cleanup()
        shutil.rmtree(shared, ignore_errors=True)


def members(pgid: int, needle: str) -> list[int]:
    """Live processes of group `pgid` whose comm or command line holds `needle`."""
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmdline = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        comm, rest = stat.split("(", 1)[1].rsplit(")", 1)
        if int(rest.split()[2]) == pgid and rest.split()[0] != "Z" and (needle in comm or needle in cmdline):
            out.append(int(d))
    return sorted(out)


def only(pgid: int, needle: str) -> int:
    found = wait_for(lambda: members(pgid, needle), 10, what=f"{needle} in group {pgid}")
    assert len(found) == 1, found
    return found[0]


def event_for(enf, pgid, actions=("term", "kill")):
    return next((e for e in list(enf.events) if e.get("pgid") == pgid and e["action"] in actions), None)


def limit_rule(tag: str, **kw) -> dict:
    return {"name": "cap", "match": {"cmdline": f"--tag {tag}"}, "max_rss": "100MiB", "grace": "1s", **kw}


def socket_activate(port: int) -> str:
    """A program on the built-in list, started by root in the background of the group."""
    return f"/usr/bin/systemd-socket-activate -l 127.0.0.1:{port} /bin/true & "


# --- 1. protection spares processes, never their group ------------------------------------------


def test_a_protected_program_in_a_users_group_does_not_shield_the_hog(enforcer, groups, tag):
    """Root's systemd-socket-activate in the group of a user's hog: the hog dies, the daemon lives
    (so no killpg reached it)."""
    g = groups.start(socket_activate(free_port()) + "exec " + groups.hog("hog", 200, tag))
    hog = groups.ready("hog", g)
    daemon = only(g.pid, "systemd-socket")
    enf = enforcer([limit_rule(tag, other_users=True)])
    ev = wait_for(lambda: event_for(enf, g.pid, ("term", "kill", "skipped_protected")), 20, what="an event")
    assert ev["action"] in ("term", "kill") and ev["outcome"] == "dead", ev
    assert f"[{daemon}]: built-in protected" in ev["reason"]
    assert [s["group"] for s in ev["signals_sent"]] == [False] * len(ev["signals_sent"])  # no killpg
    wait_for(lambda: not pid_alive(hog), 10, what="the hog gone")
    time.sleep(0.5)
    assert pid_alive(daemon)


def test_the_reported_case_a_users_own_socket_activate_shields_nothing(enforcer, groups, tag):
    """`setsid sh -c "systemd-socket-activate -l 127.0.0.1:PORT /bin/true & python3 hog.py"`, all as the user."""
    script = f"/usr/bin/systemd-socket-activate -l 127.0.0.1:{free_port()} /bin/true & exec {PYTHON} {HOG} --mb 200"
    g = groups.start(f"exec {' '.join(NOBODY)} sh -c '{script} --tag {tag} --ready {groups.shared / 'hog'}'")
    hog = groups.ready("hog", g)
    daemon = only(g.pid, "systemd-socket")
    enf = enforcer([limit_rule(tag, other_users=True)])
    ev = wait_for(lambda: event_for(enf, g.pid, ("term", "kill", "skipped_protected")), 20, what="an event")
    assert ev["action"] in ("term", "kill") and ev["outcome"] == "dead", ev
    assert "reason" not in ev  # nothing spared: the user's daemon is no daemon of the system's
    wait_for(lambda: not pid_alive(hog) and not pid_alive(daemon), 10, what="the whole group gone")


def test_a_system_rule_kills_the_shielded_hog_not_the_innocent_smaller_group(enforcer, groups, tag):
    shielded = groups.start(socket_activate(free_port()) + "exec " + groups.hog("hog", 300, tag))
    innocent = groups.start("exec " + groups.hog("innocent", 60, tag))
    hog, bystander = groups.ready("hog", shielded), groups.ready("innocent", innocent)
    daemon = only(shielded.pid, "systemd-socket")
    low = {
        "name": "low",
        "match": {"cmdline": f"--tag {tag}"},  # only this test's groups are candidates
        "system_available_below": "99%",  # always below here: the choice is what is tested
        "other_users": True,
        "grace": "1s",
        "cooldown": "1h",
    }
    enf = enforcer([low])
    ev = wait_for(lambda: event_for(enf, shielded.pid) or event_for(enf, innocent.pid), 20, what="the kill")
    assert ev["pgid"] == shielded.pid and ev["outcome"] == "dead", ev
    wait_for(lambda: not pid_alive(hog), 10, what="the hog gone")
    time.sleep(1.0)
    assert pid_alive(bystander) and pid_alive(daemon)


def test_a_member_protected_by_config_is_spared_and_the_rest_of_its_group_killed(enforcer, groups, tag):
    keep = f"{PYTHON} {HOG} --mb 20 --tag {tag}keep --ready {groups.shared / 'keep'} & "
    g = groups.start(keep + "exec " + groups.hog("hog", 200, tag))
    kept, hog = groups.ready("keep", g), groups.ready("hog", g)
    enf = enforcer([limit_rule(tag, other_users=True)], protect=[{"cmdline": f"--tag {tag}keep"}])
    ev = wait_for(lambda: event_for(enf, g.pid, ("term", "kill", "skipped_protected")), 20, what="an event")
    assert ev["action"] in ("term", "kill") and ev["outcome"] == "dead", ev
    assert kept not in {p["pid"] for p in ev["signalled"]}
    wait_for(lambda: not pid_alive(hog), 10, what="the hog gone")
    assert pid_alive(kept)


# --- 2. built-in protection needs root and root's executable -------------------------------------

ALLOC = textwrap.dedent("""
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <unistd.h>
    /* Runs before the program's main: holds HOG_MB MiB, says so in HOG_READY, and never returns. */
    __attribute__((constructor)) static void hog(void) {
        size_t n = (size_t)atoi(getenv("HOG_MB")) << 20;
        memset(malloc(n), 1, n);
        FILE *f = fopen(getenv("HOG_READY"), "w");
        fprintf(f, "%d\\n", getpid());
        fclose(f);
        for (;;) pause();
    }
""")


@pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler for the LD_PRELOAD library")
def test_a_users_ld_preload_into_systemd_is_not_protected(enforcer, groups, tag):
    src = groups.shared / "alloc.c"
    src.write_text(ALLOC)
    lib = groups.shared / "alloc.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    env = f"env LD_PRELOAD={lib} HOG_MB=200 HOG_READY={groups.shared / 'hog'}"  # for systemd alone
    g = groups.start(f"exec {' '.join(NOBODY)} {env} /lib/systemd/systemd --tag {tag}")
    hog = groups.ready("hog", g)
    assert Path(f"/proc/{hog}/comm").read_text().strip() == "systemd"
    enf = enforcer([limit_rule(tag, other_users=True)])
    ev = wait_for(lambda: event_for(enf, g.pid, ("term", "kill", "skipped_protected")), 20, what="an event")
    assert ev["action"] in ("term", "kill") and ev["outcome"] == "dead", ev
    wait_for(lambda: not pid_alive(hog), 10, what="the preloaded systemd gone")


def user_namespaces_work() -> bool:
    out = subprocess.run([*NOBODY, "unshare", "-Urm", "true"], capture_output=True)
    return out.returncode == 0


@pytest.mark.skipif(not shutil.which("unshare") or not user_namespaces_work(), reason="no user namespaces")
def test_a_bind_mount_in_a_users_namespace_is_not_protected(enforcer, groups, tag):
    """As "root" of its own user namespace, the user mounts python over /usr/bin/systemd-escape."""
    python = os.path.realpath(PYTHON)
    inner = f"mount --bind {python} /usr/bin/systemd-escape && exec /usr/bin/systemd-escape {HOG} --mb 200"
    inner += f" --tag {tag} --ready {groups.shared / 'hog'}"
    g = groups.start(f"exec {' '.join(NOBODY)} unshare -Urm sh -c '{inner}'")
    hog = groups.ready("hog", g)
    assert os.readlink(f"/proc/{hog}/exe") == "/usr/bin/systemd-escape"
    enf = enforcer([limit_rule(tag, other_users=True)])
    ev = wait_for(lambda: event_for(enf, g.pid, ("term", "kill", "skipped_protected")), 20, what="an event")
    assert ev["action"] in ("term", "kill") and ev["outcome"] == "dead", ev
    wait_for(lambda: not pid_alive(hog), 10, what="the disguised python gone")


def read(pid: int):
    (p,), _ = ProcfsReader("/proc", exe=True, cgroup=True).read_processes([pid])
    return p


@pytest.mark.skipif(not shutil.which("unshare"), reason="no unshare")
def test_root_is_uid_0_in_our_own_user_namespace(groups):
    """The inspector on real processes: root here, a user, and root mapped to root in a child user
    namespace (capabilities there are not capabilities here)."""
    port = free_port()
    plain = groups.start(f"exec /usr/bin/systemd-socket-activate -l 127.0.0.1:{port} /bin/true")
    user = groups.start(
        f"exec {' '.join(NOBODY)} /usr/bin/systemd-socket-activate -l 127.0.0.1:{free_port()} /bin/true"
    )
    nested = groups.start(f"exec unshare -Ur /usr/bin/systemd-socket-activate -l 127.0.0.1:{free_port()} /bin/true")
    for g in (plain, user, nested):
        wait_for(lambda g=g: Path(f"/proc/{g.pid}/comm").read_text().startswith("systemd-socket"), 10, what="exec")
    inspect = Inspector()
    assert [inspect.is_root(read(g.pid)) for g in (plain, user, nested)] == [True, False, False]
    assert inspect.exe(read(plain.pid)) == ("/usr/bin/systemd-socket-activate", True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a pid namespace needs root")
def test_in_a_pid_namespace_of_its_own_a_child_of_pid_2_is_no_kernel_thread():
    """Pid 2 is the kernel threads' parent only in the host's pid namespace. In a container's (or under
    `unshare -p`) it is an ordinary process, and its children were taken for kernel threads: exempt from
    every rule, and left out by the psutil source."""
    code = textwrap.dedent(
        """
        import json, os, time
        from mem_exporter.enforcer.actuator import own_context
        from mem_exporter.enforcer.policy import protection
        from mem_exporter.procfs import ProcfsReader
        from mem_exporter.psutil_source import PsutilReader
        r, w = os.pipe()
        if os.fork() == 0:  # pid 2 here
            if os.fork() == 0:  # its child, a group of its own: ppid 2
                os.setsid()
                os.write(w, str(os.getpid()).encode()); os.close(w); time.sleep(30); os._exit(0)
            os.wait(); os._exit(0)
        os.close(w)
        child = int(os.read(r, 20))
        ctx = own_context()
        (p,), _ = ProcfsReader("/proc").read_processes([child])
        portable, skipped = PsutilReader().read_processes([child])
        print(json.dumps({"pid": os.getpid(), "ppid": p.ppid, "kthreadd": ctx.kthreadd,
                          "why": protection(p, ctx), "psutil": [q.pid for q in portable] == [child]}))
        os.kill(child, 9)
        """
    )
    out = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"pid": 1, "ppid": 2, "kthreadd": None, "why": None, "psutil": True}


def test_kthreadd_is_pid_2_only_where_pid_2_is_a_kernel_thread(tmp_path):
    from helpers.procfs_builder import FakeProc

    from mem_exporter.procfs import kthreadd_pid

    host, container, bare = FakeProc(tmp_path / "host"), FakeProc(tmp_path / "container"), FakeProc(tmp_path / "b")
    host.add(2, "kthreadd", ppid=0, flags=0x00208040)  # PF_KTHREAD
    container.add(2, "python3", ppid=1)
    assert [kthreadd_pid(str(f.root)) for f in (host, container, bare)] == [2, None, None]
    here = Path("/proc/2/comm")
    assert kthreadd_pid() == (2 if here.exists() and here.read_text() == "kthreadd\n" else None)


# --- 3. the exporter is known by pid, never by its command line ----------------------------------


def test_the_enforcer_knows_its_own_start_time_in_its_readers_unit():
    """What tells an ancestor from a later process that took its pid (test_enforcer_policy.py)."""
    from mem_exporter.enforcer.actuator import own_context
    from mem_exporter.psutil_source import PsutilReader

    for reader in (ProcfsReader("/proc"), PsutilReader()):
        (me,), _ = reader.read_processes([os.getpid()])
        assert own_context(reader=reader).started == me.start_time


def test_roots_shell_naming_the_exporter_does_not_shield_its_group(enforcer, groups, tag):
    """The README's phase pattern: `bash -c "mem-exporter phase Loading; python3 hog.py"` run by root."""
    phase = f"{sys.executable} -m mem_exporter phase Loading"
    hog_words = f"{PYTHON} {HOG} --mb 200 --tag {tag} --ready {groups.shared / 'hog'}"
    g = groups.start(f"exec bash -c '{phase}; {hog_words}; exit'")  # `exit`: bash stays, not exec'd into the hog
    hog = groups.ready("hog", g)
    assert hog != g.pid and "-m mem_exporter" in Path(f"/proc/{g.pid}/cmdline").read_text()
    enf = enforcer([limit_rule(tag)])
    ev = wait_for(lambda: event_for(enf, g.pid, ("term", "kill", "skipped_protected")), 20, what="an event")
    assert ev["action"] in ("term", "kill") and ev["outcome"] == "dead", ev
    wait_for(lambda: not pid_alive(hog) and not pid_alive(g.pid), 10, what="bash and the hog gone")


# --- 4. a deleted root-owned executable keeps its standing -----------------------------------------


def test_a_daemon_whose_binary_an_upgrade_deleted_stays_protected(enforcer, groups, tag):
    """Root's `sshd` (a copy of sleep in a root-only directory) whose file is deleted while it runs,
    as a package upgrade does, shares a group with a user's hog: the hog dies, sshd lives."""
    where = Path(tempfile.mkdtemp(prefix="mem-exporter-protect-", dir="/run"))
    try:
        where.chmod(0o755)
        sshd = where / "sshd"
        shutil.copy("/bin/sleep", sshd)
        g = groups.start(f"{sshd} 3600 & exec " + groups.hog("hog", 200, tag))
        hog = groups.ready("hog", g)
        daemon = only(g.pid, "sshd")
        sshd.unlink()
        assert os.readlink(f"/proc/{daemon}/exe") == f"{sshd} (deleted)"
        assert Inspector().exe(read(daemon)) == (str(sshd), True)
        enf = enforcer([limit_rule(tag, other_users=True)])
        ev = wait_for(lambda: event_for(enf, g.pid, ("term", "kill", "skipped_protected")), 20, what="an event")
        assert ev["action"] in ("term", "kill") and ev["outcome"] == "dead", ev
        wait_for(lambda: not pid_alive(hog), 10, what="the hog gone")
        time.sleep(0.5)
        assert pid_alive(daemon)
    finally:
        shutil.rmtree(where, ignore_errors=True)


# --- 5. protection by cgroup ---------------------------------------------------------------------


class Cgroups:
    """cgroup2 directories under a unique top directory this test makes, and removes with its processes."""

    def __init__(self):
        self.top = Path(CGROUP2) / f"mem-exporter-test-{uuid.uuid4().hex[:12]}"
        self.top.mkdir()

    def make(self, rel: str, owner: int | None = None) -> Path:
        path = self.top / rel
        path.mkdir(parents=True)
        if owner is not None:  # delegated, as systemd delegates a subtree: the directory and its cgroup.procs
            os.chown(path, owner, owner)
            os.chown(path / "cgroup.procs", owner, owner)
        return path

    def move(self, pid: int, path: Path) -> None:
        (path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        dirs = sorted((p for p in self.top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, self.top]:
            for pid in (d / "cgroup.procs").read_text().split():  # only ours can be here: back to the root
                Path(CGROUP2, "cgroup.procs").write_text(pid)
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


@pytest.fixture
def cgroups():
    if not os.path.exists(f"{CGROUP2}/cgroup.procs"):
        pytest.skip(f"no cgroup2 hierarchy at {CGROUP2}")
    c = Cgroups()
    try:
        yield c
    finally:
        c.remove()


def test_a_root_process_in_a_root_owned_unit_of_a_protected_program_is_spared(enforcer, groups, cgroups, tag):
    """A root process in `.../system.slice/ssh.service` (root's alone) is built-in protected; the user's
    hog in its group is not; and a `protect: {cgroup: ...}` entry spares a member of a root-owned cgroup."""
    unit = cgroups.make("system.slice/ssh.service")
    kept = cgroups.make("kept")
    g = groups.start("/bin/sleep 3600 & /bin/sleep 3601 & exec " + groups.hog("hog", 200, tag))
    hog = groups.ready("hog", g)
    wait_for(lambda: len(members(g.pid, "sleep")) == 2, 10, what="two sleeps")
    in_unit, by_config = sorted(members(g.pid, "sleep"))
    cgroups.move(in_unit, unit)
    cgroups.move(by_config, kept)
    rel = "/" + str(unit.relative_to(CGROUP2))
    assert Inspector().cgroup(read(in_unit)) == (rel, True)
    enf = enforcer([limit_rule(tag, other_users=True)], protect=[{"cgroup": f"^/{cgroups.top.name}/kept$"}])
    ev = wait_for(lambda: event_for(enf, g.pid, ("term", "kill", "skipped_protected")), 20, what="an event")
    assert ev["action"] in ("term", "kill") and ev["outcome"] == "dead", ev
    assert f"cgroup {rel}" in ev["reason"] and "protected by config" in ev["reason"]
    wait_for(lambda: not pid_alive(hog), 10, what="the hog gone")
    time.sleep(0.5)
    assert pid_alive(in_unit) and pid_alive(by_config)


def test_a_cgroup_a_user_may_write_proves_nothing(groups, cgroups):
    """The same unit path below a subtree delegated to the user, or in a directory others may write."""
    delegated = cgroups.make("delegated", owner=65534)
    unit = delegated / "system.slice" / "ssh.service"
    unit.mkdir(parents=True)
    open_to_all = cgroups.make("open/system.slice/ssh.service")
    (cgroups.top / "open").chmod(0o777)
    g = groups.start("/bin/sleep 3600 & exec /bin/sleep 3601")
    wait_for(lambda: len(members(g.pid, "sleep")) == 2, 10, what="two sleeps")
    a, b = sorted(members(g.pid, "sleep"))
    cgroups.move(a, unit)
    cgroups.move(b, open_to_all)
    inspect = Inspector()
    assert inspect.cgroup(read(a)) == ("/" + str(unit.relative_to(CGROUP2)), False)
    assert inspect.cgroup(read(b)) == ("/" + str(open_to_all.relative_to(CGROUP2)), False)


@pytest.mark.parametrize(
    "owner,mode,lines,expected",
    [
        (0, 0o755, "0::/system.slice/ssh.service\n", ("/system.slice/ssh.service", True)),
        (65534, 0o755, "0::/system.slice/ssh.service\n", ("/system.slice/ssh.service", False)),
        (0, 0o775, "0::/system.slice/ssh.service\n", ("/system.slice/ssh.service", False)),
        (0, 0o755, "0::/\n4:memory:/system.slice/ssh.service\n", ("/system.slice/ssh.service", True)),  # v1 memory
        (0, 0o755, "0::/system.slice/../ssh.service\n", ("/system.slice/../ssh.service", False)),
        (0, 0o755, "0::/system.slice/gone.service\n", ("/system.slice/gone.service", False)),
    ],
    ids=["root-owned", "chowned-to-a-user", "group-writable", "v1-memory", "dot-dot", "missing"],
)
def test_cgroup_trust_on_fixture_trees(tmp_path, owner, mode, lines, expected):
    from test_enforcer_policy import proc

    procfs, cgroupfs = tmp_path / "proc", tmp_path / "cgroup"
    (procfs / "42").mkdir(parents=True)
    (procfs / "42" / "cgroup").write_text(lines)
    v2 = cgroupfs if "memory" not in lines else cgroupfs / "memory"
    (cgroupfs / "cgroup.controllers").parent.mkdir(parents=True)
    (cgroupfs / "cgroup.controllers").write_text("")
    unit = v2 / "system.slice" / "ssh.service"
    unit.mkdir(parents=True)
    (unit / "cgroup.procs").write_text("42\n")
    cgroupfs.chmod(0o755)
    for d in (v2, v2 / "system.slice"):
        d.chmod(0o755)
    unit.chmod(mode)
    os.chown(unit, owner, owner)
    os.chown(unit / "cgroup.procs", owner, owner)
    assert Inspector(str(procfs), str(cgroupfs)).cgroup(proc(42)) == expected


def test_protect_entries_take_a_cgroup_regex_and_refuse_an_empty_entry(tmp_path):
    from mem_exporter.config import ConfigError, load_config

    good = tmp_path / "good.yaml"
    good.write_text("enforcer:\n  protect:\n    - {cgroup: '^/system\\.slice/postgresql'}\n")
    (entry,) = load_config(str(good)).enforcer.protect
    assert entry.cgroup_regex.search("/system.slice/postgresql@15-main.service")
    for body, words in [
        ("- {cgroup: '(unclosed'}", ["enforcer.protect[0].cgroup", "bad regular expression"]),
        ("- {}", ["enforcer.protect[0]", "at least one of comm, exe, cmdline, user, cgroup"]),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"enforcer:\n  protect:\n    {body}\n")
        with pytest.raises(ConfigError) as e:
            load_config(str(bad))
        (line,) = e.value.problems
        assert str(bad) in line and all(w in line for w in words), line
