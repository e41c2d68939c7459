"""``celery-reconciler sweep``: one sweep from a policy file, secrets from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import yaml

from celery_app.demo import schema
from devstack import postgres as devstack_postgres

pytestmark = pytest.mark.integration


def write_policy(path: Path, **overrides: Any) -> Path:
    manifest = {
        "apiVersion": "celery-reconciler.io/v1alpha1",
        "kind": "ProcessingPolicy",
        "metadata": {"name": "journal-insights", "namespace": "mindjourney"},
        "spec": {**schema.policy_spec(), **overrides},
    }
    path.write_text(yaml.safe_dump(manifest))
    return path


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_reconciler", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_sweep_dispatches_from_a_policy_file_with_secrets_from_the_environment(
    tmp_path: Path, demo_dsn: str, conn: psycopg.Connection[Any], redis_url: str
) -> None:
    schema.seed(conn, count=12)
    policy_file = write_policy(tmp_path / "policy.yaml")
    env = {"CELERY_RECONCILER_DSN": demo_dsn, "CELERY_BROKER_URL": redis_url}

    result = run_cli("sweep", "--policy", str(policy_file), env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("swept mindjourney/journal-insights: dispatched 12 entries")
    assert redis.Redis.from_url(redis_url).llen("insights") == 12
    keys = {row[0] for row in conn.execute("SELECT policy_key FROM celery_reconciler.entries")}
    assert keys == {"mindjourney/journal-insights"}


def test_sweep_errors_name_the_problem_and_never_the_secret(
    tmp_path: Path,
    demo_dsn: str,
    postgres: devstack_postgres.PostgresServer,
    redis_url: str,
) -> None:
    policy_file = write_policy(tmp_path / "policy.yaml")
    unreachable = demo_dsn.replace(f":{postgres.port}/", ":1/")
    down = run_cli(
        "sweep",
        "--policy",
        str(policy_file),
        "--dsn",
        unreachable,
        env={"CELERY_BROKER_URL": redis_url},
    )
    assert down.returncode == 1
    assert "PostgreSQL unavailable while connecting" in down.stderr
    for secret in (postgres.password, unreachable):
        assert secret not in down.stderr + down.stdout

    bad = write_policy(
        tmp_path / "bad.yaml",
        source={**schema.policy_spec()["source"], "table": "journal_entry; drop table x"},
    )
    invalid = run_cli("sweep", "--policy", str(bad), env={"CELERY_RECONCILER_DSN": demo_dsn})
    assert invalid.returncode == 2
    assert "spec.source.table: 'journal_entry; drop table x' is not a SQL identifier" in (
        invalid.stderr
    )

    missing = run_cli(
        "sweep",
        "--policy",
        str(policy_file),
        env={"CELERY_RECONCILER_DSN": "", "CELERY_BROKER_URL": ""},
    )
    assert missing.returncode == 2
    assert "pass --dsn or set CELERY_RECONCILER_DSN" in missing.stderr


@pytest.mark.parametrize(
    ("source", "dsn", "broker", "says"),
    [
        (
            {"pending": {"column": "body", "equals": True}},
            None,
            None,
            "spec.source.pending.equals does not fit column body",
        ),
        (
            {"orderBy": "raw"},
            None,
            None,
            "cannot be ordered by column raw",
        ),
        (
            {},
            "s3cretword is-not-a-dsn",
            None,
            "is not a PostgreSQL DSN",
        ),
        (
            {},
            None,
            "redis://:pw@127.0.0.1:s3cretport/0",
            "is not a broker URL",
        ),
    ],
    ids=["text = boolean", "orderBy json", "not a DSN", "not a broker URL"],
)
def test_sweep_prints_the_operators_message_for_a_hostile_spec_without_a_traceback(
    tmp_path: Path,
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    redis_url: str,
    source: dict[str, Any],
    dsn: str | None,
    broker: str | None,
    says: str,
) -> None:
    conn.execute("ALTER TABLE journal_entry ADD COLUMN raw json")
    policy_file = write_policy(
        tmp_path / "policy.yaml", source={**schema.policy_spec()["source"], **source}
    )
    env = {"CELERY_RECONCILER_DSN": dsn or demo_dsn, "CELERY_BROKER_URL": broker or redis_url}

    result = run_cli("sweep", "--policy", str(policy_file), env=env)

    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "s3cret" not in result.stderr + result.stdout
