"""One sweep of one policy, with no Kubernetes: expire, claim (commit), then publish.

``reconcile_once`` is the whole operator minus its triggers. The operator's loop (after
start-up, a pod restart, ``sweep-now``) and the CLI all call it; the tests call it
directly against real PostgreSQL and Redis. It reads like the invariants:

1. publish the policy's retry/lease rules to the ledger (workers read them there) and, in
   the same statement, survey what the ledger holds (``ledger.survey``): of the upkeep in
   steps 2-3 (and the history's retention), only what has work to do runs
   (``planning.sweep_chores``), so a policy with nothing going on costs a few statements;
2. end the worker incarnations whose heartbeat is older than their timeout (they stopped
   their own bodies), then expire the running attempts of ended incarnations — and, as the
   backstop for workers without one, attempts whose lease ran out; each is a failed attempt
   (invariant 1, 4);
3. settle ``retry_wait`` and ``dead`` rows whose entry the source already shows processed;
4. re-dispatch due retries first — published *ahead* of the queue, since they already
   waited once and the backlog's keyset order need not reach them;
5. page through pending ids in keyset order (invariant 5); for each page, ONE statement
   (its own transaction) reads the page and claims its new entries with fresh fence tokens
   and leases, and a second transaction, only if needed, claims those already in the
   ledger that may run again (``ledger.claim_page``) — only once they committed are the
   page's messages published, pipelined (invariant 3), in a thread while the next page is
   claimed (``_PagePublisher``);
6. a publish that fails releases its claims at once, so the next sweep re-dispatches them
   without waiting for the lease; a crash between claim and publish (the process dies)
   leaves them to lease expiry. Either way nothing is lost.

``rescue`` is the pod-restart hook's part: end the incarnations a pod event killed and
re-dispatch their entries ahead of the queue at once, without waiting for a sweep.

The broker is a ``broker.Publisher``; ``publish`` may be replaced by a callable for tests
that need to fail at an exact point (e.g. "crash between claim and publish") without
patching production code.

Unknown task names: a broker cannot know whether some worker registers ``spec.task.name``,
so publishing succeeds. The worker integration (``celery_reconciler_worker``) hooks Celery's
``task_unknown`` signal and records the delivery in the ledger as a failed attempt with the
error "no task named ... is registered on worker ...", so the entry follows the retry
policy, ends dead with that reason if it is never fixed, and ``SweepResult.unstarted``
counts messages that expired unstarted (no worker consumed them at all).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import psycopg

from celery_reconciler import broker as broker_module
from celery_reconciler import ledger, overlaps, planning, sharding, source
from celery_reconciler import policy as policy_module

DatabaseUnavailable = ledger.DatabaseUnavailable
DsnInvalid = ledger.DsnInvalid
LedgerPermissionDenied = ledger.LedgerPermissionDenied
BrokerUnavailable = broker_module.BrokerUnavailable
SourceInvalid = source.SourceInvalid

PublishFunction = Callable[[Sequence[broker_module.TaskMessage]], object]


class Sessions(Protocol):
    """Where a sweep, a rescue or a status read gets its connection: ``Database`` (one
    connection of its own, for the CLI and the tests) or ``pools.PooledDatabase`` (shared by
    the operator's policies). A ``session`` keeps one connection for its whole duration."""

    def session(
        self, *, doing: str
    ) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]: ...

    def failure(self, error: psycopg.Error, *, doing: str) -> Exception: ...


class Database:
    """A DSN and the autocommit connection opened from it on demand.

    A connection that failed is dropped and reopened by the next call, so a sweep after a
    database restart just works. The DSN is kept private and never appears in ``repr``.
    Sessions are the operator's: bounded by a statement and a lock timeout.
    """

    def __init__(
        self,
        dsn: str,
        *,
        application_name: str = "celery-reconciler",
        statement_timeout_seconds: float = ledger.OPERATOR_STATEMENT_TIMEOUT_SECONDS,
        lock_timeout_seconds: float = ledger.OPERATOR_LOCK_TIMEOUT_SECONDS,
    ) -> None:
        self._dsn = dsn
        self._application_name = application_name
        self._statement_timeout_seconds = statement_timeout_seconds
        self._lock_timeout_seconds = lock_timeout_seconds
        self._connection: psycopg.Connection[Any] | None = None
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"Database({ledger.describe_dsn(self._dsn)})"

    def connection(self) -> psycopg.Connection[Any]:
        if self._connection is None or self._connection.closed:
            self._connection = ledger.connect(
                self._dsn,
                application_name=self._application_name,
                statement_timeout_seconds=self._statement_timeout_seconds,
                lock_timeout_seconds=self._lock_timeout_seconds,
            )
            self._schema_ready = False
        if not self._schema_ready:
            try:
                ledger.ensure_schema(self._connection)
            except psycopg.Error as error:
                raise self.failure(error, doing="creating the ledger schema") from None
            self._schema_ready = True
        return self._connection

    @contextlib.contextmanager
    def session(self, *, doing: str) -> Iterator[psycopg.Connection[Any]]:
        """The connection, with a database error raised as what it means for the user
        (``ledger.database_failure``) saying what we were ``doing`` (and no DSN)."""
        try:
            yield self.connection()
        except psycopg.Error as error:
            raise self.failure(error, doing=doing) from None

    def failure(self, error: psycopg.Error, *, doing: str) -> Exception:
        """``ledger.database_failure``, forgetting a connection that broke."""
        failure = ledger.database_failure(error, dsn=self._dsn, doing=doing)
        if isinstance(failure, DatabaseUnavailable):
            self.close()
        return failure

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
    missing_messages: int  # queued entries whose message was gone, dispatched again
    in_flight_before: int
    budget: int
    pages: int
    claimed: int
    published: int
    seconds_until_next_due: float | None
    claim_seconds: float
    publish_seconds: float
    duration_seconds: float
    pruned: ledger.Pruned  # history past retention, deleted by this sweep
    # Set when the sweep stopped dispatching to keep to ``dispatchPerSecond``: sweep again
    # this much later (``planning.next_wakeup_seconds``).
    rate_allows_in_seconds: float | None = None

    @property
    def idle(self) -> bool:
        """Nothing found and nothing done: no entry dispatched, lost, settled or pruned."""
        return not (
            self.published
            or self.expired.retry_now
            or self.expired.dead
            or self.expired.unstarted
            or self.missing_messages
            or self.settled
            or self.pruned.attempts
            or self.pruned.entries
        )

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
    running: int
    consumption: ledger.Consumption
    outcomes: ledger.Outcomes  # attempts finished in the window asked for


def reconcile_once(
    policy: policy_module.Policy,
    *,
    db: Sessions,
    broker: broker_module.Publisher,
    publish: PublishFunction | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    hold_dispatch: bool = False,
    fence: sharding.Fence | None = None,
) -> SweepResult:
    """Run one sweep of ``policy``; see the module docstring for the steps.

    ``hold_dispatch``: claim nothing new (``planning.RatePacing``: the rate allows no page
    yet); leases still expire and lost messages are still re-dispatched.

    ``fence``: this replica's claim to the policy (active-active replicas). The sweep then
    opens an interval in the ledger's ``sweeps`` and claims only while the ledger names it
    the owner; ``FencedOut`` when another replica took the policy over.

    Raises ``DatabaseUnavailable`` (``DsnInvalid``), ``LedgerPermissionDenied``,
    ``BrokerUnavailable`` or ``SourceInvalid`` with messages that name the problem and carry
    no DSN or password; any other error is a bug of ours. Whatever it raises, every claimed
    entry is either published, released for the next sweep, or recovered at lease expiry.
    """
    # One connection for the whole sweep: its claims, releases and publishes follow each
    # other on it, and a shared pool must not hand it to another policy half-way.
    with db.session(doing="preparing the sweep") as conn:
        return _sweep(
            policy,
            conn=conn,
            db=db,
            broker=broker,
            publish=publish,
            sleep=sleep,
            clock=clock,
            hold_dispatch=hold_dispatch,
            fence=fence,
        )


def _sweep(
    policy: policy_module.Policy,
    *,
    conn: psycopg.Connection[Any],
    db: Sessions,
    broker: broker_module.Publisher,
    publish: PublishFunction | None,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
    hold_dispatch: bool,
    fence: sharding.Fence | None,
) -> SweepResult:
    """The steps of the module docstring in their order, inside the sweep's interval of
    ownership (``fence``); a database failure names the step it met (``_Sweeping.doing``)."""
    started = clock()
    sweeping = _Sweeping(
        policy=policy,
        conn=conn,
        broker=broker,
        send=publish or functools.partial(_publish, policy, broker, ahead=False),
        send_ahead=publish or functools.partial(_publish, policy, broker, ahead=True),
        still_pending=functools.partial(source.filter_pending, conn, policy.source),
        sleep=sleep,
        clock=clock,
        fence=fence,
        started=started,
    )
    sweep_id: int | None = None
    try:
        if fence is not None:
            sweeping.doing = "taking the policy's ownership"
            sweep_id = ledger.begin_sweep(conn, fence)
        upkeep = _upkeep(sweeping)
        in_flight, budget = _in_flight_and_budget(
            sweeping, upkeep=upkeep, hold_dispatch=hold_dispatch
        )
        redispatched = _redispatch_due_retries(sweeping, chores=upkeep.chores, budget=budget)
        budget -= redispatched
        backlog = _dispatch_backlog(
            sweeping, budget=budget, already_published=redispatched + upkeep.lost.redispatched
        )
        sweeping.doing = "reading the next due time"
        next_due = _next_due(sweeping, upkeep=upkeep, backlog=backlog)
        if fence is not None and sweep_id is not None:
            ledger.end_sweep(conn, fence, sweep_id=sweep_id, finished=True)
    except psycopg.Error as error:
        raise db.failure(error, doing=sweeping.doing) from None
    except ledger.FencedOut:
        raise
    except Exception:
        if fence is not None and sweep_id is not None:
            # Best effort: an interval left open is closed by the next owner's takeover.
            with contextlib.suppress(Exception):
                ledger.end_sweep(conn, fence, sweep_id=sweep_id, finished=False)
        raise
    return SweepResult(
        policy_key=policy.key,
        suspended=policy.schedule.suspend,
        expired=upkeep.expired,
        settled=upkeep.settled,
        missing_messages=upkeep.lost.redispatched,
        in_flight_before=in_flight,
        budget=budget,
        pages=backlog.pages,
        claimed=backlog.claimed,
        published=backlog.published,
        seconds_until_next_due=next_due,
        claim_seconds=backlog.claim_seconds,
        publish_seconds=backlog.publish_seconds,
        duration_seconds=clock() - started,
        pruned=upkeep.pruned,
        rate_allows_in_seconds=backlog.rate_allows_in,
    )


@dataclasses.dataclass
class _Sweeping:
    """One sweep under way: what its steps share, and the step it is in now (``doing``:
    what a database failure says the sweep was doing)."""

    policy: policy_module.Policy
    conn: psycopg.Connection[Any]
    broker: broker_module.Publisher
    send: PublishFunction
    send_ahead: PublishFunction
    still_pending: Callable[[Sequence[str]], set[str]]
    sleep: Callable[[float], None]
    clock: Callable[[], float]
    fence: sharding.Fence | None
    started: float
    doing: str = "preparing the sweep"


@dataclasses.dataclass(frozen=True)
class _Upkeep:
    """What the ledger held at the start of a sweep, and what the sweep did about it before
    claiming anything (steps 1-3 and the lost messages)."""

    found: ledger.Survey
    chores: planning.SweepChores
    expired: ledger.ExpiredLeases
    settled: int
    pruned: ledger.Pruned
    lost: _LostMessages


def _upkeep(sweeping: _Sweeping) -> _Upkeep:
    """Survey the ledger, then do only the upkeep it shows work for: end silent
    incarnations, expire lost attempts, settle what the source shows processed, keep the
    history, and re-dispatch queued entries whose message the broker lost."""
    policy, conn, clock = sweeping.policy, sweeping.conn, sweeping.clock
    sweeping.doing = "reading the ledger"
    found = ledger.survey(conn, policy, stranded_seconds=STRANDED_DELIVERY_SECONDS)
    chores = planning.sweep_chores(
        running=found.running,
        unsettled=found.unsettled,
        due_retries=found.due_retries,
        queued_a_while=found.queued_a_while,
        unfolded=found.unfolded,
        history_expired=found.history_expired,
        silent_incarnations=found.silent_incarnations,
        incarnations_expired=found.incarnations_expired,
    )
    sweeping.doing = "expiring leases"
    ended_silent = ledger.end_silent_incarnations(conn) if chores.end_silent_incarnations else 0
    expired = (
        ledger.expire_leases(conn, policy_key=policy.key)
        if chores.expire_lost_attempts
        else ledger.ExpiredLeases(retry_now=0, dead=0, unstarted=found.unstarted)
    )
    settled = (
        ledger.settle_finished(conn, policy_key=policy.key, still_pending=sweeping.still_pending)
        if chores.settle
        else 0
    )
    sweeping.doing = "keeping the ledger's history"
    if chores.fold_successes:
        ledger.fold_successes(conn, policy_key=policy.key)
    pruned = (
        ledger.prune(
            conn, policy_key=policy.key, retention_seconds=policy.history.retention_seconds
        )
        if chores.prune_history
        else ledger.Pruned(attempts=0, entries=0)
    )
    if chores.prune_incarnations:
        ledger.prune_ended_incarnations(conn)
    sweeping.doing = "re-dispatching deliveries that never started"
    if chores.expire_lost_attempts and (
        ended_silent or expired.retry_now or expired.dead or expired.unstarted
    ):
        # A worker died: what it took in its last moments may be gone with it.
        _queue_audit_due(conn, policy, at=clock())
    lost = (
        _redispatch_stranded(
            conn,
            policy,
            sweeping.broker,
            sweeping.send_ahead,
            sleep=sweeping.sleep,
            fence=sweeping.fence,
            queued_a_while=found.queued_a_while,
            clock=clock,
        )
        if chores.look_for_stranded
        else _LostMessages(audited=False, redispatched=0)
    )
    return _Upkeep(
        found=found, chores=chores, expired=expired, settled=settled, pruned=pruned, lost=lost
    )


def _in_flight_and_budget(
    sweeping: _Sweeping, *, upkeep: _Upkeep, hold_dispatch: bool
) -> tuple[int, int]:
    """How many entries are in flight after the upkeep (counted again only if it may have
    changed them), and how many this sweep may claim: none while suspended or held."""
    policy = sweeping.policy
    in_flight = (
        ledger.count_in_flight(sweeping.conn, policy_key=policy.key)
        if upkeep.chores.may_change_in_flight(queue_audited=upkeep.lost.audited)
        else upkeep.found.in_flight
    )
    budget = (
        0
        if policy.schedule.suspend or hold_dispatch
        else planning.sweep_claim_budget(
            in_flight=in_flight, max_in_flight=policy.limits.max_in_flight
        )
    )
    return in_flight, budget


def _redispatch_due_retries(
    sweeping: _Sweeping, *, chores: planning.SweepChores, budget: int
) -> int:
    """Due retries (a lost worker's attempts among them) go first and ahead of the queue:
    they waited once already, and the backlog's keyset order need not reach them."""
    policy = sweeping.policy
    sweeping.doing = "re-dispatching due retries"
    due = (
        ledger.due_retries(sweeping.conn, policy_key=policy.key, limit=budget)
        if chores.redispatch_due_retries
        else []
    )
    return _redispatch(
        sweeping.conn, policy, sweeping.send_ahead, entry_ids=due, fence=sweeping.fence
    )


@dataclasses.dataclass(frozen=True)
class _Backlog:
    """What a sweep claimed and published, page by page; ``claimed`` and ``published``
    count the re-dispatches before the backlog too."""

    pages: int
    claimed: int
    published: int
    claimed_again: int  # entries the ledger held already (their retry times changed)
    claim_seconds: float
    publish_seconds: float
    rate_allows_in: float | None


def _dispatch_backlog(sweeping: _Sweeping, *, budget: int, already_published: int) -> _Backlog:
    """Step 5: claim pending entries page by page in keyset order, from where the last
    sweep stopped, within ``budget`` and the policy's dispatch rate, each page published
    once its claim committed (``_PagePublisher``)."""
    policy, conn, clock = sweeping.policy, sweeping.conn, sweeping.clock
    batch_size = planning.dispatch_batch_size(
        batch_size=policy.limits.batch_size,
        dispatch_per_second=policy.limits.dispatch_per_second,
    )
    remaining = budget
    rate_allows_in: float | None = None
    resumed = _resume_position(conn, policy, now=clock())
    after = None if resumed is None else resumed.key
    pass_started = clock() if resumed is None else resumed.pass_started
    pages = 0
    claimed = published = already_published
    claimed_again = 0
    claim_seconds = 0.0
    send, send_ahead = sweeping.send, sweeping.send_ahead
    with _PagePublisher(conn, send=send, send_ahead=send_ahead, clock=clock) as pages_out:
        while remaining > 0:
            pause = planning.dispatch_pause_within_sweep(
                dispatched=published,
                elapsed_seconds=clock() - sweeping.started,
                dispatch_per_second=policy.limits.dispatch_per_second,
            )
            if pause is None:
                # The rate allows no more in this sweep; the loop sweeps again when it does.
                rate_allows_in = planning.dispatch_pause_seconds(
                    dispatched=published,
                    elapsed_seconds=clock() - sweeping.started,
                    dispatch_per_second=policy.limits.dispatch_per_second,
                )
                break
            if pause > 0:
                sweeping.sleep(pause)
            plan = planning.page_plan(remaining_budget=remaining, batch_size=batch_size)
            sweeping.doing = "claiming entries"
            claim_started = clock()
            page = _claim_page(
                conn,
                policy,
                after=after,
                plan=plan,
                still_pending=sweeping.still_pending,
                fence=sweeping.fence,
            )
            claims = page.claims
            claim_seconds += clock() - claim_started
            pages += 1
            if claims:
                sweeping.doing = "publishing"
                pages_out.publish(claims)
                claimed += len(claims)
                claimed_again += sum(claim.again for claim in claims)
                published += len(claims)
                remaining -= len(claims)
            if page.size < plan.rows:  # the end of the backlog
                if after is not None and resumed is not None:
                    # Resumed mid-way with budget left: the rows ahead of the position
                    # too, as a new pass.
                    after, resumed, pass_started = None, None, clock()
                    continue
                after = None
                break
            after = page.last_key
        if pages:
            _remember_position(conn, policy, after=after, pass_started=pass_started)
        sweeping.doing = "publishing"
    return _Backlog(
        pages=pages,
        claimed=claimed,
        published=published,
        claimed_again=claimed_again,
        claim_seconds=claim_seconds,
        publish_seconds=pages_out.seconds,
        rate_allows_in=rate_allows_in,
    )


def _next_due(sweeping: _Sweeping, *, upkeep: _Upkeep, backlog: _Backlog) -> float | None:
    """Seconds until the policy's next entry falls due: read from the ledger only where
    the sweep may have moved a due time, else worked out (``_next_due_after_first_claims``)."""
    policy, clock = sweeping.policy, sweeping.clock
    if upkeep.chores.may_change_schedule(queue_audited=upkeep.lost.audited) or (
        backlog.claimed_again
    ):
        return ledger.seconds_until_next_due(sweeping.conn, policy_key=policy.key)
    return _next_due_after_first_claims(
        policy,
        surveyed=upkeep.found.seconds_until_next_due,
        elapsed_seconds=clock() - sweeping.started,
        claimed=backlog.claimed,
    )


# Where each policy's sweeps stopped reading their backlog (``planning.BacklogPosition``),
# by policy key, with what it is a position in: the database and the source. Kept in
# memory: a new process, like a new owner, simply starts a pass from the start.
_positions: dict[str, tuple[tuple[Any, ...], planning.BacklogPosition]] = {}


def _backlog_identity(
    conn: psycopg.Connection[Any], policy: policy_module.Policy
) -> tuple[Any, ...]:
    return (conn.info.host, conn.info.port, conn.info.dbname, policy.source)


def _resume_position(
    conn: psycopg.Connection[Any], policy: policy_module.Policy, *, now: float
) -> planning.BacklogPosition | None:
    kept = _positions.get(policy.key)
    if kept is None or kept[0] != _backlog_identity(conn, policy):
        return None
    return planning.sweep_resumes_at(
        kept[1], now=now, sweep_interval_seconds=policy.schedule.sweep_interval_seconds
    )


def _remember_position(
    conn: psycopg.Connection[Any],
    policy: policy_module.Policy,
    *,
    after: tuple[Any, ...] | None,
    pass_started: float,
) -> None:
    if after is None:
        _positions.pop(policy.key, None)
    else:
        position = planning.BacklogPosition(key=after, pass_started=pass_started)
        _positions[policy.key] = (_backlog_identity(conn, policy), position)


def _next_due_after_first_claims(
    policy: policy_module.Policy, *, surveyed: float | None, elapsed_seconds: float, claimed: int
) -> float | None:
    """The next due time without reading the ledger again: first claims only add leases
    that run out a lease from now, so it is the survey's or the newest lease's, the earlier
    (re-reading would cost a scan of every entry in flight, each sweep)."""
    before = None if surveyed is None else surveyed - elapsed_seconds
    if not claimed:
        return before
    lease = policy.lease.timeout_seconds
    return lease if before is None else min(before, lease)


def _claim_page(
    conn: psycopg.Connection[Any],
    policy: policy_module.Policy,
    *,
    after: tuple[Any, ...] | None,
    plan: planning.PagePlan,
    still_pending: Callable[[Sequence[str]], set[str]],
    fence: sharding.Fence | None,
) -> ledger.ClaimedPage:
    """The next page of pending entries the ledger does not hold, read and claimed
    (``ledger.claim_page``)."""
    try:
        return ledger.claim_page(
            conn,
            policy_key=policy.key,
            page_query=source.page_query_text(
                conn, policy.source, after=after is not None, skipping=ledger.not_held
            ),
            page_params=[*(after or ()), policy.key, plan.rows],
            key_width=source.key_width(policy.source),
            lease_seconds=policy.lease.timeout_seconds,
            still_pending=still_pending,
            sweeper=fence,
            claim_limit=plan.claims,
        )
    except psycopg.Error:
        # The statement reads the user's table too. A failure the spec causes is
        # ``SourceInvalid``, which reading the page alone tells apart by raising it; when
        # the read alone works, the failure was the ledger's.
        source.pending_page(conn, policy.source, after=after, limit=plan.rows)
        raise


def _publish(
    policy: policy_module.Policy,
    broker: broker_module.Publisher,
    messages: Sequence[broker_module.TaskMessage],
    *,
    ahead: bool,
) -> object:
    return broker.publish(
        task_name=policy.task.name,
        queue=policy.task.queue,
        messages=messages,
        time_limits_seconds=None,
        ahead=ahead,
    )


def _redispatch(
    conn: psycopg.Connection[Any],
    policy: policy_module.Policy,
    send: PublishFunction,
    *,
    entry_ids: Sequence[str],
    fence: sharding.Fence | None = None,
) -> int:
    """Claim the given ledger entries that are still pending in the source, then publish.

    For entries the ledger already knows (due retries, a lost worker's attempts): the source
    is asked first, because such an entry may have been processed by the very attempt that
    was lost (its body committed, its worker died before the done mark).
    """
    if not entry_ids:
        return 0
    with conn.transaction():
        pending = source.filter_pending(conn, policy.source, entry_ids)
        claims = ledger.claim(
            conn,
            policy_key=policy.key,
            entry_ids=[entry_id for entry_id in entry_ids if entry_id in pending],
            lease_seconds=policy.lease.timeout_seconds,
            still_pending=functools.partial(source.filter_pending, conn, policy.source),
            sweeper=fence,
        )
    if claims:
        _publish_or_release(conn, send, _messages(claims), claims)
    return len(claims)


def _messages(claims: Sequence[ledger.Claim]) -> list[broker_module.TaskMessage]:
    return [
        broker_module.TaskMessage(entry_id=claim.entry_id, task_id=str(claim.fence_token))
        for claim in claims
    ]


# A live worker starts a delivered body within milliseconds (its fence check), and a
# published message is in the queue at once. An entry queued for longer whose message is
# neither waiting in the queue nor taken within this long has lost it: its worker died
# between taking and starting it (kombu pops, then records the delivery: a kill in between
# leaves no trace in Redis at all), or the broker dropped it. Delivery times are the
# consumer's clock, so skew between hosts only shifts when the release happens.
STRANDED_DELIVERY_SECONDS = 2.0


# A consumer pops a message from the queue and only then records it as taken (kombu's
# Redis transport: BRPOP, then a pipeline into its unacked hash), so for a moment a live
# delivery is in neither place. A message seen missing twice, this long apart, is gone.
STRANDED_RECHECK_SECONDS = 0.5

# A message can be lost with no sign a sweep could count (``planning.queue_audit_needed``):
# the whole queue is read at least this often while entries wait in it, so such a loss is
# found within this long rather than at the lease (15 min by default). The read costs
# O(queue): 0.5-2.5 s for 20,000 messages on a loaded 2-core machine, once a minute.
QUEUE_AUDIT_INTERVAL_SECONDS = 60.0

# When each policy's queue was last read in full, by policy key, with the database, source
# and queue it is about. In memory: a new process reads the queue at its first sweep.
_queue_audits: dict[str, tuple[tuple[Any, ...], planning.QueueAudit]] = {}


def _audit_identity(conn: psycopg.Connection[Any], policy: policy_module.Policy) -> tuple[Any, ...]:
    return (*_backlog_identity(conn, policy), policy.task.queue)


def _queue_audit(
    conn: psycopg.Connection[Any], policy: policy_module.Policy
) -> planning.QueueAudit | None:
    kept = _queue_audits.get(policy.key)
    return None if kept is None or kept[0] != _audit_identity(conn, policy) else kept[1]


def _queue_audit_due(
    conn: psycopg.Connection[Any], policy: policy_module.Policy, *, at: float
) -> None:
    audit = planning.queue_audit_due(_queue_audit(conn, policy), at=at)
    if audit is not None:
        _queue_audits[policy.key] = (_audit_identity(conn, policy), audit)


@dataclasses.dataclass(frozen=True)
class _LostMessages:
    audited: bool  # the queue was read in full (entries may have left the flight)
    redispatched: int


def _redispatch_stranded(
    conn: psycopg.Connection[Any],
    policy: policy_module.Policy,
    broker: broker_module.Publisher,
    send: PublishFunction,
    *,
    sleep: Callable[[float], None] = time.sleep,
    fence: sharding.Fence | None = None,
    queued_a_while: int | None,
    clock: Callable[[], float] = time.monotonic,
) -> _LostMessages:
    """Account for every queued entry's message in the broker; re-dispatch, ahead of the
    queue, the entries whose message is gone — instead of letting them wait for the lease.

    The whole queue is read only when ``planning.queue_audit_needed`` says so, from
    ``queued_a_while`` (the survey's count of entries waiting for their message; ``None``:
    read it now, a worker just died) and the broker's count of the messages it holds.
    The ledger is read first, so a message that moves on meanwhile (taken, then started)
    is found in its new place or the entry is no longer queued; one that seems missing is
    looked for once more before it is released."""
    nothing = _LostMessages(audited=False, redispatched=0)
    now = clock()
    audit = _queue_audit(conn, policy)
    try:
        held = broker.messages_held(
            policy.task.queue, taken_within_seconds=STRANDED_DELIVERY_SECONDS
        )
    except BrokerUnavailable:
        return nothing  # the sweep's own publish meets the same broker and reports it
    if held is None:
        return nothing  # the broker cannot list its messages, nor needs to (broker/)
    if queued_a_while is not None and not planning.queue_audit_needed(
        audit=audit,
        queued_a_while=queued_a_while,
        messages_held=held,
        now=now,
        interval_seconds=QUEUE_AUDIT_INTERVAL_SECONDS,
    ):
        return nothing
    candidates = ledger.queued_since(conn, policy_key=policy.key, seconds=STRANDED_DELIVERY_SECONDS)
    missing = set(candidates)
    for look in range(2):
        if not missing:
            break
        if look:
            sleep(STRANDED_RECHECK_SECONDS)
        try:
            present = broker.messages_accounted_for(
                policy.task.queue, taken_within_seconds=STRANDED_DELIVERY_SECONDS
            )
        except BrokerUnavailable:
            return nothing
        if present is None:
            return nothing  # too long to read: the lease stays the backstop
        missing -= present
    _queue_audits[policy.key] = (
        _audit_identity(conn, policy),
        planning.queue_audit_done(audit, now=now),
    )
    if not missing:
        return _LostMessages(audited=True, redispatched=0)
    released = ledger.release_claims(conn, fence_tokens=[uuid.UUID(token) for token in missing])
    redispatched = _redispatch(conn, policy, send, entry_ids=released, fence=fence)
    return _LostMessages(audited=True, redispatched=redispatched)


class _PagePublisher:
    """Publishes each claimed page in a thread while the next page is claimed.

    The claim of a page is database work (the server inserts the ledger rows) and its
    publish is Python and broker work: overlapped, a sweep costs about the larger of the
    two instead of their sum. Order is kept — a page is published only after its claim
    committed, and pages go out one at a time, in order. A failed publish releases its
    claims and those of the page claimed meanwhile (it will not be published), then raises
    from ``publish`` or the end of the ``with`` block; if the sweep fails otherwise, the
    page in flight is still waited for (and released if its publish failed).
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        *,
        send: PublishFunction,
        send_ahead: PublishFunction,
        clock: Callable[[], float],
    ) -> None:
        self._conn = conn
        self._send = send
        self._send_ahead = send_ahead
        self._clock = clock
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="publish"
        )
        self._in_flight: tuple[concurrent.futures.Future[float], list[ledger.Claim]] | None = None
        self.seconds = 0.0

    def __enter__(self) -> _PagePublisher:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        try:
            if error_type is None:
                self._finish_in_flight(also_release=())
            else:
                with contextlib.suppress(Exception):
                    self._finish_in_flight(also_release=())
        finally:
            self._executor.shutdown(wait=True)

    def publish(self, claims: list[ledger.Claim]) -> None:
        self._finish_in_flight(also_release=claims)
        self._in_flight = (self._executor.submit(self._publish_page, claims), claims)

    def _publish_page(self, claims: list[ledger.Claim]) -> float:
        started = self._clock()
        # Entries dispatched before (a retry that fell due, a rescued or lost one the page
        # reached first) go ahead of the queue; first dispatches join its tail.
        again = [claim for claim in claims if claim.again]
        first = [claim for claim in claims if not claim.again]
        for batch, sender in ((again, self._send_ahead), (first, self._send)):
            if batch:
                sender(_messages(batch))
        return self._clock() - started

    def _finish_in_flight(self, *, also_release: Sequence[ledger.Claim]) -> None:
        if self._in_flight is None:
            return
        future, claims = self._in_flight
        self._in_flight = None
        try:
            self.seconds += future.result()
        except BrokerUnavailable:
            _release_unpublished(self._conn, [*claims, *also_release])
            raise


def _publish_or_release(
    conn: psycopg.Connection[Any],
    send: PublishFunction,
    messages: list[broker_module.TaskMessage],
    claims: list[ledger.Claim],
) -> None:
    try:
        send(messages)
    except BrokerUnavailable:
        _release_unpublished(conn, claims)
        raise


def _release_unpublished(conn: psycopg.Connection[Any], claims: Sequence[ledger.Claim]) -> None:
    """The claims are committed but their messages may not exist: make them eligible now
    rather than after the lease. Fencing drops any message that did get through."""
    ledger.release_claims(conn, fence_tokens=[claim.fence_token for claim in claims])


@dataclasses.dataclass(frozen=True)
class RescueResult:
    ended: int  # incarnations the pod event ended
    expired: ledger.ExpiredLeases  # their running attempts, now failed attempts
    settled: int  # of those, entries the source shows processed (the body had committed)
    redispatched: int  # published again, ahead of the backlog


def rescue(
    policy: policy_module.Policy,
    *,
    db: Sessions,
    broker: broker_module.Publisher,
    ending: planning.PodEnding | None,
    fence: sharding.Fence | None = None,
    proven: Sequence[planning.EndedIncarnation] = (),
) -> RescueResult:
    """The pod-restart hook: end the incarnations a pod event killed (or ``proven``: silent
    ones whose Pod, read by the operator, proved them gone), and hand their work out again
    at once — ahead of the queue — instead of at the next sweep.

    With ``ending=None`` and nothing ``proven`` it only releases what incarnations ended
    earlier still hold (a rescue that failed half-way is retried this way). Safe to repeat:
    every step is a fenced, idempotent statement.
    """
    with db.session(doing="rescuing a worker's entries") as conn:
        ended = 0 if ending is None else ledger.end_pod_incarnations(conn, ending=ending)
        ended += ledger.end_incarnations(conn, ended=proven)
        expired = ledger.expire_leases(conn, policy_key=policy.key)
        settled = ledger.settle_finished(
            conn,
            policy_key=policy.key,
            still_pending=functools.partial(source.filter_pending, conn, policy.source),
        )
        # A suspended policy dispatches nothing: its rescued entries wait, due, for resume.
        send_ahead = functools.partial(_publish, policy, broker, ahead=True)
        redispatched = (
            0
            if policy.schedule.suspend
            else _redispatch(conn, policy, send_ahead, entry_ids=expired.retry_ids, fence=fence)
            + _redispatch_stranded(
                conn, policy, broker, send_ahead, fence=fence, queued_a_while=None
            ).redispatched
        )
        # What the dead worker took in its last moments is not missing yet (it was taken
        # just now); the first sweep once it would be reads the queue again.
        _queue_audit_due(conn, policy, at=time.monotonic() + STRANDED_DELIVERY_SECONDS)
    return RescueResult(ended=ended, expired=expired, settled=settled, redispatched=redispatched)


def arbitrate(
    policy: policy_module.Policy, *, db: Sessions, mine: planning.WorkHeld
) -> tuple[planning.Conflict, planning.WorkHeld] | None:
    """Record the work ``policy`` holds in its database and decide whether it must yield to
    an older policy on the same table (``overlaps``); the conflict and that policy's record."""
    with db.session(doing="recording which rows this policy processes") as conn:
        others = overlaps.record_and_read(conn, policy, mine=mine)
    conflict = planning.work_yields_to(mine, others)
    if conflict is None:
        return None
    winner = next(other for other in others if other.policy_key == conflict.winner)
    return conflict, winner


def forget_work(db: Sessions, *, policy_key: str, policy_uid: str) -> None:
    """Remove what a policy that no longer exists recorded: its owner row (``ledger``) and
    its work (``overlaps``), in one transaction — the owner row first, while the work row
    still tells whose it is."""
    with db.session(doing="removing a deleted policy's record") as conn, conn.transaction():
        ledger.forget_owner(conn, policy_key=policy_key, policy_uid=policy_uid)
        overlaps.forget(conn, policy_key=policy_key, policy_uid=policy_uid)


def silent_pod_workers(
    policy: policy_module.Policy, *, db: Sessions
) -> list[planning.SilentIncarnation]:
    """Silent worker processes in Pods that hold this policy's running entries."""
    with db.session(doing="reading silent worker processes") as conn:
        return ledger.silent_pod_incarnations(conn, policy_key=policy.key)


def retry_dead(
    policy: policy_module.Policy, *, db: Sessions, entry_ids: Sequence[str] | None = None
) -> int:
    """Bring dead entries back (all, or ``entry_ids``); the next sweep dispatches them."""
    with db.session(doing="reviving dead entries") as conn:
        return ledger.retry_dead(conn, policy_key=policy.key, entry_ids=entry_ids)


def collect_status(
    policy: policy_module.Policy, *, db: Sessions, outcomes_since: datetime.datetime | None
) -> StatusSnapshot:
    """The status counts, and the attempts finished since ``outcomes_since`` (none when
    ``None``: the window opens at this read) for the operator's Prometheus counters: two
    statements, one on the table and one on the ledger."""
    with db.session(doing="reading status counts") as conn:
        summary = source.pending_summary(conn, policy.source)
        found = ledger.status(conn, policy_key=policy.key, outcomes_since=outcomes_since)
    counts = found.counts
    return StatusSnapshot(
        pending=summary.count,
        oldest_pending_seconds=summary.oldest_seconds,
        in_flight=counts.in_flight,
        retrying=counts.retrying,
        succeeded=counts.succeeded,
        dead=counts.dead,
        seconds_until_next_due=counts.seconds_until_next_due,
        running=counts.running,
        consumption=found.consumption,
        outcomes=found.outcomes,
    )


def advise_index(policy: policy_module.Policy, *, db: Sessions) -> source.IndexAdvice | None:
    """The index the pending query lacks, if any (see ``source.index_advice``)."""
    with db.session(doing="reading the plan of the pending query") as conn:
        return source.index_advice(conn, policy.source, page_size=policy.limits.batch_size)


def release_queued(policy: policy_module.Policy, *, db: Sessions) -> int:
    """The broker restarted: re-dispatch what was queued instead of waiting for the lease."""
    with db.session(doing="releasing queued entries") as conn:
        return ledger.release_queued(conn, policy_key=policy.key)
