"""Shared test helpers: process groups the test itself starts (and always cleans up), free ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOG = str(Path(__file__).with_name("hog.py"))
MB = 1024 * 1024
RUN = [sys.executable, "-m", "mem_exporter", "run"]


@pytest.fixture(autouse=True, scope="session")
def _private_phase_file(tmp_path_factory):
    """A phase someone set on this machine must not leak into the daemons the tests start."""
    os.environ["MEM_EXPORTER_PHASE_FILE"] = str(tmp_path_factory.mktemp("phase") / "phase")


SOURCES = ("procfs", "psutil")


@pytest.fixture(params=SOURCES)
def source(request) -> str:
    """Run a test once per source: the procfs fast path and the portable psutil path (forced on Linux)."""
    return request.param


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    """True while the pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def is_hog(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return HOG.encode() in f.read()
    except OSError:
        return False


class Spawned:
    """A process group this test started: leader pid == pgid."""

    def __init__(self, proc: subprocess.Popen, ready: Path | None):
        self.proc = proc
        self.pid = self.pgid = proc.pid
        self.ready = ready

    def wait_ready(self, timeout: float = 30.0) -> list[int]:
        wait_for(lambda: self.ready.exists() or self.proc.poll() is not None, timeout, what=f"{self.ready}")
        assert self.proc.poll() is None, f"hog exited early with {self.proc.returncode}"
        text = self.ready.read_text().split()
        return [int(x) for x in text]

    def kill(self) -> None:
        """Clean up only what this test started: the group, and pids it reported."""
        pids = []
        if self.ready and self.ready.exists():
            pids = [int(x) for x in self.ready.read_text().split()]
        if self.ready:  # grandchildren (--setsid-grandchild) are listed in their parent's ready file
            for extra in self.ready.parent.glob(self.ready.name + ".*"):
                try:
                    pids += [int(x) for x in extra.read_text().split()]
                except (OSError, ValueError):
                    pass
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:  # children that left the group; only if the pid is still one of our hogs
            if is_hog(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


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


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Daemon:
    """`python -m mem_exporter ARGS --listen 127.0.0.1:PORT` as a child, stopped at the end of the test."""

    def __init__(self, *args: str, cwd=None, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()  # a restart passes the old port: Prometheus keeps scraping it
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(cwd or ".") / f"daemon-{self.port}.log", "w+") if cwd else subprocess.DEVNULL
        command = [sys.executable, "-m", "mem_exporter", *args, "--listen", f"127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def wait_healthy(self, timeout: float = 15.0) -> Daemon:
        def healthy():
            assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode}: {self.output()}"
            try:
                return http_get(self.url + "/healthz", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(healthy, timeout, what="the daemon's /healthz")
        return self

    def metrics(self) -> str:
        status, body = http_get(self.url + "/metrics")
        assert status == 200
        return body

    def output(self) -> str:
        if self.log is subprocess.DEVNULL:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


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


# a fake 12 GB card with models taking turns on it; the path is from the repository root, where daemons run
ROTATING_GPUS = "fake:tests/fixtures/gpu/rotating-12gb.yaml"


def serve_logging(daemon: Callable[..., Daemon], logs: Path, phase_file: Path, *extra: str) -> Daemon:
    """A healthy `serve` from the `daemon` fixture: a sample every 0.2 s, the rotating fake card, session logs
    written to `logs`, the phase read from `phase_file`; `extra` are more of serve's options."""
    options = ["--interval", "0.2s", "--gpu-backend", ROTATING_GPUS, "--log-dir", str(logs)]
    return daemon("serve", *options, "--phase-file", str(phase_file), *extra).wait_healthy()


def metric_value(text: str, name: str, **labels) -> float | None:
    """The value of one series in an exposition text, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


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


# --- `mem-exporter run` until it kills its command --------------------------------------------------


def run_to_the_kill(
    log: Path, options: list[str], command: list[str], runner: list[str] = RUN, env: dict | None = None
) -> list[dict]:
    """`RUNNER OPTIONS -l LOG -- COMMAND` (RUNNER: `python -m mem_exporter run` unless given) from the repository
    root, in a session of its own; it must end with 137 within 60 s, its command killed. Returns the log's records.
    A run still going then is stopped with its process group, the one this call started."""
    proc = subprocess.Popen(
        [*runner, *options, "-l", str(log), "--", *command],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 137, stderr
    return [json.loads(line) for line in log.read_text().splitlines()]
