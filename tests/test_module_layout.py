"""One job per module, one name per thing, in the log and exposition modules: the record shapes apart from
the file writer, the metric families apart from the HTTP server, no function under a second name, no
re-exported names, one list of the events that are no kill."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import mem_exporter

OWNED = (
    "mem_exporter.records",
    "mem_exporter.logfile",
    "mem_exporter.runlog",
    "mem_exporter.sessionlog",
    "mem_exporter.exposition",
    "mem_exporter.http_server",
    "mem_exporter.enforcer.events",
)


def all_modules():
    for info in pkgutil.walk_packages(mem_exporter.__path__, "mem_exporter."):
        if info.name.endswith("__main__"):
            continue
        try:
            yield importlib.import_module(info.name)
        except ImportError:  # a module of another OS (its libraries missing here)
            continue


def load(name: str):
    return importlib.import_module(f"mem_exporter.{name}")


def test_the_shapes_and_the_writer_are_apart():
    records, logfile = load("records"), load("logfile")
    for name in ("LogFile", "RotatingFile", "LogFileError", "open_append", "make_private_dirs", "shared_log"):
        assert not hasattr(records, name), name
        assert getattr(logfile, name).__module__ == "mem_exporter.logfile"
    for name in ("session_header", "run_sample_record", "session_sample_record", "make_event", "LINE_SCHEMA"):
        assert not hasattr(logfile, name), name


def test_the_collector_and_the_http_server_are_apart():
    exposition, http_server = load("exposition"), load("http_server")
    for name in ("MetricsServer", "sample_health", "LANDING", "MAX_HEADER_BYTES"):
        assert not hasattr(exposition, name), name
        assert hasattr(http_server, name), name
    for name in ("SampleCollector", "build_registry"):
        assert not hasattr(http_server, name), name


@pytest.mark.parametrize("module", OWNED)
def test_no_function_has_a_second_name(module):
    """A function or class of the project is known by its own name only (no `x = y`, no `import y as x`)."""
    mod = importlib.import_module(module)
    aliases = [
        f"{name} is {obj.__module__}.{obj.__qualname__}"
        for name, obj in vars(mod).items()
        if (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__.startswith("mem_exporter")
        and name != obj.__name__
    ]
    assert aliases == []


@pytest.mark.parametrize("module", OWNED)
def test_all_lists_only_what_the_module_defines(module):
    """No module passes on another's names: a caller imports a name from where it lives."""
    mod = importlib.import_module(module)
    tree = ast.parse(Path(mod.__file__).read_text())
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {t.id for t in targets if isinstance(t, ast.Name)}
    assert sorted(set(getattr(mod, "__all__", ())) - defined) == []


def test_one_list_of_the_events_that_are_no_kill():
    holders = [m.__name__ for m in all_modules() if "QUIET_ACTIONS" in vars(m)]
    assert holders, "QUIET_ACTIONS is gone"
    for name in holders:
        assert importlib.import_module(name).QUIET_ACTIONS is load("records").QUIET_ACTIONS, name


def test_moved_code_logs_under_the_names_it_always_had():
    """A filter on the daemon's log (`mem_exporter.records: cannot write log ...`) still matches."""
    assert load("logfile").log.name == "mem_exporter.records"
    assert load("http_server").log.name == "mem_exporter.exposition"
