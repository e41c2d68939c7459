"""The many-policies benchmark: hundreds of ProcessingPolicies on one operator, one database.

It starts its own control plane (etcd, kube-apiserver; no controller manager, whose own
writes would blur the count), PostgreSQL, Redis, one Celery worker serving every policy
(``devstack.scale_app``: a table and a task per policy) and the operator as a real process
(``devstack.operators``, at info level), then applies ``--policies`` policies and prints:

* policies Ready and rows processed, and how long until all were;
* the operator's peak PostgreSQL connections (``pg_stat_activity`` by application name,
  sampled every 0.1 s from before the first policy to the end) against its bound;
* the operator's RSS (and its peak, ``VmHWM``) from ``/proc``;
* idle CPU: the operator's user + system time over ``--idle-seconds`` once all work is done
  and the status writes it caused have drained, as % of one core;
* API writes per policy per minute while idle: the apiserver's own
  ``apiserver_request_total`` for POST/PUT/PATCH/DELETE on our resources, kopf's peering
  and Events, read before and after the idle window; and the pod watches it holds open.

Idle sweeps run every ``--sweep-interval`` (30 s, as in the e2e tests) during the window, so
it covers the steady cost of sweeping. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from celery_app.demo import schema
from celery_reconciler import pools
from devstack import kube as devstack_kube
from devstack import operators, scale_app, workers
from devstack import postgres as devstack_postgres
from devstack import redis as devstack_redis

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "charts" / "celery-reconciler" / "files" / "crds"
PEERING_CRDS = ROOT / "charts" / "celery-reconciler" / "crds" / "kopf-peerings.yaml"
NAMESPACE = "bench"
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] == name:
            found.append((dict(_LABEL.findall(match["labels"])), float(match["value"])))
    return found


def operator_writes(metrics_text: str) -> dict[str, float]:
    """Write requests the apiserver served, by resource, for what only the operator writes."""
    writes: dict[str, float] = {}
    for labels, value in metric_samples(metrics_text, "apiserver_request_total"):
        ours = labels.get("group") in ("celery-reconciler.io", "kopf.dev") or (
            labels.get("resource") == "events"
        )
        if ours and labels.get("verb") in WRITE_VERBS:
            resource = labels.get("resource", "?")
            if labels.get("subresource"):
                resource += "/" + labels["subresource"]
            writes[resource] = writes.get(resource, 0.0) + value
    return writes


def pod_watches(metrics_text: str) -> float:
    return sum(
        value
        for labels, value in metric_samples(metrics_text, "apiserver_longrunning_requests")
        if labels.get("resource") == "pods" and labels.get("verb") == "WATCH"
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


def policies_json(plane: devstack_kube.ControlPlane) -> list[dict[str, object]]:
    out = plane.kubectl("-n", NAMESPACE, "get", "processingpolicy", "-o", "json").stdout
    return list(json.loads(out)["items"])


def wait_until(check: Callable[[], bool], *, timeout_seconds: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_seconds:
            raise SystemExit(f"gave up after {timeout_seconds:.0f}s waiting for {what}")
        time.sleep(2.0)
    return time.monotonic() - started


def run(args: argparse.Namespace, workdir: Path) -> None:
    count = args.policies
    plane = devstack_kube.start(workdir / "kube", controller_manager=False)
    database = devstack_postgres.start(workdir / "postgres")
    broker = devstack_redis.start(workdir / "redis")
    worker = operator = None
    try:
        plane.kubectl("apply", "--server-side", "-f", str(CRD_DIR))
        plane.kubectl("apply", "--server-side", "-f", str(PEERING_CRDS))
        plane.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/processingpolicies.celery-reconciler.io",
            "crd/processingstatuses.celery-reconciler.io",
        )
        plane.kubectl("create", "namespace", NAMESPACE)
        dsn = database.create_database("policies")
        scale_app.create_tables(dsn, count=count, rows_each=args.rows_each)
        worker = workers.start_worker(
            pod_name="scale-worker",
            broker_url=broker.url,
            dsn=dsn,
            log_dir=workdir,
            concurrency=2,
            app="devstack.scale_app",
            queue=scale_app.QUEUE,
            extra_env={"SCALE_TABLES": str(count)},
        )
        with scale_app.ConnectionSampler(dsn) as sampler:
            operator = operators.start(
                plane,
                log_dir=workdir,
                extra_env={pools.MAX_CONNECTIONS_ENV: str(args.max_connections)},
                verbose=False,
            )
            pid = operator.process.pid
            assert pid is not None
            items = schema.secrets(dsn=dsn, broker_url=broker.url)
            secrets = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
            plane.kubectl("-n", NAMESPACE, "apply", "-f", "-", input=secrets)
            manifest = scale_app.policies_manifest(count=count, sweep_interval=args.sweep_interval)
            applied = time.monotonic()
            plane.kubectl("-n", NAMESPACE, "apply", "-f", "-", input=manifest)
            wait_until(
                lambda: scale_app.pending_tables(dsn, count=count) == [],
                timeout_seconds=900,
                what="every row processed",
            )
            processed_after = time.monotonic() - applied
            wait_until(
                lambda: scale_app.not_ready(policies_json(plane)) == [],
                timeout_seconds=900,
                what="every policy Ready",
            )
            ready_after = time.monotonic() - applied
            ready = count - len(scale_app.not_ready(policies_json(plane)))
            processed = scale_app.processed_rows(dsn, count=count)
            # The counts' last refreshes (in flight -> succeeded) are still going out.
            time.sleep(args.settle_seconds)
            metrics_before = plane.kubectl("get", "--raw", "/metrics").stdout
            cpu_before, idle_started = cpu_seconds(pid), time.monotonic()
            time.sleep(args.idle_seconds)
            idle_seconds = time.monotonic() - idle_started
            cpu_idle = cpu_seconds(pid) - cpu_before
            metrics_after = plane.kubectl("get", "--raw", "/metrics").stdout
            rss, peak_rss = memory_mib(pid, "VmRSS"), memory_mib(pid, "VmHWM")
        before, after = operator_writes(metrics_before), operator_writes(metrics_after)
        idle_writes = {key: after[key] - before.get(key, 0.0) for key in after}
        total_idle_writes = sum(idle_writes.values())
        per_policy_minute = total_idle_writes / count / (idle_seconds / 60)
        print(f"policies: {count} applied, {ready} Ready ({ready_after:.0f}s after apply)")
        print(
            f"rows: {processed} of {count * args.rows_each} processed "
            f"({processed_after:.0f}s after apply)"
        )
        print(
            f"peak operator connections: {sampler.peak} (bound {args.max_connections}, "
            f"{sampler.samples} samples of pg_stat_activity)"
        )
        print(
            f"pod watch requests open at the apiserver: {pod_watches(metrics_after):.0f} "
            f"(all {count} policies select the same pods)"
        )
        print(f"operator RSS: {rss:.0f} MiB (peak {peak_rss:.0f} MiB)")
        print(
            f"idle CPU: {100 * cpu_idle / idle_seconds:.2f}% of a core "
            f"({cpu_idle:.1f} s over {idle_seconds:.0f} s, sweeps every {args.sweep_interval})"
        )
        by_resource = ", ".join(f"{k} {v:.0f}" for k, v in sorted(idle_writes.items()) if v)
        print(
            f"API writes when idle: {total_idle_writes:.0f} in {idle_seconds:.0f} s = "
            f"{per_policy_minute:.3f} per policy per minute ({by_resource or 'none'})"
        )
    finally:
        if operator is not None:
            operator.stop()
        if worker is not None:
            worker.stop()
        broker.stop()
        database.remove()
        plane.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks policies", description=__doc__)
    parser.add_argument("--policies", type=int, default=500)
    parser.add_argument("--rows-each", type=int, default=3)
    parser.add_argument("--max-connections", type=int, default=pools.DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--sweep-interval", default="30s")
    parser.add_argument("--settle-seconds", type=float, default=30.0)
    parser.add_argument("--idle-seconds", type=float, default=300.0)
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args, args.workdir)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-policies-") as workdir:
        run(args, Path(workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
