"""The ``celery-reconciler`` verbs against the real stack: apiserver, operator, workers, database.

Each verb is run as a person would, with the admin kubeconfig in ``$KUBECONFIG`` and no DSN in
the environment; the effects are read back from the cluster and the ledger, not from the
CLI's own words. The kubectl plugin path runs the installed script through the real kubectl.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
from e2e_support import (
    OperatorProcess,
    apply_policy,
    apply_secrets,
    cli_run,
    get_json,
    ledger_rows,
    policy_manifest,
    seed,
    table_rows,
    tally,
    unprocessed,
    unreachable_kubeconfig,
    wait_for,
)

from celery_app.demo import schema
from devstack import kube as devstack_kube
from devstack import processes, workers

POLICY = "journal-insights"
SCRIPTS = Path(sys.executable).parent


def annotations(kube: devstack_kube.ControlPlane, namespace: str) -> dict[str, str]:
    policy = get_json(kube, "-n", namespace, "get", "processingpolicy", POLICY)
    return dict(policy["metadata"].get("annotations") or {})


def status_json(namespace: str) -> dict[str, object]:
    result = cli_run("status", "-n", namespace, "-o", "json")
    assert result.code == 0, result.err
    items = json.loads(result.out)["items"]
    return dict(items[0]) if items else {}


def attempts_in_ledger(dsn: str, entry_id: str) -> list[tuple[int, str, str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attempt, fence_token::text, worker, outcome FROM celery_reconciler.attempts "
            "WHERE entry_id = %s ORDER BY id",
            [entry_id],
        ).fetchall()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def test_every_verb_against_the_running_operator(
    cli_shell: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    kube = cli_shell
    seed(journal, 3)
    with psycopg.connect(journal, autocommit=True) as conn:
        schema.set_fault(conn, entry_id=2, kind="fail")
    worker_pods("insights-worker-a")
    start_operator()
    retry = {"maxAttempts": 2, "initialDelay": "1s", "factor": 2, "maxDelay": "2s", "jitter": False}
    apply_policy(
        kube, namespace, dsn=journal, broker_url=redis_url, sweep_interval="1h", retry=retry
    )

    # status: the dead entry and the healthy policy, as JSON, as a table, across namespaces.
    wait_for(
        lambda: (
            status_json(namespace).get("dead") == 1 and status_json(namespace)["succeeded"] == 2
        ),
        timeout_seconds=60,
        what="status to show 2 succeeded and the failing entry dead after 2 attempts",
    )
    table = cli_run("status", "-n", namespace)
    assert table.code == 0, table.err
    print(table.out)
    [row] = table_rows(table.out)
    assert row["POLICY"] == POLICY and "NAMESPACE" not in row
    assert (row["PENDING"], row["IN-FLIGHT"], row["RETRYING"]) == ("0", "0", "0")
    assert (row["SUCCEEDED"], row["DEAD"], row["READY"], row["REASON"]) == (
        "2",
        "1",
        "True",
        "Swept",
    )
    assert re.fullmatch(r"\d+s", row["LAST-SWEEP"]), row
    everywhere = cli_run("status", "-A")
    assert everywhere.code == 0, everywhere.err
    assert {"NAMESPACE": namespace, "POLICY": POLICY}.items() <= next(
        r for r in table_rows(everywhere.out) if r["NAMESPACE"] == namespace
    ).items()

    # explain: the dead entry's two attempts, exactly as the ledger has them; DSN from the Secret.
    story = cli_run("explain", POLICY, "2", "-n", namespace)
    assert story.code == 0, story.err
    print(story.out)
    ledger_attempts = attempts_in_ledger(journal, "2")
    assert [(a, o) for a, _f, _w, o in ledger_attempts] == [(1, "failed"), (2, "failed")]
    assert "state:         dead (attempts used: 2)" in story.out
    for attempt, fence, worker, outcome in ledger_attempts:
        block = story.out.split(f"attempt {attempt}: {outcome}", 1)[1]
        assert f"fence token:   {fence}" in block and f"worker:        {worker}" in block
    assert "error:" in story.out and "retry due:" in story.out
    assert journal not in story.out + story.err
    as_json = json.loads(cli_run("explain", POLICY, "2", "-n", namespace, "-o", "json").out)
    assert [a["fence_token"] for a in as_json["attempts"]] == [
        f for _a, f, _w, _o in ledger_attempts
    ]
    assert as_json["last_error"] == as_json["attempts"][-1]["error"]

    unknown = cli_run("explain", POLICY, "999", "-n", namespace)
    assert unknown.code == 2
    assert f'entry "999" has no ledger history in policy {namespace}/{POLICY}' in unknown.err
    assert journal not in unknown.err

    # retry-dead --ids: the operator revives entry 2, which now succeeds.
    with psycopg.connect(journal, autocommit=True) as conn:
        schema.clear_fault(conn, entry_id=2)
    revived = cli_run("retry-dead", POLICY, "-n", namespace, "--ids", "2", "--wait")
    assert revived.code == 0, revived.err
    assert f"scheduled dead entries 2 of {namespace}/{POLICY} to run again" in revived.out
    assert "celery-reconciler.io/retry-dead" not in annotations(kube, namespace)
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=60, what="entry 2 to succeed")
    assert ledger_rows(journal, state="dead") == []

    # sweep-now --wait: the interval is an hour, so only the request can dispatch new entries.
    seed(journal, 4)
    swept = cli_run("sweep-now", POLICY, "-n", namespace, "--wait", "--timeout", "30")
    assert swept.code == 0, swept.err
    print(swept.out, revived.out, unknown.err)
    assert re.search(rf"{namespace}/{POLICY} swept: dispatched \d+ ", swept.out), swept.out
    assert "Ready True (Swept)" in swept.out
    assert "celery-reconciler.io/sweep-now" not in annotations(kube, namespace)
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=30, what="the swept entries")
    assert tally(journal).duplicate_successes == 0

    # Without --wait the request is only set; the operator still acts on it.
    seed(journal, 1)
    asked = cli_run("sweep-now", POLICY, "-n", namespace)
    assert asked.code == 0 and "asked the operator to sweep" in asked.out
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=30, what="the asked-for sweep")

    # The kubectl plugin: the installed script found on PATH by the real kubectl.
    wait_for(
        lambda: status_json(namespace).get("succeeded") == 8,
        timeout_seconds=30,
        what="status to count all 8 entries succeeded",
    )
    env = dict(kube.env())
    env["PATH"] = os.pathsep.join([str(SCRIPTS), str(kube.bin_dir), env.get("PATH", "")])
    kubectl = str(kube.bin_dir / "kubectl")
    plugins = subprocess.run(
        [kubectl, "plugin", "list"], env=env, capture_output=True, text=True, check=False
    )
    assert str(SCRIPTS / "kubectl-celery_reconciler") in plugins.stdout, plugins
    for verb in ("celery-reconciler", "celery_reconciler"):
        plugin = subprocess.run(
            [kubectl, verb, "status", "-n", namespace],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert plugin.returncode == 0, plugin.stderr
        [row] = table_rows(plugin.stdout)
        assert (row["POLICY"], row["SUCCEEDED"], row["DEAD"]) == (POLICY, "8", "0")


def test_errors_say_what_is_wrong_and_what_to_do(
    cli_shell: devstack_kube.ControlPlane, namespace: str, journal: str, tmp_path: Path
) -> None:
    kube = cli_shell
    empty = cli_run("status", "-n", namespace)
    assert (empty.code, empty.out) == (0, "")
    assert f"No processing policies found in namespace {namespace}." in empty.err

    # An unknown policy, for every verb that names one.
    missing = (
        f'processingpolicy "nope" not found in namespace "{namespace}" — list them with: '
        "celery-reconciler status -A"
    )
    for argv in (["sweep-now", "nope"], ["retry-dead", "nope"], ["explain", "nope", "1"]):
        result = cli_run(*argv, "-n", namespace)
        assert (result.code, result.err.strip()) == (2, f"celery-reconciler: {missing}"), argv

    # The namespace defaults to the kubeconfig context's, as in kubectl.
    context_kubeconfig = kube.write_kubeconfig(
        tmp_path / "context.kubeconfig", token=kube.admin_token, namespace=namespace
    )
    result = cli_run("sweep-now", "nope", "--kubeconfig", str(context_kubeconfig))
    assert result.code == 2 and f'in namespace "{namespace}"' in result.err

    # explain before the Secret exists, then before the operator created the ledger.
    kube.kubectl("-n", namespace, "apply", "-f", "-", input=policy_manifest())
    no_secret = cli_run("explain", POLICY, "1", "-n", namespace)
    assert no_secret.code == 2
    assert (
        f'secret "demo-db" not found in namespace "{namespace}" — create it or fix '
        "spec.source.databaseSecretRef"
    ) in no_secret.err
    apply_secrets(kube, namespace, dsn=journal, broker_url="redis://x")
    no_ledger = cli_run("explain", POLICY, "1", "-n", namespace)
    assert no_ledger.code == 2
    assert f"the operator has not swept {namespace}/{POLICY} yet" in no_ledger.err
    assert journal not in no_ledger.err
    before_first_sweep = status_json(namespace)
    assert before_first_sweep["policy"] == POLICY and before_first_sweep["pending"] is None

    # An unreachable cluster: the server named, the token not, KUBECONFIG suggested.
    port = processes.free_port()
    token = "token-that-must-not-leak"
    gone = unreachable_kubeconfig(tmp_path / "gone.kubeconfig", port=port, token=token)
    for argv in (["status"], ["sweep-now", POLICY, "-n", namespace]):
        result = cli_run(*argv, "--kubeconfig", str(gone))
        assert result.code == 1, argv
        assert f"cannot reach the Kubernetes API server at https://127.0.0.1:{port}" in result.err
        assert "check KUBECONFIG" in result.err and token not in result.err

    # The same, as a real process reading $KUBECONFIG.
    process = subprocess.run(
        [str(SCRIPTS / "celery-reconciler"), "status", "-A"],
        env={**os.environ, "KUBECONFIG": str(gone)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert process.returncode == 1
    assert f"https://127.0.0.1:{port}" in process.stderr and token not in process.stderr

    # No operator runs here: --wait gives up, saying so, and leaves the request for later.
    unanswered = cli_run("sweep-now", POLICY, "-n", namespace, "--wait", "--timeout", "1")
    assert unanswered.code == 1
    assert "the operator did not handle celery-reconciler.io/sweep-now" in unanswered.err
    assert "is it running and watching namespace" in unanswered.err
    assert "celery-reconciler.io/sweep-now" in annotations(kube, namespace)

    bad_ids = cli_run("retry-dead", POLICY, "-n", namespace, "--ids", "3,,4")
    assert bad_ids.code == 2 and "comma-separated entry ids" in bad_ids.err
