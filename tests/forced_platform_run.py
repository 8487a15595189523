"""`mem-exporter run ARGS` as it runs on macOS or Windows, on this OS: the platform forced, and the one OS call
that reads each process's own number replaced by Linux's nearest number for the same real process.

python tests/forced_platform_run.py darwin|win32 [run's options] [--] CMD [ARGS...]

- darwin: phys_footprint (proc_pid_rusage) is dirty anonymous memory plus what the compressor holds; here the
  process's anonymous resident memory plus its swap (/proc/PID/status RssAnon + VmSwap). Clean file pages count
  in RSS and in neither.
- win32: PrivateUsage (psutil's memory_info().private) is the commit charge: private memory committed, touched
  or not; here the process's private writable mappings (VmData), which Linux charges against its commit limit.
  The polling supervisor runs `run`, as on Windows.

Everything else is real: the psutil source, the tree, the threshold, the kill, the log.
"""

from __future__ import annotations

import sys

from mem_exporter import platforms
from mem_exporter.cli import build_parser
from mem_exporter.platforms import macos, windows
from mem_exporter.run import main
from mem_exporter.run.supervisor import PollingSupervisor


def status_kb(pid: int, *keys: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None  # gone: as proc_pid_rusage answers ESRCH
    return sum(int(fields[k].split()[0]) * 1024 for k in keys if k in fields)


if __name__ == "__main__":
    platform, args = sys.argv[1], sys.argv[2:]
    platforms.PLATFORM = platform
    macos.footprint = lambda pid, lib=None: status_kb(pid, "RssAnon", "VmSwap")  # type: ignore[assignment]
    windows.private_bytes = lambda pid, info: status_kb(pid, "VmData")  # type: ignore[assignment]
    supervisor = PollingSupervisor() if platform == "win32" else None
    sys.exit(main(build_parser().parse_args(["run", *args]), supervisor=supervisor))
