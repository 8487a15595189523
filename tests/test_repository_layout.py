"""The repository as a place to work in: conftest.py holds fixtures only (plain helpers are in tests/helpers/),
the pre-commit hooks run README's checks as README gives them, the markers the tests use are registered, and
the modules split to stay under the complexity limit stay under it, and the architecture map names every module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import yaml
from helpers.paths import ROOT, TESTS
from helpers.tools import tool

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_conftest_holds_fixtures_only_and_no_test_imports_it():
    tree = ast.parse((TESTS / "conftest.py").read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    plain = [f.name for f in functions if not any("fixture" in ast.unparse(d) for d in f.decorator_list)]
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert functions and plain == [] and classes == []
    importers = [
        p.name
        for p in sorted([*TESTS.rglob("*.py"), *(ROOT / "bench").glob("*.py")])
        if re.search(r"^\s*(from conftest import|import conftest)", p.read_text(), re.M)
    ]
    assert importers == []


def test_pre_commit_runs_the_checks_readme_asks_for():
    readme = " ".join((ROOT / "README.md").read_text().split())
    asked = re.search(r"Before a commit: `([^`]+)`", readme)
    assert asked, "README names its checks before a commit"
    commands = [c.strip() for c in asked.group(1).split("&&")]
    hooks = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"][0]["hooks"]
    assert [h["entry"] for h in hooks] == commands
    assert all(h["pass_filenames"] is False and h["language"] == "system" for h in hooks)


def test_every_mark_the_tests_use_is_registered():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {m.split(":")[0] for m in config["markers"]}
    assert {"slow", "integration"} <= registered and "--strict-markers" in config["addopts"]
    used = set()
    for p in TESTS.glob("test_*.py"):
        used |= set(re.findall(r"@pytest\.mark\.(\w+)", p.read_text()))
    builtin = {"parametrize", "skipif", "skip", "xfail", "usefixtures", "filterwarnings", "timeout"}
    assert used - builtin <= registered


def test_no_function_is_above_the_complexity_limit():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "C90" in config["select"] and config["mccabe"]["max-complexity"] == 15
    every = [tool("ruff"), "check", "--select", "C901", "mem_exporter", "bench", "tests"]
    r = subprocess.run(every, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_architecture_map_names_every_module():
    """docs/architecture.md is where a newcomer looks a concern up: a module it does not name is one nobody finds."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "mem_exporter"
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if path.name == "__init__.py":
            named = rel == "__init__.py" or f"{path.parent.relative_to(package).as_posix()}/" in text
        else:
            named = f"`{rel}`" in text or f"`{path.name}`" in text or f"{rel}" in text
        if not named:
            missing.append(rel)
    assert missing == []
