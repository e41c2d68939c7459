"""An operator that kopf leaves serving nothing exits and says why (``served``).

kopf lists the resources it serves once, at its start; if the apiserver did not list our
CRDs then (restarting, or not installed), kopf serves nothing and never looks again unless
a CRD changes. A chaos run found operators in that state, healthy and idle. Each test here
starts a control plane of its own: the session's has the CRDs installed.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_reconciler import served
from devstack import kube as devstack_kube
from devstack import operators

WATCH_STARTED = "Starting the watch-stream for processingpolicies.v1alpha1.celery-reconciler.io"


@pytest.fixture
def bare_plane(tmp_path: Path) -> Iterator[devstack_kube.ControlPlane]:
    """A control plane without our CRDs."""
    plane = devstack_kube.start(tmp_path / "kube", controller_manager=False)
    try:
        yield plane
    finally:
        plane.stop()


def test_an_operator_started_where_policies_are_not_served_exits_and_says_why(
    bare_plane: devstack_kube.ControlPlane, tmp_path: Path
) -> None:
    operator = operators.start(bare_plane, log_dir=tmp_path, namespaces=("default",))
    try:
        assert operator.process.popen is not None
        returncode = operator.process.popen.wait(timeout=served.GRACE_SECONDS + 60)
    finally:
        operator.stop()
    log = operator.process.log_path.read_text()
    assert returncode == 1, log[-3000:]
    assert "kopf does not serve processingpolicies.celery-reconciler.io" in log
    assert WATCH_STARTED not in log


def test_crds_created_just_after_the_operator_started_are_served(
    bare_plane: devstack_kube.ControlPlane, tmp_path: Path
) -> None:
    # ``kubectl apply -f manifests/`` creates the CRDs beside the Deployment: kopf's CRD
    # watch must pick them up within the grace period, and the operator stay.
    operator = operators.start(bare_plane, log_dir=tmp_path, namespaces=("default",))
    try:
        bare_plane.install_crds()
        deadline = time.monotonic() + 60
        while WATCH_STARTED not in operator.process.log_path.read_text():
            assert time.monotonic() < deadline, "kopf never watched ProcessingPolicies"
            assert operator.process.running(), operator.process.log_path.read_text()[-3000:]
            time.sleep(0.2)
        assert operator.process.popen is not None
        with pytest.raises(subprocess.TimeoutExpired):
            # Past the guard's grace period, counted from kopf's first listing.
            operator.process.popen.wait(timeout=served.GRACE_SECONDS + 5)
    finally:
        operator.stop()
    assert "kopf does not serve" not in operator.process.log_path.read_text()
