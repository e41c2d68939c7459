"""Every reconcile decision that needs no I/O: backoff, jitter, budgets, wake-ups, pod endings.

The operator loop, the worker integration and the CLI all ask this module *what* to do and
then do it through the adapters (``ledger``, ``source``, ``broker``). Keeping the decisions
pure means their bounds are proven by property tests in milliseconds, and the same rule is
applied on both sides: a retry delay computed by a worker for a failed body and the one a
user reads in the docs come from ``retry_delay_seconds``.

Jitter rules (documented here because tests and users rely on the bounds):

* **Retry backoff** uses "equal jitter": for the n-th failed attempt the base delay is
  ``d = min(maxDelay, initialDelay * factor**(n-1))`` and the jittered delay is uniform in
  ``[d * RETRY_JITTER_LOW_FRACTION, d]`` (``d`` exactly without jitter); the bounds are
  ``retry_delay_bounds_seconds``. Workers schedule their own retries, so this rule lives in
  the worker package (``celery_reconciler_worker.backoff``, which says why equal jitter) and
  is re-exported here.
* **Sweep interval** is uniform in ``[interval * SWEEP_JITTER_LOW_FRACTION, interval]`` so many
  policies with the same interval do not sweep in lock-step, and a sweep never comes later
  than the interval the user asked for. The bounds are ``sweep_delay_bounds_seconds``.

Randomness is injected (``random`` is a ``() -> float in [0, 1)`` callable) so tests can pin
it; the default is ``random.random``.

This module imports only ``policy`` and the worker's ``backoff`` (both pure): no kopf,
psycopg, celery or kubernetes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import random as random_module
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from celery_reconciler import policy as policy_module
from celery_reconciler_worker import backoff

# The retry rule is the worker's (it schedules retries itself); re-exported so the operator's
# decisions and their documented bounds read from one place.
RETRY_JITTER_LOW_FRACTION = backoff.RETRY_JITTER_LOW_FRACTION
SWEEP_JITTER_LOW_FRACTION = 0.9

RandomSource = backoff.RandomSource
RetryLater = backoff.RetryLater
DeadLetter = backoff.DeadLetter
base_retry_delay_seconds = backoff.base_retry_delay_seconds
retry_delay_bounds_seconds = backoff.retry_delay_bounds_seconds
retry_delay_seconds = backoff.retry_delay_seconds
after_failure = backoff.after_failure


def sweep_claim_budget(*, in_flight: int, max_in_flight: int) -> int:
    """How many entries one sweep may still put in flight under ``maxInFlight``."""
    return max(0, max_in_flight - in_flight)


@dataclasses.dataclass(frozen=True)
class PagePlan:
    """What the next page of a sweep reads and how much of it it may claim.

    A page always reads ``batchSize`` rows, however few slots are free: the round trip
    costs about the same for one row as for a page, and a page sized by the free slots
    made a sweep with one slot free walk the backlog one row per round trip. Only the
    claims are bounded by the budget (``maxInFlight``): the first ``claims`` claimable
    rows of the page are claimed, the rest are left for a later sweep.
    """

    rows: int  # rows of the source to read (0: the budget is spent, read nothing)
    claims: int  # at most this many of them claimed


def page_plan(*, remaining_budget: int, batch_size: int) -> PagePlan:
    """The next page of a sweep that may still claim ``remaining_budget`` entries."""
    if remaining_budget <= 0:
        return PagePlan(rows=0, claims=0)
    return PagePlan(rows=batch_size, claims=min(batch_size, remaining_budget))


@dataclasses.dataclass(frozen=True)
class BacklogPosition:
    """Where a policy's last sweep stopped reading its backlog because its budget ran out,
    and when the pass over the backlog it belongs to began (monotonic seconds).

    Why sweeps resume there: in the steady state of a backlog larger than ``maxInFlight``
    every sweep may claim a few entries, and the rows ahead of where the previous sweep
    stopped are in flight. Reading from the start again finds nothing new there (the
    ledger's due retries are dispatched apart, first), yet costs a probe of the ledger per
    in-flight row. What a resumed sweep can miss is a row that became pending ahead of
    the position (inserted with an early key, or a processed row pending again); each
    pass is therefore at most one sweep interval old, and a sweep that reaches the end of
    the backlog with budget left reads it again from the start."""

    key: tuple[Any, ...]  # the keyset position after the last row looked at
    pass_started: float


def sweep_resumes_at(
    position: BacklogPosition | None, *, now: float, sweep_interval_seconds: float
) -> BacklogPosition | None:
    """The position the next sweep reads from, or ``None``: from the start (a new pass)."""
    if position is None or now - position.pass_started >= sweep_interval_seconds:
        return None
    return position


def sweep_delay_bounds_seconds(sweep_interval_seconds: float) -> tuple[float, float]:
    return sweep_interval_seconds * SWEEP_JITTER_LOW_FRACTION, sweep_interval_seconds


def next_wakeup_seconds(
    *,
    sweep_interval_seconds: float,
    earliest_retry_in_seconds: float | None,
    rate_allows_in_seconds: float | None = None,
    random: RandomSource = random_module.random,
) -> float:
    """Seconds until the per-policy loop should sweep again.

    The jittered sweep interval, or sooner when something in the ledger falls due first — a
    scheduled retry (retries are dispatched by the loop, never by Celery countdowns that die
    with a worker) or a lease deadline (``ledger.seconds_until_next_due``). Already due means
    "now" (0). ``rate_allows_in_seconds``: a sweep that stopped dispatching for
    ``dispatchPerSecond`` (``dispatch_pause_within_sweep``) goes on when the rate allows.
    """
    low, high = sweep_delay_bounds_seconds(sweep_interval_seconds)
    delay = low + (high - low) * random()
    for due in (earliest_retry_in_seconds, rate_allows_in_seconds):
        if due is not None:
            delay = min(delay, max(0.0, due))
    return delay


def sweep_early(*, seconds_until_next_due: float | None, suspended: bool) -> bool:
    """Whether a status refresh between sweeps should end the sleep and sweep now.

    The sleep is chosen at the end of a sweep from what was due then; a body that started
    afterwards, on a worker outside Kubernetes that then died, falls due when its heartbeat
    timeout passes — seconds later, while the sweep interval may still have minutes to
    run. The refresh reads the same ``seconds_until_next_due``; already due means sweep.
    A suspended policy dispatches nothing, so nothing falling due wakes it.
    """
    return not suspended and seconds_until_next_due is not None and seconds_until_next_due <= 0


def dispatch_pause_seconds(
    *, dispatched: int, elapsed_seconds: float, dispatch_per_second: float
) -> float:
    """How long to wait before publishing more, so ``dispatched`` stays under the rate.

    ``dispatch_per_second <= 0`` means unlimited. The pacing is cumulative over the sweep
    (``dispatched / rate`` seconds must have elapsed), so short bursts up to one page are
    allowed but the average never exceeds the rate.
    """
    if dispatch_per_second <= 0 or dispatched <= 0:
        return 0.0
    return max(0.0, dispatched / dispatch_per_second - elapsed_seconds)


# The longest a sweep waits between pages to keep to ``dispatchPerSecond``. A sweep runs in
# a thread nobody can interrupt; a tiny rate (``1e-9``: one entry in 30 years) would hold it
# there for good — or overflow ``time.sleep`` — so a pause longer than this ends the
# sweep's dispatching instead, and the loop sweeps again when the rate allows.
MAX_DISPATCH_PAUSE_SECONDS = 5.0


def dispatch_pause_within_sweep(
    *, dispatched: int, elapsed_seconds: float, dispatch_per_second: float
) -> float | None:
    """The pause before the next page (``dispatch_pause_seconds``), or ``None`` when it is
    longer than ``MAX_DISPATCH_PAUSE_SECONDS``: this sweep dispatches nothing more.

    The caller sweeps again after ``dispatch_pause_seconds`` (``next_wakeup_seconds``'s
    ``rate_allows_in_seconds``), so a slow rate is kept across sweeps.
    """
    pause = dispatch_pause_seconds(
        dispatched=dispatched,
        elapsed_seconds=elapsed_seconds,
        dispatch_per_second=dispatch_per_second,
    )
    return pause if pause <= MAX_DISPATCH_PAUSE_SECONDS else None


@dataclasses.dataclass
class RatePacing:
    """A slow ``dispatchPerSecond`` kept across sweeps.

    A sweep that stops for the rate (``dispatch_pause_within_sweep``) says when the next page
    is allowed; until then, sweeps that something else causes (a due retry, a status
    refresh, an edit) claim nothing new — else every wake-up would publish a page and the
    rate would mean nothing. A changed rate starts afresh. Times are any monotonic clock.
    """

    rate: float = 0.0
    allows_at: float | None = None

    def holds(self, *, dispatch_per_second: float, now: float) -> bool:
        """Whether the sweep about to run must claim nothing new."""
        if dispatch_per_second != self.rate:
            self.rate, self.allows_at = dispatch_per_second, None
        return self.allows_at is not None and now < self.allows_at

    def swept(self, *, rate_allows_in_seconds: float | None, now: float) -> None:
        """Record what a sweep that was not held said about the next page."""
        self.allows_at = None if rate_allows_in_seconds is None else now + rate_allows_in_seconds

    def allows_in_seconds(self, *, now: float) -> float | None:
        """How long until the next page is allowed (for ``next_wakeup_seconds``)."""
        return None if self.allows_at is None else max(0.0, self.allows_at - now)


def dispatch_batch_size(*, batch_size: int, dispatch_per_second: float) -> int:
    """A page is published as one burst: with a rate, keep bursts to about a second's worth
    (at least one entry; bounded by ``batch_size`` however large the rate)."""
    if dispatch_per_second <= 0:
        return batch_size
    return max(1, min(batch_size, int(min(dispatch_per_second, float(batch_size)))))


# --- what a sweep has to do before it claims ------------------------------------------


@dataclasses.dataclass(frozen=True)
class SweepChores:
    """The ledger's upkeep a sweep runs before it claims new work (``sweep_chores``)."""

    end_silent_incarnations: bool
    expire_lost_attempts: bool
    settle: bool  # retry_wait and dead entries the table may show processed
    fold_successes: bool
    prune_history: bool
    prune_incarnations: bool
    look_for_stranded: bool  # queued entries whose message may be gone
    redispatch_due_retries: bool

    def may_change_in_flight(self, *, queue_audited: bool) -> bool:
        """Whether these chores may have put entries in flight or taken them out of it;
        ``queue_audited``: the look for stranded entries read the queue and may have
        re-dispatched some (``queue_audit_needed``; when it did not, it changed nothing)."""
        return self.expire_lost_attempts or queue_audited

    def may_change_schedule(self, *, queue_audited: bool) -> bool:
        """Whether these chores may have moved the ledger's next due time (a retry, a
        lease)."""
        return (
            self.expire_lost_attempts or self.settle or self.redispatch_due_retries or queue_audited
        )


def sweep_chores(
    *,
    running: int,
    unsettled: int,
    due_retries: int,
    queued_a_while: int,
    unfolded: bool,
    history_expired: bool,
    silent_incarnations: bool,
    incarnations_expired: bool,
) -> SweepChores:
    """Which upkeep steps a sweep runs, from what the ledger holds (``ledger.survey``).

    A step runs when the ledger shows work for it, or when a step before it may make some:
    only running attempts can be lost, so expiry needs one; an expired attempt becomes a
    retry due now or a dead entry, which settling then looks at; a settled entry is a
    success to fold. Every step is one the sweep always ran before and which, with no such
    work, changed nothing: an idle policy's sweep skips them all.
    """
    expire = running > 0
    settle = unsettled > 0 or expire
    return SweepChores(
        end_silent_incarnations=silent_incarnations,
        expire_lost_attempts=expire,
        settle=settle,
        fold_successes=unfolded or settle,
        prune_history=history_expired,
        prune_incarnations=incarnations_expired,
        look_for_stranded=queued_a_while > 0,
        redispatch_due_retries=due_retries > 0 or expire,
    )


@dataclasses.dataclass(frozen=True)
class QueueAudit:
    """When a policy's queue was last read in full for lost messages (monotonic seconds),
    and when it must be read again at the latest, whatever the counts say (``None``: at
    the audit interval)."""

    last_at: float
    due_at: float | None = None


def queue_audit_needed(
    *,
    audit: QueueAudit | None,
    queued_a_while: int,
    messages_held: int,
    now: float,
    interval_seconds: float,
) -> bool:
    """Whether a sweep reads the whole queue to account for each queued entry's message.

    That read costs O(queue), so a steady backlog must not pay it every sweep. It is needed
    when something suggests a message is gone: fewer messages held (waiting, or taken just
    now) than entries waiting for theirs (a queue dropped or purged); a first look in this
    process (the one before may have died between claim and publish); a worker ended since
    (``due_at``: what it took in its last moments). A loss that the counts cannot show — a
    message popped by a consumer that died while another message joined the queue — is
    found by the periodic read, at ``interval_seconds``; the lease stays the backstop.
    """
    if queued_a_while <= 0:
        return False
    if messages_held < queued_a_while or audit is None:
        return True
    if audit.due_at is not None and now >= audit.due_at:
        return True
    return now - audit.last_at >= interval_seconds


def queue_audit_done(audit: QueueAudit | None, *, now: float) -> QueueAudit:
    """The record after a full read at ``now``: a later ``due_at`` still stands."""
    due_at = None if audit is None or audit.due_at is None or audit.due_at <= now else audit.due_at
    return QueueAudit(last_at=now, due_at=due_at)


def queue_audit_due(audit: QueueAudit | None, *, at: float) -> QueueAudit | None:
    """The record once a worker ended: read the whole queue at the first sweep from ``at``
    on (no record: the first sweep reads it anyway)."""
    if audit is None:
        return None
    due_at = at if audit.due_at is None else min(audit.due_at, at)
    return QueueAudit(last_at=audit.last_at, due_at=due_at)


@dataclasses.dataclass(frozen=True)
class ContainerStatus:
    """What a pod event says of one container (``status.containerStatuses[]``)."""

    name: str
    restart_count: int
    # The latest instance's id, without the ``containerd://`` scheme: the running one, or
    # the last one that ran; None before any was created.
    container_id: str | None
    started_at: datetime.datetime | None  # ``state.running.startedAt``; None when not running
    # Instances the status reports ended: ``state.terminated`` and ``lastState.terminated``.
    ended_ids: tuple[str, ...] = ()
    # When the latest instance reported ended had started (the node's clock).
    ended_started_at: datetime.datetime | None = None

    @property
    def running_id(self) -> str | None:
        return self.container_id if self.started_at is not None else None

    @property
    def dead_ids(self) -> tuple[str, ...]:
        """Every instance of this container the status itself reports ended."""
        latest = (self.container_id,) if self.container_id and self.started_at is None else ()
        return tuple(dict.fromkeys(latest + self.ended_ids))


@dataclasses.dataclass(frozen=True)
class PodEnding:
    """A pod event, as ``ended_incarnations`` judges the incarnations of ``pod_uid`` by it.

    ``whole_pod``: the pod runs nothing any more (deleted, or finished), so every incarnation
    of ``pod_uid`` ended, for ``reason``. Otherwise ``containers`` is what the event reports
    of each container and ``previous`` what the event before it did (``None``: the first
    event this operator sees of the pod, as at its start or after a watch gap).
    """

    pod_uid: str
    reason: str
    whole_pod: bool = False
    containers: tuple[ContainerStatus, ...] = ()
    previous: tuple[ContainerStatus, ...] | None = None


@dataclasses.dataclass(frozen=True)
class LiveIncarnation:
    """What the pod-ending rule needs of a live incarnation (``ledger.live_pod_incarnations``)."""

    id: str
    container_id: str | None  # from the worker's cgroup path (cgroup v1; v2 without cgroupns)
    container_name: str | None  # CELERY_RECONCILER_CONTAINER_NAME, when the pod sets it
    # When its container's PID 1 started, on the node's clock (read by the worker in /proc).
    container_started_at: datetime.datetime | None
    started_at: datetime.datetime  # registration, on the database's clock (legacy rule only)


@dataclasses.dataclass(frozen=True)
class EndedIncarnation:
    id: str
    reason: str


# An incarnation that knows its container's start (PID 1 on the node's clock, ``c``) is in
# the container's running instance when ``c`` falls in
# ``[startedAt - CONTAINER_START_EARLIEST_SECONDS, startedAt + CONTAINER_START_LATEST_SECONDS)``,
# both on the node's clock, so no margin between machines is involved. Why these bounds:
# PID 1 is forked at task create, just before task start (``startedAt``), by well under a
# second; ``startedAt`` is truncated to whole seconds (up to 1 s early); ``c`` is built from
# ``/proc/stat``'s whole-second ``btime`` (up to 1 s early) and may be truncated to whole
# seconds once more (up to 1 s early). So ``c - startedAt`` lies in (-3 s, +1 s). Erring wide
# on the early side only keeps an incarnation alive (its silence is checked against the pod
# later); erring narrow would end a live one, so the early bound carries the whole budget.
CONTAINER_START_EARLIEST_SECONDS = 3.0
CONTAINER_START_LATEST_SECONDS = 1.0

# Legacy rule, for incarnations that know neither their container id nor its start: the new
# container's start (the node's clock) is compared with incarnation start times (the
# database's clock, taken when the process registers): an incarnation counts as older only
# with this much to spare, so clock skew below it never ends a live process. It needs the
# restartCount rise between two events, so it cannot judge a pod's first event.
POD_CLOCK_SKEW_MARGIN_SECONDS = 5.0


def pod_ending(
    *,
    pod_uid: str,
    old: Iterable[ContainerStatus] | None,
    new: Iterable[ContainerStatus],
    deleted: bool,
    phase: str | None,
) -> PodEnding | None:
    """The pod event ``ended_incarnations`` judges by, or ``None`` (no pod uid).

    A pod deleted or finished (``Succeeded``/``Failed``) runs nothing any more: all of its
    incarnations end. Otherwise every incarnation whose container instance is not the
    running one ends — judged from this event alone, so the first event of a pod (the
    listing at the operator's start, or after a watch gap) is judged like any other.
    Nothing is ever concluded from a pod's *absence* from a listing.
    """
    if not pod_uid:
        return None
    if deleted or phase in ("Succeeded", "Failed"):
        why = "its pod was deleted" if deleted else f"its pod finished ({phase})"
        return PodEnding(pod_uid=pod_uid, reason=why, whole_pod=True)
    return PodEnding(
        pod_uid=pod_uid,
        reason="its container instance ended",
        containers=tuple(new),
        previous=None if old is None else tuple(old),
    )


def running_instances(
    containers: Iterable[ContainerStatus],
) -> frozenset[tuple[str, str | None, datetime.datetime | None]]:
    """The container instances a pod runs: only a change in them (or a pod's first event,
    or its end) can end an incarnation, so steady events need no rescue."""
    return frozenset(
        (status.name, status.running_id, status.started_at)
        for status in containers
        if status.started_at is not None
    )


def ended_incarnations(
    *, ending: PodEnding, incarnations: Iterable[LiveIncarnation]
) -> tuple[EndedIncarnation, ...]:
    """Which live incarnations of ``ending.pod_uid`` the event proves ended, and why.

    * **By container id** (exact): an instance the status reports ended
      (``state.terminated``, ``lastState.terminated``, the latest one while the container
      does not run) or that the previous event showed running and this one does not. An id
      neither running nor known ended (newer than the status, or older than the last
      restart) is judged by its container start if known, else left to the silence check.
    * **By container start** (the node's clock on both sides): older than the
      running instance's window (``CONTAINER_START_EARLIEST_SECONDS``), or, while the
      container does not run, not newer than the last instance reported ended.
    * **Legacy** (neither): a container whose ``restartCount`` rose since the previous
      event lost the incarnations that registered before its new start, with
      ``POD_CLOCK_SKEW_MARGIN_SECONDS`` to spare (all of them while it is not running).

    An incarnation that cannot be placed in a container (no name, several containers) is
    left alone: it is judged by its silence, never guessed.
    """
    if ending.whole_pod:
        return tuple(EndedIncarnation(id=i.id, reason=ending.reason) for i in incarnations)
    running = {status.running_id: status for status in ending.containers if status.running_id}
    dead = {
        instance: f"its container {status.name}'s instance {instance[:12]} ended"
        for status in ending.containers
        for instance in status.dead_ids
    }
    for earlier in ending.previous or ():
        if earlier.running_id and earlier.running_id not in running:
            dead.setdefault(
                earlier.running_id,
                f"its container {earlier.name}'s instance {earlier.running_id[:12]} ended",
            )
    by_name = {status.name: status for status in ending.containers}
    before = {status.name: status.restart_count for status in ending.previous or ()}
    ended = []
    for incarnation in incarnations:
        if incarnation.container_id in running:
            continue
        reason = dead.get(incarnation.container_id) if incarnation.container_id else None
        container = _container_of(incarnation, by_name=by_name)
        if reason is None and container is not None:
            if incarnation.container_started_at is not None:
                reason = _ended_by_start(container, started_at=incarnation.container_started_at)
            elif (
                incarnation.container_id is None
                and ending.previous is not None
                and container.restart_count > before.get(container.name, container.restart_count)
            ):
                reason = _ended_by_restart(container, registered_at=incarnation.started_at)
        if reason is not None:
            ended.append(EndedIncarnation(id=incarnation.id, reason=reason))
    return tuple(ended)


def _container_of(
    incarnation: LiveIncarnation, *, by_name: Mapping[str, ContainerStatus]
) -> ContainerStatus | None:
    if incarnation.container_name is not None:
        return by_name.get(incarnation.container_name)
    # A process that names no container is known to be in the only one, never guessed.
    return next(iter(by_name.values())) if len(by_name) == 1 else None


def _ended_by_start(status: ContainerStatus, *, started_at: datetime.datetime) -> str | None:
    if status.started_at is not None:
        earliest = status.started_at - datetime.timedelta(seconds=CONTAINER_START_EARLIEST_SECONDS)
        if started_at < earliest:
            return f"its container {status.name} runs an instance started after it"
        return None
    if status.ended_started_at is not None:
        latest = status.ended_started_at + datetime.timedelta(
            seconds=CONTAINER_START_LATEST_SECONDS
        )
        if started_at < latest:
            return f"its container {status.name} ended and does not run"
    return None


def _ended_by_restart(status: ContainerStatus, *, registered_at: datetime.datetime) -> str | None:
    reason = f"its container {status.name} restarted"
    if status.started_at is None:
        return reason  # not running (yet): every process of it is gone
    margin = datetime.timedelta(seconds=POD_CLOCK_SKEW_MARGIN_SECONDS)
    return reason if registered_at < status.started_at - margin else None


# --- silent workers in Pods: proof, not silence --------------------------------------


@dataclasses.dataclass(frozen=True)
class PodLookup:
    """What reading a silent incarnation's Pod by name gave (``kube.look_up_worker_pod``)."""

    found: bool  # False with no ``failure``: the Pod object is gone (HTTP 404)
    uid: str = ""
    phase: str | None = None
    node_name: str | None = None
    containers: tuple[ContainerStatus, ...] = ()
    failure: str | None = None  # the Pod could not be read: nothing is proven


@dataclasses.dataclass(frozen=True)
class SilentIncarnation:
    """A live incarnation with a pod identity whose heartbeat is older than its timeout."""

    incarnation: LiveIncarnation
    pod_uid: str
    pod_name: str | None
    pod_namespace: str | None
    hostname: str
    pid: int
    silent_seconds: float


@dataclasses.dataclass(frozen=True)
class HeldIncarnation:
    """A silent incarnation kept: nothing proves its process gone, so its entries wait."""

    id: str
    why: str  # what is known, what releases it


def judge_silent(
    *, silent: SilentIncarnation, lookup: PodLookup | None
) -> EndedIncarnation | HeldIncarnation:
    """Whether the Pod proves a silent worker process gone, or its entries must wait.

    Silence alone never moves the work of a process in a Pod: a paused process (SIGSTOP, a
    C call holding the GIL) is silent and alive, and runs on when it resumes. Its Pod is the
    proof, as in Kubernetes' rule for StatefulSet pods: the Pod object gone or replaced by
    another of the same name, the Pod finished, or its container instance no longer the
    running one. A Pod that still runs the same instance holds the work until the kubelet
    kills it (the liveness probe on heartbeat freshness, or a restart) or someone deletes
    the Pod; a Pod the operator cannot read proves nothing either.
    """
    who = f"worker process {silent.hostname} pid {silent.pid}"
    pod = f"{silent.pod_namespace}/{silent.pod_name}"
    # No running figure in the text: it becomes a condition, which must not churn.
    silent_for = f"silent for more than its heartbeat timeout ({silent.pod_uid[:8]})"
    if lookup is None:
        return HeldIncarnation(
            id=silent.incarnation.id,
            why=f"{who} is {silent_for}; it names pod uid {silent.pod_uid} but no pod name and "
            "namespace (set CELERY_RECONCILER_POD_NAME and CELERY_RECONCILER_POD_NAMESPACE from "
            "the Downward API), so its death cannot be confirmed: its entries wait for their "
            "lease",
        )
    if lookup.failure is not None:
        return HeldIncarnation(
            id=silent.incarnation.id,
            why=f"{who} in pod {pod} is {silent_for}, and its pod cannot be confirmed gone: "
            f"{lookup.failure}; its entries wait until that works or their lease runs out",
        )
    if not lookup.found:
        return EndedIncarnation(id=silent.incarnation.id, reason=f"its pod {pod} is gone")
    if lookup.uid != silent.pod_uid:
        return EndedIncarnation(
            id=silent.incarnation.id, reason=f"its pod {pod} is gone (replaced by uid {lookup.uid})"
        )
    ending = pod_ending(
        pod_uid=silent.pod_uid,
        old=None,
        new=lookup.containers,
        deleted=False,
        phase=lookup.phase,
    )
    assert ending is not None
    proven = ended_incarnations(ending=ending, incarnations=[silent.incarnation])
    if proven:
        return proven[0]
    instance = _silent_instance_gone(silent.incarnation, containers=lookup.containers)
    if instance is not None:
        return EndedIncarnation(id=silent.incarnation.id, reason=instance)
    node = lookup.node_name or "no node yet"
    return HeldIncarnation(
        id=silent.incarnation.id,
        why=f"{who} in pod {pod} on node {node} is {silent_for} but its container still "
        "runs, so it may be paused rather than dead: its entries move when the kubelet "
        "restarts the container (the liveness probe on heartbeat freshness) or the Pod is "
        f"deleted; if node {node} stopped reporting, delete the Pod or taint the node "
        "node.kubernetes.io/out-of-service",
    )


def _silent_instance_gone(
    incarnation: LiveIncarnation, *, containers: Sequence[ContainerStatus]
) -> str | None:
    """What a silent process's identity proves beyond a pod event's rule: a container id
    that is not running is an ended instance (a silent process is not one the status has
    yet to report); with no identity, the legacy clock rule against the running start."""
    if incarnation.container_id is not None:
        if any(status.running_id == incarnation.container_id for status in containers):
            return None
        return f"its container instance {incarnation.container_id[:12]} no longer runs"
    if incarnation.container_started_at is not None:
        return None  # judged exactly by ``ended_incarnations``
    container = _container_of(incarnation, by_name={c.name: c for c in containers})
    if container is None:
        return None
    if container.started_at is None:
        return f"its container {container.name} does not run"
    margin = datetime.timedelta(seconds=POD_CLOCK_SKEW_MARGIN_SECONDS)
    if incarnation.started_at < container.started_at - margin:
        return f"its container {container.name} runs an instance started after it"
    return None


def held_summary(held: Sequence[HeldIncarnation]) -> str | None:
    """The condition message for entries that wait on silent processes, or None."""
    if not held:
        return None
    first = held[0].why
    more = f" (and {len(held) - 1} more silent worker processes)" if len(held) > 1 else ""
    return f"running entries wait: {first}{more}"


# --- policies that overlap ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicyClaim:
    """A policy as the conflict rule sees it: its parsed spec and its age.

    ``created`` is the object's ``metadata.creationTimestamp`` (RFC 3339 in UTC, so text
    order is time order); ties are broken by name so every replica decides the same way.
    """

    created: str
    policy: policy_module.Policy


@dataclasses.dataclass(frozen=True)
class Conflict:
    """``loser`` overlaps the older, active ``winner``; ``what`` says how, for people."""

    loser: str
    winner: str
    what: str


def overlap(a: policy_module.Policy, b: policy_module.Policy) -> str | None:
    """How two policies would process the same rows twice, or None when they cannot.

    The same database is judged by the same Secret and key in the same namespace: the
    operator never compares DSNs, which would put secrets side by side in its memory and
    messages (two Secrets holding one DSN are not caught — one Secret per database is the
    documented practice). An unqualified table is ``public``'s, PostgreSQL's default
    ``search_path``. Then the same table with the same predicate claims the same entries,
    and the same table with the same task runs the same body twice per entry, whatever the
    predicates.
    """
    source_a, source_b = a.source, b.source
    if (
        a.namespace != b.namespace
        or source_a.database_secret != source_b.database_secret
        or _qualified(source_a.table) != _qualified(source_b.table)
    ):
        return None
    table = _qualified(source_a.table)
    if source_a.pending == source_b.pending:
        return f"same table {table} and pending predicate"
    if a.task.name == b.task.name:
        return f"same table {table} and task {a.task.name}"
    return None


def _qualified(table: policy_module.TableName) -> str:
    return f"{table.schema or 'public'}.{table.table}"


def conflicts(claims: Iterable[PolicyClaim]) -> dict[str, Conflict]:
    """Which policies must dispatch nothing, by key, and which older policy each yields to.

    Oldest first (creation time, then name), a policy is active unless it overlaps an
    active older one. A policy that yields blocks nobody: with A older than B older than C,
    where A overlaps B and B overlaps C but A does not overlap C, A and C both run. Deleting
    or changing the older policy makes the younger active at its next sweep.
    """
    # Only policies of one namespace, Secret and table can overlap: comparing within those
    # groups keeps this linear in the policies of a namespace (every loop asks, every sweep).
    active: dict[tuple[object, ...], list[policy_module.Policy]] = {}
    found: dict[str, Conflict] = {}
    for claim in sorted(claims, key=lambda c: (c.created, c.policy.name)):
        scope = (
            claim.policy.namespace,
            claim.policy.source.database_secret,
            _qualified(claim.policy.source.table),
        )
        group = active.setdefault(scope, [])
        for older in group:
            what = overlap(claim.policy, older)
            if what is not None:
                found[claim.policy.key] = Conflict(
                    loser=claim.policy.key, winner=older.key, what=what
                )
                break
        else:
            group.append(claim.policy)
    return found


# --- the database's record of who processes what --------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkHeld:
    """A policy as the ledger of its database records the work it holds: which table (by
    OID, so every spelling of its name and every DSN that reaches the database agree),
    which rows (the pending predicate, in ``pending_text`` form) and which task.

    ``created`` is the policy's ``metadata.creationTimestamp`` and ``policy_key`` its
    namespace/name: the same order ``conflicts`` uses, so every replica and every operator
    sharing the database decides the same way."""

    policy_key: str
    policy_uid: str
    created: str
    pending: str
    task_name: str


def pending_text(pending: policy_module.PendingPredicate) -> str:
    """One text per predicate: equal texts select the same rows of a table."""
    return json.dumps(
        {"kind": type(pending).__name__, **dataclasses.asdict(pending)},
        sort_keys=True,
        separators=(",", ":"),
    )


def work_overlap(a: WorkHeld, b: WorkHeld) -> str | None:
    """How two policies holding the same table would run rows twice, or None.

    The same predicate claims the same entries; the same task runs the same body twice per
    entry, whatever the predicates. Two different tasks with different predicates on one
    table are different work (say, one extracts insights from new entries, another
    re-indexes edited ones), even where their predicates happen to select common rows."""
    if a.pending == b.pending:
        return "same table and pending predicate"
    if a.task_name == b.task_name:
        return f"same table and task {a.task_name}"
    return None


def work_yields_to(mine: WorkHeld, others: Iterable[WorkHeld]) -> Conflict | None:
    """The older policy that ``mine`` must leave its table's rows to, by ``conflicts``'
    rule (oldest first; one that yields blocks nobody); None when ``mine`` may run."""
    active: list[WorkHeld] = []
    for held in sorted({mine, *others}, key=lambda w: (w.created, w.policy_key)):
        winner = next((older for older in active if work_overlap(held, older)), None)
        if winner is None:
            active.append(held)
        elif held == mine:
            what = work_overlap(held, winner)
            assert what is not None
            return Conflict(loser=mine.policy_key, winner=winner.policy_key, what=what)
    return None


# --- workers that do not consume ------------------------------------------------------


def workers_not_consuming(
    *,
    oldest_queued_seconds: float | None,
    running: int,
    last_finished_seconds_ago: float | None,
    start_timeout_seconds: float,
    was_stuck: bool,
) -> bool:
    """True while dispatched work waits and no worker takes any of it.

    Stuck: an entry has been queued (published, not started) longer than the start timeout,
    nothing runs, and nothing finished within the timeout either — so a deep backlog that
    workers are working through is never called stuck, however old its tail. Once stuck, a
    policy stays so (``was_stuck``) until work starts again or nothing is queued: a lease
    that expires re-dispatches the entries with a fresh dispatch time, which must not look
    like a recovery.
    """
    if oldest_queued_seconds is None:
        return False
    recently_finished = (
        last_finished_seconds_ago is not None and last_finished_seconds_ago <= start_timeout_seconds
    )
    if running > 0 or recently_finished:
        return False
    return was_stuck or oldest_queued_seconds > start_timeout_seconds


# --- index advice ----------------------------------------------------------------------------

# Below this many rows a table is read whole in about a millisecond: PostgreSQL rightly
# prefers that to any index, and advising one would be noise.
INDEX_ADVICE_MIN_ROWS = 10_000
_SCANS_WITH_FILTERS = ("Index Scan", "Index Only Scan", "Bitmap Heap Scan")


def page_needs_index(
    plan: Mapping[str, Any], *, relation: str, predicate_column: str, table_rows: float
) -> bool:
    """Whether a pending page (its ``EXPLAIN (FORMAT JSON)`` plan) reads the source table
    in proportion to the table rather than to the backlog: a sequential scan of it, or an
    index scan that filters on the predicate afterwards (the index does not hold it, so
    every processed row in key order is read and thrown away)."""
    if table_rows < INDEX_ADVICE_MIN_ROWS:
        return False
    nodes = [plan.get("Plan", plan)]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans") or ())
        if node.get("Relation Name") != relation:
            continue
        kind = node.get("Node Type")
        if kind == "Seq Scan":
            return True
        if kind in _SCANS_WITH_FILTERS and predicate_column in str(node.get("Filter") or ""):
            return True
    return False
