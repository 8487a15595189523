"""What Windows and macOS lack, imposed on Linux: the portable modules type-check for both platforms, and
`serve` and `run` work in a process from which Windows' POSIX-only calls, constants and modules are taken away.

What only the other OS can show (TerminateProcess, console events) is not here: see docs/platforms.md.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.paths import HOG
from helpers.tools import tool

ROOT = Path(__file__).parents[1]
# Modules that run on Linux only (the procfs source, PSI, DRM, the POSIX supervisor, child links) or, for
# actuator.py, hold the procfs actuator beside parts every OS runs (those are run by the test below).
LINUX_ONLY = {
    "mem_exporter/procfs.py",
    "mem_exporter/pressure.py",
    "mem_exporter/gpu/drm.py",
    "mem_exporter/enforcer/actuator.py",
    "mem_exporter/run/posix.py",
    "mem_exporter/run/tree.py",
}


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_portable_modules_type_check_on_windows_and_macos(platform, tmp_path):
    """mypy with the other OS's view of the standard library: an unguarded os.killpg, signal.SIGHUP or
    O_CLOEXEC in a module every OS imports is an error here, not a crash on a user's desktop."""
    out = subprocess.run(
        [tool("mypy"), "--platform", platform, "--cache-dir", str(tmp_path / "cache"), "--no-error-summary"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in out.stdout.splitlines() if re.match(r"\S+\.py:\d+: error:", line)]
    assert out.returncode in (0, 1) and (errors or out.returncode == 0), out.stdout + out.stderr
    portable = [e for e in errors if e.split(":")[0] not in LINUX_ONLY]
    assert not portable, "\n".join(portable)


# Run in a fresh interpreter: take away what Windows has not (after psutil and the standard library modules
# that bind them at import), then serve, scrape and stop; then `run` a hog past its limit with the polling
# supervisor and the portable actuator (its Windows branch), as on Windows.
WINDOWS_ABSENCES = r"""
import http.server, json, os, select, signal, socket, socketserver, subprocess, sys, tempfile, time, urllib.request
import psutil

GETPGID, GETSID = os.getpgid, os.getsid
GONE = {
    os: ["geteuid", "getuid", "getpgrp", "getpgid", "getsid", "setpgid", "killpg", "sysconf", "pread",
         "O_CLOEXEC", "O_NOFOLLOW", "O_NONBLOCK", "O_NOCTTY", "WUNTRACED", "set_blocking", "tcgetpgrp",
         "tcsetpgrp", "pidfd_open"],
    signal: ["SIGHUP", "SIGCHLD", "SIGTTOU", "SIGSTOP", "SIGCONT", "pidfd_send_signal"],
    select: ["poll"],
    socket: ["MSG_DONTWAIT"],
}
for module, names in GONE.items():
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
for name in ("pwd", "grp", "resource", "termios"):
    sys.modules[name] = None  # `import pwd` raises ImportError, as on Windows

from mem_exporter import cli, service
from mem_exporter.run import runner as run
from mem_exporter.enforcer import daemon, portable
from mem_exporter.run.supervisor import PollingSupervisor

result = {}
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
svc = service.Service(None, {"listen": f"127.0.0.1:{port}", "source": "psutil", "gpu.backend": "auto",
                             "interval": 0.2})
svc.install_signal_handlers()
svc.start()
try:
    deadline = time.monotonic() + 20
    while svc.loop.latest is None and time.monotonic() < deadline:
        time.sleep(0.05)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    result["psutil_up"] = 'mem_exporter_source_up{source="psutil"} 1.0' in body
    result["groups"] = body.count("mem_exporter_group_memory_bytes{")
finally:
    svc.stop()

portable.IS_WINDOWS = True  # terminate() for the first signal, kill() for the last
run.make_actuator = lambda config: portable.PortableActuator()  # on Linux the procfs actuator is chosen
log = os.path.join(sys.argv[1], "run.jsonl")
args = cli.build_parser().parse_args(["run", "-t", "150", "-i", "0.3", "--source", "psutil", "--log", log, "--",
                                      sys.executable, sys.argv[2], "--mb", "20", "--grow", "300"])
result["run_status"] = run.main(args, supervisor=PollingSupervisor())
events = [r for r in map(json.loads, open(log)) if r.get("type") == "event"]
result["outcome"] = events[0]["outcome"] if events else None

# `enforce` through the portable actuator, grouping by process group as on macOS: getpgid comes back for this
# part only (tree grouping on Linux would root every process at init; on Windows trees stop at the shells).
os.getpgid, os.getsid = GETPGID, GETSID
tag = f"portable{os.getpid()}"
config = os.path.join(sys.argv[1], "enforce.yaml")
with open(config, "w") as f:
    f.write(f"interval: 0.3s\nsource: psutil\ngpu: {{backend: none}}\nlisten: 127.0.0.1:{port}\nenforcer:\n"
            f"  mlock: false\n"  # mlockall is Linux's: selfprotect asks sys.platform, which is linux here
            f"  rules:\n    - name: hog\n      match: {{cmdline: '--tag {tag}$'}}\n      max_rss: 150MB\n"
            f"      grace: 1s\n")
daemon.make_actuator = lambda config: portable.PortableActuator()
svc = service.Service(config, enforce=True)
svc.start()
hog = subprocess.Popen([sys.executable, sys.argv[2], "--mb", "20", "--grow", "200", "--tag", tag],
                       start_new_session=True)  # its own group: the only one the rule can select
try:
    result["enforce_hog"] = hog.wait(30)
except subprocess.TimeoutExpired:
    hog.kill()  # this script's own child
    result["enforce_hog"] = hog.wait()
finally:
    svc.stop()
result["enforce_kills"] = [(e["rule"], e["action"], e["outcome"]) for e in svc.enforcer.events]
print(json.dumps(result))
"""


@pytest.mark.slow
def test_serve_run_and_enforce_work_without_what_windows_lacks(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", WINDOWS_ABSENCES, str(tmp_path), HOG],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["psutil_up"] and result["groups"] > 0, result
    assert result["run_status"] == 137 and result["outcome"] == "dead", (result, out.stderr[-2000:])
    assert result["enforce_hog"] == -signal.SIGTERM and result["enforce_kills"] == [["hog", "term", "dead"]], result
