"""The per-policy control loop that replaces celery beat, and its pod-restart hook.

One ``PolicyLoop`` runs per ProcessingPolicy, inside a kopf daemon; it is a short
coordinator over parts that each keep one concern (``docs/design.md`` has the map):

* ``policy_loop``         the order of one iteration, and the loop around it
* ``schedule``            when to sweep next; wake-ups (``wake``) and the error backoff
* ``connections``         the policy's Secrets, and the shared database and broker they name
* ``conflicts``           whether the policy may sweep: an older peer, the database, the owner row
* ``annotation_requests`` sweep-now and retry-dead requests, and kopf's diff-base repair
* ``pod_proofs``          proofs of worker death: the pod watch, and silent workers' Pods
* ``rescues``             the rescue queue (retried until done); a restarted broker's entries
* ``advice``              conditions that advise: a missing index, a lease below the heartbeat
* ``problems``            every failure and health problem as the condition a user reads
* ``status_report``       the log, metrics, Events on a change, and the two status objects
* ``events``              Events on the policy

Why a daemon and not a kopf timer: a timer's interval is fixed at decoration time, while
ours follows ``spec.schedule.sweepInterval`` and the earliest due retry, must be woken early
by other handlers, and backs off on its own when the database or broker is down (a
condition and an Event, never a crash loop). All blocking I/O (psycopg, redis, the
Kubernetes client) runs in threads via ``asyncio.to_thread``; the loop itself only decides
when to do what.
"""

from celery_reconciler.loop.conflicts import wake_conflicted
from celery_reconciler.loop.policy_loop import PolicyLoop
from celery_reconciler.loop.schedule import wake

__all__ = ["PolicyLoop", "wake", "wake_conflicted"]
