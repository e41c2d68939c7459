"""Helpers shared by the e2e tests (a plain module: pytest puts tests/e2e on sys.path)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

import psycopg

from celery_app.demo import audit, schema
from celery_reconciler import cli
from devstack import demo_policy, operators, processes
from devstack import kube as devstack_kube

OperatorProcess = operators.OperatorProcess
healthy = operators.healthy


def get_json(kube: devstack_kube.ControlPlane, *args: str) -> Any:
    return json.loads(kube.kubectl(*args, "-o", "json").stdout)


wait_for = processes.wait_for


# The demo's policy and Secrets, as the e2e tests and the Pod rescue benchmark apply them.
WORKER_LABELS = demo_policy.WORKER_LABELS
secrets_manifest = demo_policy.secrets_manifest
policy_manifest = demo_policy.policy_manifest
apply_policy = demo_policy.apply_policy
apply_secrets = demo_policy.apply_secrets


def policy_conditions(policy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A ProcessingPolicy's status conditions by type; none before the operator wrote any."""
    return {c["type"]: c for c in (policy.get("status") or {}).get("conditions", [])}


def policy_events(
    kube: devstack_kube.ControlPlane, namespace: str, name: str = "journal-insights"
) -> list[dict[str, Any]]:
    """The Events the operator posted about one ProcessingPolicy."""
    events = get_json(
        kube,
        "-n",
        namespace,
        "get",
        "events",
        "--field-selector",
        f"involvedObject.name={name}",
    )
    return list(events["items"])


def processingstatus_table(kube: devstack_kube.ControlPlane, namespace: str) -> dict[str, str]:
    """``kubectl get processingstatus`` as a person reads it: header -> value of the one row."""
    lines = kube.kubectl("-n", namespace, "get", "processingstatus").stdout.splitlines()
    if len(lines) < 2:
        return {}
    header = lines[0].split()
    return dict(zip(header, lines[1].split(), strict=False))


def seed(dsn: str, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.seed(conn, count=count)


def unprocessed(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM journal_entry WHERE NOT insights_extracted")
        return int(row.fetchone()[0])  # type: ignore[index]


def tally(dsn: str) -> audit.Tally:
    with psycopg.connect(dsn) as conn:
        return audit.tally(conn)


def ledger_rows(
    dsn: str, *, state: str | None = None, worker: str | None = None
) -> list[tuple[Any, ...]]:
    """(entry_id, state, worker, attempt) rows of the operator's ledger, optionally filtered.

    Empty until the operator's first sweep has created the ledger schema."""
    with psycopg.connect(dsn) as conn:
        exists = conn.execute("SELECT to_regclass('celery_reconciler.entries')").fetchone()
        if exists is None or exists[0] is None:
            return []
        return conn.execute(
            "SELECT entry_id, state, worker, attempt FROM celery_reconciler.entries "
            "WHERE (%(state)s::text IS NULL OR state = %(state)s) "
            "AND (%(worker)s::text IS NULL OR worker = %(worker)s) ORDER BY entry_id",
            {"state": state, "worker": worker},
        ).fetchall()


def annotate(kube: devstack_kube.ControlPlane, namespace: str, annotation: str) -> None:
    kube.kubectl(
        "-n",
        namespace,
        "annotate",
        "--overwrite",
        "processingpolicy",
        "journal-insights",
        annotation,
    )


def metric_value(text: str, name: str, *, namespace: str, policy: str) -> float:
    """The value of one labelled sample in Prometheus text, 0 when absent."""
    wanted = f'{name}{{namespace="{namespace}",policy="{policy}"}}'
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


OUR_CRDS = ("processingpolicies.celery-reconciler.io", "processingstatuses.celery-reconciler.io")


def adopt_crds(kube: devstack_kube.ControlPlane, *, release: str, namespace: str) -> None:
    """Let a Helm release own our CRDs when another test applied them with kubectl first.

    A user's cluster has them from exactly one source; the session's apiserver is shared."""
    for name in OUR_CRDS:
        if kube.kubectl("get", "crd", name, check=False).returncode == 0:
            kube.kubectl("label", "--overwrite", "crd", name, "app.kubernetes.io/managed-by=Helm")
            kube.kubectl(
                "annotate",
                "--overwrite",
                "crd",
                name,
                f"meta.helm.sh/release-name={release}",
                f"meta.helm.sh/release-namespace={namespace}",
            )


@dataclasses.dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


def cli_run(*argv: str) -> CliResult:
    """``celery-reconciler ARGV`` in this process: exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(list(argv), out=out)
    return CliResult(code, out.getvalue(), err.getvalue())


def table_rows(text: str) -> list[dict[str, str]]:
    """A kubectl-style table as header -> cell dicts (cells hold no spaces)."""
    lines = text.splitlines()
    header = lines[0].split()
    return [dict(zip(header, line.split(), strict=True)) for line in lines[1:]]


def unreachable_kubeconfig(path: Path, *, port: int, token: str) -> Path:
    """A kubeconfig whose server is a closed loopback port."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "gone", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
                "users": [{"name": "me", "user": {"token": token}}],
                "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "me"}}],
                "current-context": "gone",
            }
        )
    )
    return path


# What kopf or the kubernetes client log when the apiserver refuses a request. A bare "403"
# would also match the milliseconds of a timestamp (",403"), hence the preceding character.
PERMISSION_ERROR = re.compile(
    r"Forbidden|forbidden|Unauthorized|Not enough permissions|[ (:=]403\b"
)
