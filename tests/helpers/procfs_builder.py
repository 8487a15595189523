"""Writes synthetic /proc trees for parser and sampler tests."""

from __future__ import annotations

import os
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")

MEMINFO = """MemTotal:       {total_kb} kB
MemFree:         {free_kb} kB
MemAvailable:   {available_kb} kB
Buffers:          102400 kB
Cached:          2048000 kB
SwapTotal:       {swap_total_kb} kB
SwapFree:        {swap_free_kb} kB
"""


class FakeProc:
    def __init__(
        self,
        root: Path,
        total_kb=8_000_000,
        available_kb=6_000_000,
        free_kb=4_000_000,
        swap_total_kb=2_000_000,
        swap_free_kb=1_500_000,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "meminfo").write_text(MEMINFO.format(**locals()))
        (self.root / "stat").write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 100 0 100 800 0 0 0 0 0 0\n")
        (self.root / "self").mkdir(exist_ok=True)
        (self.root / "self" / "stat").write_text("")

    def pressure(
        self,
        some: tuple[float, float, float, int] = (0.0, 0.0, 0.0, 0),
        full: tuple[float, float, float, int] | None = (0.0, 0.0, 0.0, 0),
        path: Path | None = None,
    ) -> Path:
        """A PSI file (`pressure/memory`, or `path`): (avg10 %, avg60 %, avg300 %, total microseconds) per line."""
        path = path or self.root / "pressure" / "memory"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [("some", some)] + ([("full", full)] if full is not None else [])
        path.write_text(
            "".join(f"{k} avg10={a:.2f} avg60={b:.2f} avg300={c:.2f} total={t}\n" for k, (a, b, c, t) in lines)
        )
        return path

    def add(
        self,
        pid: int,
        comm: str,
        *,
        ppid: int = 1,
        pgid: int | None = None,
        sid: int | None = None,
        state: str = "S",
        rss_kb: int = 1024,
        flags: int = 0x400100,
        start: int = 1000,
        cmdline: str | None = None,
        pss_kb: int | None = None,
        swap_kb: int | None = None,
        cgroup: str | None = None,
        exec_at: int | None = 0x7FFC0000,
    ) -> Path:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        pgid = pid if pgid is None else pgid
        sid = pgid if sid is None else sid
        rss_pages = rss_kb * 1024 // PAGE
        # fields after comm: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        # cutime cstime priority nice threads itrealvalue starttime vsize rss ...
        fields = [
            state,
            ppid,
            pgid,
            sid,
            0,
            -1,
            flags,
            0,
            0,
            0,
            0,
            1,
            1,
            0,
            0,
            20,
            0,
            1,
            0,
            start,
            rss_pages * PAGE * 4,
            rss_pages,
        ] + [0] * 22
        # start_data end_data start_brk arg_start arg_end env_start env_end (what an exec sets; zeros
        # for a reader without ptrace access: exec_at=None), exit_code
        fields += [0] * 7 if exec_at is None else [exec_at + 0x100 * i for i in range(7)]
        fields.append(0)
        (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(str(f) for f in fields) + "\n")
        (d / "statm").write_text(f"{rss_pages * 4} {rss_pages} 100 10 0 {rss_pages} 0\n")
        args = (cmdline if cmdline is not None else comm).split(" ")
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0" if cmdline != "" else b"")
        if pss_kb is not None or swap_kb is not None:
            (d / "smaps_rollup").write_text(
                "00400000-7fff0000 ---p 00000000 00:00 0                          [rollup]\n"
                f"Rss:            {rss_kb} kB\nPss:            {pss_kb or 0} kB\nSwap:           {swap_kb or 0} kB\n"
            )
        if cgroup is not None:
            (d / "cgroup").write_text(cgroup)
        return d
