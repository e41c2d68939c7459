"""Claiming entries for dispatch, and releasing claims whose message never ran.

Claim, then publish (invariant 3): ``claim`` runs inside the caller's claim transaction, so
the read of the source and the claim commit together; ``claim_page`` is one statement that
embeds the source's page query (composed by ``source``) and commits on its own. Either way
each claim gets a fresh fence token and a lease, committed before its message is published.
``release_claims`` and ``release_queued`` make claims eligible again at once when their
message failed or is gone: always safe, since a worker drops a delivery whose task id is not
the current fence.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from celery_reconciler import sharding, source
from celery_reconciler.ledger import ownership, shared


@dataclasses.dataclass(frozen=True)
class Claim:
    """An entry claimed for dispatch: publish a message with ``task id = fence_token``."""

    entry_id: str
    fence_token: uuid.UUID
    again: bool = False  # dispatched before (a retry, a rescue, a lost message): runs next


# A ledger row that may be claimed again: its message was lost (queued, lease run out), its
# retry is due, or it succeeded (claimed again only if the source shows it pending again).
_CLAIMABLE = sql.SQL(
    """(state = 'succeeded'
         OR (state = 'queued' AND lease_deadline <= now())
         OR (state = 'retry_wait' AND next_attempt_at <= now()))"""
)

# One unique-key probe per candidate id, forced by LATERAL: a plain ``entry_id = ANY(...)``
# lets the planner scan every row of the policy when the ledger's statistics are stale
# (a fresh ledger filling up within one big sweep), which made each page cost O(ledger).
_LOCK_CLAIMABLE = sql.SQL(
    """
    SELECT e.ctid, e.entry_id, e.state, e.counted
    FROM unnest(%(entry_ids)s::text[]) AS candidate(entry_id)
    CROSS JOIN LATERAL (
        SELECT ctid, entry_id, state, counted FROM {entries}
        WHERE policy_key = %(policy_key)s
          AND entry_id = candidate.entry_id
          AND {claimable}
        FOR UPDATE SKIP LOCKED
    ) AS e
    """
).format(entries=shared.ENTRIES, claimable=_CLAIMABLE)

# The rows are locked by this transaction, so their ctids cannot change under us: a TID
# scan updates exactly them, whatever the planner believes about the table's size.
_CLAIM_LOCKED = sql.SQL(
    """
    UPDATE {entries} SET
        state = 'queued',
        fence_token = gen_random_uuid(),
        lease_deadline = now() + make_interval(secs => %(lease_seconds)s),
        next_attempt_at = NULL,
        dispatched_at = now(),
        attempt = CASE WHEN state = 'succeeded' THEN 0 ELSE attempt END,
        incarnation = NULL,
        counted = false,
        last_error = CASE WHEN state = 'succeeded' THEN NULL ELSE last_error END,
        updated_at = now()
    WHERE ctid = ANY(%(row_ids)s::tid[])
      AND policy_key = %(policy_key)s
      AND entry_id = ANY(%(entry_ids)s::text[])
    RETURNING entry_id, fence_token
    """
).format(entries=shared.ENTRIES)

_CLAIM_NEW = sql.SQL(
    """
    INSERT INTO {entries} (policy_key, entry_id, state, fence_token, lease_deadline,
        dispatched_at)
    SELECT %(policy_key)s, new_id, 'queued', gen_random_uuid(),
        now() + make_interval(secs => %(lease_seconds)s), now()
    FROM unnest(%(entry_ids)s::text[]) AS new_id
    ON CONFLICT (policy_key, entry_id) DO NOTHING
    RETURNING entry_id, fence_token
    """
).format(entries=shared.ENTRIES)


def claim(
    conn: psycopg.Connection[Any],
    *,
    policy_key: str,
    entry_ids: Sequence[str],
    lease_seconds: float,
    still_pending: Callable[[Sequence[str]], set[str]],
    sweeper: sharding.Fence | None = None,
) -> list[Claim]:
    """Claim the eligible ones of ``entry_ids`` (pending in the source) with fresh fences.

    Must run inside the caller's transaction; the caller commits, and only then publishes.
    With a ``sweeper`` (active-active replicas), only while the ledger names it the
    policy's owner (``check_fence``), else ``FencedOut``.

    Eligible: no ledger row yet; ``queued`` with an expired lease (message lost);
    ``retry_wait`` whose retry is due; ``succeeded`` while the source predicate holds again.
    Rows locked by someone else are skipped (``SKIP LOCKED``), never waited for.

    New entries are inserted first, and only the ids the insert did not take are looked
    up for a claimable row: most of a backlog has no ledger row yet, so a page of them
    costs one statement instead of a lookup of every id followed by the insert. An id the
    insert skipped has a row (ours to lock, or one another transaction committed while the
    insert waited for it), so nothing is claimed twice and nothing eligible is missed.

    The ``succeeded`` case is re-checked against the source *after* the row lock is taken,
    through ``still_pending`` (a fresh statement, hence a fresh snapshot under READ
    COMMITTED): a worker commits the body's write before it records success, so once we hold
    the succeeded row, the body's write is visible and a just-finished entry is not mistaken
    for "pending again".
    """
    if not entry_ids:
        return []
    if sweeper is not None:
        ownership.check_fence(conn, sweeper)
    ids = list(entry_ids)
    claims: dict[str, Claim] = {
        entry_id: Claim(entry_id, fence)
        for entry_id, fence in conn.execute(
            _CLAIM_NEW,
            {
                "policy_key": policy_key,
                "entry_ids": source.id_array_literal(ids),
                "lease_seconds": lease_seconds,
            },
        ).fetchall()
    }
    existing = [entry_id for entry_id in ids if entry_id not in claims]
    if existing:
        claims.update(
            _claim_existing(
                conn,
                policy_key=policy_key,
                entry_ids=existing,
                lease_seconds=lease_seconds,
                still_pending=still_pending,
            )
        )
    # Keep the source's keyset order, so dispatch order follows spec.source.orderBy.
    return [claims[entry_id] for entry_id in ids if entry_id in claims]


def _claim_existing(
    conn: psycopg.Connection[Any],
    *,
    policy_key: str,
    entry_ids: list[str],
    lease_seconds: float,
    still_pending: Callable[[Sequence[str]], set[str]],
) -> dict[str, Claim]:
    """``claim``'s second half: lock the claimable ledger rows of ``entry_ids`` and give
    them fresh fences (``again``: they were dispatched before)."""
    locked = conn.execute(
        _LOCK_CLAIMABLE, {"policy_key": policy_key, "entry_ids": source.id_array_literal(entry_ids)}
    ).fetchall()
    row_ids = {entry_id: row_id for row_id, entry_id, _, _ in locked}
    tallied = {entry_id for _, entry_id, state, counted in locked if counted}
    reclaim = [entry_id for _, entry_id, state, _ in locked if state != "succeeded"]
    succeeded = [entry_id for _, entry_id, state, _ in locked if state == "succeeded"]
    if succeeded:
        pending_again = still_pending(succeeded)
        reclaim.extend(entry_id for entry_id in succeeded if entry_id in pending_again)
    if not reclaim:
        return {}
    claims = {
        entry_id: Claim(entry_id, fence, again=True)
        for entry_id, fence in conn.execute(
            _CLAIM_LOCKED,
            {
                "policy_key": policy_key,
                "entry_ids": source.id_array_literal(reclaim),
                "row_ids": [row_ids[entry_id] for entry_id in reclaim],
                "lease_seconds": lease_seconds,
            },
        ).fetchall()
    }
    untallied = sum(1 for entry_id in claims if entry_id in tallied)
    if untallied:  # pending again: no longer succeeded, so out of the tally
        conn.execute(_UNTALLY, {"policy_key": policy_key, "count": untallied})
    return claims


@dataclasses.dataclass(frozen=True)
class ClaimedPage:
    """A page of the source read and claimed by ``claim_page``."""

    claims: list[Claim]  # in the page's keyset order
    size: int  # entries the page held, claimed or not
    last_key: tuple[Any, ...] | None  # the keyset position after it (None: empty page)


# A scalar subquery, not NOT EXISTS: PostgreSQL turns NOT EXISTS into an anti-join and
# plans it from the ledger's statistics. In a new policy's first sweep those say the ledger
# is empty while each page adds a page to it, and the anti-join it chose read every entry
# claimed so far for each page (a 10,000 backlog: 145,000 ledger rows read, the sweep's
# time growing with the square of the backlog). A correlated scalar subquery stays a probe
# of the primary key per row, whatever the statistics say.
_NOT_HELD = sql.SQL(
    """coalesce((
        SELECT ({claimable}) IS TRUE FROM {entries} AS held
        WHERE held.policy_key = %s AND held.entry_id = {entry_id}
    ), true)"""
)


def not_held(entry_id: sql.Composable) -> sql.Composed:
    """For ``source.page_query``'s ``skipping``: true of an entry the ledger does not hold —
    no row, or a row ``claim`` would claim — so a page skips what is in flight, waiting for
    its retry or dead. One unique-key probe per row read; its placeholder is the policy key.

    Why in the page: in the steady state of a backlog larger than ``maxInFlight`` the
    oldest pending rows are all in flight, and a page that returned them read a page per
    ``batchSize`` of them before it reached one it could claim."""
    return _NOT_HELD.format(entries=shared.ENTRIES, entry_id=entry_id, claimable=_CLAIMABLE)


def claim_page(
    conn: psycopg.Connection[Any],
    *,
    policy_key: str,
    page_query: bytes,
    page_params: Sequence[Any],
    key_width: int,
    lease_seconds: float,
    still_pending: Callable[[Sequence[str]], set[str]],
    sweeper: sharding.Fence | None = None,
    claim_limit: int | None = None,
) -> ClaimedPage:
    """Read a page of the source and claim it, as ``claim`` would claim its ids, mostly in
    ONE statement — its own transaction, committed when it returns (autocommit).

    ``page_query`` (rendered for ``conn``; positional parameters ``page_params``) yields the
    ``key_width`` keyset columns and then the id as text, in keyset order
    (``source.page_query_text``). Only its first ``claim_limit`` rows (all without one) are
    candidates: the budget left bounds the claims, never the rows a page reads, and the
    page's ``last_key`` is the last candidate's, so the next page starts after the rows
    looked at. The statement
    inserts the page's new entries with fresh fences and returns the page, the new claims
    and the ids whose existing ledger row is claimable (as in ``claim``: a lost message,
    a due retry, a success pending again); only when there are such ids does a second
    transaction lock and claim them (``claim``'s way, with its re-check of successes).
    Claims are committed before this returns, so the caller may publish at once.

    Why one statement: a sweep claims page after page while the previous page is published
    in a thread; every round trip of the claim is a wake-up that waits for the interpreter
    the publisher holds. Read, insert and commit as one statement instead of BEGIN, read,
    insert and COMMIT made a 100k backlog's sweep about a third faster.

    With a ``sweeper``, the statement holds the policy's owner row (shared, as
    ``check_fence`` does) and inserts only if the row names the sweeper; else nothing is
    claimed and ``FencedOut`` is raised. An empty page locks nothing (as ``claim`` of no
    ids checks no fence), so an idle sweep writes nothing.
    """
    statement = _claim_page_text(
        conn, page_query=page_query, key_width=key_width, fenced=sweeper is not None
    )
    params: list[Any] = [*page_params, claim_limit]
    if sweeper is not None:
        params += [sweeper.policy_key, sweeper.holder, sweeper.token]
    params += [policy_key, lease_seconds, policy_key]
    rows = conn.execute(statement, params).fetchall()
    page = [row for row in rows if row[0] == "page"]
    fences = {row[-2]: row[-1] for row in rows if row[0] == "new"}
    known = [row[-2] for row in rows if row[0] == "known"]
    if sweeper is not None and page and not any(row[0] == "owner" for row in rows):
        raise ownership.fenced_out(conn, sweeper)
    claims = {entry_id: Claim(entry_id, fence) for entry_id, fence in fences.items()}
    if known:
        with conn.transaction():
            if sweeper is not None:
                ownership.check_fence(conn, sweeper)
            claims.update(
                _claim_existing(
                    conn,
                    policy_key=policy_key,
                    entry_ids=known,
                    lease_seconds=lease_seconds,
                    still_pending=still_pending,
                )
            )
    candidates = page if claim_limit is None else page[:claim_limit]
    return ClaimedPage(
        claims=[claims[row[-2]] for row in candidates if row[-2] in claims],
        size=len(page),
        last_key=tuple(candidates[-1][1:-2]) if candidates else None,
    )


# Rendering a statement this size costs more than an idle sweep's reading of an empty page
# (see source._text): its text is kept by what it is made of.
_CLAIM_PAGE_TEXTS_KEPT = 4096
_claim_page_texts: dict[tuple[bytes, int, bool, str], bytes] = {}


def _claim_page_text(
    conn: psycopg.Connection[Any], *, page_query: bytes, key_width: int, fenced: bool
) -> bytes:
    key = (page_query, key_width, fenced, conn.info.encoding)
    text = _claim_page_texts.get(key)
    if text is None:
        page = sql.SQL(page_query.decode(conn.info.encoding))
        text = _claim_page_statement(page, key_width=key_width, fenced=fenced).as_bytes(conn)
        if len(_claim_page_texts) >= _CLAIM_PAGE_TEXTS_KEPT:
            _claim_page_texts.clear()  # policies come and go: forget them all now and then
        _claim_page_texts[key] = text
    return text


def _claim_page_statement(
    page_query: sql.Composable, *, key_width: int, fenced: bool
) -> sql.Composed:
    keys = [sql.Identifier(f"key{index}") for index in range(key_width)]
    owner_check = (
        sql.SQL(
            "owner AS (SELECT 1 FROM {owners} WHERE policy_key = %s AND holder = %s "
            "AND token = %s AND EXISTS (SELECT 1 FROM page) FOR SHARE), "
        ).format(owners=shared.OWNERS)
        if fenced
        else sql.SQL("")
    )
    return sql.SQL(
        """
        WITH page AS MATERIALIZED (
            SELECT * FROM ({page_query}) AS page({keys}, entry_id)
        ),
        candidate AS MATERIALIZED (
            SELECT entry_id FROM page ORDER BY {keys} LIMIT %s
        ),
        {owner_check}
        inserted AS (
            INSERT INTO {entries} (policy_key, entry_id, state, fence_token, lease_deadline,
                dispatched_at)
            SELECT %s, candidate.entry_id, 'queued', gen_random_uuid(),
                now() + make_interval(secs => %s), now()
            FROM candidate {owned}
            ON CONFLICT (policy_key, entry_id) DO NOTHING
            RETURNING entry_id, fence_token
        ),
        known AS (
            SELECT e.entry_id FROM candidate CROSS JOIN LATERAL (
                SELECT entry_id FROM {entries}
                WHERE policy_key = %s AND entry_id = candidate.entry_id AND {claimable}
            ) AS e
            WHERE candidate.entry_id NOT IN (SELECT entry_id FROM inserted)
        )
        SELECT * FROM (
            (SELECT 'page' AS kind, {keys}, entry_id, NULL::uuid AS fence_token
             FROM page ORDER BY {keys})
            UNION ALL
            SELECT 'new', {nulls}, entry_id, fence_token FROM inserted
            UNION ALL
            SELECT 'known', {nulls}, entry_id, NULL FROM known
            {owner_row}
        ) AS result
        """
    ).format(
        page_query=page_query,
        keys=sql.SQL(", ").join(keys),
        owner_check=owner_check,
        entries=shared.ENTRIES,
        claimable=_CLAIMABLE,
        owned=sql.SQL("WHERE EXISTS (SELECT 1 FROM owner)" if fenced else ""),
        nulls=sql.SQL(", ").join(sql.NULL for _ in keys),
        owner_row=(
            sql.SQL("UNION ALL SELECT 'owner', {nulls}, NULL, NULL FROM owner").format(
                nulls=sql.SQL(", ").join(sql.NULL for _ in keys)
            )
            if fenced
            else sql.SQL("")
        ),
    )


_UNTALLY = sql.SQL(
    "UPDATE {tallies} SET succeeded = succeeded - %(count)s WHERE policy_key = %(policy_key)s"
).format(tallies=shared.TALLIES)

_RELEASE_CLAIMS = sql.SQL(
    """
    UPDATE {entries} SET lease_deadline = now(), updated_at = now()
    WHERE fence_token = ANY(%s::uuid[]) AND state = 'queued'
    RETURNING entry_id
    """
).format(entries=shared.ENTRIES)


def release_claims(
    conn: psycopg.Connection[Any], *, fence_tokens: Sequence[uuid.UUID]
) -> list[str]:
    """Make queued entries eligible again at once, instead of after the lease: claims whose
    publish failed, or whose message is gone (a worker took it and died before starting it,
    or it was lost on the way). Returns their entry ids.

    Safe even if some of those messages did reach the broker: the next claim writes a new
    fence token, and a worker drops any delivery whose task id is not the current fence.
    """
    if not fence_tokens:
        return []
    return [row[0] for row in conn.execute(_RELEASE_CLAIMS, [list(fence_tokens)])]


_QUEUED_SINCE = sql.SQL(
    """
    SELECT fence_token::text FROM {entries}
    WHERE policy_key = %s AND state = 'queued' AND lease_deadline > now()
      AND dispatched_at < now() - make_interval(secs => %s)
    """
).format(entries=shared.ENTRIES)


def queued_since(conn: psycopg.Connection[Any], *, policy_key: str, seconds: float) -> list[str]:
    """Fence tokens of entries published more than ``seconds`` ago and not started yet."""
    return [row[0] for row in conn.execute(_QUEUED_SINCE, [policy_key, seconds])]


_RELEASE_QUEUED = sql.SQL(
    """
    UPDATE {entries} SET lease_deadline = now(), updated_at = now()
    WHERE policy_key = %s AND state = 'queued' AND lease_deadline > now()
    """
).format(entries=shared.ENTRIES)


def release_queued(conn: psycopg.Connection[Any], *, policy_key: str) -> int:
    """Make every queued (published, not started) entry eligible now: its message is gone.

    Used when the broker restarted without its queues. A message that did survive carries
    the old fence token and is dropped by the worker, so releasing is always safe.
    """
    return conn.execute(_RELEASE_QUEUED, [policy_key]).rowcount
