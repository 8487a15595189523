"""Container-aware grouping: container, pod and systemd unit from /proc/PID/cgroup, in every common layout."""

from pathlib import Path

import pytest
from helpers.procfs_builder import FakeProc
from prometheus_client.parser import text_string_to_metric_families

from mem_exporter.config import Groups, RuleMatch, load_config
from mem_exporter.containers import CgroupOwner, parse_container
from mem_exporter.enforcer.policy import selects
from mem_exporter.exposition import Exposition, SampleCollector, build_registry
from mem_exporter.grouping import group_processes
from mem_exporter.procfs import ProcfsReader, parse_cgroup
from mem_exporter.sampler import Sampler

FIXTURES = Path(__file__).with_name("fixtures") / "cgroup"
DOCKER = "3f4e9a1c2b7d8e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7"
K8S = "9c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d"
CRIO = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
PODMAN = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
POD = "5e8f2a1b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"

FIXTURE_CASES = [
    ("docker-v1", CgroupOwner("docker", DOCKER), f"docker/{DOCKER[:12]}"),
    ("docker-v2", CgroupOwner("docker", DOCKER), f"docker/{DOCKER[:12]}"),
    ("k8s-containerd-v1", CgroupOwner(None, K8S, POD), f"pod/{POD}/{K8S[:12]}"),
    ("k8s-containerd-v2", CgroupOwner("containerd", K8S, POD), f"pod/{POD}/{K8S[:12]}"),
    ("k8s-crio-v2", CgroupOwner("cri-o", CRIO, POD), f"pod/{POD}/{CRIO[:12]}"),
    ("podman-rootless-v2", CgroupOwner("podman", PODMAN), f"podman/{PODMAN[:12]}"),
    ("systemd-service-v1", CgroupOwner(unit="ollama.service"), "ollama.service"),
    ("systemd-service-v2", CgroupOwner(unit="ollama.service"), "ollama.service"),
    ("systemd-user-service-v2", CgroupOwner(unit="user@1000/pipewire.service"), "user@1000/pipewire.service"),
    ("host-session-v1", None, None),
    ("host-session-v2", None, None),
    ("host-init-v2", None, None),
]


@pytest.mark.parametrize("name,owner,label", FIXTURE_CASES, ids=[c[0] for c in FIXTURE_CASES])
def test_cgroup_files_give_container_pod_and_unit(name, owner, label):
    path = parse_cgroup((FIXTURES / name).read_bytes())
    assert parse_container(path) == owner
    if owner is not None:
        assert owner.label == label


@pytest.mark.parametrize(
    "path,owner",
    [
        # guaranteed QoS (no qos slice), a pod-level process, a static pod's hash UID
        (
            f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/cri-containerd-{K8S}.scope",
            CgroupOwner("containerd", K8S, POD),
        ),
        (f"/kubepods/besteffort/pod{POD}", CgroupOwner(pod=POD)),
        (f"/kubepods/burstable/pod{'ab' * 16}/{K8S}", CgroupOwner(None, K8S, "ab" * 16)),
        # seen from inside a cgroup namespace, and a kind node (Kubernetes inside a Docker container)
        (
            f"/../../kubepods-besteffort-pod{POD.replace('-', '_')}.slice/crio-{CRIO}.scope",
            CgroupOwner("cri-o", CRIO, POD),
        ),
        (f"/system.slice/docker-{DOCKER}.scope/kubepods/burstable/pod{POD}/{K8S}", CgroupOwner(None, K8S, POD)),
        (f"/system.slice/docker-{DOCKER}.scope/system.slice/kubelet.service", CgroupOwner("docker", DOCKER)),
        # podman on cgroup v1, nerdctl, and conmon (the monitor beside a CRI-O container, not in it)
        (f"/libpod_parent/libpod-{PODMAN}", CgroupOwner("podman", PODMAN)),
        (f"/system.slice/nerdctl-{K8S}.scope", CgroupOwner("containerd", K8S)),
        (f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-conmon-{CRIO}.scope", CgroupOwner(pod=POD)),
        ("/system.slice/crio-conmon-" + CRIO + ".scope", CgroupOwner(unit=f"crio-conmon-{CRIO}.scope")),
        # no ID to be had: the root, a namespaced view with nothing below it, a user manager itself
        ("/", None),
        ("", None),
        (None, None),
        ("/user.slice/user-1000.slice/user@1000.service/init.scope", None),
        ("/pod-not-kube/abc", None),
    ],
)
def test_more_layouts(path, owner):
    assert parse_container(path) == owner


def _tree(tmp_path) -> FakeProc:
    fp = FakeProc(tmp_path / "proc")
    read = lambda name: (FIXTURES / name).read_text()  # noqa: E731
    fp.add(10, "dockerd-app", rss_kb=100_000, cgroup=read("docker-v2"))
    fp.add(11, "worker", pgid=10, rss_kb=50_000, cgroup=read("docker-v2"))
    fp.add(12, "sidecar", rss_kb=30_000, cgroup=read("docker-v2"))  # own PGID, same container: one group
    fp.add(20, "python3", rss_kb=200_000, cgroup=read("k8s-containerd-v1"))
    fp.add(21, "python3", rss_kb=80_000, cgroup=read("k8s-crio-v2"))
    fp.add(30, "ollama", rss_kb=300_000, cgroup=read("systemd-service-v2"))
    fp.add(40, "bash", rss_kb=40_000, cgroup=read("host-session-v2"))
    fp.add(41, "make", pgid=40, rss_kb=60_000, cgroup=read("host-session-v2"))
    fp.add(50, "vim", rss_kb=20_000, cgroup=read("host-session-v2"))
    fp.add(60, "named-db", rss_kb=70_000, cgroup=read("docker-v1"))  # a named group wins over the container
    return fp


def test_grouping_by_container_through_a_synthetic_proc(tmp_path):
    fp = _tree(tmp_path)
    cfg = Groups.model_validate({"by": "container", "named": [{"name": "db", "match": {"comm": "^named-db$"}}]})
    procs, _ = ProcfsReader(str(fp.root), cgroup=True).read_processes()
    groups = {g.label: g for g in group_processes(procs, cfg)}
    assert set(groups) == {
        f"docker/{DOCKER[:12]}",
        f"pod/{POD}/{K8S[:12]}",
        f"pod/{POD}/{CRIO[:12]}",
        "ollama.service",
        "bash-40",
        "vim-50",
        "db",
    }
    docker = groups[f"docker/{DOCKER[:12]}"]
    assert (docker.kind, docker.processes, docker.rss_bytes) == ("container", 3, 180_000 * 1024)
    assert docker.key == f"container:docker/{DOCKER[:12]}" and docker.pgid is None
    assert groups["ollama.service"].kind == "unit"
    session = groups["bash-40"]  # outside any container: the PGID group, as with groups.by=pgid
    assert (session.kind, session.pgid, session.processes) == ("pgid", 40, 2)


def test_group_info_carries_container_and_pod_labels(tmp_path):
    fp = _tree(tmp_path)
    cfg = load_config(None, {"groups.by": "container", "paths.procfs": str(fp.root), "groups.min_memory": 0})
    sample = Sampler(cfg).tick()
    exposition = Exposition(build_registry(SampleCollector(lambda: sample, lambda: cfg.groups)))
    body, _ = exposition.render("")
    info = {
        s.labels["group"]: s.labels
        for fam in text_string_to_metric_families(body.decode())
        if fam.name == "mem_exporter_group_info"
        for s in fam.samples
    }
    assert info[f"pod/{POD}/{K8S[:12]}"] | {"leader": ""} == {
        "group": f"pod/{POD}/{K8S[:12]}",
        "kind": "container",
        "pgid": "",
        "leader": "",
        "container": K8S[:12],
        "pod": POD,
    }
    assert (info[f"docker/{DOCKER[:12]}"]["container"], info[f"docker/{DOCKER[:12]}"]["pod"]) == (DOCKER[:12], "")
    assert (info["ollama.service"]["kind"], info["ollama.service"]["container"]) == ("unit", "")
    assert (info["bash-40"]["kind"], info["bash-40"]["pgid"], info["bash-40"]["container"]) == ("pgid", "40", "")


def test_pgid_grouping_keeps_its_label_set(tmp_path):
    fp = _tree(tmp_path)
    cfg = load_config(None, {"paths.procfs": str(fp.root)})
    sample = Sampler(cfg).tick()
    body, _ = Exposition(build_registry(SampleCollector(lambda: sample, lambda: cfg.groups))).render("")
    (fam,) = [f for f in text_string_to_metric_families(body.decode()) if f.name == "mem_exporter_group_info"]
    assert {frozenset(s.labels) for s in fam.samples} == {frozenset({"group", "kind", "pgid", "leader"})}


def test_a_rule_selects_a_container_or_a_whole_pod_by_its_group_label(tmp_path):
    fp = _tree(tmp_path)
    procs, _ = ProcfsReader(str(fp.root), cgroup=True).read_processes()
    groups = group_processes(procs, Groups(by="container"))
    pick = lambda rx: sorted(g.label for g in groups if selects(RuleMatch(group=rx), g))  # noqa: E731
    assert pick(f"^pod/{POD}/") == [f"pod/{POD}/{K8S[:12]}", f"pod/{POD}/{CRIO[:12]}"]
    assert pick(f"^docker/{DOCKER[:6]}") == [f"docker/{DOCKER[:12]}"]
    assert pick(r"^ollama\.service$") == ["ollama.service"]
