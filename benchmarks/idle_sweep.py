"""What one idle sweep costs: the statements it sends to PostgreSQL, the commands it sends to
Redis, and the operator's CPU — with nothing pending, the state of almost every policy most
of the time, which with hundreds of policies is most of the operator's steady CPU.

It starts its own PostgreSQL (with ``log_statement = all``, tagged by application name) and
Redis, gives ``--policies`` policies a table each whose rows are all processed (as in
``devstack.scale_app``) and runs each one's real ``loop.PolicyLoop.iterate``: the Secrets
read, the sweep, the status read, the report. Kubernetes is left out — the Secrets come
from memory and the status writer only counts what it is handed — so the figures are the
loop's own. After ``--warm-up`` rounds (the first sweep of a policy reads the pending
query's plan, which later sweeps do not), ``--rounds`` rounds are measured and printed per
sweep: statements by the server's log, Redis commands by ``INFO commandstats``, CPU by
``time.process_time`` (this process runs nothing else; a sampling profiler such as py-spy
attached to it shows where), and status submissions. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import redis as redis_client
from psycopg import sql

from celery_reconciler import kube, loop, pools, statuswriter
from devstack import postgres as devstack_postgres
from devstack import redis as devstack_redis
from devstack import scale_app

NAMESPACE = "bench"
_STATEMENT = re.compile(r"^\[(?P<app>[^\]]*)\] LOG:  (?:statement|execute [^:]*): (?P<text>.*)$")


def policy_body(index: int, *, uid: str) -> dict[str, Any]:
    """The ``scale_app`` policy ``index`` as kopf's live body shows it."""
    item = json.loads(scale_app.policies_manifest(count=index + 1))["items"][index]
    item["spec"].pop("workers")  # no pod watch: that needs an API server
    item["metadata"].update({"namespace": NAMESPACE, "uid": uid, "generation": 1})
    return dict(item)


def logged_statements(log: Path, *, offset: int) -> tuple[list[str], int]:
    """The operator's statements logged after byte ``offset``, and the log's new end. A
    statement's further lines follow its first one, indented."""
    with log.open("rb") as handle:
        handle.seek(offset)
        data = handle.read()
    found: list[str] = []
    current: list[str] | None = None
    for line in data.decode(errors="replace").splitlines():
        if line[:1].isspace():
            if current is not None:
                current.append(line)
            continue
        if current is not None:
            found.append(" ".join(" ".join(current).split()))
        match = _STATEMENT.match(line)
        ours = match is not None and match["app"] in scale_app.OPERATOR_APPLICATION_NAMES
        current = [match["text"]] if ours and match is not None else None
    if current is not None:
        found.append(" ".join(" ".join(current).split()))
    return found, offset + len(data)


def redis_calls(url: str) -> collections.Counter[str]:
    stats = redis_client.Redis.from_url(url).info("commandstats")
    return collections.Counter({name: int(value["calls"]) for name, value in stats.items()})


class CountingWriter(statuswriter.StatusWriter):
    """Takes status submissions and only counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted = 0

    def submit(self, **_: Any) -> None:
        self.submitted += 1


@contextlib.contextmanager
def secrets_from_memory(values: dict[str, str]) -> Iterator[None]:
    original = kube.read_secret_value

    def read(*, name: str, **_: Any) -> str:
        return values[name]

    kube.read_secret_value = read
    try:
        yield
    finally:
        kube.read_secret_value = original


async def sweep_rounds(loops: list[loop.PolicyLoop], rounds: int) -> None:
    for _ in range(rounds):
        for policy_loop in loops:
            await policy_loop.iterate()


def run(args: argparse.Namespace, workdir: Path) -> None:
    database = devstack_postgres.start(workdir / "postgres")
    broker = devstack_redis.start(workdir / "redis")
    try:
        dsn = database.create_database("idle")
        with psycopg.connect(database.dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET log_line_prefix = '[%a] '")
            conn.execute("ALTER DATABASE idle SET log_statement = 'all'")
            conn.execute("SELECT pg_reload_conf()")
        scale_app.create_tables(dsn, count=args.policies, rows_each=args.rows_each)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for index in range(args.policies):
                table = sql.Identifier(scale_app.table_name(index))
                conn.execute(sql.SQL("UPDATE {} SET done = true").format(table))
        loops = [
            loop.PolicyLoop(
                namespace=NAMESPACE,
                name=f"scale-{index}",
                uid=f"uid-{index}",
                body=policy_body(index, uid=f"uid-{index}"),
            )
            for index in range(args.policies)
        ]
        writer = CountingWriter()
        statuswriter.WRITER = writer
        with secrets_from_memory({"demo-db": dsn, "demo-broker": broker.url}):
            asyncio.run(sweep_rounds(loops, args.warm_up))
            _, offset = logged_statements(database.log_path, offset=0)
            calls_before, submitted_before = redis_calls(broker.url), writer.submitted
            cpu_started, wall_started = time.process_time(), time.monotonic()
            asyncio.run(sweep_rounds(loops, args.rounds))
            cpu = time.process_time() - cpu_started
            wall = time.monotonic() - wall_started
            time.sleep(0.5)  # the server's log is written asynchronously to its clients
            statements, _ = logged_statements(database.log_path, offset=offset)
            calls = redis_calls(broker.url) - calls_before
        sweeps = args.policies * args.rounds
        print(f"idle sweeps measured: {sweeps} ({args.policies} policies x {args.rounds} rounds)")
        print(f"statements per idle sweep: {len(statements) / sweeps:.1f}")
        kinds = collections.Counter(_kind(text) for text in statements)
        for kind, count in kinds.most_common():
            print(f"  {count / sweeps:5.2f}  {kind}")
        redis_total = sum(calls.values())
        by_command = ", ".join(f"{name} {count / sweeps:.2f}" for name, count in calls.items())
        print(f"redis commands per idle sweep: {redis_total / sweeps:.2f} ({by_command})")
        print(f"CPU per idle sweep: {1000 * cpu / sweeps:.2f} ms (wall {1000 * wall / sweeps:.2f})")
        submitted = (writer.submitted - submitted_before) / sweeps
        print(f"status submissions per idle sweep: {submitted:.2f}")
    finally:
        for shared in pools._shared.values():
            shared.close()
        broker.stop()
        database.remove()


def _kind(statement: str) -> str:
    """A statement without its literals, short enough to read in a list."""
    text = re.sub(r"'[^']*'", "'…'", statement)
    text = re.sub(r"scale_\d+", "scale_N", text)
    text = re.sub(r"\b\d+\b", "N", text)
    return text[:140]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks idle-sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policies", type=int, default=20)
    parser.add_argument("--rows-each", type=int, default=3)
    parser.add_argument("--warm-up", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args, args.workdir)
        return 0
    with tempfile.TemporaryDirectory(prefix="idle-sweep-") as workdir:
        run(args, Path(workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
