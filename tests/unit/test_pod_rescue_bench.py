"""The Pod rescue benchmark's pure parts: percentiles, how a rescue is classified (proof or
heartbeat path), what a plain watch counts as the kubelet's report, the frozen container's
bound and the clock offset. Its figures are only as right as these."""

from __future__ import annotations

import datetime

import pytest

from benchmarks import pod_rescue

T0 = datetime.datetime(2026, 12, 7, 9, 0, tzinfo=datetime.UTC)


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def test_percentiles_are_nearest_rank_and_p99_of_fifty_is_the_maximum() -> None:
    values = [float(n) for n in range(1, 51)]  # 1..50, shuffled order must not matter
    shuffled = values[::2] + values[1::2]
    assert pod_rescue.percentile(shuffled, 0.5) in (25.0, 26.0)
    assert pod_rescue.percentile(shuffled, 0.9) == 45.0
    assert pod_rescue.percentile(shuffled, 0.99) == 50.0
    assert pod_rescue.percentile([3.0], 0.99) == 3.0


def test_spread_prints_each_percentile_and_the_count() -> None:
    line = pod_rescue.spread([1.0, 2.0, 3.0, 4.0])
    assert "max   4.00 s" in line and "(n=4)" in line
    assert pod_rescue.spread([]) == "none"


def test_an_ending_before_the_heartbeat_was_stale_is_proof() -> None:
    path = pod_rescue.rescue_path(
        ended_at=at(5.5),
        ended_reason="its container worker's instance 0123456789ab ended",
        heartbeat_at=at(0),
        heartbeat_timeout_seconds=20,
    )
    assert path == pod_rescue.PROOF


def test_the_guardians_record_before_silence_is_proof() -> None:
    path = pod_rescue.rescue_path(
        ended_at=at(1),
        ended_reason="killed by its worker's guardian after 10.2 s without a tick",
        heartbeat_at=at(0),
        heartbeat_timeout_seconds=20,
    )
    assert path == pod_rescue.PROOF


def test_a_pod_proof_found_only_once_the_heartbeat_was_stale_is_the_heartbeat_path() -> None:
    """Same reason text as a pod event's, but only the silent-worker check acts that late."""
    path = pod_rescue.rescue_path(
        ended_at=at(20.5),
        ended_reason="its container worker runs an instance started after it",
        heartbeat_at=at(0),
        heartbeat_timeout_seconds=20,
    )
    assert path == pod_rescue.AFTER_SILENCE


def test_the_no_heartbeat_rule_is_silence_whenever_it_ended() -> None:
    path = pod_rescue.rescue_path(
        ended_at=at(25),
        ended_reason="no heartbeat for 20.0 s: it stopped its own bodies",
        heartbeat_at=at(0),
        heartbeat_timeout_seconds=20,
    )
    assert path == pod_rescue.SILENCE


def test_an_incarnation_nobody_ended_is_not_ended() -> None:
    path = pod_rescue.rescue_path(
        ended_at=None, ended_reason=None, heartbeat_at=at(0), heartbeat_timeout_seconds=20
    )
    assert path == pod_rescue.NOT_ENDED


def test_a_kill_counts_as_proof_only_if_every_holder_was_ended_by_proof() -> None:
    assert pod_rescue.slowest_path([pod_rescue.PROOF, pod_rescue.PROOF]) == pod_rescue.PROOF
    assert (
        pod_rescue.slowest_path([pod_rescue.PROOF, pod_rescue.AFTER_SILENCE])
        == pod_rescue.AFTER_SILENCE
    )
    assert pod_rescue.slowest_path([pod_rescue.SILENCE, pod_rescue.NOT_ENDED]) == (
        pod_rescue.NOT_ENDED
    )
    assert pod_rescue.slowest_path([]) == pod_rescue.NOT_ENDED


def test_the_watch_counts_a_terminated_or_restarted_instance_as_reported_ended() -> None:
    running = {"running": {"startedAt": "2026-12-07T09:00:00Z"}}
    restarted = {
        "status": {
            "containerStatuses": [
                {
                    "name": "worker",
                    "containerID": "containerd://new",
                    "state": running,
                    "lastState": {
                        "terminated": {"exitCode": 137, "containerID": "containerd://old"}
                    },
                }
            ]
        }
    }
    terminated = {
        "status": {
            "containerStatuses": [
                {
                    "name": "worker",
                    "containerID": "containerd://old",
                    "state": {"terminated": {"exitCode": 137, "containerID": "containerd://old"}},
                }
            ]
        }
    }
    steady = {"status": {"containerStatuses": [{"name": "worker", "state": running}]}}
    assert pod_rescue.ended_container_ids(restarted) == {"containerd://old"}
    assert pod_rescue.ended_container_ids(terminated) == {"containerd://old"}
    assert pod_rescue.ended_container_ids(steady) == set()
    assert pod_rescue.ended_container_ids({"status": {}}) == set()


def test_the_frozen_containers_bound_adds_the_probes_settings_and_the_grace_period() -> None:
    probe = {"periodSeconds": 3, "timeoutSeconds": 2, "failureThreshold": 2}
    bound = pod_rescue.probe_kill_bound_seconds(
        heartbeat_timeout_seconds=20, probe=probe, grace_seconds=30
    )
    assert bound == 20 + 2 * 3 + 2 + 30
    # Kubernetes' defaults for what the probe leaves out: period 10 s, 3 failures, 1 s.
    assert pod_rescue.probe_kill_bound_seconds(
        heartbeat_timeout_seconds=20, probe={}, grace_seconds=30
    ) == (20 + 3 * 10 + 1 + 30)


def test_the_clock_offset_comes_from_the_tightest_round_trip() -> None:
    host = T0.timestamp()
    samples = [
        (host, at(0.5), host + 2.0),  # loose: would say the database is 0.5 s behind
        (host + 10, at(10.101), host + 10.002),  # tight: 0.1 s ahead, +/- 1 ms
    ]
    offset = pod_rescue.clock_offset(samples)
    assert offset.seconds == pytest.approx(0.1, abs=1e-6)
    assert offset.error_seconds == pytest.approx(0.001, abs=1e-6)
