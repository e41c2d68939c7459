"""``python -m devstack up|down|demo``: the local stack for a person, outside pytest.

``up`` starts the same real servers the tests use — and the node that runs the project's
image — and leaves them running in the background, recording their PIDs (and the node's
paths and cgroup root) in ``.stack/state.json`` so ``down`` can stop them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from devstack import kube, node, postgres, processes, redis

STACK_DIR = Path(__file__).resolve().parent.parent / ".stack"
STATE_FILE = STACK_DIR / "state.json"


def stack_up() -> int:
    if STATE_FILE.exists():
        print(f"a stack is already recorded in {STATE_FILE}; run `make stack-down` first")
        return 1
    STACK_DIR.mkdir(exist_ok=True)
    database = postgres.start(STACK_DIR / "postgres")
    broker = redis.start(STACK_DIR / "redis")
    plane = kube.start(STACK_DIR / "kube")
    try:
        worker_node = node.start(plane, STACK_DIR / "node")
    except BaseException:
        # Nothing is recorded yet, so `make stack-down` could not stop these.
        plane.stop()
        broker.stop()
        database.remove()
        raise
    pids = [
        p.pid
        for p in (
            plane.controller_manager,
            plane.apiserver,
            plane.etcd,
            broker.process,
            database.process,
        )
        if p is not None and p.pid is not None
    ]
    STATE_FILE.write_text(
        json.dumps(
            {
                "pids": pids,
                "postgres_home": str(database.data_dir.parent),
                "node": worker_node.record(),
            },
            indent=2,
        )
    )
    env_file = STACK_DIR / "env.sh"
    env_file.write_text(
        f"export KUBECONFIG={plane.kubeconfig}\n"
        f"export PATH={plane.bin_dir}:$PATH\n"
        f"export DATABASE_URL='{database.dsn}'\n"
        f"export BROKER_URL='{broker.url}'\n"
    )
    env_file.chmod(0o600)
    print(
        "stack is up: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, "
        f"node {worker_node.name} (kubelet, containerd, runc), PostgreSQL, Redis"
    )
    print(f"  image:     {worker_node.image.ref} (imagePullPolicy: Never; hostNetwork Pods)")
    print(f"  logs:      {STACK_DIR}")
    print(f"  use it:    source {env_file}   # sets KUBECONFIG, PATH, DATABASE_URL, BROKER_URL")
    print("  then:      kubectl get namespaces")
    print("  stop it:   make stack-down")
    return 0


def stack_down() -> int:
    if not STATE_FILE.exists():
        print("no stack is recorded; nothing to stop")
        return 0
    state = json.loads(STATE_FILE.read_text())
    # The node first: its containers and mounts must go while the apiserver still answers.
    if "node" in state:
        node.stop_recorded(state["node"])
    for pid in state["pids"]:
        processes.stop_pid(pid)
    shutil.rmtree(state["postgres_home"], ignore_errors=True)
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
