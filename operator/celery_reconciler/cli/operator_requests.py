"""``sweep-now`` and ``retry-dead``: requests to the operator, never a sweep of our own.

They set the annotations the operator's loop acts on (``policy_annotations.SWEEP_NOW``,
``policy_annotations.RETRY_DEAD``) and, with ``--wait``, wait until the loop cleared them and
reported its sweep — so the single active operator stays the only dispatcher.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from typing import Any, TextIO

from celery_reconciler import kube, policy_annotations
from celery_reconciler.cli import cluster_access, conventions, formatting

WAIT_POLL_SECONDS = 0.5


# After the loop cleared sweep-now it still has to sweep and write the status; a sweep that
# changed nothing may not rewrite it at all (status writes follow changes), so wait briefly.
SWEEP_REPORT_WAIT_SECONDS = 5.0


def parse_entry_ids(text: str) -> list[str]:
    """``--ids 1,2,3`` as a list; refuses empty ids and the separators the loop splits on."""
    ids = [part.strip() for part in text.split(",")]
    if not ids or any(not entry_id for entry_id in ids):
        raise conventions.UsageError(
            f"--ids {text!r}: give comma-separated entry ids, e.g. --ids 17,42"
        )
    return ids


def request_and_wait(
    args: argparse.Namespace, *, annotation: str, value: str
) -> tuple[str, str, float | None]:
    """Set ``annotation`` on the policy; with ``--wait``, wait until the loop removed it.

    Returns (namespace, name, seconds the operator took or ``None`` without ``--wait``).
    """
    cluster = cluster_access.connect_cluster(args)
    namespace, name = cluster_access.namespace_of(args, cluster), args.policy
    cluster_access.existing_policy(namespace=namespace, name=name)
    asked = time.monotonic()
    kube.annotate_policy(namespace=namespace, name=name, annotations={annotation: value})
    if not args.wait:
        return namespace, name, None
    deadline = asked + args.timeout
    while True:
        policy = cluster_access.existing_policy(namespace=namespace, name=name)
        if annotation not in (policy["metadata"].get("annotations") or {}):
            return namespace, name, time.monotonic() - asked
        if time.monotonic() >= deadline:
            raise kube.KubernetesUnavailable(
                f"the operator did not handle {annotation} on {namespace}/{name} within "
                f"{args.timeout:g}s — is it running and watching namespace {namespace}? The "
                "request stays set; the operator acts on it when it runs"
            )
        time.sleep(WAIT_POLL_SECONDS)


def describe_counts(counts: Mapping[str, Any]) -> str:
    def show(field: str) -> str:
        value = counts.get(field)
        return "-" if value is None else str(value)

    return (
        f"pending {show('pending')}, in flight {show('inFlight')}, "
        f"retrying {show('retrying')}, succeeded {show('succeeded')}, dead {show('dead')}"
    )


def describe_ready(policy: Mapping[str, Any]) -> tuple[str, bool]:
    ready = formatting.ready_condition(policy)
    if not ready:
        return "Ready unknown (no status yet)", True
    text = f"Ready {ready.get('status')} ({ready.get('reason')})"
    if ready.get("status") == "False":
        return f"{text}: {ready.get('message')}", False
    return text, True


def cmd_sweep_now(args: argparse.Namespace, out: TextIO) -> int:
    requested = cluster_access.utc_now().strftime("%Y-%m-%dT%H:%M:%SZ")
    namespace, name, took = request_and_wait(
        args, annotation=policy_annotations.SWEEP_NOW, value=requested
    )
    if took is None:
        out.write(
            f"asked the operator to sweep {namespace}/{name} now ({policy_annotations.SWEEP_NOW}="
            f"{requested}); follow it with: {conventions.prog_name()} status -n {namespace}\n"
        )
        return conventions.EXIT_OK
    policy, counts = wait_for_sweep_report(namespace=namespace, name=name, since=requested)
    ready, healthy = describe_ready(policy)
    suspended = bool(((policy.get("spec") or {}).get("schedule") or {}).get("suspend"))
    if suspended:
        what = "is suspended (spec.schedule.suspend): counts refreshed, nothing dispatched"
    elif (counts.get("lastSweepTime") or "") >= requested:
        what = f"swept: dispatched {counts.get('lastDispatched', 0)}"
    else:
        what = "swept: nothing changed since its last status"
    out.write(
        f"{namespace}/{name} {what} (the operator took the request in {took:.1f}s); "
        f"{describe_counts(counts)}; {ready}\n"
    )
    return conventions.EXIT_OK if healthy else conventions.EXIT_UNAVAILABLE


def wait_for_sweep_report(
    *, namespace: str, name: str, since: str
) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """The policy and its status counts once a sweep after ``since`` was reported, the
    policy turned unhealthy or suspended, or ``SWEEP_REPORT_WAIT_SECONDS`` passed."""
    deadline = time.monotonic() + SWEEP_REPORT_WAIT_SECONDS
    while True:
        policy = cluster_access.existing_policy(namespace=namespace, name=name)
        status = kube.get_processing_status(namespace=namespace, name=name) or {}
        counts: Mapping[str, Any] = status.get("status") or {}
        suspended = ((policy.get("spec") or {}).get("schedule") or {}).get("suspend")
        unhealthy = formatting.ready_condition(policy).get("status") == "False"
        reported = (counts.get("lastSweepTime") or "") >= since
        if reported or suspended or unhealthy or time.monotonic() >= deadline:
            return policy, counts
        time.sleep(WAIT_POLL_SECONDS)


def cmd_retry_dead(args: argparse.Namespace, out: TextIO) -> int:
    ids = None if args.ids is None else parse_entry_ids(args.ids)
    value = "all" if ids is None else ",".join(ids)
    requested = cluster_access.utc_now().strftime("%Y-%m-%dT%H:%M:%SZ")
    namespace, name, took = request_and_wait(
        args, annotation=policy_annotations.RETRY_DEAD, value=value
    )
    which = "all dead entries" if ids is None else f"dead entries {value}"
    if took is None:
        out.write(
            f"asked the operator to retry {which} of {namespace}/{name} "
            f"({policy_annotations.RETRY_DEAD}={value}); follow it with: "
            f"{conventions.prog_name()} status -n {namespace}\n"
        )
        return conventions.EXIT_OK
    # The loop revives, clears the annotation, then sweeps: show the counts of that sweep.
    policy, counts = wait_for_sweep_report(namespace=namespace, name=name, since=requested)
    ready, healthy = describe_ready(policy)
    out.write(
        f"the operator scheduled {which} of {namespace}/{name} to run again "
        f"(took the request in {took:.1f}s); {describe_counts(counts)}; {ready}\n"
    )
    return conventions.EXIT_OK if healthy else conventions.EXIT_UNAVAILABLE


def add_wait_arguments(parser: argparse.ArgumentParser, *, what: str) -> None:
    parser.add_argument(
        "--wait", action="store_true", help=f"wait until the operator {what}, print the result"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="for --wait (default 60)"
    )


def add_sweep_now_command(subparsers: Any) -> None:
    sweep_now = conventions.add_subcommand(
        subparsers, "sweep-now", cmd_sweep_now, help="ask the operator to sweep a policy now"
    )
    sweep_now.add_argument("policy", metavar="POLICY")
    cluster_access.add_cluster_arguments(sweep_now, all_namespaces=False)
    add_wait_arguments(sweep_now, what="swept")


def add_retry_dead_command(subparsers: Any) -> None:
    retry = conventions.add_subcommand(
        subparsers,
        "retry-dead",
        cmd_retry_dead,
        help="ask the operator to run dead-lettered entries again (all, or --ids)",
    )
    retry.add_argument("policy", metavar="POLICY")
    retry.add_argument("--ids", help="comma-separated entry ids (default: every dead entry)")
    cluster_access.add_cluster_arguments(retry, all_namespaces=False)
    add_wait_arguments(retry, what="revived them")
