"""The platform seams: every reader and actuator has every member of its protocol (checked by mypy and at
run time), no module imports one that imports it back, and the platform's facilities are probed in one place."""

import ast
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mem_exporter import facilities
from mem_exporter.config import validate_config
from mem_exporter.enforcer.actuator import Actuator, ProcfsActuator
from mem_exporter.enforcer.actuators import make_actuator
from mem_exporter.enforcer.portable import PortableActuator
from mem_exporter.procfs import ProcfsReader
from mem_exporter.psutil_source import PsutilReader
from mem_exporter.reader import Reader
from mem_exporter.sources import make_reader

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mem_exporter"

READERS = (ProcfsReader, PsutilReader)
ACTUATORS = (ProcfsActuator, PortableActuator)


def protocol_members(protocol: type) -> dict[str, object]:
    """name -> the protocol's function (a method) or None (an attribute)."""
    members: dict[str, object] = {name: None for name in protocol.__annotations__}
    members |= {name: f for name, f in vars(protocol).items() if inspect.isfunction(f) and not name.startswith("_")}
    return members


def missing_members(protocol: type, instance: object) -> list[str]:
    """Members the instance lacks, or whose parameters do not start with the protocol's (names, in order)."""
    out = []
    for name, fn in protocol_members(protocol).items():
        if not hasattr(instance, name):
            out.append(name)
        elif fn is not None:
            want = list(inspect.signature(fn).parameters)[1:]  # without self
            have = list(inspect.signature(getattr(instance, name)).parameters)
            if have[: len(want)] != want:
                out.append(f"{name}{tuple(have)}")
    return out


@pytest.mark.parametrize("source", facilities.SOURCES)
def test_every_reader_has_every_member_of_the_protocol(tmp_path, source):
    _, reader = make_reader(validate_config({"source": source, "gpu": {"backend": "none"}}))
    assert type(reader) in READERS
    assert set(protocol_members(Reader)) >= {"close", "forget_except", "uptime", "newest_pid", "ancestors"}
    assert missing_members(Reader, reader) == []
    reader.forget_except([])  # what used to be reached with getattr: every reader answers
    reader.close()
    assert reader.ancestors(os.getpid()) >= {1} and reader.uptime() > 0 and reader.newest_pid() is not None


@pytest.mark.parametrize("kind", [ProcfsActuator, PortableActuator])
def test_every_actuator_has_every_member_of_the_protocol(kind, monkeypatch):
    import mem_exporter.enforcer.actuators as actuators

    if kind is PortableActuator:  # no procfs: as on macOS and Windows
        monkeypatch.setattr(actuators, "procfs_at", lambda root: False)
    actuator = make_actuator(validate_config({"gpu": {"backend": "none"}}))
    assert type(actuator) is kind
    assert missing_members(Actuator, actuator) == []


def test_the_runtime_check_sees_a_missing_member():
    class Old:  # a reader as the psutil one was: nothing to close or forget, no host facts
        def read_system(self): ...
        def read_cpu_times(self): ...
        def pids(self): ...
        def read_processes(self, pids=None): ...

    assert set(missing_members(Reader, Old())) == {"close", "forget_except", "uptime", "newest_pid", "ancestors"}


MYPY_HEADER = """
from collections import Counter
from collections.abc import Iterable, Sequence

from mem_exporter.enforcer.actuator import Actuator, Delivery, ProcfsActuator
from mem_exporter.enforcer.portable import PortableActuator
from mem_exporter.procfs import ProcfsReader
from mem_exporter.psutil_source import PsutilReader
from mem_exporter.reader import Reader
from mem_exporter.sample import ProcessInfo, SystemMemory

procfs_reader: Reader = ProcfsReader()
psutil_reader: Reader = PsutilReader()
procfs_actuator: Actuator = ProcfsActuator()
psutil_actuator: Actuator = PortableActuator()
"""


def implementation(protocol: type, name: str, without: str | None) -> str:
    """A class with every member of the protocol (as the protocol declares it) but `without`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(protocol))).body[0]
    assert isinstance(tree, ast.ClassDef)
    body: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name != without:
            node.body = [ast.Raise(ast.Name("NotImplementedError"))]
            body.append(node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id != without:
            node.value = ast.Constant(False)
            body.append(node)
    return ast.unparse(ast.ClassDef(name, [], [], body, [], type_params=[]))


def test_mypy_checks_each_implementation_against_its_protocol(tmp_path):
    """The real readers and actuators pass; a class that lacks any one member of a protocol fails (mypy as
    the project runs it), and one that has them all passes."""
    parts, expected = [MYPY_HEADER], set()
    for protocol in (Reader, Actuator):
        members = protocol_members(protocol)
        assert len(members) >= 4
        for member in [None, *members]:
            name = f"{protocol.__name__}Without_{member}"
            parts += [implementation(protocol, name, member), f"x_{name}: {protocol.__name__} = {name}()"]
            if member is not None:
                expected.add(f"x_{name}")
    snippet = tmp_path / "seams.py"
    snippet.write_text("\n\n".join(parts) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), str(snippet)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = snippet.read_text().splitlines()
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    failed = {lines[int(line.split(":")[1]) - 1].split(":")[0] for line in errors}
    assert failed == expected, done.stdout
    assert len(errors) == len(expected), done.stdout  # one error each, where the class is used as the protocol


# --- imports: no module imports one that imports it back ---------------------------------------------


def runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports at run time, at the top or inside functions (imports under
    `if TYPE_CHECKING:` are for the type checker only: no cycle at run time). Importing a submodule runs
    its package's __init__ first: that is not counted as an import of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        is_package = name.endswith(".__init__")
        modules[name.removesuffix(".__init__")] = (path, is_package)
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        found = set()
        for node in runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    found.add(sub if sub in modules else module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other (each group sorted)."""
    reaches = {m: reach(graph, m) for m in graph}
    found = {
        tuple(sorted(m for m in reaches[start] if start in reaches[m])) for start in graph if start in reaches[start]
    }
    return sorted(list(c) for c in found)


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "mem_exporter.enforcer.portable" in graph["mem_exporter.enforcer.actuators"]  # the walk sees lazy imports
    assert cycles(graph) == []


def test_the_cycle_finder_sees_a_lazy_import_back():
    graph = import_graph()
    graph["mem_exporter.enforcer.actuator"].add("mem_exporter.enforcer.portable")  # as make_actuator did
    assert ["mem_exporter.enforcer.actuator", "mem_exporter.enforcer.portable"] in cycles(graph)


PAIRS = [
    ("mem_exporter.enforcer.actuator", "mem_exporter.enforcer.portable", "mem_exporter.enforcer.actuators"),
    ("mem_exporter.run.supervisor", "mem_exporter.run.posix", "mem_exporter.run.supervisors"),
    ("mem_exporter.reader", "mem_exporter.procfs", "mem_exporter.psutil_source", "mem_exporter.sources"),
    ("mem_exporter.gpu.source", "mem_exporter.gpu.nvml", "mem_exporter.gpu.drm", "mem_exporter.gpu"),
]


@pytest.mark.parametrize("modules", PAIRS, ids=lambda m: m[0].rpartition(".")[2])
def test_each_seam_imports_alone_in_either_order(modules):
    """In a fresh interpreter, each order of imports works, and the factory (the last) builds what it picks."""
    for order in (modules, modules[::-1]):
        code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in order)
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


def test_facilities_are_probed_in_one_place():
    """No module but facilities.py asks Python or the OS for pidfds or prctl (subreaper, death signal)."""
    probes = ('hasattr(os, "pidfd_open")', "PR_SET_CHILD_SUBREAPER = ", "PR_SET_PDEATHSIG = ", ").prctl")
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "facilities.py":
            continue
        text = path.read_text()
        found += [f"{path.relative_to(ROOT)}: {p!r}" for p in probes if p in text]
    assert found == []
    assert facilities.SOURCE_CHOICES == ("auto", *facilities.SOURCES) == ("auto", "procfs", "psutil")


# --- the enforcer's host facts come through its reader -------------------------------------------------


def host_tree(root: Path, uptime: float, newest: int, parent: int) -> Path:
    """A procfs fixture: our own process under `parent` (under init), the clock, the newest pid."""
    from helpers.procfs_builder import FakeProc

    fake = FakeProc(root)
    fake.add(os.getpid(), "me", ppid=parent)
    fake.add(parent, "shell", ppid=1)
    (fake.root / "uptime").write_text(f"{uptime:.2f} 1.00\n")
    (fake.root / "loadavg").write_text(f"0.00 0.00 0.00 1/100 {newest}\n")
    (fake.root / "self" / "status").write_text(f"Name:\tme\nNSpid:\t{os.getpid()}\n")
    return fake.root


def test_the_enforcer_reads_uptime_newcomers_and_its_ancestors_through_its_reader(tmp_path):
    from mem_exporter.enforcer.daemon import Enforcer
    from mem_exporter.enforcer.lane import PidWatch

    configured = host_tree(tmp_path / "configured", uptime=100.0, newest=500, parent=4242)
    other = host_tree(tmp_path / "other", uptime=7.5, newest=600, parent=4343)
    cfg = validate_config({"paths": {"procfs": str(configured)}, "gpu": {"backend": "none"}})
    enf = Enforcer(cfg, dry_run=True)
    try:
        assert enf.ctx.ancestors == {4242, 1}  # from the configured tree, not this host's
        assert enf._uptime() == 100.0
        enf._reader.reader = ProcfsReader(str(other))  # whatever the reader reads, the enforcer follows
        assert enf._uptime() == 7.5
    finally:
        enf.stop(timeout=30)
    watch = PidWatch(ProcfsReader(str(other)))
    assert watch.moved() and not watch.moved()  # the first look always says yes; then only a new pid does
    (other / "loadavg").write_text("0.00 0.00 0.00 1/100 601\n")
    assert watch.moved() and not watch.moved()
    assert PidWatch(PsutilReader()).moved()
