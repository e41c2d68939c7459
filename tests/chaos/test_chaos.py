"""The chaos driver's small fixed-seed run, inside ``make test``.

Every fault kind of ``devstack.chaos`` twice — worker freezes and GIL-holding bodies among
them — under a backlog of 300 entries, on the session's stack (its PostgreSQL and
kube-apiserver are restarted along the way and left running). ``make chaos`` runs the same
driver at full size with a random seed. The run fails, with its figures printed, when an
entry is lost, an effect is duplicated, two runs of an entry overlap (frozen and GIL-bound
runs included), a plain write lands after its entry moved on, or processing stops; latency
is printed, never asserted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack import chaos
from devstack import kube as devstack_kube
from devstack import node as devstack_node
from devstack import postgres as devstack_postgres

pytestmark = pytest.mark.chaos

SEED = 20261125


@pytest.mark.timeout(900)
def test_a_fixed_seed_of_every_fault_kind_loses_nothing_and_never_runs_twice(
    kube: devstack_kube.ControlPlane,
    node: devstack_node.Node,
    postgres: devstack_postgres.PostgresServer,
    tmp_path: Path,
) -> None:
    figures = chaos.run(
        chaos.Stack(plane=kube, node=node, postgres=postgres, workdir=tmp_path),
        chaos.Settings(seed=SEED, entries=300, faults_per_kind=2, long_faults_per_kind=2),
    )
    assert figures.violations == []
    # A GIL hold with no pending entry left to arm adds one at the head of the queue.
    assert figures.processed == figures.entries >= 300
    assert figures.overlaps == 0
    assert all(figures.faults[kind] == 2 for kind in chaos.FAULT_KINDS), figures.faults
