"""``python -m devstack up|down|demo``: the local stack for a person, outside pytest.

``up`` starts the same real servers the tests use — and the node that runs the project's
image — and leaves them running in the background, recording their PIDs (and the node's
paths and cgroup root) in ``.stack/state.json`` so ``down`` can stop them. It records each
server as it starts, and a mark in the environment every server inherits, so ``down`` also
stops what an ``up`` killed half-way had started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from devstack import kube, node, postgres, processes, rabbitmq, redis

# CELERY_RECONCILER_STACK_DIR moves the stack (a test runs `up` and `down` in a folder of its
# own beside a person's stack).
STACK_DIR = Path(
    os.environ.get("CELERY_RECONCILER_STACK_DIR")
    or Path(__file__).resolve().parent.parent / ".stack"
)
STATE_FILE = STACK_DIR / "state.json"
# `up` sets it to a fresh id in its own environment, which every server it starts inherits.
STACK_MARK_VARIABLE = "CELERY_RECONCILER_STACK_MARK"
# What `source .stack/env.sh` sets, and why each: the names the demo app, the worker
# package, the Django example and kubectl read. Not BROKER_URL: the `celery` command reads
# it as its --broker, silently overriding the app's own setting.
ENVIRONMENT = (
    "KUBECONFIG",  # the admin's kubeconfig of the stack's apiserver
    "PATH",  # kubectl and helm first
    "DATABASE_URL",  # the stack's PostgreSQL (the Django example reads this name)
    "CELERY_RECONCILER_DSN",  # the same database: the worker package's ledger
    "CELERY_BROKER_URL",  # Redis: what the demo app and the Django example read
    "REDIS_URL",
    "RABBITMQ_URL",  # export CELERY_BROKER_URL=$RABBITMQ_URL to run on RabbitMQ instead
)


def environment_file(
    *,
    plane: kube.ControlPlane,
    database: postgres.PostgresServer,
    redis_server: redis.RedisServer,
    rabbit: rabbitmq.RabbitMQServer,
) -> str:
    values = {
        "KUBECONFIG": str(plane.kubeconfig),
        "PATH": f"{plane.bin_dir}:$PATH",
        "DATABASE_URL": database.dsn,
        "CELERY_RECONCILER_DSN": database.dsn,
        "CELERY_BROKER_URL": redis_server.url,
        "REDIS_URL": redis_server.url,
        "RABBITMQ_URL": rabbit.url,
    }
    assert tuple(values) == ENVIRONMENT
    lines = ["unset BROKER_URL  # the celery command would read it as --broker"]
    lines += [
        f"export {name}={value}" if name == "PATH" else f"export {name}='{value}'"
        for name, value in values.items()
    ]
    return "\n".join(lines) + "\n"


def record_state(state: dict[str, Any]) -> None:
    STATE_FILE.write_text(json.dumps(state, indent=2))


def stack_up() -> int:
    if STATE_FILE.exists():
        print(f"a stack is already recorded in {STATE_FILE}; run `make stack-down` first")
        return 1
    STACK_DIR.mkdir(exist_ok=True)
    # Recorded before anything starts, and inherited by every server: `down` finds what a
    # killed `up` started before it could record a PID (a CI timeout's SIGKILL runs no
    # clean-up here).
    mark = uuid.uuid4().hex
    os.environ[STACK_MARK_VARIABLE] = mark
    state: dict[str, Any] = {"mark": mark, "pids": []}
    record_state(state)
    try:
        with processes.interrupts_raise():
            started = start_servers(state)
    except BaseException:
        # Whatever failed (a port taken by another stack, a slow server, Ctrl-C, SIGTERM),
        # nothing must outlive this command; the logs stay for whoever reads why.
        stop_state(state)
        STATE_FILE.unlink(missing_ok=True)
        print(f"stack-up failed; stopped what it had started; logs: {STACK_DIR}")
        raise
    plane, database, broker, rabbit, worker_node = started
    env_file = STACK_DIR / "env.sh"
    env_file.write_text(
        environment_file(plane=plane, database=database, redis_server=broker, rabbit=rabbit)
    )
    env_file.chmod(0o600)
    print(
        "stack is up: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, "
        f"node {worker_node.name} (kubelet, containerd, runc), PostgreSQL, Redis, RabbitMQ"
    )
    print(f"  image:     {worker_node.image.ref} (imagePullPolicy: Never; hostNetwork Pods)")
    print(f"  logs:      {STACK_DIR}")
    print(f"  use it:    source {env_file}   # sets {', '.join(ENVIRONMENT)}")
    print("  then:      kubectl get namespaces")
    print("  stop it:   make stack-down")
    return 0


def start_servers(
    state: dict[str, Any],
) -> tuple[
    kube.ControlPlane,
    postgres.PostgresServer,
    redis.RedisServer,
    rabbitmq.RabbitMQServer,
    node.Node,
]:
    """Start the stack, recording each server in ``state`` (and state.json) as it comes up."""
    pids: list[int] = state["pids"]

    def started(*managed: processes.ManagedProcess | None) -> None:
        # Newest first: the order to stop them in, as each was started on the ones before.
        pids[:0] = [p.pid for p in managed if p is not None and p.pid is not None]
        record_state(state)

    database = postgres.start(STACK_DIR / "postgres")
    state["postgres_home"] = str(database.data_dir.parent)
    started(database.process)
    broker = redis.start(STACK_DIR / "redis")
    started(broker.process)
    rabbit = rabbitmq.start(STACK_DIR / "rabbitmq")
    started(rabbit.process, rabbit.epmd)
    plane = kube.start(STACK_DIR / "kube")
    started(plane.controller_manager, plane.apiserver, plane.etcd)
    worker_node = node.start(plane, STACK_DIR / "node")
    state["node"] = worker_node.record()
    started()
    return plane, database, broker, rabbit, worker_node


def stop_state(state: dict[str, Any]) -> None:
    """Stop what ``state`` records, then whatever else still carries the stack's mark."""
    # The node first: its containers and mounts must go while the apiserver still answers.
    if "node" in state:
        node.stop_recorded(state["node"])
    for pid in state["pids"]:
        processes.stop_pid(pid)
    if "mark" in state:
        processes.stop_carrying(variable=STACK_MARK_VARIABLE, value=state["mark"])
    if "postgres_home" in state:
        shutil.rmtree(state["postgres_home"], ignore_errors=True)


def stack_down() -> int:
    if not STATE_FILE.exists():
        print("no stack is recorded; nothing to stop")
        return 0
    stop_state(json.loads(STATE_FILE.read_text()))
    shutil.rmtree(STACK_DIR, ignore_errors=True)
    print("stack stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the local stack in the background")
    commands.add_parser("down", help="stop the stack that `up` started")
    commands.add_parser("demo", help="the main job, end to end (see devstack/demo.py)")
    commands.add_parser("chaos", help="random faults under a backlog (see devstack/chaos.py)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from devstack import demo

        return demo.main(rest)
    if args.command == "chaos":
        from devstack import chaos

        return chaos.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "down":
        return stack_down()
    return stack_up()


if __name__ == "__main__":
    sys.exit(main())
