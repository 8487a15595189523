"""Where the tests find the programs they run: next to the interpreter that runs the tests (tools installed by
`pip install -e '.[test]'`, like hadolint and kubernetes-validate) or at Debian's path (promtool, prometheus,
amtool, ...), never through an inherited PATH, so a missing install step fails instead of hiding."""

from __future__ import annotations

import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
DEBIAN_BIN = Path("/usr/bin")


def tool(name: str) -> str:
    """The path of `name` next to sys.executable, else under /usr/bin; the /usr/bin path when neither exists,
    so running it fails with a FileNotFoundError that names the full path."""
    for directory in (VENV_BIN, DEBIAN_BIN):
        if (directory / name).is_file():
            return str(directory / name)
    return str(DEBIAN_BIN / name)


def have(name: str) -> bool:
    return Path(tool(name)).is_file()


PROMTOOL = tool("promtool")
PROMETHEUS = tool("prometheus")
AMTOOL = tool("amtool")
ALERTMANAGER = tool("prometheus-alertmanager")
DOCKER_COMPOSE = tool("docker-compose")
HADOLINT = tool("hadolint")
KUBERNETES_VALIDATE = tool("kubernetes-validate")
OPENSSL = tool("openssl")
