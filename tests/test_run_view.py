"""What a user of `mem-exporter run` sees: no log, a short run's samples and peak, the phase it adopts, names,
the `-v` status line on a real pseudo-terminal, and the help.

Every command here is a real process tree that `run` starts, watches and (when it ends) stops; the tests
signal only the wrappers they started.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.paths import HOG
from helpers.waiting import wait_for

from mem_exporter.phase import Setter, this_setter

ROOT = Path(__file__).parents[1]
RUN = [sys.executable, "-m", "mem_exporter", "run"]
MB = 1000**2
# allocates 200 MB, holds it 0.4 s, frees it and sleeps: a peak between two samples of the default interval
SPIKE = "b = bytearray(200_000_000); b[::4096] = b'x' * len(range(0, len(b), 4096)); import time; time.sleep(0.4)"
SPIKE += "; del b; time.sleep(1.6)"


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEM_EXPORTER_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    env["MEM_EXPORTER_PHASE_FILE"] = str(tmp_path / "phase")  # never the host's phase
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RUN, *args],
        cwd=ROOT,
        env=env or clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- 1. no log ----------------------------------------------------------------------------------


def test_dev_null_means_no_log_by_flag_and_by_environment(tmp_path):
    marker = tmp_path / "ran"
    r = run(tmp_path, "-v", "-l", "/dev/null", "--", "touch", str(marker))
    assert r.returncode == 0, r.stderr
    assert marker.exists() and "log: none" in r.stderr
    marker.unlink()
    r = run(tmp_path, "--", "touch", str(marker), env=clean_env(tmp_path, MEM_EXPORTER_LOG="/dev/null"))
    assert r.returncode == 0 and marker.exists(), r.stderr
    assert not (tmp_path / "state").exists()  # nothing written anywhere
    assert Path("/dev/null").is_char_device()  # and /dev/null is still what it was


def test_a_symlink_to_dev_null_or_a_fifo_is_still_refused(tmp_path):
    (tmp_path / "link").symlink_to("/dev/null")
    os.mkfifo(tmp_path / "fifo")
    for where in ("link", "fifo"):
        r = run(tmp_path, "-l", str(tmp_path / where), "--", "true")
        assert r.returncode == 2 and "cannot write the log" in r.stderr, r.stderr


# --- 2. short runs and the peak -----------------------------------------------------------------


@pytest.mark.slow
def test_a_short_run_is_sampled_fast_and_logs_the_moment_of_its_peak(tmp_path):
    log = tmp_path / "run.jsonl"
    r = run(tmp_path, "-t", "2000", "-l", str(log), "--", sys.executable, "-c", SPIKE)
    assert r.returncode == 0, r.stderr
    recs = records(log)
    samples = [x for x in recs if x["type"] == "sample"]
    assert len(samples) >= 6, len(samples)  # 2.2 s at the 2 s interval used to give 2
    peak = next(x for x in recs if x["type"] == "peak")
    end = recs[-1]
    assert end["type"] == "exit" and peak["memory_bytes"] == end["peak_bytes"] >= 200 * MB
    assert peak["memory_bytes"] >= max(s["memory_bytes"] for s in samples)
    assert sum(m["memory_bytes"] for m in peak["members"]) == peak["memory_bytes"]
    assert "bytearray(200_000_000)" in peak["members"][0]["command"]
    assert samples[0]["t"] <= peak["t"] <= end["t"]


@pytest.mark.slow
def test_after_its_young_seconds_a_run_samples_at_the_interval(tmp_path):
    log = tmp_path / "run.jsonl"
    r = run(tmp_path, "-i", "2s", "-l", str(log), "--", "sleep", "9")
    assert r.returncode == 0, r.stderr
    times = [x["t"] for x in records(log) if x["type"] == "sample"]
    young = [t for t in times if t - times[0] < 4.5]
    old = [t for t in times if t - times[0] > 5.5]
    assert len(young) >= 12  # every 0.25 s
    assert 1 <= len(old) <= 2  # then every 2 s


# --- 5. the phase a run adopts ------------------------------------------------------------------


def write_phase_file(path: Path, name: str, setter: Setter) -> None:
    path.write_text(f"{name}\n{setter.line()}\n")


def phases(log: Path) -> set:
    return {x["phase"] for x in records(log) if x["type"] == "sample"}


@pytest.mark.slow
def test_a_phase_set_before_the_run_is_not_adopted_and_the_log_says_so(tmp_path):
    log = tmp_path / "run.jsonl"
    hours_ago = Setter(**{**this_setter().__dict__, "t": time.time() - 3 * 3600})
    write_phase_file(tmp_path / "phase", "Model-Active", hours_ago)
    r = run(tmp_path, "-l", str(log), "--", "sleep", "1")
    assert r.returncode == 0 and "phase" not in r.stderr, r.stderr
    assert phases(log) == {None}
    ignored = records(log)[-1]["phase_ignored"]
    assert ignored["phase"] == "Model-Active" and "before the run started" in ignored["why"]
    # asked for, and its setter's session (this test's) is alive: adopted, and said
    r = run(tmp_path, "--keep-phase", "-l", str(tmp_path / "kept.jsonl"), "--", "sleep", "1")
    assert phases(tmp_path / "kept.jsonl") == {"Model-Active"}
    assert "mem-exporter: phase Model-Active (set at" in r.stderr


def test_a_phase_whose_setters_session_has_ended_is_never_adopted(tmp_path):
    gone = subprocess.Popen(["sleep", "0"], start_new_session=True)  # a session that has ended
    gone.wait()
    setter = Setter(t=time.time() + 600, pid=gone.pid, sid=gone.pid, sid_start=1, uid=os.geteuid())
    write_phase_file(tmp_path / "phase", "Model-Active", setter)
    log = tmp_path / "run.jsonl"
    run(tmp_path, "--keep-phase", "-l", str(log), "--", "sleep", "1")
    assert phases(log) == {None}
    assert "has ended" in records(log)[-1]["phase_ignored"]["why"]


@pytest.mark.slow
def test_a_phase_set_during_the_run_is_adopted_and_shown(tmp_path):
    log = tmp_path / "run.jsonl"
    script = f"sleep 0.5; {sys.executable} -m mem_exporter phase Loading; sleep 1"
    r = run(tmp_path, "-l", str(log), "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert phases(log) == {None, "Loading"}
    assert "mem-exporter: phase Loading (set at" in r.stderr and "phase_ignored" not in records(log)[-1]


# --- 6. names -----------------------------------------------------------------------------------


def test_the_tree_is_named_after_the_program_a_shell_runs(tmp_path):
    log = tmp_path / "run.jsonl"
    r = run(tmp_path, "-l", str(log), "--", "bash", "-c", f"env FOO=1 {sys.executable} -c 'import time; time.sleep(1)'")
    assert r.returncode == 0, r.stderr
    labels = {g["group"] for x in records(log) if x["type"] == "sample" for g in x["groups"]}
    assert labels == {os.path.basename(sys.executable)}


def test_top_names_a_shell_led_group_after_its_program_and_shows_its_largest_member(tmp_path):
    from mem_exporter.config import load_config
    from mem_exporter.sampler import Sampler
    from mem_exporter.top import screen

    ready = tmp_path / "ready"
    cmd = f"{sys.executable} {HOG} --mb 20 --children 1 --child-mb 150 --ready {ready}; true"  # bash stays
    proc = subprocess.Popen(["bash", "-c", cmd], start_new_session=True)
    try:
        wait_for(ready.exists, 30, what="the hog")
        child = int(ready.read_text().split()[0])
        comm = Path(f"/proc/{child}/comm").read_text().strip()
        sample = Sampler(load_config(None, {"groups.min_memory": 0, "groups.max_groups": 1000})).tick()
        text = ["".join(t for t, _ in line) for line in screen(sample, 0.0, rows=2000)]
        row = next(line for line in text if f"-{proc.pid} " in line)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert row.startswith(f"{os.path.basename(sys.executable)}-{proc.pid} ")  # not bash-PGID
    assert re.search(rf"  {comm}\[{child}\] 1[5-9]\d\.\d MiB$", row), row  # the 150 MB child beside the name


# --- 7. the status line on a terminal -----------------------------------------------------------

ROWS, COLS = 24, 100
REGION = f"\x1b[1;{ROWS - 1}r".encode()
RESET = b"\x1b[r"


class Terminal:
    """`mem-exporter run ARGS` on a 24x100 pseudo-terminal, as its controlling terminal (as typed in a shell)."""

    def __init__(self, tmp_path: Path, *args: str, term: str = "xterm-256color"):
        env = clean_env(tmp_path, TERM=term)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(ROOT)
            os.execve(sys.executable, [*RUN, *args], env)
        import fcntl
        import termios

        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.output = b""
        self.status: int | None = None

    def pump(self, seconds: float = 0.05) -> None:
        if select.select([self.fd], [], [], seconds)[0]:
            try:
                self.output += os.read(self.fd, 1 << 16)
            except OSError:
                pass

    def wait_for(self, data: bytes, timeout: float = 30) -> None:
        def seen() -> bool:
            self.pump()
            return data in self.output

        wait_for(seen, timeout, interval=0, what=repr(data))

    def exit_status(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                for _ in range(5):
                    self.pump()
                return self.status
        raise AssertionError(f"run did not exit: {self.output[-500:]!r}")

    def close(self) -> None:
        if self.status is None and os.waitpid(self.pid, os.WNOHANG)[0] == 0:
            os.kill(self.pid, signal.SIGKILL)  # only the wrapper this test started
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminal(tmp_path):
    opened: list[Terminal] = []

    def start(*args: str, **kw) -> Terminal:
        t = Terminal(tmp_path, *args, **kw)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


def assert_restored(out: bytes) -> None:
    """The region was set, the last status drawn on the last row, and after the last region comes the reset
    (and nothing sets one again); run's closing lines come after it."""
    assert REGION in out, out[:400]
    assert f"\x1b7\x1b[{ROWS};1H\x1b[2K".encode() + b"\x1b[" in out  # a coloured status on the last row
    last_reset = out.rindex(RESET)
    assert out.rindex(REGION) < last_reset
    assert b"mem-exporter: peak" in out[last_reset:]


@pytest.mark.slow
def test_the_status_keeps_the_last_row_and_the_terminal_is_restored_at_exit(terminal):
    lines = "; ".join(f"echo line-{i}; sleep 0.05" for i in range(40))
    t = terminal("-v", "-l", "/dev/null", "--", "sh", "-c", lines)
    assert t.exit_status() == 0
    assert_restored(t.output)
    first = t.output.index(REGION)
    assert t.output.index(b"line-0") > first  # output scrolled inside the region from the start
    # the command's lines never share a row with the status: each status is drawn between save and restore
    for m in re.finditer(rb"\x1b7\x1b\[24;1H\x1b\[2K(.*?)\x1b8", t.output):
        assert b"line-" not in m.group(1)


def test_the_terminal_is_restored_when_run_is_killed(terminal):
    t = terminal("-v", "-l", "/dev/null", "--", "sleep", "30")
    t.wait_for(REGION)
    t.wait_for(b"MB of 800 MB")
    os.kill(t.pid, signal.SIGTERM)
    assert t.exit_status() == 128 + signal.SIGTERM
    assert_restored(t.output)


def test_the_terminal_is_restored_after_a_kill_for_memory(terminal):
    t = terminal("-v", "-t", "100", "-l", "/dev/null", "--", sys.executable, HOG, "--grow", "300", "--max-mb", "400")
    assert t.exit_status() == 137
    assert REGION in t.output and t.output.rindex(REGION) < t.output.rindex(RESET)
    assert b"mem-exporter: killed" in t.output[t.output.rindex(RESET) :]


def test_the_terminal_is_restored_after_ctrl_c(terminal):
    t = terminal("-v", "-l", "/dev/null", "--", "sleep", "30")
    t.wait_for(b"MB of 800 MB")
    os.write(t.fd, b"\x03")  # the terminal's Ctrl-C: SIGINT to the foreground group, the command's
    assert t.exit_status() == 130
    assert_restored(t.output)


def test_plain_lines_on_a_dumb_terminal(terminal):
    t = terminal("-v", "-l", "/dev/null", "--", "sleep", "1", term="dumb")
    assert t.exit_status() == 0
    assert REGION not in t.output and b"\x1b[" not in t.output
    assert b"mem-exporter: " in t.output and b"MB of 800 MB" in t.output


def test_plain_lines_when_stderr_is_not_a_terminal(tmp_path):
    r = run(tmp_path, "-v", "-l", "/dev/null", "--", "sleep", "1")
    assert r.returncode == 0 and "\x1b" not in r.stderr
    status = [line for line in r.stderr.splitlines() if "MB of 800 MB" in line]
    assert 1 <= len(status) <= 2  # one per interval, however fast a young run is sampled


# --- 8. one truth about where the command runs --------------------------------------------------


def test_run_help_and_the_docs_say_the_same_about_the_command_s_group_and_session():
    out = subprocess.run([*RUN, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
    help_text = " ".join(out.split())
    docs = " ".join((ROOT / "docs" / "run.md").read_text().split())
    said = "on a terminal, in a process group of its own in the terminal's foreground; otherwise, in a new session "
    said += "without a terminal"
    assert said in help_text and said in docs
    assert "in a new process group" not in help_text


def test_program_names_of_wrapped_commands():
    from mem_exporter.naming import program_name

    assert program_name(["bash", "-c", "cd app && bun test"]) == "bun"
    assert program_name(["sh", "-c", "exec bun test | tee out"]) == "bun"
    assert program_name(["bash", "-c", "sleep 1; python3 -c 'a; b'"]) == "python3"
    assert program_name(["env", "CI=1", "timeout", "5m", "bun", "test"]) == "bun"
    assert program_name(["/usr/bin/npm", "test"]) == "npm"
    assert program_name(["bash", "ci.sh"]) == "ci.sh"
    assert program_name(["bash", "-c", "x 'unbalanced"]) == "bash"
    assert program_name(["sh", "-c", "exit 3"]) == "sh"  # builtins alone: the shell
    assert program_name(["sh", "-c", "hog a & hog b & wait"]) == "hog"
