"""The `mem-exporter` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import DEFAULT_LISTEN, ConfigError, json_schema_text, load_config
from .facilities import SOURCE_CHOICES
from .outbox import install_stderr_logging

ENFORCER_DEFAULT_LISTEN = "0.0.0.0:9714"


def _add_daemon_options(p: argparse.ArgumentParser, listen_default: str) -> None:
    p.add_argument("-c", "--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("--listen", metavar="HOST:PORT", help=f"address for /metrics (default: {listen_default})")
    p.add_argument("--path.procfs", dest="procfs", metavar="DIR", help="procfs mount point (default: /proc)")
    p.add_argument("--path.sysfs", dest="sysfs", metavar="DIR", help="sysfs mount point (default: /sys)")
    p.add_argument("--gpu-backend", metavar="BACKEND", help="auto | nvml | drm | none | fake:FILE (default: auto)")
    _add_source_option(p)
    p.add_argument("--interval", metavar="DURATION", help="sampling interval, e.g. 2s (default: 2s)")
    p.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="FILE",
        help="TLS and basic auth for every endpoint, in exporter-toolkit's web-config.yml format",
    )


def _add_source_option(p: argparse.ArgumentParser, env: str | None = None) -> None:
    p.add_argument(
        "--source",
        choices=SOURCE_CHOICES,
        help="where process data comes from: procfs (Linux), psutil (macOS, Windows, or forced); "
        f"default: the config's `source`, auto{f' (env {env})' if env else ''}",
    )


def _add_session_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phase-file", metavar="FILE", help="the phase file to follow (default: as `mem-exporter phase`)")
    p.add_argument("--log-dir", metavar="DIR", help="write this session's samples and events under DIR")
    p.add_argument("--session", metavar="NAME", help="session name in the log file names (default: the command)")
    p.add_argument(
        "--log-format",
        choices=("jsonl", "csv"),
        default="jsonl",
        help="jsonl (default), or csv: one file for system and groups, one for GPUs",
    )
    p.add_argument(
        "--log-max-size", metavar="SIZE", default="50MB", help="rotate a log file at this size (default: 50MB)"
    )
    p.add_argument("--log-keep", metavar="N", type=int, default=4, help="rotated files kept per log (default: 4)")


def open_session_log(args: argparse.Namespace, command: str, config):
    """The SessionLog that --log-dir asks for (None without it); ValueError with one line when it cannot be."""
    if not getattr(args, "log_dir", None):
        return None
    from .sessionlog import SessionLog
    from .units import parse_size

    try:
        info = {"command": command, "interval": config.interval, "memtype": config.memory}
        return SessionLog(
            args.log_dir,
            args.session or command,
            args.log_format,
            parse_size(args.log_max_size),
            args.log_keep,
            info=info,
        )
    except OSError as e:
        raise ValueError(f"cannot write session logs in {args.log_dir}: {e.strerror or e}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mem-exporter",
        description="Per-process-group memory and GPU exporter, and an enforcer that kills runaway groups.",
    )
    parser.add_argument("--version", action="version", version=f"mem-exporter {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve /metrics (and enforce, when the config enables the enforcer)")
    _add_daemon_options(serve, DEFAULT_LISTEN)
    _add_session_options(serve)
    serve.set_defaults(func=cmd_serve)

    enforce = sub.add_parser("enforce", help="run the enforcer: kill process groups that break the config's rules")
    _add_daemon_options(enforce, ENFORCER_DEFAULT_LISTEN)
    _add_session_options(enforce)
    enforce.add_argument("--dry-run", action="store_true", help="log what would be killed; kill nothing")
    enforce.set_defaults(func=cmd_enforce)

    check = sub.add_parser("check-config", help="validate a config file: prints ok, or one line per problem (exit 2)")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    schema = sub.add_parser("schema", help="print the config's JSON Schema")
    schema.set_defaults(func=cmd_schema)

    phase = sub.add_parser(
        "phase",
        help="mark the current phase (Idle, Model-Loading, ...) for exporters and runs "
        "on this host; without NAME print it",
    )
    phase.add_argument(
        "name", nargs="?", metavar="NAME", help="any name, e.g. Idle, Model-Loading, Model-Active, Full-Processing"
    )
    phase.add_argument("--clear", action="store_true", help="no phase from now on")
    phase.add_argument(
        "--phase-file",
        metavar="FILE",
        help="default: $MEM_EXPORTER_PHASE_FILE, "
        "else $XDG_RUNTIME_DIR/mem-exporter/phase, else /run/mem-exporter/phase for root and "
        "$XDG_STATE_HOME/mem-exporter/phase (~/.local/state/mem-exporter/phase) for other users; every directory "
        "on the way must belong to root or you",
    )
    phase.set_defaults(func=cmd_phase)

    report = sub.add_parser(
        "report", help="write a Markdown memory report with PNG charts from session logs or Prometheus"
    )
    report.add_argument(
        "logs", nargs="*", metavar="LOG", help="session log files or directories (JSONL, CSV, event logs)"
    )
    report.add_argument(
        "-o", "--output", default="report.md", help="the Markdown file; charts go next to it (default: report.md)"
    )
    report.add_argument(
        "--prometheus", metavar="URL", help="read the run from this Prometheus instead of (or beside) logs"
    )
    report.add_argument(
        "--since", default="1h", metavar="DURATION", help="with --prometheus: how far back (default: 1h)"
    )
    report.add_argument(
        "--until", metavar="DURATION", default="0s", help="with --prometheus: end this long ago (default: now)"
    )
    report.add_argument(
        "--step", metavar="DURATION", help="with --prometheus: resolution (default: the range / 2000, at least 1s)"
    )
    report.add_argument(
        "--selector",
        default="",
        metavar="LABELS",
        help="with --prometheus: extra label matchers, e.g. 'instance=\"gpu-box:9713\"'",
    )
    report.add_argument(
        "--memtype", choices=("rss", "pss"), default="rss", help="with --prometheus: which group memory"
    )
    report.add_argument("--top", type=int, default=8, metavar="N", help="groups in the tables and charts (default: 8)")
    report.add_argument("--no-charts", action="store_true", help="Markdown only")
    report.add_argument("-c", "--config", help="take the zones (`zones:`) from this config (default: built-in zones)")
    report.add_argument(
        "--progress", action="store_true", default=None, help="show progress even when stderr is not a terminal"
    )
    report.set_defaults(func=cmd_report)

    top = sub.add_parser("top", help="live view of RAM, swap, GPUs and the largest groups, coloured by zone (q quits)")
    top.add_argument("-c", "--config", help="YAML config file (default: built-in defaults)")
    top.add_argument("--path.procfs", dest="procfs", metavar="DIR", help="procfs mount point (default: /proc)")
    top.add_argument("--path.sysfs", dest="sysfs", metavar="DIR", help="sysfs mount point (default: /sys)")
    top.add_argument("--gpu-backend", metavar="BACKEND", help="auto | nvml | drm | none | fake:FILE (default: auto)")
    _add_source_option(top)
    top.add_argument("--interval", metavar="DURATION", default="1s", help="refresh interval (default: 1s)")
    top.add_argument("--phase-file", metavar="FILE", help="the phase file to follow (default: as `mem-exporter phase`)")
    top.set_defaults(func=cmd_top)
    run = sub.add_parser(
        "run",
        help="run a command; kill its whole process tree if it uses too much memory (docs/run.md)",
        description="Run CMD: on a terminal, in a process group of its own in the terminal's foreground; "
        "otherwise, in a new session without a terminal. Watch its whole process tree (sessions of its own included) "
        "and kill the tree (SIGTERM, grace, SIGKILL) when its summed RSS passes the threshold. "
        "Exit status: CMD's own (128+N for a signal), 137 when killed for memory, 2 for a setup error.",
    )
    run.add_argument(
        "-t",
        "--threshold",
        metavar="SIZE",
        help="limit for the whole tree: MB (10^6 bytes) when bare (800), or with a unit (1.5GB, 2GiB); "
        "default 800 (env MEM_EXPORTER_THRESHOLD)",
    )
    run.add_argument(
        "-i",
        "--interval",
        metavar="DURATION",
        help="sampling interval, faster near the limit; default 2s (env MEM_EXPORTER_INTERVAL)",
    )
    run.add_argument(
        "-l",
        "--log",
        metavar="FILE",
        help="JSON-lines log (a directory: a new file in it); default "
        "$XDG_STATE_HOME/mem-exporter/runs/CMD-DATE-PID.jsonl (env MEM_EXPORTER_LOG)",
    )
    run.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="live status on stderr: memory, peak, processes, share of the limit (env MEM_EXPORTER_VERBOSE=1)",
    )
    run.add_argument("--notify", action="store_true", help="desktop notification when the tree is killed")
    run.add_argument("--grace", metavar="SECONDS", help="between SIGTERM and SIGKILL; default 5s")
    run.add_argument("--listen", metavar="HOST:PORT", help="also serve /metrics for the tree while it runs")
    run.add_argument(
        "--memory",
        choices=("auto", "rss", "footprint", "private"),
        help="which memory the limit counts: auto (default) is footprint on macOS (Activity Monitor's Memory), "
        "private on Windows (Task Manager's Commit size), rss elsewhere (env MEM_EXPORTER_MEMORY)",
    )
    run.add_argument(
        "--keep-phase",
        action="store_true",
        help="adopt a phase set before the run started, if the session that set it is still alive "
        "(default: only phases set while the run runs)",
    )
    run.add_argument(
        "--no-cgroup",
        action="store_true",
        help="do not put the command in a cgroup of its own with a kernel limit (Linux; env MEM_EXPORTER_NO_CGROUP=1)",
    )
    _add_source_option(run, env="MEM_EXPORTER_SOURCE")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help="the command to run")
    run.set_defaults(func=cmd_run)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    return {
        "listen": args.listen,
        "paths.procfs": args.procfs,
        "paths.sysfs": args.sysfs,
        "gpu.backend": args.gpu_backend,
        "interval": args.interval,
        "web.config_file": args.web_config_file,
        "source": args.source,
    }


def _run_service(args: argparse.Namespace, enforce: bool) -> int:
    from .service import Service

    overrides = _overrides(args)
    try:
        if enforce:
            overrides["enforcer.enabled"] = True
            if args.dry_run:
                overrides["enforcer.dry_run"] = True
            # the enforcer sidecar runs beside the exporter, whose port is the config's default
            if args.listen is None and load_config(args.config).listen == DEFAULT_LISTEN:
                overrides["listen"] = ENFORCER_DEFAULT_LISTEN
        session_log = None
        if args.log_dir:
            config = load_config(args.config, overrides)
            session_log = open_session_log(args, "enforce" if enforce else "serve", config)
            if not config.enforcer.event_log:  # the session's kills go with its samples
                overrides["enforcer.event_log"] = str(session_log.event_log_path)
        service = Service(args.config, overrides, enforce=enforce, phase_file=args.phase_file, session_log=session_log)
    except ConfigError as e:
        for problem in e.problems:
            print(f"mem-exporter: {problem}", file=sys.stderr)
        return 2
    except ValueError as e:  # a bad GPU scenario file, say
        print(f"mem-exporter: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        address = overrides.get("listen") or "the configured address"
        print(f"mem-exporter: cannot listen on {address}: {e.strerror or e}", file=sys.stderr)
        return 1
    service.install_signal_handlers()
    service.start().run_until_stopped()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return _run_service(args, enforce=False)


def cmd_enforce(args: argparse.Namespace) -> int:
    return _run_service(args, enforce=True)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        load_config(args.file)
    except ConfigError as e:
        for problem in e.problems:
            print(problem)
        return 2
    print("ok")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(json_schema_text())
    return 0


def cmd_phase(args: argparse.Namespace) -> int:
    from .phase import read_phase, resolve, write_phase

    path = resolve(args.phase_file)
    try:
        if args.clear or args.name is not None:
            if args.clear and args.name is not None:
                print("mem-exporter: give a NAME or --clear, not both", file=sys.stderr)
                return 2
            write_phase(path, None if args.clear else args.name)
            return 0
        current = read_phase(path)
    except (OSError, ValueError) as e:
        print(f"mem-exporter: {path}: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    if current is None:
        print(f"no phase set ({path})", file=sys.stderr)
        return 1
    print(current)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import time
    import urllib.error

    from .report import Run, read_logs, read_prometheus, write_report
    from .units import parse_duration

    if not args.logs and not args.prometheus:
        print("mem-exporter: report needs LOG files or directories, or --prometheus URL", file=sys.stderr)
        return 2
    try:
        zones = load_config(args.config).zones
    except ConfigError as e:
        for problem in e.problems:
            print(f"mem-exporter: {problem}", file=sys.stderr)
        return 2
    run = Run()
    try:
        if args.logs:
            read_logs(args.logs, run, args.progress)
        if args.prometheus:
            end = time.time() - parse_duration(args.until)
            step = parse_duration(args.step) if args.step else None
            read_prometheus(
                args.prometheus,
                end - parse_duration(args.since),
                end,
                step,
                args.selector,
                args.memtype,
                run,
                args.progress,
            )
    except (OSError, ValueError, urllib.error.URLError) as e:
        print(f"mem-exporter: {e}", file=sys.stderr)
        return 1
    for path, count in run.skipped.items():  # cut by a crash or a full disk: the rest of the file still counts
        print(f"mem-exporter: {path}: skipped {count} damaged record{'s' if count > 1 else ''}", file=sys.stderr)
    if not run.times:
        print("mem-exporter: no samples found", file=sys.stderr)
        return 1
    md, pngs = write_report(run, args.output, args.top, charts=not args.no_charts, zones=zones)
    print(md)
    for png in pngs:
        print(png)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from .top import run_top

    overrides = {
        "paths.procfs": args.procfs,
        "paths.sysfs": args.sysfs,
        "gpu.backend": args.gpu_backend,
        "interval": args.interval,
        "source": args.source,
    }
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        for problem in e.problems:
            print(f"mem-exporter: {problem}", file=sys.stderr)
        return 2
    return run_top(config, args.phase_file)


def cmd_run(args: argparse.Namespace) -> int:
    from .run import main as run_main

    return run_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # stderr through a bounded queue: a blocked stderr (a full pipe, Ctrl-S) never stalls a decision or a kill
    install_stderr_logging(getattr(logging, args.log_level.upper()), "%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args) or 0
