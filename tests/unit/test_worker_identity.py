"""The container-identity reader of the worker (``celery_reconciler_worker.identity``) on the
files a process sees under cgroup v1 and v2, with both cgroup drivers, in and out of pods."""

from __future__ import annotations

import datetime
import os
import string

from hypothesis import given
from hypothesis import strategies as st

from celery_reconciler_worker import identity

UID = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
CONTAINER = "3f" * 32
SANDBOX = "5a" * 32

CGROUP_V1_CGROUPFS = f"""12:memory:/kubepods/burstable/pod{UID}/{CONTAINER}
11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CONTAINER}
1:name=systemd:/kubepods/burstable/pod{UID}/{CONTAINER}
0::/
"""
UNDERSCORED = UID.replace("-", "_")
CGROUP_V1_SYSTEMD = (
    "4:pids:/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{UNDERSCORED}.slice/cri-containerd-{CONTAINER}.scope\n"
    "1:name=systemd:/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{UNDERSCORED}.slice/cri-containerd-{CONTAINER}.scope\n"
)
CGROUP_V2_HOST_NAMESPACE = (
    "0::/kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{UNDERSCORED}.slice/cri-containerd-{CONTAINER}.scope\n"
)
CGROUP_V2_PRIVATE_NAMESPACE = "0::/\n"
CGROUP_DOCKER = f"0::/system.slice/docker-{CONTAINER}.scope\n"
CGROUP_V1_DOCKER = f"4:memory:/docker/{CONTAINER}\n"
CGROUP_NOT_KUBERNETES = "0::/user.slice/user-1000.slice/session-2.scope\n"
CGROUP_OTHER_POD = (
    f"4:memory:/kubepods/burstable/pod11111111-2222-4333-8444-555555555555/{CONTAINER}\n"
)

HOSTNAME_SOURCE = f"/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/hostname"
MOUNTINFO_V1 = f"""1200 1100 0:98 / / rw,relatime - overlay overlay rw
1300 1200 0:31 /kubepods/burstable/pod{UID}/{CONTAINER} /sys/fs/cgroup/memory ro - cgroup c rw
1301 1200 254:1 /var/lib/kubelet/pods/{UID}/etc-hosts /etc/hosts rw - ext4 /dev/vda1 rw
1302 1200 254:1 {HOSTNAME_SOURCE} /etc/hostname rw - ext4 /dev/vda1 rw
"""
MOUNTINFO_V2_PRIVATE = f"""1200 1100 0:98 / / rw,relatime - overlay overlay rw
1300 1200 0:31 / /sys/fs/cgroup ro - cgroup2 cgroup rw
1302 1200 254:1 {HOSTNAME_SOURCE} /etc/hostname rw - ext4 /dev/vda1 rw
"""


def test_the_container_id_shows_in_a_pods_cgroup_path_with_either_driver() -> None:
    for text in (CGROUP_V1_CGROUPFS, CGROUP_V1_SYSTEMD, CGROUP_V2_HOST_NAMESPACE):
        assert identity.container_id_from_cgroup(text, pod_uid=UID) == CONTAINER, text


def test_no_container_id_without_our_pod_in_the_path() -> None:
    for text in (
        CGROUP_V2_PRIVATE_NAMESPACE,
        CGROUP_DOCKER,
        CGROUP_V1_DOCKER,
        CGROUP_NOT_KUBERNETES,
        CGROUP_OTHER_POD,
        "",
    ):
        assert identity.container_id_from_cgroup(text, pod_uid=UID) is None, text


def test_the_mount_table_shows_the_id_where_the_namespace_does_not_hide_it() -> None:
    assert identity.container_id_from_mountinfo(MOUNTINFO_V1, pod_uid=UID) == CONTAINER
    # The sandbox's id in /etc/hostname's source is the pod's, never the container's.
    assert identity.container_id_from_mountinfo(MOUNTINFO_V2_PRIVATE, pod_uid=UID) is None


@given(
    uid=st.uuids().map(str),
    container=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    qos=st.sampled_from(["", "burstable/", "besteffort/"]),
    hierarchies=st.lists(st.sampled_from(["memory", "cpu,cpuacct", "pids", ""]), min_size=1),
)
def test_any_cgroupfs_path_of_a_pod_gives_its_container_back(
    uid: str, container: str, qos: str, hierarchies: list[str]
) -> None:
    text = "".join(
        f"{index}:{names}:/kubepods/{qos}pod{uid}/{container}\n"
        for index, names in enumerate(hierarchies)
    )
    assert identity.container_id_from_cgroup(text, pod_uid=uid) == container
    other = "00000000-0000-4000-8000-000000000000"
    if other != uid:
        assert identity.container_id_from_cgroup(text, pod_uid=other) is None


def stat_line(*, comm: str, start_ticks: int) -> str:
    after = ["S", "0", "1", "1", "0", "-1", "4194560"] + ["0"] * 12 + [str(start_ticks)]
    return f"1 ({comm}) " + " ".join([*after, "1234567", "890"]) + "\n"


def test_the_start_is_read_after_the_last_parenthesis_of_comm() -> None:
    for comm in ("celery", "my worker", "a) (b", ")) ((", "x) S 1 2 3"):
        assert identity.start_ticks_from_stat(stat_line(comm=comm, start_ticks=987654)) == 987654


@given(
    comm=st.text(alphabet=string.printable.replace("\n", ""), max_size=15),
    start_ticks=st.integers(min_value=0, max_value=2**63),
)
def test_any_comm_leaves_the_start_readable(comm: str, start_ticks: int) -> None:
    assert identity.start_ticks_from_stat(stat_line(comm=comm, start_ticks=start_ticks)) == (
        start_ticks
    )


def test_the_start_on_the_nodes_clock_is_boot_plus_ticks() -> None:
    proc_stat = "cpu  1 2 3 4\nctxt 99\nbtime 1765000000\nprocesses 12\n"
    boot = identity.boot_time_from_proc_stat(proc_stat)
    assert identity.started_at(start_ticks=12345, boot_time=boot, ticks_per_second=100) == (
        datetime.datetime(2025, 12, 6, 5, 46, 40, tzinfo=datetime.UTC)
        + datetime.timedelta(seconds=123.45)
    )


def test_only_a_container_of_the_pod_may_read_its_start_from_pid_1() -> None:
    for text in (CGROUP_V1_CGROUPFS, CGROUP_V1_SYSTEMD, CGROUP_V2_PRIVATE_NAMESPACE):
        assert identity.in_a_container_of(text, pod_uid=UID), text
    # The host (a worker given a pod's variables by hand, or by a test bed) is not one.
    host_v1 = "4:memory:/\n3:cpu,cpuacct:/\n1:name=systemd:/\n"
    for text in (host_v1, CGROUP_NOT_KUBERNETES, CGROUP_OTHER_POD, CGROUP_DOCKER, ""):
        assert not identity.in_a_container_of(text, pod_uid=UID), text


def test_the_pods_pause_process_is_recognised() -> None:
    assert identity.is_pause(b"/pause\0")
    assert identity.is_pause(b"/pause")
    assert not identity.is_pause(b"/usr/local/bin/celery\0-A\0demo\0worker\0")
    assert not identity.is_pause(b"python\0-m\0pause_worker\0")


def test_this_process_reads_its_own_start_as_the_kernel_reports_it() -> None:
    ticks = identity.process_start_ticks(os.getpid())
    assert ticks is not None and ticks > 0
    assert identity.process_start_ticks(2**22 + 1) is None


def test_outside_a_pod_there_is_no_identity_to_claim() -> None:
    assert identity.container_id(None) is None
    assert identity.container_started_at(None) is None
