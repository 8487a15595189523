"""`mem-exporter run` with real commands: tree memory, the kill at the limit, exit statuses, signals, log, terminal.

Every wrapper runs in a session of its own; cleanup signals only the wrapper and pids our hogs reported.
Each test runs three ways: the procfs source, the psutil source, and the psutil source with the polling
supervisor (tests/polling_run.py), the pair Windows runs.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.metrics import metric_value
from helpers.net import free_port, http_get
from helpers.paths import HOG
from helpers.processes import is_hog, pid_alive
from helpers.tools import PROMTOOL
from helpers.waiting import wait_for
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).parents[1]
RUN = [sys.executable, "-m", "mem_exporter", "run"]
POLLING_RUN = [sys.executable, str(Path(__file__).with_name("polling_run.py"))]  # run, with PollingSupervisor
MB = 1000**2
RUNBOOK = "https://github.com/mem-exporter/mem-exporter/blob/main/docs/runbook.md"
POLLING = "psutil-polling"


@pytest.fixture(autouse=True, params=["procfs", "psutil", POLLING])
def variant(request, monkeypatch) -> str:
    """Every test here runs once per source, procfs and the portable psutil path (forced on Linux), and once
    more with psutil and the polling supervisor: Windows' way, whose supervisor runs for real here too."""
    monkeypatch.setenv("MEM_EXPORTER_TEST_SOURCE", request.param.split("-")[0])
    return request.param


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEM_EXPORTER_")}
    env["MEM_EXPORTER_SOURCE"] = os.environ.get("MEM_EXPORTER_TEST_SOURCE", "auto")
    env["XDG_STATE_HOME"] = str(tmp_path / "state")  # default logs land in the test's directory
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def hog(*args: str) -> list[str]:
    return [sys.executable, HOG, *args]


class Wrapped:
    def __init__(self, tmp_path: Path, run: list[str], args: list[str], env: dict | None = None, **popen):
        self.tmp_path = tmp_path
        self.err_path = tmp_path / f"stderr-{time.monotonic_ns()}"
        self.err = open(self.err_path, "w+")
        self.proc = subprocess.Popen(
            run + args,
            cwd=ROOT,
            env=env or clean_env(tmp_path),
            stderr=self.err,
            stdout=popen.pop("stdout", subprocess.DEVNULL),
            start_new_session=True,
            **popen,
        )

    def wait(self, timeout: float = 40.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        self.err.flush()
        return self.err_path.read_text()

    def cleanup(self) -> None:
        if self.proc.poll() is None:  # the wrapper stops its own tree on SIGTERM
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for ready in self.tmp_path.glob("ready*"):  # then, only pids our hogs reported, only if still hogs
            for pid in ready_pids(ready):
                if is_hog(pid):
                    os.kill(pid, signal.SIGKILL)
        self.err.close()


def ready_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return []


@pytest.fixture
def wrap(tmp_path, variant):
    started: list[Wrapped] = []
    run = POLLING_RUN if variant == POLLING else RUN

    def start(*args: str, env: dict | None = None, **popen) -> Wrapped:
        w = Wrapped(tmp_path, run, list(args), env, **popen)
        started.append(w)
        return w

    yield start
    for w in started:
        w.cleanup()


def wait_ready(path: Path, w: Wrapped, timeout: float = 30.0) -> list[int]:
    wait_for(lambda: path.exists() or w.proc.poll() is not None, timeout, what=str(path))
    assert w.proc.poll() is None, f"wrapper exited early ({w.proc.returncode}): {w.stderr()}"
    return ready_pids(path)


# --- the tree and its memory -----------------------------------------------------------------


@pytest.mark.slow
def test_shell_children_count_in_the_tree_memory(wrap, tmp_path):
    log = tmp_path / "run.jsonl"
    script = f"{HOG} --mb 30 --sleep 2 & {HOG} --mb 30 --sleep 2 & wait"
    w = wrap("-t", "2GB", "-i", "0.2", "-l", str(log), "--", "sh", "-c", script.replace(HOG, f"{sys.executable} {HOG}"))
    assert w.wait() == 0, w.stderr()
    samples = [r for r in records(log) if r["type"] == "sample"]
    biggest = max(samples, key=lambda r: r["memory_bytes"])
    assert biggest["processes"] >= 3  # sh and both hogs
    assert biggest["memory_bytes"] >= 60 * 2**20 and biggest["memory_mb"] == round(biggest["memory_bytes"] / MB, 1)
    assert sum(m["memory_bytes"] for m in biggest["members"]) == biggest["memory_bytes"]
    assert {"pid", "command", "memory_bytes"} <= set(biggest["members"][0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", biggest["timestamp"])
    assert biggest["threshold_bytes"] == 2 * 1000**3 and biggest["pgid"] == records(log)[0]["command_pid"]
    assert records(log)[-1] == {**records(log)[-1], "type": "exit", "cause": "exited", "exit_status": 0}


def test_over_the_limit_the_whole_tree_dies_with_137_setsid_grandchild_too(wrap, tmp_path, variant):
    ready, log = tmp_path / "ready", tmp_path / "run.jsonl"
    # the hog grows only once its child and the child's setsid grandchild are up
    w = wrap(
        "-t",
        "150",
        "-i",
        "0.5",
        "--grace",
        "2",
        "-l",
        str(log),
        "--",
        *hog(
            "--mb",
            "30",
            "--grow",
            "100",
            "--children",
            "1",
            "--child-mb",
            "20",
            "--setsid-grandchild",
            "--ready",
            str(ready),
        ),
    )
    assert w.wait() == 137, w.stderr()
    child = ready_pids(ready)
    grandchild = ready_pids(Path(f"{ready}.child0"))
    leader = records(log)[0]["command_pid"]
    assert records(log)[0]["subreaper"] is (variant != POLLING)  # the polling supervisor is none
    assert len(child) == 1 and len(grandchild) == 1
    for pid in [leader, *child, *grandchild]:
        wait_for(lambda pid=pid: not pid_alive(pid), 10, what=f"pid {pid} gone")
    err = w.stderr()
    assert "limit of 150 MB" in err and "largest:" in err and str(log) in err
    event = next(r for r in records(log) if r.get("type") == "event")
    assert event["cause"] == "memory" and event["outcome"] == "dead" and event["limit"] == 150 * MB
    assert event["value"] > 150 * MB and event["peak_bytes"] >= event["value"]
    assert grandchild[0] in {p["pid"] for p in event["signalled"]}  # in its own session, still in the tree
    assert event["processes"] == 3
    assert records(log)[-1]["exit_status"] == 137


@pytest.mark.parametrize("script,status", [("exit 3", 3), ("kill -USR1 $$", 128 + signal.SIGUSR1)])
def test_the_commands_own_exit_status_passes_through(wrap, tmp_path, script, status):
    w = wrap("--", "sh", "-c", script)
    assert w.wait() == status, w.stderr()
    assert w.stderr() == ""  # nothing to say about a run that ended by itself
    logs = list((tmp_path / "state" / "mem-exporter" / "runs").glob("sh-*.jsonl"))  # the default path
    assert len(logs) == 1 and re.fullmatch(rf"sh-\d{{8}}-\d{{6}}-{w.proc.pid}\.jsonl", logs[0].name)
    assert records(logs[0])[-1]["exit_status"] == status


def test_an_orphan_left_running_is_stopped_when_the_command_exits(wrap, tmp_path):
    pid_file = tmp_path / "ready-orphan"
    # the shell exits soon; its background hog is reparented to the wrapper (a subreaper), or without one
    # (the polling supervisor) stays in the tree as a member seen while its parent lived: the sleep
    # outlasts the 0.5 s between readings
    script = f"{sys.executable} {HOG} --mb 5 & echo $! > {pid_file}; sleep 1; exit 5"
    w = wrap("--grace", "1", "--", "sh", "-c", script)
    assert w.wait() == 5, w.stderr()
    orphan = ready_pids(pid_file)
    assert orphan and not pid_alive(orphan[0])
    assert "left running" in w.stderr()


def test_unknown_command_is_127(wrap):
    w = wrap("--", "/nonexistent/command")
    assert w.wait() == 127
    assert "/nonexistent/command" in w.stderr()


# --- signals ----------------------------------------------------------------------------------


def test_sigint_reaches_the_whole_tree_even_where_ignored(wrap, tmp_path):
    ready, log = tmp_path / "ready", tmp_path / "run.jsonl"
    w = wrap(
        "--grace",
        "1",
        "-l",
        str(log),
        "--",
        *hog("--ignore", "SIGINT", "--children", "1", "--setsid-child", "--ready", str(ready)),
    )
    kids = wait_ready(ready, w)
    leader = records(log)[0]["command_pid"]
    assert len(kids) == 2 and all(pid_alive(p) for p in [leader, *kids])
    os.kill(w.proc.pid, signal.SIGINT)
    assert w.wait() == 128 + signal.SIGINT, w.stderr()
    for pid in [leader, *kids]:
        assert not pid_alive(pid), f"pid {pid} outlived the wrapper"
    event = next(r for r in records(log) if r.get("type") == "event")
    assert event["signal"] == "SIGINT" and [s["signal"] for s in event["signals_sent"]] == ["SIGINT", "SIGKILL"]
    assert "got SIGINT" in w.stderr()


@pytest.mark.integration
def test_listen_serves_the_tree_and_its_limit(wrap, tmp_path):
    ready, port = tmp_path / "ready", free_port()
    w = wrap(
        "-t", "1GiB", "-i", "0.3", "--listen", f"127.0.0.1:{port}", "--", *hog("--mb", "30", "--ready", str(ready))
    )
    wait_ready(ready, w)
    name = os.path.basename(sys.executable)

    def scraped():
        try:
            body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=2)[1]
        except OSError:
            return None
        value = metric_value(body, "mem_exporter_group_memory_bytes", group=name, memtype="rss")
        return body if value and value >= 30 * 2**20 else None

    body = wait_for(scraped, 20, what="the tree in /metrics")
    assert metric_value(body, "mem_exporter_enforcer_limit_bytes", rule="run", group=name, memtype="rss") == 2**30
    assert metric_value(body, "mem_exporter_group_processes", group=name) == 1
    os.kill(w.proc.pid, signal.SIGTERM)
    assert w.wait() == 128 + signal.SIGTERM
    assert_alert_rules_join(body, name, tmp_path)


def assert_alert_rules_join(body: str, group: str, tmp_path: Path) -> None:
    """The shipped alert rules join a `run`'s series as they were scraped (labels and all): with the group's
    memory held at twice the limit, MemExporterGroupAboveLimit fires for rule "run"."""
    wanted = {"mem_exporter_group_memory_bytes", "mem_exporter_enforcer_limit_bytes"}
    series = [
        (s.name, {**s.labels, "instance": "laptop", "job": "run"}, s.value)
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name in wanted and s.labels.get("group") == group
    ]
    limit = next(v for n, _, v in series if n == "mem_exporter_enforcer_limit_bytes")

    def selector(name: str, labels: dict[str, str]) -> str:
        return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"

    inputs = [
        {"series": selector(n, labels), "values": f"{int(2 * limit if n.endswith('memory_bytes') else v)}x5"}
        for n, labels, v in series
    ]
    test = {
        "rule_files": [str(ROOT / "deploy/prometheus/rules/mem-exporter.rules.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [
                    {
                        "eval_time": "2m",
                        "alertname": "MemExporterGroupAboveLimit",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "instance": "laptop",
                                    "job": "run",
                                    "group": group,
                                    "rule": "run",
                                    "memtype": "rss",
                                },
                                "exp_annotations": {
                                    "summary": "A process group has stayed above its enforcer limit.",
                                    "description": f"Group {group} on laptop uses 200% of the limit of rule run (rss), "
                                    "and the enforcer has not brought it down for 1 minute.",
                                    "runbook_url": RUNBOOK + "#memexportergroupabovelimit",
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "run.test.yml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- options, environment, log path -----------------------------------------------------------


def test_environment_sets_options_and_flags_win(wrap, tmp_path):
    env = clean_env(
        tmp_path,
        MEM_EXPORTER_THRESHOLD="1",
        MEM_EXPORTER_INTERVAL="300ms",
        MEM_EXPORTER_LOG=str(tmp_path / "env.jsonl"),
        MEM_EXPORTER_VERBOSE="1",
    )
    sleeper = [sys.executable, "-c", "import time; time.sleep(20)"]
    w = wrap("--grace", "1", "--", *sleeper, env=env)
    assert w.wait() == 137  # 1 MB: any Python is over it
    head = records(tmp_path / "env.jsonl")[0]
    assert (head["threshold_bytes"], head["interval"]) == (1 * MB, 0.3)
    assert "of 1 MB (" in w.stderr() and "\r" not in w.stderr()  # the live status: plain lines off a terminal
    env_lines = len(records(tmp_path / "env.jsonl"))

    w = wrap("-t", "10GB", "-i", "1", "-l", str(tmp_path / "flag.jsonl"), "--", sys.executable, "-c", "pass", env=env)
    assert w.wait() == 0, w.stderr()
    head = records(tmp_path / "flag.jsonl")[0]
    assert (head["threshold_bytes"], head["interval"]) == (10 * 1000**3, 1.0)
    assert len(records(tmp_path / "env.jsonl")) == env_lines  # -l won over MEM_EXPORTER_LOG
    assert "of 10000 MB" in w.stderr()


def test_a_bad_environment_value_is_named(wrap, tmp_path):
    marker = tmp_path / "ran"
    w = wrap("--", "touch", str(marker), env=clean_env(tmp_path, MEM_EXPORTER_THRESHOLD="lots"))
    assert w.wait() == 2
    assert "MEM_EXPORTER_THRESHOLD" in w.stderr() and not marker.exists()


def test_an_unwritable_log_is_an_error_before_the_command_starts(wrap, tmp_path):
    (tmp_path / "a-file").write_text("")
    marker = tmp_path / "ran"
    w = wrap("-l", str(tmp_path / "a-file" / "run.jsonl"), "--", "touch", str(marker))
    assert w.wait() == 2
    err = w.stderr().strip()
    assert len(err.splitlines()) == 1 and "cannot write the log" in err and "a-file" in err
    assert not marker.exists()


# --- the terminal -----------------------------------------------------------------------------


def test_on_a_terminal_the_command_gets_the_foreground(wrap, tmp_path, variant):
    if variant == POLLING:
        pytest.skip(
            "the polling supervisor shares no terminal: the command gets a session of its own "
            "(POSIX) or keeps the console (Windows)"
        )
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()
    code = (
        "import os; print('fg', os.tcgetpgrp(0) == os.getpgrp(), 'own-group', os.getpgrp() == os.getpid(), "
        "'same-session', os.getsid(0) == os.getsid(os.getppid()), flush=True)"
    )
    w = wrap(
        "-l",
        str(tmp_path / "run.jsonl"),
        "--",
        sys.executable,
        "-c",
        code,
        stdin=slave,
        stdout=slave,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif w.proc.poll() is not None:
            break
    os.close(master)
    assert w.wait() == 0, w.stderr()
    assert b"fg True own-group True same-session True" in out, out
    assert records(tmp_path / "run.jsonl")[0]["terminal"] is True


# --- pure parts -------------------------------------------------------------------------------


def test_tree_members_follow_ppid_links_and_identity():
    from mem_exporter.run import tree_members
    from mem_exporter.sample import ProcessInfo

    def p(pid, ppid, start=1):
        return ProcessInfo(pid, ppid, pid, pid, 0, "x", "x", start, "S", 1)

    previous = {200: p(200, 1), 201: p(201, 1, start=5)}
    procs = [p(100, 50), p(101, 100), p(102, 101), p(103, 102), p(200, 1), p(201, 1, start=9), p(300, 1)]
    assert sorted(tree_members(procs, previous, root=100)) == [101, 102, 103, 200]  # 201: a reused pid


def test_options_flags_over_environment():
    import argparse

    from mem_exporter.run import SetupError, options_from

    def args(**kw):
        base = dict(
            command=["--", "x"],
            threshold=None,
            interval=None,
            log=None,
            verbose=False,
            notify=False,
            grace=None,
            listen=None,
        )
        return argparse.Namespace(**{**base, **kw})

    env = {
        "MEM_EXPORTER_THRESHOLD": "1.5GB",
        "MEM_EXPORTER_INTERVAL": "500ms",
        "MEM_EXPORTER_LOG": "/x.jsonl",
        "MEM_EXPORTER_VERBOSE": "yes",
    }
    o = options_from(args(), env)
    assert (o.command, o.threshold, o.interval, o.log, o.verbose) == (("x",), 1_500_000_000, 0.5, "/x.jsonl", True)
    o = options_from(args(threshold="800", interval="2", log="/y.jsonl"), env)
    assert (o.threshold, o.interval, o.log) == (800 * MB, 2.0, "/y.jsonl")
    assert options_from(args(), {}).threshold == 800 * MB
    assert options_from(args(threshold="1GiB"), {}).threshold == 2**30
    with pytest.raises(SetupError, match="--threshold"):
        options_from(args(threshold="0"), {})
    with pytest.raises(SetupError, match="no command"):
        options_from(args(command=["--"]), {})


def test_log_path_defaults_and_directories(tmp_path):
    from mem_exporter.runlog import resolve_path

    started = time.mktime((2024, 6, 1, 14, 22, 33, 0, 0, -1))
    assert resolve_path(None, "/usr/bin/bun", started, 42, {"XDG_STATE_HOME": "/state", "HOME": "/home/u"}) == Path(
        "/state/mem-exporter/runs/bun-20240601-142233-42.jsonl"
    )
    assert resolve_path(None, "bun", started, 42, {"XDG_STATE_HOME": "relative", "HOME": "/home/u"}) == Path(
        "/home/u/.local/state/mem-exporter/runs/bun-20240601-142233-42.jsonl"
    )
    assert resolve_path(str(tmp_path), "bun", started, 42, {}) == tmp_path / "bun-20240601-142233-42.jsonl"
    assert resolve_path(str(tmp_path / "x.jsonl"), "bun", started, 42, {}) == tmp_path / "x.jsonl"
    assert resolve_path(f"{tmp_path}/new/", "bun", started, 42, {}) == tmp_path / "new" / "bun-20240601-142233-42.jsonl"
