"""`mem-exporter top` in a real pseudo-terminal: it draws RAM, the GPU, a group and the phase, and `q` quits."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from helpers.waiting import wait_for

from mem_exporter.config import Zone, Zones
from mem_exporter.phase import write_phase
from mem_exporter.sample import GpuCard, GroupSample, ProcessInfo, Sample, SystemMemory
from mem_exporter.top import screen

ROOT = Path(__file__).parents[1]
GPU_SCENARIO = "fake:tests/fixtures/gpu/rotating-12gb.yaml"


class Terminal:
    """A child process on a 50x160 pseudo-terminal; everything it writes is kept."""

    def __init__(self, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes `mem-exporter ...`
            os.chdir(ROOT)
            os.environ["TERM"] = "xterm-256color"
            os.execv(sys.executable, [sys.executable, "-m", "mem_exporter", *args])
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.output = b""
        self.status: int | None = None

    def pump(self, seconds: float = 0.1) -> None:
        ready, _, _ = select.select([self.fd], [], [], seconds)
        if ready:
            try:
                self.output += os.read(self.fd, 1 << 16)
            except OSError:  # EIO: the child has gone and the terminal closed
                pass

    def wait_for_text(self, text: str, timeout: float = 30.0) -> None:
        def seen():
            self.pump()
            return text.encode() in self.output

        wait_for(seen, timeout, interval=0, what=f"{text!r} on the screen")

    def exit_status(self, timeout: float = 15.0) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        return None

    def close(self) -> None:
        if self.status is None and os.waitpid(self.pid, os.WNOHANG)[0] == 0:
            os.kill(self.pid, 9)  # only the child this test started
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_top_draws_and_quits_on_q(spawn_group, tmp_path):
    hog = spawn_group("--mb", "120", "--comm", "tophog")
    hog.wait_ready()
    phase = tmp_path / "phase"
    write_phase(phase, "Model-Active")
    term = Terminal("top", "--interval", "0.3s", "--gpu-backend", GPU_SCENARIO, "--phase-file", str(phase))
    try:
        term.wait_for_text("RAM")
        term.wait_for_text(f"tophog-{hog.pgid}")
        term.wait_for_text("Model-Active")
        term.wait_for_text("GPU 0")
        drawn = len(term.output)

        def redrawn():  # curses sends only what changed: the elapsed seconds at least
            term.pump()
            return len(term.output) > drawn

        wait_for(redrawn, 30, interval=0, what="a refresh")
        os.write(term.fd, b"q")
        assert term.exit_status() == 0
    finally:
        term.close()


def test_without_a_terminal_or_curses_top_says_so_and_exits_2():
    run = [sys.executable, "-m", "mem_exporter", "top", "--gpu-backend", "none"]
    piped = subprocess.run(run, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert piped.returncode == 2 and "needs a terminal" in piped.stderr and "Traceback" not in piped.stderr
    # Windows' Python has no curses (windows-curses provides it): a clear line, not a traceback
    no_curses = "import sys; sys.modules['curses'] = None; from mem_exporter.cli import main; sys.exit(main(['top']))"
    out = subprocess.run([sys.executable, "-c", no_curses], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "pip install windows-curses" in out.stderr, out.stderr


def test_screen_colours_by_zone():
    total = 1000
    member = ProcessInfo(7, 1, 7, 7, 0, "big", "big", 1, "S", 950)
    big = GroupSample("pgid:7", "big-7", "pgid", 950, 1, (member,), pgid=7)
    sample = Sample(
        timestamp=0.0,
        monotonic=0.0,
        duration_seconds=0.0,
        system=SystemMemory(total, 50, 25, 0, 0),
        cpu_usage_ratio=None,
        process_count=1,
        groups=(big,),
        phase="Full-Processing",
    )
    lines = screen(sample, 75.0)
    text = "\n".join("".join(t for t, _ in line) for line in lines)
    assert "elapsed 00:01:15" in text and "phase: Full-Processing" in text and "Swap      none" in text
    ram = next(line for line in lines if line and line[0][0].startswith("RAM"))
    assert ram[1] == ("[" + "#" * 23 + "." + "]", "critical")  # 95 % used
    assert lines[-1][1] == (" 95.0%", "critical")
    assert len(screen(sample, 0.0, rows=3)) == 3


def test_screen_uses_the_ram_zones_for_ram_and_the_gpu_zones_for_cards():
    card = GpuCard(
        index=0, uuid="GPU-0", name="demo", driver_version="1", memory_total_bytes=1000, memory_used_bytes=880
    )
    sample = Sample(
        timestamp=0.0,
        monotonic=0.0,
        duration_seconds=0.0,
        system=SystemMemory(1000, 120, 60, 0, 0),
        cpu_usage_ratio=None,
        process_count=0,
        groups=(),
        gpus=(card,),
    )
    lines = {line[0][0].strip(): line for line in screen(sample, 0.0) if line and len(line) > 1}
    assert lines["RAM"][1][1] == "caution"  # 88 % of RAM: caution (85 % / 90 %)
    assert lines["GPU 0"][1][1] == "critical"  # 88 % of a card: critical (67 % / 83 %)
    calm = Zones(system_memory=Zone(caution=0.95, critical=0.99))
    calm_lines = {line[0][0].strip(): line for line in screen(sample, 0.0, zones=calm) if len(line) > 1}
    assert calm_lines["RAM"][1][1] == "safe"
