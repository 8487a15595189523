"""The service's reload: a config file's `dry_run` follows the file; `--dry-run` holds across reloads."""

from conftest import free_port

from mem_exporter.service import Service


def config(path, dry_run: bool) -> str:
    path.write_text(f"gpu: {{backend: none}}\nenforcer:\n  dry_run: {str(dry_run).lower()}\n")
    return str(path)


def start(path, **overrides) -> Service:
    return Service(path, {"listen": f"127.0.0.1:{free_port()}", **overrides}, enforce=True).start()


def test_a_files_dry_run_can_be_turned_off_by_a_reload(tmp_path):
    svc = start(config(tmp_path / "c.yaml", True))
    try:
        assert svc.enforcer.dry_run
        config(tmp_path / "c.yaml", False)
        assert svc.reload()
        assert not svc.enforcer.dry_run
    finally:
        svc.stop()


def test_the_dry_run_flag_holds_across_reloads(tmp_path):
    svc = start(config(tmp_path / "c.yaml", False), **{"enforcer.dry_run": True})  # what `--dry-run` sets
    try:
        assert svc.enforcer.dry_run
        assert svc.reload()
        assert svc.enforcer.dry_run
    finally:
        svc.stop()
