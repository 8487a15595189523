"""The service's reload: a config file's `dry_run` follows the file; `--dry-run` holds across reloads."""

import os
import signal
import threading

import pytest
from helpers.net import free_port
from helpers.waiting import wait_for

from mem_exporter.service import Service


def config(path, dry_run: bool) -> str:
    path.write_text(f"gpu: {{backend: none}}\nenforcer:\n  dry_run: {str(dry_run).lower()}\n")
    return str(path)


def start(path, **overrides) -> Service:
    return Service(path, {"listen": f"127.0.0.1:{free_port()}", **overrides}, enforce=True).start()


@pytest.mark.integration
def test_a_files_dry_run_can_be_turned_off_by_a_reload(tmp_path):
    svc = start(config(tmp_path / "c.yaml", True))
    try:
        assert svc.enforcer.dry_run
        config(tmp_path / "c.yaml", False)
        assert svc.reload()
        assert not svc.enforcer.dry_run
    finally:
        svc.stop()


@pytest.mark.integration
def test_the_dry_run_flag_holds_across_reloads(tmp_path):
    svc = start(config(tmp_path / "c.yaml", False), **{"enforcer.dry_run": True})  # what `--dry-run` sets
    try:
        assert svc.enforcer.dry_run
        assert svc.reload()
        assert svc.enforcer.dry_run
    finally:
        svc.stop()


@pytest.mark.integration
def test_a_reload_with_an_infinite_limit_is_refused_and_the_running_rules_still_kill(
    tmp_path, daemon, spawn_group, tag
):
    """`max_rss: .inf` raised OverflowError out of reload() and the daemon died; now the bad file is one
    logged line and the rules in force go on killing."""
    cfg = tmp_path / "enforce.yaml"
    rule = f"    - {{name: hogs, match: {{cmdline: '{tag}'}}, grace: 1s, max_rss: %s}}\n"
    head = "interval: 0.3s\ngpu: {backend: none}\nenforcer:\n  rules:\n"
    cfg.write_text(head + rule % "150MB")
    d = daemon("enforce", "--config", str(cfg)).wait_healthy()

    def rejected() -> list[str]:
        return [line for line in d.output().splitlines() if "reload rejected" in line]

    for n, bad in enumerate((".inf", "1e400"), 1):
        cfg.write_text(head + rule % bad)
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_for(lambda n=n: len(rejected()) >= n or d.proc.poll() is not None, 10, what="the reload rejected")
        assert d.proc.poll() is None, d.output()
    assert [line.split("reload rejected, keeping the running config: ")[1] for line in rejected()] == [
        f"{cfg}: line 5: enforcer.rules[0].max_rss: inf: a size must be a finite number of bytes",
        f"{cfg}: line 5: enforcer.rules[0].max_rss: '1e400': a size must be a finite number of bytes",
    ]
    assert "Traceback" not in d.output()
    hog = spawn_group("--mb", "250", "--tag", tag)
    wait_for(lambda: hog.proc.poll() is not None, 20, what="the hog killed under the running rules")
    assert hog.proc.returncode == -signal.SIGTERM


@pytest.mark.integration
def test_a_reload_from_a_fifo_is_refused_at_once_and_the_config_stays(tmp_path):
    """A FIFO where the config was blocked reload() (and with it the next reload and shutdown) until a
    writer came; now it is a rejected reload like any unreadable file."""
    path = tmp_path / "c.yaml"
    svc = start(config(path, True))
    try:
        path.unlink()
        os.mkfifo(path)
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(svc.reload()), daemon=True)
        t.start()
        t.join(10)
        if t.is_alive():  # free the blocked reader before failing, so the service can stop
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        assert result == [False]
        assert svc.enforcer.dry_run
    finally:
        svc.stop()
