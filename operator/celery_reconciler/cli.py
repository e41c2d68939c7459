"""The ``celery-reconciler`` command (also ``python -m celery_reconciler``, a kubectl plugin).

Verbs are argparse subcommands, each a small function that gathers its inputs, calls one
module that does the work and prints a human summary (``-o json`` where a script may read it):

    celery-reconciler sweep --policy policy.yaml [--dsn DSN] [--broker URL]
    celery-reconciler run ...                          the operator itself
    celery-reconciler status [-n NS | -A] [-o json]    is my work getting done?
    celery-reconciler sweep-now POLICY [-n NS] [--wait]
    celery-reconciler retry-dead POLICY [-n NS] [--ids 1,2,3] [--wait]
    celery-reconciler explain POLICY ENTRY_ID [-n NS] [-o json]
    celery-reconciler grants --database DB --table SCHEMA.TABLE [--operator-role ...]

``sweep`` works offline from a policy file; ``grants`` prints the database roles' GRANTs
(``ledger_roles``) and connects to nothing. The cluster verbs talk to the API server with the
person's own credentials, found like kubectl finds them (``--kubeconfig``, ``$KUBECONFIG``,
``~/.kube/config``, in-cluster), and default to the context's namespace. They never sweep
themselves: ``sweep-now`` and ``retry-dead`` set the annotations the operator's loop acts on
(``policy_annotations.SWEEP_NOW``, ``policy_annotations.RETRY_DEAD``) and, with ``--wait``, wait
until the loop cleared them — so the single active operator stays the only dispatcher.
``explain`` reads the ledger; its DSN comes from ``--dsn``, ``CELERY_RECONCILER_DSN`` or the
policy's ``spec.source.databaseSecretRef`` Secret (read through the API).

Installed as ``kubectl-celery_reconciler`` too, so ``kubectl celery-reconciler status`` works.
Secrets are never printed: errors name the server, not the credentials.

Exit codes: 0 done; 1 a component is unavailable (the cluster, the database, the broker;
retry later) or an unexpected error (a bug, reported without a traceback); 2 bad usage, an
invalid policy, a Secret or DSN that is not what it should be, missing rights, or something
named that does not exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import psycopg
import urllib3
import yaml

from celery_reconciler import broker as broker_module
from celery_reconciler import kube, ledger, ledger_roles, policy_annotations, reconcile, runner
from celery_reconciler import policy as policy_module
from celery_reconciler.loop import problems

DSN_ENVIRONMENT_VARIABLE = "CELERY_RECONCILER_DSN"
BROKER_ENVIRONMENT_VARIABLE = "CELERY_BROKER_URL"
EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace, TextIO], int]


class UsageError(Exception):
    """Bad input from the user; the message says what to change."""


def load_policy(path: Path, *, namespace: str | None = None) -> policy_module.Policy:
    """Read a ProcessingPolicy manifest or a bare spec from YAML."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UsageError(f"cannot read policy file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"policy file {path} is not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise UsageError(f"policy file {path} must hold a ProcessingPolicy or its spec")
    if "spec" in document:
        metadata = document.get("metadata") or {}
        spec = document["spec"]
        name = str(metadata.get("name") or path.stem)
        namespace = namespace or str(metadata.get("namespace") or "default")
    else:
        spec, name, namespace = document, path.stem, namespace or "default"
    return policy_module.parse_policy(
        spec, namespace=namespace, name=name, require_secret_refs=False
    )


def _secret_setting(value: str | None, variable: str, flag: str) -> str:
    resolved = value or os.environ.get(variable)
    if not resolved:
        raise UsageError(f"no {flag.lstrip('-')} given: pass {flag} or set {variable}")
    return resolved


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy", type=Path, required=True, help="ProcessingPolicy YAML (or its spec)"
    )
    parser.add_argument(
        "--namespace", help="namespace of the policy key (default: the manifest's, or default)"
    )
    parser.add_argument(
        "--dsn",
        help=f"PostgreSQL DSN of the entries' database (default: ${DSN_ENVIRONMENT_VARIABLE})",
    )


def cmd_sweep(args: argparse.Namespace, out: TextIO) -> int:
    policy = load_policy(args.policy, namespace=args.namespace)
    dsn = _secret_setting(args.dsn, DSN_ENVIRONMENT_VARIABLE, "--dsn")
    url = _secret_setting(args.broker, BROKER_ENVIRONMENT_VARIABLE, "--broker")
    db = reconcile.Database(dsn, application_name="celery-reconciler cli")
    publisher = broker_module.connect(url, transport_options=policy.task.transport_options())
    try:
        result = reconcile.reconcile_once(policy, db=db, broker=publisher)
    finally:
        publisher.close()
        db.close()
    expired = result.expired
    out.write(
        f"swept {result.policy_key}: dispatched {result.published} entries in "
        f"{result.pages} page(s) ({result.duration_seconds:.2f}s, "
        f"{result.entries_per_second:.0f}/s); {result.in_flight_before} were in flight; "
        f"expired leases: {expired.retry_now} retried, {expired.dead} dead, "
        f"{expired.unstarted} unstarted; settled {result.settled}"
        + (" (suspended: nothing dispatched)" if result.suspended else "")
        + "\n"
    )
    return EXIT_OK


# --- formatting (pure) ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StatusRow:
    """One policy as ``status`` shows it; counts are ``None`` before its first status."""

    namespace: str
    policy: str
    pending: int | None = None
    in_flight: int | None = None
    retrying: int | None = None
    succeeded: int | None = None
    dead: int | None = None
    oldest_pending_seconds: int | None = None
    last_sweep_time: str | None = None
    ready: str | None = None
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "policy": self.policy,
            "pending": self.pending,
            "inFlight": self.in_flight,
            "retrying": self.retrying,
            "succeeded": self.succeeded,
            "dead": self.dead,
            "oldestPendingSeconds": self.oldest_pending_seconds,
            "lastSweepTime": self.last_sweep_time,
            "ready": self.ready,
            "reason": self.reason,
        }


def ready_condition(policy: Mapping[str, Any]) -> Mapping[str, Any]:
    conditions = (policy.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Ready"), {})


def status_rows(
    policies: Iterable[Mapping[str, Any]], statuses: Iterable[Mapping[str, Any]]
) -> list[StatusRow]:
    """Join policies with their ProcessingStatus (same namespace and name), sorted.

    Every policy gets a row, even before the operator wrote its status: a policy the
    operator never picked up is exactly what a person running ``status`` needs to see.
    """
    by_key = {
        (s["metadata"].get("namespace", ""), s["metadata"]["name"]): s.get("status") or {}
        for s in statuses
    }
    rows = []
    for policy in policies:
        namespace = policy["metadata"].get("namespace", "")
        name = policy["metadata"]["name"]
        counts = by_key.get((namespace, name), {})
        ready = ready_condition(policy)

        def count(field: str, counts: Mapping[str, Any] = counts) -> int | None:
            value = counts.get(field)
            return None if value is None else int(value)

        rows.append(
            StatusRow(
                namespace=namespace,
                policy=name,
                pending=count("pending"),
                in_flight=count("inFlight"),
                retrying=count("retrying"),
                succeeded=count("succeeded"),
                dead=count("dead"),
                oldest_pending_seconds=count("oldestPendingSeconds"),
                last_sweep_time=counts.get("lastSweepTime"),
                ready=ready.get("status"),
                reason=ready.get("reason"),
            )
        )
    return sorted(rows, key=lambda row: (row.namespace, row.policy))


def human_duration(seconds: float | None) -> str:
    """kubectl's way of writing an age: ``45s``, ``5m3s``, ``42m``, ``3h5m``, ``20h``, ``4d``."""
    if seconds is None:
        return "-"
    total = max(0, int(seconds))
    minutes, hours, days = total // 60, total // 3600, total // 86400
    if total < 120:
        return f"{total}s"
    if minutes < 10:
        return f"{minutes}m{total % 60}s" if total % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    return f"{days}d"


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(text: str | None, *, now: datetime.datetime) -> str:
    moment = parse_time(text)
    return "-" if moment is None else human_duration((now - moment).total_seconds())


def render_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns three spaces apart, like ``kubectl get``."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "".join(
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        + "\n"
        for line in lines
    )


STATUS_HEADER = (
    "POLICY",
    "PENDING",
    "IN-FLIGHT",
    "RETRYING",
    "SUCCEEDED",
    "DEAD",
    "OLDEST",
    "LAST-SWEEP",
    "READY",
    "REASON",
)


def format_status_table(
    rows: Sequence[StatusRow], *, all_namespaces: bool, now: datetime.datetime
) -> str:
    def number(value: int | None) -> str:
        return "-" if value is None else str(value)

    table = []
    for row in rows:
        cells = [
            row.policy,
            number(row.pending),
            number(row.in_flight),
            number(row.retrying),
            number(row.succeeded),
            number(row.dead),
            human_duration(row.oldest_pending_seconds),
            age(row.last_sweep_time, now=now),
            row.ready or "-",
            row.reason or "-",
        ]
        table.append([row.namespace, *cells] if all_namespaces else cells)
    header = ("NAMESPACE", *STATUS_HEADER) if all_namespaces else STATUS_HEADER
    return render_table(header, table)


def parse_entry_ids(text: str) -> list[str]:
    """``--ids 1,2,3`` as a list; refuses empty ids and the separators the loop splits on."""
    ids = [part.strip() for part in text.split(",")]
    if not ids or any(not entry_id for entry_id in ids):
        raise UsageError(f"--ids {text!r}: give comma-separated entry ids, e.g. --ids 17,42")
    return ids


def timestamp_text(moment: datetime.datetime | None) -> str:
    if moment is None:
        return "-"
    utc = moment.astimezone(datetime.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def history_as_json(history: ledger.EntryHistory) -> dict[str, Any]:
    def value(item: object) -> object:
        if isinstance(item, datetime.datetime):
            return timestamp_text(item)
        if item is None or isinstance(item, int | float | str | bool):
            return item
        return str(item)

    document = {
        field.name: value(getattr(history, field.name))
        for field in dataclasses.fields(history)
        if field.name != "attempts"
    }
    document["attempts"] = [
        {field.name: value(getattr(a, field.name)) for field in dataclasses.fields(a)}
        for a in history.attempts
    ]
    return document


def format_history(history: ledger.EntryHistory) -> str:
    """The story of one entry: its ledger row, then each attempt in order."""
    lines = [
        f"entry {history.entry_id} of policy {history.policy_key}",
        f"  state:         {history.state} (attempts used: {history.attempt})",
        f"  fence token:   {history.fence_token or '-'}",
        f"  worker:        {history.worker or '-'}",
        f"  lease until:   {timestamp_text(history.lease_deadline)}",
        f"  next attempt:  {timestamp_text(history.next_attempt_at)}",
        f"  first seen:    {timestamp_text(history.created_at)}",
        f"  updated:       {timestamp_text(history.updated_at)}",
    ]
    if history.last_error:
        lines.append(f"  last error:    {_indent(history.last_error)}")
    if not history.attempts:
        lines.append("no attempt has started yet (dispatched, not yet picked up by a worker)")
    for attempt in history.attempts:
        took = ""
        if attempt.finished_at is not None:
            took = f" ({(attempt.finished_at - attempt.started_at).total_seconds():.3f}s)"
        lines += [
            "",
            f"attempt {attempt.attempt}: {attempt.outcome}{took}",
            f"  fence token:   {attempt.fence_token}",
            f"  worker:        {attempt.worker or '-'}",
            f"  dispatched:    {timestamp_text(attempt.dispatched_at)}",
            f"  started:       {timestamp_text(attempt.started_at)}",
            f"  finished:      {timestamp_text(attempt.finished_at)}",
        ]
        if attempt.retry_at is not None:
            lines.append(f"  retry due:     {timestamp_text(attempt.retry_at)}")
        if attempt.error:
            lines.append(f"  error:         {_indent(attempt.error)}")
    return "\n".join(lines) + "\n"


def _indent(text: str) -> str:
    return text.strip().replace("\n", "\n" + " " * 17)


# --- the cluster verbs ----------------------------------------------------------------------

WAIT_POLL_SECONDS = 0.5
# After the loop cleared sweep-now it still has to sweep and write the status; a sweep that
# changed nothing may not rewrite it at all (status writes follow changes), so wait briefly.
SWEEP_REPORT_WAIT_SECONDS = 5.0


def prog_name() -> str:
    invoked_as = Path(sys.argv[0]).name if sys.argv else ""
    return "kubectl celery-reconciler" if invoked_as.startswith("kubectl-") else "celery-reconciler"


def connect_cluster(args: argparse.Namespace) -> kube.Cluster:
    cluster = kube.cluster_like_kubectl(kubeconfig=args.kubeconfig, context=args.context)
    kube.use_api_client(cluster.client)
    return cluster


def namespace_of(args: argparse.Namespace, cluster: kube.Cluster) -> str:
    return str(args.namespace or cluster.namespace)


def existing_policy(*, namespace: str, name: str) -> dict[str, Any]:
    policy = kube.get_policy(namespace=namespace, name=name)
    if policy is None:
        raise UsageError(
            f'processingpolicy "{name}" not found in namespace "{namespace}" — list them '
            f"with: {prog_name()} status -A"
        )
    return policy


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    cluster = connect_cluster(args)
    namespace = None if args.all_namespaces else namespace_of(args, cluster)
    rows = status_rows(
        kube.list_policies(namespace=namespace),
        kube.list_processing_statuses(namespace=namespace),
    )
    if args.output == "json":
        out.write(json.dumps({"items": [row.as_json() for row in rows]}, indent=2) + "\n")
    elif not rows:
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        print(f"No processing policies found in {where}.", file=sys.stderr)
    else:
        out.write(format_status_table(rows, all_namespaces=namespace is None, now=utc_now()))
    return EXIT_OK


def request_and_wait(
    args: argparse.Namespace, *, annotation: str, value: str
) -> tuple[str, str, float | None]:
    """Set ``annotation`` on the policy; with ``--wait``, wait until the loop removed it.

    Returns (namespace, name, seconds the operator took or ``None`` without ``--wait``).
    """
    cluster = connect_cluster(args)
    namespace, name = namespace_of(args, cluster), args.policy
    existing_policy(namespace=namespace, name=name)
    asked = time.monotonic()
    kube.annotate_policy(namespace=namespace, name=name, annotations={annotation: value})
    if not args.wait:
        return namespace, name, None
    deadline = asked + args.timeout
    while True:
        policy = existing_policy(namespace=namespace, name=name)
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
    ready = ready_condition(policy)
    if not ready:
        return "Ready unknown (no status yet)", True
    text = f"Ready {ready.get('status')} ({ready.get('reason')})"
    if ready.get("status") == "False":
        return f"{text}: {ready.get('message')}", False
    return text, True


def cmd_sweep_now(args: argparse.Namespace, out: TextIO) -> int:
    requested = utc_now().strftime("%Y-%m-%dT%H:%M:%SZ")
    namespace, name, took = request_and_wait(
        args, annotation=policy_annotations.SWEEP_NOW, value=requested
    )
    if took is None:
        out.write(
            f"asked the operator to sweep {namespace}/{name} now ({policy_annotations.SWEEP_NOW}="
            f"{requested}); follow it with: {prog_name()} status -n {namespace}\n"
        )
        return EXIT_OK
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
    return EXIT_OK if healthy else EXIT_UNAVAILABLE


def wait_for_sweep_report(
    *, namespace: str, name: str, since: str
) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """The policy and its status counts once a sweep after ``since`` was reported, the
    policy turned unhealthy or suspended, or ``SWEEP_REPORT_WAIT_SECONDS`` passed."""
    deadline = time.monotonic() + SWEEP_REPORT_WAIT_SECONDS
    while True:
        policy = existing_policy(namespace=namespace, name=name)
        status = kube.get_processing_status(namespace=namespace, name=name) or {}
        counts: Mapping[str, Any] = status.get("status") or {}
        suspended = ((policy.get("spec") or {}).get("schedule") or {}).get("suspend")
        unhealthy = ready_condition(policy).get("status") == "False"
        reported = (counts.get("lastSweepTime") or "") >= since
        if reported or suspended or unhealthy or time.monotonic() >= deadline:
            return policy, counts
        time.sleep(WAIT_POLL_SECONDS)


def cmd_retry_dead(args: argparse.Namespace, out: TextIO) -> int:
    ids = None if args.ids is None else parse_entry_ids(args.ids)
    value = "all" if ids is None else ",".join(ids)
    requested = utc_now().strftime("%Y-%m-%dT%H:%M:%SZ")
    namespace, name, took = request_and_wait(
        args, annotation=policy_annotations.RETRY_DEAD, value=value
    )
    which = "all dead entries" if ids is None else f"dead entries {value}"
    if took is None:
        out.write(
            f"asked the operator to retry {which} of {namespace}/{name} "
            f"({policy_annotations.RETRY_DEAD}={value}); follow it with: "
            f"{prog_name()} status -n {namespace}\n"
        )
        return EXIT_OK
    # The loop revives, clears the annotation, then sweeps: show the counts of that sweep.
    policy, counts = wait_for_sweep_report(namespace=namespace, name=name, since=requested)
    ready, healthy = describe_ready(policy)
    out.write(
        f"the operator scheduled {which} of {namespace}/{name} to run again "
        f"(took the request in {took:.1f}s); {describe_counts(counts)}; {ready}\n"
    )
    return EXIT_OK if healthy else EXIT_UNAVAILABLE


def cmd_explain(args: argparse.Namespace, out: TextIO) -> int:
    cluster = connect_cluster(args)
    namespace, name = namespace_of(args, cluster), args.policy
    policy = existing_policy(namespace=namespace, name=name)
    dsn = args.dsn or os.environ.get(DSN_ENVIRONMENT_VARIABLE) or policy_dsn(policy, cluster)
    policy_key = f"{namespace}/{name}"
    conn = ledger.connect(
        dsn,
        application_name="celery-reconciler explain",
        statement_timeout_seconds=ledger.OPERATOR_STATEMENT_TIMEOUT_SECONDS,
        lock_timeout_seconds=ledger.OPERATOR_LOCK_TIMEOUT_SECONDS,
    )
    try:
        history = ledger.history(conn, policy_key=policy_key, entry_id=args.entry_id)
    except psycopg.errors.UndefinedTable:
        raise UsageError(
            f"the ledger (schema {ledger.SCHEMA}) does not exist in {ledger.describe_dsn(dsn)}"
            f": the operator has not swept {policy_key} yet — check `{prog_name()} status "
            f"-n {namespace}`"
        ) from None
    except psycopg.Error as error:
        raise ledger.database_failure(error, dsn=dsn, doing="reading the ledger") from None
    finally:
        conn.close()
    if history is None:
        raise UsageError(
            f'entry "{args.entry_id}" has no ledger history in policy {policy_key}: the '
            "operator never dispatched it — check that the id exists and matches "
            "spec.source.pending, or wait for the next sweep"
        )
    if args.output == "json":
        out.write(json.dumps(history_as_json(history), indent=2) + "\n")
    else:
        out.write(format_history(history))
    return EXIT_OK


def policy_dsn(policy: Mapping[str, Any], cluster: kube.Cluster) -> str:
    """The DSN from the policy's database Secret, read with the person's credentials."""
    metadata, spec = policy["metadata"], policy.get("spec") or {}
    ref = (spec.get("source") or {}).get("databaseSecretRef") or {}
    if not ref.get("name"):
        raise UsageError(
            f"processingpolicy {metadata['name']} has no spec.source.databaseSecretRef: pass "
            f"--dsn or set {DSN_ENVIRONMENT_VARIABLE}"
        )
    try:
        return kube.read_secret_value(
            namespace=metadata["namespace"],
            name=ref["name"],
            key=ref.get("key") or "dsn",
            field="spec.source.databaseSecretRef",
        )
    except urllib3.exceptions.HTTPError:
        raise kube.KubernetesUnreachable(
            f"cannot reach the Kubernetes API server at {cluster.server} — check KUBECONFIG "
            "(or --kubeconfig) and that the cluster is running"
        ) from None


def add_cluster_arguments(parser: argparse.ArgumentParser, *, all_namespaces: bool) -> None:
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then in-cluster)",
    )
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    scope = parser.add_mutually_exclusive_group() if all_namespaces else parser
    scope.add_argument("-n", "--namespace", help="namespace (default: the context's, else default)")
    if all_namespaces:
        scope.add_argument(
            "-A", "--all-namespaces", action="store_true", help="policies of every namespace"
        )


def add_wait_arguments(parser: argparse.ArgumentParser, *, what: str) -> None:
    parser.add_argument(
        "--wait", action="store_true", help=f"wait until the operator {what}, print the result"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="for --wait (default 60)"
    )


def add_subcommand(
    subparsers: Any, name: str, command: Command, *, help: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help, description=help)
    parser.set_defaults(command=command)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-reconciler",
        description="Make sure every unprocessed row of a table is processed by a Celery task.",
    )
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    sweep = add_subcommand(
        subparsers,
        "sweep",
        cmd_sweep,
        help="run one sweep: expire stale leases, claim pending entries, publish them",
    )
    add_policy_arguments(sweep)
    sweep.add_argument(
        "--broker", help=f"Celery broker URL (default: ${BROKER_ENVIRONMENT_VARIABLE})"
    )
    runner.add_run_command(
        add_subcommand(subparsers, "run", cmd_run, help="run the operator (kopf) until stopped")
    )
    status = add_subcommand(
        subparsers, "status", cmd_status, help="pending, in-flight and dead counts per policy"
    )
    add_cluster_arguments(status, all_namespaces=True)
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    sweep_now = add_subcommand(
        subparsers, "sweep-now", cmd_sweep_now, help="ask the operator to sweep a policy now"
    )
    sweep_now.add_argument("policy", metavar="POLICY")
    add_cluster_arguments(sweep_now, all_namespaces=False)
    add_wait_arguments(sweep_now, what="swept")
    retry = add_subcommand(
        subparsers,
        "retry-dead",
        cmd_retry_dead,
        help="ask the operator to run dead-lettered entries again (all, or --ids)",
    )
    retry.add_argument("policy", metavar="POLICY")
    retry.add_argument("--ids", help="comma-separated entry ids (default: every dead entry)")
    add_cluster_arguments(retry, all_namespaces=False)
    add_wait_arguments(retry, what="revived them")
    explain = add_subcommand(
        subparsers,
        "explain",
        cmd_explain,
        help="the ledger history of one entry: attempts, fence tokens, workers, errors",
    )
    explain.add_argument("policy", metavar="POLICY")
    explain.add_argument("entry_id", metavar="ENTRY_ID")
    add_cluster_arguments(explain, all_namespaces=False)
    explain.add_argument(
        "--dsn",
        help=f"PostgreSQL DSN (default: ${DSN_ENVIRONMENT_VARIABLE}, else the policy's Secret)",
    )
    explain.add_argument("-o", "--output", choices=("text", "json"), default="text")
    add_grants_arguments(
        add_subcommand(
            subparsers,
            "grants",
            cmd_grants,
            help="print the GRANTs of the ledger's roles: operator, worker, reader",
        )
    )
    return parser


def qualified_table(text: str) -> tuple[str, str]:
    """``schema.table`` (``table`` alone: ``public``), each part a plain SQL identifier."""
    parts = text.split(".")
    if len(parts) > 2 or not all(policy_module.IDENTIFIER_PATTERN.fullmatch(p) for p in parts):
        raise UsageError(
            f"--table {text!r}: write schema.table (or table, in schema public), each part "
            "letters, digits and underscores"
        )
    return (parts[0], parts[1]) if len(parts) == 2 else ("public", parts[0])


def cmd_grants(args: argparse.Namespace, out: TextIO) -> int:
    roles = ledger_roles.Roles(
        operator=args.operator_role, worker=args.worker_role, reader=args.reader_role
    )
    tables = [qualified_table(table) for table in args.table]
    out.write(ledger_roles.script(database=args.database, tables=tables, roles=roles))
    return EXIT_OK


def add_grants_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", required=True, help="the database of the entries' table")
    parser.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="SCHEMA.TABLE",
        help="a table the policies read (spec.source.table); repeat for several",
    )
    for role, default in (
        ("operator", ledger_roles.DEFAULT_OPERATOR_ROLE),
        ("worker", ledger_roles.DEFAULT_WORKER_ROLE),
        ("reader", ledger_roles.DEFAULT_READER_ROLE),
    ):
        parser.add_argument(
            f"--{role}-role", default=default, help=f"the {role}'s role (default {default})"
        )


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    return runner.run(runner.options_from_args(args))


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    parser = build_parser()
    parser.prog = prog_name()
    args = parser.parse_args(argv)
    try:
        code: int = args.command(args, stream)
        return code
    except (
        UsageError,
        policy_module.InvalidPolicy,
        reconcile.SourceInvalid,
        reconcile.DsnInvalid,
        reconcile.LedgerPermissionDenied,
        broker_module.BrokerUrlInvalid,
        kube.KubeconfigInvalid,
        kube.SecretNotFound,
        kube.SecretInvalid,
    ) as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (
        reconcile.DatabaseUnavailable,
        reconcile.BrokerUnavailable,
        kube.KubernetesUnavailable,
    ) as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except Exception as error:  # a bug: the operator's message, no traceback, no secret
        problem = problems.problem_of(error, secrets=_secrets_given(args))
        print(f"{parser.prog}: {problem.reason}: {problem.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _secrets_given(args: argparse.Namespace) -> tuple[str, ...]:
    """Every DSN and broker URL this command could have used, and their passwords."""
    found: tuple[str, ...] = ()
    for dsn in (getattr(args, "dsn", None), os.environ.get(DSN_ENVIRONMENT_VARIABLE)):
        if dsn:
            found += ledger.dsn_secrets(dsn)
    for url in (getattr(args, "broker", None), os.environ.get(BROKER_ENVIRONMENT_VARIABLE)):
        if url:
            found += broker_module.url_secrets(url)
    return found
