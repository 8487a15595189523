"""`mem-exporter phase`: a state file written atomically, followed by every sampler on the host."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from conftest import metric_value, wait_for
from mem_exporter.phase import ENV, PhaseWatcher, default_path, read_phase, write_phase

ROOT = Path(__file__).parents[1]


def phase_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mem_exporter", "phase", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env=env)


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
    assert f.read_text() == "Full-Processing\n"


def test_default_path_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_path() == tmp_path / "mem-exporter" / "phase"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_path().parent.name == f"mem-exporter-{os.getuid()}"


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


def test_serve_exports_the_phase(daemon, tmp_path):
    f = str(tmp_path / "phase")
    d = daemon("serve", "--interval", "0.2s", "--gpu-backend", "none", "--phase-file", f).wait_healthy()
    assert "mem_exporter_phase_info" not in d.metrics()
    assert phase_cli("Model-Loading", "--phase-file", f).returncode == 0
    wait_for(lambda: metric_value(d.metrics(), "mem_exporter_phase_info", phase="Model-Loading") == 1,
             timeout=15, what="phase_info{phase=Model-Loading}")
    assert phase_cli("--clear", "--phase-file", f).returncode == 0
    wait_for(lambda: "mem_exporter_phase_info" not in d.metrics(), timeout=15, what="the phase to go")


def test_unwritable_place_is_an_error(tmp_path):
    blocker = tmp_path / "a-file"  # a directory that is a file: unwritable even for root
    blocker.write_text("")
    r = phase_cli("Idle", "--phase-file", str(blocker / "sub" / "phase"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and str(blocker) in r.stderr
