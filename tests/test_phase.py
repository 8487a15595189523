"""`mem-exporter phase`: a state file written atomically, followed by every sampler on the host."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers.metrics import metric_value
from helpers.waiting import wait_for

from mem_exporter import phase
from mem_exporter.phase import ENV, PhaseWatcher, default_path, read_phase, write_phase

ROOT = Path(__file__).parents[1]


def phase_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mem_exporter", "phase", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_set_print_and_clear(tmp_path):
    f = str(tmp_path / "state" / "phase")
    assert phase_cli("--phase-file", f).returncode == 1  # nothing set yet
    assert phase_cli("Model-Loading", "--phase-file", f).returncode == 0
    out = phase_cli("--phase-file", f)
    assert (out.returncode, out.stdout) == (0, "Model-Loading\n")
    assert phase_cli("--clear", "--phase-file", f).returncode == 0
    assert not Path(f).exists()
    assert phase_cli("--phase-file", f).returncode == 1


def test_rejects_names_that_cannot_be_a_label(tmp_path):
    f = str(tmp_path / "phase")
    assert phase_cli("bad\nname", "--phase-file", f).returncode == 2
    assert phase_cli("x" * 65, "--phase-file", f).returncode == 2
    assert phase_cli("Idle", "--clear", "--phase-file", f).returncode == 2
    assert not Path(f).exists()


def test_environment_names_the_file(tmp_path):
    f = tmp_path / "from-env"
    env = dict(os.environ, **{ENV: str(f)})
    assert phase_cli("Full-Processing", env=env).returncode == 0
    assert f.read_text().splitlines()[0] == "Full-Processing"


def test_default_path_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_path() == tmp_path / "mem-exporter" / "phase"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr(phase, "_uid", lambda: 0)
    assert default_path() == Path("/run/mem-exporter/phase")
    monkeypatch.setattr(phase, "_uid", lambda: 1000)  # an ordinary user: a directory under its home, not /tmp
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert default_path() == tmp_path / ".local" / "state" / "mem-exporter" / "phase"


# --- what others may plant at the phase path --------------------------------------------------


def _planted(tmp_path: Path, kind: str) -> Path:
    f = tmp_path / "phase"
    if kind == "fifo":
        os.mkfifo(f)
    elif kind == "link-to-root-only":
        secret = tmp_path / "secret"
        secret.write_text("root-only-secret\n")
        secret.chmod(0o600)
        f.symlink_to(secret)
    elif kind == "link-to-dev-zero":
        f.symlink_to("/dev/zero")
    elif kind == "big":
        f.write_text("Idle\n" + "x" * 5000)
    elif kind == "other-user":
        f.write_text("Spoofed\n")
        os.chown(f, 12345, 12345)
    return f


HOSTILE = ["fifo", "link-to-root-only", "link-to-dev-zero", "big", "other-user"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_planted_phase_file_is_ignored_with_one_warning(tmp_path, caplog, kind):
    if kind == "other-user" and os.geteuid() != 0:
        pytest.skip("needs root to make a file of another user")
    w = PhaseWatcher(_planted(tmp_path, kind))
    with caplog.at_level(logging.WARNING, logger="mem_exporter.phase"):
        assert [w.read() for _ in range(5)] == [None] * 5  # returns at once: a FIFO never blocks the sampler
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith(f"phase file {w.path} ignored: "), warnings
    assert "secret" not in warnings[0]


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero"])
def test_phase_command_on_a_planted_file_answers_at_once(tmp_path, kind):
    r = phase_cli("--phase-file", str(_planted(tmp_path, kind)))  # subprocess timeout: 30 s
    assert r.returncode == 1 and "Traceback" not in r.stderr and "ignored" not in r.stdout
    assert r.stderr.startswith(f"mem-exporter: {tmp_path / 'phase'}: ")


@pytest.mark.integration
def test_serve_keeps_sampling_with_a_fifo_as_phase_file(daemon, tmp_path):
    fifo = _planted(tmp_path, "fifo")
    d = daemon("serve", "--interval", "0.2s", "--gpu-backend", "none", "--phase-file", str(fifo)).wait_healthy()
    first = metric_value(d.metrics(), "mem_exporter_last_sample_timestamp_seconds")
    wait_for(
        lambda: metric_value(d.metrics(), "mem_exporter_last_sample_timestamp_seconds") > first,
        10,
        what="a newer sample",
    )
    assert "mem_exporter_phase_info" not in d.metrics()
    assert d.output().count("phase file") == 1


def test_a_shared_or_foreign_directory_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could swap the file under us
    with pytest.raises(PermissionError, match="may be written by others"):
        write_phase(shared / "phase", "Idle")
    made = tmp_path / "a" / "b"
    write_phase(made / "phase", "Idle")
    assert stat.S_IMODE(made.stat().st_mode) == stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 12345, 12345)
        with pytest.raises(PermissionError, match="belongs to uid 12345"):
            write_phase(foreign / "phase", "Idle")


def test_watcher_rereads_only_on_change(tmp_path, monkeypatch):
    f = tmp_path / "phase"
    w = PhaseWatcher(f)
    assert w.read() is None
    write_phase(f, "Idle")
    assert w.read() == "Idle"
    reads = []
    monkeypatch.setattr("mem_exporter.phase.read_phase", lambda p: reads.append(p) or "x")
    assert w.read() == "Idle" and reads == []  # unchanged: a stat, no read
    monkeypatch.undo()
    write_phase(f, "Model-Active")  # a new inode, even within the same mtime tick
    assert w.read() == "Model-Active"
    write_phase(f, None)
    assert w.read() is None
    assert read_phase(f) is None


@pytest.mark.integration
def test_serve_exports_the_phase(daemon, tmp_path):
    f = str(tmp_path / "phase")
    d = daemon("serve", "--interval", "0.2s", "--gpu-backend", "none", "--phase-file", f).wait_healthy()
    assert "mem_exporter_phase_info" not in d.metrics()
    assert phase_cli("Model-Loading", "--phase-file", f).returncode == 0
    wait_for(
        lambda: metric_value(d.metrics(), "mem_exporter_phase_info", phase="Model-Loading") == 1,
        timeout=15,
        what="phase_info{phase=Model-Loading}",
    )
    assert phase_cli("--clear", "--phase-file", f).returncode == 0
    wait_for(lambda: "mem_exporter_phase_info" not in d.metrics(), timeout=15, what="the phase to go")


def test_unwritable_place_is_an_error(tmp_path):
    blocker = tmp_path / "a-file"  # a directory that is a file: unwritable even for root
    blocker.write_text("")
    r = phase_cli("Idle", "--phase-file", str(blocker / "sub" / "phase"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and str(blocker) in r.stderr


NOBODY = 65534  # the unprivileged local user


def as_nobody(*cmd: str) -> None:
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="root writing where an ordinary user prepared the path")
def test_root_never_writes_through_a_directory_another_user_controls():
    """A user-owned directory, or a user's symlink to a directory of root's, on root's --phase-file path: refused,
    and nothing is written into the symlink's target."""
    tmp_path = Path(tempfile.mkdtemp(prefix="phase-trust-", dir="/tmp"))  # pytest's own is root's 0700
    try:
        _refused_for_root(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _refused_for_root(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chown(home, NOBODY, NOBODY)
    target = tmp_path / "roots-own"  # a directory of root's the user would like root to write into
    target.mkdir(mode=0o700)
    as_nobody("ln", "-s", str(target), str(home / "link"))
    as_nobody("mkdir", str(home / "dir"))
    for path in (home / "link" / "phase", home / "dir" / "phase", home / "link" / "new" / "phase"):
        r = phase_cli("Idle", "--phase-file", str(path))
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "uid 65534" in r.stderr, r.stderr
    assert list(target.iterdir()) == [] and not (home / "dir" / "phase").exists()
    # root's own symlink on the way is followed, as /var/run -> /run is
    os.symlink(target, tmp_path / "roots-link")
    assert phase_cli("Idle", "--phase-file", str(tmp_path / "roots-link" / "phase")).returncode == 0
    assert read_phase(target / "phase") == "Idle"


def test_phase_help_names_the_default_paths():
    out = subprocess.run(
        [sys.executable, "-m", "mem_exporter", "phase", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    text = " ".join(re.sub(r"-\n\s+", "-", out).split())  # argparse wraps lines after a hyphen too
    assert "/tmp/mem-exporter-UID" not in text
    for path in ("$XDG_RUNTIME_DIR/mem-exporter/phase", "/run/mem-exporter/phase", "~/.local/state/mem-exporter/phase"):
        assert path in text


def test_a_phase_says_who_set_it_and_when(tmp_path):
    f = tmp_path / "phase"
    before = time.time()
    # the CLI runs in a session of its own that outlives it (the test's own session may be led from
    # outside this pid namespace, where getsid says 0 and no one can tell whether it lives)
    holder = subprocess.Popen(
        ["sh", "-c", f'"{sys.executable}" -m mem_exporter phase Model-Active --phase-file "{f}" && exec sleep 60'],
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while phase.read_phase_info(f)[0] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        name, setter = phase.read_phase_info(f)
        assert name == "Model-Active" and setter is not None
        assert before <= setter.t <= time.time() and setter.uid == os.geteuid()
        assert setter.sid == holder.pid and setter.session_alive() is True
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(5)
    assert setter.session_alive() is False  # its leader is gone
    assert phase.Setter(t=setter.t, pid=setter.pid, sid=0).session_alive() is None  # led from outside
    f.write_text("Model-Active\n")  # written by something older: its time is the file's
    assert phase.read_phase_info(f)[1] == phase.Setter(t=f.stat().st_mtime)
