"""/metrics as the exporter renders one sample, held against a golden file and linted by promtool."""

from __future__ import annotations

import os
import subprocess

from prometheus_client import CollectorRegistry, generate_latest

from helpers.paths import FIXTURES
from helpers.tools import PROMTOOL
from mem_exporter.exposition import SampleCollector

GOLDEN = FIXTURES / "golden"


def render(sample, config) -> str:
    """The /metrics text of one sample, as SampleCollector serves it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SampleCollector(lambda: sample, lambda: config.groups))
    return generate_latest(registry).decode()


def promtool_check(text: str) -> str:
    """`promtool check metrics` must accept `text`; returns what it had to say (its lint findings)."""
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return (r.stdout + r.stderr).strip()


def assert_golden(text: str, name: str) -> None:
    """`text` is the golden file fixtures/golden/NAME to the byte, and promtool finds nothing to say about it.
    With UPDATE_GOLDEN=1 the file is rewritten first, for the diff to be reviewed."""
    golden = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"/metrics changed; if intended, rerun with UPDATE_GOLDEN=1 and review {golden}"
    assert promtool_check(text) == ""
