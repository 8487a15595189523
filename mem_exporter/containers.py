"""Container, Kubernetes pod and systemd unit identities from a process's cgroup path.

`parse_container("/kubepods.slice/.../cri-containerd-<64 hex>.scope")` returns who owns
the process: runtime, container ID, pod UID, or the systemd unit for a host service.
Only the path is read, so it works for any runtime without talking to its API, and
the IDs match what `docker ps`, `crictl ps` and `kubectl get pod -o yaml` show.

Paths are parsed segment by segment, so layouts seen from inside a cgroup namespace
(`/../../kubepods-...slice/...`) and nested runtimes (kind: a node in a Docker
container) work too; the innermost container and pod win.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

SHORT_ID = 12  # `docker ps` length; unique enough on one host

_RUNTIME_PREFIX = {
    "docker": "docker",
    "cri-containerd": "containerd",
    "crio": "cri-o",
    "libpod": "podman",
    "nerdctl": "containerd",
}
# docker-<id>.scope (systemd driver), libpod-<id> (podman on v1); crio-conmon-<id> is the monitor, not the container
_SCOPED_ID = re.compile(r"^(docker|cri-containerd|crio|libpod|nerdctl)-([0-9a-f]{64})(?:\.scope)?$")
_BARE_ID = re.compile(r"^[0-9a-f]{64}$")
# pod<uid> (cgroupfs driver) or kubepods-<qos>-pod<uid with _ for ->.slice (systemd driver); static pods have 32 hex
_POD = re.compile(
    r"^(?:kubepods(?:-[a-z]+)*-)?pod([0-9a-f]{8}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}"
    r"[-_]?[0-9a-f]{12})(?:\.slice)?$"
)
_USER_MANAGER = re.compile(r"^user@(\d+)\.service$")
# units that hold unrelated work (a login session, PID 1): their processes keep their PGID groups
_NOT_A_GROUP = re.compile(r"^(init\.scope|session-.+\.scope|user@\d+\.service|user-runtime-dir@\d+\.service)$")


@dataclass(frozen=True, slots=True)
class CgroupOwner:
    runtime: str | None = None  # docker | containerd | cri-o | podman | None (a bare ID: runtime unknown)
    container: str | None = None  # full container ID
    pod: str | None = None  # Kubernetes pod UID, with dashes
    unit: str | None = None  # systemd unit; `user@1000/app.service` for a user's own units

    @property
    def kind(self) -> str:
        return "unit" if self.unit else "container"

    @property
    def short_container(self) -> str | None:
        return self.container[:SHORT_ID] if self.container else None

    @property
    def label(self) -> str:
        """The `group` label: bounded (one per container, pod or unit) and readable."""
        if self.pod:
            return f"pod/{self.pod}/{self.short_container}" if self.container else f"pod/{self.pod}"
        if self.container:
            return f"{self.runtime or 'container'}/{self.short_container}"
        return self.unit or ""


@lru_cache(maxsize=8192)
def parse_container(cgroup_path: str | None) -> CgroupOwner | None:
    """Who owns a process in this cgroup, or None for a plain host process (no container, pod or service)."""
    if not cgroup_path:
        return None
    segments = [s for s in cgroup_path.split("/") if s and s != ".."]
    kube = any(s.startswith("kubepods") for s in segments)
    runtime = container = pod = None
    for i, seg in enumerate(segments):
        if m := _SCOPED_ID.match(seg):
            runtime, container = _RUNTIME_PREFIX[m.group(1)], m.group(2)
        elif _BARE_ID.match(seg):
            parent = segments[i - 1] if i else ""
            runtime, container = ("docker" if parent == "docker" else None), seg
        elif kube and (m := _POD.match(seg)):
            pod, runtime, container = _dashed(m.group(1)), None, None  # a container must sit below its pod
    if container or pod:
        return CgroupOwner(runtime=runtime, container=container, pod=pod)
    return _unit(segments)


def _unit(segments: list[str]) -> CgroupOwner | None:
    """The innermost systemd service or scope, unless it is a session, PID 1 or a user manager."""
    for i in range(len(segments) - 1, -1, -1):
        seg = segments[i]
        if not seg.endswith((".service", ".scope")):
            continue
        if _NOT_A_GROUP.match(seg):
            return None
        manager = next(
            (m.group(0)[: -len(".service")] for s in reversed(segments[:i]) if (m := _USER_MANAGER.match(s))), None
        )
        return CgroupOwner(unit=f"{manager}/{seg}" if manager else seg)
    return None


def _dashed(uid: str) -> str:
    return uid.replace("_", "-")  # the systemd driver writes the UID's dashes as _


def group_ids(cgroup_path: str | None) -> tuple[str, str]:
    """(`container`, `pod`) label values for group_info: the short container ID and the pod UID, or ''."""
    owner = parse_container(cgroup_path)
    if owner is None:
        return "", ""
    return owner.short_container or "", owner.pod or ""
