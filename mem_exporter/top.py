"""`mem-exporter top`: a live terminal view of RAM, swap, GPUs and the largest groups, coloured by zone.

It runs its own Sampler (the same code path as the exporter). `screen()` turns a Sample into
lines of (text, zone) pieces without touching the terminal; `run_top` draws them with curses.
"""

from __future__ import annotations

import logging
import sys
import time

from .config import Config, Zones
from .naming import LAUNCHERS, SHELLS, program_name
from .sample import GroupSample, Sample
from .units import format_bytes
from .zones import Kind, zone_for

Piece = tuple[str, str | None]  # text, and its zone (safe | caution | critical) or None
BAR = 24


def _bar(ratio: float) -> str:
    filled = round(max(0.0, min(1.0, ratio)) * BAR)
    return "[" + "#" * filled + "." * (BAR - filled) + "]"


def _meter(label: str, used: float, total: float, kind: Kind, zones: Zones | None, extra: str = "") -> list[Piece]:
    ratio = used / total if total else 0.0
    z = zone_for(kind, ratio, zones) if total else None
    return [
        (f"{label:<10}", None),
        (_bar(ratio), z),
        (f" {format_bytes(used):>10} / {format_bytes(total):<10} {ratio:4.0%}", z),
        (extra, None),
    ]


def _elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def group_name(g: GroupSample) -> str:
    """A group led by a shell or a launcher (`bash -c "bun test"`, `npm test` through `sh -c`) is named after
    the program it runs, not the shell: `bun-6549`, where the label says `bash-6549`."""
    leader = next((p for p in g.members if p.pid == g.pgid), None)
    if g.kind != "pgid" or leader is None or leader.comm not in SHELLS | LAUNCHERS:
        return g.label
    return f"{program_name(leader.cmdline.split() or [leader.comm])}-{g.pgid}"


def largest_member(g: GroupSample, memtype: str) -> str:
    """The group's largest process beside its name, when the group has more than one."""
    if g.processes < 2 or not g.members:
        return "-"
    p = max(g.members, key=lambda m: m.pss_bytes if memtype == "pss" and m.pss_bytes is not None else m.rss_bytes)
    mem = p.pss_bytes if memtype == "pss" and p.pss_bytes is not None else p.rss_bytes
    return f"{p.comm}[{p.pid}] {format_bytes(mem)}"


def screen(sample: Sample, elapsed: float, rows: int = 40, zones: Zones | None = None) -> list[list[Piece]]:
    """The lines to show for one sample, at most `rows` of them, coloured by `zones` (the config's)."""
    s = sample.system
    lines: list[list[Piece]] = [
        [
            (
                f"mem-exporter top   elapsed {_elapsed(elapsed)}   phase: {sample.phase or '-'}   "
                f"{sample.process_count} processes   q quits",
                None,
            )
        ],
        [],
    ]
    lines.append(
        _meter(
            "RAM", s.used_bytes, s.total_bytes, "system_memory", zones, f"  available {format_bytes(s.available_bytes)}"
        )
    )
    if s.swap_total_bytes:
        lines.append(_meter("Swap", s.swap_used_bytes, s.swap_total_bytes, "system_memory", zones))
    else:
        lines.append([(f"{'Swap':<10}none", None)])
    for c in sample.gpus:
        # a card may not report some of these (None): format only what is there
        extra = (
            "".join(
                f"  {fmt.format(value)}"
                for fmt, value in (
                    ("util {:.0%}", c.utilization_ratio),
                    ("{:.0f}°C", c.temperature_celsius),
                    ("{:.0f} W", c.power_watts),
                )
                if value is not None
            )
            + f"  {c.name}"
        )
        if c.memory_total_bytes:
            lines.append(
                _meter(f"GPU {c.index}", c.memory_used_bytes or 0, c.memory_total_bytes, "gpu_memory", zones, extra)
            )
        else:
            lines.append([(f"GPU {c.index:<6}memory not reported{extra}", None)])
    lines += [[], [(f"{'GROUP':<32} {'PROCS':>6} {'MEMORY':>11} {'GPU':>11} {'RAM %':>6}  LARGEST", None)]]
    for g in sample.groups[: max(0, rows - len(lines))]:
        mem = g.memory_bytes(sample.memtype)
        ratio = mem / s.total_bytes if s.total_bytes else 0.0
        gpu = format_bytes(g.gpu_memory_total_bytes) if g.gpu_memory_bytes else "-"
        lines.append(
            [
                (f"{group_name(g)[:32]:<32} {g.processes:>6} {format_bytes(mem):>11} {gpu:>11} ", None),
                (f"{ratio:6.1%}", zone_for("system_memory", ratio, zones)),
                (f"  {largest_member(g, sample.memtype)}", None),
            ]
        )
    return lines[:rows]


def run_top(config: Config, phase_file: str | None = None) -> int:
    try:
        import curses
    except ImportError:  # Windows without windows-curses (a dependency there), or a Python built without it
        print(
            "mem-exporter top: this Python has no curses module (on Windows: pip install windows-curses)",
            file=sys.stderr,
        )
        return 2
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("mem-exporter top: needs a terminal (for a log of samples, use `serve --log-dir DIR`)", file=sys.stderr)
        return 2

    from .gpu import open_gpu_source
    from .phase import PhaseWatcher
    from .sampler import Sampler

    logging.getLogger().setLevel(logging.ERROR)  # log lines would scribble over the screen
    gpu = open_gpu_source(config.gpu.backend, config.gpu.retry_max, paths=config.paths)
    sampler = Sampler(config, gpu=gpu, phase_watcher=PhaseWatcher(phase_file))
    try:
        return curses.wrapper(_loop, sampler, config.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        gpu.close()


def _loop(stdscr, sampler, interval: float) -> int:
    import curses

    colours: dict[str | None, int] = {None: 0}
    if curses.has_colors():
        curses.use_default_colors()
        for n, (zone, fg) in enumerate(
            (("safe", curses.COLOR_GREEN), ("caution", curses.COLOR_YELLOW), ("critical", curses.COLOR_RED)), 1
        ):
            curses.init_pair(n, fg, -1)
            colours[zone] = curses.color_pair(n) | (curses.A_BOLD if zone == "critical" else 0)
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    started = time.monotonic()
    while True:
        sample = sampler.tick()
        height, width = stdscr.getmaxyx()
        stdscr.erase()
        for y, line in enumerate(screen(sample, time.monotonic() - started, height, sampler.config.zones)):
            x = 0
            for text, z in line:
                if x < width - 1:
                    try:
                        stdscr.addnstr(y, x, text, width - 1 - x, colours.get(z, 0))
                    except curses.error:  # the bottom-right cell, or a terminal shrinking under us
                        pass
                x += len(text)
        stdscr.refresh()
        deadline = time.monotonic() + interval
        while (left := deadline - time.monotonic()) > 0:
            stdscr.timeout(max(1, int(left * 1000)))
            key = stdscr.getch()
            if key in (ord("q"), ord("Q")):
                return 0
            if key == curses.KEY_RESIZE:
                break
