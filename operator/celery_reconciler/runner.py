"""Start the operator: kopf with our handlers, settings, health endpoint and metrics.

``celery-reconciler run`` (and the container's default command) lands here. kopf's own
``kopf run`` CLI would work too, but an entry point of ours keeps the flags the chart and the
docs speak of in one place and configures peering the way replicas of a Deployment need it.

Why a random peering priority: kopf's peering freezes *every* operator that sees another one
with the same priority, and the replicas of a Deployment all run the same command. Each
replica therefore picks a random priority at start unless ``--priority`` is given: the
highest one is active, the others stand by, and when the active one dies its peering record
expires and the next highest takes over.

``--sharding-namespace`` makes every replica active instead (``membership``): the policies
are shared out through Leases in that namespace. kopf then runs without peering — its
freeze would stop all replicas but one, and nothing our handlers do must run on a single
replica: the index and the wake-ups are per process and only read, and each policy's loop
runs where its Lease is held.

A replica that runs in a Pod (``$POD_UID`` and ``$POD_NAME`` from the Downward API, as the
chart sets them) proves it on its member Lease and counts only the member Leases that
running replicas wrote (``replica_proof``); its replica name is then its Pod's name, and
``--replica-selector`` names the labels every replica Pod carries. Outside a Pod there is
nothing to prove against, and every member Lease counts.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import os
import random
import signal
import socket
import threading
from collections.abc import Sequence

import kopf

from celery_reconciler import replica_proof


@dataclasses.dataclass(frozen=True)
class RunOptions:
    namespaces: Sequence[str] = ()
    all_namespaces: bool = False
    liveness_endpoint: str | None = None
    metrics_port: int | None = None
    peering_name: str | None = None
    priority: int | None = None
    peering_lifetime_seconds: int = 30
    sharding_namespace: str | None = None
    sharding_group: str = "celery-reconciler"
    replica_name: str | None = None
    lease_seconds: int = 15
    replica_selector: str = ""
    json_logs: bool = False
    verbose: bool = False
    max_database_connections: int | None = None  # None: the environment, else the default
    status_writes_per_second: float = 20.0


def add_run_command(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        dest="namespaces",
        help="watch this namespace (repeatable); the default is --all-namespaces",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    parser.add_argument(
        "--liveness",
        metavar="URL",
        help="serve kopf's health probe, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering", metavar="NAME", help="coordinate replicas through this kopf peering object"
    )
    peering.add_argument(
        "--standalone", action="store_true", help="no peering: this is the only replica"
    )
    peering.add_argument(
        "--sharding-namespace",
        metavar="NAMESPACE",
        help="every replica active: share the policies out through Leases in this namespace",
    )
    parser.add_argument(
        "--sharding-group",
        default="celery-reconciler",
        help="the replicas that share policies (their Leases' label); one per installation",
    )
    parser.add_argument(
        "--replica-name",
        help="this replica's name in its Leases (default: $POD_NAME, else the host name)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=int,
        default=15,
        metavar="SECONDS",
        help="how long a silent replica keeps its policies (renewed every third of it)",
    )
    parser.add_argument(
        "--replica-selector",
        default="",
        metavar="KEY=VALUE,...",
        help="the labels of every replica's Pod: with $POD_UID set, a member Lease counts only "
        "if such a running Pod wrote it (the chart passes its Deployment's selector)",
    )
    parser.add_argument(
        "--priority", type=int, help="peering priority (default: random, so replicas differ)"
    )
    parser.add_argument(
        "--peering-lifetime",
        type=int,
        default=30,
        metavar="SECONDS",
        help="how long a silent replica counts as alive (the standby's takeover delay)",
    )
    parser.add_argument(
        "--max-database-connections",
        type=int,
        metavar="N",
        help="connections the operator may open to one database, shared by its policies "
        "(default: $CELERY_RECONCILER_MAX_DATABASE_CONNECTIONS, else 20)",
    )
    parser.add_argument(
        "--status-writes-per-second",
        type=float,
        default=20.0,
        metavar="N",
        help="API writes of policy statuses per second, for all policies together; changes "
        "that wait are merged (default 20)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def options_from_args(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        namespaces=tuple(args.namespaces),
        all_namespaces=args.all_namespaces or not args.namespaces,
        liveness_endpoint=args.liveness,
        metrics_port=args.metrics_port,
        peering_name=None if args.standalone else args.peering,
        priority=args.priority,
        peering_lifetime_seconds=args.peering_lifetime,
        sharding_namespace=args.sharding_namespace,
        sharding_group=args.sharding_group,
        replica_name=args.replica_name,
        lease_seconds=args.lease_seconds,
        replica_selector=args.replica_selector,
        json_logs=args.log_format == "json",
        verbose=args.verbose,
        max_database_connections=args.max_database_connections,
        status_writes_per_second=args.status_writes_per_second,
    )


def configure_logging(*, json_logs: bool, verbose: bool) -> None:
    from celery_reconciler import logs

    logs.configure(json_logs=json_logs, level=logging.DEBUG if verbose else logging.INFO)


def replica_identity(options: RunOptions) -> replica_proof.Identity | None:
    """This replica's Pod from the Downward API, or None outside a Pod (no ``$POD_UID``)."""
    pod_uid = os.environ.get("POD_UID")
    if not pod_uid:
        return None
    pod_name = os.environ.get("POD_NAME")
    if not pod_name:
        raise SystemExit("$POD_UID is set but $POD_NAME is not: set both from the Downward API")
    if options.replica_name and options.replica_name != pod_name:
        raise SystemExit(
            f"--replica-name {options.replica_name} differs from $POD_NAME {pod_name}: in a Pod, "
            "a replica is named after its Pod (the others check its member Lease against it)"
        )
    try:
        selector = replica_proof.parse_selector(options.replica_selector)
    except ValueError as error:
        raise SystemExit(f"--replica-selector: {error}") from None
    return replica_proof.Identity(pod_name=pod_name, pod_uid=pod_uid, selector=selector)


def run(options: RunOptions, *, stop_flag: threading.Event | None = None) -> int:
    # Imported for its side effect: the @kopf decorators register the handlers.
    from celery_reconciler import handlers, membership, metrics, pools, served, statuswriter

    configure_logging(json_logs=options.json_logs, verbose=options.verbose)
    max_connections = options.max_database_connections
    if max_connections is None:
        max_connections = pools.max_connections_from_env()
    pools.configure(max_connections=max_connections)
    statuswriter.configure(writes_per_second=options.status_writes_per_second)
    if options.metrics_port is not None:
        metrics.serve(port=options.metrics_port)
    standalone = options.peering_name is None
    if options.sharding_namespace is not None:
        proof = replica_identity(options)
        membership.configure(
            membership.Membership(
                namespace=options.sharding_namespace,
                group=options.sharding_group,
                replica=proof.pod_name
                if proof is not None
                else options.replica_name or os.environ.get("POD_NAME") or socket.gethostname(),
                lease_seconds=options.lease_seconds,
                proof=proof,
            )
        )
    priority = options.priority
    if not standalone and priority is None:
        priority = random.SystemRandom().randint(1, 2**31 - 1)
    handlers.configure_peering(lifetime_seconds=options.peering_lifetime_seconds)
    loop = asyncio.new_event_loop()
    # The loops' blocking I/O runs in the default executor, whose size Python derives from
    # the CPU count (6 threads on 2 cores): hundreds of policies would queue their API calls
    # behind each other's database waits. Enough threads to fill every sweep slot, and as
    # many again for the Kubernetes API and the brokers.
    loop.set_default_executor(
        concurrent.futures.ThreadPoolExecutor(
            max_workers=2 * max_connections + 8, thread_name_prefix="io"
        )
    )
    insights = served.new_insights()
    not_served = threading.Event()

    def stop_serving_nothing() -> None:
        not_served.set()
        if stop_flag is not None:
            stop_flag.set()
        else:
            # What SIGTERM does, through kopf's own handler. Not a stop flag of ours: kopf
            # waits for a flag in a task it leaves running at every other exit, and then
            # waited 5 s for that "hung" task at every stop of the operator.
            signal.raise_signal(signal.SIGTERM)

    guard = loop.create_task(
        served.stop_unless_policies_are_served(insights=insights, stop=stop_serving_nothing)
    )
    try:
        kopf.run(
            loop=loop,
            standalone=standalone,
            peering_name=options.peering_name,
            priority=priority,
            liveness_endpoint=options.liveness_endpoint,
            clusterwide=options.all_namespaces,
            namespaces=list(options.namespaces),
            insights=insights,
            stop_flag=stop_flag,
        )
    finally:
        guard.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(guard)
        # The interpreter's last garbage collection walked the whole heap a long-running
        # operator built (the API clients' models, the pools) and took seconds of every exit,
        # seen with py-spy in gc_collect_main after kopf had stopped. Nothing that
        # collection would free matters to a process that is ending.
        gc.freeze()
    return 1 if not_served.is_set() else 0
