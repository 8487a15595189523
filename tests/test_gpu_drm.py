"""DRM cards (AMD, Intel) from fixture /sys and /proc trees: parsing, counting, caching, and /metrics.

The trees are built by tests/helpers/sysfs_builder.py from tests/fixtures/drm (kernel-documented formats; the
README there names the source of every line). /metrics is diffed against golden files and linted by
promtool.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers.golden import assert_golden, render
from helpers.procfs_builder import FakeProc
from helpers.sysfs_builder import FakeSys, add_fd, add_plain_fds

from mem_exporter.config import validate_config
from mem_exporter.gpu import CombinedSource, open_gpu_source
from mem_exporter.gpu.drm import DrmSource, parse_fdinfo, parse_size
from mem_exporter.sampler import Sampler

GIB = 1024**3
MIB = 1024**2


# --- fixture trees ------------------------------------------------------------------------------


def _proc(root: Path) -> FakeProc:
    fp = FakeProc(root)
    (root / "sys" / "kernel").mkdir(parents=True, exist_ok=True)
    (root / "sys" / "kernel" / "osrelease").write_text("6.11.0-19-generic\n")
    fp.add(1, "systemd", rss_kb=12_000)
    fp.add(2, "kthreadd", flags=0x00208040)
    return fp


def tree_amd_discrete(proc: Path, sys_: Path) -> None:
    fs = FakeSys(sys_)
    fs.add_card("amd-discrete")
    fs.add_card("aspeed-bmc")  # no render node: not a GPU
    fp = _proc(proc)
    game = fp.add(100, "game", rss_kb=900_000)
    add_plain_fds(game, 12)
    add_fd(game, 40, "/dev/dri/renderD128", "amdgpu-client42.fdinfo")
    train = fp.add(200, "python3", cmdline="python3 train.py", rss_kb=3_000_000)
    add_plain_fds(train, 30)
    add_fd(train, 31, "/dev/dri/renderD128", "amdgpu-client43.fdinfo")
    add_plain_fds(fp.add(201, "python3", ppid=200, pgid=200, rss_kb=500_000), 8)
    add_plain_fds(fp.add(300, "sshd", rss_kb=5_000), 6)


def tree_amd_apu(proc: Path, sys_: Path) -> None:
    FakeSys(sys_).add_card("amd-apu")
    fp = _proc(proc)
    llm = fp.add(400, "llama-server", rss_kb=1_200_000)
    add_plain_fds(llm, 10)
    add_fd(llm, 11, "/dev/dri/renderD129", "amdgpu-apu-legacy.fdinfo")


def tree_intel_xe(proc: Path, sys_: Path) -> None:
    FakeSys(sys_).add_card("intel-xe")
    fp = _proc(proc)
    blender = fp.add(500, "blender", rss_kb=2_000_000)
    add_plain_fds(blender, 20)
    add_fd(blender, 21, "/dev/dri/renderD128", "xe-client3.fdinfo")


def tree_shared_client(proc: Path, sys_: Path) -> None:
    """One process with two descriptors on one client (dup), a second client, and a child inheriting the first."""
    FakeSys(sys_).add_card("amd-discrete")
    fp = _proc(proc)
    parent = fp.add(600, "python3", cmdline="python3 serve.py", rss_kb=800_000)
    add_plain_fds(parent, 4)
    add_fd(parent, 5, "/dev/dri/renderD128", "amdgpu-client42.fdinfo")
    add_fd(parent, 9, "/dev/dri/renderD128", "amdgpu-client42.fdinfo")  # dup(5): the same client
    add_fd(parent, 10, "/dev/dri/card0", "amdgpu-client43.fdinfo")  # a second open: another client
    child = fp.add(601, "python3", ppid=600, pgid=600, cmdline="python3 serve.py --worker", rss_kb=400_000)
    add_fd(child, 5, "/dev/dri/renderD128", "amdgpu-client42.fdinfo")  # inherited over fork


def tree_no_memory_keys(proc: Path, sys_: Path) -> None:
    FakeSys(sys_).add_card("intel-i915-igpu")
    fp = _proc(proc)
    browser = fp.add(700, "firefox", rss_kb=700_000)
    add_plain_fds(browser, 40)
    add_fd(browser, 41, "/dev/dri/renderD128", "i915-engines-only.fdinfo")


TREES = {
    "amd-discrete": tree_amd_discrete,
    "amd-apu": tree_amd_apu,
    "intel-xe": tree_intel_xe,
    "shared-client": tree_shared_client,
    "no-memory-keys": tree_no_memory_keys,
}


def build(tmp_path: Path, name: str) -> tuple[Path, Path]:
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    TREES[name](proc, sys_)
    return proc, sys_


def sample_of(proc: Path, sys_: Path, backend: str = "auto"):
    cfg = validate_config({"paths": {"procfs": str(proc), "sysfs": str(sys_)}, "gpu": {"backend": backend}})
    sample = Sampler(cfg, gpu=open_gpu_source(cfg.gpu.backend, paths=cfg.paths)).tick()
    return cfg, dataclasses.replace(sample, timestamp=1_700_000_000.0, duration_seconds=0.0125, cpu_usage_ratio=0.25)


# --- /metrics: golden files and promtool ---------------------------------------------------------


@pytest.mark.parametrize("name", list(TREES))
def test_golden_metrics(tmp_path, name):
    cfg, sample = sample_of(*build(tmp_path, name))
    assert_golden(render(sample, cfg), f"metrics-drm-{name}.txt")


def test_amd_discrete_card_and_groups(tmp_path):
    _, sample = sample_of(*build(tmp_path, "amd-discrete"))
    (card,) = sample.gpus  # the BMC display (no render node) is not a GPU
    assert (card.vendor, card.pci_bus_id, card.index) == ("amd", "0000:03:00.0", 0)
    assert card.memory_total_bytes == 25753026560 and card.memory_used_bytes == 9126805504
    assert card.gtt_memory_total_bytes == 33554432000
    assert card.utilization_ratio == 0.87 and card.temperature_celsius == 52.0  # the "edge" sensor
    assert card.power_watts == 241.0 and card.power_limit_watts == 303.0
    assert card.clock_sm_max_hertz == 2482e6  # the top pp_dpm_sclk level, not the current one
    groups = {g.label: g for g in sample.groups}
    assert groups["game-100"].gpu_memory_bytes == {0: 2 * GIB}
    assert groups["python3-200"].gpu_memory_bytes == {0: 6 * GIB}  # resident, not the drm-memory alias
    assert groups["python3-200"].gpu_gtt_memory_bytes == {0: 8 * MIB}
    assert not groups["sshd-300"].gpu_memory_bytes


def test_apu_memory_is_in_gtt_and_shown_as_gtt(tmp_path):
    _, sample = sample_of(*build(tmp_path, "amd-apu"))
    (card,) = sample.gpus
    assert card.memory_total_bytes == 512 * MIB and card.gtt_memory_used_bytes == 4404019200
    assert card.memory_utilization_ratio is None  # APUs have no mem_busy_percent: absent, not 0
    assert card.power_watts == 9.0  # power1_input where power1_average is missing
    (group,) = [g for g in sample.groups if g.label == "llama-server-400"]
    assert group.gpu_memory_bytes == {0: 100 * MIB}  # legacy drm-memory-vram
    assert group.gpu_gtt_memory_bytes == {0: 3 * GIB}  # legacy drm-memory-gtt


def test_intel_xe_offers_what_its_sysfs_has(tmp_path):
    _, sample = sample_of(*build(tmp_path, "intel-xe"))
    (card,) = sample.gpus
    assert (card.vendor, card.memory_total_bytes) == ("intel", 16 * GIB)
    assert card.memory_used_bytes is None and card.utilization_ratio is None and card.temperature_celsius is None
    assert card.energy_joules == pytest.approx(1234.56789) and card.power_limit_watts == 190.0
    assert (card.clock_sm_hertz, card.clock_sm_max_hertz) == (2000e6, 2400e6)
    (group,) = [g for g in sample.groups if g.label == "blender-500"]
    assert group.gpu_memory_bytes == {0: 1536 * MIB} and group.gpu_gtt_memory_bytes == {0: 12 * MIB}


def test_one_client_is_counted_once_across_descriptors_and_processes(tmp_path):
    _, sample = sample_of(*build(tmp_path, "shared-client"))
    (card,) = sample.gpus
    by_pid = {p.pid: p for p in card.processes}
    assert by_pid[600].gpu_memory_bytes == 8 * GIB  # client 42 once (fds 5 and 9) + client 43
    assert 601 not in by_pid  # its inherited descriptor is the parent's client 42, already counted
    (group,) = [g for g in sample.groups if g.label == "python3-600"]
    assert group.gpu_memory_bytes == {0: 8 * GIB}


def test_a_driver_without_memory_keys_lists_the_client_with_unknown_memory(tmp_path):
    _, sample = sample_of(*build(tmp_path, "no-memory-keys"))
    (card,) = sample.gpus
    assert [(p.pid, p.gpu_memory_bytes, p.gtt_memory_bytes) for p in card.processes] == [(700, None, None)]
    assert card.memory_total_bytes is None and card.clock_sm_max_hertz == 1400e6
    assert all(not g.gpu_memory_bytes for g in sample.groups)


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [("4096", 4096), ("4 KiB", 4096), ("12 MiB", 12 * MIB), ("0", 0), ("12 MB", None), ("x KiB", None), ("", None)],
)
def test_sizes_in_fdinfo(text, expected):
    assert parse_size(text) == expected


def test_resident_wins_over_total_and_the_legacy_alias():
    c = parse_fdinfo(
        "drm-driver:\tamdgpu\ndrm-client-id:\t1\ndrm-memory-vram:\t10 MiB\ndrm-total-vram:\t8 MiB\n"
        "drm-resident-vram:\t6 MiB\ndrm-total-gtt:\t2 MiB\ndrm-resident-cpu:\t1 MiB\n"
    )
    assert (c.driver, c.client_id, c.vram_bytes, c.gtt_bytes) == ("amdgpu", "1", 6 * MIB, 2 * MIB)


def test_i915_local_regions_are_vram_and_system_memory_is_not():
    c = parse_fdinfo(
        "drm-driver:\ti915\ndrm-total-system0:\t5 MiB\ndrm-total-local0:\t7 MiB\ndrm-total-stolen-system0:\t0\n"
    )
    assert (c.vram_bytes, c.gtt_bytes) == (7 * MIB, None)


def test_a_descriptor_without_drm_keys_is_no_client():
    assert parse_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t15\n") is None


# --- which cards, which source -------------------------------------------------------------------


def test_auto_reads_nvidia_through_nvml_and_numbers_drm_cards_after_it(tmp_path):
    proc, sys_ = build(tmp_path, "amd-discrete")
    FakeSys(sys_).add_nvidia()
    cfg = validate_config({"paths": {"procfs": str(proc), "sysfs": str(sys_)}})
    source = open_gpu_source("auto", paths=cfg.paths)
    assert isinstance(source, CombinedSource) and [p.name for p in source.parts] == ["nvml", "drm"]
    reading = source.read(1.0)
    assert [(c.index, c.vendor) for c in reading.cards] == [(1, "amd")]  # gpu="0" is the NVIDIA card's
    assert not reading.up  # no NVIDIA driver here: NVML is down, and says so


def test_auto_without_other_cards_is_nvml_alone(tmp_path):
    sys_ = tmp_path / "sys"
    FakeSys(sys_).add_card("aspeed-bmc")
    source = open_gpu_source("auto", paths=validate_config({"paths": {"sysfs": str(sys_)}}).paths)
    assert source.name == "nvml"


def test_drm_backend_with_no_cards_is_down_without_errors(tmp_path):
    source = open_gpu_source("drm", paths=validate_config({"paths": {"sysfs": str(tmp_path)}}).paths)
    reading = source.read(1.0)
    assert (reading.cards, reading.up, reading.error) == ((), False, None)


def test_auto_leaves_a_card_of_another_driver_out_and_drm_reads_it(tmp_path):
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    _proc(proc)
    FakeSys(sys_).add_card("amd-discrete", uevent="DRIVER=virtio-pci\nPCI_SLOT_NAME=0000:03:00.0", vendor="0x1af4")
    paths = validate_config({"paths": {"procfs": str(proc), "sysfs": str(sys_)}}).paths
    assert open_gpu_source("auto", paths=paths).name == "nvml"
    (card,) = open_gpu_source("drm", paths=paths).read(1.0).cards
    assert card.vendor == "0x1af4" and card.name == "0x1af4 GPU 0x744c"


# --- cost and caching ----------------------------------------------------------------------------


def test_descriptors_are_resolved_once_per_process_and_again_for_a_new_process(tmp_path):
    proc, sys_ = build(tmp_path, "amd-discrete")
    source = DrmSource(str(proc), str(sys_))
    source.read(0.0)
    first = source.cost["readlink"]
    assert first == 12 + 1 + 30 + 1 + 8 + 6  # every descriptor of every process, once
    source.read(2.0)
    assert source.cost["readlink"] == 0 and source.cost["fdinfo"] == 2  # only the DRM descriptors are read again
    add_fd(proc / "300", 6, "/dev/dri/renderD128", "amdgpu-client42.fdinfo")  # sshd opens the card: a new number
    os.remove(proc / "100" / "fd" / "40")  # game closes it
    reading = source.read(4.0)
    assert source.cost["readlink"] == 1
    assert {p.pid for p in reading.cards[0].processes} == {200, 300}
    # PID 300 reused by another process (new start time): its descriptors are resolved afresh
    FakeProc(proc).add(300, "sshd", start=99_999)
    source.read(6.0)
    assert source.cost["readlink"] == 7


def test_a_reused_descriptor_number_is_caught_by_the_periodic_recheck(tmp_path):
    proc, sys_ = build(tmp_path, "amd-discrete")
    source = DrmSource(str(proc), str(sys_), recheck=10.0)
    source.read(0.0)
    fd = proc / "300" / "fd" / "3"
    fd.unlink()  # a socket closed and the number reused for the render node between two samples
    os.symlink("/dev/dri/renderD128", fd)
    client = (Path(__file__).parent / "fixtures" / "drm" / "amdgpu-client42.fdinfo").read_text()
    (proc / "300" / "fdinfo" / "3").write_text(client.replace("\t42", "\t77"))
    assert 300 not in {p.pid for p in source.read(0.5).cards[0].processes}  # the cache still says socket
    assert 300 in {p.pid for p in source.read(10.0).cards[0].processes}  # the recheck resolves it again


# --- other users' descriptors --------------------------------------------------------------------


def scan_as(uid: int, proc: Path, sys_: Path) -> tuple[int | None, list[int]]:
    """DrmSource.read() in a forked child running as `uid` (root drops to it for real; others stay themselves)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            (card,) = DrmSource(str(proc), str(sys_)).read(1.0).cards
            os.write(w, repr((card.unreadable_processes, sorted(p.pid for p in card.processes))).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    assert out, "the child failed"
    return eval(out)  # our own child's repr of ints


def test_processes_we_may_not_read_are_counted_unreadable_not_zero():
    """A real permission check: the scan runs as an unprivileged user over a tree where one process's
    fd/ is 0700 and owned by root (as /proc/PID/fd of another user is)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to own a directory the scanning user may not read")
    base = Path(tempfile.mkdtemp(prefix="drm-perm-"))
    try:
        proc, sys_ = base / "proc", base / "sys"
        tree_amd_discrete(proc, sys_)
        for d, _, files in os.walk(base):
            os.chmod(d, 0o755)
            for f in files:
                if not os.path.islink(os.path.join(d, f)):  # fd/N links point at /dev/null & co: never follow them
                    os.chmod(os.path.join(d, f), 0o644)
        assert scan_as(65534, proc, sys_) == (0, [100, 200])
        os.chmod(proc / "200" / "fd", 0o700)  # python3's descriptors: not ours to read
        assert scan_as(65534, proc, sys_) == (1, [100])  # PID 200: unknown, counted as unreadable
    finally:
        subprocess.run(["rm", "-rf", "--", str(base)], check=False)


OPENER = """
import sys
held = []
print(0, flush=True)  # started: no more descriptors come and go on their own
for line in sys.stdin:
    held.append(open("/dev/null"))
    print(len(held), flush=True)
"""


def opener_whose_first_recheck_comes_soonest() -> subprocess.Popen:
    """An OPENER whose pid is 60 mod 61: the PID stagger puts its first recheck at 1/61 of the period
    after first sight, the soonest any process gets one (with the default 60 s: 0.98 s)."""
    import sys

    for _ in range(1000):
        spent = subprocess.Popen(["true"])  # cheap pids, to reach the one before
        spent.wait()
        if spent.pid % 61 != 59:
            continue
        child = subprocess.Popen(
            [sys.executable, "-c", OPENER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        if child.pid % 61 == 60:
            return child
        child.kill()  # another process took that pid: again
        child.wait()
    raise AssertionError("no pid 60 mod 61 in 1000 tries")


def test_on_procfs_an_unchanged_descriptor_count_skips_the_listing_and_a_new_descriptor_does_not(monkeypatch):
    """On the real /proc (Linux 6.2+: fd/'s size is the descriptor count), with a process this test starts.

    The scans are 1 s apart, within a recheck period long enough that no process is due for its first
    periodic re-resolution (staggered by PID over the period): with the default 60 s period a child
    whose pid is 60 mod 61 was due after 0.98 s, listed again, and the test failed for 1 pid in 61."""
    from mem_exporter.gpu import drm

    if not drm.fd_dir_size_is_count("/proc"):
        pytest.skip("this kernel does not give fd/ a size (Linux before 6.2)")

    child = opener_whose_first_recheck_comes_soonest()
    try:
        assert child.stdout.readline().strip() == "0"
        listed: list[str] = []
        real_listdir = os.listdir
        monkeypatch.setattr(drm.os, "listdir", lambda p: (listed.append(str(p)), real_listdir(p))[1])
        source = DrmSource("/proc", "/nonexistent", recheck=3600.0)  # the soonest first recheck: after 59 s
        mine = f"/proc/{child.pid}/fd"
        source.scan_processes({}, {}, 0.0)
        assert mine in listed
        listed.clear()
        source.scan_processes({}, {}, 1.0)
        assert mine not in listed  # same count: the last listing stands
        child.stdin.write("open\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "1"
        listed.clear()
        source.scan_processes({}, {}, 2.0)
        assert mine in listed  # one more descriptor: listed again, the new one resolved
    finally:
        child.kill()
        child.wait()
