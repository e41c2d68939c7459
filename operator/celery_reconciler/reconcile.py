"""One sweep of one policy, with no Kubernetes: expire, claim (commit), then publish.

``reconcile_once`` is the whole operator minus its triggers. The operator's loop (after
start-up, a pod restart, ``sweep-now``) and the CLI all call it; the tests call it
directly against real PostgreSQL and Redis. It reads like the invariants:

1. publish the policy's retry/lease rules to the ledger (workers read them there);
2. expire running leases that ran out — each is a failed attempt (invariant 1, 4);
3. settle ``retry_wait`` rows whose entry the source already shows processed;
4. page through pending ids in keyset order (invariant 5); for each page, ONE transaction
   reads the page and claims the eligible entries with fresh fence tokens and leases, and
   commits — only then are the page's messages published, pipelined (invariant 3);
5. a publish that fails releases its claims at once, so the next sweep re-dispatches them
   without waiting for the lease; a crash between claim and publish (the process dies)
   leaves them to lease expiry. Either way nothing is lost.

The broker is a ``broker.Publisher``; ``publish`` may be replaced by a callable for tests
that need to fail at an exact point (e.g. "crash between claim and publish") without
patching production code.

Unknown task names: a broker cannot know whether some worker registers ``spec.task.name``,
so publishing succeeds. The worker integration (``celery_app.reliable``) hooks Celery's
``task_unknown`` signal and records the delivery in the ledger as a failed attempt with the
error "no task named ... is registered on worker ...", so the entry follows the retry
policy, ends dead with that reason if it is never fixed, and ``SweepResult.unstarted``
counts messages that expired unstarted (no worker consumed them at all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg

from celery_reconciler import broker as broker_module
from celery_reconciler import ledger, planning, source
from celery_reconciler import policy as policy_module

DatabaseUnavailable = ledger.DatabaseUnavailable
BrokerUnavailable = broker_module.BrokerUnavailable
SourceInvalid = source.SourceInvalid

PublishFunction = Callable[[Sequence[broker_module.TaskMessage]], object]


class Database:
    """A DSN and the autocommit connection opened from it on demand.

    A connection that failed is dropped and reopened by the next call, so a sweep after a
    database restart just works. The DSN is kept private and never appears in ``repr``.
    """

    def __init__(self, dsn: str, *, application_name: str = "celery-reconciler") -> None:
        self._dsn = dsn
        self._application_name = application_name
        self._connection: psycopg.Connection[Any] | None = None
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"Database({ledger.describe_dsn(self._dsn)})"

    def connection(self) -> psycopg.Connection[Any]:
        if self._connection is None or self._connection.closed:
            self._connection = ledger.connect(self._dsn, application_name=self._application_name)
            self._schema_ready = False
        if not self._schema_ready:
            ledger.ensure_schema(self._connection)
            self._schema_ready = True
        return self._connection

    @contextlib.contextmanager
    def session(self, *, doing: str) -> Iterator[psycopg.Connection[Any]]:
        """The connection, with a connection failure raised as ``DatabaseUnavailable``
        saying what we were ``doing`` (and no DSN)."""
        try:
            yield self.connection()
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            raise self.unavailable(error, doing=doing) from None

    def unavailable(self, error: BaseException, *, doing: str) -> DatabaseUnavailable:
        """Forget the broken connection and describe the failure without secrets."""
        self.close()
        return ledger.unavailable(error, dsn=self._dsn, doing=doing)

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            finally:
                self._connection = None


@dataclasses.dataclass(frozen=True)
class SweepResult:
    policy_key: str
    suspended: bool
    expired: ledger.ExpiredLeases
    settled: int
    in_flight_before: int
    budget: int
    pages: int
    claimed: int
    published: int
    seconds_until_next_due: float | None
    claim_seconds: float
    publish_seconds: float
    duration_seconds: float

    @property
    def entries_per_second(self) -> float:
        return self.published / self.duration_seconds if self.duration_seconds > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class StatusSnapshot:
    """What ``ProcessingStatus`` shows. ``pending`` counts every entry matching the predicate
    (whatever its ledger state); the others are ledger states."""

    pending: int
    oldest_pending_seconds: float | None
    in_flight: int
    retrying: int
    succeeded: int
    dead: int
    seconds_until_next_due: float | None


def reconcile_once(
    policy: policy_module.Policy,
    *,
    db: Database,
    broker: broker_module.Publisher,
    publish: PublishFunction | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> SweepResult:
    """Run one sweep of ``policy``; see the module docstring for the steps.

    Raises ``DatabaseUnavailable``, ``BrokerUnavailable`` or ``SourceInvalid`` with messages
    that name the problem and carry no DSN or password. Whatever it raises, every claimed
    entry is either published, released for the next sweep, or recovered at lease expiry.
    """
    started = clock()
    time_limits = planning.task_time_limits_seconds(policy.lease.timeout_seconds)

    def publish_with_broker(messages: Sequence[broker_module.TaskMessage]) -> object:
        return broker.publish(
            task_name=policy.task.name,
            queue=policy.task.queue,
            messages=messages,
            time_limits_seconds=time_limits,
        )

    send = publish or publish_with_broker
    doing = "preparing the sweep"
    try:
        conn = db.connection()
        still_pending = functools.partial(source.filter_pending, conn, policy.source)
        ledger.upsert_policy(conn, policy)
        doing = "expiring leases"
        expired = ledger.expire_leases(conn, policy_key=policy.key)
        settled = ledger.settle_finished(conn, policy_key=policy.key, still_pending=still_pending)
        in_flight = ledger.count_in_flight(conn, policy_key=policy.key)
        budget = (
            0
            if policy.schedule.suspend
            else planning.sweep_claim_budget(
                in_flight=in_flight, max_in_flight=policy.limits.max_in_flight
            )
        )
        batch_size = policy.limits.batch_size
        if policy.limits.dispatch_per_second > 0:
            # A page is published as one burst; keep bursts to about a second's worth.
            batch_size = min(batch_size, max(1, int(policy.limits.dispatch_per_second)))

        remaining = budget
        after: tuple[Any, ...] | None = None
        pages = claimed = published = 0
        claim_seconds = publish_seconds = 0.0
        while remaining > 0:
            pause = planning.dispatch_pause_seconds(
                dispatched=published,
                elapsed_seconds=clock() - started,
                dispatch_per_second=policy.limits.dispatch_per_second,
            )
            if pause > 0:
                sleep(pause)
            size = planning.page_size(remaining_budget=remaining, batch_size=batch_size)
            doing = "claiming entries"
            claim_started = clock()
            with conn.transaction():
                rows = source.pending_page(conn, policy.source, after=after, limit=size)
                claims = ledger.claim(
                    conn,
                    policy_key=policy.key,
                    entry_ids=[row.entry_id for row in rows],
                    lease_seconds=policy.lease.timeout_seconds,
                    still_pending=still_pending,
                )
            claim_seconds += clock() - claim_started
            pages += 1
            if claims:
                publish_started = clock()
                _publish_or_release(
                    conn,
                    send,
                    [
                        broker_module.TaskMessage(entry_id=c.entry_id, task_id=str(c.fence_token))
                        for c in claims
                    ],
                    claims,
                )
                publish_seconds += clock() - publish_started
                claimed += len(claims)
                published += len(claims)
                remaining -= len(claims)
            if len(rows) < size:
                break
            after = rows[-1].key
        doing = "reading the next due time"
        next_due = ledger.seconds_until_next_due(conn, policy_key=policy.key)
    except (psycopg.OperationalError, psycopg.InterfaceError) as error:
        raise db.unavailable(error, doing=doing) from None
    return SweepResult(
        policy_key=policy.key,
        suspended=policy.schedule.suspend,
        expired=expired,
        settled=settled,
        in_flight_before=in_flight,
        budget=budget,
        pages=pages,
        claimed=claimed,
        published=published,
        seconds_until_next_due=next_due,
        claim_seconds=claim_seconds,
        publish_seconds=publish_seconds,
        duration_seconds=clock() - started,
    )


def _publish_or_release(
    conn: psycopg.Connection[Any],
    send: PublishFunction,
    messages: list[broker_module.TaskMessage],
    claims: list[ledger.Claim],
) -> None:
    try:
        send(messages)
    except BrokerUnavailable:
        # The claims are committed but their messages may not exist: make them eligible
        # now rather than after the lease. Fencing drops any message that did get through.
        ledger.release_claims(conn, fence_tokens=[claim.fence_token for claim in claims])
        raise


def expire_worker_leases(
    policy: policy_module.Policy, *, db: Database, worker: str
) -> ledger.ExpiredLeases:
    """The pod-restart hook: expire what ``worker`` held so the next sweep re-dispatches it."""
    with db.session(doing=f"expiring the leases of worker {worker}") as conn:
        return ledger.expire_leases_held_by(conn, policy_key=policy.key, worker=worker)


def lease_holders(policy: policy_module.Policy, *, db: Database) -> set[str]:
    """Pod names holding running leases of ``policy`` (to find pods that vanished)."""
    with db.session(doing="listing lease holders") as conn:
        return ledger.lease_holders(conn, policy_key=policy.key)


def retry_dead(
    policy: policy_module.Policy, *, db: Database, entry_ids: Sequence[str] | None = None
) -> int:
    """Bring dead entries back (all, or ``entry_ids``); the next sweep dispatches them."""
    with db.session(doing="reviving dead entries") as conn:
        return ledger.retry_dead(conn, policy_key=policy.key, entry_ids=entry_ids)


def collect_status(policy: policy_module.Policy, *, db: Database) -> StatusSnapshot:
    with db.session(doing="reading status counts") as conn:
        summary = source.pending_summary(conn, policy.source)
        counts = ledger.counts(conn, policy_key=policy.key)
    return StatusSnapshot(
        pending=summary.count,
        oldest_pending_seconds=summary.oldest_seconds,
        in_flight=counts.in_flight,
        retrying=counts.retrying,
        succeeded=counts.succeeded,
        dead=counts.dead,
        seconds_until_next_due=counts.seconds_until_next_due,
    )


def collect_outcomes(
    policy: policy_module.Policy, *, db: Database, since: datetime.datetime | None
) -> ledger.Outcomes:
    """Attempts finished since the last call, for the operator's Prometheus counters."""
    with db.session(doing="reading finished attempts") as conn:
        return ledger.outcomes_since(conn, policy_key=policy.key, since=since)


def release_queued(policy: policy_module.Policy, *, db: Database) -> int:
    """The broker restarted: re-dispatch what was queued instead of waiting for the lease."""
    with db.session(doing="releasing queued entries") as conn:
        return ledger.release_queued(conn, policy_key=policy.key)
