"""Writes synthetic /sys trees with DRM cards (tests/fixtures/drm/*.yaml), and DRM descriptors in /proc trees.

The layout is the kernel's: the PCI device directory under devices/, its drm/cardN and drm/renderDN,
class/drm/cardN -> that drm/cardN, cardN/device -> the PCI device, bus/pci/devices/SLOT -> the device.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from helpers.paths import FIXTURES

DRM_FIXTURES = FIXTURES / "drm"


class FakeSys:
    def __init__(self, root: Path):
        self.root = Path(root)
        for d in ("class/drm", "bus/pci/devices", "devices/pci0000:00"):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    def add_card(
        self, fixture: str, *, slot: str | None = None, minor: int | None = None, **overrides: str | None
    ) -> Path:
        """A card from tests/fixtures/drm/FIXTURE.yaml; `overrides` replace (or, None, remove) device files."""
        spec = yaml.safe_load((DRM_FIXTURES / f"{fixture}.yaml").read_text())
        slot = slot or spec["slot"]
        minor = spec["minor"] if minor is None else minor
        device = self.root / "devices" / "pci0000:00" / slot
        files = {**spec.get("device", {}), **{k.replace("__", "/"): v for k, v in overrides.items()}}
        if slot != spec["slot"]:
            files["uevent"] = files["uevent"].replace(spec["slot"], slot)
        for rel, text in files.items():
            if text is None:
                continue
            path = device / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(text).rstrip("\n") + "\n")
        nodes = [f"card{minor}"] + ([f"renderD{128 + minor}"] if spec.get("render", True) else [])
        for node in nodes:
            d = device / "drm" / node
            d.mkdir(parents=True, exist_ok=True)
            os.symlink("../..", d / "device")
            os.symlink(os.path.relpath(d, self.root / "class" / "drm"), self.root / "class" / "drm" / node)
        for rel, text in spec.get("card", {}).items():
            (device / "drm" / f"card{minor}" / rel).write_text(str(text) + "\n")
        bus = self.root / "bus" / "pci" / "devices"
        os.symlink(os.path.relpath(device, bus), bus / slot)
        return device

    def add_nvidia(self, slot: str = "0000:41:00.0") -> Path:
        """An NVIDIA display controller on the PCI bus (no DRM card: nvidia-drm not loaded)."""
        device = self.root / "devices" / "pci0000:00" / slot
        device.mkdir(parents=True)
        (device / "vendor").write_text("0x10de\n")
        (device / "class").write_text("0x030200\n")
        bus = self.root / "bus" / "pci" / "devices"
        os.symlink(os.path.relpath(device, bus), bus / slot)
        return device


def add_fd(proc_dir: Path, fd: int, target: str, fdinfo: str) -> None:
    """Descriptor `fd` of the process at `proc_dir`: fd/N -> target, fdinfo/N from tests/fixtures/drm/FDINFO."""
    (proc_dir / "fd").mkdir(exist_ok=True)
    (proc_dir / "fdinfo").mkdir(exist_ok=True)
    os.symlink(target, proc_dir / "fd" / str(fd))
    (proc_dir / "fdinfo" / str(fd)).write_text((DRM_FIXTURES / fdinfo).read_text())


def add_plain_fds(proc_dir: Path, count: int, first: int = 0) -> None:
    """`count` descriptors that are not DRM devices: files, sockets, pipes, as a real process has."""
    (proc_dir / "fd").mkdir(exist_ok=True)
    (proc_dir / "fdinfo").mkdir(exist_ok=True)
    kinds = ("/dev/null", "socket:[{}]", "pipe:[{}]", "/var/log/app-{}.log", "anon_inode:[eventpoll]")
    for n in range(first, first + count):
        os.symlink(kinds[n % len(kinds)].format(40000 + n), proc_dir / "fd" / str(n))
        (proc_dir / "fdinfo" / str(n)).write_text("pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t4242\n")
