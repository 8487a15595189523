"""The `mem-exporter` command line."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import DEFAULT_LISTEN, ConfigError, json_schema_text, load_config

ENFORCER_DEFAULT_LISTEN = "0.0.0.0:9714"


def _add_daemon_options(p: argparse.ArgumentParser, listen_default: str) -> None:
    p.add_argument("-c", "--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("--listen", metavar="HOST:PORT", help=f"address for /metrics (default: {listen_default})")
    p.add_argument("--path.procfs", dest="procfs", metavar="DIR", help="procfs mount point (default: /proc)")
    p.add_argument("--gpu-backend", metavar="BACKEND", help="auto | nvml | none | fake:FILE (default: auto)")
    p.add_argument("--interval", metavar="DURATION", help="sampling interval, e.g. 2s (default: 2s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mem-exporter", description=
                                     "Per-process-group memory and GPU exporter, and an enforcer that kills runaway groups.")
    parser.add_argument("--version", action="version", version=f"mem-exporter {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve /metrics (and enforce, when the config enables the enforcer)")
    _add_daemon_options(serve, DEFAULT_LISTEN)
    serve.set_defaults(func=cmd_serve)

    enforce = sub.add_parser("enforce", help="run the enforcer: kill process groups that break the config's rules")
    _add_daemon_options(enforce, ENFORCER_DEFAULT_LISTEN)
    enforce.add_argument("--dry-run", action="store_true", help="log what would be killed; kill nothing")
    enforce.set_defaults(func=cmd_enforce)

    check = sub.add_parser("check-config", help="validate a config file: prints ok, or one line per problem (exit 2)")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    schema = sub.add_parser("schema", help="print the config's JSON Schema")
    schema.set_defaults(func=cmd_schema)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    return {"listen": args.listen, "paths.procfs": args.procfs, "gpu.backend": args.gpu_backend,
            "interval": args.interval}


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
        service = Service(args.config, overrides, enforce=enforce)
    except ConfigError as e:
        for problem in e.problems:
            print(f"mem-exporter: {problem}", file=sys.stderr)
        return 2
    except ValueError as e:  # a bad GPU scenario file, say
        print(f"mem-exporter: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"mem-exporter: cannot listen on {overrides.get('listen') or 'the configured address'}: {e.strerror or e}",
              file=sys.stderr)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args) or 0
