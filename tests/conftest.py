"""The tests' fixtures: process groups and daemons the test itself starts (and always cleans up), an in-process
enforcer, the source to run under. Plain helpers live in tests/helpers/."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest
from helpers.daemons import Daemon
from helpers.paths import HOG
from helpers.processes import Spawned

from mem_exporter.facilities import SOURCES


@pytest.fixture(autouse=True, scope="session")
def _private_phase_file(tmp_path_factory):
    """A phase someone set on this machine must not leak into the daemons the tests start."""
    os.environ["MEM_EXPORTER_PHASE_FILE"] = str(tmp_path_factory.mktemp("phase") / "phase")


@pytest.fixture(autouse=True, scope="session")
def _signals_as_a_terminal_gives_them():
    """A suite started as a background job of a script (`cmd &`) inherits SIGINT and SIGQUIT ignored, and
    every `run` it starts keeps them ignored, as a program started under nohup should. The tests that send
    Ctrl-C want what a terminal gives: a handler here is reset to the default in each child at exec."""
    for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGQUIT, signal.SIG_DFL)):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, handler)


@pytest.fixture(params=SOURCES)
def source(request) -> str:
    """Run a test once per source: the procfs fast path and the portable psutil path (forced on Linux)."""
    return request.param


@pytest.fixture
def spawn_group(tmp_path):
    """spawn_group(*hog_args) starts tests/hog.py as the leader of a new session and process group."""
    started: list[Spawned] = []

    def spawn(*args: str, ready: bool = True) -> Spawned:
        ready_file = tmp_path / f"ready-{len(started)}" if ready else None
        cmd = [sys.executable, HOG, *args] + (["--ready", str(ready_file)] if ready_file else [])
        proc = subprocess.Popen(cmd, start_new_session=True)
        s = Spawned(proc, ready_file)
        started.append(s)
        return s

    yield spawn
    for s in started:
        s.kill()


@pytest.fixture
def daemon(tmp_path):
    started: list[Daemon] = []

    def start(*args: str) -> Daemon:
        d = Daemon(*args, cwd=tmp_path)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


# --- an in-process enforcer on a real sampling loop ----------------------------------------------


@pytest.fixture
def tag():
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def enforcer(tmp_path):
    """enforcer(rules, ...) starts a sampling loop and an Enforcer in this process; both stop at teardown."""
    from mem_exporter.config import validate_config
    from mem_exporter.enforcer import Enforcer
    from mem_exporter.sampler import Sampler, SamplingLoop

    started = []

    def start(rules, dry_run=False, protect=(), interval="0.3s", source="auto", **kwargs):
        cfg = validate_config(
            {
                "interval": interval,
                "gpu": {"backend": "none"},
                "source": source,
                "enforcer": {"event_log": str(tmp_path / "events.jsonl"), "protect": list(protect), "rules": rules},
            }
        )
        loop = SamplingLoop(Sampler(cfg))
        enf = Enforcer(cfg, dry_run=dry_run, **kwargs)
        loop.consumers.append(enf.on_sample)
        loop.start()
        started.append((loop, enf))
        return enf

    yield start
    for loop, enf in started:
        loop.stop()
        enf.stop(timeout=30)
