"""Dispatch-throughput benchmarks of celery-reconciler against baselines in the same run.

``python -m benchmarks`` (``make bench``) starts its own PostgreSQL and Redis (devstack),
seeds a backlog in the demo's ``journal_entry`` table and measures, one after another on a
fresh database and an empty Redis each time:

(a) the seed's way: per entry, an ``UPDATE`` (autocommit) and ``send_task`` — what a
    ``retry_unprocessed_entries`` loop with ``apply_async`` does;
(b) the raw limit, with no code of ours: per page, one ``UPDATE ... RETURNING`` that marks
    and returns the page, then Celery messages prepared from a template (Celery's own
    message API) LPUSHed in one pipelined round trip — dispatch with no ledger at all;
(c) ours: one ``reconcile_once`` over the whole backlog (ledger claim with fence tokens and
    leases, commit, then pipelined publish).

It prints entries/s for each and the ratios ours/raw and ours/seed. ``benchmarks.amqp``
does the same on RabbitMQ: ours (every message confirmed) against kombu's ``send_task`` loop,
plain and with ``confirm_publish``. Then
``benchmarks.worker`` measures the worker side: the drain rate of one prefork worker, timed
to the broker drained and every message acknowledged, for a ``ReconciledTask``, a body
committing through ``fenced_transaction`` and one through Django's ``fenced_atomic``, each
against a plain Celery task with the same body (no-op, and 20 ms), and prints form/plain.
``benchmarks.steady_sweep`` times the steady state of a backlog 10x ``maxInFlight``
(20,000 in flight, slots freeing one at a time): the pages a sweep with one free slot
reads, and its time against an idle sweep. Last, ``benchmarks.scale`` measures what history
costs: a status read — the first one after a start, and a later one — with
10M succeeded entries and attempts in the ledger against an empty one, and a sweep
against a 10M-row table against a 100k-row one. Then ``benchmarks.policies`` applies 500
policies to one operator against one database and prints how many are Ready and processed,
the operator's peak connections against its bound, its RSS, idle CPU and API writes per
policy per minute when idle. ``python -m benchmarks dispatch``, ``... amqp``, ``... worker``,
``... steady-sweep``, ``... scale`` or ``... policies`` runs one of them.
``python -m benchmarks idle-sweep`` (``benchmarks.idle_sweep``, not part of the full run)
breaks an idle sweep down: the statements it sends to PostgreSQL, the commands it sends to
Redis and the CPU it costs.
Timings are printed, never asserted: the tests assert behaviour, not speed.
"""
