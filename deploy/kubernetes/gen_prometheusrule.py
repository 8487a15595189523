#!/usr/bin/env python3
"""Write prometheusrule.yaml (a Prometheus Operator PrometheusRule) from every plain
Prometheus rule file in deploy/prometheus/rules/, so both carry the same rules and alerts.

    python deploy/kubernetes/gen_prometheusrule.py           # rewrite prometheusrule.yaml
    python deploy/kubernetes/gen_prometheusrule.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES_DIR = HERE.parent / "prometheus" / "rules"
OUTPUT = HERE / "prometheusrule.yaml"
HEADER = (
    "# Generated from deploy/prometheus/rules/*.rules.yml by\n"
    "# deploy/kubernetes/gen_prometheusrule.py; edit the rule files and rerun it.\n"
)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def rule_files(rules_dir: Path = RULES_DIR) -> list[Path]:
    """The files Prometheus loads (`rule_files: rules/*.rules.yml`), in a stable order."""
    return sorted(rules_dir.glob("*.rules.yml"))


def render(rules_dir: Path = RULES_DIR) -> str:
    groups = [group for path in rule_files(rules_dir) for group in yaml.safe_load(path.read_text())["groups"]]
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "mem-exporter",
            "namespace": "mem-exporter",
            "labels": {"app.kubernetes.io/name": "mem-exporter"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(resource, Dumper=_Dumper, sort_keys=False, width=4096, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if prometheusrule.yaml is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
