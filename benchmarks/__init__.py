"""Dispatch-throughput benchmarks of celery-reconciler against baselines in the same run.

``python -m benchmarks`` (``make bench``) starts its own PostgreSQL and Redis (devstack),
seeds a backlog in the demo's ``journal_entry`` table and measures, one after another on a
fresh database and an empty Redis each time:

(a) the seed's way: per entry, an ``UPDATE`` (autocommit) and ``send_task`` — what a
    ``retry_unprocessed_entries`` loop with ``apply_async`` does;
(b) the raw limit: per page, one ``UPDATE ... RETURNING`` that marks and returns the page,
    then the same Celery-built messages LPUSHed in one pipelined round trip — dispatch with
    no ledger at all;
(c) ours: one ``reconcile_once`` over the whole backlog (ledger claim with fence tokens and
    leases, commit, then pipelined publish).

It prints entries/s for each and the ratios ours/raw and ours/seed. Then
``benchmarks.worker`` measures the worker side: the drain rate of one prefork worker for a
``ReconciledTask`` against a plain Celery task with the same body (no-op, and 20 ms), and
prints ours/plain. ``python -m benchmarks dispatch`` or ``... worker`` runs one of them.
Timings are printed, never asserted: the tests assert behaviour, not speed.
"""
