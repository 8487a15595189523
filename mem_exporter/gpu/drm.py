"""AMD, Intel and other DRM cards: card readings from sysfs, per-process memory from DRM fdinfo.

Cards are `<sysfs>/class/drm/cardN` whose device has a render node. What each driver offers:
- amdgpu: `mem_info_vram_total/used`, `mem_info_gtt_total/used`, `gpu_busy_percent`, `mem_busy_percent`,
  `product_name`, `unique_id`, `pp_dpm_sclk/mclk` (the last level is the highest clock) and hwmon
  (`temp*_input` labelled edge, `power1_average` or `power1_input`, `power1_cap`, `freq1_input` sclk,
  `freq2_input` mclk);
- xe: `tile0/physical_vram_size_bytes`, `tile0/gt0/freq0/act_freq` and `rp0_freq`, hwmon `power1_max`,
  `energy1_input`;
- i915: `cardN/gt_act_freq_mhz`, `cardN/gt_RP0_freq_mhz`, hwmon as xe.
A value a driver does not offer is None (its series is absent), never zero.

Per process (Documentation/gpu/drm-usage-stats.rst): every descriptor whose `fd/N` link points into
`/dev/dri/` has `fdinfo/N` with `drm-driver`, `drm-pdev`, `drm-client-id` and memory per region:
`drm-resident-<region>`, else `drm-total-<region>`, else the older `drm-memory-<region>` (an alias of
total). VRAM regions: `vram` (amdgpu), `vramN` (xe), `localN` (i915); GTT: `gtt`. Values are bytes,
or carry a `KiB`/`MiB` unit.

Counting:
- One DRM client (`drm-client-id` on one `drm-pdev`) is counted once, however many descriptors or
  processes hold it (dup(), fork(), descriptor passing): it goes to the lowest PID that holds it.
- A buffer shared between clients (PRIME/dma-buf, e.g. an application's frame handed to the compositor)
  is in each client's resident and total figures, so per-process and per-group sums can exceed the
  card's `mem_info_vram_used`; the card figure is the authority for the card.
- Processes whose descriptors we may not read (other users', without CAP_SYS_PTRACE) are counted in
  `unreadable_processes` on every card: their use is unknown, not zero.

Cost: listing `fd/` of every process is the expensive part. Which descriptors are DRM is cached per
(pid, start time): only descriptors not seen before are resolved (readlink). Since Linux 6.2 the
size of `/proc/PID/fd` is the number of open descriptors: while it is unchanged (and not 0, as on
older kernels) the last listing is reused without listing again. A number closed and reopened
between two samples (POSIX gives the lowest free number, so usually the same one) keeps its old
verdict until the process's periodic re-resolution, every `recheck` seconds, staggered by PID.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from ..sample import GpuCard, GpuProcess
from .source import GpuReading

VENDORS = {"0x1002": "amd", "0x8086": "intel", "0x10de": "nvidia"}
_VENDOR_NAMES = {"amd": "AMD", "intel": "Intel", "nvidia": "NVIDIA"}
NVIDIA = "0x10de"
AUTO_DRIVERS = frozenset({"amdgpu", "i915", "xe"})  # `auto` leaves BMC and virtual display adapters out
RECHECK = 60.0  # seconds between full re-resolutions of a process's descriptors

_CARD = re.compile(r"^card\d+$")
_NODE = re.compile(r"^(card|renderD)\d+$")
_VRAM = re.compile(r"^(vram\d*|local\d+)$")
_UNITS = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_STATS = ("resident", "total", "memory")  # preferred first
_PF_KTHREAD = 0x00200000


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(path: str) -> int | None:
    text = _read(path)
    try:
        return None if text is None else int(text, 0)
    except ValueError:
        return None


def _scaled(value: int | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _top_level_mhz(path: str) -> float | None:
    """The highest level of amdgpu's `pp_dpm_*` ("0: 500Mhz\\n1: 2500Mhz *"), in hertz."""
    text = _read(path)
    levels = [float(m.group(1)) for m in re.finditer(r"^\s*\d+:\s*(\d+)\s*[Mm]hz", text or "", re.M)]
    return max(levels) * 1e6 if levels else None


def parse_size(value: str) -> int | None:
    """`4096`, `4 KiB`, `12 MiB` -> bytes; None for anything else."""
    number, _, unit = value.strip().partition(" ")
    factor = _UNITS.get(unit.strip())
    if factor is None or not number.isdigit():
        return None
    return int(number) * factor


@dataclass(frozen=True, slots=True)
class DrmClient:
    """What one `fdinfo/N` of a DRM descriptor says."""

    driver: str | None
    pdev: str | None
    client_id: str | None
    vram_bytes: int | None  # None: the driver reports no memory for this region kind
    gtt_bytes: int | None


def parse_fdinfo(text: str) -> DrmClient | None:
    """The DRM keys of one fdinfo file; None where it has none (not a DRM client)."""
    keys: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("drm-"):
            key, _, value = line.partition(":")
            keys[key] = value.strip()
    if not keys:
        return None
    memory: dict[str, dict[str, dict[str, int]]] = {"vram": {}, "gtt": {}}  # kind -> stat -> region -> bytes
    for key, value in keys.items():
        for stat in _STATS:
            prefix = f"drm-{stat}-"
            if key.startswith(prefix):
                region = key[len(prefix) :]
                kind = "vram" if _VRAM.match(region) else "gtt" if region == "gtt" else None
                size = parse_size(value)
                if kind is not None and size is not None:
                    memory[kind].setdefault(stat, {})[region] = size
    sums: dict[str, int | None] = {}
    for kind, by_stat in memory.items():
        reported = next((s for s in _STATS if s in by_stat), None)
        sums[kind] = None if reported is None else sum(by_stat[reported].values())
    return DrmClient(keys.get("drm-driver"), keys.get("drm-pdev"), keys.get("drm-client-id"), sums["vram"], sums["gtt"])


@dataclass
class _Card:
    key: str  # the device directory, resolved: one per card however many nodes it has
    node: str  # cardN
    index: int
    driver: str
    vendor_id: str
    pci_bus_id: str
    name: str
    uuid: str
    driver_version: str
    hwmon: str | None
    clock_sm_max_hertz: float | None
    clock_memory_max_hertz: float | None


@dataclass
class _Proc:
    fds: dict[str, bool] = field(default_factory=dict)  # descriptor number -> points into /dev/dri/
    listed: list[str] = field(default_factory=list)  # fd/ as last listed: unchanged, nothing to resolve
    drm: list[str] = field(default_factory=list)  # the DRM descriptors among them
    size: int = -1  # st_size of fd/ at that listing: the descriptor count on procfs (Linux 6.2+)
    resolved_at: float = 0.0


class DrmSource:
    """A GpuSource over DRM sysfs and fdinfo. Never raises from read()."""

    name = "drm"

    def __init__(
        self,
        procfs: str = "/proc",
        sysfs: str = "/sys",
        *,
        drivers: frozenset[str] | None = None,
        skip_vendors: frozenset[str] = frozenset(),
        index_offset: int = 0,
        recheck: float = RECHECK,
        log: logging.Logger | None = None,
    ):
        """`drivers`: only cards of these drivers (None: any card with a render node); `skip_vendors`:
        PCI vendor IDs left to another source; `index_offset`: the first `gpu` index (after NVML's)."""
        self.procfs, self.sysfs = procfs, sysfs
        self.drivers, self.skip_vendors = drivers, skip_vendors
        self.index_offset = index_offset
        self.recheck = recheck
        self._log = log or logging.getLogger("mem_exporter.gpu")
        self._indices: dict[str, int] = {}  # card key -> gpu index, kept for the life of the source
        self._cards: dict[str, _Card] = {}
        self._skipped: set[str] = set()  # card keys this source does not read (driver, vendor, no render node)
        self._procs: dict[tuple[int, int], _Proc] = {}
        self._counted: bool | None = None  # fd/'s size is its descriptor count here (procfs, Linux 6.2+)
        self._announced: str | None = None
        self.cost = {"stat": 0, "listdir": 0, "readlink": 0, "fdinfo": 0}  # syscalls of the last scan (bench)

    # -- the GpuSource protocol --

    def read(self, now: float) -> GpuReading:
        try:
            cards, nodes = self._discover()
        except OSError as e:
            self._note(f"DRM: {self.sysfs}/class/drm not readable ({e}): no DRM GPU metrics", logging.WARNING)
            return GpuReading((), False, None)
        if not cards:
            self._note(f"DRM: no DRM GPU under {self.sysfs}/class/drm", logging.INFO)
            return GpuReading((), False, None)
        try:
            processes, unreadable = self.scan_processes(cards, nodes, now)
        except OSError as e:  # procfs itself unreadable: cards without processes, and an error
            self._log.warning("DRM: scanning %s failed: %s", self.procfs, e)
            return GpuReading(
                tuple(self._read_card(c, (), None) for c in cards.values()),
                False,
                f"DRM: scanning {self.procfs} failed: {e}",
            )
        self._note(
            f"DRM: {len(cards)} card(s): " + ", ".join(f"{c.node} {c.driver} {c.pci_bus_id}" for c in cards.values()),
            logging.INFO,
        )
        out = tuple(self._read_card(c, processes.get(c.key, ()), unreadable) for c in cards.values())
        return GpuReading(tuple(sorted(out, key=lambda c: c.index)), True, None)

    def close(self) -> None:
        self._procs.clear()

    def card_count(self) -> int:
        """How many cards this source reads now (0 where sysfs has none or cannot be read)."""
        try:
            return len(self._discover()[0])
        except OSError:
            return 0

    def number_from(self, first: int) -> None:
        """Give this source's cards the `gpu` indices first, first+1, ... (after another source's)."""
        self.index_offset = first
        self._indices.clear()
        self._cards.clear()
        self._skipped.clear()

    def _note(self, message: str, level: int) -> None:
        if message != self._announced:
            self._announced = message
            self._log.log(level, "%s", message)

    # -- cards --

    def _discover(self) -> tuple[dict[str, _Card], dict[str, str]]:
        """The cards this source reads, by key, and every DRM node name (card0, renderD128) -> card key."""
        base = os.path.join(self.sysfs, "class", "drm")
        names = os.listdir(base)
        nodes: dict[str, str] = {}
        found: list[tuple[str, str, str]] = []  # (pci bus id or key, key, node)
        for name in names:
            if not _NODE.match(name):
                continue
            device = os.path.join(base, name, "device")
            if not os.path.isdir(device):
                continue
            key = os.path.realpath(device)
            nodes[name] = key
            if _CARD.match(name) and key not in self._cards and key not in self._skipped:
                found.append((self._slot(device) or key, key, name))
        for _, key, node in sorted(found):
            card = self._open_card(key, node, os.path.join(base, node))
            if card is None:
                self._skipped.add(key)
            else:
                self._cards[key] = card
        # a card gone from the bus is dropped (its index is not given to another)
        for key in [k for k in self._cards if k not in nodes.values()]:
            del self._cards[key]
        return self._cards, nodes

    def _slot(self, device: str) -> str:
        text = _read(os.path.join(device, "uevent")) or ""
        m = re.search(r"^PCI_SLOT_NAME=(\S+)$", text, re.M)
        return m.group(1) if m else ""

    def _open_card(self, key: str, node: str, card_dir: str) -> _Card | None:
        device = os.path.join(card_dir, "device")
        uevent = _read(os.path.join(device, "uevent")) or ""
        m = re.search(r"^DRIVER=(\S+)$", uevent, re.M)
        driver = m.group(1) if m else os.path.basename(os.path.realpath(os.path.join(device, "driver")))
        vendor_id = (_read(os.path.join(device, "vendor")) or "").lower()
        try:
            has_render = any(n.startswith("renderD") for n in os.listdir(os.path.join(device, "drm")))
        except OSError:
            has_render = False
        if (
            not has_render
            or vendor_id in self.skip_vendors
            or (self.drivers is not None and driver not in self.drivers)
        ):
            return None
        if key not in self._indices:
            self._indices[key] = self.index_offset + len(self._indices)
        device_id = (_read(os.path.join(device, "device")) or "").lower()
        vendor = VENDORS.get(vendor_id, vendor_id or "unknown")
        slot = self._slot(device)
        name = _read(os.path.join(device, "product_name")) or f"{_VENDOR_NAMES.get(vendor, vendor)} GPU {device_id}"
        version = (
            _read(os.path.join(self.sysfs, "module", driver, "version"))
            or _read(os.path.join(self.procfs, "sys", "kernel", "osrelease"))
            or ""
        )
        hwmon = None
        try:
            hwmon = os.path.join(device, "hwmon", sorted(os.listdir(os.path.join(device, "hwmon")))[0])
        except (OSError, IndexError):
            pass
        clock_max = memory_max = None
        if driver == "amdgpu":
            clock_max = _top_level_mhz(os.path.join(device, "pp_dpm_sclk"))
            memory_max = _top_level_mhz(os.path.join(device, "pp_dpm_mclk"))
        elif driver == "xe":
            clock_max = _scaled(_int(os.path.join(device, "tile0", "gt0", "freq0", "rp0_freq")), 1e6)
        elif driver == "i915":
            clock_max = _scaled(_int(os.path.join(card_dir, "gt_RP0_freq_mhz")), 1e6)
        card = _Card(
            key,
            node,
            self._indices[key],
            driver,
            vendor_id,
            slot,
            name,
            _read(os.path.join(device, "unique_id")) or slot or key,
            version,
            hwmon,
            clock_max,
            memory_max,
        )
        return card

    def _read_card(self, c: _Card, processes: tuple[GpuProcess, ...], unreadable: int | None) -> GpuCard:
        device = os.path.join(self.sysfs, "class", "drm", c.node, "device")

        def dev(*parts: str) -> int | None:
            return _int(os.path.join(device, *parts))

        def hw(name: str) -> int | None:
            return None if c.hwmon is None else _int(os.path.join(c.hwmon, name))

        total, used = dev("mem_info_vram_total"), dev("mem_info_vram_used")
        if total is None and c.driver == "xe":
            total = dev("tile0", "physical_vram_size_bytes")
        busy, mem_busy = dev("gpu_busy_percent"), dev("mem_busy_percent")
        clock: float | None = None
        memory_clock: float | None = None
        if c.driver == "amdgpu":
            clock, memory_clock = hw("freq1_input"), hw("freq2_input")  # Hz
        elif c.driver == "xe":
            clock = _scaled(dev("tile0", "gt0", "freq0", "act_freq"), 1e6)
        elif c.driver == "i915":
            clock = _scaled(_int(os.path.join(self.sysfs, "class", "drm", c.node, "gt_act_freq_mhz")), 1e6)
        power = hw("power1_average")
        if power is None:
            power = hw("power1_input")
        cap = hw("power1_cap")
        if cap is None:
            cap = hw("power1_max")
        return GpuCard(
            index=c.index,
            uuid=c.uuid,
            name=c.name,
            driver_version=c.driver_version,
            vendor=VENDORS.get(c.vendor_id, c.vendor_id),
            pci_bus_id=c.pci_bus_id,
            memory_total_bytes=total,
            memory_used_bytes=used,
            memory_free_bytes=None if total is None or used is None else total - used,
            utilization_ratio=None if busy is None else busy / 100,
            memory_utilization_ratio=None if mem_busy is None else mem_busy / 100,
            temperature_celsius=_scaled(self._temperature(c), 1e-3),
            power_watts=_scaled(power, 1e-6),
            power_limit_watts=_scaled(cap, 1e-6),
            energy_joules=_scaled(hw("energy1_input"), 1e-6),
            clock_sm_hertz=None if clock is None else float(clock),
            clock_memory_hertz=None if memory_clock is None else float(memory_clock),
            clock_sm_max_hertz=c.clock_sm_max_hertz,
            clock_memory_max_hertz=c.clock_memory_max_hertz,
            gtt_memory_total_bytes=dev("mem_info_gtt_total"),
            gtt_memory_used_bytes=dev("mem_info_gtt_used"),
            processes=tuple(processes),
            unreadable_processes=unreadable,
        )

    def _temperature(self, c: _Card) -> int | None:
        """millidegrees: the sensor labelled `edge` (amdgpu) or `pkg`, else temp1."""
        if c.hwmon is None:
            return None
        try:
            names = os.listdir(c.hwmon)
        except OSError:
            return None
        for n in sorted(names):
            if n.startswith("temp") and n.endswith("_label") and _read(os.path.join(c.hwmon, n)) in ("edge", "pkg"):
                return _int(os.path.join(c.hwmon, n[:-6] + "_input"))
        return _int(os.path.join(c.hwmon, "temp1_input"))

    # -- processes --

    def scan_processes(
        self, cards: dict[str, _Card], nodes: dict[str, str], now: float
    ) -> tuple[dict[str, tuple[GpuProcess, ...]], int]:
        """Per card key, the processes holding DRM clients on it; and how many processes were unreadable."""
        slots = {c.pci_bus_id: key for key, c in cards.items() if c.pci_bus_id}
        cost = dict.fromkeys(self.cost, 0)
        seen_clients: set[tuple[str, str]] = set()
        usage: dict[str, dict[int, list[int | None]]] = {}  # card key -> pid -> [vram, gtt]
        alive: set[tuple[int, int]] = set()
        unreadable = 0
        procfs = self.procfs
        if self._counted is None:
            self._counted = fd_dir_size_is_count(procfs)
        pids = sorted(int(d) for d in os.listdir(procfs) if d.isdigit())  # lowest PID first: it owns shared clients
        for pid in pids:
            cost["stat"] += 1
            ident = self._identity(pid)
            if ident is None:
                continue  # gone, or a kernel thread
            alive.add(ident)
            fd_dir = f"{procfs}/{pid}/fd"
            proc = self._proc(ident, now)
            skipped = self._resolve_fds(proc, fd_dir, cost)
            if skipped:
                unreadable += skipped == "unreadable"
                continue
            denied = False
            for n in proc.drm:
                cost["fdinfo"] += 1
                try:
                    with open(f"{procfs}/{pid}/fdinfo/{n}") as f:
                        client = parse_fdinfo(f.read())
                except PermissionError:
                    denied = True
                    continue
                except OSError:
                    continue
                if client is None:
                    continue
                key = slots.get(client.pdev or "") or self._card_of_node(fd_dir, n, nodes)
                if key is None or key not in cards:
                    continue  # a card this source leaves to another (NVIDIA under auto) or does not know
                if client.client_id is not None:
                    ck = (key, client.client_id)
                    if ck in seen_clients:
                        continue  # another descriptor (or a lower PID) holds this client: counted once
                    seen_clients.add(ck)
                _add_usage(usage.setdefault(key, {}).setdefault(pid, [None, None]), client)
            if denied:
                unreadable += 1
        for ident in [i for i in self._procs if i not in alive]:
            del self._procs[ident]
        self.cost = cost
        out = {
            key: tuple(GpuProcess(pid, v[0], "drm", v[1]) for pid, v in sorted(per_pid.items()))
            for key, per_pid in usage.items()
        }
        return out, unreadable

    def _proc(self, ident: tuple[int, int], now: float) -> _Proc:
        """What is kept about the process `ident` (pid, start time); forgotten each `recheck` seconds."""
        proc = self._procs.get(ident)
        if proc is None:
            # the first recheck is staggered by PID so that rechecks spread over ticks instead of
            # every process started together being resolved again on one tick
            proc = self._procs[ident] = _Proc(resolved_at=now - (ident[0] % 61) / 61 * self.recheck)
        elif now - proc.resolved_at >= self.recheck:
            proc.fds, proc.listed, proc.size = {}, [], -1
            proc.resolved_at = now
        return proc

    def _resolve_fds(self, proc: _Proc, fd_dir: str, cost: dict[str, int]) -> str | None:
        """Brings `proc.drm` up to date with fd/; None, or why the process is skipped: "exited" or "unreadable"."""
        size = 0
        if self._counted:
            try:
                size = os.stat(fd_dir).st_size
            except OSError:
                return "exited"
        if size and size == proc.size:
            listed = proc.listed  # as many descriptors as at the last listing: the same ones (see above)
        else:
            try:
                cost["listdir"] += 1
                listed = os.listdir(fd_dir)
            except PermissionError:
                return "unreadable"
            except OSError:
                return "exited"
            proc.size = size
        if listed != proc.listed:  # one C-level comparison; listdir order is stable
            proc.listed = listed
            proc.fds = _resolve_links(proc.fds, listed, fd_dir, cost)
            proc.drm = [n for n, is_drm in proc.fds.items() if is_drm]
        return None

    def _identity(self, pid: int) -> tuple[int, int] | None:
        """(pid, start time) from stat; None for a process that is gone or a kernel thread."""
        try:
            with open(f"{self.procfs}/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            return None
        fields = data[data.rfind(b")") + 2 :].split()
        try:
            if int(fields[6]) & _PF_KTHREAD:
                return None
            return pid, int(fields[19])
        except (IndexError, ValueError):
            return None

    @staticmethod
    def _card_of_node(fd_dir: str, n: str, nodes: dict[str, str]) -> str | None:
        """The card key of the DRM node descriptor `n` points to (a client whose fdinfo names no PCI device)."""
        try:
            target = os.path.basename(os.readlink(f"{fd_dir}/{n}"))
        except OSError:
            return None
        return nodes.get(target) if target else None


def _resolve_links(fds: dict[str, bool], listed: list[str], fd_dir: str, cost: dict[str, int]) -> dict[str, bool]:
    """Descriptor number -> whether it points into /dev/dri/, for the `listed` ones; `fds` holds those known."""
    fresh = {}
    for n in listed:
        known = fds.get(n)
        if known is None:
            cost["readlink"] += 1
            try:
                known = os.readlink(f"{fd_dir}/{n}").startswith("/dev/dri/")
            except PermissionError:
                known = False
            except OSError:
                continue
        fresh[n] = known
    return fresh


def _add_usage(per_pid: list[int | None], client: DrmClient) -> None:
    """Adds a client's [vram, gtt] to its process's; a size the client does not report leaves the sum as it is."""
    for i, value in enumerate((client.vram_bytes, client.gtt_bytes)):
        if value is not None:
            per_pid[i] = (per_pid[i] or 0) + value


def fd_dir_size_is_count(procfs: str) -> bool:
    """Whether `procfs` is a procfs whose fd/ directories have the descriptor count as their size (6.2+).

    Checked on our own fd/: a fixture tree (no entry for us) or another file system says no."""
    fd_dir = f"{procfs}/{os.getpid()}/fd"
    try:
        for _ in range(20):  # another thread may open or close a descriptor in between: try again
            size = os.stat(fd_dir).st_size
            count = len(os.listdir(fd_dir)) - 1  # the listing's own descriptor
            if size and size == count:
                return True
    except OSError:
        pass
    return False


def nvidia_display_devices(sysfs: str) -> int | None:
    """NVIDIA display controllers on the PCI bus (NVML numbers them 0..n-1); None where sysfs cannot tell."""
    base = os.path.join(sysfs, "bus", "pci", "devices")
    try:
        names = os.listdir(base)
    except OSError:
        return None
    count = 0
    for n in names:
        if (_read(os.path.join(base, n, "vendor")) or "").lower() == NVIDIA and (
            _read(os.path.join(base, n, "class")) or ""
        ).startswith("0x03"):
            count += 1
    return count
